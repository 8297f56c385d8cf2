"""Training and test transforms acting on the image and its masks together.

Every transform maps an item to an item: `t(item, generator=None)` reads and replaces "image"
(uint8 (3, H, W)), "masks" (bool (G, H, W)) and "labels" (G,); other keys pass through. Randomness
comes from `generator` (a torch.Generator) or, when None, torch's global RNG (which a DataLoader
seeds per worker), so a fixed generator gives a fixed result.

Geometry follows the original: images are resized bilinearly (antialiased, half-pixel centres),
masks by nearest neighbour on the same pixel centres, so they stay aligned. Masks that lose all
their pixels to a crop are dropped with their labels; padding is never part of any mask.

Pipelines (`build_train_transforms`):
- "lsj" (COCO panoptic/instance): horizontal flip, then large-scale jitter: scale the image so it
  fits a square of side image_size * U(min_scale, max_scale) keeping the aspect ratio, random crop to
  image_size, pad to image_size x image_size (image with 128, as detectron2, masks with False).
- "semantic_crop" (ADE20K): resize the shortest edge to int(x * 0.1 * crop) for x = 5..20 (256..1024
  for crop 512) with max size 4 * crop, random crop of at most crop x crop, SSD colour augmentation,
  horizontal flip.
Test (`build_test_transforms`): resize the shortest edge to `size`, longest edge at most `max_size`.
"""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from m2f.data.base import TASKS, Item


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _chance(prob: float, generator: torch.Generator | None) -> bool:
    return torch.rand((), generator=generator).item() < prob


def _nearest_index(in_size: int, out_size: int, start: int, length: int) -> Tensor:
    # Output pixel i of an in_size -> out_size resize reads source pixel floor((i + 0.5) * in / out):
    # the nearest neighbour of its centre, matching bilinear resizing's half-pixel convention.
    centres = torch.arange(start, start + length, dtype=torch.float64) + 0.5
    return (centres * (in_size / out_size)).floor().long().clamp_(max=in_size - 1)


def resize_crop(item: Item, *, size: tuple[int, int], window: tuple[int, int, int, int],
                pad_to: tuple[int, int] | None = None, pad_value: int = 0) -> Item:
    """Resize an item to `size`, keep `window` of the result, optionally pad bottom/right.

    Masks are resampled only inside the window, so scaling up before a crop costs no memory.

    Args:
        item: dataset item (image (3, H, W) uint8, masks (G, H, W) bool, labels (G,)).
        size: (height, width) after resizing.
        window: (top, left, height, width) in the resized frame, inside it.
        pad_to: (height, width) >= the window's; the image is padded with `pad_value`, masks with False.
        pad_value: image fill value of the padding.

    Returns:
        A new item with G' <= G masks (empty ones dropped).
    """
    image, masks = item["image"], item["masks"]
    in_h, in_w = image.shape[-2:]
    top, left, crop_h, crop_w = window
    if size != (in_h, in_w):
        resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                                antialias=True)[0]
        image = resized.round_().clamp_(0, 255).to(torch.uint8)
    image = image[:, top:top + crop_h, left:left + crop_w]
    masks = masks.index_select(1, _nearest_index(in_h, size[0], top, crop_h))
    masks = masks.index_select(2, _nearest_index(in_w, size[1], left, crop_w))
    if pad_to is not None:
        pad = (0, pad_to[1] - crop_w, 0, pad_to[0] - crop_h)
        image = F.pad(image, pad, value=pad_value)
        masks = F.pad(masks, pad, value=False)
    keep = masks.flatten(1).any(1)
    return {**item, "image": image.contiguous(), "masks": masks[keep], "labels": item["labels"][keep]}


def _shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    scale = short / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


class Compose:
    """Apply transforms in order, sharing one generator.

    Args:
        transforms: item -> item transforms.
    """

    def __init__(self, *, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, item: Item, generator: torch.Generator | None = None) -> Item:
        for t in self.transforms:
            item = t(item, generator)
        return item

    def __repr__(self) -> str:
        return f"Compose({', '.join(repr(t) for t in self.transforms)})"


class RandomHorizontalFlip:
    """Mirror image and masks left-right with probability `prob`.

    Args:
        prob: flip probability.
    """

    def __init__(self, *, prob: float = 0.5):
        self.prob = prob

    def __call__(self, item: Item, generator: torch.Generator | None = None) -> Item:
        if not _chance(self.prob, generator):
            return item
        return {**item, "image": item["image"].flip(-1), "masks": item["masks"].flip(-1)}

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(prob={self.prob})"


class LargeScaleJitter:
    """Large-scale jitter (ResizeScale + FixedSizeCrop of the original): output image_size x image_size.

    Args:
        image_size: side of the square output.
        min_scale: smallest scale of the target square (0.1 in the paper).
        max_scale: largest scale (2.0 in the paper).
        pad_value: image fill of the padding (128 as detectron2; the model normalises afterwards).
    """

    def __init__(self, *, image_size: int, min_scale: float = 0.1, max_scale: float = 2.0, pad_value: int = 128):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.image_size = image_size
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.pad_value = pad_value

    def __call__(self, item: Item, generator: torch.Generator | None = None) -> Item:
        h, w = item["image"].shape[-2:]
        target = self.image_size * _uniform(self.min_scale, self.max_scale, generator)
        scale = min(target / h, target / w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        crop = (min(self.image_size, size[0]), min(self.image_size, size[1]))
        top = round((size[0] - crop[0]) * torch.rand((), generator=generator).item())
        left = round((size[1] - crop[1]) * torch.rand((), generator=generator).item())
        return resize_crop(item, size=size, window=(top, left, *crop),
                           pad_to=(self.image_size, self.image_size), pad_value=self.pad_value)

    def __repr__(self) -> str:
        return f"LargeScaleJitter(image_size={self.image_size}, scale=[{self.min_scale}, {self.max_scale}])"


class ResizeShortestEdge:
    """Resize so the shortest edge is one of `short_edges` (drawn uniformly), the longest <= max_size.

    Args:
        short_edges: candidate shortest-edge lengths (one value for testing).
        max_size: bound on the longest edge.
    """

    def __init__(self, *, short_edges: Sequence[int], max_size: int):
        if not short_edges:
            raise ValueError("short_edges must not be empty")
        self.short_edges = tuple(short_edges)
        self.max_size = max_size

    def __call__(self, item: Item, generator: torch.Generator | None = None) -> Item:
        h, w = item["image"].shape[-2:]
        pick = torch.randint(len(self.short_edges), (), generator=generator).item() if len(self.short_edges) > 1 else 0
        size = _shortest_edge_size(h, w, self.short_edges[pick], self.max_size)
        return resize_crop(item, size=size, window=(0, 0, *size))

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(short_edges={list(self.short_edges)}, max_size={self.max_size})"


class RandomCrop:
    """Crop a random window of min(crop_size, H) x min(crop_size, W) ("absolute" crop, no padding).

    Args:
        crop_size: side of the crop.
    """

    def __init__(self, *, crop_size: int):
        self.crop_size = crop_size

    def __call__(self, item: Item, generator: torch.Generator | None = None) -> Item:
        h, w = item["image"].shape[-2:]
        crop_h, crop_w = min(self.crop_size, h), min(self.crop_size, w)
        top = torch.randint(h - crop_h + 1, (), generator=generator).item()
        left = torch.randint(w - crop_w + 1, (), generator=generator).item()
        return resize_crop(item, size=(h, w), window=(top, left, crop_h, crop_w))

    def __repr__(self) -> str:
        return f"RandomCrop(crop_size={self.crop_size})"


class ColorAugSSD:
    """SSD photometric distortion: brightness, contrast, saturation and hue, each with probability 0.5.

    Brightness comes first; contrast is applied either before or after saturation and hue (a coin
    flip), as in the SSD recipe the original uses for ADE20K. Masks are untouched.

    Args:
        brightness_delta: additive shift drawn from U(-delta, delta) (0-255 scale).
        contrast_range: multiplicative contrast factor range.
        saturation_range: saturation factor range (blend with the grayscale image).
        hue_delta: hue shift range in fractions of the colour circle (18/180 = 0.1 in the original).
    """

    def __init__(self, *, brightness_delta: float = 32.0, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: float = 0.1):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def __call__(self, item: Item, generator: torch.Generator | None = None) -> Item:
        image = item["image"].float()
        if _chance(0.5, generator):
            image = (image + _uniform(-self.brightness_delta, self.brightness_delta, generator)).clamp_(0, 255)
        contrast_first = _chance(0.5, generator)
        if contrast_first:
            image = self._contrast(image, generator)
        if _chance(0.5, generator):
            factor = _uniform(*self.saturation_range, generator)
            gray = TF.rgb_to_grayscale(image, num_output_channels=1)
            image = (gray + factor * (image - gray)).clamp_(0, 255)
        if _chance(0.5, generator):
            shift = _uniform(-self.hue_delta, self.hue_delta, generator)
            image = TF.adjust_hue(image / 255.0, shift) * 255.0
        if not contrast_first:
            image = self._contrast(image, generator)
        return {**item, "image": image.round_().clamp_(0, 255).to(torch.uint8)}

    def _contrast(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        if not _chance(0.5, generator):
            return image
        return (image * _uniform(*self.contrast_range, generator)).clamp_(0, 255)

    def __repr__(self) -> str:
        return (f"ColorAugSSD(brightness_delta={self.brightness_delta}, contrast={self.contrast_range}, "
                f"saturation={self.saturation_range}, hue_delta={self.hue_delta})")


def build_train_transforms(task: str, image_size: int, *, min_scale: float = 0.1, max_scale: float = 2.0,
                           augmentation: Literal["lsj", "semantic_crop"] | None = None,
                           color_aug: bool | None = None) -> Compose:
    """The original's training augmentation for a task.

    Args:
        task: "panoptic", "instance" or "semantic".
        image_size: LSJ output side, or the semantic crop size.
        min_scale: LSJ smallest scale.
        max_scale: LSJ largest scale.
        augmentation: "lsj" or "semantic_crop"; None picks "semantic_crop" for the semantic task
            (ADE20K recipe) and "lsj" otherwise (COCO recipe).
        color_aug: SSD colour augmentation; None follows the recipe (on for "semantic_crop" only).

    Returns:
        A `Compose` of the pipeline (see the module docstring).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    augmentation = augmentation or ("semantic_crop" if task == "semantic" else "lsj")
    if augmentation == "lsj":
        steps: list = [RandomHorizontalFlip(), LargeScaleJitter(image_size=image_size, min_scale=min_scale,
                                                                max_scale=max_scale)]
        return Compose(transforms=[*steps, ColorAugSSD()] if color_aug else steps)
    if augmentation == "semantic_crop":
        short_edges = [int(x * 0.1 * image_size) for x in range(5, 21)]
        steps = [ResizeShortestEdge(short_edges=short_edges, max_size=4 * image_size),
                 RandomCrop(crop_size=image_size)]
        steps += [ColorAugSSD()] if color_aug is None or color_aug else []
        return Compose(transforms=[*steps, RandomHorizontalFlip()])
    raise ValueError(f"unknown augmentation {augmentation!r}; expected 'lsj' or 'semantic_crop'")


def build_test_transforms(size: int, max_size: int) -> Compose:
    """Resize the shortest edge to `size` with the longest at most `max_size` (COCO: 800/1333, ADE: 512/2048)."""
    return Compose(transforms=[ResizeShortestEdge(short_edges=[size], max_size=max_size)])
