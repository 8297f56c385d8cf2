"""The report of a reproduced table: ours (mean, spread and every seed) beside the paper's, and a verdict.

Every metric of every row is compared with the table's baseline row and with the paper's direction by
`m2f.reproduce.verdict` (Welch's t-test over the seeds: agrees / within noise / disagrees). Figures also
carry their own claims (computed by their notebook once per seed, `m2f.reproduce.figures`).

The same records give TABLE.md, TABLE.csv (long format: one line per row and metric) and TABLE.html.
"""

import csv
import html
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from m2f.reproduce.tables import Row, Table
from m2f.reproduce.verdict import TEST, UNTESTED, VERDICTS, compare, mean_std

COLUMNS = ("table", "row", "metric", "seeds", "mean", "std", "values", "paper", "baseline_diff", "ci_low", "ci_high",
           "paper_diff", "verdict", "status")


@dataclass
class RowResult:
    """What running one row (all its seeds) gave.

    Args:
        row: the table row.
        status: "done", "failed", "pending" (some seeds not run yet), "not implemented" or "not at this scale".
        values: metric -> our value (the mean over `samples` when there are several seeds).
        error: for failed rows, the notebook, the cell and the exception (of every failed seed).
        notebook: the executed notebook of the first seed (relative to the report).
        samples: metric -> the value of every finished seed, in seed order (empty: `values` is one seed).
        seeds: the seeds behind `samples`.
        notebooks: the executed notebook of every seed.
    """

    row: Row
    status: str
    values: dict[str, float] = field(default_factory=dict)
    error: str = ""
    notebook: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    notebooks: list[str] = field(default_factory=list)

    def values_of(self, metric: str) -> list[float]:
        """Every seed's value of `metric` ([] when it was not measured)."""
        if metric in self.samples:
            return self.samples[metric]
        return [self.values[metric]] if metric in self.values else []


def row_values(summary: dict[str, Any], metrics: tuple[str, ...]) -> dict[str, float]:
    """A run summary (`m2f.experiment.summarize`) reduced to a table's metrics."""
    values = {m: summary[m] for m in metrics if isinstance(summary.get(m), (int, float))}
    if "memory_gb" in metrics and summary.get("train", {}).get("peak_memory_mb"):
        values["memory_gb"] = summary["train"]["peak_memory_mb"] / 1024
    return values


def comparisons(table: Table, results: list[RowResult]) -> list[dict[str, Any]]:
    """One record per (row, metric), the `COLUMNS`: our seeds' statistics, the paper's number, the
    difference to the baseline row with its 95% interval, the paper's difference, the verdict."""
    base = next((r for r in results if r.row.baseline), None)
    records = []
    for result in results:
        for metric in table.metrics:
            ours, paper = result.values_of(metric), result.row.paper.get(metric)
            if not ours and paper is None:
                continue
            mean, std = mean_std(ours) if ours else (None, None)
            record = {"table": table.name, "row": result.row.label, "metric": metric, "seeds": len(ours),
                      "mean": mean, "std": std, "values": ";".join(f"{v:.6g}" for v in ours), "paper": paper,
                      "baseline_diff": None, "ci_low": None, "ci_high": None, "paper_diff": None, "verdict": "",
                      "status": result.status}
            if base is not None and result is not base:
                paper_base = base.row.paper.get(metric)
                if paper is not None and paper_base is not None:
                    record["paper_diff"] = paper - paper_base
                comparison = compare(ours, base.values_of(metric), paper, paper_base)
                if comparison is not None:
                    record.update(baseline_diff=comparison.diff, ci_low=comparison.low, ci_high=comparison.high,
                                  verdict=comparison.verdict)
            records.append(record)
    return records


def verdict_counts(verdicts: list[str]) -> dict[str, int]:
    """{"agrees", "within noise", "disagrees", "1 seed"}: how many judged comparisons gave each."""
    counts = Counter(verdicts)
    return {**{v: counts[v] for v in VERDICTS}, "1 seed": sum(counts[v] for v in UNTESTED)}


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    # Fractions (attention mass, 0-1) need two decimals where percentages (PQ, AP) need one.
    digits = 1 if abs(value) >= 1 or value == 0 else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _ours(record: dict[str, Any]) -> str:
    if record["mean"] is None:
        return ""
    return _fmt(record["mean"]) + (f" ± {_fmt(record['std'])}" if record["seeds"] > 1 else "")


def _delta(record: dict[str, Any]) -> str:
    ours = _fmt(record["baseline_diff"], True) or "?"
    if record["ci_low"] is not None:
        ours += f" [{_fmt(record['ci_low'], True)}, {_fmt(record['ci_high'], True)}]"
    return f"{record['metric']} {ours} / {_fmt(record['paper_diff'], True) or '?'}"


def markdown(table: Table, scale: str, results: list[RowResult], *, setting: str,
             claims: list[dict[str, Any]] = (), figures: list[str] = (),
             costs: dict[str, dict[str, float]] | None = None) -> str:
    """The report as markdown: the table, the verdicts and their test, every seed's values, the model costs
    (`m2f.reproduce.costs`, when given), the figure(s), the failures, the notebooks."""
    records = comparisons(table, results)
    by_row: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_row.setdefault(record["row"], {})[record["metric"]] = record
    seeds = max([r["seeds"] for r in records] + [k + 1 for r in results for k in r.seeds], default=0)
    head = ["row", *[f"{m} ours / paper" for m in table.metrics], "Δ vs baseline: ours [95% interval] / paper",
            "verdict"]
    lines = [f"# {table.name}: {table.title}", "", f"Scale **{scale}**. {setting}", ""]
    if table.claim:
        lines += [f"Paper's finding: {table.claim}", ""]
    if seeds > 1:
        lines += [f"Ours: mean ± standard deviation over {seeds} seeds (every seed's value below).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        cells = by_row.get(result.row.label, {})
        values = []
        for metric in table.metrics:
            record = cells.get(metric)
            ours = (_ours(record) if record else "") or _status(result)
            values.append(f"{ours} / {(_fmt(record['paper']) if record else '') or 'n/a'}")
        deltas = "; ".join(_delta(r) for r in cells.values()
                           if r["baseline_diff"] is not None or r["paper_diff"] is not None)
        verdict = ", ".join(f"{m} {r['verdict']}" for m, r in cells.items() if r["verdict"])
        label = result.row.label + (" (baseline)" if result.row.baseline else "")
        lines.append("| " + " | ".join([label, *values, deltas, verdict]) + " |")
    judged = [r["verdict"] for r in records if r["verdict"]]
    lines += [""]
    if judged:
        counts = verdict_counts(judged)
        if counts["1 seed"]:
            lines.append(f"**One seed: the sign agrees with the paper in {judged.count(UNTESTED[0])} "
                         f"of {counts['1 seed']} comparisons, but one seed cannot separate an effect from noise** "
                         "(`--seeds N` with N >= 2 gives a test).")
        if len(judged) > counts["1 seed"]:
            lines.append(f"**Verdicts: {counts['agrees']} agree, {counts['within noise']} within noise, "
                         f"{counts['disagrees']} disagree** (of {len(judged) - counts['1 seed']} comparisons with "
                         f"the paper's direction). Test: {TEST}; 'agrees' / 'disagrees' need the interval to "
                         "exclude 0. Welch because two rows' seeds are independent trainings (nothing to pair) "
                         "whose spread may differ.")
    for claim in claims:
        if claim.get("seeds", 1) > 1:
            verdict = f"agrees in {claim['agree_count']} of {claim['seeds']} seeds"
        else:
            verdict = "agrees" if claim["agrees"] else "does NOT agree"
        lines.append(f"- {claim['claim']}: ours {claim['ours']} - **{verdict}**")
    if costs:
        lines += ["", *_cost_lines(table, costs)]
    for figure in figures:
        lines += ["", f"![{table.name}]({figure})"]
    if seeds > 1:
        lines += ["", "## Every seed", "", "| row | metric | " + " | ".join(f"seed {i}" for i in range(seeds)) + " |",
                  "|" + "---|" * (seeds + 2)]
        for result in results:  # by seed number, so that a seed still to train shows where it belongs
            for metric in table.metrics:
                by_seed = dict(zip(result.seeds or [0], result.values_of(metric)))
                if by_seed:
                    cells = [_fmt(by_seed[k]) if k in by_seed else "pending" for k in range(seeds)]
                    lines.append(f"| {result.row.label} | {metric} | " + " | ".join(cells) + " |")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        lines += ["", "## Failed rows", ""] + [f"- {r.row.label}: {r.error}" for r in failed]
    pending = [r for r in results if r.status == "pending"]
    if pending:
        lines += ["", "## Rows still to train", "", "A row with some seeds done reports those seeds above.", ""]
        lines += [f"- **{r.row.label}**: {r.error}" for r in pending]
    notebooks = [r for r in results if r.notebook]
    if notebooks:
        lines += ["", "Executed notebooks: " + ", ".join(_notebook_links(r) for r in notebooks)]
    return "\n".join(lines) + "\n"


def _cost_lines(table: Table, costs: dict[str, dict[str, float]]) -> list[str]:
    from m2f.reproduce.costs import SIZE

    base = next((costs.get(r.label) for r in table.rows if r.baseline), None)
    lines = [f"## Model cost in the paper's configuration (R50, instance task, one {SIZE[0]}x{SIZE[1]} image)", "",
             "Counted, not trained: the paper's FLOPs column, for the final prediction as `m2f.predict` runs it "
             "(intermediate masks only where the attention masks read them). GFLOPs are multiply-adds, as the "
             "paper's counter (fvcore) counts them, of matrix products and convolutions (fvcore also counts "
             "norms and interpolation; neither sees the deformable attention's sampling; "
             "`m2f.reproduce.costs`).", "",
             "| row | parameters (M) | GFLOPs ours / paper | Δ vs baseline ours / paper |", "|---|---|---|---|"]
    paper_base = next((r.paper.get("GFLOPs") for r in table.rows if r.baseline), None)
    for row in table.rows:
        cost, paper = costs.get(row.label), row.paper.get("GFLOPs")
        if cost is None:
            continue
        delta = ""
        if base is not None and not row.baseline:
            theirs = f"{paper - paper_base:+.0f}" if paper is not None and paper_base is not None else "?"
            delta = f"{cost['gflops'] - base['gflops']:+.0f} / {theirs}"
        lines.append(f"| {row.label} | {cost['parameters'] / 1e6:.1f} | {cost['gflops']:.0f} / "
                     f"{'n/a' if paper is None else f'{paper:.0f}'} | {delta} |")
    return lines


def _notebook_links(result: RowResult) -> str:
    link = f"[{result.row.label}]({result.notebook})"
    others = [(s, n) for s, n in zip(result.seeds, result.notebooks) if n and n != result.notebook]
    return link + (" (" + ", ".join(f"[seed {s}]({n})" for s, n in others) + ")" if others else "")


def _status(result: RowResult) -> str:
    return {"done": "-", "failed": "failed", "pending": "pending", "not implemented": "n/i",
            "not at this scale": "-"}[result.status]


def to_csv(table: Table, results: list[RowResult]) -> str:
    """The long format: one line per (row, metric) with the `COLUMNS`; `values` lists every seed's value
    separated by ';'."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows({k: _csv_cell(v) for k, v in r.items()} for r in comparisons(table, results))
    return out.getvalue()


def _csv_cell(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else "" if value is None else value


def to_html(table: Table, scale: str, results: list[RowResult]) -> str:
    """A standalone HTML page of the comparison records (one row per row and metric)."""
    records = comparisons(table, results)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r[k]))}</td>" for k in COLUMNS) + "</tr>"
                   for r in records)
    head = "".join(f"<th>{k}</th>" for k in COLUMNS)
    return (f"<!doctype html><meta charset='utf-8'><title>{table.name} ({scale})</title>"
            f"<h1>{html.escape(table.title)} ({scale})</h1><p>{html.escape(table.claim)}</p>"
            f"<p>Verdict test: {html.escape(TEST)}.</p>"
            f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table>")


def _cell(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else "" if value is None else str(value)
