"""What this machine offers the MSDeformAttn op: torch/CUDA/toolchain versions and which impls work.

`doctor()` only inspects by default; `doctor(build=True)` also builds the kernels it can and checks each
against the pure-PyTorch reference on a small random input, which is the definitive answer.
"""

import os
import shutil
import subprocess
from typing import Any

import torch

from m2f.ops import build
from m2f.ops.dispatch import ms_deform_attn


def _first_line(command: list[str], *, containing: str = "") -> str | None:
    """First non-empty output line of `command` that contains `containing`, or None if it cannot run."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False,
                                env={**os.environ, "PATH": build.tool_path()})
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if containing in line]
    return next((line for line in lines if line), None)


def _smoke_test(device: str) -> str:
    """Runs the kernel on `device` against the reference: "ok" or the error."""
    generator = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    value = torch.randn(2, 26, 2, 16, generator=generator)
    locations = torch.rand(2, 7, 2, 2, 3, 2, generator=generator) * 1.2 - 0.1
    weights = torch.rand(2, 7, 2, 2, 3, generator=generator)
    inputs = [t.to(device) for t in (value, shapes, starts, locations, weights)]
    try:
        got = ms_deform_attn(*inputs, impl=device)
        expected = ms_deform_attn(*inputs, impl="torch")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    except Exception as error:  # report any failure of this impl; the doctor itself must not crash
        return f"error: {type(error).__name__}: {str(error).strip().splitlines()[0]}"
    return "ok"


def _impl_status(device: str, *, run: bool) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        problem = build.toolchain_problem("cuda")
        compiles = "the kernel can still be compiled" if problem is None else problem
        return f"unavailable: no CUDA device ({compiles})"
    if problem := build.toolchain_problem(device):
        return f"unavailable: {problem}"
    if run:
        return _smoke_test(device)
    return "built (cached)" if build.library_path(device).exists() else "buildable (not built yet)"


def doctor(*, build_kernels: bool = False) -> dict[str, Any]:
    """Collects versions, tools and the state of each MSDeformAttn impl.

    Args:
        build_kernels: also build the compiled kernels (once, cached) and compare them with the reference.

    Returns:
        A flat dict of plain values, `impls` maps "torch"/"cpu"/"cuda" to "ok", "built (cached)",
        "buildable (not built yet)", "unavailable: <reason>" or "error: <message>".
    """
    cuda_home = build.cuda_home()
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    compiler = os.environ.get("CXX", "c++")
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "cuda_home": cuda_home,
        "nvcc": _first_line([nvcc, "--version"], containing="release") if nvcc else None,
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "ninja": _first_line(["ninja", "--version"]),
        "cxx": _first_line([compiler, "--version"]),
        "kernel_sources": str(build.SOURCE_DIR),
        "ops_cache": str(build.cache_dir()),
        "impls": {
            "torch": "ok",
            "cpu": _impl_status("cpu", run=build_kernels),
            "cuda": _impl_status("cuda", run=build_kernels),
        },
    }


def format_doctor(report: dict[str, Any]) -> str:
    """`doctor()`'s report as aligned "key: value" lines, impls last."""
    width = max(len(key) for key in report)
    lines = [f"{key:<{width}}  {value}" for key, value in report.items() if key != "impls"]
    lines.append("MSDeformAttn impls:")
    lines += [f"  {name:<6} {status}" for name, status in report["impls"].items()]
    return "\n".join(lines)
