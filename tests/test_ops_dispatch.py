"""The explicit MSDeformAttn impl switch and the kernel build: choices, errors, logging, the cache and
the CUDA build without a GPU."""

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from test_ops_kernels import CASES, random_inputs

from m2f.ops import build, dispatch, ms_deform_attn, ms_deform_attn_reference

ROOT = Path(__file__).resolve().parents[1]


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


def test_each_copy_of_the_sources_gets_its_own_build_directory(tmp_path, monkeypatch):
    """Two checkouts sharing one cache: torch writes the absolute source paths into build.ninja, so one
    directory for both would be rebuilt each time they alternate; a directory each is built once."""
    names = []
    for checkout in ("a", "b"):
        shutil.copytree(build.SOURCE_DIR, tmp_path / checkout / "kernels")
        monkeypatch.setattr(build, "SOURCE_DIR", tmp_path / checkout / "kernels")
        names.append(build.extension_name("cpu"))
        assert build.extension_name("cpu") == names[-1]
    assert names[0] != names[1]
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path / "a" / "kernels")
    assert build.extension_name("cpu") == names[0]


def _load_cpu_kernel(sources: Path, cache: Path) -> int:
    """Loads (building if needed) the CPU kernel from `sources` in a fresh process; the .so's mtime."""
    script = ("import sys; from pathlib import Path; from m2f.ops import build; build.SOURCE_DIR = Path(sys.argv[1]); "
              "build.load_extension('cpu'); print(build.library_path('cpu').stat().st_mtime_ns)")
    result = subprocess.run([sys.executable, "-c", script, str(sources)], env={**os.environ, "M2F_OPS_CACHE": str(cache)},
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    return int(result.stdout.split()[-1])


@pytest.mark.slow
def test_alternating_checkouts_do_not_rebuild_each_other(tmp_path):
    """Two real builds (~25 s each on 2 cores), then the first checkout's kernel loads without a rebuild."""
    sources = [tmp_path / checkout / "kernels" for checkout in ("a", "b")]
    for copy in sources:
        shutil.copytree(build.SOURCE_DIR, copy)
    first = _load_cpu_kernel(sources[0], tmp_path / "cache")
    _load_cpu_kernel(sources[1], tmp_path / "cache")
    assert _load_cpu_kernel(sources[0], tmp_path / "cache") == first


def _toolkit_root() -> Path | None:
    """A CUDA toolkit root with nvcc and libcudart: $CUDA_HOME, the parent of nvcc's real location, or
    /usr/local/cuda (/usr/local/bin/nvcc may be a wrapper script that tells nothing)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), nvcc and Path(os.path.realpath(nvcc)).parents[1], "/usr/local/cuda"]
    for root in filter(None, candidates):
        if (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "lib64" / "libcudart.so").exists():
            return Path(root)
    return None


@pytest.mark.skipif(_toolkit_root() is None, reason="needs the CUDA toolkit (nvcc, libcudart)")
def test_cuda_kernel_compiles_without_a_gpu():
    """Builds the CUDA extension (about 45 s on 2 cores, then cached) in a fresh process, where the
    toolkit root and the architecture can be set before torch reads them."""
    env = {**os.environ, "CUDA_HOME": str(_toolkit_root()),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}
    script = "from m2f.ops.build import load_extension; m = load_extension('cuda'); print(m.forward.__doc__)"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "sampling_locations" in result.stdout
