"""Dataset errors that name the file and the problem, and the bookkeeping of skipped images.

Every loader raises `DatasetError` (a ValueError) for bad input, with the offending file in the
message, so a failure inside a DataLoader worker reads as "<file>: <problem>" rather than a traceback
from deep inside numpy or Pillow. Loaders built with `skip_bad=True` instead record `(file, problem)`
pairs; `skip_summary` turns such a list into the one line a training loop prints.
"""

from collections import Counter
from collections.abc import Sequence
from pathlib import Path


class DatasetError(ValueError):
    """Bad dataset input: the file (or file and key) at fault and what is wrong with it.

    Args:
        file: the file (image, PNG or JSON) the problem was found in.
        problem: "<kind>: <details>", e.g. "cannot decode image: image file is truncated"; the part
            before the first colon groups problems in `skip_summary`.

    Attributes:
        file: the file as a string.
        problem: the description.
    """

    def __init__(self, file: str | Path, problem: str | None = None):
        if problem is None:
            # One preformatted message: how torch's DataLoader re-raises a worker's exception
            # (the message then holds the worker's traceback, ending in "<file>: <problem>").
            self.file, self.problem = "", str(file)
            super().__init__(self.problem)
            return
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")

    def __reduce__(self):
        return type(self), (self.file, self.problem) if self.file else (self.problem,)


class DatasetFileNotFoundError(DatasetError, FileNotFoundError):
    """A file the dataset refers to does not exist (also catchable as FileNotFoundError)."""


def skip_summary(skipped: Sequence[tuple[str, str]], total: int, *, examples: int = 3) -> str:
    """One line describing skipped images, for logs and training-loop reports.

    Args:
        skipped: `(file, problem)` pairs, e.g. `dataset.skipped` or the pairs gathered from
            the `skipped` field of collated metas.
        total: number of images the dataset had before skipping.
        examples: how many individual `(file, problem)` pairs to quote.

    Returns:
        "skipped 0 of N images" or, e.g., "skipped 3 of 1000 images: image file not found (2),
        unknown category (1); e.g. a.png: image file not found; ...".
    """
    unique = list(dict.fromkeys((str(f), p) for f, p in skipped))
    if not unique:
        return f"skipped 0 of {total} images"
    kinds = Counter(problem.split(":")[0] for _, problem in unique)
    kinds_text = ", ".join(f"{kind} ({n})" for kind, n in kinds.most_common())
    quoted = "; ".join(f"{f}: {p}" for f, p in unique[:examples])
    return f"skipped {len(unique)} of {total} images: {kinds_text}; e.g. {quoted}"
