"""The main job's report: our numbers beside the paper's, and an honest direction column."""

from m2f.demo import figure2, table4a_markdown


def rows(masked_pq: float, cross_pq: float):
    def row(label, pq, paper):
        return {"label": label, "PQ": pq, "AP": 1.0, "mIoU": 2.0, "paper_PQ": paper, "PQ_per_layer": [pq] * 10}
    return [row("Mask2Former (ours)", masked_pq, 51.9), row("- masked attention", cross_pq, 47.1)]


def test_an_ablation_that_lowers_pq_agrees_with_the_paper():
    table = table4a_markdown(rows(30.0, 20.0))
    assert "| - masked attention | 20.0 | 1.0 | 2.0 | 47.1 | -10.0 | -4.8 | agrees |" in table


def test_an_ablation_that_raises_pq_is_reported_as_disagreeing():
    assert "does NOT agree" in table4a_markdown(rows(20.0, 30.0))


def test_figure2_is_written(tmp_path):
    figure2(rows(30.0, 20.0), tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
