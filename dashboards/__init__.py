"""Panel dashboards over m2f runs (see docs/dashboards.md); each module is also a `panel serve` app."""
