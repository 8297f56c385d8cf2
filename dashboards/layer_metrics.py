"""Per-layer metrics and training curves of one or several runs (e.g. masked vs cross-attention).

PQ / AP / mIoU / AR@100 of every prediction set (set 0 from the learnable queries, set i after decoder
layer i; paper Fig. II) from the run's evaluation cache (`m2f.run_dir`; the full evaluation is preferred,
one on a few images is marked as partial, one of an older checkpoint is never shown), the per-class
PQ of one prediction set, and the training loss and validation metrics from RUN/metrics.jsonl. A run
still training (metrics.jsonl only) shows its curves and a note that there is no layer evaluation yet.
Runs are named by their config (`m2f.run_label`), legends sit beside the plots, never over the data,
and a value a run does not have is left out (with a note), never drawn as 0.

    panel serve dashboards/layer_metrics.py --args RUN_DIR [RUN_DIR ...]
"""

from typing import Any

import holoviews as hv
import panel as pn
import param

from dashboards.common import (
    CURVE,
    alert,
    categories,
    choose_among,
    extensions,
    guarded,
    layer_axis,
    plot_pane,
    runs_from_args,
)
from m2f.run_dir import LAYER_METRICS, RunDir, layer_curves
from m2f.run_label import short_names

# metrics.jsonl keys of the training records, with their axis labels (units where there are any).
TRAIN_KEYS = {"loss": "training loss (all prediction sets)", "loss_ce": "classification loss (CE)",
              "loss_mask": "mask loss (BCE)", "loss_dice": "dice loss", "lr": "learning rate",
              "grad_norm": "gradient norm", "images_per_s": "throughput (images/s)"}


class LayerMetrics(param.Parameterized):
    """The metrics view's state and rendering; usable without a server.

    Args:
        runs: run directories to compare.
    """

    runs = param.ListSelector(default=[], objects=[], label="Runs")
    metric = param.Selector(objects=list(LAYER_METRICS), default="PQ", label="Per-layer metric")
    prediction = param.Integer(default=-1, bounds=(-1, None),
                               label="Per-class PQ of prediction set (0 = learnable queries, -1 = the last)")
    train_key = param.Selector(objects=list(TRAIN_KEYS), default="loss", label="Training curve")

    def __init__(self, *, runs: list[str], **params: Any):
        super().__init__(**params)
        self.names = short_names(list(runs))
        choose_among(self.param.runs, {self.names[r]: r for r in runs})  # shown by name, held as paths
        if not self.runs:
            self.runs = list(runs)

    def _name(self, run: str) -> str:
        return self.names.get(run) or short_names([run])[run]

    def layers(self) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
        """Per run its per-prediction-set metrics (the run's full evaluation when there is one), and
        messages: for runs that have none, and for numbers that are not the run's full evaluation."""
        found, notes = {}, []
        for run in self.runs:
            try:
                evaluation = RunDir.existing(run).layer_evaluation()
            except (OSError, ValueError) as err:
                notes.append(f"{self._name(run)}: {err}")
                continue
            if evaluation is None:
                notes.append(f"{self._name(run)}: no layer evaluation yet of its present checkpoint "
                             f"(`m2f eval RUN --layers all`, or the Proposals tab's button for a few images)")
                continue
            found[run] = evaluation.metrics["layers"]
            if evaluation.is_partial:
                notes.append(f"{self._name(run)}: per-layer numbers on only {evaluation.num_images} validation "
                             f"images (the Proposals tab's evaluation), not the run's metrics; "
                             f"`m2f eval RUN --layers all` evaluates the whole split")
            elif not evaluation.checkpoint_present:
                notes.append(f"{self._name(run)}: numbers recorded with a checkpoint that is not on this machine")
        return found, notes

    def layer_plot(self) -> tuple[hv.Overlay | None, list[str]]:
        """The chosen metric per prediction set, one curve per run."""
        found, notes = self.layers()
        curves = []
        for run, layers in found.items():
            values = layer_curves(layers).get(self.metric)
            if values is None:
                notes.append(f"{self._name(run)}: its layer evaluation has no {self.metric}")
                continue
            points = list(enumerate(values))
            y = hv.Dimension(self.metric, label=f"{self.metric} (%)")
            curves += [hv.Curve(points, layer_axis(), y, label=self._name(run)),
                       hv.Scatter(points, layer_axis(), y, label=self._name(run)).opts(size=5)]
        if not curves:
            return None, notes
        return hv.Overlay(curves).opts(title=f"{self.metric} per prediction set", **CURVE), notes

    def class_plot(self) -> tuple[hv.Bars | None, list[str]]:
        """Per-class PQ of one prediction set for every run that has it."""
        found, notes = self.layers()
        rows = []
        for run, layers in found.items():
            if not -len(layers) <= self.prediction < len(layers):
                notes.append(f"{self._name(run)}: prediction set {self.prediction} is outside 0..{len(layers) - 1}")
                continue
            per_class = layers[self.prediction].get("panoptic", {}).get("per_class", {})
            shown = self.prediction % len(layers)  # -1 named as the set it is
            cats = categories(run)
            names = {} if cats is None else {str(i): n for i, n in zip(cats.ids, cats.names)}
            rows += [(f"{names[str(cid)]} ({cid})" if str(cid) in names else str(cid), self._name(run), 100 * v["pq"])
                     for cid, v in per_class.items()]
        if not rows:
            return None, notes
        bars = hv.Bars(rows, [hv.Dimension("category", label="category (id)"), "run"],
                       hv.Dimension("PQ", label="PQ (%)")).opts(
            title=f"per-class PQ, prediction set {shown}", responsive=True, min_width=380, height=300,
            tools=["hover"], xrotation=30, multi_level=False, legend_position="right", show_grid=True)
        return bars, notes

    def train_plots(self) -> tuple[list[hv.Overlay], list[str]]:
        """The training curve of `train_key` and the validation PQ/AP/mIoU over iterations."""
        train_curves, val_curves, notes = [], [], []
        for run in self.runs:
            try:
                train, val = RunDir.existing(run).read_metrics()
            except (OSError, ValueError) as err:
                notes.append(f"{self._name(run)}: {err}")
                continue
            name = self._name(run)
            points = [(r["iteration"], r[self.train_key]) for r in train if self.train_key in r]
            if points:
                train_curves.append(hv.Curve(points, "iteration",
                                             hv.Dimension(self.train_key, label=TRAIN_KEYS[self.train_key]),
                                             label=name))
            for key in sorted({k for r in val for k in r if k.endswith(("/PQ", "/AP", "/mIoU"))}):
                val_curves.append(hv.Curve([(r["iteration"], 100 * r[key]) for r in val if key in r], "iteration",
                                           hv.Dimension("validation", label="validation metric (%)"),
                                           label=f"{name}: {key.rsplit('/', 1)[1]}"))
            if not val:
                notes.append(f"{self._name(run)}: no validation records yet in metrics.jsonl")
        plots = []
        if train_curves:
            plots.append(hv.Overlay(train_curves).opts(title=TRAIN_KEYS[self.train_key], **CURVE))
        if val_curves:
            plots.append(hv.Overlay(val_curves).opts(title="validation metrics", **CURVE))
        return plots, notes

    @param.depends("runs", "metric", "prediction")
    def layer_view(self) -> pn.viewable.Viewable:
        def render() -> pn.Column:
            if not self.runs:
                return alert("no run selected: start with `m2f dashboard RUN_DIR ...`", kind="warning")
            layer, notes = self.layer_plot()
            bars, more = self.class_plot()
            items = [alert(n, kind="warning") for n in dict.fromkeys(notes + more)]
            items += [plot_pane(p) for p in (layer, bars) if p is not None]
            return pn.Column(*items)
        return guarded(render)

    @param.depends("runs", "train_key")
    def train_view(self) -> pn.viewable.Viewable:
        def render() -> pn.Column:
            plots, notes = self.train_plots()
            return pn.Column(*[alert(n, kind="warning") for n in notes],
                             *[plot_pane(p) for p in plots])
        return guarded(render)

    def panel(self) -> pn.Row:
        controls = pn.Column(
            pn.widgets.MultiSelect.from_param(self.param.runs, size=6),
            pn.widgets.Select.from_param(self.param.metric), pn.widgets.IntInput.from_param(self.param.prediction),
            pn.widgets.Select.from_param(self.param.train_key), width=300)
        return pn.Row(controls, pn.Column(self.layer_view, self.train_view, sizing_mode="stretch_width"),
                      sizing_mode="stretch_width")


if pn.state.served:
    extensions()
    LayerMetrics(runs=runs_from_args()).panel().servable(title="m2f per-layer metrics")
