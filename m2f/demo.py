"""The main job (`make demo` / `m2f demo`): the tiny-scale reproduction of the headline results.

1. Generate the synthetic panoptic benchmark (COCO formats) unless it is already there.
2. Train the tiny preset three times, the rows of Table 4a: Mask2Former, without masked attention
   (standard cross-attention), without high-resolution features (every layer on 1/32).
3. Evaluate every prediction set of each run (Fig. II: PQ per decoder layer) and the proposals.
4. Write results/table4a.md (ours beside the paper's, with whether each ablation's direction agrees)
   and results/figure2.png, and print where everything is.

Every step is resumable: a finished run is not trained again, an interrupted one resumes from its
last checkpoint.
"""

import json
import time
from pathlib import Path
from typing import Any

# Table 4a of the paper (COCO panoptic PQ, R50): the full model and one component removed at a time.
TABLE_4A = [
    ("Mask2Former (ours)", "masked", [], 51.9),
    ("- masked attention", "cross", ["model.attention=cross"], 47.1),
    ("- high-resolution features", "single_1_32", ["model.feature_scales=single_1/32"], 50.2),
]
DATA = {"num_train": 800, "num_val": 100, "image_size": 128, "seed": 0}
# Training iterations per run: the tiny preset trains at about 2 iterations/s (batch 8) on 2 idle
# cores, so three runs plus evaluation fit the main job's ~20 minutes.
DEMO_ITERS = 500


def main_job(out: Path, iters: int = DEMO_ITERS) -> dict[str, Any]:
    """Runs the tiny-scale reproduction into `out` and returns the table rows.

    Args:
        out: output folder (data/, runs/, results/).
        iters: training iterations per run; validation PQ is logged five times per run.
    """
    from m2f.config import get_config
    from m2f.data.synthetic import generate
    from m2f.inference import evaluate, load_run
    from m2f.train import train

    start = time.perf_counter()
    data = out / "data"
    if not (data / "annotations" / "panoptic_val2017.json").is_file():
        print(f"m2f demo: generating the synthetic dataset in {data}", flush=True)
        generate(data, **DATA)
    rows = []
    for label, slug, overrides, paper_pq in TABLE_4A:
        run = out / "runs" / slug
        final = run / "eval_layers.json"
        cfg = get_config("tiny", [f"data.root={data}", f"train.max_iters={iters}",
                                  f"train.eval_period={max(iters // 5, 1)}", *overrides])
        if not final.is_file():
            train(cfg, out_dir=run, resume=True)
            model, _ = load_run(run)
            metrics = evaluate(model, cfg, layers="all", proposals=True, progress=True)
            final.write_text(json.dumps(metrics, indent=2, default=str))
        metrics = json.loads(final.read_text())
        rows.append({"label": label, "run": str(run), "paper_PQ": paper_pq,
                     "PQ": 100 * metrics["panoptic"]["PQ"], "AP": 100 * metrics["instance"]["AP"],
                     "mIoU": 100 * metrics["semantic"]["mIoU"],
                     "PQ_per_layer": [100 * layer["panoptic"]["PQ"] for layer in metrics["layers"]]})
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "table4a.md").write_text(table4a_markdown(rows))
    (results / "table4a.json").write_text(json.dumps(rows, indent=2))
    figure2(rows, results / "figure2.png")
    minutes = (time.perf_counter() - start) / 60
    print(f"\nm2f demo finished in {minutes:.1f} min\n")
    print((results / "table4a.md").read_text())
    print(f"results:   {results}/table4a.md, table4a.json, figure2.png")
    print(f"runs:      {out / 'runs'} (config.json, metrics.jsonl, checkpoint.pth, eval_layers.json)")
    print(f"dashboards: .venv/bin/m2f dashboard {out / 'runs' / 'masked'} {out / 'runs' / 'cross'}")
    return {"rows": rows, "minutes": minutes}


def table4a_markdown(rows: list[dict[str, Any]]) -> str:
    """Ours beside the paper's PQ; an ablation "agrees" when removing the component lowers PQ in both."""
    base, base_paper = rows[0]["PQ"], rows[0]["paper_PQ"]
    lines = ["# Table 4a at tiny scale (synthetic data, CPU)", "",
             "| model | PQ (ours) | AP (ours) | mIoU (ours) | PQ (paper, COCO R50) | Δ ours | Δ paper | direction |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        d_ours, d_paper = row["PQ"] - base, row["paper_PQ"] - base_paper
        agrees = "-" if row is rows[0] else ("agrees" if d_ours < 0 else "does NOT agree")
        lines.append(f"| {row['label']} | {row['PQ']:.1f} | {row['AP']:.1f} | {row['mIoU']:.1f} | "
                     f"{row['paper_PQ']:.1f} | {d_ours:+.1f} | {d_paper:+.1f} | {agrees} |")
    lines += ["", "PQ per prediction set (0 = learnable queries before the decoder, 1-9 = decoder layers):", ""]
    for row in rows:
        lines.append(f"- {row['label']}: " + ", ".join(f"{v:.1f}" for v in row["PQ_per_layer"]))
    return "\n".join(lines) + "\n"


def figure2(rows: list[dict[str, Any]], path: Path) -> None:
    """Fig. II: PQ of every decoder layer, masked vs cross-attention (and the other rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for row in rows:
        ax.plot(range(len(row["PQ_per_layer"])), row["PQ_per_layer"], marker="o", label=row["label"])
    ax.set_xlabel("prediction set (0 = learnable queries, 1-9 = decoder layer)")
    ax.set_ylabel("PQ (synthetic val)")
    ax.set_title("Figure II at tiny scale: PQ of each decoder layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
