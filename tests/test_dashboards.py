"""The dashboards without a browser: view classes on two runs trained for a few steps (masked and
cross-attention), what they render (HoloViews data, Bokeh models) and their messages for bad input."""

import io
import json
import shutil

import holoviews as hv
import numpy as np
import panel as pn
import pytest
import torch
from bokeh.models import GlyphRenderer
from bokeh.models import Image as ImageGlyph
from bokeh_checks import legends_beside_the_data
from fixtures_run import ITERATIONS, make_runs
from PIL import Image

from dashboards.app import build_app
from dashboards.attention import AttentionExplorer
from dashboards.layer_metrics import LayerMetrics
from dashboards.proposals import ProposalsExplorer
from m2f.capture import MASK_STRIDE, decode_upload, forward
from m2f.checkpoint import load, save_atomic
from m2f.overlay import colorize, mosaic
from m2f.run_dir import RunDir

hv.extension("bokeh")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("dashboard_runs"))


@pytest.fixture
def explorer(runs):
    return AttentionExplorer(runs=[str(runs["masked"]), str(runs["cross"])])


def element(layout, group, row=0):
    """The `row`-th HoloViews element of `group` (e.g. "Attention") in a layout, overlays included."""
    found = [e for e in layout.traverse(lambda x: x, [hv.Image, hv.RGB]) if e.group == group]
    return found[row]


def alerts(view):
    return [a.object for a in view.select(pn.pane.Alert)]


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_changing_query_layer_and_head_changes_the_attention_map(explorer):
    layout, _, _ = explorer.figure()
    base = element(layout, "Attention").data.copy()
    explorer.query = 1
    by_query = element(explorer.figure()[0], "Attention").data.copy()
    explorer.layer = 3  # round robin: decoder layer 3 attends the 1/8 level, layer 1 the 1/32 level
    by_layer = element(explorer.figure()[0], "Attention").data.copy()
    explorer.head = "0"
    by_head = element(explorer.figure()[0], "Attention").data.copy()
    assert not np.allclose(base, by_query)
    assert by_layer.shape[0] > by_query.shape[0]  # a finer level has more rows
    assert not np.allclose(by_layer, by_head)
    # The mean over heads is what "mean" shows (hand-computed from the captured weights).
    cap = forward(explorer.run, explorer.picker.image(explorer.run)[0])
    heads = [cap.attention(2, 1, h)[0] for h in range(cap.num_heads)]
    np.testing.assert_allclose(np.mean(heads, 0), by_layer, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(heads[0], by_head)


def test_masked_attention_is_zero_outside_its_attention_mask(runs):
    explorer = AttentionExplorer(runs=[str(runs["init"])])
    explorer.layer = 2
    checked = 0
    for query in range(8):
        explorer.query = query
        layout, _, _ = explorer.figure()
        gate = element(layout, "AttentionMask").data.astype(bool)
        attn = element(layout, "Attention").data
        assert gate.shape == attn.shape
        if not gate.all():  # a query whose mask covers nothing attends everywhere instead
            assert np.all(attn[~gate] == 0) and attn[gate].sum() > 0
            checked += 1
    assert checked > 0


def test_attention_mass_is_the_fraction_of_weights_inside_the_region(explorer):
    cap = forward(explorer.run, explorer.picker.image(explorer.run)[0])
    region = np.zeros(cap.padded_size, bool)
    region[: cap.padded_size[0] // 2] = True  # the top half; at 1/32 whole rows of cells
    h, w = cap.level_shapes[0][0]
    weights = cap.weights(0, 3, None).reshape(h, w)
    expected = weights[: h // 2].sum() / weights.sum()
    assert cap.attention_mass(0, 3, None, region) == pytest.approx(expected, rel=1e-5)


def test_compare_run_adds_a_cross_attention_row_without_attention_mask(explorer, runs):
    explorer.compare_run = str(runs["cross"])
    layout, infos, _ = explorer.figure()
    assert [i["attention"] for i in infos] == ["masked", "cross"]
    assert len(layout) == 8
    assert element(layout, "AttentionMask", 1).label == "none"  # cross-attention has no mask
    table = explorer.mass_table(infos)
    assert "inside predicted mask" in table and table.count("\n") == 3


def test_the_page_model_changes_when_the_query_changes(runs):
    explorer = AttentionExplorer(runs=[str(runs["masked"])])
    root = explorer.panel().get_root()

    def attention_images():
        return [r.data_source.data["image"][0].copy() for r in root.select({"type": GlyphRenderer})
                if isinstance(r.glyph, ImageGlyph) and r.glyph.color_mapper.palette[-1] != "#ffffff"]

    before = attention_images()
    explorer.query = 4
    after = attention_images()
    assert before and len(before) == len(after)
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_proposals_grid_track_and_click(runs):
    view = ProposalsExplorer(runs=[str(runs["init"])])  # non-empty masks that change between layers
    grid, tap = view.grid()
    first = grid.get(0).data.copy()
    q = view.capture().num_queries
    labels = grid.get(1).data
    assert len(labels) == q  # one title per query
    view.prediction = 5
    assert not np.array_equal(view.grid()[0].get(0).data, first)
    track = view.track()
    assert len(track.get(1).data) == view.capture().num_layers + 1
    # Differently named axes: Panel links panes' axes by name, which squeezed the track into the grid's ranges.
    assert {d.name for d in track.get(0).kdims}.isdisjoint(d.name for d in grid.get(0).kdims)
    # Clicking the third tile of the first row follows query 2.
    _, tile_w = view.capture().valid_cells(MASK_STRIDE)
    grid, tap = view.grid()
    height = grid.get(0).data.shape[0]
    tap.event(x=2 * (tile_w + 2) + 1, y=height - 1)
    assert view.query == 2


def test_proposals_recall_per_layer_comes_from_the_evaluation_cache(runs):
    view = ProposalsExplorer(runs=[str(runs["masked"])])
    curve = view.recall().get(0)
    stored = RunDir.at(runs["masked"]).layer_evaluation(proposals=True).metrics["layers"]
    expected = [100 * s["proposals"]["AR@100"] for s in stored]
    assert len(expected) == 10
    np.testing.assert_allclose(curve.dimension_values(1), expected)


def test_layer_metrics_curves_classes_and_training(runs):
    view = LayerMetrics(runs=[str(runs["masked"]), str(runs["cross"])])
    overlay, notes = view.layer_plot()
    curves = [e for e in overlay if isinstance(e, hv.Curve)]
    assert not notes and len(curves) == 2 and all(len(c) == 10 for c in curves)
    stored = RunDir.at(runs["cross"]).layer_evaluation().metrics["layers"]
    np.testing.assert_allclose(curves[1].dimension_values(1), [100 * s["panoptic"]["PQ"] for s in stored])
    bars, _ = view.class_plot()
    assert len(bars) == 2 * len(stored[-1]["panoptic"]["per_class"])
    plots, _ = view.train_plots()
    train_curve = plots[0].get(0)
    assert list(train_curve.dimension_values(0)) == list(range(2, ITERATIONS + 1, 2))


def test_missing_run_gives_an_alert(tmp_path):
    missing = str(tmp_path / "no_such_run")
    for view in (AttentionExplorer(runs=[missing]).view(), ProposalsExplorer(runs=[missing]).grid_view()):
        assert any("does not exist" in a for a in alerts(view))
    assert any("does not exist" in a for a in alerts(LayerMetrics(runs=[missing]).train_view()))


def test_checkpoint_of_another_config_gives_an_alert(runs, tmp_path):
    state = load(runs["masked"] / "checkpoint.pth")
    state["config"]["model"]["num_queries"] = 16  # the weights have 8 queries
    (tmp_path / "other").mkdir()
    save_atomic(state, tmp_path / "other" / "checkpoint.pth")
    messages = alerts(AttentionExplorer(runs=[str(tmp_path / "other")]).view())
    assert any("does not match the model of its config" in m for m in messages)


def test_run_still_training_shows_curves_and_explains_the_missing_checkpoint(runs, tmp_path):
    run = tmp_path / "training"
    run.mkdir()
    lines = (runs["masked"] / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(lines + '{"split": "train", "itera')  # a line being written
    assert any("no checkpoint.pth yet" in m for m in alerts(AttentionExplorer(runs=[str(run)]).view()))
    metrics = LayerMetrics(runs=[str(run)])
    plots, _ = metrics.train_plots()
    assert len(plots[0].get(0)) == ITERATIONS // 2
    assert any("no layer evaluation yet" in m for m in alerts(metrics.layer_view()))


def test_unusual_uploads_render_with_a_note_or_give_an_alert(explorer):
    rng = np.random.default_rng(0)
    explorer.picker.set_upload(png_bytes(rng.integers(0, 255, (37, 300, 3), dtype=np.uint8)), "wide.png")
    view = explorer.view()
    assert any("unusual size 37x300" in m for m in alerts(view))
    assert element(view.select(pn.pane.HoloViews)[0].object, "Attention").data.size > 0
    explorer.picker.set_upload(png_bytes(rng.integers(0, 255, (50, 60), dtype=np.uint8)), "gray.png")
    assert any("grayscale" in m for m in alerts(explorer.view()))
    explorer.picker.set_upload(b"not an image", "notes.txt")
    assert any("not an image file" in m for m in alerts(explorer.view()))


def test_cross_attention_run_query_out_of_range_gives_an_alert(explorer, runs):
    explorer.compare_run = str(runs["cross"])
    explorer.param.query.bounds = (0, 100)
    explorer.query = 50
    assert any("query 50" in m for m in alerts(explorer.view()))


def test_app_has_three_tabs_and_renders(runs):
    app = build_app([str(runs["masked"]), str(runs["cross"])])
    tabs = app.select(pn.Tabs)[0]
    assert list(tabs._names) == ["Attention", "Proposals", "Per-layer metrics"]
    root = app.get_root()
    assert any(isinstance(r.glyph, ImageGlyph) for r in root.select({"type": GlyphRenderer}))
    assert alerts(build_app([]))  # no runs: says how to start


def test_upload_decoding_and_overlay_helpers():
    rgb, notes = decode_upload(png_bytes(np.zeros((4, 5), np.uint8)), name="gray.png")
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8 and "grayscale" in notes[0]
    rgba, notes = decode_upload(png_bytes(np.zeros((4, 5, 4), np.uint8)), name="alpha.png")
    assert rgba.shape == (4, 5, 3) and "alpha channel" in notes[0]
    with pytest.raises(ValueError, match="not an image file"):
        decode_upload(b"not an image", name="notes.txt")
    labels = np.array([[0, 1], [-1, 1]])
    colours = colorize(labels)
    assert (colours[1, 0] == 0).all() and (colours[0, 1] == colours[1, 1]).all()
    assert not (colours[0, 0] == colours[0, 1]).all()
    grid, corners = mosaic([np.zeros((3, 4, 3), np.uint8)] * 5, columns=2)
    assert grid.shape == (3 * 3 + 2 * 2, 2 * 4 + 2, 3) and corners[3] == (5, 6)


def test_runs_of_a_copied_checkpoint_file_work(runs, tmp_path):
    ckpt = tmp_path / "copy.pth"
    shutil.copy(runs["masked"] / "checkpoint.pth", ckpt)
    explorer = AttentionExplorer(runs=[str(ckpt)])
    cap_a = forward(ckpt, explorer.picker.image(str(ckpt))[0])
    cap_b = forward(runs["masked"], explorer.picker.image(str(ckpt))[0])
    assert torch.allclose(torch.from_numpy(cap_a.mask_probs), torch.from_numpy(cap_b.mask_probs))


def _title(el):
    return el.opts.get().kwargs["title"]


def _run_without_checkpoint(runs, root):
    run = root / "training"
    run.mkdir()
    shutil.copy(runs["masked"] / "metrics.jsonl", run / "metrics.jsonl")
    shutil.copy(runs["masked"] / "config.json", run / "config.json")
    return run


def test_compare_run_without_checkpoint_is_a_warning_and_the_main_run_still_shows(runs, tmp_path):
    # Issue 22: `m2f dashboard RUN OTHER` with OTHER still training hid RUN behind one error box.
    explorer = AttentionExplorer(runs=[str(runs["masked"]), str(_run_without_checkpoint(runs, tmp_path))])
    view = explorer.view()
    kinds = {a.alert_type: a.object for a in view.select(pn.pane.Alert)}
    assert set(kinds) == {"warning"} and "no checkpoint.pth yet" in kinds["warning"]
    (pane,) = view.select(pn.pane.HoloViews)
    assert len(pane.object) == 4  # the main run's four plots


def test_empty_panels_say_why(runs):
    # Issue 22: a few training steps leave every mask empty, so the first layer's attention mask is all
    # white (attend everywhere) and the predicted mask shows nothing: both titles say so.
    explorer = AttentionExplorer(runs=[str(runs["masked"])])
    explorer.layer = 1
    layout, _, _ = explorer.figure()
    gate = element(layout, "AttentionMask")
    assert gate.data.all()
    assert "all white" in _title(gate) and "attends everywhere" in _title(gate)
    assert "mask empty" in _title(element(layout, "Predicted"))


def test_one_layer_numbering_category_names_and_a_colour_bar(runs):
    # Issue 21: decoder layers 1-9 everywhere (the predicted mask after layer L is prediction set L).
    explorer = AttentionExplorer(runs=[str(runs["init"])])
    assert explorer.param.layer.bounds == (1, 9)
    explorer.layer, explorer.query = 9, 2
    layout, _, _ = explorer.figure()
    cap = forward(explorer.run, explorer.picker.image(explorer.run)[0])
    title = _title(element(layout, "Predicted"))
    label = int(cap.classes(9)[0][2])
    name = RunDir.at(runs["init"]).val_dataset().categories.names[label]
    assert title.startswith("q2 after layer 9\n") and f"{name} (class {label})" in title
    attention = list(layout)[3]
    assert "layer 9 attention" in _title(attention)
    from bokeh.models import ColorBar
    plot = hv.render(attention)
    bars = [m for m in plot.right if isinstance(m, ColorBar)]
    assert len(bars) == 1 and bars[0].title == "attention weight"


def test_metrics_plots_have_legends_outside_named_axes_and_short_run_names(runs, tmp_path):
    labels = {c.label for c in LayerMetrics(runs=[str(runs["masked"]), str(runs["cross"])]).layer_plot()[0]}
    assert labels == {"Mask2Former, 8 queries", "cross-attention, 8 queries"}  # from config.json, not paths
    validated = _run_without_checkpoint(runs, tmp_path)  # and with validation records
    with open(validated / "metrics.jsonl", "a") as log:
        log.write(json.dumps({"split": "val", "iteration": 6, "panoptic/PQ": 0.1, "panoptic/AP": 0.05}) + "\n")
    view = LayerMetrics(runs=[str(runs["masked"]), str(runs["cross"]), str(validated)])
    figures, legends = legends_beside_the_data(view.panel().get_root())
    assert len(figures) == 4 and legends == 4  # per layer, per class, training, validation
    assert all(f.sizing_mode in ("stretch_width", "stretch_both") for f in figures)
    by_title = {f.title.text: f for f in figures}
    assert by_title["PQ per prediction set"].xaxis[0].axis_label.startswith("prediction set (0 = learnable queries")
    assert by_title["PQ per prediction set"].yaxis[0].axis_label == "PQ (%)"
    assert by_title["validation metrics"].yaxis[0].axis_label == "validation metric (%)"
    per_class = next(f for t, f in by_title.items() if t.startswith("per-class PQ, prediction set 9"))
    names = RunDir.at(runs["masked"]).val_dataset().categories.names
    assert any(name in str(factor) for factor in per_class.x_range.factors for name in names)


def test_a_metric_missing_from_one_prediction_set_is_never_drawn_as_zero(runs, tmp_path):
    recorded = tmp_path / "recorded"  # a committed run: its evaluation without the checkpoint
    recorded.mkdir()
    for name in ("config.json", "evaluations.json", "metrics.jsonl"):
        shutil.copy(runs["masked"] / name, recorded / name)
    cache = json.loads((recorded / "evaluations.json").read_text())
    for entry in cache["entries"]:
        entry["metrics"]["layers"][4].pop("panoptic", None)
    (recorded / "evaluations.json").write_text(json.dumps(cache))
    overlay, notes = LayerMetrics(runs=[str(recorded), str(runs["cross"])]).layer_plot()
    assert {c.label for c in overlay if isinstance(c, hv.Curve)} == {"cross-attention, 8 queries"}
    assert any("has no PQ" in n for n in notes)


def test_computing_recall_runs_off_the_ui_thread_with_a_progress_bar(runs, monkeypatch, tmp_path):
    # Issue 22: the button blocked the server for minutes with blank tabs.
    import threading

    import dashboards.proposals as proposals

    release, started = threading.Event(), threading.Event()
    real = proposals.evaluate_run

    def slow_evaluate(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(proposals, "evaluate_run", slow_evaluate)
    run = tmp_path / "fresh"
    shutil.copytree(runs["masked"], run)
    (run / "evaluations.json").unlink()
    view = ProposalsExplorer(runs=[str(run)])
    assert any("no per-layer evaluation" in m for m in alerts(view.recall_view()))
    view.eval_images = 2
    view.param.trigger("evaluated")  # returns while the evaluation is still running
    assert started.wait(30) and view.evaluating
    waiting = view.recall_view()
    assert waiting.select(pn.indicators.Progress)
    assert "Evaluating 2 validation images" in waiting.select(pn.pane.Markdown)[0].object
    view.param.trigger("evaluated")  # a second press while it runs starts nothing
    release.set()
    view._eval_thread.join(60)
    assert not view.evaluating
    assert view.recall_view().select(pn.pane.HoloViews)
    assert "partial: 2 validation images" in _title(view.recall())
