"""Whether the joined Ray cluster can run the study: the room it has now, what its autoscaler may
add, and the wait for it to grow (docs/cluster.md, "Waiting for workers")."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.cli import UsageError

#: Seconds between the sweep's lines while it waits for the cluster to grow (the first at once).
WAIT_NOTE_EVERY_S = 30
#: How long the sweep looks for the autoscaler's first report where the cluster is too small
#: (Ray's monitor writes one every AUTOSCALER_UPDATE_INTERVAL_S, 5 s by default).
FIRST_REPORT_S = 10
#: A report older than this is a stopped autoscaler's.
STALE_REPORT_S = 60
#: The node type Ray's read-only node provider gives every node (`node_<node id>`): the monitor of
#: a `ray start --head` without --autoscaling-config, which launches nothing.
_READONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]+$")


def _amount(value: float, unit: str) -> str:
    return f"{value:g} {unit}" + ("s" if value > 1 else "")


def describe_bundle(bundle: dict) -> str:
    """What one trial asks for, in words: '0.5 GPU, 1 CPU'."""
    return ", ".join(_amount(bundle[k], k) for k in sorted(bundle, key=lambda k: (k != "GPU", k != "CPU", k)))


def fits(bundle: dict, resources: dict) -> bool:
    """True if a node of ``resources`` (its total) can hold the ``bundle`` of one trial."""
    return all(resources.get(k, 0) >= v for k, v in bundle.items())


def autoscaler_status(look_s: float = 0) -> dict | None:
    """The latest report of the cluster's autoscaler (what `ray status` prints: Ray's v1
    monitor on the head keeps it in the GCS), looking for up to ``look_s`` seconds; None where
    there is no fresh one (Ray's v2 autoscaler, whose reports are elsewhere, gives None too)."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + look_s
    while True:
        raw = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS
        status = json.loads(raw) if raw else {}
        if status.get("autoscaler_report") and time.time() - status.get("time", 0) < STALE_REPORT_S:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def _report_node_types(report: dict) -> set[str]:
    """The node types an autoscaler report names (running, idle, starting)."""
    names = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {})
    names |= set(report.get("pending_launches") or {})
    names |= {n[1] for n in report.get("pending_nodes") or [] if len(n) > 1}
    return names


def can_grow(status: dict | None) -> bool:
    """True where the autoscaler can launch nodes (`ray up`, any --autoscaling-config): its
    report names the config's node types. A `ray start --head` without a config still runs a
    monitor, whose read-only provider names each node `node_<id>` and launches nothing."""
    if not status:
        return False
    return any(not _READONLY_NODE_TYPE.match(n) for n in _report_node_types(status["autoscaler_report"]))


def autoscaling_config(gcs_address: str) -> dict | None:
    """The autoscaler's config, where the cluster's monitor runs on this machine (as on the head
    of `ray up`, where the driver runs: its ~/ray_bootstrap_config.yaml, node types' CPUs and
    GPUs filled in from their instance types): read from the monitor's --autoscaling-config.
    None where no monitor of this cluster runs here, or its config cannot be read."""
    import yaml

    if not os.path.isdir("/proc"):  # not Linux
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith(os.path.join("autoscaler", "_private", "monitor.py")) for a in args) \
                or f"--gcs-address={gcs_address}" not in args:
            continue
        for a in args:
            if a.startswith("--autoscaling-config="):
                try:  # JSON (`ray up`'s) is YAML
                    config = yaml.safe_load(Path(a.split("=", 1)[1]).expanduser().read_text())
                except (OSError, yaml.YAMLError):
                    return None
                return config if isinstance(config, dict) else None
    return None


def launchable_node_types(config: dict | None) -> dict[str, dict] | None:
    """{node type: its resources} of the worker types the autoscaler may launch; None where that
    is not known (no config, or a type that leaves its CPUs for Ray to find when it starts)."""
    if not config or not isinstance(config.get("available_node_types"), dict):
        return None
    if config.get("max_workers", 1) == 0:
        return {}
    types = {}
    for name, t in config["available_node_types"].items():
        if name == config.get("head_node_type") or t.get("max_workers", config.get("max_workers", 1)) == 0:
            continue
        resources = t.get("resources") or {}
        if "CPU" not in resources:
            return None
        types[name] = resources
    return types


@dataclass(frozen=True)
class ClusterNow:
    """What the cluster has now, as the sweep reports it while it waits."""

    nodes: list[dict]  # the total resources of each live node
    starting: str = ""  # what the autoscaler reports starting, or failing to start

    @property
    def gpus(self) -> float:
        return sum(n.get("GPU", 0) for n in self.nodes)

    def has(self) -> str:
        cpus = sum(n.get("CPU", 0) for n in self.nodes)
        return f"{self.gpus:g} GPUs, {cpus:g} CPUs on {len(self.nodes)} node(s)"

    def __str__(self) -> str:
        return f"it has {self.has()}" + (f"; {self.starting}" if self.starting else "")


def look_at_cluster(ray) -> ClusterNow:
    """The cluster's live nodes and what its autoscaler is starting."""
    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    report = (autoscaler_status() or {}).get("autoscaler_report") or {}
    starting = dict(report.get("pending_launches") or {})
    for node in report.get("pending_nodes") or []:
        if len(node) > 1:
            starting[node[1]] = starting.get(node[1], 0) + 1
    failed = {}
    for node in report.get("failed_nodes") or []:
        if len(node) > 1:
            failed[node[1]] = failed.get(node[1], 0) + 1
    said = [", ".join(f"{n} {t}" for t, n in sorted(starting.items())) + " starting"] if starting else []
    if failed:
        said.append(", ".join(f"{n} {t}" for t, n in sorted(failed.items()))
                    + " failed to start (`ray monitor cluster.yaml` says why)")
    return ClusterNow(nodes, "; ".join(said))


def wait_for_room(bundle: dict, asks: str, wait_s: float, look: Callable[[], ClusterNow],
                  every_s: float = WAIT_NOTE_EVERY_S, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait until a node that can hold one trial's ``bundle`` is in the cluster, saying what the
    study ``asks`` for and what the cluster has, at once and every ``every_s`` seconds; refuse
    past ``wait_s`` seconds. Returns the seconds waited."""
    t0 = clock()
    said = None
    while True:
        now = look()
        waited = clock() - t0
        if any(fits(bundle, n) for n in now.nodes):
            return waited
        if waited >= wait_s:
            raise UsageError(
                f"--wait-for-cluster {wait_s:g}: no node that can hold a trial ({describe_bundle(bundle)}) "
                f"joined the Ray cluster in {waited:.0f} s; {now} (`ray status` on the head shows what "
                "its autoscaler is doing)")
        if said is None or waited - said >= every_s:
            print(f"waiting for the cluster to grow: the study asks for {asks} "
                  f"({describe_bundle(bundle)} a trial); {now} ({waited:.0f} s; --wait-for-cluster "
                  f"{wait_s:g})", flush=True)
            said = waited
        sleep(min(1.0, max(0.0, wait_s - waited)))


@contextmanager
def check_cluster(ray, resources: dict, gpus: int, n_trials: int, storage: str,
                  wait_s: float | None) -> Iterator[None]:
    """Make sure the joined cluster can run the study's trials (each asks for ``resources``,
    ``n_trials`` at a time, ``gpus`` GPUs in all) before any is started; note a local
    --storage that the cluster's other nodes cannot reach.

    A cluster that cannot grow (no autoscaler, or ``wait_s`` None: a private Ray) and is too
    small is refused, as is a trial no node type of the autoscaler's config can hold: Tune
    would wait for ever. Where the autoscaler can add nodes, the study's bundles are asked of it
    (``ray.autoscaler.sdk.request_resources``) for as long as this context lasts, and the sweep
    waits up to ``wait_s`` seconds for a node that holds one trial; Tune's pending trials then
    keep the autoscaler adding nodes as they join."""
    bundle = {k: v for k, v in resources.items() if v}
    now = look_at_cluster(ray)
    short = gpus > now.gpus or not any(fits(bundle, n) for n in now.nodes)
    status = autoscaler_status(FIRST_REPORT_S) if short and wait_s is not None else None
    if short and not can_grow(status):
        if gpus > now.gpus:
            raise UsageError(f"--gpus {gpus}: the Ray cluster has {now.gpus:g} GPUs")
        largest = max((n.get("CPU", 0) for n in now.nodes), default=0)
        if resources["CPU"] > largest:
            raise UsageError(f"--cpus-per-trial {resources['CPU']}: the largest node of the Ray "
                             f"cluster has {largest:g} CPUs")
        raise UsageError(f"no node of the Ray cluster can hold a trial ({describe_bundle(bundle)}): "
                         f"{now}")
    if not short:
        _note_local_storage(len(now.nodes), storage)
        yield
        return

    from ray.autoscaler.sdk import request_resources

    types = launchable_node_types(autoscaling_config(ray.get_runtime_context().gcs_address))
    if types is not None and not any(fits(bundle, r) for r in [*types.values(), *now.nodes]):
        flag = "--cpus-per-trial" if not any(fits({"CPU": bundle["CPU"]}, r)
                                             for r in [*types.values(), *now.nodes]) else "--gpus"
        value = resources["CPU"] if flag == "--cpus-per-trial" else gpus
        kinds = "; ".join(f"{t}: {describe_bundle({k: v for k, v in r.items() if k in ('CPU', 'GPU')})}"
                          for t, r in types.items()) or "none"
        raise UsageError(f"{flag} {value}: a trial asks for {describe_bundle(bundle)}, more than any node "
                         f"of the Ray cluster or any node type its autoscaler may launch holds "
                         f"(node types: {kinds})")
    asks = (_amount(gpus, "GPU") if gpus
            else ", ".join(_amount(v * n_trials, k) for k, v in bundle.items()))
    fits_now = any(fits(bundle, n) for n in now.nodes)
    if wait_s == 0 and not fits_now:
        raise UsageError(f"--wait-for-cluster 0: no node of the Ray cluster can hold a trial "
                         f"({describe_bundle(bundle)}) now, and the sweep does not wait for its "
                         f"autoscaler to add one; {now}")
    request_resources(bundles=[bundle] * n_trials)
    try:
        if fits_now:
            print(f"the study asks for {asks}; the Ray cluster has {now.has()}: its autoscaler is "
                  "asked for the rest, and trials start as nodes join", flush=True)
        else:
            waited = wait_for_room(bundle, asks, wait_s, lambda: look_at_cluster(ray))
            now = look_at_cluster(ray)
            print(f"the cluster can hold a trial after {waited:.0f} s (it has {now.has()}); trials "
                  "start as nodes join", flush=True)
        _note_local_storage(max(len(now.nodes), 2), storage)
        yield
    finally:
        try:  # the request outlives the driver: withdrawn, so that idle nodes go
            request_resources(bundles=[])
        except Exception as e:  # the cluster is gone, or the connection to it
            print(f"note: the sweep could not withdraw its request for nodes from the cluster's "
                  f"autoscaler ({e}); until another request replaces it, idle nodes stay up",
                  file=sys.stderr)


def _note_local_storage(n_nodes: int, storage: str) -> None:
    """A note where trials run on other nodes than the driver's but --storage is a local path."""
    if n_nodes > 1 and "://" not in storage:
        print(f"note: trials run on other nodes than this one but --storage is the local path "
              f"{storage}; checkpoints of trials on other nodes need s3://... or a shared file "
              "system to survive a node loss", file=sys.stderr)
