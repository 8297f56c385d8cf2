"""Reproducing the paper's tables and figures: the tables as data, scales, the grid of notebooks, launchers, reports.

    m2f reproduce --list
    m2f reproduce table4a --scale tiny --seeds 3           # -> results/tiny/table4a.md (.csv, .html), SUMMARY.md
    m2f reproduce table4a --jobs 2                         # two rows/seeds at a time, each on its share of the cores
    m2f reproduce table4a --launcher slurm --jobs 8 --gpus-per-job 8 --partition gpu
    m2f reproduce table4a --status                         # pending / running (job id) / done / failed (log)
"""

from m2f.reproduce.launcher import Local
from m2f.reproduce.runner import DEFAULT_SEEDS, list_tables, plan, reproduce
from m2f.reproduce.scales import SCALES, experiment_config, prepare_data
from m2f.reproduce.slurm import Slurm
from m2f.reproduce.status import format_status, status
from m2f.reproduce.tables import TABLES, VARIANTS

__all__ = ["DEFAULT_SEEDS", "SCALES", "TABLES", "VARIANTS", "Local", "Slurm", "experiment_config", "format_status",
           "list_tables", "plan", "prepare_data", "reproduce", "status"]
