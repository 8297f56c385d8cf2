"""Pieces every dashboard shares: the list of runs, the image picker, and turning errors into Alerts.

Runs come from `panel serve dashboards/app.py --args RUN_DIR ...` (sys.argv) or the `M2F_RUNS`
environment variable (paths separated by os.pathsep), or are given to the classes directly.
"""

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param

from m2f.capture import ImageRef, dataset_image, decode_upload, resize_for_run
from m2f.config import Config
from m2f.run_dir import RunDir

NO_RUN = "(none)"
# One style for every line plot: the legend outside the data, at the right; the width follows the window.
CURVE = {"responsive": True, "min_width": 380, "height": 300, "tools": ["hover"], "show_grid": True,
         "legend_position": "right"}


def layer_axis() -> hv.Dimension:
    """The x axis of per-layer plots, in the paper's numbering (the same in every dashboard and notebook)."""
    return hv.Dimension("prediction set", label="prediction set (0 = learnable queries, i = after decoder layer i)")


def plot_pane(obj: Any, **params: Any) -> pn.pane.HoloViews:
    """A HoloViews pane as wide as the page allows (responsive plots need a stretching pane)."""
    return pn.pane.HoloViews(obj, sizing_mode="stretch_width", **params)


def extensions(*, inline: bool = False) -> None:
    """Loads Panel's and HoloViews' bokeh JavaScript once. `inline=True` embeds it in the page, which
    notebooks without internet need (the default loads it from a CDN); `panel serve` serves it itself."""
    hv.extension("bokeh", inline=inline)
    pn.extension(inline=inline)


def runs_from_args(argv: list[str] | None = None) -> list[str]:
    """Run directories from the command line (`--args`), else from $M2F_RUNS."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a.strip()]
    if not args:
        args = [p for p in os.environ.get("M2F_RUNS", "").split(os.pathsep) if p.strip()]
    return [str(Path(a).expanduser()) for a in args]


def choose_among(parameter: param.Selector, objects: dict[str, str]) -> None:
    """Makes `parameter` a choice among `objects` only (label -> run path). A Selector declared with no
    objects accepts any value, so a hand-made websocket message could point a dashboard at any file on
    the server; checking on set keeps every run a dashboard opens one given on the command line."""
    parameter.objects = objects
    parameter.check_on_set = True


def categories(run: str) -> Any:
    """The run's categories (`m2f.data.Categories`: `.names` by class index, ids, ...): its dataset's when
    the dataset is on this machine, else the shipped table that fits its config (a converted released
    checkpoint names COCO's 133 or ADE20K's 150 classes; `m2f.data.metadata.categories_for`); None while
    the checkpoint does not load: class ids are then shown alone."""
    from m2f.data.metadata import categories_for

    try:
        return RunDir.existing(run).val_dataset().categories
    except (OSError, ValueError):
        pass
    try:
        return categories_for(RunDir.existing(run).load()[1])
    except (OSError, ValueError):
        return None


def run_config(run: str | None) -> Config | None:
    """The run's config, to size the widgets; None while the run does not load (its view shows the
    error as an Alert and the widgets keep their ranges)."""
    if run is None:
        return None
    try:
        return RunDir.existing(run).load()[1]
    except (OSError, ValueError):  # no run / no checkpoint yet, or one that does not load: the view says which
        return None


def alert(err: BaseException | str, *, kind: str = "danger") -> pn.pane.Alert:
    """A message box in the page (never a blank page or a server traceback)."""
    text = err if isinstance(err, str) else f"**{type(err).__name__}**: {err}"
    return pn.pane.Alert(text, alert_type=kind, sizing_mode="stretch_width")


def frame(height: int, width: int, *, size: int) -> dict[str, int]:
    """Plot frame options that keep an image's aspect, the longer side `size` pixels (at least 40 each)."""
    scale = size / max(height, width)
    return {"frame_width": max(round(width * scale), 40), "frame_height": max(round(height * scale), 40)}


def guarded(render: Callable[[], Any]) -> Any:
    """Calls a view's render function; any error becomes an Alert with its message. Catching
    everything is deliberate here: this is the UI boundary, where a traceback would blank the page."""
    try:
        return render()
    except Exception as err:  # see docstring
        return alert(err)


class ImagePicker(param.Parameterized):
    """Chooses the image the dashboards run the model on: a validation image of the run's dataset,
    or an uploaded file (PNG/JPEG; grayscale and odd sizes are converted, with a note)."""

    source = param.Selector(objects=["dataset", "upload"], default="dataset", label="Image source")
    image_index = param.Integer(default=0, bounds=(0, None), label="Validation image")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.upload = pn.widgets.FileInput(accept=".png,.jpg,.jpeg,.bmp,.tif,.tiff,.webp", multiple=False)
        self.upload.param.watch(self._on_upload, "value")
        self._uploaded: tuple[np.ndarray, list[str], str] | None = None

    def _on_upload(self, event: Any) -> None:
        self.source = "upload"
        self.param.trigger("source")

    def set_upload(self, data: bytes, name: str = "upload") -> None:
        """Uses uploaded image bytes (what the FileInput widget does; also for tests and notebooks)."""
        self.upload.filename = name
        self.upload.value = data

    def image(self, run: str) -> tuple[ImageRef, list[str]]:
        """The chosen image at `run`'s test size, and notes about conversions.

        Raises:
            ValueError / FileNotFoundError: an unreadable upload, no upload yet, or no dataset.
        """
        if self.source == "upload":
            if not self.upload.value:
                raise ValueError("no image uploaded yet: choose a file with the upload button")
            name = self.upload.filename or "upload"
            array, notes = decode_upload(self.upload.value, name=name)
            _, cfg = RunDir.existing(run).load()
            resized, more = resize_for_run(array, cfg, name=name)
            return ImageRef.from_array(resized, name=name), notes + more
        return dataset_image(run, self.image_index), []

    def widgets(self) -> pn.Column:
        return pn.Column(pn.widgets.RadioButtonGroup.from_param(self.param.source),
                         pn.widgets.IntInput.from_param(self.param.image_index), self.upload)
