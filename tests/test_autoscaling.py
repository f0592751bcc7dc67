"""The sweep on an autoscaling cluster, Ray's own autoscaler adding and removing nodes
(tests/autoscaling_cluster.py: cluster.yaml's node types, scaled down, on Ray's fake multi-node
provider): it asks for what it needs, waits saying so, runs every trial on the nodes that join
with the numbers of a local run, and leaves them to scale down; it refuses what no node type can
hold. And the wait itself, without Ray."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from common.cli import UsageError
from study.cluster_room import ClusterNow, wait_for_room
from tests.autoscaling_cluster import LocalAutoscalingCluster
from tests.conftest import ROOT, assert_tables_equal, read_tables, run_sweep, sweep_cmd, sweep_env

#: 2 trials of 1 CPU, 1 short epoch; the head has 0 CPUs, so both need a worker node.
STUDY = ["--gpus", "0", "--cpus-per-trial", "1", "--norms", "batch", "--seeds", "0,1", "--lrs", "0.02",
         "--epochs", "1", "--dataset", "synthetic", "--subset", "120"]


@pytest.fixture(scope="module")
def cluster():
    """A head with 0 CPUs and an autoscaler that may add up to 2 nodes of 1 CPU and 1 fake GPU."""
    with LocalAutoscalingCluster(worker_resources={"CPU": 1, "GPU": 1}, max_workers=2,
                                 idle_timeout_minutes=0.1) as c:
        yield c


class Timeline:
    """What a driver of its own sees of the cluster while the sweep runs, polled in a thread:
    when each node joined and left, when a trial first held resources, when the results of
    ``n_trials`` were all written."""

    def __init__(self, ray, out: Path, n_trials: int):
        self.ray, self.out, self.n_trials = ray, out, n_trials
        self.t0 = time.monotonic()
        self.head = ray.get_runtime_context().get_node_id()
        self.joined: dict[str, float] = {}
        self.left: dict[str, float] = {}
        self.first_running: float | None = None
        self.all_written: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic() - self.t0
            for node in self.ray.nodes():
                nid = node["NodeID"]
                if nid == self.head:
                    continue
                if node["Alive"]:
                    self.joined.setdefault(nid, t)
                elif nid in self.joined:
                    self.left.setdefault(nid, t)
            if self.first_running is None:
                free = self.ray.available_resources().get("CPU", 0)
                if self.ray.cluster_resources().get("CPU", 0) > free:
                    self.first_running = t
            written = len(list((self.out / "trials").glob("*.parquet")))
            if self.all_written is None and written >= self.n_trials:
                self.all_written = t
            self._stop.wait(0.25)

    def workers_alive(self) -> set[str]:
        return set(self.joined) - set(self.left)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def trial_nodes(out: Path) -> dict[str, str]:
    """{trial id: the node its last report came from}."""
    nodes = {}
    for result in (out / "tune").glob("*/*/result.json"):
        lines = result.read_text().splitlines()
        nodes[result.parent.name] = json.loads(lines[-1])["node_id"]
    return nodes


def test_the_sweep_waits_for_the_autoscaler_runs_on_the_nodes_it_adds_and_lets_them_go(cluster, tmp_path):
    import ray

    out = tmp_path / "results"
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    lines: list[tuple[float, str]] = []
    try:
        assert [n for n in ray.nodes() if n["Alive"]] and ray.cluster_resources().get("CPU", 0) == 0
        timeline = Timeline(ray, out, n_trials=2)
        proc = subprocess.Popen(
            sweep_cmd(*STUDY, "--out", str(out), "--address", cluster.address, "--wait-for-cluster", "120"),
            cwd=ROOT, env=sweep_env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)

        def read() -> None:
            for line in proc.stdout:
                lines.append((time.monotonic() - timeline.t0, line.rstrip("\n")))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=150)
        finally:
            proc.kill()
            reader.join(timeout=10)
        ended = time.monotonic() - timeline.t0
        output = "\n".join(f"{t:6.1f} {line}" for t, line in lines)
        assert proc.returncode == 0, output[-4000:] + "\n" + cluster.monitor_log()[-3000:]

        waits = [(t, line) for t, line in lines if line.startswith("waiting for the cluster to grow:")]
        assert waits, output[-4000:]
        assert waits[0][1].startswith("waiting for the cluster to grow: the study asks for 2 CPUs (1 CPU a "
                                      "trial); it has 0 GPUs, 0 CPUs on 1 node(s)"), waits[0][1]
        assert "--wait-for-cluster 120)" in waits[0][1]
        gaps = [b - a for (a, _), (b, _) in zip(waits, waits[1:], strict=False)]
        assert all(gap > 25 for gap in gaps), "a line at once, then one every 30 s"
        assert any(line.startswith("the cluster can hold a trial after") for _, line in lines), output

        assert timeline.joined, "the autoscaler added a node"
        nodes = trial_nodes(out)
        assert len(nodes) == 2 and set(nodes.values()) <= set(timeline.joined), (nodes, timeline.joined)
        assert timeline.head not in nodes.values()

        # the same numbers as the same study run by a private local Ray
        reference = tmp_path / "reference"
        run_sweep(*STUDY, "--out", str(reference), timeout=150)
        assert_tables_equal(read_tables(reference), read_tables(out))

        # the sweep cleared its request: the idle workers go (idle timeout 6 s)
        deadline = time.monotonic() + 30
        while timeline.workers_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        timeline.stop()
        assert not timeline.workers_alive(), f"workers still up: {timeline.workers_alive()}"
        first_wait = waits[0][0]
        print(f"\nautoscaling timeline (s from the sweep's start; 2 trials of 1 CPU, workers of 1 CPU):\n"
              f"  first wait line {first_wait:.1f}; first worker joined {min(timeline.joined.values()):.1f}; "
              f"first trial running {timeline.first_running:.1f}; last trial done "
              f"{timeline.all_written:.1f}; sweep exited {ended:.1f}; workers gone "
              f"{max(timeline.left.values()):.1f} (the local reference run in between)\n"
              + "\n".join(f"  {t:6.1f} {line}" for t, line in waits))
    finally:
        ray.shutdown()


def test_a_trial_no_node_type_can_hold_is_refused_at_once_and_wait_0_does_not_wait(cluster, tmp_path):
    """Refused in one line, exit 2, nothing written: a trial of 2 CPUs where every node type has
    1, whatever --wait-for-cluster says; and with --wait-for-cluster 0 a study that would need a
    node the cluster lacks now (the module's first test leaves the workers gone)."""
    for flags, message in (
        (["--cpus-per-trial", "2", "--wait-for-cluster", "3"],
         "study.sweep: error: --cpus-per-trial 2: a trial asks for 2 CPUs, more than any node of the Ray "
         "cluster or any node type its autoscaler may launch holds (node types: gpu_worker: 1 GPU, 1 CPU)"),
        (["--cpus-per-trial", "1", "--wait-for-cluster", "0"],
         "study.sweep: error: --wait-for-cluster 0: no node of the Ray cluster can hold a trial (1 CPU) "
         "now, and the sweep does not wait for its autoscaler to add one; it has 0 GPUs, 0 CPUs on "
         "1 node(s)"),
    ):
        out = tmp_path / flags[-1] / "results"
        t0 = time.monotonic()
        proc = run_sweep(*STUDY[:2], *STUDY[4:], *flags, "--out", str(out), "--address", cluster.address,
                         env={"PYTHONPATH": str(ROOT)}, check=False, timeout=120)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
        assert "waiting" not in proc.stdout
        assert not (out / "study.json").exists()
        assert time.monotonic() - t0 < 60


def test_the_wait_says_what_it_waits_for_every_30_s_and_refuses_past_its_limit(capsys):
    """The wait itself, on a clock of its own: a line at once and every 30 s, never more; a node
    that holds a trial ends it; past --wait-for-cluster, one line."""
    clock = [0.0]
    bundle = {"CPU": 1, "GPU": 0.5}
    empty = ClusterNow([{"CPU": 1}], "1 gpu_worker starting")

    def sleep(s: float) -> None:
        clock[0] += s

    with pytest.raises(UsageError) as refused:
        wait_for_room(bundle, "2 GPUs", 100, lambda: empty, clock=lambda: clock[0], sleep=sleep)
    said = capsys.readouterr().out.splitlines()
    assert said == [f"waiting for the cluster to grow: the study asks for 2 GPUs (0.5 GPU, 1 CPU a trial); "
                    f"it has 0 GPUs, 1 CPUs on 1 node(s); 1 gpu_worker starting ({s} s; "
                    "--wait-for-cluster 100)" for s in (0, 30, 60, 90)]
    assert str(refused.value) == ("--wait-for-cluster 100: no node that can hold a trial (0.5 GPU, 1 CPU) "
                                  "joined the Ray cluster in 100 s; it has 0 GPUs, 1 CPUs on 1 node(s); "
                                  "1 gpu_worker starting (`ray status` on the head shows what its "
                                  "autoscaler is doing)")
    clock[0] = 0.0
    grown = ClusterNow([{"CPU": 1}, {"CPU": 4, "GPU": 1}])
    looks = iter([empty, empty, grown])
    assert wait_for_room(bundle, "2 GPUs", 100, lambda: next(looks), clock=lambda: clock[0], sleep=sleep) == 2
    assert len(capsys.readouterr().out.splitlines()) == 1
