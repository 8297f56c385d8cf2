"""Panel dashboards over m2f runs (see docs/dashboards.md); each module is also a `panel serve` app.

Installed with m2f as the `dashboards` package (pyproject.toml), so the apps import each other as
`dashboards.*` under `panel serve`, in JupyterLab and in tests alike, with no sys.path edits.
"""
