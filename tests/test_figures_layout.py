"""The notebooks' matplotlib figures: legends beside the axes (never over a curve), axes with units."""

import matplotlib

matplotlib.use("Agg")

from m2f.reproduce import figures


def _beside(fig, ax) -> bool:
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    return legend.x0 >= axes.x1


def test_layer_plot_legend_is_beside_the_axes_and_names_units():
    curves = {"Mask2Former": [10.0, 20.0, 30.0], "cross-attention, a long name for a run": [5.0, 15.0, 25.0]}
    fig = figures.layer_plot(curves, ylabel="PQ (%)", title="PQ of every prediction set")
    ax = fig.axes[0]
    assert _beside(fig, ax)
    assert ax.get_ylabel() == "PQ (%)" and ax.get_xlabel().startswith("prediction set (0 = learnable queries")


def test_training_curves_legend_is_beside_the_axes(tmp_path):
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"split": "train", "iteration": 10, "loss": 50.0}, {"split": "train", "iteration": 20, "loss": 40.0},
        {"split": "val", "iteration": 20, "panoptic/PQ": 0.3}]))
    fig = figures.training_curves({"Mask2Former": run})
    assert _beside(fig, fig.axes[1]) and fig.axes[1].get_ylabel() == "PQ (%, validation)"
