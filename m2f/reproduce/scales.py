"""The scales a table can be reproduced at: the same experiments, different data, model size and budget.

- tiny: the `tiny` preset on the synthetic benchmark (128 px), minutes per row on 2 CPU cores. It
  shows the workflow and the direction of an effect, not the paper's numbers.
- small: the same model on larger synthetic images for longer; meant for one GPU (or a CPU overnight).
- paper: the paper's R50 presets on the real datasets (COCO panoptic / instance, ADE20K), 8 GPUs.

`experiment_config` turns (scale, task, overrides) into the `Config` a notebook trains.
"""

from dataclasses import dataclass
from pathlib import Path

from m2f.config import Config, get_config

TASKS = ("panoptic", "instance", "semantic")
# What each task's model is evaluated on (the paper's Tables 1-3 metric).
TASK_TESTS = {"panoptic": [], "instance": ["test.panoptic_on=false", "test.semantic_on=false"],
              "semantic": ["test.panoptic_on=false", "test.instance_on=false"]}


@dataclass(frozen=True)
class Scale:
    """One scale of reproduction.

    Args:
        name: "tiny", "small" or "paper".
        presets: task -> the preset the experiments start from.
        overrides: applied after the preset, before a row's own overrides.
        synthetic: `m2f.data.synthetic.generate` arguments when the data is generated (else None:
            the user passes --data).
        nproc_per_node: training processes (GPUs) per row.
        minutes_per_row: the cost of one trained row, for `m2f reproduce --list`.
        cost_note: how `minutes_per_row` was obtained.
    """

    name: str
    presets: dict[str, str]
    overrides: tuple[str, ...] = ()
    synthetic: dict[str, int] | None = None
    nproc_per_node: int = 1
    minutes_per_row: float = 0.0
    cost_note: str = ""
    data_hint: str = ""


_TINY_FOR_EVERY_TASK = dict.fromkeys(TASKS, "tiny")

SCALES: dict[str, Scale] = {
    "tiny": Scale(
        name="tiny", presets=_TINY_FOR_EVERY_TASK,
        # 500 iterations of batch 8 = 5 epochs of the 800 training images; validation PQ five times.
        overrides=("train.max_iters=500", "train.eval_period=100", "train.checkpoint_period=100"),
        synthetic={"num_train": 800, "num_val": 100, "image_size": 128, "seed": 0},
        minutes_per_row=4.5, cost_note="measured: 2 idle CPU cores, training and evaluation of every prediction set",
    ),
    "small": Scale(
        name="small", presets=_TINY_FOR_EVERY_TASK,
        overrides=("data.image_size=256", "data.test_size=256", "data.test_max_size=512", "train.max_iters=4000",
                   "train.batch_size=16", "train.eval_period=1000", "train.checkpoint_period=500"),
        synthetic={"num_train": 4000, "num_val": 200, "image_size": 256, "seed": 0},
        minutes_per_row=15.0, cost_note="estimate for one GPU (not measured); about 2 h per row on 2 CPU cores",
    ),
    "paper": Scale(
        name="paper",
        presets={"panoptic": "r50_coco_panoptic", "instance": "r50_coco_instance", "semantic": "r50_ade20k_semantic"},
        nproc_per_node=8, minutes_per_row=60 * 24.0,
        cost_note="the paper's schedules (50 COCO epochs, 160k ADE20K iterations) on 8 GPUs, estimated",
        data_hint="--data: COCO 2017 root (panoptic / instance tasks) or ADEChallengeData2016 (semantic)",
    ),
}


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; choose from {list(SCALES)}")
    return SCALES[name]


def experiment_config(scale: str, *, task: str = "panoptic", data_dir: str | Path, overrides: list[str] = (),
                      max_iters: int = 0, seed: int = 0) -> Config:
    """The config of one experiment at `scale`.

    Args:
        scale: a name in `SCALES`.
        task: "panoptic", "instance" or "semantic": which annotations train the model and which metric
            evaluates it. On the synthetic data all three come from the same COCO panoptic files.
        data_dir: the dataset root.
        overrides: the row's "section.field=value" overrides (e.g. "model.attention=cross").
        max_iters: >0 replaces the scale's iteration budget (smoke runs, longer runs).
        seed: `train.seed`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    s = get_scale(scale)
    base = [*s.overrides, f"data.root={data_dir}", f"train.seed={seed}"]
    if s.synthetic is not None:
        # The synthetic set stores every task in the COCO panoptic layout; an instance model sees
        # only its thing classes, panoptic and semantic models all of them.
        from m2f.data.synthetic_scene import synthetic_categories

        classes = [c for c in synthetic_categories() if c.isthing or task != "instance"]
        base += ["data.format=coco_panoptic", f"data.task={task}", f"model.num_classes={len(classes)}",
                 *TASK_TESTS[task]]
    if max_iters > 0:
        base.append(f"train.max_iters={max_iters}")
        base.append("train.eval_period=0")  # a smoke run is evaluated once, at its end (run_experiment)
    return get_config(s.presets[task], [*base, *overrides])


def prepare_data(scale: str, data_dir: str | Path) -> Path:
    """Generates the synthetic data of a scale into `data_dir` unless it is there; checks real data exists.

    Raises:
        FileNotFoundError: a real-data scale and `data_dir` does not exist.
    """
    s, root = get_scale(scale), Path(data_dir)
    if s.synthetic is None:
        if not root.is_dir():
            raise FileNotFoundError(f"scale {scale!r} trains on real data: {root} does not exist ({s.data_hint})")
        return root
    if not (root / "annotations" / "panoptic_val2017.json").is_file():
        from m2f.data.synthetic import generate

        print(f"generating the synthetic dataset of scale {scale!r} in {root}", flush=True)
        generate(root, **s.synthetic)
    return root
