"""Memory: the peak of a stretch of work (measured the same way by the training loop and the benchmarks),
and how much more this process may allocate (`available_bytes`), so that work can refuse before it starts."""

import contextlib
import resource
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class PeakMemory:
    """Peak memory growth of a stretch of work above the memory held when `start()` is called.

    CPU: the process's resident set. `start()` resets the kernel's high-water mark to the current RSS
    (writing 5 to /proc/self/clear_refs, Linux >= 4.0), so what the process held earlier (building the
    model, generating data, an earlier larger step) cannot hide the peak; `peak_bytes()` = VmHWM - RSS
    at start. Where the reset is not allowed it falls back to the growth of `ru_maxrss`, which can only
    under-report (even report 0); `method` says which was used. CUDA: `max_memory_allocated` above
    `memory_allocated` at start.

    Args:
        device: where the work runs ("cpu", "cuda" or a torch.device).
    """

    def __init__(self, *, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.method = "cuda max_memory_allocated" if self.cuda else "peak RSS (VmHWM reset)"
        self._base = 0

    def start(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            _CLEAR_REFS.write_text("5")
            self._base = _status_bytes("VmRSS")
        except OSError:
            self.method = "ru_maxrss growth (no VmHWM reset allowed; may under-report)"
            self._base = _max_rss_bytes()
        return self

    def peak_bytes(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if self.method.startswith("ru_maxrss"):
            return _max_rss_bytes() - self._base
        return _status_bytes("VmHWM") - self._base


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _status_bytes(field: str, file: Path = _STATUS) -> int:
    for line in file.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError(f"{file} has no {field} line")


def available_bytes() -> int:
    """What this process can still allocate on the CPU: the kernel's MemAvailable, and, when an address
    space limit is set (`ulimit -v`, `resource.RLIMIT_AS`), what is left under it. -1 when unknown."""
    limits = []
    with contextlib.suppress(OSError):
        limits.append(_status_bytes("MemAvailable", Path("/proc/meminfo")))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            limits.append(soft - _status_bytes("VmSize"))
        except OSError:
            limits.append(soft)
    return max(min(limits), 0) if limits else -1
