"""`m2f reproduce TABLE --scale tiny|small|paper --seeds N`: a table's grid of notebooks, then its report.

Layout of the output folder (default results/SCALE)::

    data/                          the synthetic dataset (tiny / small scales)
    rows/<task>-<variant>/         one trained row at seed 0: the executed notebook, metrics.json,
                                   params.json, job.json, figures, and run/ (a `m2f.run_dir.RunDir`:
                                   checkpoint, metrics, evaluations)
    rows/<task>-<variant>/seed<K>/ the same row at seed K >= 1 (same layout)
    figures/<figure>/[seed<K>/]    a figure's executed notebook, metrics.json and images, per seed
    quickstart/                    the executed quickstart notebook
    TABLE.md, TABLE.csv, TABLE.html, SUMMARY.md, SUMMARY.csv

Seed 0 keeps the folder a single-seed run always had, so results made before seeds existed (and the
paths the demo, the dashboards and the README use) stay valid and are reused as seed 0.

The grid is a list of `m2f.reproduce.jobs.Job` (a row at a seed); a launcher (`m2f.reproduce.launcher`)
runs the rows' jobs, here, in N local workers or as a Slurm job array, then a figure's analysis of each
seed. A job is done when its metrics.json exists and its params.json equals the parameters it would run
with now, so an interrupted grid continues where it stopped (a half-trained row resumes from its
checkpoint) and a finished seed is never trained again; asking for more seeds later trains only the new
ones. A job that fails is reported with its notebook, cell and exception; the other jobs still run.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2f.reproduce.costs import table_costs
from m2f.reproduce.jobs import NOTEBOOKS, Job, is_done, read_state
from m2f.reproduce.launcher import Local, run_jobs
from m2f.reproduce.report import RowResult, markdown, row_values, to_csv, to_html
from m2f.reproduce.scales import SCALES, experiment_config, get_scale, prepare_data
from m2f.reproduce.summary import write_summary
from m2f.reproduce.tables import ABLATION, TABLES, VARIANTS, Row, Table, get_table
from m2f.run_dir import RunDir

__all__ = ["DEFAULT_SEEDS", "NOTEBOOKS", "Grid", "list_tables", "plan", "reproduce", "seed_folder"]

# Seeds per row when --seeds is not given: enough for a t-test where a row costs minutes; one where it
# costs a day on 8 GPUs.
DEFAULT_SEEDS = {"tiny": 3, "small": 3, "paper": 1}
# Minutes of the notebook a table runs once (a figure on trained rows, the quickstart's short training).
ONCE_MINUTES = {"figure": 1.0, "quickstart": 2.0}


def seed_folder(folder: Path, seed: int) -> Path:
    """Where seed `seed` of a row (or figure) lives: seed 0 in the row's folder, others in seed<K>/ inside it."""
    return folder if seed == 0 else folder / f"seed{seed}"


@dataclass
class Grid:
    """A table's jobs.

    Args:
        table: the table.
        out: the output folder.
        seeds: the seeds every row trains with.
        rows: (row, {seed: job}) in table order; rows without jobs are not implemented / not at this scale.
        figures: {seed: the figure's job over that seed's rows} (figures only).
        once: the quickstart's job (quickstart only).
    """

    table: Table
    out: Path
    seeds: list[int]
    rows: list[tuple[Row, dict[int, Job]]] = field(default_factory=list)
    figures: dict[int, Job] = field(default_factory=dict)
    once: Job | None = None

    def row_jobs(self) -> list[Job]:
        return [job for _, jobs in self.rows for job in jobs.values()] + ([self.once] if self.once else [])

    def jobs(self) -> list[Job]:
        return self.row_jobs() + list(self.figures.values())


def plan(name: str, *, scale: str = "tiny", data: str | Path | None = None, out: str | Path | None = None,
         max_iters: int = 0, seeds: int | None = None, seed: int = 0, overrides: list[str] = (),
         nproc_per_node: int = 0, reuse_recorded: bool = False) -> Grid:
    """The jobs of one table (nothing runs). Arguments as in `reproduce`."""
    table, s = get_table(name), get_scale(scale)
    out = Path(out or Path("results") / scale).resolve()
    data_dir = Path(data).resolve() if data else out / "data"
    count = DEFAULT_SEEDS[scale] if seeds is None else seeds
    if count < 1:
        raise ValueError(f"--seeds must be >= 1, got {count}")
    grid = Grid(table, out, list(range(seed, seed + count)))
    extra = list(overrides)
    if table.kind == "quickstart":  # one short training, no seeds
        grid.seeds = grid.seeds[:1]
        folder = out / "quickstart"
        grid.once = Job("quickstart", table.notebook, folder,
                        {"data_dir": str(data_dir), "output_dir": str(folder), "max_iters": max_iters, "overrides": extra},
                        inputs=(RunDir.at(folder / "run").checkpoint,))
        return grid
    notebook = ABLATION if table.kind == "figure" else table.notebook  # a figure's rows are ablation rows
    for row in table.rows:
        jobs = {}
        if row.variant is not None and scale in row.scales:
            base = experiment_config(scale, task=row.task, data_dir=data_dir)
            row_overrides = [*VARIANTS[row.variant].resolve(base), *row.overrides, *extra]
            for k in grid.seeds:
                folder = seed_folder(out / "rows" / row.key, k)
                # The keys and their order are the done stamp of the rows made before seeds and launchers.
                params = {"scale": scale, "data_dir": str(data_dir), "max_iters": max_iters, "seed": k,
                          "task": row.task, "variant": row.variant, "overrides": row_overrides,
                          "output_dir": str(folder), "nproc_per_node": nproc_per_node or s.nproc_per_node}
                label = row.label if len(grid.seeds) == 1 else f"{row.label}, seed {k}"
                jobs[k] = Job(label, notebook, folder, params, inputs=(RunDir.at(folder / "run").checkpoint,),
                              reuse_recorded=reuse_recorded)
        grid.rows.append((row, jobs))
    if table.kind == "figure":
        for k in grid.seeds:
            folder = seed_folder(out / "figures" / table.name, k)
            done = {row.label: jobs[k].folder for row, jobs in grid.rows if k in jobs}
            params = {"scale": scale, "data_dir": str(data_dir), "max_iters": max_iters, "seed": k,
                      "runs": {label: str(f / "run") for label, f in done.items()}, "output_dir": str(folder)}
            grid.figures[k] = Job(table.name if len(grid.seeds) == 1 else f"{table.name}, seed {k}", table.notebook,
                                  folder, params, inputs=tuple(f / "metrics.json" for f in done.values()))
    return grid


def reproduce(name: str, *, scale: str = "tiny", data: str | Path | None = None, out: str | Path | None = None,
              max_iters: int = 0, seeds: int | None = None, seed: int = 0, overrides: list[str] = (),
              launcher: Any = None, progress: bool = True, reuse_recorded: bool = False,
              report_only: bool = False) -> Path:
    """Reproduces one table or figure and writes out/NAME.md (.csv, .html) and out/SUMMARY.md (.csv);
    returns the .md path.

    Args:
        name: a key of `TABLES` (`m2f reproduce --list`).
        scale: "tiny", "small" or "paper".
        data: the dataset root; default out/data (generated for the synthetic scales).
        out: the output folder; default results/SCALE.
        max_iters: >0 replaces the scale's training budget (smoke runs).
        seeds: trainings per row (seeds `seed` .. `seed` + seeds - 1); default `DEFAULT_SEEDS[scale]`.
        seed: the first seed.
        overrides: config overrides for every row ("section.field=value"), after the row's own.
        launcher: `m2f.reproduce.launcher.Local(jobs=N)` (default: one job at a time, here) or
            `m2f.reproduce.slurm.Slurm(...)`.
        progress: papermill's per-cell progress bars (this process only).
        reuse_recorded: rows whose metrics are here but whose checkpoint is not (committed results from
            another machine) count as done instead of being retrained. A figure that loads the models
            (Figures 3 and I) still needs the checkpoints.
        report_only: run nothing; write the report from the jobs that are done (the others are "pending",
            and a row with some seeds done reports those), e.g. while a grid runs elsewhere.
    """
    launcher = launcher or Local()
    gpus = getattr(launcher, "gpus_per_job", 0)
    grid = plan(name, scale=scale, data=data, out=out, max_iters=max_iters, seeds=seeds, seed=seed,
                overrides=overrides, nproc_per_node=gpus if gpus > 1 else 0, reuse_recorded=reuse_recorded)
    table, out = grid.table, grid.out
    start = time.perf_counter()
    errors: dict[str, str] = {}
    if not report_only:
        if grid.row_jobs():
            prepare_data(scale, Path(data).resolve() if data else out / "data")  # once, before workers start
        errors = run_jobs(grid.row_jobs(), launcher=launcher, progress=progress)
        # A figure analyses one seed's rows once they are all trained.
        ready = [job for k, job in grid.figures.items()
                 if all(is_done(jobs[k]) for _, jobs in grid.rows if k in jobs)]
        errors.update(run_jobs(ready, launcher=launcher, progress=progress))
    results, claims, figures = _collect(grid, errors)
    setting = _setting(scale, max_iters, grid.seeds, time.perf_counter() - start)
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{name}.md"
    costs = table_costs(table, out) if table.costs else None
    report.write_text(markdown(table, scale, results, setting=setting, claims=claims, figures=figures, costs=costs))
    (out / f"{name}.csv").write_text(to_csv(table, results))
    (out / f"{name}.html").write_text(to_html(table, scale, results))
    write_summary(out)
    print(f"m2f reproduce {name} ({scale}): {report}", flush=True)
    return report


def _collect(grid: Grid, errors: dict[str, str]) -> tuple[list[RowResult], list[dict[str, Any]], list[str]]:
    """The rows' results (every finished seed's values), the figure's claims per seed, its images."""
    table, out = grid.table, grid.out

    def error_of(job: Job) -> str:
        state = read_state(job)
        return errors.get(str(job.folder)) or (state.error if state else "") or f"{job.label}: not run"

    if grid.once is not None:
        job = grid.once
        if not is_done(job):
            return [RowResult(Row("quickstart", None), "failed", error=error_of(job))], [], []
        values = row_values(json.loads((job.folder / "metrics.json").read_text()), table.metrics)
        return [RowResult(Row("quickstart", None), "done", values, notebook=_rel(job.executed, out))], [], []
    per_seed: dict[int, dict[str, Any]] = {}  # seed -> the figure's metrics.json
    failed_figures = []
    for k, job in grid.figures.items():
        if is_done(job):
            per_seed[k] = json.loads((job.folder / "metrics.json").read_text())
        elif str(job.folder) in errors:
            failed_figures.append(RowResult(Row(job.label, None), "failed", error=error_of(job)))
    results = []
    for row, jobs in grid.rows:
        if not jobs:
            results.append(RowResult(row, "not implemented" if row.variant is None else "not at this scale"))
            continue
        result = RowResult(row, "done")
        problems, pending = [], []
        for k, job in jobs.items():
            if not is_done(job):
                state = read_state(job)
                if errors.get(str(job.folder)) or (state is not None and state.state == "failed"):
                    problems.append(error_of(job))
                else:  # not run (yet): --report-only, or a grid still running elsewhere
                    pending.append(k)
                continue
            if table.kind == "figure":
                if k not in per_seed:
                    continue
                values = row_values(per_seed[k]["rows"].get(row.label, {}), table.metrics)
                notebook = grid.figures[k].executed
            else:
                values = row_values(json.loads((job.folder / "metrics.json").read_text()), table.metrics)
                notebook = job.executed
            result.seeds.append(k)
            result.notebooks.append(_rel(notebook, out))
            for metric, value in values.items():
                result.samples.setdefault(metric, []).append(value)
        result.values = {m: sum(v) / len(v) for m, v in result.samples.items()}
        result.notebook = result.notebooks[0] if result.notebooks else ""
        if problems:
            result.status, result.error = "failed", "; ".join(problems)
        elif pending:
            result.status = "pending"
            result.error = ("seed " if len(pending) == 1 else "seeds ") + ", ".join(map(str, pending)) + " not run yet"
        results.append(result)
    claims: dict[str, dict[str, Any]] = {}
    for k, metrics in per_seed.items():
        for claim in metrics.get("claims", []):
            merged = claims.setdefault(claim["claim"], {"claim": claim["claim"], "ours": [], "agree_count": 0,
                                                        "seeds": 0})
            merged["ours"].append(claim["ours"] if len(per_seed) == 1 else f"seed {k}: {claim['ours']}")
            merged["agree_count"] += bool(claim["agrees"])
            merged["seeds"] += 1
    for claim in claims.values():
        claim["ours"] = "; ".join(claim["ours"])
        claim["agrees"] = claim["agree_count"] == claim["seeds"]
    first = next(iter(per_seed), None)
    figures = [] if first is None else [_rel(grid.figures[first].folder / f, out)
                                        for f in per_seed[first].get("figures", [])]
    return results + failed_figures, list(claims.values()), figures


def _rel(path: Path, out: Path) -> str:
    return str(Path(path).relative_to(out))


def _setting(scale: str, max_iters: int, seeds: list[int], seconds: float) -> str:
    import platform

    import torch

    s = get_scale(scale)
    iters = max_iters or next((int(o.split("=")[1]) for o in s.overrides if o.startswith("train.max_iters=")), None)
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({threads} thread{'s' if threads > 1 else ''})"
    data = "the synthetic benchmark" if s.synthetic else "the real dataset"
    budget = f"{iters} iterations per row" if iters else "the paper's schedule"
    runs = f"seed {seeds[0]}, one run per row" if len(seeds) == 1 else \
        f"seeds {seeds[0]}-{seeds[-1]}, {len(seeds)} runs per row"
    return (f"Trained on {data}, {budget}, {runs}. This invocation ran on {device}, {platform.machine()}, and "
            f"took {seconds / 60:.1f} min (rows done earlier are reused; each row's run/run_info.json says which "
            "code trained it).")


def list_tables() -> str:
    """`m2f reproduce --list`: every table, its rows, and what it costs at each scale (one seed)."""
    lines = [f"{'table':<11} {'kind':<10} {'rows':>4}  " + "  ".join(f"{s:>9}" for s in SCALES) + "  title"]
    for table in TABLES.values():
        costs = []
        for scale in SCALES.values():
            runnable = {r.key for r in table.rows if r.variant and scale.name in r.scales}
            minutes = len(runnable) * scale.minutes_per_row + ONCE_MINUTES.get(table.kind, 0.0)
            costs.append(_duration(minutes))
        lines.append(f"{table.name:<11} {table.kind:<10} {len(table.rows):>4}  " + "  ".join(f"{c:>9}" for c in costs)
                     + f"  {table.title}")
    lines += ["", "Cost = rows to train x minutes per row (rows shared by tables are trained once), for ONE seed;",
              "--seeds N multiplies it by N (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_SEEDS.items()) + "):"]
    lines += [f"  {s.name}: {s.minutes_per_row:g} min per row ({s.cost_note}); {s.nproc_per_node} process(es) per row"
              for s in SCALES.values()]
    return "\n".join(lines)


def _duration(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.0f} h" if minutes < 48 * 60 else f"{minutes / 1440:.0f} d"
