"""Checks on the Bokeh models a dashboard renders (`viewable.get_root()`), shared by the browser-free
and the browser tests: where legends sit, whether axes are named (issue 21)."""

from typing import Any


def legends_beside_the_data(root: Any) -> tuple[list[Any], int]:
    """Every Bokeh figure under `root`, asserting that no legend lies inside a plot frame (Bokeh's
    `center` layout: drawn over the data) and that every axis has a label.

    Returns:
        (the figures, the number of legends, all in the figures' right panels).
    """
    from bokeh.models import Legend
    from bokeh.plotting import figure

    figures = list(root.select({"type": figure}))
    legends = 0
    for fig in figures:
        assert not [m for m in fig.center if isinstance(m, Legend)], f"a legend over the data of {fig.title.text!r}"
        legends += len([m for m in fig.right if isinstance(m, Legend)])
        for axis in (*fig.xaxis, *fig.yaxis):
            if axis.visible:
                assert axis.axis_label, f"an unnamed axis in {fig.title.text!r}"
    return figures, legends
