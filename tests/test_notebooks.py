"""Every notebook runs under papermill with smoke parameters, through `m2f reproduce`.

One module fixture reproduces, on an 8-image synthetic set with 2 training iterations per row:
a test ablation table (Mask2Former, cross-attention, and a row whose config is invalid), a test main
table (an instance model), Figures II, 3 and I on the trained rows, and the quickstart. The tests
then check what the runner needs from each notebook's metrics.json, that a failed row is reported
with its notebook, cell and error while the others run, and that a second run reuses finished rows.
"""

import json
from pathlib import Path

import nbformat
import pytest

from m2f.data.synthetic import generate
from m2f.reproduce import runner
from m2f.reproduce.jobs import NOTEBOOKS as NOTEBOOK_DIR
from m2f.reproduce.tables import ABLATION, CROSS, M2F, MAIN, TABLES, VARIANTS, Row, Table, Variant

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SMOKE = ["data.image_size=64", "data.test_size=64", "data.test_max_size=128", "data.num_workers=0",
         "model.num_queries=8", "loss.num_points=256", "train.batch_size=2"]
BROKEN = Row("broken row", "broken", {"PQ": 1.0})
TEST_TABLES = {
    "test_ablation": Table("test_ablation", "smoke", "ablation", (M2F, CROSS, BROKEN), notebook=ABLATION),
    "test_main": Table("test_main", "smoke", "main", (Row("instance", "mask2former", {"AP": 43.7}, task="instance",
                                                          baseline=True),), metrics=("AP",), notebook=MAIN),
}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    data, out = root / "data", root / "results"
    generate(data, num_train=8, num_val=3, image_size=64, seed=0)
    reports = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, table in TEST_TABLES.items():
            patch.setitem(TABLES, name, table)
        patch.setitem(VARIANTS, "broken", Variant(overrides=("model.attention=nonsense",)))
        for name in ("test_ablation", "test_main", "figure2", "figure3", "figure1", "quickstart"):
            reports[name] = runner.reproduce(name, scale="tiny", data=data, out=out, max_iters=2, overrides=SMOKE,
                                             seeds=1, progress=False)
        stamps = {p: p.stat().st_mtime_ns for p in out.glob("rows/*/*.ipynb")}
        runner.reproduce("test_ablation", scale="tiny", data=data, out=out, max_iters=2, overrides=SMOKE,
                         seeds=1, progress=False)
        rerun = {p: p.stat().st_mtime_ns for p in out.glob("rows/*/*.ipynb")}
    return {"out": out, "reports": reports, "stamps": stamps, "rerun": rerun}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs_and_have_a_parameters_cell(path):
    book = nbformat.read(path, as_version=4)
    tagged = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert "output_dir" in tagged[0].source and "data_dir" in tagged[0].source
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in book.cells if c.cell_type == "code")


RUNNER_PARAMETERS = {  # what `m2f.reproduce.runner` passes to each notebook
    "row": {"scale", "task", "variant", "overrides", "data_dir", "output_dir", "max_iters", "seed", "nproc_per_node"},
    "figure": {"scale", "data_dir", "runs", "output_dir", "max_iters", "seed"},
    "quickstart": {"data_dir", "output_dir", "max_iters", "overrides"},
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter_the_runner_passes(path):
    from papermill.inspection import _infer_parameters
    from papermill.iorw import load_notebook_node

    kind = "quickstart" if "quickstart" in path.name else "figure" if "figure" in path.name else "row"
    # A parameter line papermill cannot parse (e.g. a "=" in its comment) is silently not overridable.
    assert {p.name for p in _infer_parameters(load_notebook_node(str(path)))} == RUNNER_PARAMETERS[kind]


def test_ablation_rows_write_what_the_runner_needs(reproduced):
    for key in ("panoptic-mask2former", "panoptic-cross_attention"):
        row = reproduced["out"] / "rows" / key
        metrics = json.loads((row / "metrics.json").read_text())
        for name in ("PQ", "AP", "mIoU", "AR@100"):
            assert 0.0 <= metrics[name] <= 100.0
        assert len(metrics["layers"]["PQ"]) == len(metrics["layers"]["AR@100"]) == 10
        assert metrics["train"]["iterations"] == 2 and metrics["train"]["peak_memory_mb"] > 0
        assert (row / ABLATION).is_file() and (row / "training.png").is_file()
        assert json.loads((row / "params.json").read_text())["overrides"][-len(SMOKE):] == SMOKE


def test_a_failed_row_names_notebook_cell_and_error_and_the_others_still_run(reproduced):
    text = reproduced["reports"]["test_ablation"].read_text()
    failure = next(line for line in text.splitlines() if line.startswith("- broken row:"))
    assert ABLATION in failure and " cell " in failure and "nonsense" in failure and "ValueError" in failure
    assert "| Mask2Former (ours) (baseline) | " in text and "| cross-attention | " in text
    assert not (reproduced["out"] / "rows" / "panoptic-broken" / "metrics.json").exists()


def test_a_second_run_reuses_finished_rows(reproduced):
    done = {p: t for p, t in reproduced["stamps"].items() if "broken" not in str(p)}
    assert done and all(reproduced["rerun"][p] == t for p, t in done.items())
    broken = [p for p in reproduced["stamps"] if "broken" in str(p)]
    assert broken and all(reproduced["rerun"][p] != reproduced["stamps"][p] for p in broken)  # failed rows retry


def test_main_results_notebook_trains_the_task_it_is_given(reproduced):
    metrics = json.loads((reproduced["out"] / "rows" / "instance-mask2former" / "metrics.json").read_text())
    assert "AP" in metrics and "PQ" not in metrics and "mIoU" not in metrics
    assert "AP ours / paper" in reproduced["reports"]["test_main"].read_text()


@pytest.mark.parametrize(("name", "images"), [("figure2", ["figure2.png"]),
                                              ("figure3", ["figure3_ar.png", "figure3_queries.png"]),
                                              ("figure1", ["figure1_maps.png"])])
def test_figure_notebooks_check_the_paper_claims(reproduced, name, images):
    folder = reproduced["out"] / "figures" / name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["figures"] == images and all((folder / f).is_file() for f in images)
    assert metrics["claims"] and all(isinstance(c["agrees"], bool) for c in metrics["claims"])
    report = reproduced["reports"][name].read_text()
    assert all(f"]({Path('figures') / name / f})" in report for f in images)
    assert "agree" in report


def test_figure1_attention_mass_is_a_fraction_per_level(reproduced):
    rows = json.loads((reproduced["out"] / "figures" / "figure1" / "metrics.json").read_text())["rows"]
    assert set(rows) == {"masked attention", "cross-attention"}
    for values in rows.values():
        fractions = [values[k] for k in ("fg_1/32", "fg_1/16", "fg_1/8")]
        assert all(0.0 <= f <= 1.0 for f in fractions) and values["count"] > 0
        assert values["fg_mean"] == pytest.approx(sum(fractions) / 3)


def test_quickstart_trains_predicts_and_draws_attention(reproduced):
    folder = reproduced["out"] / "quickstart"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"PQ", "AP", "mIoU"} <= set(metrics)
    assert all((folder / f).is_file() for f in ("training.png", "predictions.png", "attention.png"))
    executed = nbformat.read(folder / "00_quickstart.ipynb", as_version=4)
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))


REPO = NOTEBOOK_DIR.parent


def _parameters(path: Path) -> dict:
    book = nbformat.read(path, as_version=4)
    source = next(c.source for c in book.cells if "parameters" in c.metadata.get("tags", []))
    values: dict = {}
    exec(source, {}, values)  # the parameters cell is plain assignments
    return values


def _cell_code(path: Path, marker: str) -> str:
    return next(c.source for c in nbformat.read(path, as_version=4).cells if marker in c.source)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_notebook_run_by_hand_writes_only_untracked_files(path):
    # Issue 22: the quickstart's default output_dir was the committed results/tiny/quickstart, so a first
    # interactive run appended to tracked files. `m2f reproduce` passes output_dir (RUNNER_PARAMETERS).
    import subprocess

    output_dir = (NOTEBOOK_DIR / _parameters(path)["output_dir"]).resolve()
    assert REPO in output_dir.parents and "results" not in output_dir.relative_to(REPO).parts
    ignored = subprocess.run(["git", "check-ignore", "-q", str(output_dir / "metrics.json")], cwd=REPO)
    assert ignored.returncode == 0, f"{output_dir} is not ignored by git"


def test_layer_figure_of_a_row_is_titled_from_its_config_not_its_variant_label():
    # Issue 22: a cross-attention, 50-query row was titled "mask2former: every prediction set".
    from m2f.config import get_config
    from m2f.reproduce import figures
    from m2f.run_label import describe_model

    code = _cell_code(NOTEBOOK_DIR / ABLATION, "figures.layer_plot(")
    namespace = {"figures": figures, "describe_model": describe_model, "variant": "mask2former",
                 "cfg": get_config("tiny", ["model.attention=cross", "model.num_queries=50"]),
                 "summary": {"layers": {"PQ": [1.0] * 10}}}
    exec(code, namespace)
    assert namespace["layers"].axes[0].get_title() == "cross-attention, 50 queries: every prediction set"


def test_quickstart_attention_uses_the_papers_layer_numbers():
    # Issue 21: the slider read "layer 8" where the title said "decoder layer 9".
    import ast

    import matplotlib
    import numpy as np
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from m2f.capture import capture
    from m2f.config import get_config
    from m2f.model import build_model

    code = _cell_code(NOTEBOOK_DIR / "00_quickstart.ipynb", "def show(")
    show_def = next(n for n in ast.parse(code).body if isinstance(n, ast.FunctionDef) and n.name == "show")
    torch.manual_seed(0)
    model = build_model(get_config("tiny", ["model.num_queries=8"])).eval()
    cap = capture(model, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    namespace = {"cap": cap, "plt": plt}
    exec(compile(ast.Module(body=[show_def], type_ignores=[]), "quickstart", "exec"), namespace)
    for layer in (1, cap.num_layers):
        fig = namespace["show"](3, layer)
        ax = fig.axes[0]
        assert ax.get_title().startswith(f"query 3, decoder layer {layer}")
        np.testing.assert_allclose(ax.images[1].get_array(), cap.attention(layer - 1, 3, None)[0])
        assert fig.axes[1].get_ylabel() == "attention weight"  # the colour bar
        plt.close(fig)
    assert "min=1, max=cap.num_layers" in code  # the slider counts the same way
