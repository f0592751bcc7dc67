"""Shared helpers: run the real CLI in a subprocess and read back its Parquet tables."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from study.data import DataArrays

ROOT = Path(__file__).resolve().parents[1]
#: Columns that measure time or place, not the numbers a study computes.
VOLATILE = {"wall_s", "images_per_s", "host", "device", "error"}
#: A tiny study: 2 variants × 2 seeds, 3 epochs of 160 images (about 20 s of Ray on 2 cores).
TINY = ["--norms", "none,batch", "--seeds", "0,1", "--lrs", "0.02", "--epochs", "3",
        "--dataset", "synthetic", "--subset", "200", "--max-failures", "2"]


# Nothing the suite does may depend on the shell that started it: a cluster named in the
# environment or the Ray token mode of another session is not the one a test starts.
for _name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_NAMESPACE"):
    os.environ.pop(_name, None)
os.environ["MPLBACKEND"] = "Agg"
# Every Ray the tests start (and the sweeps they run) listens on 127.0.0.1 only: with this,
# Ray takes the loopback address as the node's instead of the machine's network address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Each pytest process (xdist runs two side by side) keeps its Rays' files, and the "latest
# cluster" pointer that a sweep without --address follows, in a dir of its own: two workers'
# clusters never meet, and a test cluster never overwrites the pointer to the developer's own.
RAY_TMPDIR = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths
os.environ["RAY_TMPDIR"] = RAY_TMPDIR


def pytest_unconfigure(config):
    shutil.rmtree(RAY_TMPDIR, ignore_errors=True)


def as_from_a_terminal() -> None:
    """``preexec_fn`` for a child that a test sends Ctrl-C: the default SIGINT a terminal
    gives, even where the suite itself was started with it ignored (``make test &`` in a
    script, ``nohup``), which every child would inherit otherwise."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """``run_trial(threads=N)`` sets torch's process-wide thread count; every test starts with
    the count the session began with, so no test's numbers depend on which tests ran before."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def sweep_env(**extra: str) -> dict[str, str]:
    """The environment of a sweep under test: a private local Ray unless --address says
    otherwise (never a cluster the developer happens to be running on this machine)."""
    return dict(os.environ, PYTHONUNBUFFERED="1", RAY_ADDRESS="local", **extra)


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "study.sweep", *args]


def run_sweep(*args: str, timeout: float = 300, check: bool = True, env: dict | None = None,
              data_dir: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m study.sweep ARGS`` to completion, bounded in time."""
    full_env = sweep_env(**(env or {}))
    extra = ["--data-dir", str(data_dir)] if data_dir else []
    proc = subprocess.run(sweep_cmd(*args, *extra), cwd=ROOT, env=full_env, timeout=timeout,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def read_tables(out: Path) -> dict[str, pd.DataFrame]:
    """Every results table, timing columns dropped, rows in a canonical order."""
    tables = {}
    for table in ("trials", "epochs", "layers", "steps"):
        files = sorted((out / table).glob("*.parquet"))
        df = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
        df = df.drop(columns=[c for c in df.columns if c in VOLATILE])
        if table == "trials":  # config_json and wall time differ in nothing that matters here
            df = df.drop(columns=["config_json"])
        if "hist" in df.columns:
            df["hist"] = df["hist"].map(lambda h: None if h is None else tuple(h))  # weight rows: none
        keys = [c for c in ("trial_id", "epoch", "step", "layer", "site") if c in df.columns]
        tables[table] = df.sort_values(keys).reset_index(drop=True)
    return tables


def assert_tables_equal(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> tuple[Path, dict[str, pd.DataFrame]]:
    """The TINY study run once, uninterrupted: the reference for fault tests."""
    out = tmp_path_factory.mktemp("reference") / "results"
    run_sweep(*TINY, "--out", str(out))
    return out, read_tables(out)


def tiny_data(n_train: int = 320, n_test: int = 64, seed: int = 0) -> DataArrays:
    """Random images whose red channel carries the label: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n_train + n_test)
    x = rng.integers(0, 256, (n_train + n_test, 3, 32, 32), dtype=np.uint8)
    x[:, 0] = np.minimum(255, x[:, 0] // 2 + 12 * y[:, None, None]).astype(np.uint8)  # learnable
    return DataArrays("tiny", tuple("abcdefghij"), x[:n_train], y[:n_train].astype(np.int64),
                      x[n_train:], y[n_train:].astype(np.int64))
