"""Cityscapes loader from its standard folders, for semantic, instance and panoptic targets.

Layout under `root`: `leftImg8bit/{split}/{city}/{name}_leftImg8bit.png`,
`gtFine/{split}/{city}/{name}_gtFine_labelIds.png` and `..._gtFine_instanceIds.png`.
The 19 evaluated classes (train ids 0..18) are the categories, with their Cityscapes label ids as
category ids, so sorting by id gives the train id order; the 8 thing classes (person .. bicycle,
train ids 11..18) form the instance label space. Pixels of any other label id are ignored.
instanceIds hold label_id * 1000 + k for individual objects and the bare label id elsewhere; thing
pixels without an instance number (groups such as "cargroup") are crowd: in no target mask.
Panoptic targets are derived from these two PNGs (one segment per stuff class present plus one per
object), not read from the cityscapesScripts panoptic JSON.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m2f.data.base import Item, SegmentationDataset, Transform, check_task, make_item, semantic_targets
from m2f.data.categories import Categories, Category
from m2f.data.errors import DatasetError, DatasetFileNotFoundError
from m2f.data.image_io import read_image, read_label_png

# (label id, name, is thing, RGB) of the 19 train-id classes, from cityscapesScripts' labels table.
CITYSCAPES_CLASSES = (
    (7, "road", False, (128, 64, 128)), (8, "sidewalk", False, (244, 35, 232)),
    (11, "building", False, (70, 70, 70)), (12, "wall", False, (102, 102, 156)),
    (13, "fence", False, (190, 153, 153)), (17, "pole", False, (153, 153, 153)),
    (19, "traffic light", False, (250, 170, 30)), (20, "traffic sign", False, (220, 220, 0)),
    (21, "vegetation", False, (107, 142, 35)), (22, "terrain", False, (152, 251, 152)),
    (23, "sky", False, (70, 130, 180)), (24, "person", True, (220, 20, 60)),
    (25, "rider", True, (255, 0, 0)), (26, "car", True, (0, 0, 142)), (27, "truck", True, (0, 0, 70)),
    (28, "bus", True, (0, 60, 100)), (31, "train", True, (0, 80, 100)),
    (32, "motorcycle", True, (0, 0, 230)), (33, "bicycle", True, (119, 11, 32)),
)
IGNORE_LABEL = 255
_IMAGE_SUFFIX = "_leftImg8bit.png"


def cityscapes_categories() -> Categories:
    """The 19 evaluated Cityscapes classes (index = train id)."""
    return Categories([Category(id=i, name=n, isthing=t, supercategory="thing" if t else "stuff", color=c)
                       for i, n, t, c in CITYSCAPES_CLASSES])


@dataclass(frozen=True)
class CityscapesRecord:
    """One image and its two ground-truth PNGs."""

    image_id: int
    file_name: str
    image_path: Path
    label_path: Path
    instance_path: Path


class CityscapesDataset(SegmentationDataset):
    """Cityscapes fine annotations as a torch Dataset.

    Args:
        root: dataset root (holds `leftImg8bit/` and `gtFine/`).
        split: "train", "val" or "test".
        task: "semantic" (19 classes), "instance" (8 thing classes) or "panoptic" (19 classes).
        transforms: item -> item callable, or None.
        skip_bad: skip and record bad images instead of raising.

    Raises:
        DatasetError: a missing split folder; without skip_bad an image whose ground truth is missing.
    """

    def __init__(self, *, root: str | Path, split: str = "train", task: str = "semantic",
                 transforms: Transform | None = None, skip_bad: bool = False):
        super().__init__(transforms=transforms, skip_bad=skip_bad)
        self.task = check_task(task)
        root = Path(root)
        image_root = root / "leftImg8bit" / split
        if not image_root.is_dir():
            raise DatasetFileNotFoundError(image_root, "dataset folder not found")
        all_categories = cityscapes_categories()
        self.categories = all_categories.things() if task == "instance" else all_categories
        # Lookup tables from a label id (0..255) to the class index of the targets (255 = none).
        self._train_id = np.full(256, IGNORE_LABEL, dtype=np.int64)
        self._train_id[all_categories.ids] = np.arange(all_categories.num_classes)
        self._is_thing = np.zeros(256, dtype=bool)
        self._is_thing[all_categories.things().ids] = True
        self._thing_index = np.full(256, IGNORE_LABEL, dtype=np.int64)
        self._thing_index[all_categories.things().ids] = np.arange(all_categories.things().num_classes)
        images = sorted(image_root.glob(f"*/*{_IMAGE_SUFFIX}"))
        records = []
        for image_id, path in enumerate(images):
            stem = path.name[: -len(_IMAGE_SUFFIX)]
            gt_dir = root / "gtFine" / split / path.parent.name
            record = CityscapesRecord(image_id=image_id, file_name=f"{path.parent.name}/{path.name}",
                                      image_path=path, label_path=gt_dir / f"{stem}_gtFine_labelIds.png",
                                      instance_path=gt_dir / f"{stem}_gtFine_instanceIds.png")
            needed = [record.label_path] if task == "semantic" else [record.label_path, record.instance_path]
            missing = [p for p in needed if not p.is_file()]
            if missing:
                self.reject(DatasetFileNotFoundError(missing[0], f"ground-truth file not found for {path.name}"))
                continue
            records.append(record)
        self.set_records(records, len(images))

    def _read_gt(self, path: Path, image: np.ndarray) -> np.ndarray:
        values = read_label_png(path, what="ground-truth PNG").astype(np.int64)
        if values.shape != image.shape[:2]:
            raise DatasetError(path, f"size mismatch: ground truth is {values.shape[1]}x{values.shape[0]}, "
                                     f"the image is {image.shape[1]}x{image.shape[0]}")
        if values.min(initial=0) < 0:
            raise DatasetError(path, "bad ground truth: negative values")
        return values

    def load(self, index: int) -> Item:
        """Read image `index` and derive the targets of the chosen task."""
        record = self.records[index]
        image = read_image(record.image_path)
        label_ids = self._read_gt(record.label_path, image)
        if label_ids.max(initial=0) > 255:
            raise DatasetError(record.label_path, "bad ground truth: labelIds above 255")
        labels: list[int] = []
        masks = []
        if self.task in ("semantic", "panoptic"):
            train_ids = self._train_id[label_ids]
            if self.task == "panoptic":
                train_ids[self._is_thing[label_ids]] = IGNORE_LABEL  # things come from instanceIds
            labels, stuff = semantic_targets(train_ids, self.categories.num_classes)
            masks = list(stuff)
        if self.task in ("instance", "panoptic"):
            instance_ids = self._read_gt(record.instance_path, image)
            objects = [int(v) for v in np.unique(instance_ids) if v >= 1000 and v // 1000 < 256
                       and self._is_thing[v // 1000]]
            lookup = self._thing_index if self.task == "instance" else self._train_id
            labels = [*labels, *(int(lookup[v // 1000]) for v in objects)]
            masks += [instance_ids == v for v in objects]
        stacked = np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), dtype=bool)
        return make_item(image=image, image_id=record.image_id, file_name=record.file_name,
                         labels=labels, masks=stacked)
