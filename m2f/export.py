"""`m2f export`: a model as a deployable graph, a torch.export ExportedProgram (.pt2) or an ONNX file.

Both take one fixed input size, (B, 3, H, W) float RGB on the 0-255 scale (normalisation and padding
to a multiple of 32 are inside the graph), and return (pred_logits (B, Q, K+1), pred_masks (B, Q, h, w))
of the final prediction set: post-processing (`m2f.postprocess`) stays in Python, as its output has a
data-dependent number of segments.

How the multi-scale deformable attention is exported:
- exported_program: as the registered custom op `m2f::ms_deform_attn` (`m2f/ops/library.py`) with the
  compiled kernel, the model's own `deform_impl` (the kernel of the device the model is on unless the
  config says "torch"). torch.export keeps the op as one node (its fake kernel gives the shapes);
  loading the file needs `import m2f.ops.library` first, so the op is registered.
- onnx: expressed in standard ONNX ops, through the pure-PyTorch reference (`m2f/ops/reference.py`,
  whose bilinear sampling is `F.grid_sample`, ONNX GridSample since opset 16). A custom-domain op would
  need a compiled kernel registered in every runtime that loads the file (onnxruntime, TensorRT, ...),
  and a hand-written kernel is exactly where users of the original report wrong exported outputs; the
  reference op is the one every m2f kernel is tested against, and runs anywhere ONNX runs. The cost is
  speed: L*M grid samples per layer instead of one fused kernel.
  The ONNX file is written by torch.onnx's TorchScript exporter by default (about 7x faster to export
  than the dynamo exporter here, same outputs); `dynamo=True` uses the dynamo exporter.
"""

import copy
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from m2f.model import Mask2Former

FORMATS = ("exported_program", "onnx")
ONNX_OPSET = 17  # GridSample needs 16


class ExportedMask2Former(nn.Module):
    """The model as a graph-friendly module: a batch tensor in, the final prediction set's two tensors out.

    Args:
        model: the Mask2Former.
    """

    def __init__(self, model: Mask2Former):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images: (B, 3, H, W) float RGB 0-255 -> (pred_logits (B, Q, K+1), pred_masks (B, Q, h, w))."""
        out = self.model(images)
        return out["pred_logits"], out["pred_masks"]


def parse_size(text: str) -> tuple[int, int]:
    """'800x1216' -> (800, 1216).

    Raises:
        ValueError: not HxW with positive integers.
    """
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match[1]) == 0 or int(match[2]) == 0:
        raise ValueError(f"size must be HxW, e.g. 800x1216, got {text!r}")
    return int(match[1]), int(match[2])


def with_reference_op(model: Mask2Former) -> Mask2Former:
    """A copy of the model whose deformable attention runs the pure-PyTorch reference (standard ops)."""
    from m2f.deformable_encoder import MSDeformAttn

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.impl = "torch"
    return model


def export(model: Mask2Former, *, format: str, size: tuple[int, int], out: str | Path, batch_size: int = 1,
           dynamo: bool = False) -> Path:
    """Exports the model for inputs of one size.

    Args:
        model: the Mask2Former (eval mode is set on a copy; the model itself is not changed).
        format: "exported_program" (torch.export, saved with `torch.export.save`) or "onnx".
        size: (H, W) of the input.
        out: file to write.
        batch_size: B of the input.
        dynamo: ONNX only: use torch.onnx's dynamo exporter instead of the TorchScript one.

    Returns:
        The written file. Load an ExportedProgram with `torch.export.load(out).module()` after
        `import m2f.ops.library`; run the ONNX file with onnxruntime (input "images", outputs
        "pred_logits", "pred_masks").

    Raises:
        ValueError: unknown format.
        ImportError: ONNX without the onnx / onnxscript packages (pip install 'm2f[export]').
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    example = torch.zeros((batch_size, 3, *size), device=device)
    if format == "exported_program":
        import m2f.ops.library  # noqa: F401  (registers m2f::ms_deform_attn, which the graph calls)

        wrapper = ExportedMask2Former(copy.deepcopy(model)).eval()
        with torch.no_grad():
            program = torch.export.export(wrapper, (example,))
        torch.export.save(program, out)
        return out
    try:
        import onnx  # noqa: F401
    except ImportError as err:
        raise ImportError("ONNX export needs the onnx package: pip install 'm2f[export]' "
                          "(onnx, onnxscript, onnxruntime)") from err
    wrapper = ExportedMask2Former(with_reference_op(model)).eval()
    names = {"input_names": ["images"], "output_names": ["pred_logits", "pred_masks"]}
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(wrapper, (example,), str(out), dynamo=True, **names)
        else:
            torch.onnx.export(wrapper, (example,), str(out), dynamo=False, opset_version=ONNX_OPSET, **names)
    return out
