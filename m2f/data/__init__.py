"""Data: the synthetic dataset, COCO / ADE20K / Cityscapes loaders, transforms and batching.

Quick use::

    from m2f.data import build_dataset, build_train_transforms, collate
    ds = build_dataset("coco_panoptic", root, "train", "panoptic", build_train_transforms("panoptic", 128))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate, num_workers=2)

Items, targets and the category-index convention are described in `m2f.data.base` and
`m2f.data.categories`; bad input raises `DatasetError` (or is skipped and counted with skip_bad).
"""

from pathlib import Path

from m2f.data.ade20k import ADE20KSemanticDataset
from m2f.data.base import SegmentationDataset, Transform
from m2f.data.categories import Categories, Category
from m2f.data.cityscapes import CityscapesDataset
from m2f.data.coco_instance import COCOInstanceDataset
from m2f.data.coco_panoptic import COCOPanopticDataset
from m2f.data.collate import collate
from m2f.data.errors import DatasetError, DatasetFileNotFoundError, skip_summary
from m2f.data.transforms import build_test_transforms, build_train_transforms

FORMATS = ("coco_panoptic", "coco_instance", "ade20k", "cityscapes")

__all__ = [
    "FORMATS",
    "ADE20KSemanticDataset",
    "COCOInstanceDataset",
    "COCOPanopticDataset",
    "Categories",
    "Category",
    "CityscapesDataset",
    "DatasetError",
    "DatasetFileNotFoundError",
    "SegmentationDataset",
    "build_dataset",
    "build_test_transforms",
    "build_train_transforms",
    "collate",
    "skip_summary",
]


def build_dataset(format: str, root: str | Path, split: str, task: str, transforms: Transform | None = None, *,
                  skip_bad: bool = False, filter_empty: bool = False) -> SegmentationDataset:
    """Build the loader for a dataset format.

    Args:
        format: "coco_panoptic" (tasks panoptic / instance / semantic), "coco_instance" (instance),
            "ade20k" (semantic; also reads the synthetic set's semantic PNGs) or "cityscapes" (all three).
        root: dataset root folder.
        split: "train" / "val" (COCO folders "{split}2017", ADE "training" / "validation").
        task: "panoptic", "instance" or "semantic".
        transforms: item -> item callable (e.g. `build_train_transforms(task, size)`), or None.
        skip_bad: skip and record bad images instead of raising `DatasetError`.
        filter_empty: leave out images without targets (COCO formats; training only).

    Returns:
        A `SegmentationDataset`; its `categories` are the label space of the targets.
    """
    if format == "coco_panoptic":
        return COCOPanopticDataset(root=root, split=split, task=task, transforms=transforms, skip_bad=skip_bad,
                                   filter_empty=filter_empty)
    if format == "coco_instance":
        return COCOInstanceDataset(root=root, split=split, task=task, transforms=transforms, skip_bad=skip_bad,
                                   filter_empty=filter_empty)
    if format == "ade20k":
        return ADE20KSemanticDataset(root=root, split=split, task=task, transforms=transforms, skip_bad=skip_bad)
    if format == "cityscapes":
        return CityscapesDataset(root=root, split=split, task=task, transforms=transforms, skip_bad=skip_bad)
    raise ValueError(f"unknown dataset format {format!r}; expected one of {list(FORMATS)}")
