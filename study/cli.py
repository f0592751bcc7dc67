"""What the command lines (study.sweep, study.noise_eval, analysis.figures) share: errors in
one line, and Ctrl-C in one line from the start.

``Parser`` is argparse with one-line errors (``NAME: error: ...``, exit status 2, no usage
dump) that takes a value starting like a negative number (``--lrs -1e-3,1e-2``, ``--lr -inf``)
as the flag's value, as Python 3.13's argparse does for numbers (3.11 takes only ``-1`` and
``-.5``, and the rest for unknown flags), so it gets the command's own refusal.

Ctrl-C while a command is still importing (torch, Ray, matplotlib, pyarrow: seconds on a small
machine) gives one line and exit status 130, as a Ctrl-C later does, not a traceback from
deep inside an import: the command's module, run as a program, calls ``quiet_until_main``
before its heavy imports; its ``main`` calls ``python_interrupts()`` first, which gives Ctrl-C
back to Python's KeyboardInterrupt (that ``main`` catches itself).

Imports no third-party library, so the analysis, which never imports torch, can use it too.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors under the command's ``name``; negative numbers are values."""

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
