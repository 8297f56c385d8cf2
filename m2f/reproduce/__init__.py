"""Reproducing the paper's tables and figures: the tables as data, scales, the papermill runner, reports.

    m2f reproduce --list
    m2f reproduce table4a --scale tiny      # -> results/tiny/table4a.md (.csv, .html)
"""

from m2f.reproduce.runner import list_tables, reproduce
from m2f.reproduce.scales import SCALES, experiment_config, prepare_data
from m2f.reproduce.tables import TABLES, VARIANTS

__all__ = ["SCALES", "TABLES", "VARIANTS", "experiment_config", "list_tables", "prepare_data", "reproduce"]
