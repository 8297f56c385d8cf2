"""The `m2f` command line: thin argparse wrappers around the library's functions.

Imports happen inside each command so that `m2f --help` is instant.
"""

import argparse
import json
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name (see `m2f info`) or a config JSON file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.max_iters=60 (repeatable)")


def _config(args: argparse.Namespace, extra: list[str] = ()):  # type: ignore[assignment]
    from m2f.config import get_config, load_config_file

    if args.config.endswith(".json"):  # a run's config.json (m2f.experiment passes one to torchrun)
        return load_config_file(args.config, [*extra, *args.overrides])
    return get_config(args.config, [*extra, *args.overrides])


def cmd_info(args: argparse.Namespace) -> None:
    from m2f.config import get_config, list_presets

    if args.preset:
        from m2f.model import build_model, count_parameters

        cfg = get_config(args.preset, args.overrides)
        print(cfg.to_json())
        print(f"parameters: {count_parameters(build_model(cfg)) / 1e6:.2f}M")
    else:
        print("presets:", ", ".join(list_presets()))


def cmd_synth(args: argparse.Namespace) -> None:
    from m2f.data.synthetic import generate

    summary = generate(args.out, num_train=args.train, num_val=args.val, image_size=args.size, seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))


def cmd_train(args: argparse.Namespace) -> None:
    from m2f.train import train

    roots = [o.partition("=")[2].strip() for o in args.overrides if o.partition("=")[0].strip() == "data.root"]
    if args.data and roots and roots[-1] != args.data:
        raise ValueError(f"--data {args.data} and --set data.root={roots[-1]} name different datasets; give one")
    cfg = _config(args, [f"data.root={args.data}"] if args.data else [])
    result = train(cfg, out_dir=args.out, resume=args.resume)
    print(json.dumps({k: v for k, v in result.items() if k != "eval"}, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    from m2f.inference import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.run, data=args.data, task=args.task, layers=args.layers,
                                  max_images=args.max_images, out=args.out)
    print(json.dumps(metrics, indent=2))


def cmd_eval_files(args: argparse.Namespace) -> None:
    from m2f.evaluation import evaluate_instance_files, pq_compute

    if args.kind == "panoptic":
        if not (args.gt_folder and args.pred_folder):
            raise SystemExit("m2f eval-files panoptic needs --gt-folder and --pred-folder")
        metrics = pq_compute(args.gt_json, args.pred_json, args.gt_folder, args.pred_folder)
    else:
        metrics = evaluate_instance_files(args.gt_json, args.pred_json)
    text = json.dumps(metrics, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def cmd_convert(args: argparse.Namespace) -> None:
    from m2f.convert import convert_file

    print(f"wrote {convert_file(args.src, args.out, preset=args.preset)}")


def cmd_predict(args: argparse.Namespace) -> None:
    import logging

    from m2f.predict import load_weights, predict_files
    from m2f.predict.files import image_ids_from

    logging.basicConfig(level=logging.INFO, format="m2f predict: %(message)s")  # the conversion notes
    if args.keep_freed_memory and not args.device.startswith("cuda"):
        from m2f.allocator import keep_freed_memory

        keep_freed_memory()
    model, categories = load_weights(args.weights, device=args.device, dataset=args.dataset, overrides=args.overrides)
    summary = predict_files(model, args.inputs, task=args.task, out=args.out, categories=categories,
                            batch_size=args.batch_size, min_score=args.min_score,
                            image_ids=image_ids_from(args.image_ids) if args.image_ids else None)
    print(json.dumps(summary, indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    from m2f.export import export, parse_size
    from m2f.predict import load_weights

    model, _ = load_weights(args.weights, overrides=args.overrides)
    path = export(model, format=args.format, size=parse_size(args.size), out=args.out, batch_size=args.batch_size,
                  dynamo=args.dynamo)
    print(f"wrote {path}")


def cmd_doctor(args: argparse.Namespace) -> None:
    from m2f.ops.doctor import doctor, format_doctor

    print(format_doctor(doctor()))


def cmd_demo(args: argparse.Namespace) -> None:
    from m2f.demo import main_job

    main_job(out=Path(args.out), iters=args.iters)


def cmd_reproduce(args: argparse.Namespace) -> None:
    from m2f.reproduce import Local, Slurm, format_status, list_tables, plan, reproduce

    if args.list or not args.table:
        print(list_tables())
        return
    common = {"scale": args.scale, "data": args.data, "out": args.out, "max_iters": args.iters, "seeds": args.seeds,
              "seed": args.seed, "overrides": args.overrides, "reuse_recorded": args.reuse_recorded}
    if args.status:
        for table in args.table:
            gpus = args.gpus_per_job if args.launcher == "slurm" and args.gpus_per_job > 1 else 0
            print(format_status(plan(table, **common, nproc_per_node=gpus)))
        return
    if args.launcher == "slurm":
        out = Path(args.out or Path("results") / args.scale).resolve()
        launcher = Slurm(jobs=args.jobs, folder=out / "slurm", partition=args.partition, gpus_per_job=args.gpus_per_job,
                         cpus_per_job=args.cpus_per_job, nodes=args.nodes, time_min=args.time, account=args.account,
                         mem=args.mem, sbatch=tuple(args.sbatch), setup=tuple(args.slurm_setup))
    else:
        launcher = Local(jobs=args.jobs)
    for table in args.table:
        reproduce(table, **common, launcher=launcher, report_only=args.report_only)


def cmd_dashboard(args: argparse.Namespace) -> None:
    import signal
    import subprocess
    from importlib.util import find_spec

    from m2f.child_process import stop

    # The `dashboards` package is installed with m2f (editable or from a wheel); panel serves its file.
    spec = find_spec("dashboards.app")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the m2f dashboards (package `dashboards`) are not installed: reinstall m2f "
                                "(`make venv` or `pip install .` from the repository)")
    app = Path(spec.origin)
    _check_exposure(args.address, allow_remote=args.allow_remote)
    command = [sys.executable, "-m", "panel", "serve", str(app), "--address", args.address, "--port", str(args.port),
               f"--allow-websocket-origin={args.address}:{args.port}", *(["--show"] if args.show else []),
               *(["--args", *args.runs] if args.runs else [])]
    print(f"m2f dashboard: http://{args.address}:{args.port}/app (Ctrl+C stops it)", flush=True)

    def die_with_parent() -> None:
        # Linux: the server gets SIGTERM when this process dies, even by SIGKILL (when no handler runs).
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    # Its own process group: Ctrl+C then reaches the server once, forwarded from here, as `kill PID` does.
    child = subprocess.Popen(command, preexec_fn=die_with_parent, process_group=0)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stop(child, grace_s=10)  # an error here (not a signal) must not leave the server behind
    # A server stopped by a signal is a normal end of `m2f dashboard`, not a failure.
    raise SystemExit(0 if code in (-signal.SIGINT, -signal.SIGTERM) else code)


def _check_exposure(address: str, *, allow_remote: bool) -> None:
    """The dashboards show a run's images and run its model for anyone who can open the page: only this
    machine may, unless asked. Serving further needs --allow-remote, and one address (the websocket
    origin the server accepts, so that other sites' pages cannot drive it from a visitor's browser)."""
    import ipaddress

    try:
        loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
        wildcard = not loopback and ipaddress.ip_address(address).is_unspecified
    except ValueError:  # a host name
        loopback, wildcard = False, False
    if loopback:
        return
    if not allow_remote:
        raise ValueError(f"--address {address} would serve the dashboards (your runs' images and models) to other "
                         f"machines; add --allow-remote if that is what you want, or keep the default 127.0.0.1 "
                         f"(and use `ssh -L 5006:127.0.0.1:5006 HOST` to look from elsewhere)")
    if wildcard:
        raise ValueError(f"--address {address} listens on every interface, so no single websocket origin can be "
                         f"allowed; give this machine's host name or IP address instead")
    print(f"m2f dashboard: warning: serving on {address}, reachable from other machines; websocket connections are "
          f"accepted only from pages served at {address}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="m2f", description="Mask2Former research workbench")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="list presets, or print a preset's config and parameter count")
    p.add_argument("preset", nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    s = p.add_parser("synth", help="generate the synthetic panoptic benchmark in COCO formats")
    s.add_argument("out")
    s.add_argument("--train", type=int, default=1000)
    s.add_argument("--val", type=int, default=200)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_synth)

    p = sub.add_parser("train", help="train a model (also under torchrun)")
    _add_config_args(p)
    p.add_argument("--data", help="dataset root (sets data.root)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pth")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run directory or checkpoint, writing a metrics JSON")
    p.add_argument("run", help="run directory or checkpoint file")
    p.add_argument("--data", help="dataset root (default: the run's data.root)")
    p.add_argument("--task", choices=["panoptic", "instance", "semantic"], default=None)
    p.add_argument("--layers", choices=["final", "all"], default="final", help="also evaluate every decoder layer")
    p.add_argument("--max-images", type=int, default=0)
    p.add_argument("--out", help="metrics JSON path (default: RUN/eval_<task>.json)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("eval-files", help="metrics from COCO result files made by any model")
    p.add_argument("kind", choices=["panoptic", "instance"])
    p.add_argument("gt_json")
    p.add_argument("pred_json")
    p.add_argument("--gt-folder")
    p.add_argument("--pred-folder")
    p.add_argument("--out")
    p.set_defaults(fn=cmd_eval_files)

    p = sub.add_parser("convert", help="convert original (detectron2 .pkl) or transformers weights to m2f")
    p.add_argument("src", help="model_final_*.pkl, a transformers model directory, or a .safetensors file")
    p.add_argument("--out", required=True, help="m2f checkpoint to write")
    p.add_argument("--preset", help="m2f preset of the source (default: inferred from the weights)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("predict", help="segment image files with any weights: overlays and COCO result files")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (searched recursively) or globs")
    p.add_argument("--weights", required=True,
                   help="run directory, m2f checkpoint, original model_final_*.pkl or transformers folder")
    p.add_argument("--task", required=True, choices=["panoptic", "instance", "semantic"])
    p.add_argument("--out", required=True, help="output folder (finished images in it are skipped)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dataset", help="label names: coco_panoptic, coco_instance, ade20k, cityscapes, synthetic or "
                   "a categories JSON (default: from the checkpoint's config)")
    p.add_argument("--image-ids", metavar="COCO_JSON", help="take image ids from this ground truth's images")
    p.add_argument("--min-score", type=float, default=0.5, help="segments drawn in the overlay (files keep all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set model.deform_impl=torch (repeatable)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU, glibc's malloc keeps freed blocks for reuse (m2f.allocator): 1.3-1.4x faster "
                   "for 800-px images, for 11-18%% more peak memory")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("export", help="export a model as a torch.export ExportedProgram (.pt2) or ONNX file")
    p.add_argument("--weights", required=True, help="as for m2f predict")
    p.add_argument("--format", required=True, choices=["exported_program", "onnx"])
    p.add_argument("--size", required=True, help="input HxW, e.g. 800x1216 (fixed; multiples of 32 avoid padding)")
    p.add_argument("--out", required=True, help="file to write (.pt2 or .onnx)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dynamo", action="store_true", help="ONNX through torch.onnx's dynamo exporter (slower to export)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("doctor", help="what this machine can run (kernels, compilers, CUDA)")
    p.set_defaults(fn=cmd_doctor)

    p = sub.add_parser("demo", help="the main job: synthetic data, tiny-scale reproduction, where results are")
    p.add_argument("--out", default="results/tiny", help="output folder")
    p.add_argument("--iters", type=int, default=0, help="training iterations per row (default: the tiny scale's 500)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("reproduce", help="run a paper table's notebooks with papermill and compare with the paper")
    p.add_argument("table", nargs="*", help="table names (see --list)")
    p.add_argument("--list", action="store_true", help="list the tables and their cost per scale")
    p.add_argument("--scale", default="tiny", choices=["tiny", "small", "paper"])
    p.add_argument("--data", default=None, help="dataset root (default OUT/data, generated at tiny/small scale)")
    p.add_argument("--out", default=None, help="output folder (default results/SCALE)")
    p.add_argument("--iters", type=int, default=0, help="training iterations per row (default: the scale's)")
    p.add_argument("--seeds", type=int, default=None, help="trainings per row (default: tiny/small 3, paper 1)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (seeds SEED..SEED+SEEDS-1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of every row (repeatable)")
    p.add_argument("--status", action="store_true", help="show every row/seed: pending, running, done, failed")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the reports from the jobs that are done (the others show as pending)")
    p.add_argument("--reuse-recorded", action="store_true",
                   help="count rows whose metrics are here but whose checkpoint is not (a fresh clone's committed "
                        "results) as done, rather than retraining them")
    p.add_argument("--launcher", default="local", choices=["local", "slurm"], help="where the rows/seeds run")
    p.add_argument("--jobs", type=int, default=1,
                   help="rows/seeds at the same time (local: pinned worker processes; slurm: array parallelism)")
    g = p.add_argument_group("slurm (--launcher slurm; submitit job array, requeued on preemption/timeout)")
    g.add_argument("--partition", default="")
    g.add_argument("--gpus-per-job", type=int, default=0,
                   help="GPUs per node of each job; >1: the row trains under torchrun on them")
    g.add_argument("--cpus-per-job", type=int, default=1, help="CPUs per node of each job")
    g.add_argument("--nodes", type=int, default=1,
                   help=">1: each row trains on that many nodes (one torchrun per node, rendezvous from Slurm)")
    g.add_argument("--time", type=int, default=60, help="time limit per job in minutes")
    g.add_argument("--account", default="")
    g.add_argument("--mem", default="", help="memory per job, e.g. 64G")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE", help="extra #SBATCH option (repeatable)")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                   help="shell line run in the job first (module load ..., repeatable)")
    p.set_defaults(fn=cmd_reproduce)

    p = sub.add_parser("dashboard", help="serve the Panel dashboards (attention, proposals, per-layer metrics)")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories or checkpoint files")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: this machine only; others need --allow-remote)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow an --address other machines can reach (a warning is printed)")
    p.add_argument("--port", type=int, default=5006)
    p.add_argument("--show", action="store_true", help="open the page in a browser")
    p.set_defaults(fn=cmd_dashboard)

    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, KeyError, OSError, FloatingPointError, MemoryError) as err:
        # User errors (bad config value, missing or unreadable file, wrong dataset, full disk, a run in use,
        # a diverged training with the advice how to go on, an image too large to evaluate)
        # are one clear line, not a traceback. KeyError's str() is the repr of its argument: unquote it.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"m2f {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from err
    except KeyboardInterrupt:  # Ctrl-C: what was saved has been said (m2f train); no traceback
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
