"""Peak resident memory of this process.

``getrusage(RUSAGE_SELF).ru_maxrss`` is the wrong figure for a process started by a large one:
Linux keeps the high-water mark of the memory a process had before ``exec`` (the forked copy
of its parent), so a small child of a 600 MB launcher reports 600 MB. ``VmHWM`` in
/proc/self/status belongs to the current address space only, which ``exec`` replaces.
"""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since its ``exec``, in bytes.

    Returns:
        VmHWM from /proc/self/status (Linux); elsewhere ru_maxrss (bytes on macOS, KiB on
        other systems, converted).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
