"""`m2f.ops.doctor`: the machine report of torch, toolchain and working MSDeformAttn impls."""

import torch

from m2f.ops import build
from m2f.ops.doctor import doctor, format_doctor


def test_doctor_runs_the_cpu_kernel_against_the_reference():
    report = doctor(build_kernels=True)
    assert report["torch"] == torch.__version__
    assert report["cuda_available"] == torch.cuda.is_available()
    assert report["impls"]["torch"] == "ok"
    assert report["impls"]["cpu"] == "ok"
    if not torch.cuda.is_available():
        assert report["impls"]["cuda"].startswith("unavailable: no CUDA device")
    text = format_doctor(report)
    assert text.splitlines()[0].split() == ["torch", torch.__version__]
    assert "MSDeformAttn impls:" in text and "  cpu    ok" in text


def test_doctor_names_a_missing_tool(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "tool_path", lambda: str(tmp_path))  # a PATH without ninja
    report = doctor()
    assert report["impls"]["cpu"] == "unavailable: ninja not found: install it (pip install ninja) into this environment"
