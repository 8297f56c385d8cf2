"""A real 2-row x 2-seed grid (Table XII d at a few iterations): more seeds train only the new ones, --jobs 2
runs them in pinned local workers, --status follows them, and (marked `slurm`, skipped without Slurm) the same
grid through a real single-node Slurm cluster, with one job preempted mid-run and requeued, gives the same report.
"""

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2f.data.synthetic import generate
from m2f.reproduce import Local, plan, reproduce, status
from m2f.reproduce.jobs import read_state
from m2f.reproduce.launcher import worker_slots
from m2f.reproduce.slurm import in_queue

TABLE = "table12d"  # two rows: the MaskFormer and the Mask2Former decoder, both on the FPN pixel decoder
ITERS = 8  # checkpoints at 2, 4, 6: the Slurm test preempts after the first, six iterations before the end
FAST = ["data.image_size=64", "data.test_size=64", "data.test_max_size=128", "data.num_workers=0",
        "model.num_queries=8", "loss.num_points=256", "train.eval_period=0", "train.batch_size=2",
        "train.checkpoint_period=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grid") / "data"
    generate(root, num_train=8, num_val=3, image_size=64, seed=0)
    return root


def grid_kwargs(data: Path, out: Path, seeds: int) -> dict:
    return {"scale": "tiny", "data": data, "out": out, "max_iters": ITERS, "seeds": seeds, "overrides": FAST}


@pytest.fixture(scope="module")
def local_grid(data, tmp_path_factory):
    """The grid with --jobs 2: first one seed, then two (only seed 1 trains); (out, seed-0 metrics mtimes,
    status before the second call, wall seconds of the second call)."""
    out = tmp_path_factory.mktemp("local")
    tic = time.perf_counter()
    reproduce(TABLE, **grid_kwargs(data, out, 1), launcher=Local(jobs=2), progress=False)
    seconds = time.perf_counter() - tic
    first = {p: p.stat().st_mtime_ns for p in out.glob("rows/*/metrics.json")}
    before = status(plan(TABLE, **grid_kwargs(data, out, 2)))
    tic = time.perf_counter()
    reproduce(TABLE, **grid_kwargs(data, out, 2), launcher=Local(jobs=2), progress=False)
    return out, first, before, seconds + time.perf_counter() - tic


def test_worker_slots_split_the_cores_and_the_gpus():
    slots = worker_slots(2, cores=[0, 1, 2, 3], gpus=2)
    assert [s["cores"] for s in slots] == [[0, 1], [2, 3]]
    assert [s["env"]["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1"]
    assert slots[0]["env"]["OMP_NUM_THREADS"] == "2"
    more = worker_slots(3, cores=[0, 1], gpus=0)  # more workers than cores: one core each, shared
    assert [s["cores"] for s in more] == [[0], [1], [0]] and "CUDA_VISIBLE_DEVICES" not in more[0]["env"]


def test_more_seeds_train_only_the_new_seeds(local_grid):
    out, first, before, _ = local_grid
    assert len(first) == 2
    # Before the second call: seed 0 done (reused), seed 1 not started.
    assert [(label.rsplit(", ", 1)[1], state) for label, state, _ in before] == [
        ("seed 0", "done"), ("seed 1", "pending"), ("seed 0", "done"), ("seed 1", "pending")]
    assert {p: p.stat().st_mtime_ns for p in first} == first  # seed 0 was not trained again
    for row in ("panoptic-maskformer_decoder_fpn", "panoptic-fpn"):
        seed1 = out / "rows" / row / "seed1"
        assert json.loads((seed1 / "params.json").read_text())["seed"] == 1
        assert read_state_of(seed1).state == "done"
        # Different seeds train differently (the final loss differs), so the spread is real.
        losses = {json.loads((f / "metrics.json").read_text())["train"]["final_loss"] for f in (seed1.parent, seed1)}
        assert len(losses) == 2
    records = list(csv.DictReader(io.StringIO((out / f"{TABLE}.csv").read_text())))
    assert {r["seeds"] for r in records if r["values"]} == {"2"}
    assert all(r["verdict"] in ("agrees", "within noise", "disagrees") for r in records if r["paper_diff"]
               and r["row"].startswith("MaskFormer"))
    assert "Welch" in (out / f"{TABLE}.md").read_text()
    assert (out / "SUMMARY.md").is_file() and "table12d" in (out / "SUMMARY.csv").read_text()


def read_state_of(folder: Path):
    from m2f.reproduce.jobs import Job

    return read_state(Job("x", "02_ablation.ipynb", folder, {}))


def without_setting(markdown: str) -> list[str]:
    """The report minus its setting line (wall time and threads differ between launchers)."""
    return [line for line in markdown.splitlines() if not line.startswith("Scale **")]


@pytest.mark.slurm
@pytest.mark.timeout(900)  # a backstop: a Slurm job that never runs must fail the test, not hang it
def test_slurm_grid_equals_local_and_survives_a_requeue(local_grid, data, tmp_path):
    from slurm_cluster import cluster, missing

    if missing():
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing())}; apt-get install slurm-wlm munge)")
    local_out = local_grid[0]
    out = tmp_path / "slurm-grid"
    command = [sys.executable, "-m", "m2f", "reproduce", TABLE, "--data", str(data), "--out", str(out),
               "--iters", str(ITERS), "--seeds", "2", "--launcher", "slurm", "--jobs", "2", "--cpus-per-job", "1",
               "--time", "30", *[a for o in FAST for a in ("--set", o)]]
    with cluster(tmp_path / "cluster"):
        tic = time.perf_counter()
        grid = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        victim = out / "rows" / "panoptic-fpn"  # seed 0 of the baseline row
        deadline = time.monotonic() + 450  # the victim is the third array task: it starts after one of the first two
        # Preempt it mid-training: after its first checkpoint (iteration 2), before it finishes.
        while not (victim / "run" / "checkpoint.pth").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        state = read_state_of(victim)
        assert state is not None and state.state == "running", state
        finished_before = (victim / "metrics.json").is_file()  # too late to preempt: the message below says so
        subprocess.run(["scancel", "--signal=USR2", state.job_id], check=True)  # what Slurm sends on preemption
        while in_queue(state.job_id) != "PENDING" and time.monotonic() < deadline:
            time.sleep(0.2)
        # Slurm holds a requeued job for about 2 minutes (Reason=BeginTime): the listing made now must show the
        # victim as a pending Slurm job whatever the machine's speed; then release it to keep the test short.
        listing = subprocess.run([sys.executable, "-m", "m2f", "reproduce", TABLE, "--status", "--data", str(data),
                                  "--out", str(out), "--iters", str(ITERS), "--seeds", "2",
                                  *[a for o in FAST for a in ("--set", o)]], capture_output=True, text=True)
        subprocess.run(["scontrol", "update", f"JobId={state.job_id}", "StartTime=now"], check=True)
        log, _ = grid.communicate(timeout=600)
        seconds = time.perf_counter() - tic
    assert grid.returncode == 0, log
    print(f"2x2 grid: slurm --jobs 2 with one requeue {seconds:.0f} s; local --jobs 2 {local_grid[3]:.0f} s")
    victim_line = "".join(line for line in listing.stdout.splitlines() if "Mask2Former decoder, FPN, seed 0" in line)
    assert f"pending  slurm job {state.job_id}" in victim_line and "requeued" in victim_line, (
        f"finished before the signal: {finished_before}\n" + listing.stdout + listing.stderr)
    slurm_log = Path(read_state_of(victim).log).read_text() + Path(read_state_of(victim).log.replace(".out", ".err")).read_text()
    assert "Requeued job" in slurm_log or "requeue" in slurm_log.lower(), slurm_log[-3000:]
    assert read_state_of(victim).state == "done"
    assert (out / f"{TABLE}.csv").read_text() == (local_out / f"{TABLE}.csv").read_text()
    assert without_setting((out / f"{TABLE}.md").read_text()) == without_setting((local_out / f"{TABLE}.md").read_text())
    for metrics in local_out.glob("rows/**/metrics.json"):
        ours = json.loads((out / metrics.relative_to(local_out)).read_text())
        assert ours["train"]["final_loss"] == json.loads(metrics.read_text())["train"]["final_loss"], metrics
