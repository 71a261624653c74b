"""Peak memory of a piece of work: CUDA's allocator peak, or on the CPU the process's peak resident set.

On the CPU the peak is Linux's ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the work, else
``ru_maxrss`` (the whole process's peak: measure in a fresh process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def rss_mb(key: str) -> float | None:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """``probe = PeakMemory.start(device)``, then the work, then ``probe.peak_mb()``."""

    device: str
    before_mb: float | None
    method: str

    @classmethod
    def start(cls, device: str) -> PeakMemory:
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return cls(device, torch.cuda.memory_allocated() / 2**20, "torch.cuda.max_memory_allocated")
        before = rss_mb("VmRSS")
        method = "VmHWM (peak RSS) after clear_refs" if reset_peak_rss() else "ru_maxrss"
        return cls(device, before, method)

    def peak_mb(self) -> float:
        """The peak since `start` (for ``ru_maxrss``: since the process began)."""
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        peak = rss_mb("VmHWM") if self.method.startswith("VmHWM") else None
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return peak
