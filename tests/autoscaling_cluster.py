"""A local autoscaling Ray cluster for tests: Ray's own autoscaler, with its fake multi-node
provider (Ray 2.60) launching and removing worker nodes on this machine as demand comes and goes.

The worker node types are cluster.yaml's (``available_node_types``, its head type left out),
scaled down: the resources the test gives (by default 1 CPU and 1 fake GPU), ``min_workers: 0``,
at most ``max_workers`` each, and an idle timeout of 6 s. The head's resources are cluster.yaml
head's (0 CPUs: no trial runs there).

``ray start --head`` runs in a new session (setsid), on a free port of 127.0.0.1 and in a temp
dir of its own; the autoscaler (Ray's monitor, a child of that session) starts every worker node
inside its own process, so every process of the cluster carries the session's id. ``stop()``
ends exactly those, and any whose command line names the temp dir: SIGTERM, then SIGKILL. A
watchdog process does the same if the process that started the cluster dies without stopping
it. Never ``ray stop`` and never ``ray.cluster_utils.AutoscalingCluster.start()/shutdown()``:
they run ``ray stop --force``, which ends every Ray on the machine.

    with LocalAutoscalingCluster() as cluster:
        subprocess.run([... "--address", cluster.address])
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
#: The node type name Ray's fake provider gives its head.
FAKE_HEAD_TYPE = "ray.head.default"
#: Each node's object store: small, so that fake nodes do not fill /dev/shm.
OBJECT_STORE_BYTES = 100 * 1024 ** 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scaled_down_node_types(worker_resources: dict, max_workers: int,
                           cluster_yaml: Path = ROOT / "cluster.yaml") -> tuple[dict, dict]:
    """(head resources, worker node types) from cluster.yaml, each worker type with
    ``worker_resources``, min_workers 0 and at most ``max_workers``."""
    config = yaml.safe_load(cluster_yaml.read_text())
    head = config["head_node_type"]
    types = {}
    for name, t in config["available_node_types"].items():
        if name == head:
            continue
        types[name] = {"resources": {**worker_resources, "object_store_memory": OBJECT_STORE_BYTES},
                       "node_config": {}, "min_workers": 0,
                       "max_workers": min(max_workers, t.get("max_workers", max_workers))}
    return dict(config["available_node_types"][head].get("resources") or {}), types


def autoscaling_config(port: int, head_resources: dict, worker_types: dict,
                       idle_timeout_minutes: float) -> dict:
    """The whole config of the fake provider (Ray 2.60's wheel lacks its example.yaml)."""
    types = copy.deepcopy(worker_types)
    types[FAKE_HEAD_TYPE] = {"resources": head_resources, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "fake_multinode",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",  # without it, launched nodes look for port 6379
        },
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands",
                           "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                           "rsync_filter")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _zombie(pid: int) -> bool:
    """True for a process that has ended and waits for its parent to collect it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def cluster_pids(sid: int | None, temp_dir: str) -> list[int]:
    """The live processes of session ``sid``, or naming ``temp_dir`` on their command line."""
    mine = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        if pid == os.getpid() or _zombie(pid):
            continue
        try:
            ours = sid is not None and os.getsid(pid) == sid
        except OSError:  # gone
            continue
        if ours or temp_dir in _cmdline(pid):
            mine.append(pid)
    return mine


def kill_cluster(sid: int | None, temp_dir: str, grace_s: float = 3) -> None:
    """SIGTERM every process of the cluster, then SIGKILL what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        pids = cluster_pids(sid, temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = cluster_pids(sid, temp_dir)
        if not pids:
            return


def _reap_when_parent_dies(parent: int, sid: int, temp_dir: str) -> None:
    """The watchdog: once the process that started the cluster is gone (even SIGKILLed, when
    nothing of it runs), stop the cluster."""
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            break
        if not cluster_pids(sid, temp_dir):
            return  # stopped by its owner
        time.sleep(1)
    kill_cluster(sid, temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


class LocalAutoscalingCluster:
    """A head with an autoscaler whose worker types are cluster.yaml's, scaled down."""

    def __init__(self, worker_resources: dict | None = None, max_workers: int = 2,
                 idle_timeout_minutes: float = 0.1, env: dict | None = None):
        self.head_resources, self.worker_types = scaled_down_node_types(
            worker_resources or {"CPU": 1, "GPU": 1}, max_workers)
        self.idle_timeout_minutes = idle_timeout_minutes
        # RAY_AUTH_MODE explicit: `ray start --head` turns token auth on where ~/.ray/auth_token
        # exists and the variable is unset.
        self.env = {"RAY_AUTH_MODE": "disabled", **(env or {})}
        self.temp_dir = tempfile.mkdtemp(prefix="rayas_", dir="/tmp")  # short: Ray's socket paths
        self.address: str | None = None
        self.sid: int | None = None
        self._watchdog: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> LocalAutoscalingCluster:
        port = free_port()
        config = Path(self.temp_dir) / "autoscaling.yaml"
        config.write_text(yaml.safe_dump(autoscaling_config(
            port, self.head_resources, self.worker_types, self.idle_timeout_minutes)))
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               # Ray keeps 127.0.0.1 as the node's address (else it takes the machine's); the
               # monitor, and so the nodes it launches, inherit it
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **self.env}
        env.pop("RAY_ADDRESS", None)
        cmd = [RAY, "start", "--head", f"--port={port}", f"--temp-dir={self.temp_dir}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={self.head_resources.get('CPU', 0):g}",
               f"--num-gpus={self.head_resources.get('GPU', 0):g}",
               f"--object-store-memory={OBJECT_STORE_BYTES}", "--include-dashboard=false",
               "--disable-usage-stats", f"--autoscaling-config={config}"]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.sid = proc.pid  # the session's id: its leader's pid
        self._watchdog = subprocess.Popen(
            [sys.executable, __file__, "--reap", str(os.getpid()), str(self.sid), self.temp_dir],
            start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out}")
        self.address = f"127.0.0.1:{port}"
        return self

    def pids(self) -> list[int]:
        """The live processes of this cluster."""
        return cluster_pids(self.sid, self.temp_dir)

    def stop(self, grace_s: float = 3) -> None:
        if self.sid is not None:
            kill_cluster(self.sid, self.temp_dir, grace_s)
            self.sid = None
        if self._watchdog is not None:
            self._watchdog.wait(timeout=15)
            self._watchdog = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def monitor_log(self) -> str:
        """The autoscaler's log (what it launched and removed, and why)."""
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.log"))
        return logs[-1].read_text(errors="replace") if logs else ""

    def __enter__(self) -> LocalAutoscalingCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["--reap"]:
    _reap_when_parent_dies(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
