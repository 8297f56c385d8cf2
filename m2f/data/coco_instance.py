"""COCO instance loader: instances JSON (polygons / RLE) -> one mask per non-crowd object.

Layout under `root`: `{split}2017/<image>` and `annotations/instances_{split}2017.json`. Labels
index the JSON's categories sorted by id (all of them are things in an instances file). Polygons
are rasterised with pycocotools (coordinates outside the image are clipped); polygons with fewer
than 3 points are dropped, and an object left without any area is dropped and counted in
`num_empty_objects`. Images without objects are kept (G = 0) unless `filter_empty`.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m2f.data.base import Item, SegmentationDataset, Transform, check_task, make_item
from m2f.data.categories import Categories
from m2f.data.coco_panoptic import check_image_size, coco_split_dir
from m2f.data.errors import DatasetError
from m2f.data.image_io import missing_file, read_image, read_json, require_keys
from m2f.data.mask_codec import decode_segmentation

logger = logging.getLogger("m2f.data")


@dataclass(frozen=True)
class InstanceRecord:
    """One image of a COCO instances file; `objects` holds (annotation id, category id, segmentation)."""

    image_id: int
    file_name: str
    image_path: Path
    height: int
    width: int
    objects: tuple[tuple[int, int, Any], ...]


class COCOInstanceDataset(SegmentationDataset):
    """COCO instance segmentation as a torch Dataset (task "instance" only).

    Args:
        root: dataset root (holds `{split}2017/` and `annotations/`).
        split: "train", "val" or a folder name such as "val2017".
        task: must be "instance".
        transforms: item -> item callable, or None.
        skip_bad: skip and record bad images instead of raising.
        filter_empty: leave out images without non-crowd objects (recorded in `skipped`).
        json_file: override of the instances JSON path.
        image_dir: override of the image folder.

    Raises:
        DatasetError: the JSON is missing, not JSON or not COCO; without skip_bad also an
            annotation with an unknown image or category, a bad segmentation, a missing image.
    """

    def __init__(self, *, root: str | Path, split: str = "train", task: str = "instance",
                 transforms: Transform | None = None, skip_bad: bool = False, filter_empty: bool = False,
                 json_file: str | Path | None = None, image_dir: str | Path | None = None):
        super().__init__(transforms=transforms, skip_bad=skip_bad)
        self.task = check_task(task, ("instance",))
        root = Path(root)
        name = coco_split_dir(split)
        self.json_file = Path(json_file) if json_file else root / "annotations" / f"instances_{name}.json"
        self.image_dir = Path(image_dir) if image_dir else root / name
        self.num_empty_objects = 0
        data = read_json(self.json_file, what="instances JSON")
        require_keys(data, ("images", "annotations", "categories"), file=self.json_file, where="the top level")
        self.categories = Categories.from_coco(data["categories"], file=self.json_file, default_isthing=True)
        for key in ("images", "annotations"):
            if not isinstance(data[key], list):
                raise DatasetError(self.json_file, f"not a COCO file: {key!r} must be a list")
        objects: dict[Any, list[tuple[int, int, Any]]] = {}
        bad_images: dict[Any, DatasetError] = {}
        image_ids = set()
        for k, entry in enumerate(data["images"]):
            require_keys(entry, ("id", "file_name", "height", "width"), file=self.json_file, where=f"images[{k}]")
            image_ids.add(entry["id"])
        for k, ann in enumerate(data["annotations"]):
            require_keys(ann, ("image_id", "category_id", "segmentation"), file=self.json_file,
                         where=f"annotations[{k}]")
            if ann["image_id"] not in image_ids:
                raise DatasetError(self.json_file, f"unknown image: annotations[{k}] has image_id "
                                                   f"{ann['image_id']!r}, which is not in 'images'")
            if ann["category_id"] not in self.categories:
                bad_images.setdefault(ann["image_id"], DatasetError(
                    self.json_file, f"unknown category: annotations[{k}] (id {ann.get('id')}) has category_id "
                                    f"{ann['category_id']!r}; known ids {self.categories.ids}"))
            elif not ann.get("iscrowd", 0):
                objects.setdefault(ann["image_id"], []).append((ann.get("id", k), ann["category_id"],
                                                                ann["segmentation"]))
        records = []
        for entry in data["images"]:
            image_path = self.image_dir / entry["file_name"]
            error = bad_images.get(entry["id"])
            if error is None and not image_path.is_file():
                error = missing_file(image_path, "image")
            if error is not None:
                self.reject(error)
                continue
            found = tuple(objects.get(entry["id"], ()))
            if filter_empty and not found:
                self.skipped.append((str(entry["file_name"]), "empty image: no non-crowd objects"))
                continue
            records.append(InstanceRecord(image_id=int(entry["id"]), file_name=str(entry["file_name"]),
                                          image_path=image_path, height=int(entry["height"]),
                                          width=int(entry["width"]), objects=found))
        self.set_records(records, len(data["images"]))

    def load(self, index: int) -> Item:
        """Read image `index` and rasterise its objects."""
        record = self.records[index]
        image = read_image(record.image_path)
        check_image_size(record.image_path, image, record.height, record.width)
        labels, masks = [], []
        for ann_id, category_id, segmentation in record.objects:
            try:
                mask = decode_segmentation(segmentation, record.height, record.width)
            except ValueError as err:
                raise DatasetError(self.json_file, f"bad segmentation: annotation {ann_id} of "
                                                   f"{record.file_name}: {err}") from err
            if not mask.any():
                self.num_empty_objects += 1
                logger.debug("annotation %s of %s has an empty mask; dropped", ann_id, record.file_name)
                continue
            labels.append(self.categories.index(category_id))
            masks.append(mask)
        stacked = np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), dtype=bool)
        return make_item(image=image, image_id=record.image_id, file_name=record.file_name,
                         labels=labels, masks=stacked)
