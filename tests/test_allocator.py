"""`m2f.allocator.keep_freed_memory`: a large tensor allocated again and again stops costing page faults.

Each case runs in a fresh interpreter: the setting is process-wide and would otherwise reach the other
tests.
"""

import json
import platform
import subprocess
import sys

import pytest

# Page faults of each of 16 rounds of allocating, filling and freeing a 128 MB tensor. With freed
# blocks kept, the first rounds still grow the heap: each freed block is exactly the tensor's size, and
# PyTorch's aligned allocation asks for a little more, so a block is reused only once it has merged with
# a free neighbour (after up to ~10 rounds here; the fragmentation that `m2f.allocator` documents).
PROBE = """
import json, resource, sys, torch
if sys.argv[1] == "keep":
    from m2f.allocator import keep_freed_memory
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds = []
for _ in range(16):
    before = faults()
    torch.empty(32 * 2**20).fill_(1.0)
    rounds.append(faults() - before)
print(json.dumps(rounds))
"""
PAGES_4K = 128 * 2**20 // 4096


def faults_per_round(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_repeatedly_allocated_tensor_stops_faulting_in_its_pages():
    # The default unmaps every freed block: each round faults all pages again (>= 64 even with 2 MB pages).
    assert min(faults_per_round("default")[-4:]) >= 64
    assert sum(faults_per_round("keep")[-4:]) < PAGES_4K // 100
