"""SUMMARY.md and SUMMARY.csv: for every reproduced table and figure, how many directions agree with the
paper, are within noise, or disagree (and how many rest on one seed, untested), with the totals.

It is rebuilt from the TABLE.csv files in the output folder after every `m2f reproduce`, so it covers
every table reproduced there, whichever invocation made it.
"""

import csv
import io
from pathlib import Path

from m2f.reproduce.report import verdict_counts
from m2f.reproduce.tables import TABLES
from m2f.reproduce.verdict import TEST

FIELDS = ("table", "comparisons", "agrees", "within noise", "disagrees", "1 seed", "seeds")


def summarize_folder(out: Path) -> list[dict[str, object]]:
    """One record per table with a long-format TABLE.csv in `out` (in `TABLES` order), then the total."""
    records = []
    for name in TABLES:
        path = out / f"{name}.csv"
        if not path.is_file():
            continue
        reader = csv.DictReader(io.StringIO(path.read_text()))
        if "verdict" not in (reader.fieldnames or ()):
            continue  # written before verdicts existed; `m2f reproduce NAME` rewrites it
        lines = list(reader)
        verdicts = [ln["verdict"] for ln in lines if ln["verdict"]]
        seeds = sorted({int(ln["seeds"]) for ln in lines if ln["seeds"] and int(ln["seeds"]) > 0})
        records.append({"table": name, "comparisons": len(verdicts), **verdict_counts(verdicts),
                        "seeds": "/".join(map(str, seeds))})
    if records:
        total = {"table": "total", "seeds": ""}
        for key in FIELDS[1:-1]:
            total[key] = sum(int(r[key]) for r in records)
        records.append(total)
    return records


def write_summary(out: Path) -> Path:
    """Writes out/SUMMARY.md and out/SUMMARY.csv; returns the .md path."""
    records = summarize_folder(out)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(FIELDS))
    writer.writeheader()
    writer.writerows(records)
    (out / "SUMMARY.csv").write_text(text.getvalue())
    lines = ["# Reproduction summary", "",
             "Every metric of every row against the table's baseline row, in the direction the paper reports. "
             f"Test: {TEST}. 'agrees' / 'disagrees': the interval excludes 0 with the paper's / the opposite "
             "sign; 'within noise': it contains 0; '1 seed': only one training per row, the sign alone, which "
             "cannot separate an effect from noise.", "",
             "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    for r in records:
        name = f"[{r['table']}]({r['table']}.md)" if r["table"] != "total" else "**total**"
        lines.append("| " + " | ".join([name, *(str(r[k]) for k in FIELDS[1:])]) + " |")
    path = out / "SUMMARY.md"
    path.write_text("\n".join(lines) + "\n")
    return path
