"""Transforms: fixed LSJ output, padding in no mask, flips and crops keep image and masks aligned,
the ADE recipe's sizes, SSD colour augmentation, and determinism under a torch.Generator."""

import pytest
import torch
import torch.nn.functional as F

from m2f.data.transforms import (
    ColorAugSSD,
    LargeScaleJitter,
    RandomCrop,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    build_test_transforms,
    build_train_transforms,
)

GREEN = torch.tensor([0, 255, 0], dtype=torch.uint8)


def planted(height: int = 60, width: int = 90) -> dict:
    """A gray image with a green block that is also mask 0, a blue stripe (mask 1), and a whole-image mask 2."""
    image = torch.full((3, height, width), 100, dtype=torch.uint8)
    masks = torch.zeros((3, height, width), dtype=torch.bool)
    masks[0, 10:30, 50:80] = True
    image[:, masks[0]] = GREEN[:, None]
    masks[1, :, 2:6] = True
    image[:, masks[1]] = torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None]
    masks[2] = True
    return {"image": image, "image_id": 7, "file_name": "x.png", "height": height, "width": width,
            "labels": torch.tensor([4, 5, 6]), "masks": masks}


def is_green(image: torch.Tensor) -> torch.Tensor:
    """Pixels more than 55% green (G - R = 255 w for a green/gray mix of weight w), where nearest
    neighbour resampling of the mask must agree with bilinear resampling of the image."""
    return (image[1].int() - image[0].int() > 140) & (image[1].int() - image[2].int() > 140)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("seed", range(12))
def test_lsj_output_size_is_fixed_and_padding_is_in_no_mask(seed):
    transform = LargeScaleJitter(image_size=64, min_scale=0.1, max_scale=2.0)
    out = transform(planted(), seeded(seed))
    assert out["image"].shape == (3, 64, 64)
    assert out["masks"].shape[1:] == (64, 64)
    assert len(out["labels"]) == len(out["masks"])
    assert out["masks"].flatten(1).any(1).all(), "empty masks are dropped"
    # Mask 2 covered the whole image, so whatever it does not cover now is padding (filled with 128).
    whole = out["masks"][out["labels"] == 6]
    padding = ~whole[0]
    assert (out["image"][:, padding] == 128).all()
    assert not out["masks"][:, padding].any()


def test_lsj_scale_range_and_determinism():
    transform = LargeScaleJitter(image_size=64, min_scale=0.5, max_scale=0.5)
    out = transform(planted(60, 90), seeded(0))
    # Scale 0.5 of 64 = a 32-px square; the 90-px side is the limiting one: 60x90 -> 21x32, then padded.
    content = out["masks"][out["labels"] == 6][0]
    assert content.sum() == 21 * 32 and content[:21, :32].all()
    a = LargeScaleJitter(image_size=64)(planted(), seeded(3))
    b = LargeScaleJitter(image_size=64)(planted(), seeded(3))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])


@pytest.mark.parametrize("seed", range(8))
def test_crop_and_resize_keep_a_planted_object_aligned(seed):
    item = planted()
    for transform in (LargeScaleJitter(image_size=48, min_scale=0.8, max_scale=2.0), RandomCrop(crop_size=40),
                      ResizeShortestEdge(short_edges=[33, 150], max_size=400)):
        out = transform(item, seeded(seed))
        green = is_green(out["image"])
        masks = dict(zip(out["labels"].tolist(), out["masks"]))
        if 4 not in masks:
            assert not green.any()  # the block was cropped away, with its mask
            continue
        block = masks[4]
        # Resampling blurs only the block's edge: its interior is green, and green lies on the mask.
        interior = F.max_pool2d((~block)[None, None].float(), 3, 1, 1)[0, 0] == 0  # erosion
        assert green[interior].all()
        assert block[green].all()


def test_flip_mirrors_image_and_masks():
    item = planted()
    out = RandomHorizontalFlip(prob=1.0)(item, seeded(0))
    assert torch.equal(out["image"], item["image"].flip(-1)) and torch.equal(out["masks"], item["masks"].flip(-1))
    assert torch.equal(out["masks"][0], is_green(out["image"]))
    assert RandomHorizontalFlip(prob=0.0)(item, seeded(0)) is item


def test_resize_shortest_edge_respects_max_size():
    out = build_test_transforms(32, 40)(planted(60, 90))
    assert out["image"].shape[-2:] == (27, 40)  # 32 on the short side would make the long side 48 > 40
    out = build_test_transforms(30, 1000)(planted(60, 90))
    assert out["image"].shape[-2:] == (30, 45) and out["masks"].shape[-2:] == (30, 45)
    assert out["height"] == 60 and out["width"] == 90  # original size is kept


def test_semantic_crop_recipe_sizes():
    pipeline = build_train_transforms("semantic", 512)
    resize, crop = pipeline.transforms[0], pipeline.transforms[1]
    assert resize.short_edges == tuple(int(x * 0.1 * 512) for x in range(5, 21))
    assert resize.short_edges[0] == 256 and resize.short_edges[-1] == 1024 and resize.max_size == 2048
    assert crop.crop_size == 512
    assert any(isinstance(t, ColorAugSSD) for t in pipeline.transforms)
    out = build_train_transforms("semantic", 32)(planted(60, 90), seeded(1))
    assert max(out["image"].shape[-2:]) <= 32
    lsj = build_train_transforms("panoptic", 48)
    assert not any(isinstance(t, ColorAugSSD) for t in lsj.transforms)
    assert lsj(planted(), seeded(0))["image"].shape == (3, 48, 48)
    with pytest.raises(ValueError, match="unknown task"):
        build_train_transforms("depth", 32)


def test_color_aug_changes_only_the_image():
    item = planted()
    changed = 0
    for seed in range(10):
        out = ColorAugSSD()(item, seeded(seed))
        assert out["image"].dtype == torch.uint8 and out["image"].shape == item["image"].shape
        assert torch.equal(out["masks"], item["masks"]) and torch.equal(out["labels"], item["labels"])
        changed += not torch.equal(out["image"], item["image"])
    assert changed >= 7  # each of four distortions fires with p = 0.5
    bright = ColorAugSSD(brightness_delta=32, contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0)
    diffs = {int((bright(item, seeded(s))["image"].int() - item["image"].int())[:, 40, 0].unique()[0])
             for s in range(20)}
    assert max(abs(d) for d in diffs) <= 32 and len(diffs) > 3
