"""Batching: pad images to a common size divisible by the model's stride, keep targets per image."""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2f.data.base import Item


def collate(batch: list[Item], size_divisibility: int = 32) -> tuple[Tensor, list[dict[str, Tensor]], list[dict[str, Any]]]:
    """Stack dataset items into a padded batch.

    Use `functools.partial(collate, size_divisibility=512)` for the ADE20K recipe. Padding is at
    the bottom/right, 0 in the image and False in every mask, so it never belongs to an object.

    Args:
        batch: B items (image (3, H_i, W_i) uint8, labels (G_i,), masks (G_i, H_i, W_i) bool, ...).
        size_divisibility: Hp and Wp are the largest H_i, W_i rounded up to a multiple of this
            (1 or 0 = no rounding).

    Returns:
        images: (B, 3, Hp, Wp) uint8.
        targets: B dicts {"labels": (G_i,) int64, "masks": (G_i, Hp, Wp) bool}.
        metas: B dicts {"image_id", "file_name", "height", "width" (original size), "image_size"
            ((H_i, W_i) before padding), "skipped" (list of (file, problem), usually empty)}.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    height = max(item["image"].shape[-2] for item in batch)
    width = max(item["image"].shape[-1] for item in batch)
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    images = torch.zeros((len(batch), 3, height, width), dtype=torch.uint8)
    targets, metas = [], []
    for b, item in enumerate(batch):
        h, w = item["image"].shape[-2:]
        images[b, :, :h, :w] = item["image"]
        masks = F.pad(item["masks"], (0, width - w, 0, height - h), value=False)
        targets.append({"labels": item["labels"], "masks": masks})
        metas.append({"image_id": item["image_id"], "file_name": item["file_name"], "height": item["height"],
                      "width": item["width"], "image_size": (h, w), "skipped": list(item.get("skipped", []))})
    return images, targets, metas
