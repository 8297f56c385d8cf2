"""All m2f dashboards in one page, one tab each: attention explorer, query proposals, per-layer metrics.

    m2f dashboard RUN_DIR [RUN_DIR ...]                      # or:
    panel serve dashboards/app.py --args RUN_DIR [RUN_DIR ...]

The files here are scripts that import each other by module name (common, attention, ...): `panel serve`
puts the served file's folder first on sys.path. In JupyterLab put that folder there yourself, then
`from common import extensions; extensions(inline=True)` and `build_app([...])` as the cell's last
expression (see docs/dashboards.md).
"""

import panel as pn

# The modules beside this file: `panel serve` runs a dashboard with its own folder first on sys.path.
from attention import AttentionExplorer
from common import alert, extensions, runs_from_args
from layer_metrics import LayerMetrics
from proposals import ProposalsExplorer


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
