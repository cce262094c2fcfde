"""Memory a command needs, checked before it allocates. A config or size that cannot fit (a
model with a hundred million layers, a 4000x4000 stream, a toy dataset of 30000-pixel frames) is
refused in one line naming what it would need, instead of growing until the kernel's OOM killer
ends the process (or the machine) minutes later. The estimates are lower bounds: what is refused
could never run; what passes may still run short.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import torch

from selfforcing.errors import SelfForcingError

GIB = 2**30
_CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: a container's own limit, below the machine's


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory free for a new allocation on ``device``: a CUDA device's free memory; else the
    host's available memory (MPS shares it), or the container's headroom where that is lower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = psutil.virtual_memory().available
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((_CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):  # no cgroup v2 here, or no limit to read
        pass
    return free


def check_fits(needed: int, what: str, device: torch.device | str, fix: str) -> None:
    """Refuse ``what`` if its ``needed`` bytes exceed what ``device`` has free; ``fix`` says what to change."""
    device = torch.device(device)
    if device.type == "meta":
        return
    free = available_bytes(device)
    if needed > free:
        raise SelfForcingError(f"{what} needs at least {needed / GIB:,.1f} GiB of memory and {device} has "
                               f"{free / GIB:,.1f} GiB free: {fix}")
