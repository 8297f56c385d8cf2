"""Label metadata shipped with the package: counts, known ids, and the choice from a model's config."""

import json

import pytest

from m2f.config import get_config
from m2f.data.metadata import DATASETS, categories_for, dataset_categories


def test_coco_panoptic_has_133_categories_80_things_53_stuff():
    cats = dataset_categories("coco_panoptic")
    assert len(cats) == 133 and sum(cats.isthing) == 80
    assert (cats.categories[0].id, cats.categories[0].name, cats.categories[0].isthing) == (1, "person", True)
    assert cats.categories[0].color == (220, 20, 60)
    by_id = {c.id: c for c in cats}
    assert by_id[90].name == "toothbrush" and by_id[92].name == "banner" and not by_id[92].isthing
    assert by_id[200].name == "rug-merged" and by_id[187].name == "sky-other-merged"
    # Things come first by id (1..90), so class index 79 is the last thing and 80 the first stuff.
    assert cats.isthing[:80] == [True] * 80 and not any(cats.isthing[80:])
    assert len(set(cats.names)) == 133


def test_coco_instance_is_the_80_things_with_coco_ids():
    cats = dataset_categories("coco_instance")
    assert len(cats) == 80 and all(cats.isthing)
    assert cats.ids[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13] and cats.ids[-1] == 90
    assert cats.names[cats.index(18)] == "dog"


def test_ade20k_has_150_classes_with_label_png_ids():
    cats = dataset_categories("ade20k")
    assert len(cats) == 150 and cats.ids == list(range(1, 151))
    assert cats.names[:3] == ["wall", "building", "sky"] and cats.names[12] == "person"
    assert cats.names[-1] == "flag" and len(set(cats.names)) == 150
    assert cats.categories[0].color == (120, 120, 120)


def test_cityscapes_has_19_classes_8_things():
    cats = dataset_categories("cityscapes")
    assert len(cats) == 19 and sum(cats.isthing) == 8
    assert cats.names[0] == "road" and cats.names[cats.index(26)] == "car"


def test_colours_are_distinct_per_dataset():
    for name in ("coco_panoptic", "cityscapes"):
        colors = [c.color for c in dataset_categories(name)]
        assert len(set(colors)) == len(colors), name


@pytest.mark.parametrize(("preset", "expected"), [
    ("r50_coco_panoptic", "coco_panoptic"), ("r50_coco_instance", "coco_instance"),
    ("r50_ade20k_semantic", "ade20k"), ("tiny", "synthetic")])
def test_categories_for_picks_the_preset_dataset(preset, expected):
    cfg = get_config(preset, ["data.root="])
    assert categories_for(cfg).names == dataset_categories(expected).names


def test_categories_for_reads_the_run_data_root_and_explicit_files(tmp_path):
    cats = [{"id": 5, "name": "a", "isthing": 1}, {"id": 7, "name": "b", "isthing": 0}]
    (tmp_path / "categories.json").write_text(json.dumps(cats))
    cfg = get_config("tiny", ["model.num_classes=2", f"data.root={tmp_path}"])
    assert categories_for(cfg).names == ["a", "b"] and categories_for(cfg).isthing == [True, False]
    instance_json = tmp_path / "instances.json"
    instance_json.write_text(json.dumps({"categories": [{"id": 3, "name": "x"}, {"id": 1, "name": "y"}]}))
    assert categories_for(cfg, dataset=instance_json).names == ["y", "x"]
    with pytest.raises(ValueError, match="has 19 classes but the model has K=2"):
        categories_for(cfg, dataset="cityscapes")
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_categories("nope")


def test_unknown_class_count_gets_placeholder_names():
    cfg = get_config("tiny", ["model.num_classes=3", "data.root="])
    assert categories_for(cfg).names == ["class_0", "class_1", "class_2"]
    assert set(DATASETS) >= {"coco_panoptic", "ade20k"}


def test_dashboards_name_the_classes_of_a_converted_checkpoint_without_its_dataset(tmp_path):
    """A released COCO model converted with `m2f convert` is an m2f checkpoint whose data.root is not on
    this machine: the dashboards fall back to the shipped COCO panoptic names."""
    from dashboards.common import categories
    from m2f.checkpoint import save_atomic
    from m2f.config import get_config
    from m2f.model import build_model

    cfg = get_config("r50_coco_panoptic", ["model.num_queries=4", "data.root=/nowhere/coco"])
    save_atomic({"model": build_model(cfg).state_dict(), "config": cfg.to_dict()}, tmp_path / "r50.pth")
    names = categories(str(tmp_path / "r50.pth")).names
    assert len(names) == 133 and names[0] == "person"
