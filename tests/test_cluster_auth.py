"""Joining a Ray cluster that asks for Ray 2.60's authentication token (issue 20, item 9).

`ray start --head` turns token authentication on wherever ~/.ray/auth_token exists (a `make demo`
leaves one), and ``ray.init(address=...)`` never turns it on by itself: the sweep was refused
after ~20 s with "Failed to connect". A real head with token auth on, on 127.0.0.1, with its own
HOME and temp dir; every process of it is stopped by pid at the end. About 30 s in all.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, sweep_cmd

RAY = str(Path(sys.executable).with_name("ray"))
#: The one line that says where a token goes.
HOW = ("copy the cluster's token (~/.ray/auth_token on its head) to ~/.ray/auth_token here, or point "
       "RAY_AUTH_TOKEN_PATH at a copy (or set RAY_AUTH_TOKEN)")
#: One trial, one short epoch: enough to see a study run on the cluster.
ONE_TRIAL = ["--norms", "none", "--seeds", "0", "--lrs", "0.02", "--epochs", "1", "--dataset",
             "synthetic", "--subset", "120"]
#: A driver joining with init_ray alone (no torch, no Tune): prints the cluster's CPUs and the mode.
JOIN = ("import os, sys; from common.cli import UsageError; from study.cluster import init_ray\n"
        "try:\n    ray = init_ray(sys.argv[1])\n"
        "except UsageError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n"
        "print(ray.cluster_resources()['CPU'], os.environ.get('RAY_AUTH_MODE')); ray.shutdown()")


def home_with(base: Path, name: str, token: str | None) -> Path:
    """A HOME of its own, holding ``token`` in ~/.ray/auth_token (none: no token there)."""
    home = base / name
    (home / ".ray").mkdir(parents=True)
    if token is not None:
        (home / ".ray" / "auth_token").write_text(token)
        (home / ".ray" / "auth_token").chmod(0o600)
    return home


def env_for(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment less anything that names a cluster or a token, on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT), **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of(sid: int, marker: str) -> list[int]:
    """Live processes of session ``sid``, or whose command line names ``marker`` (the temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, waiting for its parent
            if os.getsid(pid) == sid or marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(pid)
        except (OSError, IndexError):  # gone meanwhile
            pass
    return pids


def stop_session(sid: int, marker: str) -> list[int]:
    """SIGTERM, then SIGKILL, every process of the head's session or its temp dir; what is left.
    (Ray's GCS can take seconds to stop on SIGTERM: the test does not wait for it.)"""
    for sig, grace in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        for pid in _pids_of(sid, marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while _pids_of(sid, marker) and time.time() < deadline:
            time.sleep(0.1)
    return _pids_of(sid, marker)


def start_head(base: Path, home: Path) -> tuple[str, int, str]:
    """``ray start --head`` as a user runs it (RAY_AUTH_MODE unset): (its address, its session,
    what it printed)."""
    port = free_port()
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--port", str(port), "--temp-dir", str(base / "ray"),
         "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--include-dashboard=false",
         "--disable-usage-stats"],
        env=env_for(home), cwd=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        stop_session(proc.pid, f"{base}/")
        raise
    assert proc.returncode == 0, output[-2000:]
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline, f"the head's GCS never listened on {port}"
            time.sleep(0.1)
    return f"127.0.0.1:{port}", proc.pid, output


@pytest.fixture(scope="module")
def token_head():
    """A head with token authentication on (a token in its HOME, RAY_AUTH_MODE unset):
    (address, the folder for HOMEs, the cluster's token)."""
    base = Path(tempfile.mkdtemp(prefix="rauth", dir="/tmp"))  # short: Ray's socket paths
    token = secrets.token_hex(32)
    sid = None
    try:
        address, sid, output = start_head(base, home_with(base, "head-home", token))
        assert "Token authentication is enabled" in output, output[-2000:]
        yield address, base, token
    finally:
        left = stop_session(sid, f"{base}/") if sid else []
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes of the test's head still running: {left}"


def run_sweep_at(address: str, env: dict[str, str], out: Path, timeout: float):
    t0 = time.time()
    proc = subprocess.run(sweep_cmd("--address", address, *ONE_TRIAL, "--out", str(out)), cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - t0


def test_the_sweep_joins_a_token_cluster_whose_token_is_readable_here(token_head):
    """The user's path: RAY_AUTH_MODE unset, the token in ~/.ray/auth_token → the study runs."""
    address, base, token = token_head
    out = base / "joined"
    proc, took = run_sweep_at(address, env_for(home_with(base, "good", token)), out, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 trials (1 in this run), 0 errored" in proc.stdout
    assert len(list((out / "trials").glob("*.parquet"))) == 1
    assert "InvalidAuthToken" not in proc.stderr
    print(f"sweep on the token cluster: {took:.1f} s")


def test_no_token_here_is_refused_at_once_in_one_line(token_head):
    address, base, _ = token_head
    out = base / "no-token"
    proc, took = run_sweep_at(address, env_for(home_with(base, "empty", None)), out, timeout=60)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        f"study.sweep: error: --address: the Ray cluster at {address} requires its authentication "
        f"token and none is readable here: {HOW}"]
    assert took < 12, took  # ray.init alone retried for ~20 s
    assert not list(out.glob("*/*.parquet"))
    print(f"refused without a token: {took:.1f} s")


def test_another_clusters_token_is_refused_at_once_in_one_line(token_head):
    """RAY_AUTH_TOKEN comes before ~/.ray/auth_token (which holds the right one here)."""
    address, base, token = token_head
    wrong = secrets.token_hex(32)
    proc, took = run_sweep_at(address, env_for(home_with(base, "wrong", token), RAY_AUTH_TOKEN=wrong),
                              base / "wrong-token", timeout=60)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        f"study.sweep: error: --address: the Ray cluster at {address} refuses the authentication "
        f"token found here (in RAY_AUTH_TOKEN; another cluster's?): {HOW}"]
    assert took < 12, took
    print(f"refused with a wrong token: {took:.1f} s")


@pytest.mark.parametrize("case", ["token path", "mode disabled", "mode token, no token"])
def test_init_ray_joins_or_says_what_to_do(token_head, case):
    """init_ray alone, for the other ways a token is given or refused here."""
    address, base, token = token_head
    copy = base / "copy-of-token"
    copy.write_text(token)
    if case == "token path":
        env = env_for(home_with(base, "token-path", None), RAY_AUTH_TOKEN_PATH=str(copy))
        expected = None
    elif case == "mode disabled":
        env = env_for(home_with(base, "mode-disabled", token), RAY_AUTH_MODE="disabled")
        expected = (f"--address: the Ray cluster at {address} requires its authentication token "
                    f"and RAY_AUTH_MODE=disabled here: unset it and {HOW}")
    else:  # without the check, Ray's client would abort on it (and ray.init raised a traceback)
        env = env_for(home_with(base, "mode-token", None), RAY_AUTH_MODE="token")
        expected = (f"--address: RAY_AUTH_MODE=token here, to join the Ray cluster at {address}, "
                    f"but none is readable here: {HOW}")
    proc = subprocess.run([sys.executable, "-c", JOIN, address], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    if expected is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == ["1.0", "token"]
    else:
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert proc.stderr.splitlines() == [expected]


def test_a_cluster_without_token_auth_is_joined_as_before():
    """A head started with no token anywhere has token auth off: a driver holding a stale token
    (from an old `make demo`) joins it as before, and token mode stays off."""
    base = Path(tempfile.mkdtemp(prefix="rauth", dir="/tmp"))
    sid = None
    try:
        address, sid, output = start_head(base, home_with(base, "head-home", None))
        assert "Token authentication is enabled" not in output
        proc = subprocess.run([sys.executable, "-c", JOIN, address], cwd=ROOT,
                              env=env_for(home_with(base, "stale", secrets.token_hex(32))),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == ["1.0", "None"]
    finally:
        left = stop_session(sid, f"{base}/") if sid else []
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes of the test's head still running: {left}"
