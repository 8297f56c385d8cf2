"""Bad inputs a user can give, each with the behaviour it gets: a clear error naming the file or key (and the
fix), or a counted skip, never a traceback. docs/bad-inputs.md lists every row with its test; the dataset
rows not here are in tests/test_data_bad_input.py, the weight files in tests/test_safe_loading.py."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from m2f import cli
from m2f.checkpoint import save_atomic
from m2f.config import get_config
from m2f.data import DatasetError, build_dataset
from m2f.data.synthetic import generate
from m2f.model import build_model
from m2f.run_dir import RunDir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, num_train=4, num_val=2, image_size=64, seed=0)
    return root


def copy_of(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    return root


def run_cli(capsys, *argv):
    """Runs `m2f ARGV` in this process; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err


# --set VALUE -> the words the one-line error must contain.
BAD_VALUES = {
    "train.checkpoint_period=0": "train.checkpoint_period=0 (must be at least 1)",
    "train.log_period=0": "train.log_period=0 (must be at least 1)",
    "model.num_queries=-1": "model.num_queries=-1 (must be at least 1)",
    "model.num_queries=0": "model.num_queries=0 (must be at least 1)",
    "data.image_size=0": "data.image_size=0 (must be at least 1 (pixels))",
    "train.max_iters=0": "train.max_iters=0 (must be at least 1)",
    "train.max_iters=-5": "train.max_iters=-5 (must be at least 1)",
    "train.batch_size=0": "train.batch_size=0 (must be at least 1)",
    "train.lr=nan": "train.lr=nan (must be finite and positive)",
    "train.lr=-1": "train.lr=-1.0 (must be finite and positive)",
    "model.hidden_dim=66": "model.hidden_dim=66 (must be positive and divisible by model.nheads=4)",
    "model.attention=masked_typo": "must be one of",
    "train.max_iters=many": "config key 'train.max_iters' expects int, got 'many'",
    "train.max_iter=5": "unknown config key 'train.max_iter'",
}


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_bad_config_values_fail_before_anything_runs(override, data, tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--data", data, "--out", tmp_path / "run", "--set", override)
    assert code == 2 and BAD_VALUES[override] in err, err
    assert not (tmp_path / "run").exists()  # nothing was created, no iteration ran


# config file content -> the words the error must contain (besides the file name).
BAD_CONFIG_FILES = {
    '{"train": {"lr": "fast"}}': "config key 'train.lr' expects float, got 'fast'",
    '{"train": {"max_iter": 5}}': "unknown config key 'train.max_iter'",
    '{"train": 5}': "'train' is a section; set one of its fields instead",
    "[1, 2]": "must hold a JSON object of sections",
    "train: {lr: 1}": "is not valid JSON",
}


@pytest.mark.parametrize("content", list(BAD_CONFIG_FILES))
def test_bad_config_files_name_the_file_and_the_key(content, data, tmp_path, capsys):
    path = tmp_path / "my config.json"
    path.write_text(content)
    code, err = run_cli(capsys, "train", "--config", path, "--data", data, "--out", tmp_path / "run")
    assert code == 2 and str(path) in err and BAD_CONFIG_FILES[content] in err, err


def test_a_config_file_of_another_run_trains_what_it_says(data, tmp_path):
    # The good path of the same reader: a run's config.json round-trips exactly.
    from m2f.config import load_config_file

    cfg = get_config("tiny", [f"data.root={data}", "model.attention=cross", "train.lr_steps=0.5,0.75"])
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert load_config_file(tmp_path / "config.json") == cfg


def test_dataset_arguments(data, tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--out", tmp_path / "run")  # the tiny preset has no data.root
    assert code == 2 and "no dataset given: pass --data DIR" in err and "m2f data synth" in err
    code, err = run_cli(capsys, "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert code == 2 and f"dataset root {tmp_path / 'nowhere'} (data.root) does not exist" in err
    code, err = run_cli(capsys, "train", "--data", data, "--set", f"data.root={tmp_path}", "--out", tmp_path / "r")
    assert code == 2 and "name different datasets; give one" in err
    code, err = run_cli(capsys, "train", "--config", "tinyy", "--data", data, "--out", tmp_path / "run")
    assert code == 2 and "unknown preset 'tinyy'; available presets:" in err and "\"" not in err


def test_output_paths_that_cannot_be_run_directories(data, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("x")
    code, err = run_cli(capsys, "train", "--data", data, "--out", file, "--set", "train.max_iters=1")
    assert code == 2 and f"--out {file} is a file, not a run directory" in err
    code, err = run_cli(capsys, "train", "--data", data, "--out", file / "run", "--set", "train.max_iters=1")
    assert code == 2 and f"cannot create the run directory {file / 'run'}: Not a directory" in err
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder only stops other users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, err = run_cli(capsys, "train", "--data", data, "--out", locked / "run", "--set", "train.max_iters=1")
        assert code == 2 and "Permission denied" in err


def test_zero_byte_and_symlink_loop_images_are_named(data, tmp_path):
    root = copy_of(data, tmp_path)
    first, second = sorted((root / "train2017").iterdir())[:2]
    first.write_bytes(b"")
    second.unlink()
    second.symlink_to(second)
    with pytest.raises(DatasetError, match="symbolic link loop"):
        build_dataset("coco_panoptic", root, "train", task="panoptic")
    second.unlink()
    shutil.copy(sorted((data / "train2017").iterdir())[1], second)
    dataset = build_dataset("coco_panoptic", root, "train", task="panoptic")
    with pytest.raises(DatasetError, match=rf"{first.name}: cannot decode image: the file is empty \(0 bytes\)"):
        dataset.load(0)


def test_non_ascii_file_names_load(data, tmp_path):
    root = copy_of(data, tmp_path)
    annotations = root / "annotations" / "panoptic_train2017.json"
    content = json.loads(annotations.read_text())
    name = "straße_日本_ünïcode.png"
    (root / "train2017" / content["images"][0]["file_name"]).rename(root / "train2017" / name)
    content["images"][0]["file_name"] = name
    annotations.write_text(json.dumps(content, ensure_ascii=False))
    item = build_dataset("coco_panoptic", root, "train", task="panoptic")[0]
    assert item["file_name"] == name and item["masks"].shape[0] > 0


def test_segments_info_ids_absent_from_the_png_are_an_error_or_a_counted_skip(data, tmp_path):
    root = copy_of(data, tmp_path)
    annotations = root / "annotations" / "panoptic_train2017.json"
    content = json.loads(annotations.read_text())
    for segment in content["annotations"][0]["segments_info"]:
        segment["id"] += 10**6  # ids the PNG does not hold: the image would train as an empty one
    annotations.write_text(json.dumps(content))
    dataset = build_dataset("coco_panoptic", root, "train", task="panoptic")
    with pytest.raises(DatasetError, match="segments_info ids mismatch: none of the ids in segments_info"):
        dataset[0]
    skipping = build_dataset("coco_panoptic", root, "train", task="panoptic", skip_bad=True)
    skipping[0]
    assert skipping.skip_summary().startswith("skipped 1 of 4 images: segments_info ids mismatch")


def test_instances_json_without_segmentation_is_a_clear_error(data, tmp_path, capsys):
    root = copy_of(data, tmp_path)
    instances = root / "annotations" / "instances_val2017.json"
    content = json.loads(instances.read_text())
    for annotation in content["annotations"]:
        del annotation["segmentation"]
    instances.write_text(json.dumps(content))
    code, err = run_cli(capsys, "eval-files", "instance", instances, instances)
    assert code == 2 and f"{instances}: annotations[0]" in err and "lack 'segmentation'" in err


def test_a_moved_run_finds_its_dataset(data, tmp_path):
    """Runs store the data.root they were trained with: relative to a notebook's folder (older runs) or
    absolute on another clone. A run that travelled with its dataset still finds it."""
    clone = tmp_path / "elsewhere" / "m2f"
    shutil.copytree(data, clone / "results" / "tiny" / "data")
    run = RunDir.at(clone / "results" / "tiny" / "rows" / "panoptic-masked" / "run")
    run.root.mkdir(parents=True)
    found = str((clone / "results" / "tiny" / "data").resolve())
    assert run.data_root("../results/tiny/data") == found  # made from notebooks/
    assert run.data_root("/home/someone/m2f/results/tiny/data") == found  # made in another clone
    assert run.data_root(str(data)) == str(data.resolve())  # still where it was
    assert run.data_root("/nowhere/at/all") == ""


HUGE = 8000


def test_evaluating_a_huge_image_fails_clearly_before_allocating_under_a_memory_limit(data, tmp_path):
    """An 8000x8000 validation image at the original size would need ~22 GB with the tiny preset (it was
    an OOM kill without a message); under a 4 GiB address-space limit the test sets, `m2f eval` evaluates
    the normal image, then stops at the huge one with a message, and its memory stays under the limit."""
    root = copy_of(data, tmp_path)
    panoptic = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    image, annotation = panoptic["images"][-1], panoptic["annotations"][-1]
    photo = Image.open(root / "val2017" / image["file_name"]).resize((HUGE, HUGE))
    photo.save(root / "val2017" / image["file_name"], compress_level=1)
    png = root / "annotations" / "panoptic_val2017" / annotation["file_name"]
    Image.open(png).resize((HUGE, HUGE), Image.NEAREST).save(png, compress_level=1)
    for file in ("panoptic_val2017.json", "instances_val2017.json"):
        content = json.loads((root / "annotations" / file).read_text())
        content["images"][-1].update(height=HUGE, width=HUGE)
        (root / "annotations" / file).write_text(json.dumps(content))
    cfg = get_config("tiny", [f"data.root={root}", "data.num_workers=0"])
    save_atomic({"model": build_model(cfg).state_dict(), "config": cfg.to_dict()}, tmp_path / "model.pth")
    limit = 4 * 2**30
    script = f"""
import resource, sys
from m2f import cli
from m2f.memory import _status_bytes
# The limit counts from what the interpreter, torch and m2f already reserved.
resource.setrlimit(resource.RLIMIT_AS, (_status_bytes("VmSize") + {limit}, resource.RLIM_INFINITY))
cli.main(["eval", {str(tmp_path / "model.pth")!r}])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"{image['file_name']} is {HUGE}x{HUGE} pixels: evaluating it at its original size" in result.stderr
    assert "evaluate:  50%" in result.stderr  # the first, normal image was evaluated under the same limit
