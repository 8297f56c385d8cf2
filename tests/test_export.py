"""`m2f export`: the ExportedProgram (custom op kept) and the ONNX file (reference op, run by onnxruntime)
give the eager model's outputs within 1e-4, at two input sizes."""

import pytest
import torch

from m2f.config import get_config
from m2f.export import ExportedMask2Former, export, parse_size, with_reference_op
from m2f.model import build_model

SIZES = [(64, 96), (96, 64)]


@pytest.fixture(scope="module")
def model():
    # The compiled CPU kernel behind m2f::ms_deform_attn: what the exported program must keep calling.
    cfg = get_config("tiny", ["model.deform_impl=cpu", "model.num_queries=8", "model.encoder_layers=2",
                              "model.dec_layers=3"])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _eager(model, images):
    with torch.no_grad():
        return ExportedMask2Former(model).eval()(images)


def _assert_onnxruntime_matches_eager(ort, path, model, size):
    """onnxruntime (CPU) runs the file, and its outputs equal the eager model's with the compiled kernel
    within 1e-4 (the ONNX graph holds the reference op)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1)) * 255
    logits, masks = session.run(["pred_logits", "pred_masks"], {"images": images.numpy()})
    eager = _eager(model, images)
    torch.testing.assert_close(torch.from_numpy(logits), eager[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(masks), eager[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", SIZES)
def test_exported_program_keeps_the_custom_op_and_matches_eager(model, size, tmp_path):
    path = export(model, format="exported_program", size=size, out=tmp_path / "model.pt2")
    program = torch.export.load(path)
    assert "m2f.ms_deform_attn" in program.graph_module.print_readable(print_output=False)
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        got = program.module()(images)
    for a, b in zip(got, _eager(model, images), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", SIZES)
def test_onnx_runs_in_onnxruntime_and_matches_eager(model, size, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = export(model, format="onnx", size=size, out=tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert "GridSample" in ops and all(node.domain in ("", "ai.onnx") for node in graph.node)  # standard ops only
    _assert_onnxruntime_matches_eager(ort, path, model, size)


def test_reference_copy_leaves_the_model_alone_and_sizes_parse(model):
    from m2f.deformable_encoder import MSDeformAttn

    copy = with_reference_op(model)
    assert {m.impl for m in copy.modules() if isinstance(m, MSDeformAttn)} == {"torch"}
    assert {m.impl for m in model.modules() if isinstance(m, MSDeformAttn)} == {"cpu"}
    assert parse_size("800x1216") == (800, 1216) and parse_size(" 64 X 96 ") == (64, 96)
    with pytest.raises(ValueError, match="HxW"):
        parse_size("800")
    with pytest.raises(ValueError, match="format"):
        export(model, format="tflite", size=(64, 64), out="x")


def test_cli_exports_a_checkpoint(model, tmp_path, capsys):
    from m2f.checkpoint import save_atomic
    from m2f.cli import main

    cfg = get_config("tiny", ["model.deform_impl=cpu", "model.num_queries=8", "model.encoder_layers=2",
                              "model.dec_layers=3"])
    save_atomic({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "checkpoint.pth")
    main(["export", "--weights", str(tmp_path), "--format", "exported_program", "--size", "64x64",
          "--out", str(tmp_path / "m.pt2")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "m.pt2").stat().st_size > 0


@pytest.mark.slow
def test_onnx_through_the_dynamo_exporter_matches_eager(model, tmp_path):
    """The dynamo exporter (`--dynamo`), about 2 minutes on 2 cores: the same standard-op graph."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    size = SIZES[0]
    path = export(model, format="onnx", size=size, out=tmp_path / "model.onnx", dynamo=True)
    _assert_onnxruntime_matches_eager(ort, path, model, size)
