"""This process's peak resident memory (no paddle import: the merge tools report it and keep their footprint)."""
from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """This process's peak RSS. Linux: VmHWM, because `ru_maxrss` after fork/vfork+exec starts at the
    parent's RSS (the pre-exec mm's high-water mark is carried over), overstating a child started by a
    big process."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
