"""The dataset base class: item layout, transforms, and bad-input handling shared by all loaders.

A dataset item is one image with its training target (CONVENTIONS.md):
`{"image": uint8 (3, H, W) RGB, "image_id": int, "file_name": str, "height": int, "width": int,
"labels": int64 (G,), "masks": bool (G, H, W)}`; height and width are the original size, H and W
the size after transforms. An item whose loading skipped bad images also has `"skipped": [(file,
problem), ...]`, so a training loop can count skips that happened inside DataLoader workers.
"""

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from m2f.data.categories import Categories
from m2f.data.errors import DatasetError, skip_summary

Item = dict[str, Any]
Transform = Callable[[Item], Item]
TASKS = ("panoptic", "instance", "semantic")

logger = logging.getLogger("m2f.data")


def check_task(task: str, allowed: Sequence[str] = TASKS) -> str:
    """Return `task` if it is one of `allowed`, else raise ValueError naming the choices."""
    if task not in allowed:
        raise ValueError(f"unknown task {task!r}; this dataset supports {list(allowed)}")
    return task


def make_item(*, image: np.ndarray, image_id: int, file_name: str, labels: Sequence[int],
              masks: np.ndarray) -> Item:
    """Build a dataset item from numpy arrays.

    Args:
        image: (H, W, 3) uint8 RGB.
        image_id: the dataset's image id.
        file_name: image file name as the annotation file gives it.
        labels: G contiguous class indices.
        masks: (G, H, W) bool.

    Returns:
        The item dict with torch tensors (image (3, H, W) uint8, labels (G,) int64, masks (G, H, W) bool).
    """
    height, width = image.shape[:2]
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "image_id": int(image_id),
        "file_name": file_name,
        "height": height,
        "width": width,
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
        "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=bool).reshape(-1, height, width)),
    }


def masks_from_ids(ids: np.ndarray, segment_ids: Sequence[int]) -> np.ndarray:
    """One (H, W) bool mask per segment id: (G, H, W) with masks[g] = (ids == segment_ids[g])."""
    return ids[None] == np.asarray(segment_ids, dtype=ids.dtype).reshape(len(segment_ids), 1, 1)


def semantic_targets(label_map: np.ndarray, num_classes: int) -> tuple[list[int], np.ndarray]:
    """One mask per class present in a contiguous label map; 255 (ignore) is in no mask.

    Args:
        label_map: (H, W) contiguous class indices, 255 = ignore.
        num_classes: K; other values than [0, K) and 255 must have been rejected before.

    Returns:
        (labels, masks): sorted class indices present, and (G, H, W) bool masks.
    """
    present = [int(c) for c in np.unique(label_map) if c < num_classes and c != 255]
    return present, masks_from_ids(label_map, present)


class SegmentationDataset(Dataset):
    """Base of all loaders: subclasses fill `records`, set `categories`, and implement `load`.

    Args:
        transforms: callable item -> item applied after loading (see `m2f.data.transforms`), or None.
        skip_bad: False raises `DatasetError` on the first bad image. True records `(file, problem)`
            in `skipped`, logs a warning, and returns the next good image instead (DataLoader workers
            record in their own copy; the returned item's "skipped" field carries the news back).

    Attributes:
        categories: the label space of the targets (class index k = position by category id).
        skipped: `(file, problem)` pairs for images left out, at construction and while loading.
    """

    def __init__(self, *, transforms: Transform | None, skip_bad: bool):
        self.transforms = transforms
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = []
        self.records: list[Any] = []
        self.categories: Categories
        self._num_listed = 0
        self._bad: set[int] = set()

    def load(self, index: int) -> Item:
        """Read record `index` into an untransformed item; raise `DatasetError` on bad input."""
        raise NotImplementedError

    def reject(self, error: DatasetError) -> None:
        """Raise `error`, or record and log it when skipping bad input."""
        if not self.skip_bad:
            raise error
        logger.warning("skipping %s", error)
        self.skipped.append((error.file, error.problem))

    def set_records(self, records: list[Any], num_listed: int) -> None:
        """Install the usable records; `num_listed` counts the images the annotations listed."""
        self.records = records
        self._num_listed = num_listed

    def skip_summary(self, also: Sequence[tuple[str, str]] = ()) -> str:
        """E.g. "skipped 3 of 1000 images: image file not found (2), ...": this process's record plus
        `also`, the pairs DataLoader workers reported in the items' "skipped" field."""
        return skip_summary([*self.skipped, *also], self._num_listed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.records)} images")
        skipped_here = []
        for step in range(len(self.records)):
            current = (index + step) % len(self.records)
            if current in self._bad:
                continue
            try:
                item = self.load(current)
                break
            except DatasetError as err:
                self.reject(err)
                self._bad.add(current)
                skipped_here.append((err.file, err.problem))
        else:
            raise DatasetError(type(self).__name__, f"no loadable image: all {len(self.records)} images failed")
        if self.transforms is not None:
            item = self.transforms(item)
        if skipped_here:
            item["skipped"] = skipped_here
        return item
