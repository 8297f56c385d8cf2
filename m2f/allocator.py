"""`keep_freed_memory`: glibc's malloc keeps freed blocks for the next tensor instead of unmapping them.

Why: glibc serves every block above its mmap threshold (32 MB at most) with a fresh `mmap` and gives it
back with `munmap` when it is freed. Full-size inference allocates and frees such tensors all the time:
at 800x1216 the encoder's (S, 1024) FFN activation is 82 MB and a 1/4-resolution map of the pixel decoder
62 MB. The kernel then faults in and zeroes every 4 KB page of each one again: ~0.6 s of system time
and ~350k page faults per R50 image on 2 cores, 11-17% of the run (`benchmarks/bench_model.py`).
With mmap turned off and no trimming of the heap's top, a freed block is reused as it is, and a warm
process runs with no page faults at all. The price is memory: the process keeps its peak heap until it
exits (as PyTorch's CUDA caching allocator keeps device memory), and the heap fragments before it
settles. PyTorch allocates a little more than a block it freed (for alignment), so a freed block serves
again only once it has merged with a free neighbour: a loop over one 128 MB tensor grows the heap for
up to ~10 rounds (tests/test_allocator.py). For R50 at 800x1216, images of three sizes in turns, the
process's peak RSS settled at 2300 MB against 2050 MB with the default (+12%), after 4 images.

Process-wide by nature, so it is not set on import: `m2f predict` on the CPU (unless
`--no-keep-freed-memory`) and the inference benchmarks call it; in Python, call it once yourself. Small tensors (tiny-scale training at 128 px) are
below the threshold anyway: the tiny training step gains nothing from it. Elsewhere than glibc (macOS,
musl) it does nothing and says so.
"""

import ctypes
import functools

# mallopt's parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Tells glibc's malloc to serve every block from its heap (no mmap) and never to trim the heap.

    Returns:
        True where it took effect (glibc); False where the C library has no `mallopt` or refused it.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # Trimming first: setting it also stops glibc from raising its mmap threshold on its own.
    return bool(mallopt(M_TRIM_THRESHOLD, INT_MAX)) and bool(mallopt(M_MMAP_MAX, 0))
