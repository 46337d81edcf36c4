"""Keep freed memory in the process for the next tensor of its size (glibc on Linux).

glibc's malloc hands every block above its mmap threshold (at most 32 MiB by default) back to
the operating system when it is freed, and the next tensor of that size is a fresh mapping whose
pages fault in one by one as they are first written. A vision model at inspection resolution
frees and reallocates such blocks in every forward (a batch of eight 96-channel 128×128 fp32
activations is 50 MiB), and on a 2-vCPU virtual machine the page faults cost more than the
convolutions that write them: about 30 ms of a 130-160 ms RAAD forward at 256 px
(docs/history/raad.md). OpenVINO and other runtimes reuse their buffers; torch on a CPU relies
on the C allocator, hence the usual advice to preload jemalloc or tcmalloc. This does the same
with glibc's own settings, after the process has started: blocks up to ``limit`` bytes come from
the heap and stay with the process once freed (its resident memory stays at its peak).

Call :func:`keep_freed_memory` once in a process that scores or trains; ``raad``'s command line,
its scorer and ``raad bench`` do. ``RAAD_KEEP_FREED_MEMORY=0`` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: the default limit: blocks up to 1 GiB are kept
DEFAULT_LIMIT = 1 << 30

_state: dict = {}


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def keep_freed_memory(limit: int = DEFAULT_LIMIT) -> str:
    """Make glibc keep freed blocks up to ``limit`` bytes for reuse (see the module notes).
    Returns what is in effect, for reports: ``"glibc: kept up to N MiB"``, or why not ("off by
    RAAD_KEEP_FREED_MEMORY=0", "not glibc"). Idempotent; the first call's outcome holds."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"limit must be a positive number of bytes, got {limit!r}")
    if "status" in _state:
        return _state["status"]
    if os.environ.get("RAAD_KEEP_FREED_MEMORY", "1").strip() == "0":
        status = "off by RAAD_KEEP_FREED_MEMORY=0"
    else:
        libc = _libc()
        if libc is None:
            status = "not glibc (the C allocator's defaults)"
        else:
            # older glibc refuses a threshold above 32 MiB: take the largest it accepts
            for lim in (limit, 32 << 20):
                if libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(min(lim, 2**31 - 1))):
                    libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(2 * lim, 2**31 - 1)))
                    status = f"glibc: freed blocks up to {lim >> 20} MiB kept"
                    break
            else:
                status = "glibc refused the setting (the C allocator's defaults)"
    _state["status"] = status
    return status

