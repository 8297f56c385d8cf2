"""The explicit MSDeformAttn impl switch and the kernel build: choices, errors, logging and the cache."""

import logging
import shutil
import sysconfig

import pytest
import torch
from test_ops_kernels import CASES, random_inputs

from m2f.ops import build, dispatch, ms_deform_attn, ms_deform_attn_reference


@pytest.fixture
def inputs():
    return random_inputs(*CASES["one-level"])


def test_unknown_impl_lists_the_choices(inputs):
    with pytest.raises(ValueError, match="unknown MSDeformAttn impl 'triton'") as error:
        ms_deform_attn(*inputs, impl="triton")
    assert all(repr(choice) in str(error.value) for choice in ("auto", "cpu", "cuda", "torch"))


def test_cuda_impl_on_cpu_tensors_is_a_clear_error(inputs):
    with pytest.raises(ValueError, match=r"impl='cuda' runs the cuda kernel but the tensors are on cpu"):
        ms_deform_attn(*inputs, impl="cuda")


def test_auto_resolves_to_the_kernel_of_the_tensors_device(inputs):
    assert dispatch.resolve_impl("auto", inputs[0]) == "cpu"
    assert dispatch.resolve_impl("torch", inputs[0]) == "torch"
    with pytest.raises(ValueError, match="no compiled MSDeformAttn kernel for meta tensors"):
        dispatch.resolve_impl("auto", torch.empty(1, device="meta"))


def test_torch_impl_is_the_reference(inputs):
    value, shapes, _, locations, weights = inputs
    assert torch.equal(ms_deform_attn(*inputs, impl="torch"),
                       ms_deform_attn_reference(value, shapes, locations, weights))


def test_choice_is_logged_once(inputs, caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="m2f.ops.dispatch"):
        for _ in range(3):
            ms_deform_attn(*inputs, impl="auto")
            ms_deform_attn(*inputs, impl="torch")
    messages = [r.getMessage() for r in caplog.records if r.name == "m2f.ops.dispatch"]
    assert messages == ["MSDeformAttn: using the 'cpu' implementation (asked for 'auto')",
                        "MSDeformAttn: using the 'torch' implementation (asked for 'torch')"]


def test_broken_source_raises_the_compiler_output(inputs, tmp_path, monkeypatch, capsys):
    sources = tmp_path / "kernels"
    shutil.copytree(build.SOURCE_DIR, sources)
    # A missing include in the shared header is a fatal error in both translation units, so the failed
    # build takes seconds (a syntax error lets gcc carry on through the torch headers).
    header = sources / build.HEADER
    header.write_text(header.read_text().replace("#pragma once", '#pragma once\n#include "m2f_no_such_header.h"', 1))
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setenv("M2F_OPS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(build.KernelBuildError) as error:
        ms_deform_attn(*inputs, impl="cpu")  # through the dispatcher: nothing may swallow the error
    message = str(error.value)
    assert "ms_deform_attn.h:" in message and "fatal error: m2f_no_such_header.h: No such file" in message
    assert "set impl='torch' to use the pure-PyTorch reference" in message
    assert "m2f: building the MSDeformAttn CPU kernel (once, ~" in capsys.readouterr().err


def test_missing_ninja_is_reported_before_building(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "tool_path", lambda: str(tmp_path))  # a PATH without ninja or a compiler
    monkeypatch.setattr(build, "_loaded", {})
    with pytest.raises(build.KernelBuildError, match=r"ninja not found: install it \(pip install ninja\)"):
        ms_deform_attn(*inputs, impl="cpu")


def test_tool_path_puts_the_environment_scripts_first(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin")
    assert build.tool_path().split(":")[:2] == [sysconfig.get_path("scripts"), "/usr/bin"]


def test_cuda_toolchain_problems_name_the_fix(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "set CUDA_HOME" in build.toolchain_problem("cuda")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))  # like torch's /usr/local guess
    assert f"CUDA_HOME={tmp_path} has no lib64/libcudart.so" in build.toolchain_problem("cuda")


def test_cache_key_follows_the_sources_and_the_cache_dir(tmp_path, monkeypatch):
    sources = tmp_path / "kernels"
    shutil.copytree(build.SOURCE_DIR, sources)
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    before = build.extension_name("cpu")
    assert before == build.extension_name("cpu") and before.startswith("m2f_msdeformattn_cpu_")
    cpu_source = sources / build.SOURCES["cpu"][1]
    cpu_source.write_text(cpu_source.read_text() + "\n// changed\n")
    assert build.extension_name("cpu") != before
    monkeypatch.setenv("M2F_OPS_CACHE", str(tmp_path / "cache"))
    assert build.library_path("cpu").parent.parent == tmp_path / "cache"
    cpu_source.unlink()
    with pytest.raises(FileNotFoundError, match="set impl='torch'"):
        build.extension_name("cpu")
