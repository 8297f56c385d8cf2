"""Bad input: every case raises an error naming the file and the problem, or is skipped and counted."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from m2f.data import (
    DatasetError,
    DatasetFileNotFoundError,
    build_dataset,
    build_train_transforms,
    collate,
    skip_summary,
)
from m2f.data.image_io import read_image
from m2f.data.synthetic import generate


@pytest.fixture
def root(tmp_path):
    generate(tmp_path, num_train=4, num_val=0, image_size=48, seed=2)
    return tmp_path


def first_image(root, split="train"):
    return sorted((root / f"{split}2017").glob("*.png"))[0]


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


PANOPTIC_JSON = "annotations/panoptic_train2017.json"
INSTANCES_JSON = "annotations/instances_train2017.json"


def test_missing_image_raises_with_the_file_name_or_is_skipped(root):
    missing = first_image(root)
    missing.unlink()
    for fmt, task in (("coco_panoptic", "panoptic"), ("coco_instance", "instance"), ("ade20k", "semantic")):
        if fmt == "ade20k":  # pairs are found from the images present; a missing label is the ADE case
            continue
        with pytest.raises(DatasetFileNotFoundError, match=f"{missing.name}: image file not found"):
            build_dataset(fmt, root, "train", task)
        dataset = build_dataset(fmt, root, "train", task, skip_bad=True)
        assert len(dataset) == 3
        assert dataset.skipped == [(str(missing), "image file not found")]
        assert dataset.skip_summary().startswith("skipped 1 of 4 images: image file not found (1)")
    assert isinstance(DatasetFileNotFoundError("x", "y"), FileNotFoundError)


def test_missing_ade_label_png(root):
    label = root / "annotations" / "semantic_train2017" / first_image(root).name
    label.unlink()
    with pytest.raises(DatasetFileNotFoundError, match="label PNG file not found"):
        build_dataset("ade20k", root, "train", "semantic")
    assert len(build_dataset("ade20k", root, "train", "semantic", skip_bad=True)) == 3


def test_corrupt_image_raises_at_load_or_is_replaced_by_the_next_image(root):
    bad = first_image(root)
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    dataset = build_dataset("coco_panoptic", root, "train", "panoptic")
    with pytest.raises(DatasetError, match=rf"{bad.name}: cannot decode image"):
        dataset[0]
    skipping = build_dataset("coco_panoptic", root, "train", "panoptic", skip_bad=True)
    item = skipping[0]
    assert item["file_name"] != bad.name
    assert item["skipped"][0][0] == str(bad) and item["skipped"][0][1].startswith("cannot decode image")
    assert "skipped" not in skipping[0]  # known bad: passed over without re-reading
    assert "skipped 1 of 4 images: cannot decode image (1)" in skipping.skip_summary()
    garbage = root / "train2017" / sorted(p.name for p in (root / "train2017").iterdir())[1]
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="cannot decode image"):
        dataset[1]


def test_errors_from_dataloader_workers_name_the_file(root):
    bad = first_image(root)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dataset = build_dataset("coco_panoptic", root, "train", "panoptic")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate, num_workers=1)
    with pytest.raises(DatasetError, match=rf"{bad.name}: cannot decode image"):
        list(loader)
    # With skip_bad the skip travels back to the main process in the metas.
    skipping = build_dataset("coco_panoptic", root, "train", "panoptic", skip_bad=True)
    loader = torch.utils.data.DataLoader(skipping, batch_size=2, collate_fn=collate, num_workers=1)
    reported = [pair for _, _, metas in loader for meta in metas for pair in meta["skipped"]]
    assert [f for f, _ in reported] == [str(bad)]
    assert skip_summary(reported, len(skipping)).startswith("skipped 1 of 4 images")


@pytest.mark.parametrize(
    ("fmt", "json_name", "change", "message"),
    [
        ("coco_panoptic", PANOPTIC_JSON, lambda d: d.pop("categories"), "no key 'categories'"),
        ("coco_panoptic", PANOPTIC_JSON, lambda d: d["annotations"][1].pop("segments_info"),
         r"annotations\[1\] has no key 'segments_info'"),
        ("coco_panoptic", PANOPTIC_JSON, lambda d: d["categories"][0].pop("isthing"), "has no key 'isthing'"),
        ("coco_panoptic", PANOPTIC_JSON, lambda d: d.update(images={}), "'images' must be a list"),
        ("coco_instance", INSTANCES_JSON, lambda d: d["images"][0].pop("height"), r"images\[0\] has no key 'height'"),
        ("coco_instance", INSTANCES_JSON, lambda d: d["annotations"][0].pop("segmentation"),
         "has no key 'segmentation'"),
    ],
)
def test_json_that_is_not_coco(root, fmt, json_name, change, message):
    edit_json(root / json_name, change)
    task = "instance" if fmt == "coco_instance" else "panoptic"
    with pytest.raises(DatasetError, match=message) as info:
        build_dataset(fmt, root, "train", task)
    assert json_name.split("/")[-1] in str(info.value)


def test_json_that_is_not_json_or_missing(root):
    (root / PANOPTIC_JSON).write_text('{"images": [1, 2,')
    with pytest.raises(DatasetError, match=r"panoptic_train2017.json: invalid JSON: .* line 1"):
        build_dataset("coco_panoptic", root, "train", "panoptic")
    with pytest.raises(DatasetFileNotFoundError, match="panoptic JSON file not found"):
        build_dataset("coco_panoptic", root, "test", "panoptic")


def test_unknown_category(root):
    def retag(data):
        data["annotations"][2]["segments_info"][0]["category_id"] = 99

    edit_json(root / PANOPTIC_JSON, retag)
    with pytest.raises(DatasetError, match=r"unknown category: .* category_id 99; known ids \[1, 2, 3, 5, 7, 9, 11"):
        build_dataset("coco_panoptic", root, "train", "panoptic")
    dataset = build_dataset("coco_panoptic", root, "train", "panoptic", skip_bad=True)
    assert len(dataset) == 3 and dataset.skipped[0][1].startswith("unknown category")

    edit_json(root / INSTANCES_JSON, lambda d: d["annotations"][0].update(category_id=11))  # a stuff id
    with pytest.raises(DatasetError, match="category_id 11; known ids"):
        build_dataset("coco_instance", root, "train", "instance")
    assert len(build_dataset("coco_instance", root, "train", "instance", skip_bad=True)) == 3


def test_empty_image_gives_zero_targets_through_transforms_and_collate(root):
    edit_json(root / PANOPTIC_JSON, lambda d: d["annotations"][0].update(segments_info=[]))
    dataset = build_dataset("coco_panoptic", root, "train", "panoptic", build_train_transforms("panoptic", 32))
    item = dataset[0]
    assert item["labels"].shape == (0,) and item["masks"].shape == (0, 32, 32)
    images, targets, _ = collate([item, dataset[1]])
    assert images.shape == (2, 3, 32, 32) and targets[0]["masks"].shape == (0, 32, 32)
    assert len(build_dataset("coco_panoptic", root, "train", "panoptic", filter_empty=True)) == 3


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_image_modes_become_rgb_uint8(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    if mode == "I;16":
        gray = np.arange(63, dtype=np.uint16).reshape(9, 7) * 1000
        Image.fromarray(gray).save(tmp_path / "x.png")
        out = read_image(tmp_path / "x.png")
        assert np.array_equal(out[..., 0], np.rint(gray / 257.0).astype(np.uint8))
    else:
        image = Image.fromarray(rgb).convert(mode)
        image.save(tmp_path / ("x.tif" if mode == "CMYK" else "x.png"))
        out = read_image(tmp_path / ("x.tif" if mode == "CMYK" else "x.png"))
        assert np.array_equal(out, np.asarray(image.convert("RGB")))
    assert out.shape == (9, 7, 3) and out.dtype == np.uint8


def write_rgb16_png(path, rgb16: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[r].astype(">u2").tobytes() for r in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_sixteen_bit_rgb_png_becomes_eight_bit(tmp_path):
    rgb16 = np.random.default_rng(1).integers(0, 65536, (5, 6, 3)).astype(np.uint16)
    write_rgb16_png(tmp_path / "x.png", rgb16)
    out = read_image(tmp_path / "x.png")
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb16 / 257.0).max() <= 1.0  # the high byte, i.e. value / 257 up to 1


def test_rgba_and_gray_images_load_in_a_dataset(root):
    path = first_image(root)
    rgb = np.asarray(Image.open(path))
    Image.fromarray(rgb).convert("L").save(path)
    item = build_dataset("coco_panoptic", root, "train", "panoptic")[0]
    assert item["image"].shape == (3, 48, 48)
    assert torch.equal(item["image"][0], item["image"][1])


def test_polygons_outside_the_image_are_clipped_and_bad_rle_is_reported(root):
    def change(data):
        data["annotations"][0]["segmentation"] = [[-10.0, -10.0, 30.0, -10.0, 30.0, 20.0, -10.0, 20.0],
                                                  [1.0, 1.0, 2.0, 2.0]]  # the 2-point polygon is ignored
        data["annotations"][1]["segmentation"] = [[40.0, 40.0, 80.0, 40.0, 80.0, 80.0, 40.0, 80.0]]

    edit_json(root / INSTANCES_JSON, change)
    data = json.loads((root / INSTANCES_JSON).read_text())
    first, second = data["annotations"][0], data["annotations"][1]
    dataset = build_dataset("coco_instance", root, "train", "instance")
    index_of = {r.image_id: i for i, r in enumerate(dataset.records)}
    item = dataset[index_of[first["image_id"]]]
    expected = np.zeros((48, 48), dtype=bool)
    expected[0:20, 0:30] = True
    assert any(np.array_equal(m.numpy(), expected) for m in item["masks"])
    item = dataset[index_of[second["image_id"]]]
    corner = np.zeros((48, 48), dtype=bool)
    corner[40:, 40:] = True
    assert any(np.array_equal(m.numpy(), corner) for m in item["masks"])

    edit_json(root / INSTANCES_JSON, lambda d: d["annotations"][0].update(
        segmentation={"size": [10, 10], "counts": [100]}))
    with pytest.raises(DatasetError, match=r"bad segmentation: annotation .* RLE size \[10, 10\] differs"):
        build_dataset("coco_instance", root, "train", "instance")[index_of[first["image_id"]]]


def test_annotation_size_mismatches(root):
    png = root / "annotations" / "panoptic_train2017" / first_image(root).name
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(png)
    with pytest.raises(DatasetError, match=r"size mismatch: panoptic PNG is 12x10, the image is 48x48"):
        build_dataset("coco_panoptic", root, "train", "panoptic")[0]
    Image.fromarray(np.zeros((48, 48), dtype=np.uint8)).save(png)
    with pytest.raises(DatasetError, match=r"bad panoptic PNG mode: .* got mode L"):
        build_dataset("coco_panoptic", root, "train", "panoptic")[0]
    edit_json(root / INSTANCES_JSON, lambda d: d["images"][0].update(height=50))
    with pytest.raises(DatasetError, match="size mismatch: the annotations say 48x50"):
        build_dataset("coco_instance", root, "train", "instance")[0]


def test_semantic_label_out_of_range(root):
    label = root / "annotations" / "semantic_train2017" / first_image(root).name
    Image.fromarray(np.full((48, 48), 200, dtype=np.uint8)).save(label)
    with pytest.raises(DatasetError, match=r"label out of range: value 200 > 10"):
        build_dataset("ade20k", root, "train", "semantic")[0]


def test_unknown_format_task_and_folders(root, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset format 'voc'"):
        build_dataset("voc", root, "train", "semantic")
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        build_dataset("coco_panoptic", root, "train", "depth")
    with pytest.raises(ValueError, match=r"supports \['instance'\]"):
        build_dataset("coco_instance", root, "train", "panoptic")
    with pytest.raises(DatasetFileNotFoundError, match="dataset folder not found"):
        build_dataset("cityscapes", tmp_path / "nowhere", "train", "semantic")
    with pytest.raises(DatasetFileNotFoundError, match="dataset folder not found"):
        build_dataset("ade20k", tmp_path / "nowhere", "train", "semantic")


def test_skip_summary_groups_problems():
    pairs = [("a.png", "image file not found"), ("b.png", "image file not found"),
             ("c.png", "cannot decode image: truncated"), ("a.png", "image file not found")]
    text = skip_summary(pairs, 1000)
    assert text.startswith("skipped 3 of 1000 images: image file not found (2), cannot decode image (1); e.g. a.png")
    assert skip_summary([], 5) == "skipped 0 of 5 images"
