"""Runs are named from their config (issues 21, 22): legends, selectors and figure titles say what the
model is ("cross-attention, 50 queries"), not a notebook's default label or a long path."""

from m2f.config import get_config
from m2f.run_label import describe_model, path_label, short_names


def test_a_model_is_named_by_how_it_differs_from_its_preset():
    assert describe_model(get_config("tiny")) == "Mask2Former"
    assert describe_model(get_config("tiny", ["model.num_queries=50", "model.attention=cross"])) == \
        "cross-attention, 50 queries"
    assert describe_model(get_config("tiny", ["model.feature_scales=single_1/32"])) == "Mask2Former, single scale 1/32"
    assert describe_model(get_config("tiny", ["model.attention=mask_pooling", "model.dropout=0.1"])) == \
        "mask pooling, dropout=0.1"
    # The Table 4c / 4e comparison rows by their papers' names.
    assert describe_model(get_config("tiny", ["model.attention=smca"])) == "SMCA"
    assert describe_model(get_config("tiny", ["model.pixel_decoder=fapn", "model.num_queries=50"])) == \
        "Mask2Former, FaPN, 50 queries"


def _run(root, name, overrides):
    run = root / name / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(get_config("tiny", overrides).to_json())
    return str(run)


def test_short_names_come_from_the_config_and_tell_runs_apart(tmp_path):
    cross = _run(tmp_path, "panoptic-cross_attention", ["model.attention=cross"])
    a = _run(tmp_path, "panoptic-mask2former", [])
    b = _run(tmp_path, "quickstart", [])
    missing = str(tmp_path / "no_config")
    names = short_names([cross, a, b, missing])
    assert names == {cross: "cross-attention", a: "Mask2Former (panoptic-mask2former)",
                     b: "Mask2Former (quickstart)", missing: "no_config"}
    assert short_names([a]) == {a: "Mask2Former"}
    assert path_label(tmp_path / "x" / "run" / "checkpoint.pth") == "x"


def test_a_config_that_does_not_parse_falls_back_to_the_path(tmp_path):
    run = tmp_path / "broken"
    run.mkdir()
    (run / "config.json").write_text('{"model": {"num_queries": ')  # a run still writing it
    assert short_names([str(run)]) == {str(run): "broken"}
