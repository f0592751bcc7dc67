"""What the command lines share (common.cli): Ctrl-C while a command is still importing its
libraries gives one line and exit status 130."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, as_from_a_terminal


def interrupt_while_importing(module: str, library: str, preexec_fn=as_from_a_terminal
                              ) -> subprocess.Popen:
    """Start ``python -m module --help`` (as from a terminal unless ``preexec_fn`` says
    otherwise); send Ctrl-C's signal once ``library`` is loading."""
    proc = subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
    # the heavy imports come after the module installs its handler: once the library is in the
    # process's memory map, the import is under way (torch's takes seconds after that; the
    # sweep's driver loads no torch, and pyarrow's import and the rest take ~0.25 s more)
    deadline = time.monotonic() + 60
    while library not in Path(f"/proc/{proc.pid}/maps").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "the library never loaded"
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    return proc


@pytest.mark.parametrize("module, prog, library", [
    ("study.sweep", "study.sweep", "libarrow"),
    ("study.noise_eval", "study.noise_eval", "libtorch"),
    ("analysis.figures", "python -m analysis.figures", "numpy"),
])
def test_ctrl_c_while_importing_is_one_line_and_status_130(module, prog, library):
    proc = interrupt_while_importing(module, library)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr == f"{prog}: interrupted while starting; nothing was written\n"
    assert stdout == ""


def test_a_command_started_with_ctrl_c_ignored_keeps_ignoring_it():
    """``cmd &`` in a script starts it with SIGINT ignored, so Ctrl-C in the terminal stops
    the script, not its background jobs."""
    proc = interrupt_while_importing("study.sweep", "libarrow",
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "--resume" in stdout and stderr == ""


@pytest.mark.parametrize("module, prog, argv, words", [
    ("study.sweep", "study.sweep", ["--lrs", "-1e-3,1e-2"], "--lrs: learning rates must be > 0"),
    ("study.sweep", "study.sweep", ["--lrs", "-inf"], "--lrs: learning rates must be > 0"),
    ("study.sweep", "study.sweep", ["--noises", "-NaN"], "--noises"),
    ("study.noise_eval", "study.noise_eval", ["results", "--device", "tpu"], "invalid choice"),
    ("analysis.figures", "python -m analysis.figures", ["results", "--lr", "-1e-3"], "positive"),
])
def test_every_command_line_refuses_a_bad_flag_in_one_line(module, prog, argv, words, capsys):
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as exc:  # analysis.figures returns the status instead
        sys.exit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and words in err and err.count("\n") == 1, err


def test_a_uri_pyarrow_cannot_open_is_refused_not_made_a_local_folder(tmp_path, capsys, monkeypatch):
    """``--out s3://bucket/x`` was once the local folder ``s3:/bucket/x``; a URI is a file
    system's now (tests/test_s3_results.py), and one pyarrow does not know is refused."""
    from study.sweep import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["--out", "nosuch://bucket/x", "--dry-run"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("study.sweep: error: --out: nosuch://bucket/x: ") and "nosuch" in err
    assert not list(tmp_path.iterdir())
