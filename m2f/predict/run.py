"""`m2f predict`: image files, folders and globs in; per image an overlay and COCO result files out.

Images are read a batch at a time, so memory does not grow with the number of inputs. A folder that
already holds an image's overlay and results (`OutputPaths.finished`) skips it, so an interrupted
run continues where it stopped; the combined JSON files are rebuilt from all per-image files at the end.
"""

import glob
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from m2f.data.categories import Categories
from m2f.postprocess import Task

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files of `inputs`: files as given, folders searched recursively for image suffixes,
    and glob patterns (`**` allowed); in order, without repeats.

    Raises:
        FileNotFoundError: an input that is none of these, or matches nothing.
        ValueError: two inputs with the same file stem (their results would overwrite each other).
    """
    files: list[Path] = []
    for item in map(str, inputs):
        path = Path(item).expanduser()
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            raise FileNotFoundError(f"input {item} is not a file, folder or glob pattern that exists")
        if not found:
            raise FileNotFoundError(f"input {item} has no image files ({', '.join(IMAGE_SUFFIXES)})")
        files += found
    unique = list(dict.fromkeys(p.resolve() for p in files))
    stems: dict[str, Path] = {}
    for p in unique:
        if p.stem in stems:
            raise ValueError(f"two inputs share the name {p.stem!r} ({stems[p.stem]} and {p}): the results are "
                             f"named by it; predict them into different --out folders")
        stems[p.stem] = p
    return unique


def predict_files(model: Any, inputs: Sequence[str | Path], *, task: Task, out: str | Path,
                  categories: Categories, batch_size: int = 1, image_ids: Mapping[str, int | str] | None = None,
                  min_score: float = 0.5, progress: bool = True) -> dict[str, Any]:
    """Predicts every input image into `out` (layout in `m2f.predict.files`), skipping finished ones.

    Args:
        model: the model (`load_weights`).
        inputs: files, folders, globs (`collect_inputs`).
        task: "panoptic", "instance" or "semantic".
        out: output folder.
        categories: the model's classes.
        batch_size: images per forward pass (padded to a common size inside a batch).
        image_ids: file name or stem -> COCO image id (`image_ids_from` a ground truth); default the stem.
        min_score: segments below it are not drawn (all are written to the result files).
        progress: show a tqdm progress bar.

    Returns:
        {"images", "predicted", "skipped", "results" (the combined JSON or None), "out"}.
    """
    from tqdm import tqdm

    from m2f.predict.draw import draw_prediction
    from m2f.predict.files import OutputPaths, assemble, image_id_of, read_input, write_results
    from m2f.predict.results import predict

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    files = collect_inputs(inputs)
    todo = [f for f in files if not OutputPaths(out, f.stem).finished(task)]
    if len(todo) < len(files):
        logger.info("predict: %d of %d images already done in %s, skipped", len(files) - len(todo), len(files), out)
    with tqdm(total=len(todo), desc=f"predict {task}", unit="image", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = []
            for file in batch:
                image, notes = read_input(file)
                for note in notes:
                    logger.warning("%s: %s", file.name, note)
                images.append(image)
            for file, image, prediction in zip(batch, images, predict(model, images, task=task, categories=categories)):
                paths = OutputPaths(out, file.stem)
                write_results(paths, prediction, image_id=image_id_of(file, image_ids), file_name=str(file))
                picture = draw_prediction(image, prediction, min_score=min_score)
                paths.overlay_png().parent.mkdir(parents=True, exist_ok=True)
                tmp = paths.overlay_png().with_name(f".{file.stem}.tmp.png")
                Image.fromarray(picture).save(tmp)
                tmp.replace(paths.overlay_png())  # last: its presence marks the image finished
            bar.update(len(batch))
    combined = assemble(out, [f.stem for f in files], task=task, categories=categories)
    return {"images": len(files), "predicted": len(todo), "skipped": len(files) - len(todo),
            "results": str(combined) if combined else None, "out": str(out)}
