"""Just-in-time build of the compiled MSDeformAttn kernels in `kernels/`, cached on disk.

The CPU and the CUDA kernel are separate extensions, so a machine without nvcc never needs it. Each
build lives in `<cache>/<name>`, where the name hashes the sources (content and location), torch
(version and location), Python, CUDA and the compile flags: a changed source or toolchain never loads a
stale binary, and two processes that build the same extension at once serialise on torch's file lock in
that directory. The cache is `$M2F_OPS_CACHE`, else `$XDG_CACHE_HOME/m2f/ops` (default
`~/.cache/m2f/ops`).

The sources are the package data `m2f/_kernels` (the repository's top-level `kernels/`, see
pyproject.toml), found through importlib.resources so that a checkout and an installed wheel both work.
"""

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

# resolve(): messages and the cache key name the real folder (kernels/ in a checkout, not the link).
SOURCE_DIR = Path(resources.files("m2f") / "_kernels").resolve()
HEADER = "ms_deform_attn.h"
SOURCES = {
    "cpu": ("ms_deform_attn_binding.cpp", "ms_deform_attn_cpu.cpp"),
    "cuda": ("ms_deform_attn_binding.cpp", "ms_deform_attn_cuda.cu"),
}
# Rough first-build time on 2 cores, for the one-line notice.
BUILD_SECONDS = {"cpu": 20, "cuda": 45}
TORCH_HINT = "set impl='torch' to use the pure-PyTorch reference"

_loaded: dict[str, ModuleType] = {}
_lock = threading.Lock()


class KernelBuildError(RuntimeError):
    """The MSDeformAttn kernel for a device could not be built; the message has the compiler output."""


def cache_dir() -> Path:
    """Root of the kernel build cache."""
    if override := os.environ.get("M2F_OPS_CACHE"):
        return Path(override).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "m2f" / "ops"


def tool_path() -> str:
    """PATH with this environment's scripts directory first: pip installs `ninja` there, and a venv
    used without activation does not have it on PATH."""
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    return path if scripts in path.split(os.pathsep) else os.pathsep.join([scripts, path])


@contextlib.contextmanager
def _tools_on_path() -> Iterator[None]:
    # torch finds ninja and runs it through os.environ, so the PATH change has to be process-wide while
    # the build runs.
    saved = os.environ.get("PATH")
    os.environ["PATH"] = tool_path()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = saved


def _flags(device: str) -> dict[str, list[str]]:
    if device == "cuda":
        return {"extra_cflags": ["-O3"], "extra_cuda_cflags": ["-O3"]}
    # at::parallel_for is an inline OpenMP loop in the headers: without -fopenmp it runs serially. The
    # extension then links the libgomp.so.1 that torch has already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return {"extra_cflags": ["-O3", *openmp], "extra_ldflags": openmp}


def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported without the warning it logs on import where no CUDA runtime is
    found ("No CUDA runtime is found, using CUDA_HOME=..."): on a CPU machine that is expected, printed in
    red in every notebook, and `m2f doctor` says what CUDA this machine has."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def cuda_home() -> str | None:
    """The CUDA toolkit root torch will compile with (from CUDA_HOME, else guessed from nvcc on PATH)."""
    return _cpp_extension().CUDA_HOME


def _arch_key() -> str:
    if arch := os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return arch
    return ";".join(f"{major}.{minor}" for major, minor in
                    (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())))


def extension_name(device: str) -> str:
    """Name (and cache subdirectory) of the extension for `device` built from the current sources."""
    digest = hashlib.sha256()
    for file in (HEADER, *SOURCES[device]):
        path = SOURCE_DIR / file
        if not path.is_file():
            raise FileNotFoundError(
                f"MSDeformAttn kernel source {path} not found: the compiled kernels need the package data "
                f"m2f/_kernels (the repository's kernels/ directory); {TORCH_HINT}"
            )
        digest.update(file.encode() + b"\0" + path.read_bytes())
    # Everything that ends up in the build commands, locations included: torch writes the absolute source,
    # include and library paths into build.ninja and ninja rebuilds whenever a command changes, so two
    # checkouts (or two environments) sharing one directory would rebuild each other's kernel each time
    # they alternate. With their paths in the key each gets its own directory and builds once.
    toolchain = [torch.__version__, str(torch.version.cuda), platform.python_version(), platform.machine(),
                 repr(_flags(device)), str(SOURCE_DIR), str(Path(torch.__file__).parent),
                 sysconfig.get_paths()["include"]]
    if device == "cuda":
        toolchain += [str(cuda_home()), _arch_key()]
    digest.update(repr(toolchain).encode())
    return f"m2f_msdeformattn_{device}_{digest.hexdigest()[:16]}"


def library_path(device: str) -> Path:
    """Where the built extension for `device` is (or will be)."""
    name = extension_name(device)
    return cache_dir() / name / f"{name}.so"


def toolchain_problem(device: str) -> str | None:
    """Why the kernel for `device` cannot be built here (with the fix), or None if nothing is missing."""
    if shutil.which("ninja", path=tool_path()) is None:
        return "ninja not found: install it (pip install ninja) into this environment"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"C++ compiler {compiler!r} not found: install g++ or set CXX"
    if device != "cuda":
        return None
    if torch.version.cuda is None:
        return "this torch build has no CUDA support: install a CUDA build of torch"
    home = cuda_home()
    if home is None:
        return "no CUDA toolkit (nvcc) found: install it and set CUDA_HOME to its root, e.g. /usr/local/cuda"
    if not any((Path(home) / lib / "libcudart.so").exists() for lib in ("lib64", "lib")):
        # torch falls back to the parent of the `nvcc` found on PATH, which is wrong for wrapper scripts.
        return f"CUDA_HOME={home} has no lib64/libcudart.so: set CUDA_HOME to the toolkit root, e.g. /usr/local/cuda"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        return "no GPU visible to pick the architecture: set TORCH_CUDA_ARCH_LIST, e.g. TORCH_CUDA_ARCH_LIST=9.0"
    return None


def _hint(device: str, message: str) -> str:
    hints = []
    if "Ninja is required" in message:
        hints.append("install ninja (pip install ninja)")
    if device == "cuda":
        hints.append("check CUDA_HOME (the toolkit root, e.g. /usr/local/cuda) and TORCH_CUDA_ARCH_LIST")
    hints.append(TORCH_HINT)
    return "; ".join(hints)


def _build(device: str) -> ModuleType:
    if problem := toolchain_problem(device):
        raise KernelBuildError(f"cannot build the MSDeformAttn {device} kernel: {problem}; {TORCH_HINT}")
    cpp_extension = _cpp_extension()
    name = extension_name(device)
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not library_path(device).exists()
    if fresh:
        print(f"m2f: building the MSDeformAttn {device.upper()} kernel (once, ~{BUILD_SECONDS[device]} s)...",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with _tools_on_path():
            module = cpp_extension.load(
                name=name,
                sources=[str(SOURCE_DIR / file) for file in SOURCES[device]],
                extra_include_paths=[str(SOURCE_DIR)],
                build_directory=str(build_dir),
                verbose=False,
                **_flags(device),
            )
    except (RuntimeError, OSError, ImportError) as error:
        # torch puts the full ninja/compiler output into the message when verbose=False.
        raise KernelBuildError(
            f"building the MSDeformAttn {device} kernel in {build_dir} failed:\n{error}\nHint: {_hint(device, str(error))}"
        ) from error
    logger.info("MSDeformAttn %s kernel %s in %.1f s (%s)", device, "built" if fresh else "loaded",
                time.perf_counter() - start, build_dir)
    return module


def load_extension(device: str) -> ModuleType:
    """The compiled extension for `device` ("cpu" or "cuda"), built on first use.

    Raises:
        KernelBuildError: the toolchain is missing or the compiler failed (its output is in the message).
    """
    if device not in SOURCES:
        raise ValueError(f"no MSDeformAttn kernel for device {device!r}; choose one of {tuple(SOURCES)}")
    with _lock:
        if device not in _loaded:
            _loaded[device] = _build(device)
        return _loaded[device]
