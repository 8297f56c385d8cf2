"""COCO panoptic loader: panoptic JSON + PNGs, as panoptic, instance or semantic targets.

Layout under `root` (COCO 2017, also what `m2f.data.synthetic.generate` writes):
`{split}2017/<image>`, `annotations/panoptic_{split}2017.json`, `annotations/panoptic_{split}2017/<png>`.
Targets per task (crowd segments never become targets; their pixels are in no mask):
- "panoptic": one mask per segment, labels index all categories;
- "instance": one mask per thing segment, labels index the thing categories only;
- "semantic": one mask per category present (its segments merged), labels index all categories.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from m2f.data.base import Item, SegmentationDataset, Transform, check_task, make_item, masks_from_ids
from m2f.data.categories import Categories
from m2f.data.errors import DatasetError
from m2f.data.image_io import missing_file, read_image, read_json, read_panoptic_png, require_keys


def coco_split_dir(split: str) -> str:
    """COCO folder name of a split: "train" -> "train2017"; names ending in a year are kept."""
    return split if split[-4:].isdigit() else f"{split}2017"


def check_image_size(file: str | Path, image: np.ndarray, height: Any, width: Any) -> None:
    """Raise DatasetError if an annotation file's height/width (when given) differ from the image's."""
    if height is not None and width is not None and (int(height), int(width)) != image.shape[:2]:
        raise DatasetError(file, f"size mismatch: the annotations say {width}x{height}, "
                                 f"the image is {image.shape[1]}x{image.shape[0]} (width x height)")


@dataclass(frozen=True)
class PanopticRecord:
    """One image of a COCO panoptic file; `segments` holds (segment id, category id) of non-crowd segments."""

    image_id: int
    file_name: str
    image_path: Path
    png_path: Path
    height: int | None
    width: int | None
    segments: tuple[tuple[int, int], ...]


class COCOPanopticDataset(SegmentationDataset):
    """COCO panoptic segmentation as a torch Dataset.

    Args:
        root: dataset root (holds `{split}2017/` and `annotations/`).
        split: "train", "val" or a folder name such as "val2017".
        task: "panoptic", "instance" or "semantic" (see the module docstring).
        transforms: item -> item callable, or None.
        skip_bad: skip and record bad images instead of raising (see `SegmentationDataset`).
        filter_empty: leave out images with no target for `task` (the original's
            FILTER_EMPTY_ANNOTATIONS, meant for training); they are recorded in `skipped`.
        json_file: override of the panoptic JSON path.
        image_dir: override of the image folder.
        panoptic_dir: override of the panoptic PNG folder.

    Raises:
        DatasetError: the JSON is missing, not JSON, not COCO panoptic, or (without skip_bad) an
            annotation refers to an unknown image or category or a missing file.
    """

    def __init__(self, *, root: str | Path, split: str = "train", task: str = "panoptic",
                 transforms: Transform | None = None, skip_bad: bool = False, filter_empty: bool = False,
                 json_file: str | Path | None = None, image_dir: str | Path | None = None,
                 panoptic_dir: str | Path | None = None):
        super().__init__(transforms=transforms, skip_bad=skip_bad)
        self.task = check_task(task)
        root = Path(root)
        name = coco_split_dir(split)
        self.json_file = Path(json_file) if json_file else root / "annotations" / f"panoptic_{name}.json"
        self.image_dir = Path(image_dir) if image_dir else root / name
        self.panoptic_dir = Path(panoptic_dir) if panoptic_dir else root / "annotations" / f"panoptic_{name}"
        data = read_json(self.json_file, what="panoptic JSON")
        require_keys(data, ("images", "annotations", "categories"), file=self.json_file, where="the top level")
        self.all_categories = Categories.from_coco(data["categories"], file=self.json_file)
        self.categories = self.all_categories.things() if task == "instance" else self.all_categories
        images = self._parse_images(data["images"])
        if not isinstance(data["annotations"], list):
            raise DatasetError(self.json_file, "not a COCO file: 'annotations' must be a list")
        records = []
        for k, ann in enumerate(data["annotations"]):
            try:
                record = self._parse_annotation(ann, k, images)
            except DatasetError as err:
                self.reject(err)
                continue
            if filter_empty and not record.segments:
                self.skipped.append((record.file_name, f"empty image: no non-crowd {task} segments"))
                continue
            records.append(record)
        self.set_records(records, len(data["annotations"]))

    def _parse_images(self, entries: Any) -> dict[int, dict[str, Any]]:
        if not isinstance(entries, list):
            raise DatasetError(self.json_file, "not a COCO file: 'images' must be a list")
        images = {}
        for k, entry in enumerate(entries):
            require_keys(entry, ("id", "file_name"), file=self.json_file, where=f"images[{k}]")
            images[entry["id"]] = entry
        return images

    def _parse_annotation(self, ann: Any, k: int, images: dict[int, dict[str, Any]]) -> PanopticRecord:
        require_keys(ann, ("image_id", "file_name", "segments_info"), file=self.json_file, where=f"annotations[{k}]")
        image = images.get(ann["image_id"])
        if image is None:
            raise DatasetError(self.json_file, f"unknown image: annotations[{k}] has image_id {ann['image_id']!r}, "
                                               "which is not in 'images'")
        image_path = self.image_dir / image["file_name"]
        png_path = self.panoptic_dir / ann["file_name"]
        for path, what in ((image_path, "image"), (png_path, "panoptic PNG")):
            if not path.is_file():
                raise missing_file(path, what)
        segments = []
        for j, seg in enumerate(ann["segments_info"]):
            require_keys(seg, ("id", "category_id"), file=self.json_file, where=f"annotations[{k}].segments_info[{j}]")
            if seg["category_id"] not in self.all_categories:
                raise DatasetError(self.json_file, f"unknown category: segment {seg['id']} of {ann['file_name']} has "
                                                   f"category_id {seg['category_id']!r}; known ids "
                                                   f"{self.all_categories.ids}")
            thing = self.all_categories.categories[self.all_categories.index(seg["category_id"])].isthing
            if not seg.get("iscrowd", 0) and (thing or self.task != "instance"):
                segments.append((int(seg["id"]), int(seg["category_id"])))
        return PanopticRecord(image_id=int(image["id"]), file_name=str(image["file_name"]), image_path=image_path,
                              png_path=png_path, height=image.get("height"), width=image.get("width"),
                              segments=tuple(segments))

    def load(self, index: int) -> Item:
        """Read image `index` and its panoptic PNG into an item of the chosen task."""
        record = self.records[index]
        image = read_image(record.image_path)
        check_image_size(record.image_path, image, record.height, record.width)
        ids = read_panoptic_png(record.png_path)
        if ids.shape != image.shape[:2]:
            raise DatasetError(record.png_path, f"size mismatch: panoptic PNG is {ids.shape[1]}x{ids.shape[0]}, "
                                                f"the image is {image.shape[1]}x{image.shape[0]}")
        if self.task == "semantic":
            # Class c's mask is the union of its segments: map segment ids to class indices first.
            by_class: dict[int, list[int]] = {}
            for seg_id, cat_id in self.records[index].segments:
                by_class.setdefault(self.categories.index(cat_id), []).append(seg_id)
            labels = sorted(by_class)
            masks = np.stack([np.isin(ids, by_class[c]) for c in labels]) if labels else masks_from_ids(ids, [])
        else:
            labels = [self.categories.index(cat_id) for _, cat_id in record.segments]
            masks = masks_from_ids(ids, [seg_id for seg_id, _ in record.segments])
        keep = masks.any(axis=(1, 2))  # a listed segment may have no pixels
        if record.segments and not keep.any() and ids.any():
            # Not an empty image: the PNG and segments_info disagree (a PNG of another image, or re-numbered ids).
            raise DatasetError(record.png_path, f"segments_info ids mismatch: none of the ids in segments_info "
                                                f"({sorted(seg_id for seg_id, _ in record.segments)[:5]}...) occurs "
                                                f"in the PNG (its ids: {np.unique(ids[ids > 0])[:5].tolist()}...)")
        return make_item(image=image, image_id=record.image_id, file_name=record.file_name,
                         labels=np.asarray(labels, dtype=np.int64)[keep], masks=masks[keep])
