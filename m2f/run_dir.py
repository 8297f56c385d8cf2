"""A run directory: the one place that knows its file names, what is in them, and when they are stale.

    RUN/checkpoint.pth     model, optimizer, schedule, RNG state, iteration and config (m2f.checkpoint)
    RUN/config.json        the config, as printed at the start of training
    RUN/run_info.json      git revision, parameter count, world size, start iteration, ...
    RUN/metrics.jsonl      one JSON record per logged training step ("split": "train") or validation
    RUN/evaluations.json   the evaluation cache: every evaluation of this run's checkpoint, with its key

The evaluation cache is keyed by what produced an entry: the checkpoint's identity (file name, size
and modification time, so a retrained run never gets the old numbers back), the split, the number of
images, the prediction sets ("final" / "all"), proposal recall, and the data and test sections of the
config (root, task, thresholds). A reader asks for what it wants: `cached_evaluation` for an exact
request, `layer_evaluation` for the per-layer numbers a dashboard shows, which prefers the run's
full evaluation and marks one on a few images (the Proposals tab's button) as partial. A run whose
checkpoint is not on this machine (the committed results of a fresh clone) serves what was recorded
with it; eval_layers.json, the cache of earlier versions, is read as well (never written).
"""

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from m2f.config import Config

# The headline numbers of the paper's tables: name -> (task section of the metrics, key).
METRICS = {"PQ": ("panoptic", "PQ"), "PQ_th": ("panoptic", "PQ_th"), "PQ_st": ("panoptic", "PQ_st"),
           "AP": ("instance", "AP"), "mIoU": ("semantic", "mIoU"), "AR@100": ("proposals", "AR@100")}
# The ones plotted per prediction set (Fig. II, Fig. 3).
LAYER_METRICS = ("PQ", "AP", "mIoU", "AR@100")


def log_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """An evaluation's numbers as the "task/metric" keys of metrics.jsonl's val records (per-class tables
    and per-layer lists stay out of the log)."""
    return {f"{task}/{k}": float(v) for task, values in metrics.items() if isinstance(values, dict)
            for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def headline(metrics: dict[str, Any], names: tuple[str, ...] = tuple(METRICS)) -> dict[str, float]:
    """{name: value on the paper's 0-100 scale} for the `names` present in one evaluation's metrics."""
    out = {}
    for name in names:
        task, key = METRICS[name]
        value = metrics.get(task, {}).get(key)
        if isinstance(value, (int, float)):
            out[name] = 100.0 * float(value)
    return out


def layer_curves(layers: list[dict[str, Any]]) -> dict[str, list[float]]:
    """{"PQ" / "AP" / "mIoU" / "AR@100": value per prediction set} for the metrics present (0-100 scale)."""
    per_set = [headline(layer, LAYER_METRICS) for layer in layers]
    return {name: [values[name] for values in per_set] for name in LAYER_METRICS
            if per_set and all(name in values for values in per_set)}


@dataclass(frozen=True)
class Evaluation:
    """One entry of the evaluation cache.

    Args:
        metrics: what `m2f.inference.evaluate` returned (values in [0, 1]).
        key: what produced it (checkpoint identity, split, max_images, layers, proposals, data, test).
        checkpoint_present: False when the checkpoint it was computed from is not on this machine.
    """

    metrics: dict[str, Any]
    key: dict[str, Any]
    checkpoint_present: bool = True

    @property
    def num_images(self) -> int:
        return int(self.metrics.get("num_images", 0))

    @property
    def is_partial(self) -> bool:
        """Fewer images than the run's own evaluation (data.max_val_images; 0 = the whole split)."""
        limit, own = self.key["max_images"], self.key["data"].get("max_val_images", 0)
        if limit == 0 or self.num_images < limit:  # the whole split was evaluated
            return False
        return own == 0 or limit < own

    def describe(self) -> str:
        """How to label these numbers: "" for the run's own evaluation, else what they are."""
        notes = []
        if self.is_partial:
            notes.append(f"partial: {self.num_images} validation images")
        if not self.checkpoint_present:
            notes.append("recorded; checkpoint not on this machine")
        return ", ".join(notes)


@dataclass(frozen=True, kw_only=True)
class RunDir:
    """A run directory, or a checkpoint file inside one (`RunDir.at` takes either).

    Args:
        root: the directory holding the run's files.
        checkpoint_file: the checkpoint (default root/checkpoint.pth).
    """

    root: Path
    checkpoint_file: Path | None = None

    CHECKPOINT = "checkpoint.pth"
    CONFIG = "config.json"
    RUN_INFO = "run_info.json"
    METRICS = "metrics.jsonl"
    EVALUATIONS = "evaluations.json"
    LEGACY_EVALUATION = "eval_layers.json"  # m2f.experiment's cache before this module (committed results)
    REQUESTED_CONFIG = "requested_config.json"  # the config m2f.experiment hands to torchrun

    @classmethod
    def at(cls, path: "str | Path | RunDir") -> "RunDir":
        """The run of a directory (which need not exist yet) or of a checkpoint file."""
        if isinstance(path, RunDir):
            return path
        path = Path(path).expanduser()
        return cls(root=path.parent, checkpoint_file=path) if path.is_file() else cls(root=path)

    @classmethod
    def existing(cls, path: "str | Path | RunDir") -> "RunDir":
        """`at(path)`, or a clear error when nothing is there.

        Raises:
            FileNotFoundError: nothing at `path`.
        """
        run = cls.at(path)
        if not (run.checkpoint_file or run.root).exists():
            raise FileNotFoundError(f"run {path} does not exist (give a run directory made by `m2f train` "
                                    f"or a checkpoint file)")
        return run

    @property
    def checkpoint(self) -> Path:
        return self.checkpoint_file or self.root / self.CHECKPOINT

    def data_root(self, root: str) -> str:
        """Where the dataset a run names (`data.root`) is on this machine, "" when it is nowhere.

        Runs record the path they were trained with. That path may be relative to where a notebook ran
        (older runs: "../results/tiny/data") or absolute on another machine or clone
        ("/home/a/m2f/results/tiny/data"); a run directory that travelled with its dataset (a clone of
        the repository, a copied results/ folder) still finds it: the path as given, then the path's
        trailing parts below the run directory and each of its parents, the longest match first.
        """
        if not root:
            return ""
        if Path(root).is_dir():
            return str(Path(root).resolve())
        parts = [p for p in Path(root).parts if p not in ("/", "..", ".")]
        for folder in [self.root.resolve(), *self.root.resolve().parents]:
            for start in range(len(parts)):
                candidate = folder.joinpath(*parts[start:])
                if candidate.is_dir():
                    return str(candidate)
        return ""

    @property
    def config_file(self) -> Path:
        return self.root / self.CONFIG

    @property
    def run_info_file(self) -> Path:
        return self.root / self.RUN_INFO

    @property
    def metrics_file(self) -> Path:
        return self.root / self.METRICS

    @property
    def evaluations_file(self) -> Path:
        return self.root / self.EVALUATIONS

    def __str__(self) -> str:
        return str(self.checkpoint_file or self.root)

    # ------------------------------------------------------------------------------------------------
    # Checkpoint

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file()

    def require_checkpoint(self) -> Path:
        """The checkpoint file, or an error saying why there is none.

        Raises:
            FileNotFoundError: no run, or no checkpoint yet.
        """
        run = RunDir.existing(self)
        if not run.checkpoint.is_file():
            found = "only metrics.jsonl" if run.metrics_file.is_file() else "no files of a run"
            raise FileNotFoundError(f"{run.root} has no {self.CHECKPOINT} yet ({found}); the run may still be "
                                    f"starting: wait for its first checkpoint (train.checkpoint_period) or train it")
        return run.checkpoint

    def checkpoint_id(self) -> dict[str, Any]:
        """What identifies the checkpoint's contents without reading them: file name, size, mtime.

        Raises:
            FileNotFoundError: no checkpoint yet.
        """
        stat = self.require_checkpoint().stat()
        return {"file": self.checkpoint.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def load(self) -> tuple[Any, Config]:
        """(model in eval mode, config) of the checkpoint, cached until the checkpoint changes.

        Raises:
            FileNotFoundError: no run or no checkpoint yet.
            ValueError: the checkpoint does not fit its config, or is not an m2f checkpoint.
        """
        return _load(str(self.checkpoint.resolve()), **self.checkpoint_id())

    def val_dataset(self) -> Any:
        """The validation split of the run's dataset with the run's test-time resize (cached).

        Raises:
            FileNotFoundError: no checkpoint, or the dataset is not on this machine.
        """
        return _val_dataset(str(self.checkpoint.resolve()), **self.checkpoint_id())

    # ------------------------------------------------------------------------------------------------
    # Metrics log

    def read_metrics(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The train and val records of metrics.jsonl. A half-written last line (a run still
        writing) is skipped.

        Raises:
            FileNotFoundError: the run has no metrics.jsonl.
            ValueError: a line before the last is not JSON.
        """
        records = self._metrics_records()
        return ([r for r in records if r.get("split") == "train"], [r for r in records if r.get("split") == "val"])

    def _metrics_records(self) -> list[dict[str, Any]]:
        file = RunDir.existing(self).metrics_file
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist (no training iterations logged yet)")
        lines = [line for line in file.read_text().splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number == len(lines):
                    break
                raise ValueError(f"{file} line {number} is not JSON: {err}") from err
        return records

    def start_metrics_log(self, *, resume_iteration: int | None) -> Path | None:
        """Makes metrics.jsonl hold this training only: a fresh run (`resume_iteration` None) moves an
        existing log aside (metrics.jsonl.1, .2, ...) and starts an empty one; a resumed run keeps the
        records up to the checkpoint's iteration, so re-run iterations are not logged twice.

        Returns:
            Where an old log was moved, or None.
        """
        file = self.metrics_file
        if not file.is_file():
            return None
        if resume_iteration is None:
            number = 1
            while file.with_name(f"{file.name}.{number}").exists():
                number += 1
            aside = file.with_name(f"{file.name}.{number}")
            os.replace(file, aside)
            return aside
        kept = [r for r in self._metrics_records() if r.get("iteration", 0) <= resume_iteration]
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, file)
        return None

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_run_info(self) -> dict[str, Any]:
        return json.loads(self.run_info_file.read_text())

    # ------------------------------------------------------------------------------------------------
    # Evaluation cache

    def evaluation_key(self, cfg: Config, *, split: str | None = None, max_images: int | None = None,
                       layers: str = "final", proposals: bool = False) -> dict[str, Any]:
        """The cache key of evaluating this run's checkpoint with `cfg` (arguments as `evaluate`'s)."""
        return _normalized({
            "checkpoint": self.checkpoint_id(), "split": split or cfg.data.val_split,
            "max_images": cfg.data.max_val_images if max_images is None else max_images,
            "layers": layers, "proposals": proposals, "data": asdict(cfg.data), "test": asdict(cfg.test)})

    def cached_evaluation(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The metrics recorded under exactly `key` for the present checkpoint, or None."""
        for entry in self.evaluations():
            if entry.checkpoint_present and _same_request(entry.key, key):
                return entry.metrics
        return None

    def record_evaluation(self, key: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
        """Adds an entry to the cache (replacing one with the same key); entries of an older checkpoint
        are dropped, as they can never be served again. Returns the metrics as the cache will serve them
        (JSON types: per-class keys become strings)."""
        entries = [e for e in self._read_entries(self.evaluations_file)
                   if _checkpoint_matches(e["key"]["checkpoint"], key["checkpoint"]) and not _same_request(e["key"], key)]
        metrics = _normalized(metrics)
        entries.append({"key": key, "metrics": metrics})
        tmp = self.evaluations_file.with_name(self.EVALUATIONS + ".tmp")
        tmp.write_text(json.dumps({"entries": entries}, indent=1))
        os.replace(tmp, self.evaluations_file)
        return metrics

    def evaluations(self) -> list[Evaluation]:
        """Every cache entry that belongs to the present checkpoint (or, with no checkpoint here, every
        recorded one), newest first; entries of a replaced checkpoint are never returned."""
        current = self.checkpoint_id() if self.has_checkpoint() else None
        entries = [*reversed(self._read_entries(self.evaluations_file)), *self._legacy_entries()]
        return [Evaluation(metrics=e["metrics"], key=e["key"], checkpoint_present=current is not None)
                for e in entries if current is None or _checkpoint_matches(e["key"]["checkpoint"], current)]

    def layer_evaluation(self, *, proposals: bool = False) -> Evaluation | None:
        """The per-prediction-set evaluation to show for this run: the run's own (full) one if there is
        one, else the one on the most images (`Evaluation.is_partial` then says so); None if none has
        every prediction set (and proposal recall, when asked for)."""
        found = [e for e in self.evaluations() if e.key["layers"] == "all" and e.metrics.get("layers")
                 and (not proposals or "proposals" in e.metrics)]
        return min(found, key=lambda e: (e.is_partial, -e.num_images), default=None)

    @staticmethod
    def _read_entries(file: Path) -> list[dict[str, Any]]:
        if not file.is_file():
            return []
        try:
            return list(json.loads(file.read_text()).get("entries", []))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not JSON ({err}); delete it to re-evaluate") from err

    def _legacy_entries(self) -> list[dict[str, Any]]:
        """eval_layers.json of earlier versions: {"key": {checkpoint_mtime_ns, layers, proposals},
        "config", "metrics"}, an evaluation of the whole split (data.max_val_images) of val_split."""
        file = self.root / self.LEGACY_EVALUATION
        if not file.is_file():
            return []
        try:
            old = json.loads(file.read_text())
            data, test = old["config"]["data"], old["config"]["test"]
            key = {"checkpoint": {"mtime_ns": old["key"]["checkpoint_mtime_ns"]}, "split": data["val_split"],
                   "max_images": data["max_val_images"], "layers": old["key"]["layers"],
                   "proposals": old["key"]["proposals"], "data": data, "test": test}
            return [{"key": key, "metrics": old["metrics"]}]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{file} is not an evaluation file of m2f ({type(err).__name__}: {err})") from err


def _checkpoint_matches(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a recorded checkpoint identity is the present checkpoint (legacy entries have no size/file)."""
    return all(recorded[k] == current[k] for k in ("file", "size", "mtime_ns") if k in recorded)


def _same_request(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two keys ask for the same evaluation (of the same checkpoint, as `_checkpoint_matches` decides)."""
    return _checkpoint_matches(a["checkpoint"], b["checkpoint"]) and all(
        a[k] == b[k] for k in ("split", "max_images", "layers", "proposals", "data", "test"))


def _normalized(value: Any) -> Any:
    """As it reads back from JSON (tuples become lists, paths strings), so keys compare equal."""
    return json.loads(json.dumps(value, default=str))


@functools.lru_cache(maxsize=4)
def _load(checkpoint: str, *, file: str, size: int, mtime_ns: int) -> tuple[Any, Config]:
    # The identity is part of the cache key: a run still training that writes a new checkpoint reloads.
    from m2f.inference import load_run

    return load_run(checkpoint)


@functools.lru_cache(maxsize=4)
def _val_dataset(checkpoint: str, **identity: Any) -> Any:
    from m2f.data import build_dataset, build_test_transforms

    _, cfg = _load(checkpoint, **identity)
    d = cfg.data
    root = RunDir.at(checkpoint).data_root(d.root)
    if not root:
        raise FileNotFoundError(f"the run's dataset root {d.root!r} (data.root) is not on this machine; "
                                f"upload an image instead")
    transforms = build_test_transforms(size=d.test_size, max_size=d.test_max_size)
    return build_dataset(d.format, root, d.val_split, task=d.task, transforms=transforms)
