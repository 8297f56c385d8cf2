"""Shared pytest setup: CPU threads, the gpu marker's skip, the allocator setting held off, and small model
fixtures."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def allocator_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`m2f.allocator.keep_freed_memory` recorded, not applied: its setting is process-wide and would reach
    every later test in the process (tests/test_allocator.py applies it in fresh interpreters)."""
    import m2f.allocator

    calls: list[str] = []
    monkeypatch.setattr(m2f.allocator, "keep_freed_memory", lambda: calls.append("keep") or True)
    return calls


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The training-loop tests' dataset: 8 training and 4 validation images of the synthetic benchmark at 64 px."""
    from m2f.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic_64")
    generate(root, num_train=8, num_val=4, image_size=64, seed=0)
    return root
