"""The reproduction report: ours beside the paper's, differences to the baseline, and an honest direction."""

import csv
import dataclasses
import io

import pytest

from m2f.reproduce.report import RowResult, markdown, row_values, to_csv, to_html
from m2f.reproduce.tables import TABLES


def table4a_results(cross_pq: float) -> list[RowResult]:
    rows = TABLES["table4a"].rows
    return [RowResult(rows[0], "done", {"PQ": 30.0, "AP": 10.0, "mIoU": 40.0}, notebook="rows/a/02_ablation.ipynb"),
            RowResult(rows[1], "done", {"PQ": cross_pq, "AP": 12.0, "mIoU": 35.0}),
            RowResult(rows[2], "failed", error="rows/c/02_ablation.ipynb cell 5: ValueError: bad")]


def test_markdown_judges_every_metric_against_the_baseline():
    text = markdown(TABLES["table4a"], "tiny", table4a_results(20.0), setting="test")
    line = next(ln for ln in text.splitlines() if ln.startswith("| - masked attention"))
    # PQ 20 vs 30 (paper 47.1 vs 51.9): both lower; AP 12 vs 10 (paper 37.8 vs 43.7): opposite.
    assert "20.0 / 47.1" in line and "PQ -10.0 / -4.8" in line
    assert "PQ sign agrees (1 seed)" in line and "AP sign disagrees (1 seed)" in line
    assert "mIoU sign agrees (1 seed)" in line
    assert "the sign agrees with the paper in 2 of 3 comparisons, but one seed cannot separate" in text
    assert "## Failed rows" in text and "cell 5: ValueError: bad" in text
    assert "[Mask2Former (ours)](rows/a/02_ablation.ipynb)" in text


def test_rows_m2f_does_not_implement_keep_the_paper_number():
    # Every row of the tables trains since SMCA became a config value; one without a variant still must show
    # the paper's number.
    table = TABLES["table4c"]
    table = dataclasses.replace(table, rows=tuple(dataclasses.replace(row, variant=None) if row.label == "SMCA"
                                                  else row for row in table.rows))
    results = [RowResult(row, "not implemented" if row.variant is None else "done",
                         {} if row.variant is None else {"PQ": 1.0}) for row in table.rows]
    line = next(ln for ln in markdown(table, "tiny", results, setting="").splitlines() if ln.startswith("| SMCA"))
    assert "n/i / 47.2" in line


def test_fractions_keep_two_decimals_and_a_missing_paper_number_says_so():
    table = TABLES["figure1"]
    results = [RowResult(table.rows[0], "done", {"fg_1/32": 0.48, "fg_1/16": 0.58, "fg_1/8": 0.66, "fg_mean": 0.57}),
               RowResult(table.rows[1], "done", {"fg_1/32": 0.15, "fg_1/16": 0.15, "fg_1/8": 0.17, "fg_mean": 0.16})]
    line = next(ln for ln in markdown(table, "tiny", results, setting="").splitlines() if ln.startswith("| cross"))
    assert "fg_1/32 -0.33 / -0.30" in line  # one decimal would print -0.3 / -0.3
    figure3 = TABLES["figure3"]
    line = next(ln for ln in markdown(figure3, "tiny", [RowResult(figure3.rows[0], "done", {"AR@100": 28.0})],
                                      setting="").splitlines() if ln.startswith("| Mask2Former"))
    assert "28.0 / n/a" in line


def test_csv_and_html_hold_one_record_per_row_and_metric():
    table, results = TABLES["table4a"], table4a_results(20.0)
    records = list(csv.DictReader(io.StringIO(to_csv(table, results))))
    assert len(records) == 3 * 3
    cross = {r["metric"]: r for r in records if r["row"] == "- masked attention"}
    assert float(cross["PQ"]["paper"]) == table.rows[1].paper["PQ"]
    assert float(cross["AP"]["baseline_diff"]) == pytest.approx(2.0)
    assert cross["AP"]["verdict"] == "sign disagrees (1 seed)"
    assert cross["AP"]["seeds"] == "1" and cross["AP"]["values"] == "12" and cross["AP"]["table"] == "table4a"
    page = to_html(table, "tiny", results)
    assert page.count("<tr>") == 1 + len(records)


def test_row_values_reports_training_memory_in_gigabytes():
    summary = {"PQ": 40.0, "AR@100": 50.0, "train": {"peak_memory_mb": 512.0}}
    assert row_values(summary, ("PQ", "AP", "memory_gb")) == {"PQ": 40.0, "memory_gb": 0.5}


def test_a_row_is_done_only_with_the_same_params_and_its_inputs_in_place(tmp_path):
    import os

    from m2f.reproduce.jobs import Job, is_done

    checkpoint = tmp_path / "run" / "checkpoint.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"x")
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "params.json").write_text('{"seed": 0}')
    os.utime(checkpoint, ns=(1, 1))

    def job(params):
        return Job("row", "02_ablation.ipynb", tmp_path, params, inputs=(checkpoint,))

    assert is_done(job({"seed": 0}))
    assert not is_done(job({"seed": 1}))                                  # other parameters
    os.utime(checkpoint, ns=(2**62, 2**62))
    assert not is_done(job({"seed": 0}))                                  # retrained after the metrics
    checkpoint.unlink()
    assert not is_done(job({"seed": 0}))                                  # a fresh clone: no checkpoint


def test_reuse_recorded_keeps_a_row_without_its_checkpoint_but_not_a_retrained_or_changed_one(tmp_path):
    import os
    from dataclasses import replace

    from m2f.reproduce.jobs import Job, is_done
    from m2f.reproduce.status import job_status

    checkpoint = tmp_path / "run" / "checkpoint.pth"
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "params.json").write_text('{"seed": 0}')
    strict = Job("row", "02_ablation.ipynb", tmp_path, {"seed": 0}, inputs=(checkpoint,))
    recorded = replace(strict, reuse_recorded=True)
    assert not is_done(strict) and is_done(recorded)                      # committed metrics, no checkpoint
    state, detail = job_status(strict)
    assert state == "pending" and "not on this machine" in detail and "--reuse-recorded" in detail
    assert job_status(recorded) == ("done", str(tmp_path))
    assert not is_done(replace(recorded, params={"seed": 1}))              # other parameters: retrained anyway
    assert "parameters changed" in job_status(replace(recorded, params={"seed": 1}))[1]
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"x")
    os.utime(checkpoint, ns=(2**62, 2**62))
    assert not is_done(recorded)                                          # retrained after the metrics
    assert "newer" in job_status(recorded)[1]
