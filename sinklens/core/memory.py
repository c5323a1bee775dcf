"""How much memory an eager (pattern-hook) census needs, and how much the device has free.

The bridge reimplements attention step by step for every layer (scores, mask, float32 softmax,
pattern), so one layer of an eager forward holds several [batch, head, T, T] tensors at once.
``EAGER_COPIES`` of them is what was measured on the embedded model (peak RSS of a census at
T = 1024 and 2048, batch 1, minus the same forward with the fused engine): the estimate is that
factor times one float32 pattern of one layer, and it is checked in a test against a measured peak.
"""

from __future__ import annotations

import os

import torch

# Simultaneous [batch, head, T, T] float32 tensors alive in one layer of an eager census.
EAGER_COPIES = 4
# An eager census is refused (engine="eager") or avoided (engine="auto") when its estimate exceeds
# this share of the free memory: the rest of the forward and other processes need room too.
EAGER_SHARE = 0.5


def pattern_bytes(batch: int, n_heads: int, width: int) -> int:
    """Bytes of one layer's float32 attention pattern [batch, head, T, T]."""
    return 4 * batch * n_heads * width * width


def _eager_census_bytes(batch: int, n_heads: int, width: int) -> int:
    """Estimated peak of one layer of an eager census beyond the forward itself."""
    return EAGER_COPIES * pattern_bytes(batch, n_heads, width)


def free_bytes(device: torch.device | str) -> int:
    """Free memory of ``device``: CUDA's ``mem_get_info``, else the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def eager_fits(batch: int, n_heads: int, width: int, device: torch.device | str) -> tuple[bool, int, int]:
    """``(fits, needed, free)``: whether an eager census of [batch, width] prompts fits in ``device``'s memory."""
    needed = _eager_census_bytes(batch, n_heads, width)
    free = free_bytes(device)
    return needed <= EAGER_SHARE * free, needed, free


def gib(n_bytes: float) -> str:
    """``n_bytes`` as a short GiB string."""
    return f"{n_bytes / 2**30:.2f} GiB"
