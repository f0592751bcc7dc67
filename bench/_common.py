"""Small helpers shared by the bench scripts (run as ``python bench/NAME.py``)."""

import os
from pathlib import Path


def loadavg() -> str:
    """The 1/5/15-minute load average, printed beside every measurement."""
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def timed_module(module: str, args: list[str], env: dict) -> float:
    """Wall seconds of ``python -m module args`` in a child process run from the repository
    root; exits with its stderr's tail if it fails."""
    import subprocess
    import sys
    import time

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{module} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0
