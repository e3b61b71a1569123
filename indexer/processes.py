"""Other processes on this host, by pid (light: the serve client and the on-disk index both ask)."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether a process with this pid runs here (one we may not signal runs too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
