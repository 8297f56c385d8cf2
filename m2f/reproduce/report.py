"""The report of a reproduced table: ours beside the paper's, the differences, and the direction.

An ablation's *direction* agrees when removing or changing a component moves our metric the same
way as the paper's, both measured against the table's baseline row. A paper difference under
`NO_CHANGE` counts as "no change" and is not judged. Figures carry their own claims (computed by
their notebook, `m2f.reproduce.figures`).
"""

import csv
import html
import io
from dataclasses import dataclass, field
from typing import Any

from m2f.reproduce.tables import Row, Table

NO_CHANGE = 0.05  # differences smaller than this (in the metric's units) count as equal


@dataclass
class RowResult:
    """What running one row gave.

    Args:
        row: the table row.
        status: "done", "failed", "not implemented" or "not at this scale".
        values: metric -> our value (the table's metrics only).
        error: for failed rows, the notebook, the cell and the exception.
        notebook: the executed notebook (relative to the report).
    """

    row: Row
    status: str
    values: dict[str, float] = field(default_factory=dict)
    error: str = ""
    notebook: str = ""


def row_values(summary: dict[str, Any], metrics: tuple[str, ...]) -> dict[str, float]:
    """A run summary (`m2f.experiment.summarize`) reduced to a table's metrics."""
    values = {m: summary[m] for m in metrics if isinstance(summary.get(m), (int, float))}
    if "memory_gb" in metrics and summary.get("train", {}).get("peak_memory_mb"):
        values["memory_gb"] = summary["train"]["peak_memory_mb"] / 1024
    return values


def direction(ours: float | None, ours_base: float | None, paper: float | None, paper_base: float | None) -> str:
    """"agrees" / "disagrees" / "no change in ours" / "" (nothing to compare or no change in the paper)."""
    if None in (ours, ours_base, paper, paper_base):
        return ""
    d_paper, d_ours = paper - paper_base, ours - ours_base
    if abs(d_paper) < NO_CHANGE:
        return ""
    if abs(d_ours) < NO_CHANGE:
        return "no change in ours"
    return "agrees" if (d_ours > 0) == (d_paper > 0) else "disagrees"


def comparisons(table: Table, results: list[RowResult]) -> list[dict[str, Any]]:
    """One record per (row, metric): ours, paper, both differences to the baseline, direction."""
    base = next((r for r in results if r.row.baseline), None)
    records = []
    for result in results:
        for metric in table.metrics:
            ours, paper = result.values.get(metric), result.row.paper.get(metric)
            if ours is None and paper is None:
                continue
            record = {"row": result.row.label, "metric": metric, "ours": ours, "paper": paper, "status": result.status,
                      "delta_ours": None, "delta_paper": None, "direction": ""}
            if base is not None and result is not base:
                ours_base, paper_base = base.values.get(metric), base.row.paper.get(metric)
                if ours is not None and ours_base is not None:
                    record["delta_ours"] = ours - ours_base
                if paper is not None and paper_base is not None:
                    record["delta_paper"] = paper - paper_base
                record["direction"] = direction(ours, ours_base, paper, paper_base)
            records.append(record)
    return records


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    # Fractions (attention mass, 0-1) need two decimals where percentages (PQ, AP) need one.
    digits = 1 if abs(value) >= 1 or value == 0 else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(table: Table, scale: str, results: list[RowResult], *, setting: str,
             claims: list[dict[str, Any]] = (), figures: list[str] = ()) -> str:
    """The report as markdown: the table, the verdict, the figure(s), the failures, the notebooks."""
    records = comparisons(table, results)
    by_row: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_row.setdefault(record["row"], {})[record["metric"]] = record
    head = ["row", *[f"{m} ours / paper" for m in table.metrics], "Δ vs baseline: ours / paper", "direction"]
    lines = [f"# {table.name}: {table.title}", "", f"Scale **{scale}**. {setting}", ""]
    if table.claim:
        lines += [f"Paper's finding: {table.claim}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        cells = by_row.get(result.row.label, {})
        values = []
        for metric in table.metrics:
            record = cells.get(metric)
            ours = _fmt(record["ours"]) if record and record["ours"] is not None else _status(result)
            values.append(f"{ours} / {(_fmt(record['paper']) if record else '') or 'n/a'}")
        deltas = "; ".join(f"{m} {_fmt(r['delta_ours'], True) or '?'} / {_fmt(r['delta_paper'], True) or '?'}"
                           for m, r in cells.items() if r["delta_ours"] is not None or r["delta_paper"] is not None)
        verdict = ", ".join(f"{m} {r['direction']}" for m, r in cells.items() if r["direction"])
        label = result.row.label + (" (baseline)" if result.row.baseline else "")
        lines.append("| " + " | ".join([label, *values, deltas, verdict]) + " |")
    judged = [r for r in records if r["direction"]]
    agree = sum(r["direction"] == "agrees" for r in judged)
    lines += [""]
    if judged and not claims:  # a figure's claims already say it
        lines.append(f"**Direction agrees with the paper in {agree} of {len(judged)} comparisons.**")
    for claim in claims:
        verdict = "agrees" if claim["agrees"] else "does NOT agree"
        lines.append(f"- {claim['claim']}: ours {claim['ours']} - **{verdict}**")
    for figure in figures:
        lines += ["", f"![{table.name}]({figure})"]
    failed = [r for r in results if r.status == "failed"]
    if failed:
        lines += ["", "## Failed rows", ""] + [f"- {r.row.label}: {r.error}" for r in failed]
    notebooks = [r for r in results if r.notebook]
    if notebooks:
        lines += ["", "Executed notebooks: " + ", ".join(f"[{r.row.label}]({r.notebook})" for r in notebooks)]
    return "\n".join(lines) + "\n"


def _status(result: RowResult) -> str:
    return {"done": "-", "failed": "failed", "not implemented": "n/i", "not at this scale": "-"}[result.status]


def to_csv(table: Table, results: list[RowResult]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["row", "metric", "ours", "paper", "delta_ours", "delta_paper",
                                             "direction", "status"])
    writer.writeheader()
    writer.writerows(comparisons(table, results))
    return out.getvalue()


def to_html(table: Table, scale: str, results: list[RowResult]) -> str:
    """A standalone HTML page of the comparison records (one row per row and metric)."""
    records = comparisons(table, results)
    keys = ["row", "metric", "ours", "paper", "delta_ours", "delta_paper", "direction", "status"]
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r[k]))}</td>" for k in keys) + "</tr>" for r in records)
    head = "".join(f"<th>{k}</th>" for k in keys)
    return (f"<!doctype html><meta charset='utf-8'><title>{table.name} ({scale})</title>"
            f"<h1>{html.escape(table.title)} ({scale})</h1><p>{html.escape(table.claim)}</p>"
            f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table>")


def _cell(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else "" if value is None else str(value)
