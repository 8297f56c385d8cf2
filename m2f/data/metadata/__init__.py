"""Label metadata of the datasets the released checkpoints were trained on, shipped with the package.

A converted checkpoint knows only its class count K; these tables give the names, thing/stuff flags and
colours of its classes without any download:

- "coco_panoptic": the 133 COCO panoptic categories (80 things, 53 stuff; ids 1..200, not contiguous),
  names and colours as in detectron2's `COCO_CATEGORIES` (`coco_panoptic.json`);
- "coco_instance": its 80 thing categories (same ids and colours; COCO instance AP uses these ids);
- "ade20k": the 150 ADE20K SceneParsing classes (ids 1..150, the label PNG value; colours of the
  benchmark's palette), all flagged stuff: the semantic benchmark has no thing/stuff split. For an
  ADE20K *panoptic* checkpoint pass a categories JSON with the flags (`--dataset FILE`);
- "cityscapes": the 19 evaluated Cityscapes classes (`m2f.data.cityscapes`, ids = label ids, 8 things);
- "synthetic": m2f's own synthetic benchmark (10 classes, 6 things).

The class index k of a model is the k-th category by id (`m2f.data.categories`).
"""

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from m2f.data.categories import Categories

logger = logging.getLogger(__name__)

DATASETS = ("coco_panoptic", "coco_instance", "ade20k", "cityscapes", "synthetic")
# data.format of a config -> the dataset name whose tables a model trained on that format uses.
_FORMAT_DATASET = {"coco_panoptic": "coco_panoptic", "coco_instance": "coco_instance", "ade20k": "ade20k",
                   "cityscapes": "cityscapes"}


def _shipped(file: str) -> Categories:
    path = resources.files("m2f.data.metadata") / file
    return Categories.from_coco(json.loads(path.read_text()), file=str(path))


def dataset_categories(name: str) -> Categories:
    """The categories of a dataset by name (one of `DATASETS`).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name == "coco_panoptic":
        return _shipped("coco_panoptic.json")
    if name == "coco_instance":
        return _shipped("coco_panoptic.json").things()
    if name == "ade20k":
        return _shipped("ade20k.json")
    if name == "cityscapes":
        from m2f.data.cityscapes import cityscapes_categories

        return cityscapes_categories()
    if name == "synthetic":
        from m2f.data.synthetic_scene import synthetic_categories

        return synthetic_categories()
    raise ValueError(f"unknown dataset {name!r}: choose one of {DATASETS} or give a COCO categories JSON file")


def read_categories(path: str | Path) -> Categories:
    """Categories from a JSON file: a COCO `categories` list, or any COCO JSON holding one.

    Raises:
        DatasetError / DatasetFileNotFoundError: unreadable file or malformed categories.
    """
    from m2f.data.image_io import read_json

    data: Any = read_json(path, what="categories JSON")
    entries = data.get("categories") if isinstance(data, dict) else data
    # Instance JSON files list things only and carry no "isthing".
    return Categories.from_coco(entries, file=path, default_isthing=True)


def categories_for(cfg: Any, *, dataset: str | Path | None = None) -> Categories:
    """The categories of a model's K classes, from `dataset` or else from its config.

    Args:
        cfg: the model's `Config` (its `model.num_classes`, `data.format`, `data.task`, `data.root`).
        dataset: a name from `DATASETS` or a categories JSON file; None picks, in this order, the
            run's own `data.root/categories.json` (m2f's synthetic data, ADE20K layouts), the shipped
            table of its `data.format` when it has K classes (the things only for `data.task=instance`),
            any shipped table with K classes, and else placeholder names "class_k" (all things).

    Raises:
        ValueError: `dataset` has a number of classes other than K.
    """
    num_classes = cfg.model.num_classes
    if dataset is not None:
        if str(dataset) in DATASETS:
            categories = dataset_categories(str(dataset))
        else:
            categories = read_categories(dataset)
        if len(categories) != num_classes:
            raise ValueError(f"dataset {dataset} has {len(categories)} classes but the model has K={num_classes}")
        return categories
    own = Path(cfg.data.root) / "categories.json" if cfg.data.root else None
    if own is not None and own.is_file():
        categories = read_categories(own)
        if cfg.data.task == "instance" and len(categories) != num_classes:
            categories = categories.things()
        if len(categories) == num_classes:
            return categories
    instance = cfg.data.task == "instance"
    preferred = _FORMAT_DATASET.get(cfg.data.format)
    for name in (preferred, *DATASETS):
        if name is None:
            continue
        categories = dataset_categories(name)
        if instance and len(categories) != num_classes:
            categories = categories.things()
        if len(categories) == num_classes:
            if name != preferred:
                logger.info("labels: the model's %d classes are taken to be %s's (data.format=%s)",
                            num_classes, name, cfg.data.format)
            return categories
    logger.warning("labels: no known dataset has %d classes; using placeholder names class_0.. (all things); "
                   "pass a categories JSON (--dataset FILE) for real names", num_classes)
    from m2f.data.categories import Category

    return Categories([Category(id=k + 1, name=f"class_{k}", isthing=True) for k in range(num_classes)])
