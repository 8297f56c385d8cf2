"""ADE20K-style semantic loader: images + uint8 label PNGs (0 = ignore/"other", c + 1 = class c).

Two layouts under `root` are recognised:
- ADEChallengeData2016: `images/{training,validation}/*.jpg` and `annotations/{training,validation}/*.png`
  ("train" -> "training", "val" -> "validation");
- the synthetic set of `m2f.data.synthetic`: `{split}2017/*` and `annotations/semantic_{split}2017/*.png`.
Images and labels are paired by file stem. In memory label 0 becomes 255 (ignore) and c + 1 becomes
c; the target is one mask per class present, and ignore pixels are in no mask.
Categories come from `root/categories.json` (a COCO categories list, class c = c-th by id) if
present, otherwise `num_classes` generic classes (150 for ADE20K).
"""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m2f.data.base import Item, SegmentationDataset, Transform, check_task, make_item, semantic_targets
from m2f.data.categories import Categories, Category
from m2f.data.coco_panoptic import coco_split_dir
from m2f.data.errors import DatasetError, DatasetFileNotFoundError
from m2f.data.image_io import read_image, read_json, read_label_png

IGNORE_LABEL = 255
_ADE_SPLITS = {"train": "training", "val": "validation"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class SemanticRecord:
    """One image and its label PNG."""

    image_id: int
    file_name: str
    image_path: Path
    label_path: Path


def _layout(root: Path, split: str) -> tuple[Path, Path]:
    ade = _ADE_SPLITS.get(split, split)
    if (root / "images" / ade).is_dir():
        return root / "images" / ade, root / "annotations" / ade
    name = coco_split_dir(split)
    if (root / name).is_dir():
        return root / name, root / "annotations" / f"semantic_{name}"
    raise DatasetFileNotFoundError(root, f"dataset folder not found: neither images/{ade}/ (ADE20K) nor "
                                         f"{name}/ (m2f synthetic) exists")


def _image_ids(stems: list[str]) -> list[int]:
    # ADE names end in a number ("ADE_train_00000001"); fall back to positions if they do not or collide.
    numbers = [re.search(r"(\d+)$", s) for s in stems]
    ids = [int(m.group(1)) if m else -1 for m in numbers]
    return ids if -1 not in ids and len(set(ids)) == len(ids) else list(range(len(stems)))


class ADE20KSemanticDataset(SegmentationDataset):
    """Semantic segmentation from label PNGs as a torch Dataset (task "semantic" only).

    Args:
        root: dataset root (ADEChallengeData2016 or an m2f synthetic root).
        split: "train" or "val" (or a folder name).
        task: must be "semantic".
        transforms: item -> item callable, or None.
        skip_bad: skip and record bad images instead of raising.
        num_classes: K when `root/categories.json` does not exist.
        image_dir: override of the image folder.
        label_dir: override of the label folder.

    Raises:
        DatasetError: missing folders; without skip_bad an image without a label PNG.
    """

    def __init__(self, *, root: str | Path, split: str = "train", task: str = "semantic",
                 transforms: Transform | None = None, skip_bad: bool = False, num_classes: int = 150,
                 image_dir: str | Path | None = None, label_dir: str | Path | None = None):
        super().__init__(transforms=transforms, skip_bad=skip_bad)
        check_task(task, ("semantic",))
        self.task = task
        root = Path(root)
        found_images, found_labels = (None, None) if image_dir and label_dir else _layout(root, split)
        self.image_dir = Path(image_dir) if image_dir else found_images
        self.label_dir = Path(label_dir) if label_dir else found_labels
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                raise DatasetFileNotFoundError(folder, "dataset folder not found")
        categories_file = root / "categories.json"
        if categories_file.is_file():
            self.categories = Categories.from_coco(read_json(categories_file, what="categories JSON"),
                                                   file=categories_file)
        else:
            self.categories = Categories([Category(id=c + 1, name=f"class_{c}", isthing=False)
                                          for c in range(num_classes)])
        images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        ids = _image_ids([p.stem for p in images])
        records = []
        for image_id, path in zip(ids, images):
            label_path = self.label_dir / f"{path.stem}.png"
            if not label_path.is_file():
                self.reject(DatasetFileNotFoundError(label_path, f"label PNG file not found for image {path.name}"))
                continue
            records.append(SemanticRecord(image_id=image_id, file_name=path.name, image_path=path,
                                          label_path=label_path))
        self.set_records(records, len(images))

    def label_map(self, index: int) -> np.ndarray:
        """(H, W) int64 class indices of image `index` at its original size, `IGNORE_LABEL` where the
        PNG has 0 (what semantic evaluation compares predictions with)."""
        record = self.records[index]
        raw = read_label_png(record.label_path)
        num_classes = self.categories.num_classes
        if raw.max(initial=0) > num_classes:
            raise DatasetError(record.label_path, f"label out of range: value {int(raw.max())} > {num_classes} "
                                                  f"(labels are 0 = ignore and 1..{num_classes})")
        return np.where(raw == 0, IGNORE_LABEL, raw.astype(np.int64) - 1)

    def load(self, index: int) -> Item:
        """Read image `index` and its label PNG into one mask per class present."""
        record = self.records[index]
        image = read_image(record.image_path)
        label_map = self.label_map(index)
        if label_map.shape != image.shape[:2]:
            raise DatasetError(record.label_path, f"size mismatch: label PNG is {label_map.shape[1]}x"
                                                  f"{label_map.shape[0]}, the image is {image.shape[1]}x{image.shape[0]}")
        labels, masks = semantic_targets(label_map, self.categories.num_classes)
        return make_item(image=image, image_id=record.image_id, file_name=record.file_name,
                         labels=labels, masks=masks)
