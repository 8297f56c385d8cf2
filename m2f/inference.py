"""Inference and evaluation of trained models: `predict` for notebooks, `evaluate` for runs and the CLI.

`evaluate` streams the validation split image by image through the model, the enabled
post-processings and the metric accumulators, for the final prediction set or for all of them
(per-decoder-layer metrics, Fig. II), so its memory does not grow with the dataset.
"""

from pathlib import Path
from typing import Any

import torch

from m2f.checkpoint import load
from m2f.config import Config, from_dict
from m2f.model import Mask2Former, build_model


def load_run(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[Mask2Former, Config]:
    """Loads the model and config of a run directory (its checkpoint.pth) or of a checkpoint file.

    Raises:
        FileNotFoundError: neither a checkpoint file nor a run directory with one.
        ValueError: the checkpoint does not fit the model its own config builds.
    """
    path = Path(path)
    ckpt = path / "checkpoint.pth" if path.is_dir() else path
    if path.is_dir() and not ckpt.is_file():
        raise FileNotFoundError(f"{path} has no checkpoint.pth yet (is the run still starting?)")
    state = load(ckpt)
    if "config" not in state or "model" not in state:
        raise ValueError(f"{ckpt} is not an m2f checkpoint (keys: {sorted(state)[:6]})")
    cfg = from_dict(state["config"])
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"{ckpt} does not match the model of its config {cfg.name}: {err}") from err
    return model.to(device).eval(), cfg


def predict(model: Mask2Former, images: list[torch.Tensor], *, task: str, is_thing: list[bool],
            test: Any = None, output_sizes: list[tuple[int, int]] | None = None) -> list[Any]:
    """Runs the model and one task's post-processing on a list of (3, H, W) 0-255 RGB images.

    Args:
        task: "panoptic" ({"panoptic_seg", "segments_info"}), "instance" ({"masks", "scores",
            "labels"}) or "semantic" ((H, W) class map).
        is_thing: per class, whether it is a thing (panoptic merges stuff; a panoptic model's
            instance output keeps things only).
        test: a `TestConfig` for the thresholds (default: the paper's).
        output_sizes: per image the size of the result (default: the image's own size).
    """
    from m2f.config import TestConfig
    from m2f.postprocess import postprocess

    test = test or TestConfig()
    sizes = [tuple(im.shape[-2:]) for im in images]
    with torch.no_grad():
        outputs = model(images)
    return postprocess(outputs, task=task, image_sizes=sizes, output_sizes=output_sizes or sizes,
                       **_task_options(task, is_thing, test))


def _task_options(task: str, is_thing: list[bool], test: Any) -> dict[str, Any]:
    if task == "panoptic":
        return {"is_thing": is_thing, "object_mask_threshold": test.object_mask_threshold,
                "overlap_threshold": test.overlap_threshold}
    if task == "instance":
        # A model trained on panoptic data also predicts stuff classes; only things are instances.
        return {"topk": test.topk_per_image, "is_thing": is_thing if not all(is_thing) else None}
    return {}


def coco_annotation_paths(root: str | Path, split: str) -> dict[str, Path]:
    """The COCO 2017 layout's ground-truth files of `split` ("val" -> val2017)."""
    root, name = Path(root), f"{split}2017"
    return {"panoptic_json": root / "annotations" / f"panoptic_{name}.json",
            "panoptic_dir": root / "annotations" / f"panoptic_{name}",
            "instances_json": root / "annotations" / f"instances_{name}.json"}


class _SetEvaluators:
    """The metric accumulators of one prediction set (one decoder layer)."""

    def __init__(self, *, tasks: list[str], categories: Any, paths: dict[str, Path], proposals: bool):
        from m2f.evaluation.instance_ap import InstanceEvaluator
        from m2f.evaluation.panoptic_quality import PanopticEvaluator
        from m2f.evaluation.proposal_recall import ProposalRecallEvaluator
        from m2f.evaluation.semantic_iou import SemanticEvaluator

        self.tasks = tasks
        self.panoptic = PanopticEvaluator(categories=categories.to_coco()) if "panoptic" in tasks else None
        self.semantic = SemanticEvaluator(num_classes=len(categories)) if "semantic" in tasks else None
        self.instance = (InstanceEvaluator(ground_truth=paths["instances_json"], category_ids=categories.ids)
                         if "instance" in tasks else None)
        self.proposals = ProposalRecallEvaluator(ground_truth=paths["instances_json"]) if proposals else None

    def compute(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.panoptic:
            pq = self.panoptic.compute()
            out["panoptic"] = {"PQ": pq["All"]["pq"], "SQ": pq["All"]["sq"], "RQ": pq["All"]["rq"],
                               "PQ_th": pq["Things"]["pq"], "PQ_st": pq["Stuff"]["pq"], "per_class": pq["per_class"]}
        if self.instance:
            out["instance"] = self.instance.compute()
        if self.semantic:
            out["semantic"] = self.semantic.compute()
        if self.proposals:
            out["proposals"] = self.proposals.compute()
        return out


def evaluate(model: Mask2Former, cfg: Config, *, split: str | None = None, layers: str = "final",
             max_images: int | None = None, proposals: bool = False, progress: bool = False) -> dict[str, Any]:
    """Metrics of `model` on a split of `cfg.data` (COCO panoptic or instance layout).

    The tasks are those `cfg.test` enables: panoptic (PQ/SQ/RQ, things/stuff), instance (COCO mask AP
    against the instances JSON; AP^Th_pan for a panoptic model) and semantic (mIoU; mIoU_pan against
    the panoptic ground truth for a panoptic model). Results are at the original image size.

    Args:
        split: default `cfg.data.val_split`.
        layers: "final", or "all" for every prediction set (prediction #0 from the learnable queries,
            then each decoder layer): the result then has "layers", a list of per-set metric dicts.
        max_images: evaluate a prefix (default `cfg.data.max_val_images`, 0 = all).
        proposals: also class-agnostic AR@1/10/100 of the Q mask proposals (Fig. 3).

    Returns:
        {"panoptic": {...}, "instance": {...}, "semantic": {...}, "num_images": N} (+ "layers").
    """
    from tqdm import tqdm

    from m2f.data import build_dataset, build_test_transforms
    from m2f.evaluation.coco_io import read_json, read_panoptic_png
    from m2f.evaluation.semantic_iou import panoptic_to_semantic
    from m2f.postprocess import postprocess

    d, test = cfg.data, cfg.test
    if d.format not in ("coco_panoptic", "coco_instance"):
        raise ValueError(f"evaluate supports the COCO layouts (data.format coco_panoptic / coco_instance), "
                         f"not {d.format!r}")
    if layers not in ("final", "all"):
        raise ValueError(f"layers must be 'final' or 'all', got {layers!r}")
    split = split or d.val_split
    transforms = build_test_transforms(size=d.test_size, max_size=d.test_max_size)
    dataset = build_dataset(d.format, d.root, split, task=d.task, transforms=transforms)
    categories = dataset.categories
    paths = coco_annotation_paths(d.root, split)
    tasks = [t for t, on in (("panoptic", test.panoptic_on), ("instance", test.instance_on),
                             ("semantic", test.semantic_on)) if on]
    if d.format == "coco_instance":
        tasks = ["instance"]
    panoptic_gt = {}
    if d.format == "coco_panoptic" and {"panoptic", "semantic"} & set(tasks):
        panoptic_gt = {a["image_id"]: a for a in read_json(paths["panoptic_json"], "panoptic annotations")["annotations"]}
    num_sets = (cfg.model.dec_layers + 1) if layers == "all" else 1
    evaluators = [_SetEvaluators(tasks=tasks, categories=categories, paths=paths, proposals=proposals)
                  for _ in range(num_sets)]
    limit = max_images if max_images is not None else d.max_val_images
    count = min(len(dataset), limit) if limit else len(dataset)
    is_thing = categories.isthing
    label_of = {c: k for k, c in enumerate(categories.ids)}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for index in tqdm(range(count), desc="evaluate", disable=not progress):
        item = dataset[index]
        image_id, size = item["image_id"], (item["height"], item["width"])
        with torch.no_grad():
            out = model([item["image"].to(device)])
        sets = [*out["aux_outputs"], out] if layers == "all" else [out]
        sizes = {"image_sizes": [tuple(item["image"].shape[-2:])], "output_sizes": [size],
                 "padded_size": out["padded_size"]}
        gt = panoptic_gt.get(image_id)
        gt_ids = read_panoptic_png(paths["panoptic_dir"] / gt["file_name"]) if gt else None
        gt_semantic = (panoptic_to_semantic(gt_ids, gt["segments_info"], category_to_label=label_of)
                       if gt is not None and "semantic" in tasks else None)
        for predictions, ev in zip(sets, evaluators):
            preds = {k: v.float() for k, v in predictions.items() if k in ("pred_logits", "pred_masks")}
            if ev.panoptic and gt is not None:
                pan = postprocess(preds, task="panoptic", **sizes, **_task_options("panoptic", is_thing, test))[0]
                ev.panoptic.update(pred_ids=pan["panoptic_seg"].cpu(), pred_segments=pan["segments_info"],
                                   gt_ids=gt_ids, gt_segments=gt["segments_info"], image_id=image_id)
            if ev.semantic and gt_semantic is not None:
                sem = postprocess(preds, task="semantic", **sizes)[0]
                ev.semantic.update(sem.cpu(), gt_semantic)
            if ev.instance:
                inst = postprocess(preds, task="instance", **sizes, **_task_options("instance", is_thing, test))[0]
                ev.instance.update(image_id, inst["masks"].cpu(), inst["scores"].cpu(), inst["labels"].cpu())
            if ev.proposals:
                masks, scores = _proposals(preds, sizes)
                ev.proposals.update(image_id, masks, scores)
    model.train(was_training)
    results = [ev.compute() for ev in evaluators]
    final = {**results[-1], "num_images": count}
    if layers == "all":
        final["layers"] = results
    return final


def _proposals(preds: dict[str, torch.Tensor], sizes: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-agnostic proposals: every query's binary mask at the original size, scored by its best
    object class probability (Fig. 3 uses all Q queries, so AR@100 with 100 queries sees them all)."""
    from m2f.postprocess import resize_mask_logits

    masks = resize_mask_logits(preds["pred_masks"][0], padded_size=sizes["padded_size"],
                               image_size=sizes["image_sizes"][0], output_size=sizes["output_sizes"][0]) > 0
    scores = preds["pred_logits"][0].softmax(-1)[:, :-1].max(-1).values
    return masks.cpu(), scores.cpu()


def evaluate_checkpoint(path: str | Path, *, data: str | None = None, task: str | None = None,
                        layers: str = "final", max_images: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """`m2f eval`: loads a run or checkpoint, evaluates it and writes the metrics JSON next to it."""
    import dataclasses
    import json

    model, cfg = load_run(path)
    overrides = {}
    if data:
        overrides["root"] = data
    if task:
        overrides["task"] = task
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **overrides))
    if task:
        cfg = dataclasses.replace(cfg, test=dataclasses.replace(
            cfg.test, panoptic_on=task == "panoptic", instance_on=task == "instance", semantic_on=task == "semantic"))
    metrics = evaluate(model, cfg, layers=layers, max_images=max_images or None, progress=True)
    base = Path(path) if Path(path).is_dir() else Path(path).parent
    target = Path(out) if out else base / f"eval_{task or cfg.data.task}.json"
    target.write_text(json.dumps({"config": cfg.to_dict(), "metrics": metrics}, indent=2, default=str))
    return metrics
