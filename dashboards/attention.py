"""Attention explorer: what one query attends to in each decoder layer (masked vs standard cross-attention).

For a query, decoder layer (1-9, the paper's numbering: prediction set 0 comes from the learnable
queries, set i from layer i), head (or the mean over heads) and feature level it shows the image, the
query's predicted mask after that layer, the binary attention mask that limited the layer's
cross-attention (prediction set i-1 thresholded), and the attention map over the image with a colour
bar, all on linked axes. A second run (e.g. the same data with standard cross-attention) is shown as
a second row; one that cannot be shown (no checkpoint yet) is a warning above the first run's plots. Below: the fraction of the query's attention inside its predicted mask and inside the
ground-truth segment it is matched to (foreground attention mass, paper Fig. I b).

    panel serve dashboards/attention.py --args RUN_DIR [CROSS_ATTENTION_RUN_DIR]
"""

from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param

from dashboards.common import (
    NO_RUN,
    ImagePicker,
    alert,
    categories,
    choose_among,
    extensions,
    frame,
    guarded,
    run_config,
    runs_from_args,
)
from m2f.capture import LEVEL_NAMES, MASK_STRIDE, ImageRef, forward
from m2f.overlay import overlay, palette, resize_rgb
from m2f.run_dir import RunDir
from m2f.run_label import short_names

# Titles of up to three short lines (a 230 px frame cuts one long line): 10 pt keeps them inside it.
PLOT = {"xaxis": None, "yaxis": None, "toolbar": None, "fontsize": {"title": "10pt"}}


class AttentionExplorer(param.Parameterized):
    """The attention explorer's state (widgets) and rendering; usable without a server.

    Args:
        runs: run directories (or checkpoint files) to choose from.
    """

    run = param.Selector(objects=[], label="Run")
    compare_run = param.Selector(objects=[NO_RUN], default=NO_RUN, label="Compare with run")
    query = param.Integer(default=0, bounds=(0, None), label="Query")
    layer = param.Integer(default=1, bounds=(1, None), label="Decoder layer (prediction set 0 feeds layer 1)")
    head = param.Selector(objects=["mean"], default="mean", label="Head")
    level = param.Integer(default=0, bounds=(0, 2), label="Level (for layers attending several)")
    picker = param.ClassSelector(class_=ImagePicker)

    def __init__(self, *, runs: list[str], **params: Any):
        super().__init__(picker=ImagePicker(), **params)
        self.names = short_names(list(runs))
        # {shown name: run}: the selectors show short names, the parameters hold the paths.
        choose_among(self.param.run, {self.names[r]: r for r in runs})
        choose_among(self.param.compare_run, {NO_RUN: NO_RUN, **{self.names[r]: r for r in runs}})
        if runs and self.run is None:
            self.run = runs[0]
        if len(runs) > 1 and self.compare_run == NO_RUN:
            self.compare_run = runs[1]  # e.g. `m2f dashboard MASKED_RUN CROSS_RUN` compares them at once
        self._sync_limits()

    @param.depends("run", watch=True)
    def _sync_limits(self) -> None:
        """Query, layer and head ranges follow the run's config (when it loads)."""
        cfg = run_config(self.run)
        if cfg is None:
            return
        m = cfg.model
        self.param.query.bounds = (0, m.num_queries - 1)
        self.param.layer.bounds = (1, m.dec_layers)
        heads = 1 if m.attention == "mask_pooling" else m.nheads
        self.param.head.objects = ["mean", *map(str, range(heads))]
        self.query, self.layer = min(self.query, m.num_queries - 1), min(self.layer, m.dec_layers)
        if self.head not in self.param.head.objects:
            self.head = "mean"

    def _head(self) -> int | None:
        return None if self.head == "mean" else int(self.head)

    def _name(self, run: str) -> str:
        return self.names.get(run) or short_names([run])[run]

    def row(self, run: str, image: ImageRef) -> tuple[list[hv.Element], dict[str, Any]]:
        """One run's four plots and its attention-mass numbers for the current selection.

        Returns:
            (plots, info) with info {"run", "attention", "foreground_pred", "foreground_gt", "gt"}.
        """
        _, cfg = RunDir.existing(run).load()
        cap = forward(run, image)
        layer = self.layer - 1  # the capture's index of decoder layer `self.layer`
        if self.query >= cap.num_queries or not 0 <= layer < cap.num_layers:
            raise IndexError(f"{self._name(run)} has {cap.num_queries} queries and decoder layers 1-{cap.num_layers}; "
                             f"query {self.query} / layer {self.layer} do not exist there")
        head = self._head()
        if head is not None and head >= cap.num_heads:
            raise IndexError(f"{self._name(run)} has {cap.num_heads} attention head(s); head {head} does not exist")
        level_pos = min(self.level, len(cap.levels[layer]) - 1)
        level_name = LEVEL_NAMES[cap.levels[layer][level_pos]]
        name = self._name(run)
        labels, scores = cap.classes(self.layer)
        found = categories(run)
        names = None if found is None else found.names
        category = f"{names[labels[self.query]]} (class {labels[self.query]})" if names else f"class {labels[self.query]}"
        color = palette(cap.num_queries)[self.query]
        opts = {**PLOT, **frame(*image.image.shape[:2], size=230)}

        picture = hv.RGB(image.image, bounds=cap.image_bounds, label="image").opts(title=name, **opts)
        after = cap.mask(self.layer, self.query) > 0.5
        mask_rgb = overlay(resize_rgb(image.image, after.shape), after, color)
        # An empty mask looks like the plain image: say so rather than leave the reader guessing.
        what = f"{category} {scores[self.query]:.2f}" + ("" if after.any() else "\nmask empty (no pixel > 0.5)")
        predicted = hv.RGB(mask_rgb, bounds=cap.bounds(MASK_STRIDE), group="Predicted", label="mask").opts(
            title=f"q{self.query} after layer {self.layer}\n{what}", **opts)
        gate, gate_bounds = cap.attention_mask(layer, self.query, level_pos)
        if gate is None:
            gate_plot = hv.RGB(image.image, bounds=cap.image_bounds, group="AttentionMask", label="none").opts(
                title="no attention mask\n(cross-attention)", **opts)
        else:
            title = f"attention mask, layer {self.layer}, {level_name}"
            if gate.all():  # all white: the blank panel needs its reason
                before = cap.mask(layer, self.query) > 0.5  # prediction set layer = the one before this layer
                title += ("\nall white: set {} mask covers all" if before.all() else
                          "\nall white: set {} mask is empty,\nso it attends everywhere").format(layer)
            gate_plot = hv.Image(gate.astype(np.float32), bounds=gate_bounds, group="AttentionMask",
                                 label="mask").opts(cmap="gray", clim=(0, 1), title=title, **opts)
        attn, attn_bounds = cap.attention(layer, self.query, head, level_pos)
        heat = hv.Image(attn, bounds=attn_bounds, group="Attention", label="map",
                        vdims=[hv.Dimension("weight", label="attention weight")]).opts(
            cmap="inferno", alpha=0.65, tools=["hover"], colorbar=True, colorbar_position="right",
            clim=(0.0, max(float(attn.max()), 1e-6)))
        attention = (hv.RGB(image.image, bounds=cap.image_bounds) * heat).opts(
            title=f"layer {self.layer} attention\nhead {self.head}, {level_name}", **opts)

        region = cap.predicted_region(self.layer, self.query)
        info: dict[str, Any] = {"run": name, "attention": cfg.model.attention, "foreground_gt": None, "gt": None,
                                # An empty predicted mask has no inside: no fraction rather than 0 %.
                                "foreground_pred": cap.attention_mass(layer, self.query, head, region)
                                if region.any() else None}
        if image.gt_masks is not None:
            matched = cap.match_ground_truth(image.gt_masks).get(self.query)
            if matched is not None:
                gt_class = int(image.gt_labels[matched])
                info["gt"] = f"segment {matched} ({names[gt_class] + ', ' if names else ''}class {gt_class})"
                info["foreground_gt"] = cap.attention_mass(layer, self.query, head, cap.pad(image.gt_masks[matched]))
        return [picture, predicted, gate_plot, attention], info

    def figure(self) -> tuple[hv.Layout, list[dict[str, Any]], list[tuple[str, str]]]:
        """The plots of the selected run (and the comparison run), their mass numbers and notes as
        (alert kind, text): a comparison run that cannot be shown is a warning, the main run still shows.

        Raises:
            ValueError / OSError / IndexError: the main run cannot be shown (the view's Alert says why).
        """
        if self.run is None:
            raise ValueError("no run given: start with `m2f dashboard RUN_DIR` (or pass runs=[...])")
        image, conversions = self.picker.image(self.run)
        notes = [("info", n) for n in conversions]
        plots, row_infos = self.row(self.run, image)
        infos = [row_infos]
        if self.compare_run not in (NO_RUN, self.run):
            try:
                row, info = self.row(self.compare_run, image)
                plots += row
                infos.append(info)
            except Exception as err:  # any failure of the second run only: the first run's plots stay
                notes.append(("warning", f"compare-with run {self._name(self.compare_run)} is not shown: "
                                         f"{type(err).__name__}: {err}"))
        return hv.Layout(plots).cols(4).opts(shared_axes=True), infos, notes

    @staticmethod
    def mass_table(infos: list[dict[str, Any]]) -> str:
        """Markdown table of the foreground / background attention mass of each shown run."""
        def pct(v: float | None) -> str:
            return "–" if v is None else f"{100 * v:.1f}% / {100 * (1 - v):.1f}%"

        lines = ["| run | inside predicted mask (fg / bg) | inside matched ground truth (fg / bg) |",
                 "|---|---|---|"]
        lines += [f"| {i['run']} | {pct(i['foreground_pred'])} | {pct(i['foreground_gt'])}"
                  f"{'' if i['gt'] is None else ' ' + i['gt']} |" for i in infos]
        return "\n".join(lines)

    @param.depends("run", "compare_run", "query", "layer", "head", "level", "picker.source",
                   "picker.image_index")
    def view(self) -> pn.viewable.Viewable:
        def render() -> pn.Column:
            layout, infos, notes = self.figure()
            return pn.Column(*[alert(text, kind=kind) for kind, text in notes],
                             pn.pane.HoloViews(layout, linked_axes=True),
                             pn.pane.Markdown(self.mass_table(infos)))
        return guarded(render)

    def panel(self) -> pn.Row:
        controls = pn.Column(
            pn.widgets.Select.from_param(self.param.run), pn.widgets.Select.from_param(self.param.compare_run),
            self.picker.widgets(), pn.widgets.IntSlider.from_param(self.param.query),
            pn.widgets.IntSlider.from_param(self.param.layer), pn.widgets.Select.from_param(self.param.head),
            pn.widgets.IntSlider.from_param(self.param.level), width=300)
        # Deferred: the page appears at once and the plots follow when the model has run.
        return pn.Row(controls, pn.panel(self.view, defer_load=True))


if pn.state.served:
    extensions()
    AttentionExplorer(runs=runs_from_args()).panel().servable(title="m2f attention explorer")
