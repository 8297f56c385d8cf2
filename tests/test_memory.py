"""m2f.memory.PeakMemory: the peak the training loop logs and the benchmarks report."""

import json
import subprocess
import sys

import pytest
import torch

from m2f.memory import PeakMemory

PEAK_SCRIPT = """
import json, torch
from m2f.memory import PeakMemory
memory = PeakMemory(device="cpu")
big = torch.ones(192 * 2**20 // 4)
del big
memory.start()  # the earlier, larger peak must not hide the next one
block = torch.ones(96 * 2**20 // 4)
grown = memory.peak_bytes()
del block
memory.start()
print(json.dumps({"grown": grown / 2**20, "after_free": memory.peak_bytes() / 2**20, "method": memory.method}))
"""


def test_cpu_peak_sees_an_allocation_after_a_larger_earlier_peak():
    # In a fresh process: this one's allocator may hold freed memory from earlier tests that a new
    # block reuses without growing the resident set.
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["method"] == "peak RSS (VmHWM reset)"
    assert 90 <= result["grown"] <= 150, result
    assert result["after_free"] < 10, result


@pytest.mark.gpu
def test_cuda_peak_is_the_growth_above_the_allocated_memory_at_start():
    held = torch.ones(32 * 2**20 // 4, device="cuda")
    memory = PeakMemory(device="cuda").start()
    block = torch.ones(64 * 2**20 // 4, device="cuda")
    del block
    assert memory.peak_bytes() == pytest.approx(64 * 2**20, abs=2 * 2**20)  # allocator rounding
    del held
