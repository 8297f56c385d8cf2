"""`predict`: images in, typed per-image results out (segments with category, name, thing flag, score, mask).

The model sees each image as the original's test-time pipeline does: resized so its shortest edge is
`data.test_size` (longest at most `data.test_max_size`) of the model's config, and the results are at
the image's own size. Post-processing is `m2f.postprocess`, with the thresholds of `test` (default the
model's `config.test`, else the paper's).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from m2f.data.categories import Categories, Category
from m2f.postprocess import Task, postprocess

ImageLike = Tensor | np.ndarray | str | Path


@dataclass(frozen=True)
class Segment:
    """One predicted segment of an image.

    Args:
        id: the segment's id: its value in `Prediction.panoptic_seg` (panoptic), its rank + 1 by score
            (instance), or its class index + 1 (semantic).
        category_id: the dataset's category id (COCO ids are not contiguous; see `m2f.data.categories`).
        name: the category's name.
        isthing: thing (countable instance) or stuff (amorphous region).
        score: panoptic: the class probability of the segment's query; instance: class probability x mask
            score (the original's ranking score); semantic: the mean per-pixel score of the class over
            the segment.
        mask: (H, W) bool at the image's own size.
        color: RGB colour of the category (for drawing).
    """

    id: int
    category_id: int
    name: str
    isthing: bool
    score: float
    mask: np.ndarray = field(repr=False)
    color: tuple[int, int, int] = (0, 0, 0)

    @property
    def area(self) -> int:
        """Pixels in the mask."""
        return int(self.mask.sum())


@dataclass(frozen=True)
class Prediction:
    """The result of one image for one task.

    Args:
        task: "panoptic", "instance" or "semantic".
        image_size: (H, W) of the image (and of every mask).
        segments: panoptic: in segment-id order; instance: by descending score (all top-k, low scores
            included: filter on `score`); semantic: one per class present, by class index.
        panoptic_seg: (H, W) int32 segment ids, 0 = no segment (panoptic only).
        semantic_seg: (H, W) int64 class indices (semantic only).
    """

    task: str
    image_size: tuple[int, int]
    segments: list[Segment]
    panoptic_seg: np.ndarray | None = field(default=None, repr=False)
    semantic_seg: np.ndarray | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        names = ", ".join(f"{s.name} {s.score:.2f}" for s in self.segments[:8])
        more = f", ... ({len(self.segments)})" if len(self.segments) > 8 else ""
        return f"Prediction({self.task}, {self.image_size[0]}x{self.image_size[1]}: {names}{more})"


def as_image_tensor(image: ImageLike) -> Tensor:
    """An image as (3, H, W) uint8 RGB: a (3, H, W) tensor as it is, an (H, W, 3) array, or a file
    (read by `m2f.predict.files.read_input`: any mode converted to RGB, EXIF orientation applied)."""
    if isinstance(image, str | Path):
        from m2f.predict.files import read_input

        image = read_input(image)[0]
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be (H, W, 3) RGB, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"an image tensor must be (3, H, W) RGB, got shape {tuple(image.shape)}")
    return image


def _test_resize(image: Tensor, cfg: Any) -> Tensor:
    if cfg is None:
        return image
    from m2f.data.transforms import build_test_transforms

    h, w = image.shape[-2:]
    item = {"image": image, "masks": torch.zeros((0, h, w), dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.long)}
    return build_test_transforms(size=cfg.data.test_size, max_size=cfg.data.test_max_size)(item)["image"]


def _default_categories(model: torch.nn.Module) -> Categories:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        from m2f.data.metadata import categories_for

        return categories_for(cfg)
    num_classes = model.transformer_decoder.class_embed.out_features - 1
    return Categories([Category(id=k + 1, name=f"class_{k}", isthing=True) for k in range(num_classes)])


def predict(model: torch.nn.Module, images: Sequence[ImageLike], *, task: Task,
            categories: Categories | None = None, test: Any = None, resize: bool = True) -> list[Prediction]:
    """Segments images with one forward pass of the model over the batch.

    On the CPU at full size, `m2f.allocator.keep_freed_memory()` once per process makes it ~1.2x faster
    (`m2f predict` does it), for more peak memory.

    Args:
        model: a Mask2Former (e.g. from `m2f.load_pretrained` or `m2f.predict.load_weights`).
        images: (3, H, W) uint8 tensors, (H, W, 3) uint8 arrays or image files, any sizes.
        task: "panoptic", "instance" or "semantic".
        categories: the model's K classes (default: from `model.config`, see `m2f.data.metadata`).
        test: a `TestConfig` for the thresholds (default `model.config.test`, else the paper's).
        resize: resize to the config's test size first (as the original's test pipeline); results are at
            each image's own size either way.

    Returns:
        One `Prediction` per image.
    """
    from m2f.config import TestConfig
    from m2f.inference import _task_options

    cfg = getattr(model, "config", None)
    categories = categories or _default_categories(model)
    test = test or (cfg.test if cfg is not None else TestConfig())
    originals = [as_image_tensor(im) for im in images]
    inputs = [_test_resize(im, cfg) if resize else im for im in originals]
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model([im.to(device) for im in inputs], intermediate=False)  # the final prediction set only
    options = _task_options(task, categories.isthing, test)
    if task == "semantic":
        options["return_scores"] = True  # for each segment's score
    sizes = [tuple(im.shape[-2:]) for im in originals]
    results = postprocess(out, task=task, image_sizes=[tuple(im.shape[-2:]) for im in inputs], output_sizes=sizes,
                          **options)
    return [_prediction(task, result, size, categories) for result, size in zip(results, sizes)]


def _segment(category: Category, *, id: int, score: float, mask: Tensor) -> Segment:
    return Segment(id=id, category_id=category.id, name=category.name, isthing=category.isthing, score=score,
                   mask=mask.cpu().numpy(), color=category.color)


def _prediction(task: str, result: Any, size: tuple[int, int], categories: Categories) -> Prediction:
    cats = categories.categories
    if task == "panoptic":
        seg = result["panoptic_seg"]
        segments = [_segment(cats[s["category_id"]], id=s["id"], score=s["score"], mask=seg == s["id"])
                    for s in result["segments_info"]]
        return Prediction(task, size, segments, panoptic_seg=seg.cpu().numpy())
    if task == "instance":
        order = result["scores"].argsort(descending=True, stable=True)
        segments = [_segment(cats[int(result["labels"][i])], id=rank + 1, score=float(result["scores"][i]),
                             mask=result["masks"][i]) for rank, i in enumerate(order.tolist())]
        return Prediction(task, size, segments)
    best, labels = result.max(0)
    segments = []
    for k in labels.unique().tolist():
        mask = labels == k
        segments.append(_segment(cats[k], id=k + 1, score=float(best[mask].mean()), mask=mask))
    return Prediction(task, size, segments, semantic_seg=labels.cpu().numpy())
