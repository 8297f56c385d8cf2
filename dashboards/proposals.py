"""Query proposals: every query's mask before the first decoder layer and after each layer.

A grid shows all Q queries of one prediction set (set 0: from the learnable queries, set i: after
decoder layer i) with class and score; clicking a tile (or the query widget) follows that query
through all prediction sets. AR@100 per prediction set (class-agnostic proposal recall, paper Fig. 3)
comes from the run's evaluation of every prediction set (`m2f.run_dir`: the full one when there is one),
or is computed on a few validation images with the button (and then titled as partial). That
evaluation runs in a thread with a progress bar, so the page (and the other tabs) stay usable.

    panel serve dashboards/proposals.py --args RUN_DIR
"""

import threading
from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param

from dashboards.common import (
    CURVE,
    ImagePicker,
    alert,
    choose_among,
    extensions,
    frame,
    guarded,
    layer_axis,
    plot_pane,
    run_config,
    runs_from_args,
)
from m2f.capture import Capture, forward
from m2f.inference import evaluate_run
from m2f.overlay import mosaic, query_tiles
from m2f.run_dir import RunDir, layer_curves
from m2f.run_label import short_names


class ProposalsExplorer(param.Parameterized):
    """The proposals view's state and rendering; usable without a server.

    Args:
        runs: run directories (or checkpoint files) to choose from.
    """

    run = param.Selector(objects=[], label="Run")
    prediction = param.Integer(default=0, bounds=(0, None), label="Prediction set (0 = learnable queries, i = layer i)")
    query = param.Integer(default=0, bounds=(0, None), label="Followed query")
    columns = param.Integer(default=10, bounds=(1, 40), label="Grid columns")
    eval_images = param.Integer(default=8, bounds=(1, None), label="Images for AR@100")
    picker = param.ClassSelector(class_=ImagePicker)
    evaluated = param.Event(label="Compute AR@100 per layer")
    evaluating = param.Boolean(default=False, precedence=-1, doc="True while the button's evaluation runs")

    def __init__(self, *, runs: list[str], **params: Any):
        super().__init__(picker=ImagePicker(), **params)
        self.names = short_names(list(runs))
        choose_among(self.param.run, {self.names[r]: r for r in runs})  # shown by name, held as paths
        if runs and self.run is None:
            self.run = runs[0]
        self._eval_error: Exception | None = None
        self._eval_thread: threading.Thread | None = None
        self._sync_limits()

    @param.depends("run", watch=True)
    def _sync_limits(self) -> None:
        cfg = run_config(self.run)
        if cfg is None:
            return
        self.param.prediction.bounds = (0, cfg.model.dec_layers)
        self.param.query.bounds = (0, cfg.model.num_queries - 1)
        self.prediction = min(self.prediction, cfg.model.dec_layers)
        self.query = min(self.query, cfg.model.num_queries - 1)

    def capture(self) -> Capture:
        if self.run is None:
            raise ValueError("no run given: start with `m2f dashboard RUN_DIR` (or pass runs=[...])")
        image, _ = self.picker.image(self.run)
        return forward(self.run, image)

    @staticmethod
    def _tiles(tiles: list[np.ndarray], titles: list[str], columns: int, group: str
               ) -> tuple[hv.RGB, hv.Labels, list[tuple[int, int]], tuple[int, int]]:
        """A mosaic of tiles with a title at each tile's top-left corner (plot coordinates = mosaic pixels)."""
        grid, corners = mosaic(tiles, columns=columns)
        h, w = grid.shape[:2]
        # Axes named per mosaic: Panel links the axes of panes whose dimensions share names, which
        # squeezed the track into the grid's ranges.
        kdims = [f"{group.lower()}_x", f"{group.lower()}_y"]
        labels = hv.Labels([(left + 1, h - top - 1, t) for (top, left), t in zip(corners, titles)],
                           kdims=kdims).opts(text_font_size="7pt", text_color="white",
                                                    text_align="left", text_baseline="top")
        rgb = hv.RGB(grid, bounds=(0, 0, w, h), kdims=kdims, group=group)
        return rgb, labels, corners, tiles[0].shape[:2]

    def grid(self) -> tuple[hv.Overlay, hv.streams.Tap]:
        """All queries' masks in the selected prediction set, with a Tap stream that selects a query."""
        cap = self.capture()
        if self.prediction > cap.num_layers:
            raise IndexError(f"prediction set {self.prediction} is outside 0..{cap.num_layers}")
        classes, scores = cap.classes(self.prediction)
        titles = [f"q{q} c{c} {s:.2f}" for q, (c, s) in enumerate(zip(classes, scores))]
        rgb, labels, corners, (th, tw) = self._tiles(query_tiles(cap, prediction=self.prediction),
                                                     titles, self.columns, "Proposals")
        tap = hv.streams.Tap(source=rgb, transient=True)
        height = rgb.data.shape[0]

        def select(x: float | None, y: float | None) -> None:
            if x is None or y is None:
                return
            for q, (top, left) in enumerate(corners):
                if left <= x < left + tw and top <= height - y < top + th:
                    self.query = q

        tap.add_subscriber(lambda **kw: select(kw.get("x"), kw.get("y")))
        where = "learnable queries, before layer 1" if self.prediction == 0 else f"after layer {self.prediction}"
        return (rgb * labels).opts(title=f"{self._name()}: all queries, prediction set {self.prediction} ({where}); "
                                         f"click a tile to follow it",
                                   xaxis=None, yaxis=None, **frame(*rgb.data.shape[:2], size=900)), tap

    def track(self) -> hv.Overlay:
        """The followed query's mask in every prediction set."""
        cap = self.capture()
        titles = []
        for p in range(cap.num_layers + 1):
            classes, scores = cap.classes(p)
            titles.append(f"set {p} c{classes[self.query]} {scores[self.query]:.2f}")
        # Two rows of tiles: one row of ten is too flat for its title and toolbar.
        rgb, labels, _, _ = self._tiles(query_tiles(cap, query=self.query), titles,
                                        -(-(cap.num_layers + 1) // 2), "Track")
        return (rgb * labels).opts(title=f"query {self.query} in prediction sets 0 (learnable queries) to "
                                         f"{cap.num_layers} (after layer {cap.num_layers})", xaxis=None, yaxis=None,
                                   **frame(*rgb.data.shape[:2], size=900))

    def _name(self) -> str:
        return self.names.get(self.run) or short_names([self.run])[self.run]

    @param.depends("evaluated", watch=True)
    def _evaluate(self) -> None:
        """Starts the evaluation of the button in a thread: minutes on a CPU, which must not block the
        server's event loop (every tab of every session would freeze). One at a time."""
        if self.evaluating or self.run is None:
            return
        self._eval_error = None
        self.evaluating = True
        run, images, doc = self.run, self.eval_images, pn.state.curdoc

        def work() -> None:
            error = None
            try:
                evaluate_run(RunDir.existing(run), layers="all", proposals=True, max_images=images)
            except Exception as err:  # shown in the recall view, like the view's own errors
                error = err

            def done() -> None:
                self._eval_error, self.evaluating = error, False

            # Widgets change on the session's event loop; without a server (tests, a notebook) at once.
            if doc is not None and doc.session_context is not None:
                doc.add_next_tick_callback(done)
            else:
                done()

        self._eval_thread = threading.Thread(target=work, name="m2f-ar-evaluation", daemon=True)
        self._eval_thread.start()

    def recall(self) -> hv.Overlay:
        """AR@100 per prediction set from the run's layer evaluation.

        Raises:
            FileNotFoundError: the run has no layer evaluation yet.
        """
        evaluation = RunDir.existing(self.run).layer_evaluation(proposals=True)
        if evaluation is None:
            raise FileNotFoundError(f"{self._name()} has no per-layer evaluation with proposal recall "
                                    f"of its checkpoint yet: press 'Compute AR@100 per layer' (evaluates "
                                    f"{self.eval_images} validation images)")
        curves = layer_curves(evaluation.metrics["layers"])
        note = evaluation.describe()
        points = list(enumerate(curves["AR@100"]))
        y = hv.Dimension("AR@100", label="AR@100 (%)")
        return (hv.Curve(points, layer_axis(), y) * hv.Scatter(points, layer_axis(), y).opts(size=6)).opts(
            title="class-agnostic AR@100 per prediction set" + (f" ({note})" if note else ""), **CURVE)

    @param.depends("run", "prediction", "columns", "picker.source", "picker.image_index")
    def grid_view(self) -> pn.viewable.Viewable:
        return guarded(lambda: pn.pane.HoloViews(self.grid()[0]))

    @param.depends("run", "query", "picker.source", "picker.image_index")
    def track_view(self) -> pn.viewable.Viewable:
        return guarded(lambda: pn.pane.HoloViews(self.track()))

    @param.depends("run", "evaluating")
    def recall_view(self) -> pn.viewable.Viewable:
        if self.evaluating:
            return pn.Column(pn.indicators.Progress(active=True, width=300),
                             pn.pane.Markdown(f"Evaluating {self.eval_images} validation images of "
                                              f"{self._name()} for AR@100 per prediction set; the other "
                                              f"plots and tabs stay usable."))
        if self._eval_error is not None:
            return alert(self._eval_error)

        def render() -> pn.viewable.Viewable:
            try:
                return plot_pane(self.recall())
            except FileNotFoundError as err:  # not evaluated yet: a hint, not an error
                return alert(err, kind="warning")
        return guarded(render)

    def panel(self) -> pn.Row:
        controls = pn.Column(
            pn.widgets.Select.from_param(self.param.run), self.picker.widgets(),
            pn.widgets.IntSlider.from_param(self.param.prediction), pn.widgets.IntSlider.from_param(self.param.query),
            pn.widgets.IntInput.from_param(self.param.columns), pn.widgets.IntInput.from_param(self.param.eval_images),
            pn.widgets.Button.from_param(self.param.evaluated, color="primary"), width=300)
        # Deferred: the page appears at once and the plots follow when the model has run.
        return pn.Row(controls, pn.Column(*(pn.panel(v, defer_load=True)
                                            for v in (self.grid_view, self.track_view, self.recall_view))))


if pn.state.served:
    extensions()
    ProposalsExplorer(runs=runs_from_args()).panel().servable(title="m2f query proposals")
