"""What the command lines (study.sweep, study.noise_eval, analysis.figures) share: one-line
errors, Ctrl-C in one line from the start, and short lists in messages.

Belongs to neither wing (training, analysis) and imports only the standard library.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

#: Exit status of a refused command line or input (argparse's).
EXIT_USAGE = 2


class UsageError(Exception):
    """A user's mistake: the command prints the message in one line and exits with EXIT_USAGE."""


def first_few(items: Sequence[object], limit: int = 3, sep: str = ", ") -> str:
    """``a, b, c, and 4 more``: the first ``limit`` items, and how many were left out."""
    items = [str(i) for i in items]
    more = f"{sep}and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` (created if missing) cannot take new files, or None if it can: a command
    asks before its long work rather than fail at its end."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return " ".join(str(e.strerror or e).split())
    return None


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors under the command's ``name``; negative numbers are values."""

    # Python 3.11 takes only ``-1`` and ``-.5`` as values and the rest for unknown flags; 3.13
    # takes any number, so ``--lrs -1e-3`` gets the command's own refusal, not argparse's.
    def __init__(self, *args, name: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name = name
        self._negative_number_matcher = re.compile(r"-(\.?\d|inf|nan)", re.IGNORECASE)

    def error(self, message: str) -> None:  # type: ignore[override]
        message = re.sub(r"^argument (\S+): \1: ", r"\1: ", message)  # types that name their flag
        sys.stderr.write(f"{self.name}: error: {message}\n")
        raise SystemExit(2)


class _ExitWhileStarting:
    """SIGINT handler: one line on stderr, exit status 130."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, signum: int, frame: object) -> None:
        sys.stderr.write(f"{self.name}: interrupted while starting; nothing was written\n")
        raise SystemExit(130)


def quiet_until_main(name: str) -> None:
    """From now until ``python_interrupts()``, Ctrl-C ends the program with one line; a
    program started with Ctrl-C ignored (``cmd &`` in a script) keeps ignoring it."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _ExitWhileStarting(name))


def python_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt again, where ``quiet_until_main`` had changed it."""
    if isinstance(signal.getsignal(signal.SIGINT), _ExitWhileStarting):
        signal.signal(signal.SIGINT, signal.default_int_handler)
