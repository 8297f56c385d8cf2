import dataclasses

import pytest

from m2f.config import PRESETS, Config, apply_overrides, from_dict, get_config


def test_defaults_are_the_official_r50_coco_panoptic_values():
    cfg = get_config("r50_coco_panoptic")
    m, loss, train, test = cfg.model, cfg.loss, cfg.train, cfg.test
    assert (m.num_queries, m.hidden_dim, m.nheads, m.dim_feedforward, m.dec_layers) == (100, 256, 8, 2048, 9)
    assert (m.encoder_layers, m.encoder_ffn_dim, m.encoder_points, m.dropout) == (6, 1024, 4, 0.0)
    assert (loss.class_weight, loss.mask_weight, loss.dice_weight, loss.no_object_weight) == (2.0, 5.0, 5.0, 0.1)
    assert (loss.num_points, loss.oversample_ratio, loss.importance_sample_ratio) == (12544, 3.0, 0.75)
    assert (train.lr, train.weight_decay, train.backbone_lr_mult, train.clip_grad_norm) == (1e-4, 0.05, 0.1, 0.01)
    assert (train.max_iters, train.lr_steps) == (368750, (0.9, 0.95))
    assert (test.object_mask_threshold, test.overlap_threshold, test.topk_per_image) == (0.8, 0.8, 100)


@pytest.mark.parametrize(
    ("preset", "field", "value"),
    [
        ("swin_l_coco_panoptic", "num_queries", 200),
        ("r50_coco_instance", "num_classes", 80),
        ("r50_ade20k_semantic", "num_classes", 150),
        ("r101_coco_panoptic", "backbone", "resnet101"),
    ],
)
def test_presets_differ_where_the_paper_says(preset, field, value):
    assert getattr(get_config(preset).model, field) == value


def test_required_presets_exist():
    required = {"r50_coco_panoptic", "r101_coco_panoptic", "swin_t_coco_panoptic", "swin_s_coco_panoptic",
                "swin_b_coco_panoptic", "swin_l_coco_panoptic", "r50_coco_instance", "r50_ade20k_semantic", "tiny"}
    assert required <= set(PRESETS)


def test_overrides_are_parsed_into_the_field_type():
    cfg = get_config("r50_coco_panoptic", overrides=[
        "model.num_queries=200", "train.lr=3e-4", "train.amp=false", "train.lr_steps=0.8,0.9",
        "model.attention=cross", "model.backbone_weights=/tmp/w.pth", "model.pixel_mean=1,2,3"])
    assert cfg.model.num_queries == 200 and isinstance(cfg.model.num_queries, int)
    assert cfg.train.lr == 3e-4 and cfg.train.amp is False and cfg.train.lr_steps == (0.8, 0.9)
    assert cfg.model.attention == "cross" and cfg.model.backbone_weights == "/tmp/w.pth"
    assert cfg.model.pixel_mean == (1.0, 2.0, 3.0)
    assert apply_overrides(cfg, ["model.backbone_weights=none"]).model.backbone_weights is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_querys=3", "unknown config key 'model.num_querys'.*num_queries"),
        ("modle.x=3", "unknown config key 'modle.x'.*model"),
        ("model.num_queries=abc", "model.num_queries.*expects int"),
        ("train.amp=maybe", "train.amp.*expects bool"),
        ("model.attention=sparse", "model.attention.*must be one of"),
        ("model.pixel_mean=1,2", "needs 3"),
        ("model=3", "is a section"),
        ("model.num_queries", "not of the form"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", overrides=[override])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(KeyError, match="r50_coco_panoptic"):
        get_config("r51")


def test_config_is_frozen_and_round_trips_through_a_dict():
    cfg = get_config("tiny", overrides=["model.num_queries=7"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.num_queries = 3  # type: ignore[misc]
    assert from_dict(cfg.to_dict()) == cfg
    assert isinstance(from_dict(Config().to_dict()).train.lr_steps, tuple)
