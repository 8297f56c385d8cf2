"""Inference and evaluation of trained models: `predict` for notebooks, `evaluate` for runs and the CLI.

`evaluate` streams the validation split image by image through the model, the enabled
post-processings and the metric accumulators, for the final prediction set or for all of them
(per-decoder-layer metrics, Fig. II), so its memory does not grow with the dataset.
"""

import dataclasses
from pathlib import Path
from typing import Any

import torch

from m2f.checkpoint import load
from m2f.config import Config, from_dict
from m2f.model import Mask2Former, build_model
from m2f.run_dir import RunDir


def load_run(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[Mask2Former, Config]:
    """Loads the model and config of a run directory (its checkpoint) or of a checkpoint file.

    Raises:
        FileNotFoundError: neither a checkpoint file nor a run directory with one.
        ValueError: the checkpoint does not fit the model its own config builds.
    """
    ckpt = RunDir.at(path).require_checkpoint()
    state = load(ckpt)
    if "config" not in state or "model" not in state:
        raise ValueError(f"{ckpt} is not an m2f checkpoint (keys: {sorted(state)[:6]})")
    try:
        cfg = from_dict(state["config"])
    except (TypeError, AttributeError) as err:  # a config dict of the wrong shape
        raise ValueError(f"{ckpt} holds a config that is not an m2f config ({err})") from err
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
        outputs = model(images, intermediate=False)
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


def evaluate(model: Mask2Former, cfg: Config, *, split: str | None = None, layers: str = "final",
             max_images: int | None = None, proposals: bool = False, progress: bool = False) -> dict[str, Any]:
    """Metrics of `model` on a split of `cfg.data` (COCO panoptic layout, or ADE20K for semantic only).

    The tasks are those `cfg.test` enables: panoptic (PQ/SQ/RQ, things/stuff), instance (COCO mask AP
    against the instances JSON; AP^Th_pan for a panoptic model) and semantic (mIoU_pan against the
    panoptic ground truth; with data.format=ade20k, mIoU against the label PNGs). Predictions are made at the test size and evaluated at the original size.

    Args:
        split: default `cfg.data.val_split`.
        layers: "final", or "all" for every prediction set (prediction #0 from the learnable queries,
            then each decoder layer): the result then has "layers", a list of per-set metric dicts.
        max_images: evaluate a prefix (default `cfg.data.max_val_images`, 0 = all).
        proposals: also class-agnostic AR@1/10/100 of the Q mask proposals (Fig. 3).

    Returns:
        {"panoptic": {"PQ", "SQ", "RQ", "PQ_th", "PQ_st", ...}, "instance": {"AP", ...}, "semantic":
        {"mIoU", ...}, "proposals": {"AR@100", ...}, "num_images": N} (+ "layers"); values in [0, 1].
    """
    from tqdm import tqdm

    from m2f.data import build_dataset, build_test_transforms
    from m2f.evaluation import LayerwiseEvaluator, ProposalRecallEvaluator, read_json

    d, test = cfg.data, cfg.test
    ade20k = d.format == "ade20k"
    if d.format not in ("coco_panoptic", "ade20k"):
        raise ValueError(f"evaluate reads the COCO panoptic or ADE20K layout (data.format), not {d.format!r}; "
                         "for other formats use the evaluators in m2f.evaluation directly")
    if ade20k and (test.panoptic_on or test.instance_on or proposals):
        raise ValueError("data.format=ade20k is evaluated for semantic segmentation only: set "
                         "test.panoptic_on=false, test.instance_on=false and proposals=False")
    if layers not in ("final", "all"):
        raise ValueError(f"layers must be 'final' or 'all', got {layers!r}")
    split = split or d.val_split
    # The dataset's task sets the label space (an instance model's classes are the things only).
    dataset = build_dataset(d.format, d.root, split, task=d.task,
                            transforms=build_test_transforms(size=d.test_size, max_size=d.test_max_size))
    paths = {} if ade20k else coco_annotation_paths(d.root, split)
    panoptic_gt = {} if ade20k else {a["image_id"]: a for a in read_json(paths["panoptic_json"],
                                                                         what="panoptic annotations")["annotations"]}
    num_sets = cfg.model.dec_layers + 1 if layers == "all" else 1
    evaluator = LayerwiseEvaluator(
        categories=dataset.categories.to_coco(), panoptic=test.panoptic_on, semantic=test.semantic_on,
        instance_ground_truth=paths["instances_json"] if test.instance_on else None,
        num_prediction_sets=num_sets, object_mask_threshold=test.object_mask_threshold,
        overlap_threshold=test.overlap_threshold, topk=test.topk_per_image)
    recall = [ProposalRecallEvaluator(ground_truth=paths["instances_json"]) for _ in range(num_sets)] if proposals else []
    limit = max_images if max_images is not None else d.max_val_images
    count = min(len(dataset), limit) if limit else len(dataset)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for index in tqdm(range(count), desc="evaluate", disable=not progress):
        item = dataset[index]
        _check_memory(item, cfg)
        with torch.no_grad():
            out = model([item["image"].to(device)], intermediate=layers == "all")
        sizes = {"image_sizes": [tuple(item["image"].shape[-2:])], "output_sizes": [(item["height"], item["width"])],
                 "padded_size": out["padded_size"]}
        if ade20k:
            targets = {"semantic_targets": [dataset.label_map(index)]}
        else:
            gt = panoptic_gt[item["image_id"]]
            targets = {"panoptic_targets": [(paths["panoptic_dir"] / gt["file_name"], gt["segments_info"])]}
        evaluator.update(out, image_ids=[item["image_id"]], **sizes, **targets)
        for meter, predictions in zip(recall, [*out.get("aux_outputs", []), out]):
            meter.update(item["image_id"], *_proposals(predictions, sizes))
    model.train(was_training)
    results = [_summary(r) for r in evaluator.compute()]
    for result, meter in zip(results, recall):
        result["proposals"] = meter.compute()
    final = {**results[-1], "num_images": count}
    if layers == "all":
        final["layers"] = results
    return final


def evaluation_bytes(height: int, width: int, cfg: Config) -> int:
    """Peak memory of evaluating one image of `height` x `width` pixels (at its original size, where the
    metrics are defined): the Q query masks as logits, probabilities and binary masks, the K class scores
    of the semantic map, and the ground truth id maps. Measured: 361 bytes/pixel for the tiny preset
    (Q=20, K=10) at 1500x1500 against 344 predicted."""
    return height * width * (4 * (3 * cfg.model.num_queries + cfg.model.num_classes) + 64)


def _check_memory(item: dict[str, Any], cfg: Config) -> None:
    """Refuses an image whose evaluation would not fit in memory, before anything is allocated for it
    (an 8000x8000 image needs ~22 GB with the tiny preset: the process would be killed without a word)."""
    from m2f.memory import available_bytes

    need, free = evaluation_bytes(item["height"], item["width"], cfg), available_bytes()
    if 0 <= free < need:
        raise MemoryError(
            f"{item['file_name']} is {item['height']}x{item['width']} pixels: evaluating it at its original size "
            f"(as the metrics are defined) needs about {need / 2**30:.1f} GiB for {cfg.model.num_queries} query "
            f"masks, and this process can allocate {free / 2**30:.1f} GiB. Downscale the image and its annotation, "
            f"leave it out of the split, or evaluate on a machine with more memory")


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """Adds the headline PQ numbers (PQ, SQ, RQ, PQ_th, PQ_st) beside panopticapi's nested dict."""
    if "panoptic" in result:
        pq = result["panoptic"]
        result["panoptic"] = {"PQ": pq["All"]["pq"], "SQ": pq["All"]["sq"], "RQ": pq["All"]["rq"],
                              "PQ_th": pq["Things"]["pq"], "PQ_st": pq["Stuff"]["pq"], **pq}
    return result


def _proposals(preds: dict[str, torch.Tensor], sizes: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-agnostic proposals: every query's binary mask at the original size, scored by its best
    object class probability (Fig. 3 uses all Q queries, so AR@100 with 100 queries sees them all)."""
    from m2f.postprocess import resize_mask_logits

    masks = resize_mask_logits(preds["pred_masks"][0], padded_size=sizes["padded_size"],
                               image_size=sizes["image_sizes"][0], output_size=sizes["output_sizes"][0]) > 0
    scores = preds["pred_logits"][0].softmax(-1)[:, :-1].max(-1).values
    return masks.cpu(), scores.cpu()


def evaluate_run(path: str | Path, *, cfg: Config | None = None, split: str | None = None, layers: str = "final",
                 max_images: int | None = None, proposals: bool = False, progress: bool = False) -> dict[str, Any]:
    """`evaluate` of a run's checkpoint, served from the run's evaluation cache when it holds exactly
    this evaluation of this checkpoint, else computed and recorded there (see `m2f.run_dir`).

    Args:
        path: run directory or checkpoint file.
        cfg: the checkpoint's config with evaluation overrides (other data root, task); default its own.
        split, layers, max_images, proposals, progress: as `evaluate`'s.

    Raises:
        FileNotFoundError: no run or no checkpoint.
    """
    run = RunDir.at(path)
    model, saved = run.load()
    cfg = cfg or saved
    key = run.evaluation_key(cfg, split=split, max_images=max_images, layers=layers, proposals=proposals)
    metrics = run.cached_evaluation(key)
    if metrics is None:
        # The key keeps the recorded data.root (a moved clone still hits its cache); the data is read
        # from where it is on this machine.
        found = dataclasses.replace(cfg.data, root=run.data_root(cfg.data.root) or cfg.data.root)
        metrics = evaluate(model, dataclasses.replace(cfg, data=found), split=split, layers=layers,
                           max_images=max_images, proposals=proposals, progress=progress)
        metrics = run.record_evaluation(key, metrics)  # what a later call gets from the cache
    return metrics


def evaluate_checkpoint(path: str | Path, *, data: str | None = None, task: str | None = None,
                        layers: str = "final", max_images: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """`m2f eval`: evaluates a run or checkpoint (through the run's evaluation cache) and writes the
    metrics JSON to `out` (default RUN/eval_<task>.json), a report for people and scripts."""
    import dataclasses
    import json

    _, cfg = RunDir.at(path).load()
    overrides = {}
    if data:
        overrides["root"] = data
    if task:
        overrides["task"] = task
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **overrides))
    if task:
        cfg = dataclasses.replace(cfg, test=dataclasses.replace(
            cfg.test, panoptic_on=task == "panoptic", instance_on=task == "instance", semantic_on=task == "semantic"))
    metrics = evaluate_run(path, cfg=cfg, layers=layers, max_images=max_images or None, progress=True)
    target = Path(out) if out else RunDir.at(path).root / f"eval_{task or cfg.data.task}.json"
    target.write_text(json.dumps({"config": cfg.to_dict(), "metrics": metrics}, indent=2, default=str))
    return metrics
