"""The synthetic generator: COCO files pycocotools accepts, AP 1.0 of the ground truth against itself,
masks that agree across the three annotation forms, determinism, and the documented knobs."""

import contextlib
import hashlib
import io
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from m2f.data.mask_codec import decode_segmentation, has_holes, mask_to_polygons, mask_to_rle
from m2f.data.synthetic import area_ranges, generate
from m2f.data.synthetic_scene import SceneParams


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    scene = SceneParams(crowd_prob=0.5)  # make sure the small set has crowd segments
    summary = generate(root, num_train=12, num_val=4, image_size=96, seed=3, difficulty=scene, return_truth=True)
    return root, summary


def quiet_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def file_digests(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(synth):
    root, summary = synth
    for split, n in (("train", 12), ("val", 4)):
        assert len(list((root / f"{split}2017").glob("*.png"))) == n
        assert len(list((root / "annotations" / f"panoptic_{split}2017").glob("*.png"))) == n
        assert len(list((root / "annotations" / f"semantic_{split}2017").glob("*.png"))) == n
        assert summary["splits"][split]["num_images"] == n
    cats = json.loads((root / "categories.json").read_text())
    ids = [c["id"] for c in cats]
    assert ids != list(range(1, len(ids) + 1)), "category ids must be non-contiguous like COCO's"
    assert {c["isthing"] for c in cats} == {0, 1}
    assert all({"id", "name", "supercategory", "isthing", "color"} <= set(c) for c in cats)
    train = summary["splits"]["train"]
    assert train["num_polygon"] > 0 and train["num_rle"] > 0 and train["num_crowd"] > 0


def test_ground_truth_against_itself_gives_ap_1(synth):
    root, summary = synth
    gt = quiet_coco(root / "annotations" / "instances_train2017.json")
    results = []
    for ann in gt.loadAnns(gt.getAnnIds(iscrowd=False)):
        rle = gt.annToRLE(ann)
        if isinstance(rle["counts"], str):  # our compressed RLE annotations come back as str
            rle = {**rle, "counts": rle["counts"].encode("ascii")}
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "segmentation": rle,
                        "score": 1.0})
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "segm")
        evaluator.params.areaRng = list(area_ranges(96).values())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50, ap75, ap_s, ap_m, ap_l = evaluator.stats[:6]
    assert ap == pytest.approx(1.0) and ap50 == pytest.approx(1.0) and ap75 == pytest.approx(1.0)
    # Every size bucket has ground truth (-1 would mean empty) and is perfect.
    assert (ap_s, ap_m, ap_l) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0))
    assert summary["splits"]["train"]["thing_areas"]["small"] > 0


def test_annotation_forms_agree_with_drawn_masks(synth):
    root, summary = synth
    coco = quiet_coco(root / "annotations" / "instances_train2017.json")
    panoptic = json.loads((root / "annotations" / "panoptic_train2017.json").read_text())
    for truth, pan in zip(summary["truth"]["train"], panoptic["annotations"], strict=True):
        assert truth["image_id"] == pan["image_id"]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=truth["image_id"]))
        things = [g for g, cid in enumerate(truth["category_ids"]) if cid in coco.cats]
        assert len(anns) == len(things)
        for ann, g in zip(anns, things):
            mask = truth["masks"][g]
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)  # pycocotools' own decoding
            assert ann["iscrowd"] == int(truth["iscrowd"][g])
            assert ann["area"] == mask.sum() == pan["segments_info"][g]["area"]
            assert ann["bbox"] == pan["segments_info"][g]["bbox"]
            assert list(mask_utils.toBbox(coco.annToRLE(ann))) == ann["bbox"]
            if ann["iscrowd"]:
                assert isinstance(ann["segmentation"]["counts"], list)
            if isinstance(ann["segmentation"], list):
                assert not has_holes(mask)
        ids = np.asarray(Image.open(root / "annotations" / "panoptic_train2017" / pan["file_name"]), dtype=np.int64)
        ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
        for seg, mask in zip(pan["segments_info"], truth["masks"]):
            assert np.array_equal(ids == seg["id"], mask)
        assert {s["iscrowd"] for s in pan["segments_info"]} <= {0, 1}
        assert [bool(s["iscrowd"]) for s in pan["segments_info"]] == truth["iscrowd"]


def test_masks_are_disjoint_and_visible_things_not_tiny(synth):
    _, summary = synth
    for truth in summary["truth"]["train"]:
        masks = truth["masks"]
        assert masks.sum(0).max() <= 1, "segments overlap"
        assert masks.reshape(len(masks), -1).sum(1).min() >= SceneParams().min_visible_pixels


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    a = generate(tmp_path / "a", num_train=6, num_val=2, image_size=64, seed=5)
    generate(tmp_path / "b", num_train=6, num_val=2, image_size=64, seed=5, num_workers=1)
    generate(tmp_path / "c", num_train=6, num_val=2, image_size=64, seed=6)
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
    assert a["splits"]["train"]["num_images"] == 6
    digests_a, digests_c = file_digests(tmp_path / "a"), file_digests(tmp_path / "c")
    assert digests_a.keys() == digests_c.keys()
    assert digests_a["annotations/panoptic_train2017.json"] != digests_c["annotations/panoptic_train2017.json"]


def test_worker_processes_give_the_same_files(tmp_path):
    generate(tmp_path / "serial", num_train=34, num_val=0, image_size=32, seed=1, num_workers=1)
    generate(tmp_path / "pool", num_train=34, num_val=0, image_size=32, seed=1, num_workers=2)
    assert file_digests(tmp_path / "serial") == file_digests(tmp_path / "pool")


def test_knobs_change_the_scenes(tmp_path):
    easy = generate(tmp_path / "easy", num_train=8, num_val=0, image_size=64, difficulty="easy")
    hard = generate(tmp_path / "hard", num_train=8, num_val=0, image_size=64, difficulty="hard")
    assert hard["splits"]["train"]["num_things"] > easy["splits"]["train"]["num_things"]
    with pytest.raises(ValueError, match="unknown difficulty"):
        generate(tmp_path / "x", num_train=1, num_val=0, difficulty="impossible")
    with pytest.raises(ValueError, match="min_object_size"):
        SceneParams(min_object_size=0.5, max_object_size=0.1)


def test_area_ranges_scale_coco_thresholds():
    assert area_ranges(640)["small"] == [0.0, 32.0**2]
    assert area_ranges(640)["large"][0] == 96.0**2
    assert area_ranges(128)["medium"] == pytest.approx([32**2 / 25, 96**2 / 25])


@pytest.mark.parametrize("seed", range(4))
def test_traced_polygons_rasterise_to_the_same_mask(seed):
    rng = np.random.default_rng(seed)
    checked = 0
    for _ in range(150):
        h, w = rng.integers(3, 40, 2)
        # Random pixels with holes filled: many parts and corner-touching pinches, no holes.
        mask = ndimage.binary_fill_holes(rng.random((h, w)) < rng.uniform(0.2, 0.8))
        if not mask.any():
            continue
        assert not has_holes(mask)
        polygons = mask_to_polygons(mask)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, int(h), int(w)))
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask)
        checked += 1
    assert checked > 20


def test_rle_encodings_decode_with_pycocotools():
    mask = np.zeros((7, 5), dtype=bool)
    mask[0, 0] = mask[2:6, 1:4] = True
    for compressed in (True, False):
        rle = mask_to_rle(mask, compressed=compressed)
        assert np.array_equal(decode_segmentation(rle, 7, 5), mask)
        ready = mask_utils.frPyObjects(rle, 7, 5) if not compressed else {**rle, "counts": rle["counts"].encode()}
        assert np.array_equal(mask_utils.decode(ready).astype(bool), mask)
    assert mask_to_rle(mask, compressed=False)["counts"][0] == 0  # starts with a (zero-length) background run
