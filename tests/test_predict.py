"""`m2f.predict` and `m2f predict`: typed results against the post-processing they come from, input
conversion notes, the COCO result files read back by pycocotools and `m2f eval-files`, resuming, and a
converted original checkpoint that predicts COCO names."""

import json
import logging
import pickle

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

import m2f
from m2f.checkpoint import save_atomic
from m2f.cli import main
from m2f.config import get_config
from m2f.data.image_io import read_label_png, read_panoptic_png
from m2f.data.metadata import dataset_categories
from m2f.evaluation import evaluate_instance_files, load_coco, pq_compute
from m2f.inference import predict as raw_predict
from m2f.model import build_model
from m2f.predict import Prediction, Segment, collect_inputs, draw_prediction, load_weights, predict
from m2f.predict.files import read_input

FAST = ["model.deform_impl=torch", "data.root=", "data.test_size=64", "data.test_max_size=128", "model.num_queries=8"]


def _tiny_model(overrides=()) -> torch.nn.Module:
    """The tiny preset, random weights, with the no-object logit pushed down so queries keep a class
    (a random classifier otherwise says "no object" everywhere and the results are empty)."""
    cfg = get_config("tiny", [*FAST, *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.transformer_decoder.class_embed.bias[-1] = -10.0
    model.config = cfg
    return model


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (45, 77, 3), dtype=np.uint8), rng.integers(0, 256, (100, 61, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def model():
    return _tiny_model(["test.object_mask_threshold=0.0", "test.overlap_threshold=0.0"])


def test_predict_is_the_public_api_and_matches_the_post_processing(model):
    images = _images()
    categories = dataset_categories("synthetic")
    tensors = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
    for task in ("panoptic", "instance", "semantic"):
        # One image per call: the reference below runs one image (a batch pads to a common size).
        results = [m2f.predict(model, [image], task=task)[0] for image in images]
        assert all(isinstance(r, Prediction) for r in results)
        for image, tensor, result in zip(images, tensors, results):
            assert result.image_size == image.shape[:2]
            assert result.segments, task
            # The reference: the raw post-processing of the same model on the same (test-resized) image.
            from m2f.predict.results import _test_resize
            [raw] = raw_predict(model, [_test_resize(tensor, model.config)], task=task,
                                is_thing=categories.isthing, test=model.config.test, output_sizes=[image.shape[:2]])
            for s in result.segments:
                assert s.mask.shape == image.shape[:2] and s.mask.dtype == bool
                assert s.name == categories.names[categories.index(s.category_id)]
                assert s.isthing == categories.isthing[categories.index(s.category_id)]
            if task == "panoptic":
                np.testing.assert_array_equal(result.panoptic_seg, raw["panoptic_seg"].numpy())
                for s, info in zip(result.segments, raw["segments_info"], strict=True):
                    assert s.id == info["id"] and s.score == pytest.approx(info["score"])
                    np.testing.assert_array_equal(s.mask, result.panoptic_seg == s.id)
            elif task == "instance":
                scores = [s.score for s in result.segments]
                assert scores == sorted(scores, reverse=True) and all(s.isthing for s in result.segments)
                assert sorted(scores) == pytest.approx(sorted(raw["scores"].tolist()))
            else:
                np.testing.assert_array_equal(result.semantic_seg, raw.numpy())
                cover = np.sum([s.mask for s in result.segments], axis=0)
                assert (cover == 1).all()  # semantic segments partition the image


def test_predict_takes_files_and_tensors_and_batches_equal_single_images(model, tmp_path):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(2)]  # one size: no extra padding
    path = _save(tmp_path / "a.png", images[0])
    batched = predict(model, images, task="semantic")
    single = predict(model, [path], task="semantic") + predict(model, [torch.from_numpy(images[1]).permute(2, 0, 1)],
                                                               task="semantic")
    for a, b in zip(batched, single):
        np.testing.assert_array_equal(a.semantic_seg, b.semantic_seg)
        assert [s.score for s in a.segments] == pytest.approx([s.score for s in b.segments], abs=1e-5)
    with pytest.raises(ValueError, match="RGB"):
        predict(model, [np.zeros((5, 5), np.uint8)], task="semantic")


def test_read_input_converts_modes_and_applies_exif_with_notes(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "rotated.png", exif=exif)
    gray, notes = read_input(tmp_path / "gray.png")
    assert gray.shape == (20, 30, 3) and (gray == rgb[..., :1]).all() and notes == ["mode L converted to RGB"]
    rgba, notes = read_input(tmp_path / "rgba.png")
    assert (rgba == rgb).all() and notes == ["mode RGBA converted to RGB"]
    deep, notes = read_input(tmp_path / "deep.png")
    assert (deep[..., 0] == rgb[..., 0]).all() and notes[0].startswith("mode I;16")
    rotated, notes = read_input(tmp_path / "rotated.png")
    assert rotated.shape == (30, 20, 3) and notes == ["EXIF orientation 6 applied"]
    np.testing.assert_array_equal(rotated, np.rot90(rgb, k=-1))  # 6 = the stored image turned clockwise
    plain, notes = read_input(_save(tmp_path / "plain.png", rgb))
    assert (plain == rgb).all() and notes == []


def _save(path, array):
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from m2f.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, num_train=1, num_val=3, image_size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = _tiny_model(["test.object_mask_threshold=0.0", "test.overlap_threshold=0.0"])
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    save_atomic({"model": model.state_dict(), "config": model.config.to_dict()}, path)
    return path


def test_cli_panoptic_files_are_read_by_eval_files(synthetic, checkpoint, tmp_path, capsys, allocator_calls):
    gt_json = synthetic / "annotations" / "panoptic_val2017.json"
    out = tmp_path / "pred"
    main(["predict", str(synthetic / "val2017"), "--weights", str(checkpoint.parent), "--task", "panoptic",
          "--out", str(out), "--image-ids", str(gt_json), "--batch-size", "2"])
    assert allocator_calls == ["keep"]  # on the CPU by default (m2f.allocator)
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["predicted"] == 3
    results = json.loads((out / "panoptic.json").read_text())
    gt = json.loads(gt_json.read_text())
    assert sorted(a["image_id"] for a in results["annotations"]) == sorted(i["id"] for i in gt["images"])
    known = {c["id"] for c in gt["categories"]}
    for ann in results["annotations"]:
        ids = read_panoptic_png(out / "panoptic" / ann["file_name"])
        assert ann["segments_info"] and {s["category_id"] for s in ann["segments_info"]} <= known
        assert sorted(np.unique(ids[ids > 0]).tolist()) == sorted(s["id"] for s in ann["segments_info"])
        for s in ann["segments_info"]:
            assert (ids == s["id"]).sum() == s["area"]
        assert (out / "overlay" / ann["file_name"]).is_file()
    # The ground truth's own tool reads them; our files as their own ground truth are a perfect match.
    metrics = pq_compute(gt_json, out / "panoptic.json", synthetic / "annotations" / "panoptic_val2017", out / "panoptic")
    assert 0 <= metrics["All"]["pq"] <= 1
    self_gt = tmp_path / "self_gt.json"
    self_gt.write_text(json.dumps({**results, "images": gt["images"]}))
    assert pq_compute(self_gt, out / "panoptic.json", out / "panoptic", out / "panoptic")["All"]["pq"] == pytest.approx(1.0)
    main(["eval-files", "panoptic", str(gt_json), str(out / "panoptic.json"),
          "--gt-folder", str(synthetic / "annotations" / "panoptic_val2017"), "--pred-folder", str(out / "panoptic")])
    assert "All" in json.loads(capsys.readouterr().out)


def test_cli_instance_results_are_coco_rle_that_pycocotools_reads(synthetic, checkpoint, tmp_path, capsys,
                                                                   allocator_calls):
    gt_json = synthetic / "annotations" / "instances_val2017.json"
    out = tmp_path / "pred"
    main(["predict", str(synthetic / "val2017" / "*.png"), "--weights", str(checkpoint), "--task", "instance",
          "--out", str(out), "--image-ids", str(gt_json), "--no-keep-freed-memory"])
    assert allocator_calls == []
    capsys.readouterr()
    detections = json.loads((out / "instances.json").read_text())
    coco = load_coco(gt_json)
    loaded = coco.loadRes(detections)  # pycocotools checks image ids and decodes the RLEs
    assert len(loaded.getAnnIds()) == len(detections) > 0
    # Decoded masks are the ones the Python API returns for that image.
    model, _ = load_weights(checkpoint)
    image = next(i for i in coco.dataset["images"] if i["id"] == detections[0]["image_id"])
    [reference] = predict(model, [synthetic / "val2017" / image["file_name"]], task="instance")
    mine = [d for d in detections if d["image_id"] == image["id"]]
    assert len(mine) == len(reference.segments)
    for d, s in zip(mine, reference.segments):
        np.testing.assert_array_equal(mask_utils.decode({**d["segmentation"], "counts": d["segmentation"]["counts"].encode()}).astype(bool), s.mask)
        assert d["category_id"] == s.category_id and d["score"] == pytest.approx(s.score)
    assert "AP" in evaluate_instance_files(gt_json, out / "instances.json")


def test_cli_semantic_png_holds_category_ids_and_a_run_resumes(synthetic, checkpoint, tmp_path, capsys, caplog):
    out = tmp_path / "pred"
    gray = tmp_path / "inputs"
    gray.mkdir()
    Image.open(synthetic / "val2017" / sorted(p.name for p in (synthetic / "val2017").iterdir())[0]).convert("L").save(
        gray / "gray.png")
    args = ["predict", str(synthetic / "val2017"), str(gray), "--weights", str(checkpoint), "--task", "semantic",
            "--out", str(out)]
    with caplog.at_level(logging.WARNING, logger="m2f.predict"):
        main(args)
    assert "gray.png: mode L converted to RGB" in caplog.text
    assert json.loads(capsys.readouterr().out)["predicted"] == 4
    categories = dataset_categories("synthetic")
    model, _ = load_weights(checkpoint)
    [reference] = predict(model, [gray / "gray.png"], task="semantic")
    labels = read_label_png(out / "semantic" / "gray.png")
    np.testing.assert_array_equal(labels, np.asarray(categories.ids)[reference.semantic_seg])
    main(args)
    assert json.loads(capsys.readouterr().out) | {"out": None} == {"images": 4, "predicted": 0, "skipped": 4,
                                                                   "results": None, "out": None}
    (out / "overlay" / "gray.png").unlink()  # an image whose picture is missing is not finished
    main(args)
    assert json.loads(capsys.readouterr().out)["predicted"] == 1


def test_overlay_fills_segments_outlines_things_and_leaves_void_alone():
    from m2f.predict.draw import _shade

    image = np.full((60, 80, 3), 100, np.uint8)
    stuff = np.zeros((60, 80), bool)
    stuff[:, :30] = True
    thing = np.zeros((60, 80), bool)
    thing[20:50, 40:70] = True
    segments = [Segment(id=1, category_id=5, name="grass", isthing=False, score=0.9, mask=stuff, color=(0, 200, 0)),
                Segment(id=2, category_id=1, name="person", isthing=True, score=0.8, mask=thing, color=(200, 0, 0)),
                Segment(id=3, category_id=1, name="person", isthing=True, score=0.1, mask=~(stuff | thing),
                        color=(0, 0, 200))]
    result = Prediction("panoptic", (60, 80), segments)
    picture = draw_prediction(image, result, min_score=0.5, alpha=0.5).astype(int)
    assert picture[2, 2].tolist() == [50, 150, 50]  # the stuff fill: half image, half colour, no outline
    assert picture[20, 55].tolist() == (_shade(segments[1]) * 0.6).astype(int).tolist()  # the thing's outline
    inner = (100 * 0.5 + _shade(segments[1]) * 0.5).astype(int)
    assert np.abs(picture[46, 66] - inner).max() <= 1  # inside the outline (away from the labels): the fill
    assert picture[2, 75].tolist() == [100, 100, 100]  # below min_score: not drawn
    assert (picture[25:35, 5:25] != [50, 150, 50]).any()  # the label "grass 90%" is drawn on the region
    with pytest.raises(ValueError, match="differ in size"):
        draw_prediction(image[:10], result)


def test_collect_inputs_rejects_missing_and_clashing_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        _save(tmp_path / folder / "x.png", np.zeros((4, 4, 3), np.uint8))
    assert collect_inputs([tmp_path / "a" / "x.png"]) == [(tmp_path / "a" / "x.png").resolve()]
    with pytest.raises(ValueError, match="share the name 'x'"):
        collect_inputs([tmp_path])
    with pytest.raises(FileNotFoundError, match="not a file"):
        collect_inputs([tmp_path / "nope.png"])
    with pytest.raises(FileNotFoundError, match="no image files"):
        collect_inputs([str(tmp_path / "*.jpg")])


def test_a_converted_original_checkpoint_predicts_coco_names(tmp_path):
    from m2f.convert import to_detectron2

    cfg = get_config("r50_coco_panoptic", ["model.num_queries=8"])
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    state["transformer_decoder.class_embed.bias"][-1] = -10.0  # queries keep a class (see _tiny_model)
    pkl = tmp_path / "model_final_test.pkl"
    pkl.write_bytes(pickle.dumps({"model": to_detectron2(state)}))
    model, categories = load_weights(pkl, overrides=["model.deform_impl=torch", "data.test_size=64",
                                                     "test.object_mask_threshold=0", "test.overlap_threshold=0"])
    assert categories.names == dataset_categories("coco_panoptic").names
    [result] = predict(model, [_images()[0]], task="panoptic", categories=categories)
    assert result.segments and {s.name for s in result.segments} <= set(categories.names)
    coco = {c.id: c for c in categories}
    assert all(coco[s.category_id].name == s.name and coco[s.category_id].isthing == s.isthing for s in result.segments)
