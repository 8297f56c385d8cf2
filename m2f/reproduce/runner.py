"""`m2f reproduce TABLE --scale tiny|small|paper`: run a table's notebooks with papermill, then report.

Layout of the output folder (default results/SCALE)::

    data/                          the synthetic dataset (tiny / small scales)
    rows/<task>-<variant>/         one trained row: the executed notebook, metrics.json, params.json,
                                   figures, and run/ (a `m2f.run_dir.RunDir`: checkpoint, metrics, evaluations)
    figures/<figure>/              a figure's executed notebook, metrics.json and images
    quickstart/                    the executed quickstart notebook
    TABLE.md, TABLE.csv, TABLE.html

A row is done when its metrics.json exists and its params.json equals the parameters it would run
with now, so an interrupted `m2f reproduce` continues where it stopped (and a half-trained row
resumes from its checkpoint). A row that fails is reported with its notebook, cell and exception;
the other rows still run.
"""

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from m2f.reproduce.report import RowResult, markdown, row_values, to_csv, to_html
from m2f.reproduce.scales import SCALES, experiment_config, get_scale, prepare_data
from m2f.reproduce.tables import ABLATION, TABLES, VARIANTS, Row, Table, get_table
from m2f.run_dir import RunDir

# The package data m2f/_notebooks (the repository's top-level notebooks/, see pyproject.toml): found the
# same way in a checkout and in an installed wheel.
NOTEBOOKS = Path(resources.files("m2f") / "_notebooks").resolve()
# Minutes of the notebook a table runs once (a figure on trained rows, the quickstart's short training).
ONCE_MINUTES = {"figure": 1.0, "quickstart": 2.0}


def reproduce(name: str, *, scale: str = "tiny", data: str | Path | None = None, out: str | Path | None = None,
              max_iters: int = 0, seed: int = 0, overrides: list[str] = (), progress: bool = True) -> Path:
    """Reproduces one table or figure and writes out/NAME.md (.csv, .html); returns the .md path.

    Args:
        name: a key of `TABLES` (`m2f reproduce --list`).
        scale: "tiny", "small" or "paper".
        data: the dataset root; default out/data (generated for the synthetic scales).
        out: the output folder; default results/SCALE.
        max_iters: >0 replaces the scale's training budget (smoke runs).
        seed: training seed of every row.
        overrides: config overrides for every row ("section.field=value"), after the row's own.
        progress: papermill's per-cell progress bars.
    """
    table, s = get_table(name), get_scale(scale)
    out = Path(out or Path("results") / scale).resolve()
    data_dir = Path(data).resolve() if data else out / "data"
    prepare_data(scale, data_dir)
    common = {"scale": scale, "data_dir": str(data_dir), "max_iters": max_iters, "seed": seed}
    extra = list(overrides)
    start = time.perf_counter()
    claims, figures = [], []
    if table.kind == "quickstart":
        folder = out / "quickstart"
        results = [_execute(table.notebook, folder, {"data_dir": str(data_dir), "output_dir": str(folder),
                                                     "max_iters": max_iters, "overrides": extra},
                            Row("quickstart", None), progress, inputs=[RunDir.at(folder / "run").checkpoint])]
        if results[0].status == "done":
            results[0].values = row_values(json.loads((folder / "metrics.json").read_text()), table.metrics)
    else:
        results = [_run_row(table, row, s.nproc_per_node, common, extra, out, progress) for row in table.rows]
    if table.kind == "figure":
        folder = out / "figures" / table.name
        done = [out / "rows" / r.row.key for r in results if r.status == "done"]
        runs = {r.row.label: str(out / "rows" / r.row.key / "run") for r in results if r.status == "done"}
        figure = _execute(table.notebook, folder, {**common, "runs": runs, "output_dir": str(folder)},
                          Row(table.name, None), progress, inputs=[d / "metrics.json" for d in done])
        if figure.status == "done":
            metrics = json.loads((folder / "metrics.json").read_text())
            for result in results:
                result.values = row_values(metrics["rows"].get(result.row.label, {}), table.metrics)
                result.notebook = str(Path(figure.notebook))
            claims = metrics.get("claims", [])
            figures = [str((folder / f).relative_to(out)) for f in metrics.get("figures", [])]
        else:
            results.append(figure)
    setting = _setting(scale, max_iters, seed, time.perf_counter() - start)
    out.mkdir(parents=True, exist_ok=True)
    for result in results:
        if result.notebook:
            result.notebook = str(Path(result.notebook).relative_to(out))
    report = out / f"{name}.md"
    report.write_text(markdown(table, scale, results, setting=setting, claims=claims, figures=figures))
    (out / f"{name}.csv").write_text(to_csv(table, results))
    (out / f"{name}.html").write_text(to_html(table, scale, results))
    print(f"m2f reproduce {name} ({scale}): {report}", flush=True)
    return report


def _run_row(table: Table, row: Row, nproc_per_node: int, common: dict[str, Any], extra: list[str], out: Path,
             progress: bool) -> RowResult:
    scale = common["scale"]
    if row.variant is None:
        return RowResult(row, "not implemented")
    if scale not in row.scales:
        return RowResult(row, "not at this scale")
    base = experiment_config(scale, task=row.task, data_dir=common["data_dir"])
    overrides = [*VARIANTS[row.variant].resolve(base), *row.overrides, *extra]
    folder = out / "rows" / row.key
    notebook = ABLATION if table.kind == "figure" else table.notebook  # a figure's rows are ablation rows
    params = {**common, "task": row.task, "variant": row.variant, "overrides": overrides,
              "output_dir": str(folder), "nproc_per_node": nproc_per_node}
    result = _execute(notebook, folder, params, row, progress, inputs=[RunDir.at(folder / "run").checkpoint])
    if result.status == "done":
        result.values = row_values(json.loads((folder / "metrics.json").read_text()), table.metrics)
    return result


def _execute(notebook: str, folder: Path, params: dict[str, Any], row: Row, progress: bool,
             inputs: list[Path] = ()) -> RowResult:
    """Runs `notebook` with `params` into `folder` unless it already ran with exactly these params and
    its `inputs` (a checkpoint, the metrics of the rows a figure reads) exist and are not newer."""
    import papermill as pm

    executed = folder / notebook
    if _is_done(folder, params, inputs):
        print(f"  {row.label}: done already ({folder})", flush=True)
        return RowResult(row, "done", notebook=str(executed))
    source = NOTEBOOKS / notebook
    if not source.is_file():
        return RowResult(row, "failed", error=f"notebook {source} does not exist")
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "params.json"
    stamp.unlink(missing_ok=True)
    print(f"  {row.label}: running {notebook} -> {executed}", flush=True)
    tic = time.perf_counter()
    try:
        pm.execute_notebook(str(source), str(executed), parameters=params, kernel_name="python3",
                            progress_bar=progress, cwd=str(folder))
    except pm.PapermillExecutionError as err:
        error = f"{executed} cell {err.cell_index} (execution count {err.exec_count}): {err.ename}: {err.evalue}"
        print(f"  {row.label}: FAILED: {error}", flush=True)
        return RowResult(row, "failed", error=error, notebook=str(executed))
    except Exception as err:  # the kernel died, the notebook is malformed, ...: report it, run the other rows
        print(f"  {row.label}: FAILED: {notebook}: {type(err).__name__}: {err}", flush=True)
        return RowResult(row, "failed", error=f"{notebook}: {type(err).__name__}: {err}", notebook=str(executed))
    if not (folder / "metrics.json").is_file():
        return RowResult(row, "failed", error=f"{executed} ran but wrote no metrics.json", notebook=str(executed))
    stamp.write_text(json.dumps(params, indent=1))
    print(f"  {row.label}: finished in {(time.perf_counter() - tic) / 60:.1f} min", flush=True)
    return RowResult(row, "done", notebook=str(executed))


def _is_done(folder: Path, params: dict[str, Any], inputs: list[Path]) -> bool:
    metrics, stamp = folder / "metrics.json", folder / "params.json"
    if not (metrics.is_file() and stamp.is_file()) or json.loads(stamp.read_text()) != params:
        return False
    # A fresh clone has the committed metrics but not the checkpoints; a retrained row invalidates figures.
    return all(p.is_file() and p.stat().st_mtime_ns <= metrics.stat().st_mtime_ns for p in inputs)


def _setting(scale: str, max_iters: int, seed: int, seconds: float) -> str:
    import platform

    import torch

    s = get_scale(scale)
    iters = max_iters or next((int(o.split("=")[1]) for o in s.overrides if o.startswith("train.max_iters=")), None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    data = "the synthetic benchmark" if s.synthetic else "the real dataset"
    budget = f"{iters} iterations per row" if iters else "the paper's schedule"
    return (f"Trained on {data}, {budget}, seed {seed}, one run per row; {device}, {platform.machine()}; "
            f"this invocation took {seconds / 60:.1f} min (rows done earlier are reused).")


def list_tables() -> str:
    """`m2f reproduce --list`: every table, its rows, and what it costs at each scale."""
    lines = [f"{'table':<11} {'kind':<10} {'rows':>4}  " + "  ".join(f"{s:>9}" for s in SCALES) + "  title"]
    for table in TABLES.values():
        costs = []
        for scale in SCALES.values():
            runnable = {r.key for r in table.rows if r.variant and scale.name in r.scales}
            minutes = len(runnable) * scale.minutes_per_row + ONCE_MINUTES.get(table.kind, 0.0)
            costs.append(_duration(minutes))
        lines.append(f"{table.name:<11} {table.kind:<10} {len(table.rows):>4}  " + "  ".join(f"{c:>9}" for c in costs)
                     + f"  {table.title}")
    lines += ["", "Cost = rows to train x minutes per row (rows shared by tables are trained once):"]
    lines += [f"  {s.name}: {s.minutes_per_row:g} min per row ({s.cost_note}); {s.nproc_per_node} process(es) per row"
              for s in SCALES.values()]
    return "\n".join(lines)


def _duration(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.0f} h" if minutes < 48 * 60 else f"{minutes / 1440:.0f} d"
