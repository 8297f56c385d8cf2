"""The tiny training step of two git revisions side by side (what a speed change gave, as a ratio).

Each revision is checked out into a temporary git worktree and imported from there (PYTHONPATH), so the two
code versions run in separate worker processes on the same machine, in turns: A, B, A, B, ... (`--rounds`
pairs), which spreads a changing load over both. A worker builds the tiny preset's model, criterion and
optimizer with seed 0, reads `--steps` real batches of the synthetic dataset (LSJ, batch 8, 128 px; loaded
before timing, so the data loader is not measured) and times full steps: forward, matching + point losses,
backward, clip + AdamW. Per revision the report gives the median over rounds of each round's fastest step
(the fastest step is the one least disturbed by other processes) and of each round's median step, and the
first losses, which must agree up to float rounding when a change is meant to keep the numbers.

    python benchmarks/bench_train_revisions.py --base f5099e9 [--head HEAD] [--rounds 3] [--steps 12]
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import benchmark_parser, machine_info, parse_or_work, run_worker, write_report

ROOT = Path(__file__).resolve().parent.parent


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Times `steps` training steps of the m2f on sys.path (the revision's worktree, via PYTHONPATH)."""
    import m2f
    from m2f.config import get_config
    from m2f.data.loader import build_train_loader
    from m2f.model import build_model
    from m2f.optim import build_optimizer
    from m2f.train import pad_targets

    try:
        from m2f.criterion import build_criterion
    except ImportError:  # revisions before the batched loss kept it in m2f.train
        from m2f.train import build_criterion

    torch.set_num_threads(spec["threads"])
    cfg = get_config("tiny", [f"data.root={spec['data']}", "data.num_workers=0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    if spec["channels_last"]:  # what that revision's m2f.train does with the model
        model = model.to(memory_format=torch.channels_last)
    model.train()
    criterion, optimizer = build_criterion(cfg), build_optimizer(model, cfg.train)
    batches = iter(build_train_loader(cfg, rank=0, world_size=1))
    batches = [next(batches) for _ in range(spec["steps"] + 2)]
    seconds, losses = [], []
    for batch in batches:  # (images, targets) or, since the skip counts, (images, targets, skipped)
        images, targets = batch[0], batch[1]
        tic = time.perf_counter()
        out = model(images)
        loss = criterion(out, pad_targets(targets, out["padded_size"], torch.device("cpu")))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm, foreach=True)
        optimizer.step()
        seconds.append(time.perf_counter() - tic)
        losses.append(loss.item())
    timed = seconds[2:]  # two warm-up steps
    return {"m2f": m2f.__file__, "min_ms": min(timed) * 1e3, "median_ms": statistics.median(timed) * 1e3,
            "losses": losses[:3]}


def checkout(revision: str, into: Path) -> Path:
    """A worktree of `revision` under `into` (removed with the temporary folder; `git worktree prune` forgets it)."""
    path = into / revision.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), revision], check=True,
                   capture_output=True)
    return path


def uses_channels_last(tree: Path) -> bool:
    return "channels_last" in (tree / "m2f" / "train.py").read_text()


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# Tiny training step, two revisions ({m['device']})", "",
             f"{m['date']}, {m['processor']}, {m['threads']} threads, torch {m['torch']}; load average (1/5/15 min) "
             f"{m['load_average_start']} at the start, {report['load_average_end']} at the end. "
             f"{report['rounds']} rounds of A, B in turns, {report['steps']} timed steps each (batch 8, 128 px, "
             "the synthetic dataset); per round the fastest and the median step.", "",
             "| revision | fastest step, median over rounds (ms) | median step, median over rounds (ms) | "
             "images/s (fastest) | first losses |", "|---|---|---|---|---|"]
    for name in ("base", "head"):
        r = report[name]
        lines.append(f"| {name} {r['revision']} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | "
                     f"{8000 / r['min_ms']:.1f} | {', '.join(f'{x:.4f}' for x in r['losses'])} |")
    lines += ["", f"**head / base speed: {report['speedup_fastest']:.2f}x** on the fastest steps, "
              f"{report['speedup_median']:.2f}x on the median steps."]
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=0)
    parser.add_argument("--base", default="", help="the revision to compare against (required)")
    parser.add_argument("--head", default="HEAD")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parse_or_work(parser, worker)
    if args is None:
        return
    if not args.base:
        parser.error("--base REVISION is required")
    from m2f.data.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate(data, num_train=160, num_val=4, image_size=128, seed=0)
        trees = {name: checkout(rev, Path(tmp)) for name, rev in (("base", args.base), ("head", args.head))}
        runs: dict[str, list[dict[str, Any]]] = {"base": [], "head": []}
        machine = machine_info(args.device, args.threads)
        for _ in range(args.rounds):
            for name, tree in trees.items():
                spec = {"data": str(data), "steps": args.steps, "threads": args.threads,
                        "channels_last": uses_channels_last(tree)}
                os.environ["PYTHONPATH"] = str(tree)
                try:
                    runs[name].append(run_worker(__file__, spec))
                finally:
                    os.environ.pop("PYTHONPATH")
                if not runs[name][-1]["m2f"].startswith(str(tree)):
                    sys.exit(f"the worker imported {runs[name][-1]['m2f']}, not the worktree {tree}")
        revisions = {name: subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], text=True,
                                          capture_output=True, check=True).stdout.strip() for name, tree in trees.items()}
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)
    report: dict[str, Any] = {"machine": machine, "rounds": args.rounds, "steps": args.steps,
                              "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    for name, results in runs.items():
        report[name] = {"revision": revisions[name], "rounds": results,
                        "min_ms": statistics.median(r["min_ms"] for r in results),
                        "median_ms": statistics.median(r["median_ms"] for r in results),
                        "losses": results[0]["losses"]}
    report["speedup_fastest"] = report["base"]["min_ms"] / report["head"]["min_ms"]
    report["speedup_median"] = report["base"]["median_ms"] / report["head"]["median_ms"]
    paths = write_report(args.out, f"train_revisions_{args.base}_{args.device}", report, markdown(report))
    print(markdown(report))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
