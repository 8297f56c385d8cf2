"""Loaders: what they read back equals what the generator drew, for every format and task; Cityscapes
from a tiny fake tree; batching through a real DataLoader."""

import numpy as np
import pytest
import torch
from PIL import Image

from m2f.data import build_dataset, build_train_transforms, collate
from m2f.data.categories import Categories
from m2f.data.cityscapes import CITYSCAPES_CLASSES
from m2f.data.synthetic import generate
from m2f.data.synthetic_scene import SceneParams, synthetic_categories


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    summary = generate(root, num_train=12, num_val=3, image_size=96, seed=11,
                       difficulty=SceneParams(crowd_prob=0.5), return_truth=True)
    return root, summary["truth"]


def expected(truth: dict, task: str) -> tuple[list[int], np.ndarray]:
    """Targets computed from the generator's drawn masks (crowd excluded)."""
    cats = synthetic_categories()
    keep = [g for g, crowd in enumerate(truth["iscrowd"]) if not crowd]
    if task == "instance":
        things = cats.things()
        keep = [g for g in keep if truth["category_ids"][g] in things]
        return [things.index(truth["category_ids"][g]) for g in keep], truth["masks"][keep]
    if task == "panoptic":
        return [cats.index(truth["category_ids"][g]) for g in keep], truth["masks"][keep]
    classes = sorted({cats.index(truth["category_ids"][g]) for g in keep})
    masks = [np.any([truth["masks"][g] for g in keep if cats.index(truth["category_ids"][g]) == c], axis=0)
             for c in classes]
    return classes, np.array(masks, dtype=bool).reshape(len(classes), *truth["masks"].shape[1:])


def assert_same_targets(item: dict, labels: list[int], masks: np.ndarray) -> None:
    assert item["labels"].dtype == torch.int64 and item["masks"].dtype == torch.bool
    assert item["labels"].tolist() == labels
    assert np.array_equal(item["masks"].numpy(), masks)


@pytest.mark.parametrize(
    ("fmt", "task"),
    [("coco_panoptic", "panoptic"), ("coco_panoptic", "instance"), ("coco_panoptic", "semantic"),
     ("coco_instance", "instance"), ("ade20k", "semantic")],
)
def test_round_trip_equals_the_drawn_ground_truth(synth, fmt, task):
    root, truth = synth
    dataset = build_dataset(fmt, root, "train", task)
    assert len(dataset) == 12
    num_classes = {"instance": 6}.get(task, 10)
    assert dataset.categories.num_classes == num_classes
    for index, drawn in enumerate(truth["train"]):
        item = dataset[index]
        assert item["image_id"] == drawn["image_id"] and item["file_name"] == drawn["file_name"]
        assert (item["height"], item["width"]) == (96, 96)
        assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.uint8
        image = np.asarray(Image.open(root / "train2017" / drawn["file_name"]))
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), image)
        assert_same_targets(item, *expected(drawn, task))


def test_crowd_segments_are_never_targets(synth):
    root, truth = synth
    dataset = build_dataset("coco_panoptic", root, "train", "panoptic")
    crowd_images = [i for i, t in enumerate(truth["train"]) if any(t["iscrowd"])]
    assert crowd_images, "the fixture should contain crowd segments"
    for i in crowd_images:
        crowd = truth["train"][i]["masks"][truth["train"][i]["iscrowd"]].any(0)
        assert not (dataset[i]["masks"].numpy() & crowd).any()


def test_semantic_png_ignore_becomes_255_outside_all_masks(synth):
    root, truth = synth
    dataset = build_dataset("ade20k", root, "val", "semantic")
    for i, drawn in enumerate(truth["val"]):
        raw = np.asarray(Image.open(root / "annotations" / "semantic_val2017" / drawn["file_name"]))
        covered = dataset[i]["masks"].numpy().any(0)
        assert np.array_equal(covered, raw > 0)  # label 0 (void, crowd) is in no mask
        for label, mask in zip(dataset[i]["labels"].tolist(), dataset[i]["masks"].numpy()):
            assert (raw[mask] == label + 1).all()


def test_filter_empty_drops_images_without_targets(synth):
    root, _ = synth
    full = build_dataset("coco_panoptic", root, "train", "instance")
    filtered = build_dataset("coco_panoptic", root, "train", "instance", filter_empty=True)
    empty = [i for i in range(len(full)) if len(full[i]["labels"]) == 0]
    assert len(filtered) == len(full) - len(empty)
    assert all(problem.startswith("empty image") for _, problem in filtered.skipped)


def test_dataloader_with_workers_and_training_transforms(synth):
    root, _ = synth
    dataset = build_dataset("coco_panoptic", root, "train", "panoptic", build_train_transforms("panoptic", 64))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert sum(len(metas) for _, _, metas in batches) == 12
    for images, targets, metas in batches:
        assert images.shape[1:] == (3, 64, 64) and images.dtype == torch.uint8
        for target in targets:
            assert target["masks"].shape[1:] == (64, 64)
            assert target["masks"].flatten(1).any(1).all(), "no empty masks after LSJ"
        assert all(meta["skipped"] == [] for meta in metas)


def test_collate_pads_images_with_zero_and_masks_with_false():
    items = []
    for h, w in ((40, 50), (70, 33)):
        items.append({"image": torch.full((3, h, w), 200, dtype=torch.uint8), "image_id": h, "file_name": f"{h}",
                      "height": h, "width": w, "labels": torch.tensor([3]),
                      "masks": torch.ones((1, h, w), dtype=torch.bool)})
    images, targets, metas = collate(items, size_divisibility=32)
    assert images.shape == (2, 3, 96, 64)
    assert images[0, :, :40, :50].eq(200).all() and images[0, :, 40:].eq(0).all() and images[0, :, :, 50:].eq(0).all()
    assert targets[1]["masks"].shape == (1, 96, 64)
    assert targets[1]["masks"].sum() == 70 * 33  # padding belongs to no object
    assert metas[1]["image_size"] == (70, 33) and metas[0]["image_id"] == 40
    images, _, _ = collate(items, size_divisibility=1)
    assert images.shape == (2, 3, 70, 50)


def test_ade20k_challenge_layout(tmp_path):
    for sub in ("images/validation", "annotations/validation"):
        (tmp_path / sub).mkdir(parents=True)
    label = np.zeros((6, 8), dtype=np.uint8)  # 0 = "other": ignored
    label[:, :3] = 1  # class 0 ("wall" in ADE20K)
    label[4:, 5:] = 150  # the last class, 149
    Image.fromarray(np.full((6, 8, 3), 90, dtype=np.uint8)).save(tmp_path / "images/validation/ADE_val_00000007.jpg")
    Image.fromarray(label).save(tmp_path / "annotations/validation/ADE_val_00000007.png")
    dataset = build_dataset("ade20k", tmp_path, "val", "semantic")
    assert len(dataset) == 1 and dataset.categories.num_classes == 150
    item = dataset[0]
    assert item["image_id"] == 7 and item["file_name"] == "ADE_val_00000007.jpg"
    assert item["labels"].tolist() == [0, 149]
    assert np.array_equal(item["masks"][0].numpy(), label == 1)
    assert np.array_equal(item["masks"][1].numpy(), label == 150)


def _cityscapes_tree(root) -> tuple[np.ndarray, np.ndarray]:
    """One 16x24 image in city "aachen" with road, sky, two cars, a person, a car group and a void area."""
    labels = np.zeros((16, 24), dtype=np.uint8)  # 0 = unlabeled
    labels[:8] = 23  # sky
    labels[8:] = 7  # road
    instances = labels.astype(np.int32).copy()
    for value, (rows, cols) in ((26001, (slice(9, 12), slice(0, 4))), (26002, (slice(9, 12), slice(5, 9))),
                                (24000, (slice(10, 14), slice(12, 14)))):
        labels[rows, cols] = value // 1000
        instances[rows, cols] = value
    labels[13:16, 18:22] = 26  # a car group: thing pixels without an instance number
    instances[13:16, 18:22] = 26
    labels[0:2, 0:2] = 4  # "static": not one of the 19 classes -> ignored
    instances[0:2, 0:2] = 4
    for sub in ("leftImg8bit/val/aachen", "gtFine/val/aachen"):
        (root / sub).mkdir(parents=True)
    image = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png")
    Image.fromarray(labels).save(root / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png")
    Image.fromarray(instances.astype(np.uint16)).save(root / "gtFine/val/aachen/aachen_000000_000019_gtFine_instanceIds.png")
    return labels, instances


def test_cityscapes_semantic_instance_panoptic(tmp_path):
    labels, instances = _cityscapes_tree(tmp_path)
    train_id = {label_id: k for k, (label_id, *_) in enumerate(CITYSCAPES_CLASSES)}
    assert train_id[7] == 0 and train_id[23] == 10 and train_id[24] == 11 and train_id[33] == 18

    semantic = build_dataset("cityscapes", tmp_path, "val", "semantic")
    item = semantic[0]
    assert semantic.categories.num_classes == 19
    assert item["labels"].tolist() == [0, 10, 11, 13]  # road, sky, person, car
    assert np.array_equal(item["masks"][3].numpy(), labels == 26)
    assert not item["masks"].any(0)[0:2, 0:2].any()  # ignored label
    assert item["file_name"] == "aachen/aachen_000000_000019_leftImg8bit.png"

    instance = build_dataset("cityscapes", tmp_path, "val", "instance")
    item = instance[0]
    assert instance.categories.num_classes == 8
    assert item["labels"].tolist() == [0, 2, 2]  # person, car, car (thing-only indices)
    assert [np.array_equal(m.numpy(), instances == v) for m, v in zip(item["masks"], (24000, 26001, 26002))] == [True] * 3

    panoptic = build_dataset("cityscapes", tmp_path, "val", "panoptic")
    item = panoptic[0]
    assert item["labels"].tolist() == [0, 10, 11, 13, 13]
    assert np.array_equal(item["masks"][0].numpy(), labels == 7)
    group = (instances == 26)
    assert not item["masks"].any(0).numpy()[group].any()  # the car group is crowd: no target


def test_categories_map_ids_to_contiguous_indices():
    cats = synthetic_categories()
    assert cats.ids == sorted(cats.ids)
    assert [cats.index(i) for i in cats.ids] == list(range(10))
    assert all(cats.category_id(cats.index(i)) == i for i in cats.ids)
    assert cats.things().ids == [1, 2, 3, 5, 7, 9]
    with pytest.raises(KeyError, match="unknown category_id 4"):
        cats.index(4)
    reparsed = Categories.from_coco(list(reversed(cats.to_coco())), file="x.json")
    assert reparsed.ids == cats.ids and reparsed.isthing == cats.isthing
