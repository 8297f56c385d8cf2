"""evaluate() end to end: a model that predicts the ground truth exactly must score PQ = AP = mIoU = 1."""

import json

import pytest
import torch
from torch import nn

from m2f.config import get_config
from m2f.data import build_dataset
from m2f.data.synthetic import generate
from m2f.inference import evaluate, evaluate_checkpoint, load_run
from m2f.model import build_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, num_train=2, num_val=4, image_size=64, seed=3)
    return root


class Oracle(nn.Module):
    """Returns the validation ground truth as confident predictions, at full resolution (so resizing is
    the identity), looked up by image content; every set of aux_outputs is the same oracle."""

    def __init__(self, dataset, num_queries: int, num_classes: int, layers: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # evaluate() reads the device from a parameter
        self.items = [dataset[i] for i in range(len(dataset))]
        self.q, self.k, self.layers = num_queries, num_classes, layers

    def forward(self, images, *, intermediate: bool = True):
        (image,) = images
        item = next(it for it in self.items if torch.equal(it["image"], image))
        h, w = image.shape[-2:]
        logits = torch.full((1, self.q, self.k + 1), -20.0)
        logits[0, :, self.k] = 20.0  # unused queries say "no object"
        masks = torch.full((1, self.q, h, w), -20.0)
        for g, (label, mask) in enumerate(zip(item["labels"], item["masks"])):
            logits[0, g, self.k], logits[0, g, label] = -20.0, 20.0
            masks[0, g][mask] = 20.0
        out = {"pred_logits": logits, "pred_masks": masks}
        aux = [dict(out) for _ in range(self.layers)] if intermediate else []
        return {**out, "aux_outputs": aux, "padded_size": (h, w)}


def test_evaluate_scores_a_perfect_model_as_perfect_on_every_layer(data):
    cfg = get_config("tiny", [f"data.root={data}", "data.test_size=64", "model.num_queries=30"])
    dataset = build_dataset("coco_panoptic", data, "val", task="panoptic")
    oracle = Oracle(dataset, cfg.model.num_queries, cfg.model.num_classes, cfg.model.dec_layers)
    metrics = evaluate(oracle, cfg, layers="all", proposals=True)
    assert metrics["num_images"] == 4 and len(metrics["layers"]) == cfg.model.dec_layers + 1
    for result in [metrics, *metrics["layers"]]:
        assert result["panoptic"]["PQ"] == pytest.approx(1.0)
        assert result["semantic"]["mIoU"] == pytest.approx(1.0)
        assert result["instance"]["AP"] == pytest.approx(1.0)
        assert result["proposals"]["AR@100"] == pytest.approx(1.0)


def test_evaluate_checkpoint_writes_metrics_next_to_the_run(data, tmp_path):
    cfg = get_config("tiny", [f"data.root={data}", "data.test_size=64", "model.num_queries=5"])
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg.to_dict()}, tmp_path / "checkpoint.pth")
    model, loaded = load_run(tmp_path)
    assert loaded == cfg and not model.training
    metrics = evaluate_checkpoint(tmp_path, max_images=2)
    written = json.loads((tmp_path / "eval_panoptic.json").read_text())
    assert written["metrics"]["num_images"] == metrics["num_images"] == 2
    assert 0.0 <= metrics["panoptic"]["PQ"] <= 1.0


def test_load_run_explains_a_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint\.pth"):
        load_run(tmp_path)
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an m2f checkpoint"):
        load_run(tmp_path / "other.pth")


@pytest.mark.parametrize(("task", "fmt", "classes", "metric"), [
    ("instance", "coco_panoptic", 6, ("instance", "AP")),   # an instance model knows the 6 thing classes only
    ("semantic", "ade20k", 10, ("semantic", "mIoU")),       # ADE20K layout: the synthetic set's semantic PNGs
])
def test_evaluate_a_task_specific_model_in_its_own_label_space(data, task, fmt, classes, metric):
    tests = [f"test.{t}_on={t == task}" for t in ("panoptic", "instance", "semantic")]
    cfg = get_config("tiny", [f"data.root={data}", f"data.format={fmt}", f"data.task={task}", "data.test_size=64",
                              f"model.num_classes={classes}", "model.num_queries=30", *tests])
    oracle = Oracle(build_dataset(fmt, data, "val", task=task), cfg.model.num_queries, classes, cfg.model.dec_layers)
    metrics = evaluate(oracle, cfg)
    assert set(metrics) == {metric[0], "num_images"}
    assert metrics[metric[0]][metric[1]] == pytest.approx(1.0)


def test_ade20k_evaluation_is_semantic_only(data):
    cfg = get_config("tiny", [f"data.root={data}", "data.format=ade20k", "data.task=semantic"])
    with pytest.raises(ValueError, match="semantic segmentation only"):
        evaluate(build_model(cfg), cfg)
