"""The analyses behind the paper's figures, as functions the notebooks call (no UI, matplotlib only).

Each `figure*` function takes trained runs ({label: run directory}), computes what the figure shows,
checks the paper's claim on our numbers, and returns `FigureResult` (metrics for `m2f reproduce`,
and matplotlib figures). `save` writes them into a notebook's output folder.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m2f.capture import LEVEL_NAMES, MASK_STRIDE, capture, dataset_image
from m2f.evaluation.attention_mass import AttentionMassMeter, foreground_at_level
from m2f.overlay import colorize, overlay, palette, resize_rgb
from m2f.run_dir import RunDir


@dataclass
class FigureResult:
    """What a figure notebook writes.

    Args:
        rows: run label -> {metric: value} (the table's columns).
        claims: [{"claim": the paper's statement, "ours": our numbers in words, "agrees": bool}].
        figures: file name -> matplotlib Figure.
        extra: anything else worth keeping in metrics.json (curves per layer, ...).
    """

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    claims: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def save(output_dir: str | Path, metrics: dict[str, Any], figures: dict[str, Any] = ()) -> Path:
    """Writes output_dir/metrics.json and each figure as PNG; returns the metrics path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in dict(figures).items():
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
    path = out / "metrics.json"
    path.write_text(json.dumps({**metrics, "figures": list(dict(figures))}, indent=1, default=float))
    return path


def _pyplot() -> Any:
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "agg"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _attention_of(run: str | Path) -> str:
    return RunDir.existing(run).load()[1].model.attention


def training_curves(runs: dict[str, str | Path]) -> Any:
    """Training loss and validation PQ against iterations, one line per run."""
    plt = _pyplot()
    fig, (ax_loss, ax_pq) = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, run in runs.items():
        train, val = RunDir.existing(run).read_metrics()
        ax_loss.plot([r["iteration"] for r in train], [r["loss"] for r in train], label=label)
        ax_pq.plot([r["iteration"] for r in val], [100 * r.get("panoptic/PQ", np.nan) for r in val], marker="o",
                   label=label)
    ax_loss.set(xlabel="iteration", ylabel="training loss (all 10 prediction sets)", yscale="log")
    ax_pq.set(xlabel="iteration", ylabel="PQ (%, validation)")
    for ax in (ax_loss, ax_pq):
        ax.grid(alpha=0.3)
    _legend_beside(ax_pq)
    fig.tight_layout()
    return fig


def layer_plot(curves: dict[str, list[float]], *, ylabel: str, title: str) -> Any:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", label=label)
    ax.set(xlabel="prediction set (0 = learnable queries, then decoder layers)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    _legend_beside(ax)
    fig.tight_layout()
    return fig


def _legend_beside(ax: Any) -> None:
    """The legend right of the axes, never over a curve (`save` writes with bbox_inches="tight", so
    nothing is cut); the same placement as the dashboards' legends."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _layer_summaries(runs: dict[str, str | Path]) -> dict[str, dict[str, Any]]:
    from m2f.experiment import evaluate_run, summarize

    return {label: summarize(run, evaluate_run(run, layers="all", proposals=True, progress=False))
            for label, run in runs.items()}


def figure_layers(runs: dict[str, str | Path]) -> FigureResult:
    """Fig. II: PQ of every prediction set; the claim compares masked attention after one decoder layer
    with cross-attention after all of them."""
    summaries = _layer_summaries(runs)
    curves = {label: s["layers"]["PQ"] for label, s in summaries.items()}
    result = FigureResult(rows={label: {"PQ": s["PQ"], "PQ_layer1": s["layers"]["PQ"][1]} for label, s in summaries.items()},
                          extra={"PQ_per_layer": curves},
                          figures={"figure2.png": layer_plot(curves, ylabel="PQ (%)", title="PQ of every prediction set")})
    masked = [label for label, run in runs.items() if _attention_of(run) == "masked"]
    cross = [label for label, run in runs.items() if _attention_of(run) == "cross"]
    if masked and cross:
        first, last = curves[masked[0]][1], curves[cross[0]][-1]
        result.claims.append({"claim": "masked attention after 1 decoder layer > cross-attention after all layers",
                              "ours": f"PQ {first:.1f} vs {last:.1f}", "agrees": first > last})
    return result


def figure_proposals(runs: dict[str, str | Path], *, image_index: int = 0, num_queries: int = 4) -> FigureResult:
    """Fig. 3: class-agnostic AR@100 of the Q mask proposals of every prediction set, and the masks of
    a few learnable queries (prediction set 0, before any decoder layer) on one validation image."""
    summaries = _layer_summaries(runs)
    curves = {label: s["layers"]["AR@100"] for label, s in summaries.items()}
    result = FigureResult(rows={label: {"AR@100": s["AR@100"], "AR@100_layer0": s["layers"]["AR@100"][0]}
                                for label, s in summaries.items()}, extra={"AR@100_per_layer": curves})
    result.figures["figure3_ar.png"] = layer_plot(curves, ylabel="AR@100 (%, class-agnostic)",
                                                   title="Learnable queries as region proposals")
    for label, values in curves.items():
        result.claims.append({"claim": f"{label}: AR@100 improves from the learnable queries to the last layer",
                              "ours": f"AR@100 {values[0]:.1f} (prediction set 0) -> {values[-1]:.1f} (set {len(values) - 1})",
                              "agrees": values[-1] > values[0]})
    label, run = next(iter(runs.items()))
    ref = dataset_image(run, image_index)
    cap = capture(RunDir.existing(run).load()[0], ref.image)
    _, scores = cap.classes(0)
    chosen = np.argsort(-scores)[:num_queries]
    small = resize_rgb(cap.image, cap.valid_cells(MASK_STRIDE))
    plt = _pyplot()
    fig, axes = plt.subplots(1, num_queries + 1, figsize=(2.2 * (num_queries + 1), 2.4))
    axes[0].imshow(cap.image)
    axes[0].set_title(ref.name, fontsize=7)
    for ax, q, color in zip(axes[1:], chosen, palette(num_queries)):
        ax.imshow(overlay(small, cap.mask(0, int(q)) > 0.5, color))
        ax.set_title(f"query {q} (prediction set 0)", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{label}: masks of learnable queries before the decoder", fontsize=9)
    result.figures["figure3_queries.png"] = fig
    return result


def attention_mass_per_level(run: str | Path, *, max_images: int = 50) -> dict[str, float]:
    """Fig. I (b): the mean fraction of cross-attention on the foreground, per feature resolution.

    For each validation image the final masks are matched one-to-one to the ground-truth segments
    (maximum IoU); every matched query's attention in every decoder layer (mean over heads) is split
    by the level it attends, and its mass on the matched segment (resized to that level) is averaged.

    Returns:
        {"fg_1/32", "fg_1/16", "fg_1/8": mean foreground fraction, "fg_mean": their mean, "count": queries
        x layers averaged}.
    """
    import torch

    model = RunDir.existing(run).load()[0]
    meters = {name: AttentionMassMeter() for name in LEVEL_NAMES}
    for index in range(min(max_images, len(RunDir.existing(run).val_dataset()))):
        ref = dataset_image(run, index)
        cap = capture(model, ref.image)
        matches = cap.match_ground_truth(ref.gt_masks)
        if not matches:
            continue
        queries = list(matches)
        gt = torch.from_numpy(cap.pad(ref.gt_masks[[matches[q] for q in queries]]))
        for layer in range(cap.num_layers):
            weights = torch.from_numpy(cap.attn[layer][:, queries].mean(0))  # (matched Q, S)
            for (level, _, span), shape in zip(cap.level_slices(layer), cap.level_shapes[layer]):
                meters[LEVEL_NAMES[level]].update(weights[None, :, span], foreground_at_level(gt, shape)[None])
    out = {f"fg_{name}": float(m.compute()["foreground"]) for name, m in meters.items()}
    out["fg_mean"] = float(np.nanmean(list(out.values())))
    out["count"] = sum(m.count for m in meters.values())
    return out


def figure_attention(runs: dict[str, str | Path], *, max_images: int = 50, image_index: int = 0) -> FigureResult:
    """Fig. I: attention maps of the last three decoder layers for the query matched to the largest
    ground-truth segment, and the foreground attention mass per resolution (masked vs cross)."""
    result = FigureResult(rows={label: attention_mass_per_level(run, max_images=max_images)
                                for label, run in runs.items()})
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 4, figsize=(9, 2.4 * len(runs)), squeeze=False)
    for row_axes, (label, run) in zip(axes, runs.items()):
        ref = dataset_image(run, image_index)
        cap = capture(RunDir.existing(run).load()[0], ref.image)
        matches = cap.match_ground_truth(ref.gt_masks)
        largest = int(np.argmax(ref.gt_masks.reshape(len(ref.gt_masks), -1).sum(1)))
        query = next((q for q, g in matches.items() if g == largest), 0)
        row_axes[0].imshow(cap.image)
        row_axes[0].contour(ref.gt_masks[largest], levels=[0.5], colors="white", linewidths=0.8)
        row_axes[0].set_title(f"{label}\nquery {query}", fontsize=8)
        for ax, layer in zip(row_axes[1:], range(cap.num_layers - 3, cap.num_layers)):
            # Bounds are (left, bottom, right, top) with y up, so image and attention share one frame.
            attention, (left, bottom, right, top) = cap.attention(layer, query, head=None)
            height, width = cap.image.shape[:2]
            ax.imshow(cap.image, extent=(0, width, 0, height))
            ax.imshow(attention, extent=(left, right, bottom, top), cmap="inferno", alpha=0.7)
            ax.set_title(f"layer {layer + 1} (1/{cap.level_slices(layer)[0][1]})", fontsize=8)
        for ax in row_axes:
            ax.axis("off")
    fig.tight_layout()
    result.figures["figure1_maps.png"] = fig
    masked = [label for label, run in runs.items() if _attention_of(run) == "masked"]
    cross = [label for label, run in runs.items() if _attention_of(run) == "cross"]
    if masked and cross:
        a, b = result.rows[masked[0]], result.rows[cross[0]]
        for key in ("fg_1/32", "fg_1/16", "fg_1/8", "fg_mean"):
            result.claims.append({"claim": f"more attention on the foreground with masked attention ({key[3:]})",
                                  "ours": f"{a[key]:.2f} (masked) vs {b[key]:.2f} (cross)", "agrees": a[key] > b[key]})
    return result


def predictions(run: str | Path, *, image_index: int = 0) -> Any:
    """One validation image with its ground truth and the run's panoptic, instance and semantic results."""
    import torch

    from m2f.inference import predict
    model, cfg = RunDir.existing(run).load()
    ref = dataset_image(run, image_index)
    is_thing = [c.isthing for c in RunDir.existing(run).val_dataset().categories]
    image = torch.from_numpy(ref.image).permute(2, 0, 1)
    gt = np.full(ref.image.shape[:2], -1)
    for g, mask in enumerate(ref.gt_masks):
        gt[mask] = g
    panels = {"image": ref.image, "ground truth": colorize(gt)}
    if cfg.test.panoptic_on:
        panoptic = predict(model, [image], task="panoptic", is_thing=is_thing)[0]
        panels["panoptic"] = colorize(panoptic["panoptic_seg"].numpy() - 1)
    if cfg.test.instance_on:
        instances = predict(model, [image], task="instance", is_thing=is_thing)[0]
        labels = np.full(ref.image.shape[:2], -1)
        for i in np.argsort(instances["scores"].numpy())[:-11:-1][::-1]:  # the 10 best, best drawn last
            if instances["scores"][i] > 0.5:
                labels[instances["masks"][i].numpy() > 0] = i
        panels["instance (score > 0.5)"] = colorize(labels)
    if cfg.test.semantic_on:
        panels["semantic"] = colorize(predict(model, [image], task="semantic", is_thing=is_thing)[0].numpy())
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6))
    for ax, (title, array) in zip(axes, panels.items()):
        ax.imshow(array)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig
