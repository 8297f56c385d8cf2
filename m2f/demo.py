"""The main job (`make demo` / `m2f demo`): the tiny-scale reproduction of the headline results.

It runs, through the papermill runner (`m2f.reproduce`), into results/tiny:
1. the quickstart notebook (synthetic data, a short training, the three tasks, an attention map);
2. Table 4a: Mask2Former, without masked attention, without high-resolution features (3 trained rows);
3. Figures II, 3 and I on those runs (PQ per decoder layer, proposals, attention mass);
then prints where the tables, executed notebooks and runs are, and the dashboards command.

Every step is resumable: finished rows are reused, an interrupted row resumes from its checkpoint.
"""

import time
from pathlib import Path

MAIN_JOB = ("quickstart", "table4a", "figure2", "figure3", "figure1")


def seeds_done(name: str, out: Path, iters: int = 0) -> int:
    """The seeds the demo reports for `name`: its budget trains one seed per row, and seeds 1, 2, ... that
    are already trained in `out` (by `m2f reproduce NAME --seeds N`) stay in the report rather than being
    dropped from it."""
    from m2f.reproduce.jobs import is_done
    from m2f.reproduce.runner import plan

    count = 1
    while True:
        grid = plan(name, scale="tiny", out=out, max_iters=iters, seeds=count + 1)
        rows = [jobs[count] for _, jobs in grid.rows if count in jobs]
        if not rows or not all(is_done(job) for job in rows):
            return count
        count += 1


def main_job(out: Path, *, iters: int = 0) -> list[Path]:
    """Runs the main job into `out`; returns the report paths.

    Args:
        out: output folder (data/, rows/, figures/, quickstart/ and the reports).
        iters: >0 replaces the tiny scale's 500 training iterations per row (smoke runs).
    """
    from m2f.reproduce import reproduce
    from m2f.run_dir import RunDir

    start = time.perf_counter()
    reports = []
    for name in MAIN_JOB:
        print(f"\n== m2f reproduce {name} --scale tiny", flush=True)
        reports.append(reproduce(name, scale="tiny", out=out, max_iters=iters, seeds=seeds_done(name, out, iters)))
    minutes = (time.perf_counter() - start) / 60
    print(f"\nm2f demo finished in {minutes:.1f} min\n")
    for report in reports[1:3]:
        print(report.read_text())
    print(f"tables:     {', '.join(str(r) for r in reports[1:])} (and .csv, .html)")
    print(f"notebooks:  {out}/rows/*/*.ipynb, {out}/figures/*/*.ipynb, {out}/quickstart/00_quickstart.ipynb (executed)")
    files = ", ".join((RunDir.CONFIG, RunDir.METRICS, RunDir.CHECKPOINT, RunDir.EVALUATIONS))
    print(f"runs:       {out}/rows/*/run ({files})")
    print(f"dashboards: .venv/bin/m2f dashboard {out}/rows/panoptic-mask2former/run {out}/rows/panoptic-cross_attention/run")
    return reports
