"""Ctrl-C while a command line is still importing (torch, Ray, matplotlib, pyarrow: seconds on
a small machine) gives one line and exit status 130, as a Ctrl-C later does, not a traceback
from deep inside an import.

A command's module, run as a program, calls ``quiet_until_main(prog)`` before its heavy
imports; its ``main`` calls ``python_interrupts()`` first, which gives Ctrl-C back to Python's
KeyboardInterrupt (that ``main`` catches itself). Imports no third-party library, so the
analysis, which never imports torch, can use it too.
"""

from __future__ import annotations

import signal
import sys


class _ExitWhileStarting:
    """SIGINT handler: one line on stderr, exit status 130."""

    def __init__(self, prog: str) -> None:
        self.prog = prog

    def __call__(self, signum: int, frame: object) -> None:
        sys.stderr.write(f"{self.prog}: interrupted while starting; nothing was written\n")
        raise SystemExit(130)


def quiet_until_main(prog: str) -> None:
    """From now until ``python_interrupts()``, Ctrl-C ends the program with one line; a
    program started with Ctrl-C ignored (``cmd &`` in a script) keeps ignoring it."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _ExitWhileStarting(prog))


def python_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt again, where ``quiet_until_main`` had changed it."""
    if isinstance(signal.getsignal(signal.SIGINT), _ExitWhileStarting):
        signal.signal(signal.SIGINT, signal.default_int_handler)
