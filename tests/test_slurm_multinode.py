"""Multi-node rows on Slurm: the node list, the rendezvous every node derives from Slurm's environment, the
job options, and (marked `slurm`) real 2-node jobs: two slurmd daemons on this host (`slurmd -N`), nodes
127.0.0.1 and 127.0.0.2 (both loopback, so node 0's name is an address every node reaches), one process per
node. A row trained so must equal the same row trained here by 2 processes under torchrun (same world size,
same global batch); a row preempted mid-training is requeued with both nodes and resumes from its checkpoint.
"""

import json
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import slurm_cluster
from test_grid import FAST, ITERS, TABLE

from m2f.distributed import Rendezvous
from m2f.experiment import torchrun_command
from m2f.reproduce import plan
from m2f.reproduce.jobs import execute, read_state
from m2f.reproduce.slurm import BASE_PORT, Slurm, held, hostnames, run_slurm, slurm_rendezvous
from m2f.run_dir import RunDir


@pytest.fixture
def slurm_conf(tmp_path, monkeypatch) -> Path:
    """A slurm.conf, which scontrol reads even to expand a node list (no daemon needed)."""
    if slurm_cluster.missing():
        pytest.skip("Slurm is not installed (apt-get install slurm-wlm munge)")
    conf = slurm_cluster.write_config(tmp_path, cpus=1)
    monkeypatch.setenv("SLURM_CONF", str(conf))
    return conf


def test_hostnames_expand_compressed_node_lists(slurm_conf):
    assert hostnames("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert hostnames("gpu-a[9-10],login1") == ["gpu-a9", "gpu-a10", "login1"]
    assert hostnames("127.0.0.[1-2]") == ["127.0.0.1", "127.0.0.2"]
    with pytest.raises(RuntimeError, match="scontrol show hostnames"):
        hostnames("")


def test_every_node_derives_the_same_rendezvous(slurm_conf):
    env = {"SLURM_JOB_NODELIST": "gpu[07-08,11]", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_ID": "4242"}
    nodes = [slurm_rendezvous({**env, "SLURM_NODEID": str(k)}) for k in range(3)]
    assert nodes[2] == Rendezvous(nnodes=3, node_rank=2, master_addr="gpu07", master_port=BASE_PORT + 4242)
    assert {(r.master_addr, r.master_port) for r in nodes} == {("gpu07", BASE_PORT + 4242)}
    assert Rendezvous.from_env(nodes[1].to_env()) == nodes[1] and Rendezvous.from_env({}) is None
    command = torchrun_command(Path("/runs/r"), nproc_per_node=8, rendezvous=nodes[1])
    assert command[command.index("torch.distributed.run") + 1:][:5] == [
        "--nnodes=3", "--node-rank=1", "--master-addr=gpu07", f"--master-port={BASE_PORT + 4242}", "--nproc_per_node=8"]
    assert command[-6:] == ["train", "--config", "/runs/r/requested_config.json", "--out", "/runs/r", "--resume"]


def test_multi_node_job_options(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setattr("shutil.which", lambda name, *a, **k: f"/usr/bin/{name}")  # no Slurm needed to render
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(**Slurm(nodes=2, gpus_per_job=8, cpus_per_job=64).parameters("m2f-swinl"))
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64"):
        assert f"#SBATCH {line}" in script, line
    assert "srun --unbuffered" in script and "--kill-on-bad-exit=1" in script
    with pytest.raises(ValueError, match="--nodes must be >= 1"):
        Slurm(nodes=0).parameters("x")


def test_a_node_stops_waiting_when_node_0_ends_without_training(tmp_path):
    """Node 0's notebook failed before its torchrun (or the row needed no training): node 1's torchrun, waiting
    at a rendezvous nobody opens, is stopped once node 0's result file changes (an older one does not count)."""
    import threading

    from m2f.reproduce.jobs import Job
    from m2f.reproduce.slurm import _train_beside_node_0

    result = tmp_path / "1_0_result.pkl"
    result.write_bytes(b"an earlier attempt's")
    writer = threading.Timer(4.0, result.write_bytes, args=(b"node 0 ended",))
    writer.start()
    rendezvous = Rendezvous(nnodes=2, node_rank=1, master_addr="127.0.0.1", master_port=slurm_cluster._free_port())
    tic = time.monotonic()
    outcome = _train_beside_node_0(Job("x", "02_ablation.ipynb", tmp_path / "row", {"nproc_per_node": 1}),
                                   rendezvous, result, poll_s=0.2)
    writer.join()
    assert outcome == "node 1: node 0 ended" and 4.0 <= time.monotonic() - tic < 60


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from m2f.data.synthetic import generate

    root = tmp_path_factory.mktemp("multinode") / "data"
    generate(root, num_train=8, num_val=3, image_size=64, seed=0)
    return root


def row_job(data: Path, out: Path, *, nproc_per_node: int = 0):
    """The first row of the grid test's table at seed 0."""
    grid = plan(TABLE, scale="tiny", data=data, out=out, max_iters=ITERS, seeds=1, overrides=FAST,
                nproc_per_node=nproc_per_node)
    return grid.rows[0][1][0]


@contextmanager
def two_node_cluster(root: Path, *, timeout_s: float = 60.0):
    """A cluster like `slurm_cluster.cluster`'s (its slurm.conf, munge key and daemons) but with two slurmd
    daemons on this host, nodes 127.0.0.1 and 127.0.0.2 of 1 CPU each (`slurmd -N`, each with its own port,
    spool, pid and log file); stops what it started, by PID."""
    import os
    import socket

    nodes = ["127.0.0.1", "127.0.0.2"]
    conf = slurm_cluster.write_config(root, cpus=1)
    spool = slurm_cluster.spool_dir(root)
    lines = [line.replace("slurmd.pid", "slurmd.%n.pid").replace("slurmd.log", "slurmd.%n.log")
             .replace(f"SlurmdSpoolDir={spool}", f"SlurmdSpoolDir={spool}/%n")
             for line in conf.read_text().splitlines() if not line.startswith(("NodeName=", "SlurmdPort="))]
    # A requeue kills node 1's task (submitit ignores SIGTERM there) after KillWait: 5 s, not Slurm's 30.
    lines += ["KillWait=5"]
    lines += [f"NodeName={n} NodeHostname={socket.gethostname()} NodeAddr={n} Port={slurm_cluster._free_port()} "
              "CPUs=1 RealMemory=1000 State=UNKNOWN" for n in nodes]
    conf.write_text("\n".join(lines) + "\n")
    munge = root / "munge"
    munge.mkdir(mode=0o700)
    (munge / "munge.key").write_bytes(os.urandom(1024))
    (munge / "munge.key").chmod(0o400)
    for n in nodes:
        (spool / n).mkdir(parents=True, exist_ok=True)
    commands = {"munged": slurm_cluster.munged_command(munge),
                "slurmctld": [slurm_cluster._which("slurmctld"), "-D", "-i", "-f", str(conf)],
                **{f"slurmd-{n}": [slurm_cluster._which("slurmd"), "-D", "-N", n, "-f", str(conf)] for n in nodes}}
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    started: list[subprocess.Popen] = []
    try:
        for name, command in commands.items():
            with open(root / "log" / f"{name}.out", "w") as log:
                started.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            if name == "munged":
                slurm_cluster._wait(lambda: (munge / "munge.socket").exists(), timeout_s, "munged", root)
        slurm_cluster._wait(lambda: slurm_cluster._run(["sinfo", "-h", "-N", "-o", "%T"]).split() == ["idle"] * 2,
                            timeout_s, "the two Slurm nodes", root)
        yield conf
    finally:
        slurm_cluster.stop(started)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="module")
def local_row(data, tmp_path_factory):
    """The reference: the row trained here by one torchrun of 2 processes; (job, seconds).

    Each process gets the intra-op threads of a 1-CPU Slurm node (conftest's default is 2): oneDNN's
    channels_last convolutions split their reductions by thread count, so 2 threads per process train a
    different model in the last bits, which a few iterations amplify to the 4th digit of the loss."""
    tic = time.perf_counter()
    job = row_job(data, tmp_path_factory.mktemp("local"), nproc_per_node=2)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("MKL_NUM_THREADS", "1")
        assert execute(job) == ""
    return job, time.perf_counter() - tic


@pytest.fixture
def cluster(tmp_path):
    if slurm_cluster.missing():
        pytest.skip("Slurm is not installed (apt-get install slurm-wlm munge)")
    with two_node_cluster(tmp_path / "cluster") as conf:
        yield conf


def assert_same_row(job, local) -> None:
    """The 2-node row trained the same model as the 2 local processes: world size, loss, every metric."""
    assert {RunDir.at(j.folder / "run").read_run_info()["world_size"] for j in (job, local)} == {2}
    ours, theirs = (json.loads((j.folder / "metrics.json").read_text()) for j in (job, local))
    assert ours["train"]["final_loss"] == theirs["train"]["final_loss"]
    assert {k: ours[k] for k in ("PQ", "layers")} == {k: theirs[k] for k in ("PQ", "layers")}


def logs(folder: Path, job_id: str) -> dict[str, str]:
    return {p.name.removeprefix(f"{job_id}_"): p.read_text() for p in sorted((folder / job_id).glob("*_log.*"))}


@pytest.mark.slurm
@pytest.mark.timeout(900)  # a backstop: a Slurm job that never runs must fail the test, not hang it
def test_a_two_node_row_equals_two_local_processes(data, local_row, cluster, tmp_path):
    local, local_s = local_row
    job = row_job(data, tmp_path / "grid")  # 1 process per node, 2 nodes: the same world size and global batch
    tic = time.perf_counter()
    errors = run_slurm([job], Slurm(nodes=2, time_min=10, folder=tmp_path / "sj", poll_s=1.0))
    print(f"one row: local 2 processes {local_s:.0f} s; Slurm 2 nodes x 1 process {time.perf_counter() - tic:.0f} s")
    state = read_state(job)
    text = logs(tmp_path / "sj", state.job_id)
    assert errors == {str(job.folder): ""}, (errors, text)
    assert state.state == "done" and state.log.endswith("_0_log.out")
    # Node 0 ran the notebook (its torchrun as node 0), node 1 only its torchrun as node 1; both on node 0's port.
    assert "--nnodes=2 --node-rank=0 --master-addr=127.0.0.1" in job.executed.read_text()  # the notebook's output
    assert "--nnodes=2 --node-rank=1 --master-addr=127.0.0.1" in text["1_log.out"], text
    assert "node 1: trained" in text["1_log.out"] and "02_ablation" not in text["1_log.out"]
    assert_same_row(job, local)


@pytest.mark.slurm
@pytest.mark.timeout(900)  # a backstop: a Slurm job that never runs must fail the test, not hang it
def test_a_preempted_two_node_row_is_requeued_whole_and_resumes(data, local_row, cluster, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from m2f.reproduce.slurm import in_queue

    job = row_job(data, tmp_path / "grid")
    with ThreadPoolExecutor(1) as pool:
        grid = pool.submit(run_slurm, [job], Slurm(nodes=2, time_min=10, folder=tmp_path / "sj", poll_s=1.0))
        deadline = time.monotonic() + 100
        # Preempt it mid-training: after its first checkpoint (iteration 2 of 4), before it finishes.
        while not (job.folder / "run" / "checkpoint.pth").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        state = read_state(job)
        assert state is not None and state.state == "running", state
        subprocess.run(["scancel", "--signal=USR2", state.job_id], check=True)  # what Slurm sends on preemption
        while in_queue(state.job_id) != "PENDING" and time.monotonic() < deadline:
            time.sleep(0.2)
        # Slurm holds a requeued job for about 2 minutes (Reason=BeginTime); release it to keep the test short.
        subprocess.run(["scontrol", "update", f"JobId={state.job_id}", "StartTime=now"], check=True)
        errors = grid.result(timeout=240)
    text = logs(tmp_path / "sj", state.job_id)
    assert errors == {str(job.folder): ""}, (errors, text)
    assert "requeue" in text["0_log.err"].lower() or "requeue" in text["0_log.out"].lower(), text
    assert read_state(job).state == "done"
    # Both nodes started again (the log of the rerun follows the first's), and the training resumed.
    assert text["1_log.out"].count("--node-rank=1") >= 2, text
    run = RunDir.at(job.folder / "run")
    assert run.read_run_info()["start_iteration"] == 2 and run.read_run_info()["world_size"] == 2
    assert run.read_metrics()[0][-1]["iteration"] == ITERS
    # Not compared with the uninterrupted row: m2f.train resumes every rank from rank 0's RNG state (the
    # checkpoint holds only that one), so rank 1 samples other points after a resume than without one; the
    # same holds for 2 processes on one machine, whatever the launcher.


def test_held_reads_squeue_reasons():
    assert held("launch failed requeued held") == "launch failed"
    assert held("JobHeldUser") == held("JobHeldAdmin") == "held"
    assert held("Resources") == held("BeginTime") == held("None") == ""


@pytest.mark.slurm
@pytest.mark.timeout(900)  # a backstop: a Slurm job that never runs must fail the test, not hang it
def test_a_held_job_is_reported_and_the_grid_goes_on_once_it_is_released(data, tmp_path, capsys):
    # A held job never starts by itself; the grid must say so (before: it waited silently, for ever, on a job
    # Slurm held after a failed launch) and finish once the job is released.
    from concurrent.futures import ThreadPoolExecutor

    from m2f.reproduce.slurm import queue_entry

    if slurm_cluster.missing():
        pytest.skip(f"Slurm is not installed (missing {', '.join(slurm_cluster.missing())})")
    job = row_job(data, tmp_path / "grid")
    with slurm_cluster.cluster(tmp_path / "cluster"), ThreadPoolExecutor(1) as pool:
        grid = pool.submit(run_slurm, [job], Slurm(time_min=10, folder=tmp_path / "sj", poll_s=0.5, sbatch=("hold",)))
        deadline = time.monotonic() + 60
        while not (state := read_state(job)) or not state.job_id:
            assert time.monotonic() < deadline, "the job was not submitted"
            time.sleep(0.2)
        while "is held" not in capsys.readouterr().out:
            assert time.monotonic() < deadline, "the grid did not report the held job"
            time.sleep(0.2)
        assert held(queue_entry(state.job_id)[1]) == "held"
        subprocess.run(["scontrol", "release", state.job_id], check=True)
        assert grid.result(timeout=240) == {str(job.folder): ""}
    assert read_state(job).state == "done"
