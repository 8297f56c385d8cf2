"""Parameters and FLOPs of every pixel decoder (Table 4e) and cross-attention variant (Table 4c), beside the paper's.

    python benchmarks/bench_decoders.py [--threads 2] [--size 800 1216] [--tiny-size 128 128]
                                        [--out results]

For the tiny preset and the R50 COCO instance preset (the paper measures Table 4's FLOPs on COCO instance
segmentation), one model per row with random weights, batch 1, `inference_mode`: the backbone's FLOPs are
counted once (they do not depend on the row), the pixel decoder's and the Transformer decoder's per row.
FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (one multiply-add = 2 FLOPs; matmuls,
convolutions, attention), with a formula added here for torchvision's deformable convolution (FaPN), counted
like the dense 3x3 convolution it replaces. Not counted: the bilinear sampling of deformable convolution and
deformable attention, norms and elementwise work. The paper's FLOPs ("G", detectron2's fvcore counter, one
multiply-add = 1 flop, averaged over COCO val images of about 800x1200) compare with our GMAC column = GFLOP/2
at `--size`. Parameters: `m2f.model.count_parameters` (frozen BatchNorm terms included, as the paper's).
Writes `<out>/decoders_cpu.json` and `.md`.
"""

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import machine_info, write_report
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from m2f.config import get_config
from m2f.model import build_model, count_parameters

RESULTS = Path(__file__).resolve().parent.parent / "results"
PRESETS = {"tiny": "tiny", "r50": "r50_coco_instance"}
# (table, label, override, the paper's whole-model FLOPs in G; None where the paper prints "-")
ROWS = [
    ("4e", "FPN", "model.pixel_decoder=fpn", 195.0),
    ("4e", "Semantic FPN", "model.pixel_decoder=semantic_fpn", 258.0),
    ("4e", "FaPN", "model.pixel_decoder=fapn", None),
    ("4e", "BiFPN", "model.pixel_decoder=bifpn", 204.0),
    ("4e", "MSDeformAttn (default)", "model.pixel_decoder=msdeformattn", 226.0),
    ("4c", "cross-attention", "model.attention=cross", 213.0),
    ("4c", "SMCA", "model.attention=smca", 213.0),
    ("4c", "mask pooling", "model.attention=mask_pooling", 217.0),
    ("4c", "masked attention (default)", "model.attention=masked", 226.0),
]


@register_flop_formula(torch.ops.torchvision.deform_conv2d)
def deform_conv2d_flops(input_shape, weight_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """2 x N x C_out x H_out x W_out x (C_in / groups) x k_h x k_w, as a dense convolution."""
    batch, out_channels, out_h, out_w = out_shape
    _, in_per_group, kernel_h, kernel_w = weight_shape
    return 2 * batch * out_channels * out_h * out_w * in_per_group * kernel_h * kernel_w


def gflop(run: Any, *args: Any) -> tuple[float, Any]:
    """GFLOPs of `run(*args)` and its result."""
    with FlopCounterMode(display=False) as counter:
        result = run(*args)
    return counter.get_total_flops() / 1e9, result


def measure_preset(name: str, size: tuple[int, int]) -> list[dict[str, Any]]:
    """One record per row of `ROWS` for the preset `name` at image `size`."""
    image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8)
    records, backbone_gflop = [], None
    for table, label, override, paper in ROWS:
        torch.manual_seed(0)
        # The reference deformable-attention op: no kernel build, and the same count as the kernels'.
        cfg = get_config(PRESETS[name], [override, "model.deform_impl=torch"])
        # No parameter needs a gradient: the flop counter's module hooks trip over views of parameters otherwise.
        model = build_model(cfg).eval().requires_grad_(False)
        start = time.perf_counter()
        with torch.inference_mode():
            x = model.preprocess(image)
            if backbone_gflop is None:
                backbone_gflop, features = gflop(model.backbone, x)
            else:
                features = model.backbone(x)
            pixel_gflop, (mask_features, pyramid) = gflop(model.pixel_decoder, features)
            decoder_gflop, _ = gflop(model.transformer_decoder, pyramid, mask_features)
        total = backbone_gflop + pixel_gflop + decoder_gflop
        records.append({
            "table": table, "row": label, "override": override, "preset": cfg.name, "size": list(size),
            "params_pixel_decoder_m": count_parameters(model.pixel_decoder) / 1e6,
            "params_transformer_decoder_m": count_parameters(model.transformer_decoder) / 1e6,
            "params_total_m": count_parameters(model) / 1e6,
            "gflop_backbone": backbone_gflop, "gflop_pixel_decoder": pixel_gflop,
            "gflop_transformer_decoder": decoder_gflop, "gflop_total": total, "gmac_total": total / 2,
            "paper_g": paper, "seconds": time.perf_counter() - start,
        })
        print(f"{name} {label}: {total:.2f} GFLOP, {records[-1]['params_total_m']:.2f}M params", flush=True)
    return records


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = ["# Pixel decoders (Table 4e) and cross-attention variants (Table 4c): parameters and FLOPs", "",
             f"{meta['processor']}, torch {meta['torch']}, {meta['date']}; `python benchmarks/bench_decoders.py`. "
             "Random weights, batch 1. FLOPs from torch.utils.flop_counter (1 multiply-add = 2 FLOPs; deformable "
             "convolution counted as the dense 3x3 convolution; the bilinear sampling of deformable convolution "
             "and attention, norms and elementwise work not counted). The paper's \"G\" (Table 4, COCO instance, "
             "fvcore: 1 multiply-add = 1 flop) compares with GMAC = GFLOP/2 of the R50 rows.", ""]
    for name, records in report["presets"].items():
        first = records[0]
        lines += [f"## {name} ({first['preset']}, {first['size'][0]}x{first['size'][1]}; backbone "
                  f"{first['gflop_backbone']:.2f} GFLOP in every row)", "",
                  "| table | row | params: pixel dec. | params: Transformer dec. | params: model | "
                  "GFLOP: pixel dec. | GFLOP: Transformer dec. | GFLOP: model | GMAC: model | paper G |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            paper = "-" if r["paper_g"] is None or name == "tiny" else f"{r['paper_g']:.0f}"
            lines.append(f"| {r['table']} | {r['row']} | {r['params_pixel_decoder_m']:.2f}M | "
                         f"{r['params_transformer_decoder_m']:.2f}M | {r['params_total_m']:.2f}M | "
                         f"{r['gflop_pixel_decoder']:.2f} | {r['gflop_transformer_decoder']:.2f} | "
                         f"{r['gflop_total']:.2f} | {r['gmac_total']:.2f} | {paper} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1216), help="R50 image size (H W)")
    parser.add_argument("--tiny-size", type=int, nargs=2, default=(128, 128), help="tiny image size (H W)")
    parser.add_argument("--presets", nargs="+", choices=tuple(PRESETS), default=list(PRESETS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = {"tiny": tuple(args.tiny_size), "r50": tuple(args.size)}
    report = {"meta": machine_info("cpu", args.threads),
              "presets": {name: measure_preset(name, sizes[name]) for name in args.presets}}
    json_path, md_path = write_report(args.out, "decoders_cpu", report, markdown(report))
    print(markdown(report))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
