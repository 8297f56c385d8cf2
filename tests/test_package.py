"""m2f as a package: the public API, `python -m m2f`, and a built wheel that works outside the checkout.

The wheel is built offline from a copy of the checkout with the setuptools backend already in the
environment (torch depends on setuptools), the way `pip install --no-build-isolation .` builds it.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import m2f

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in {".h", ".cpp", ".cu"})
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_import_m2f_stays_cheap():
    """The API is imported on first use: `import m2f` (and so `m2f --help`) does not load torch."""
    _run([sys.executable, "-c", "import sys, m2f; assert 'torch' not in sys.modules, 'torch imported'"])


def test_public_api_is_the_library_functions():
    from m2f import config, inference, model, pretrained
    from m2f.predict import predict
    from m2f.train import train

    assert m2f.get_config is config.get_config and m2f.build_model is model.build_model
    assert m2f.evaluate is inference.evaluate and m2f.predict is predict
    assert m2f.load_pretrained is pretrained.load_pretrained
    # Importing the submodule m2f/train.py does not replace the function m2f.train by the module.
    assert m2f.train is train
    assert set(m2f.__all__) <= set(dir(m2f))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        m2f.nope  # noqa: B018


def test_api_builds_a_model_from_a_preset():
    cfg = m2f.get_config("tiny", ["model.num_queries=7"])
    assert cfg.model.num_queries == 7
    assert m2f.build_model(cfg).transformer_decoder.num_queries == 7


def test_python_dash_m_is_the_m2f_command():
    """`python -m m2f` gives the same output as the console script (when the latter is installed)."""
    help_text = _run([sys.executable, "-m", "m2f", "--help"]).stdout
    assert help_text.startswith("usage: m2f") and "reproduce" in help_text
    info = _run([sys.executable, "-m", "m2f", "info"]).stdout
    assert info.startswith("presets:") and "tiny" in info
    script = Path(sysconfig.get_path("scripts")) / "m2f"
    if script.exists():
        assert _run([str(script), "--help"]).stdout == help_text
        assert _run([str(script), "info"]).stdout == info


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the checkout (so no build/ or egg-info lands in the real one)."""
    pytest.importorskip("setuptools")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("m2f", "kernels", "notebooks"):  # symlinks=True: m2f/_kernels -> ../kernels stays a link
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    script = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    name = _run([sys.executable, "-c", script, str(out)], cwd=source).stdout.split()[-1]
    return out / name


def test_wheel_holds_the_code_the_kernel_sources_and_the_notebooks(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"m2f/_kernels/{name}" for name in KERNELS} <= names
    assert {f"m2f/_notebooks/{name}" for name in NOTEBOOKS} <= names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "m2f").rglob("*.py")}
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    assert "m2f/__main__.py" in names and "m2f/py.typed" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "m2f = m2f.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_installed_wheel_works_outside_the_checkout(wheel, tmp_path):
    """`pip install --no-deps --no-index` of the wheel into a fresh venv that borrows this environment's
    installed dependencies through a .pth file; then, from a folder outside the checkout: `m2f info tiny`,
    the kernel sources and notebooks in site-packages, and the CPU kernel built from them (~60 s)."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # A plain path line: the deps become importable, but this environment's editable m2f (its own .pth
    # hook) does not, so the m2f found is the wheel's.
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)])
    env = {**os.environ, "M2F_OPS_CACHE": str(tmp_path / "ops-cache")}
    env.pop("PYTHONPATH", None)
    work = tmp_path / "work"
    work.mkdir()

    info = _run([str(venv / "bin" / "m2f"), "info", "tiny"], cwd=work, env=env).stdout
    assert '"name": "tiny"' in info and "parameters:" in info
    assert _run([str(python), "-m", "m2f", "reproduce", "--list"], cwd=work, env=env).stdout.strip()

    check = """
import m2f, torch
from pathlib import Path
from m2f.ops import build, ms_deform_attn, ms_deform_attn_reference
from m2f.reproduce import runner
print(Path(m2f.__file__).parent)
print(build.SOURCE_DIR)
print(runner.NOTEBOOKS)
value, locations = torch.randn(1, 6, 2, 4), torch.rand(1, 3, 2, 1, 2, 2)
shapes, starts, weights = torch.tensor([[2, 3]]), torch.tensor([0]), torch.rand(1, 3, 2, 1, 2)
torch.testing.assert_close(ms_deform_attn(value, shapes, starts, locations, weights, impl="cpu"),
                           ms_deform_attn_reference(value, shapes, locations, weights), rtol=1e-5, atol=1e-5)
"""
    package, sources, notebooks = map(Path, _run([str(python), "-c", check], cwd=work, env=env).stdout.split())
    assert package == site / "m2f" and sources == package / "_kernels" and notebooks == package / "_notebooks"
    assert sorted(p.name for p in sources.iterdir()) == KERNELS
    assert sorted(p.name for p in notebooks.glob("*.ipynb")) == NOTEBOOKS
