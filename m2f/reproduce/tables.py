"""The paper's tables and figures as data: rows, the config each row trains, the paper's numbers.

A `Table` is reproduced by running one notebook per row (`m2f reproduce`). Rows are identified by
(task, variant), so a row shared by several tables (the full Mask2Former is the first row of
Tables 4a-4e, 5 and XI) is trained once. A figure is a table whose rows are trained by other tables
and whose own notebook analyses them.

Paper numbers are COCO val2017 / ADE20K val with R50 (Tables 4, 5, XI, XII, Figs. I, II, 3) as
printed in the paper. A row that m2f does not implement would be kept with `variant=None` (the table
shows the paper's number and says so); since SMCA (Table 4c) and Semantic FPN, FaPN and BiFPN (Table 4e)
became config values, every row of the tables below trains.
"""

from dataclasses import dataclass, field
from typing import Literal

from m2f.config import Config

# Notebook of each kind of table (in notebooks/).
QUICKSTART = "00_quickstart.ipynb"
MAIN = "01_main_results.ipynb"
ABLATION = "02_ablation.ipynb"
FIGURE_LAYERS = "03_figure_layers.ipynb"
FIGURE_PROPOSALS = "04_figure_proposals.ipynb"
FIGURE_ATTENTION = "05_figure_attention.ipynb"

# MaskFormer's standard Transformer decoder (Table XII b): 6 layers, self-attention first, cross-
# attention to 1/32 features only, dropout 0.1, zero-initialised queries without supervision.
MASKFORMER_DECODER = ("model.attention=cross", "model.feature_scales=single_1/32", "model.layer_order=self_first",
                      "model.dropout=0.1", "model.query_features=zero", "model.dec_layers=6")


@dataclass(frozen=True)
class Variant:
    """A model or training variant, as config overrides on a scale's base config.

    Args:
        overrides: "section.field=value" strings.
        query_factor: multiplies the base `model.num_queries` (Table XI: 50-1000 queries at paper scale
            are 0.5x-10x the default 100; the tiny preset's 20 queries scale the same way).
    """

    overrides: tuple[str, ...] = ()
    query_factor: float = 1.0

    def resolve(self, base: Config) -> list[str]:
        """The overrides for `base` (the query count made absolute)."""
        extra = [] if self.query_factor == 1.0 else [f"model.num_queries={round(base.model.num_queries * self.query_factor)}"]
        return [*self.overrides, *extra]


VARIANTS: dict[str, Variant] = {
    "mask2former": Variant(),
    "cross_attention": Variant(overrides=("model.attention=cross",)),
    "mask_pooling": Variant(overrides=("model.attention=mask_pooling",)),
    "smca": Variant(overrides=("model.attention=smca",)),
    "single_1_32": Variant(overrides=("model.feature_scales=single_1/32",)),
    "single_1_16": Variant(overrides=("model.feature_scales=single_1/16",)),
    "single_1_8": Variant(overrides=("model.feature_scales=single_1/8",)),
    "naive_multiscale": Variant(overrides=("model.feature_scales=naive_multiscale",)),
    "zero_query_features": Variant(overrides=("model.query_features=zero",)),
    "self_attention_first": Variant(overrides=("model.layer_order=self_first",)),
    "dropout": Variant(overrides=("model.dropout=0.1",)),
    "no_optimization_improvements": Variant(overrides=("model.query_features=zero", "model.layer_order=self_first",
                                                       "model.dropout=0.1")),
    "learnable_unsupervised_queries": Variant(overrides=("model.query_features=learnable",)),
    "fpn": Variant(overrides=("model.pixel_decoder=fpn",)),
    "semantic_fpn": Variant(overrides=("model.pixel_decoder=semantic_fpn",)),
    "fapn": Variant(overrides=("model.pixel_decoder=fapn",)),
    "bifpn": Variant(overrides=("model.pixel_decoder=bifpn",)),
    "maskformer_decoder_fpn": Variant(overrides=("model.pixel_decoder=fpn", *MASKFORMER_DECODER)),
    "mask_matching_mask_loss": Variant(overrides=("loss.point_matching=false", "loss.point_loss=false")),
    "point_matching_mask_loss": Variant(overrides=("loss.point_loss=false",)),
    "mask_matching_point_loss": Variant(overrides=("loss.point_matching=false",)),
    **{f"queries_x{f:g}": Variant(query_factor=f) for f in (0.5, 2.0, 3.0, 10.0)},
}


@dataclass(frozen=True)
class Row:
    """One row: a label, the variant that trains it (None: not implemented in m2f), the paper's numbers.

    Args:
        label: as printed in the paper.
        variant: a key of `VARIANTS`, or None.
        paper: metric -> the paper's value ("PQ", "AP", "mIoU", "memory_gb", ...; "GFLOPs", Table 4's FLOPs
            column, is a cost that the report counts rather than trains: `Table.costs`).
        task: which model is trained (Table 7 trains one per task).
        scales: the scales at which the row runs (backbone rows of Tables 1-3 only at paper scale).
        overrides: extra config overrides (e.g. a bigger backbone).
        tag: names the overrides in the row's key.
        baseline: the row the others are compared with.
    """

    label: str
    variant: str | None
    paper: dict[str, float] = field(default_factory=dict)
    task: str = "panoptic"
    scales: tuple[str, ...] = ("tiny", "small", "paper")
    overrides: tuple[str, ...] = ()
    tag: str = ""
    baseline: bool = False

    @property
    def key(self) -> str:
        """The row's identity across tables (its folder name under results/SCALE/rows/); rows with the
        same task, variant and overrides are the same experiment."""
        return f"{self.task}-{self.variant}" + (f"-{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class Table:
    """A paper table or figure reproduced by m2f.

    Args:
        name: CLI name ("table4a", "figure2", ...).
        title: the paper's caption, shortened.
        kind: "main" and "ablation" train one model per row with `notebook`; "figure" trains its rows
            with the ablation notebook and then runs `notebook` once over them; "quickstart" runs
            `notebook` once.
        rows: the rows (for a figure: the runs it analyses).
        metrics: columns, the compared metric first.
        notebook: in notebooks/.
        claim: the paper's finding, in one sentence (what "agrees" means).
        costs: the report also counts each row's parameters and FLOPs in the paper's configuration, beside
            the paper's FLOPs column (its rows' `paper["GFLOPs"]`; `m2f.reproduce.costs`).
    """

    name: str
    title: str
    kind: Literal["main", "ablation", "figure", "quickstart"]
    rows: tuple[Row, ...]
    metrics: tuple[str, ...] = ("PQ", "AP", "mIoU")
    notebook: str = ABLATION
    claim: str = ""
    costs: bool = False


M2F = Row("Mask2Former (ours)", "mask2former", {"AP": 43.7, "PQ": 51.9, "mIoU": 47.2, "GFLOPs": 226}, baseline=True)
CROSS = Row("cross-attention", "cross_attention", {"AP": 37.8, "PQ": 47.1, "mIoU": 45.5, "GFLOPs": 213})


_TABLES = [
    Table("quickstart", "Quickstart: data, training, prediction and one attention map", "quickstart", (),
          notebook=QUICKSTART),
    Table("table1", "Panoptic segmentation on COCO panoptic val2017 (Mask2Former rows)", "main", (
        Row("Mask2Former R50", "mask2former", {"PQ": 51.9, "PQ_th": 57.7, "PQ_st": 43.0, "AP": 41.7, "mIoU": 61.7},
            baseline=True),
        Row("Mask2Former R101", "mask2former", {"PQ": 52.6, "PQ_th": 58.5, "PQ_st": 43.7, "AP": 42.6, "mIoU": 62.4},
            scales=("paper",), tag="r101", overrides=("model.backbone=resnet101",)),
        Row("Mask2Former Swin-L (IN-22K)", "mask2former",
            {"PQ": 57.8, "PQ_th": 64.2, "PQ_st": 48.1, "AP": 48.6, "mIoU": 67.4}, scales=("paper",), tag="swin_l",
            overrides=("model.backbone=swin_large_patch4_window12_384", "model.num_queries=200",
                       "train.max_iters=737500")),
    ), metrics=("PQ", "PQ_th", "PQ_st", "AP", "mIoU"), notebook=MAIN,
        claim="Mask2Former R50 reaches 51.9 PQ; bigger backbones do better."),
    Table("table2", "Instance segmentation on COCO val2017 (Mask2Former rows)", "main", (
        Row("Mask2Former R50", "mask2former", {"AP": 43.7}, task="instance", baseline=True),
        Row("Mask2Former R101", "mask2former", {"AP": 44.2}, task="instance", scales=("paper",), tag="r101",
            overrides=("model.backbone=resnet101",)),
        Row("Mask2Former Swin-L (IN-22K)", "mask2former", {"AP": 50.1}, task="instance", scales=("paper",), tag="swin_l",
            overrides=("model.backbone=swin_large_patch4_window12_384", "model.num_queries=200",
                       "train.max_iters=737500")),
    ), metrics=("AP",), notebook=MAIN, claim="Mask2Former R50 reaches 43.7 AP."),
    Table("table3", "Semantic segmentation on ADE20K val (Mask2Former rows, single scale)", "main", (
        Row("Mask2Former R50", "mask2former", {"mIoU": 47.2}, task="semantic", baseline=True),
        Row("Mask2Former Swin-T", "mask2former", {"mIoU": 47.7}, task="semantic", scales=("paper",), tag="swin_t",
            overrides=("model.backbone=swin_tiny_patch4_window7_224",)),
    ), metrics=("mIoU",), notebook=MAIN, claim="Mask2Former R50 reaches 47.2 mIoU."),
    Table("table4a", "Masked attention and high-resolution features (one component removed at a time)",
          "ablation", (
              M2F,
              Row("- masked attention", "cross_attention", {"AP": 37.8, "PQ": 47.1, "mIoU": 45.5, "GFLOPs": 213}),
              Row("- high-resolution features", "single_1_32", {"AP": 41.5, "PQ": 50.2, "mIoU": 46.1, "GFLOPs": 218}),
          ), claim="Removing masked attention or high-resolution features lowers every metric.", costs=True),
    Table("table4b", "Optimization improvements (one component removed at a time)", "ablation", (
        M2F,
        Row("- learnable query features", "zero_query_features", {"AP": 42.9, "PQ": 51.2, "mIoU": 45.4, "GFLOPs": 226}),
        Row("- cross-attention first", "self_attention_first", {"AP": 43.2, "PQ": 51.6, "mIoU": 46.3, "GFLOPs": 226}),
        Row("- remove dropout", "dropout", {"AP": 43.0, "PQ": 51.3, "mIoU": 47.2, "GFLOPs": 226}),
        Row("- all 3 components above", "no_optimization_improvements", {"AP": 42.3, "PQ": 50.8, "mIoU": 46.3, "GFLOPs": 226}),
    ), claim="Each optimization improvement helps a little, all three together about 1 PQ.", costs=True),
    Table("table4c", "Masked attention vs other cross-attention variants", "ablation", (
        CROSS,
        Row("SMCA", "smca", {"AP": 37.9, "PQ": 47.2, "mIoU": 46.6, "GFLOPs": 213}),
        Row("mask pooling", "mask_pooling", {"AP": 43.1, "PQ": 51.5, "mIoU": 46.0, "GFLOPs": 217}),
        Row("masked attention", "mask2former", M2F.paper, baseline=True),
    ), claim="Masked attention is the best variant on every task.", costs=True),
    Table("table4d", "Feature resolution of the Transformer decoder", "ablation", (
        Row("single scale (1/32)", "single_1_32", {"AP": 41.5, "PQ": 50.2, "mIoU": 46.1, "GFLOPs": 218}),
        Row("single scale (1/16)", "single_1_16", {"AP": 43.0, "PQ": 51.5, "mIoU": 46.5, "GFLOPs": 222}),
        Row("single scale (1/8)", "single_1_8", {"AP": 44.0, "PQ": 51.8, "mIoU": 47.4, "GFLOPs": 239}),
        Row("naive m.s. (3 scales)", "naive_multiscale", {"AP": 44.0, "PQ": 51.9, "mIoU": 46.3, "GFLOPs": 247}),
        Row("efficient m.s. (3 scales)", "mask2former", M2F.paper, baseline=True),
    ), claim="High-resolution features matter; the efficient round-robin multi-scale matches single 1/8.", costs=True),
    Table("table4e", "Pixel decoder", "ablation", (
        Row("FPN", "fpn", {"AP": 41.5, "PQ": 50.7, "mIoU": 45.6, "GFLOPs": 195}),
        Row("Semantic FPN", "semantic_fpn", {"AP": 42.1, "PQ": 51.2, "mIoU": 46.2, "GFLOPs": 258}),
        Row("FaPN", "fapn", {"AP": 42.4, "PQ": 51.8, "mIoU": 46.8}),
        Row("BiFPN", "bifpn", {"AP": 43.5, "PQ": 51.8, "mIoU": 45.6, "GFLOPs": 204}),
        Row("MSDeformAttn", "mask2former", M2F.paper, baseline=True),
    ), claim="The MSDeformAttn pixel decoder is the best on every task.", costs=True),
    Table("table5", "Loss on sampled points vs whole masks (matching loss, training loss)", "ablation", (
        Row("mask matching, mask loss", "mask_matching_mask_loss",
            {"AP": 41.0, "PQ": 50.3, "mIoU": 45.9, "memory_gb": 18.0}),
        Row("mask matching, point loss", "mask_matching_point_loss",
            {"AP": 41.0, "PQ": 50.8, "mIoU": 45.9, "memory_gb": 6.0}),
        Row("point matching, mask loss", "point_matching_mask_loss",
            {"AP": 43.1, "PQ": 51.4, "mIoU": 47.3, "memory_gb": 18.0}),
        Row("point matching, point loss (ours)", "mask2former", {**M2F.paper, "memory_gb": 6.0}, baseline=True),
    ), metrics=("PQ", "AP", "mIoU", "memory_gb"),
        claim="Point loss cuts training memory about 3x without hurting; point matching improves every task."),
    Table("table11a", "Number of queries (paper: 50 / 100 / 200 / 300 / 1000; tiny: the same multiples of 20)",
          "ablation", (
              Row("0.5x queries", "queries_x0.5", {"AP": 42.4, "PQ": 50.5, "mIoU": 46.2}),
              Row("1x queries (default)", "mask2former", M2F.paper, baseline=True),
              Row("2x queries", "queries_x2", {"AP": 43.5, "PQ": 52.2, "mIoU": 47.0}),
              Row("3x queries", "queries_x3", {"AP": 43.5, "PQ": 52.1, "mIoU": 46.5}),
              Row("10x queries", "queries_x10", {"AP": 40.3, "PQ": 50.7, "mIoU": 44.8}),
          ), claim="About 100 queries are best (200 for panoptic); 1000 queries hurt."),
    Table("table11b", "Learnable queries", "ablation", (
        Row("zero-initialized (DETR)", "zero_query_features", {"AP": 42.9, "PQ": 51.2, "mIoU": 45.5}),
        Row("learnable w/o supervision", "learnable_unsupervised_queries", {"AP": 42.9, "PQ": 51.2, "mIoU": 47.0}),
        Row("learnable w/ supervision", "mask2former", M2F.paper, baseline=True),
    ), claim="Supervising the learnable queries before the decoder matters."),
    Table("table12d", "MaskFormer vs Mask2Former Transformer decoder (same R50, FPN pixel decoder, training)",
          "ablation", (
              Row("MaskFormer decoder, FPN", "maskformer_decoder_fpn", {"AP": 37.8, "PQ": 48.2, "mIoU": 45.3}),
              Row("Mask2Former decoder, FPN", "fpn", {"AP": 41.5, "PQ": 50.7, "mIoU": 45.6}, baseline=True),
          ), claim="The new Transformer decoder alone improves every task."),
    Table("table7", "One model trained on panoptic vs task-specific models (COCO)", "main", (
        Row("panoptic model", "mask2former", {"PQ": 51.9, "AP": 41.7, "mIoU": 61.7}, baseline=True),
        Row("instance model", "mask2former", {"AP": 43.7}, task="instance"),
        Row("semantic model", "mask2former", {"mIoU": 61.5}, task="semantic"),
    ), notebook=MAIN, claim="Task-specific models do slightly better than the panoptic model on their task "
                            "(COCO: AP 43.7 vs 41.7; mIoU 61.5 vs 61.7 is the exception)."),
    Table("figure2", "Fig. II: PQ of every Transformer decoder layer, masked vs cross-attention", "figure",
          (M2F, CROSS), metrics=("PQ",), notebook=FIGURE_LAYERS,
          claim="Masked attention after one decoder layer beats cross-attention after all nine."),
    Table("figure3", "Fig. 3: learnable queries as region proposals (class-agnostic AR@100 per layer)", "figure",
          (M2F,), metrics=("AR@100",), notebook=FIGURE_PROPOSALS,
          claim="The learnable queries (layer 0) already give good proposals; AR@100 improves with layers."),
    Table("figure1", "Fig. I: attention maps and the fg/bg attention mass per resolution", "figure", (
        Row("masked attention", "mask2former", {"fg_1/32": 0.53, "fg_1/16": 0.61, "fg_1/8": 0.64, "fg_mean": 0.59},
            baseline=True),
        Row("cross-attention", "cross_attention", {"fg_1/32": 0.23, "fg_1/16": 0.23, "fg_1/8": 0.15, "fg_mean": 0.20}),
    ), metrics=("fg_1/32", "fg_1/16", "fg_1/8", "fg_mean"), notebook=FIGURE_ATTENTION,
          claim="Cross-attention puts about 20% of its weight on the object, masked attention about 60%."),
]
TABLES: dict[str, Table] = {t.name: t for t in _TABLES}


def get_table(name: str) -> Table:
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; `m2f reproduce --list` shows them: {', '.join(TABLES)}")
    return TABLES[name]
