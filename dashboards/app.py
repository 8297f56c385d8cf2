"""All m2f dashboards in one page, one tab each: attention explorer, query proposals, per-layer metrics.

    m2f dashboard RUN_DIR [RUN_DIR ...]                      # or:
    panel serve dashboards/app.py --args RUN_DIR [RUN_DIR ...]

In JupyterLab: `from dashboards.common import extensions; extensions(inline=True)`, then
`build_app([...])` as the cell's last expression (see docs/dashboards.md).
"""

import panel as pn

from dashboards.attention import AttentionExplorer
from dashboards.common import alert, extensions, runs_from_args
from dashboards.layer_metrics import LayerMetrics
from dashboards.proposals import ProposalsExplorer


def build_app(runs: list[str]) -> pn.Column:
    """The tabbed app over `runs` (run directories or checkpoint files)."""
    header = pn.pane.Markdown("## m2f dashboards", margin=(0, 10))
    notes = [] if runs else [alert("no runs given: start with `m2f dashboard RUN_DIR ...` or "
                                   "`panel serve dashboards/app.py --args RUN_DIR ...`", kind="warning")]
    tabs = pn.Tabs(("Attention", AttentionExplorer(runs=runs).panel()),
                   ("Proposals", ProposalsExplorer(runs=runs).panel()),
                   ("Per-layer metrics", LayerMetrics(runs=runs).panel()), dynamic=True)
    return pn.Column(header, *notes, tabs)


if pn.state.served:
    extensions()
    build_app(runs_from_args()).servable(title="m2f dashboards")
