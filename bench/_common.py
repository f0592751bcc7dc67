"""Small helpers shared by the bench scripts (run as ``python bench/NAME.py``)."""

import os


def loadavg() -> str:
    """The 1/5/15-minute load average, printed beside every measurement."""
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"
