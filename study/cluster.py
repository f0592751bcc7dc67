"""Where the sweep runs: joining or starting Ray, the resources a trial asks for and whether the
cluster has them (or its autoscaler can add them: then the sweep asks for them and waits), Tune's
storage, and NVIDIA MPS on this machine (docs/cluster.md)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.cli import UsageError


def trial_resources(cpus_per_trial: int, gpus: int, trials_per_gpu: int) -> dict:
    """What one trial asks Ray for: its CPUs and, with GPUs, its share of one."""
    resources: dict = {"CPU": cpus_per_trial}
    if gpus:
        resources["GPU"] = 1 / trials_per_gpu
    return resources


def check_storage(storage: str, name: str, new_study: bool) -> None:
    """Fail before anything is written if Tune could not keep its experiment in ``storage``, or
    if a new study would share it with another study's experiment of the same name (a later
    --resume of either would restore the other's)."""
    import pyarrow.fs
    from ray import tune

    if "://" in storage:
        try:
            pyarrow.fs.FileSystem.from_uri(storage)
        except (OSError, ValueError, pyarrow.ArrowException) as e:
            raise UsageError(f"--storage {storage}: {e}") from None
    else:  # the folder or the first of its parents that exists; nothing is made yet
        place = Path(storage).resolve()
        while not place.exists() and place != place.parent:
            place = place.parent
        if not place.is_dir() or not os.access(place, os.W_OK | os.X_OK):
            raise UsageError(f"--storage {storage}: {place} is not a folder this user can write to")
    exp_path = os.path.join(storage, name)
    if new_study and tune.Tuner.can_restore(exp_path):
        raise UsageError(f"--storage {storage} already holds a Tune experiment named {name!r}, "
                         f"not this study's: give this study another --name, or remove {exp_path}")


def mps_control_socket() -> Path:
    """Where a running MPS control daemon listens: NVIDIA's default pipe folder or the one
    CUDA_MPS_PIPE_DIRECTORY names (clients look there too)."""
    return Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps") / "control"


def mps_notice(trials_per_gpu: int) -> str | None:
    """A note when this machine has NVIDIA GPUs but runs no MPS daemon: trials packed on one of
    its GPUs would take turns on it instead of overlapping (None where MPS runs, or no GPU)."""
    if trials_per_gpu < 2 or shutil.which("nvidia-smi") is None or mps_control_socket().exists():
        return None
    return (f"note: NVIDIA MPS is not running on this machine, so the {trials_per_gpu} trials that "
            "share each of its GPUs take turns on it; `nvidia-cuda-mps-control -d` before `ray start` "
            "lets their kernels overlap (8 trials: 5.5x the images/s of one on an H200, against 1.6x "
            "at best without; README, \"Packing trials\")")


def _check_address(address: str) -> None:
    """Fail fast on an unreachable host:port instead of waiting on Ray's retries."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise UsageError(f"--address: cannot reach a Ray cluster at {address} ({e})") from None


def running_cluster_address() -> str | None:
    """The address of a Ray cluster started on this machine by ``ray start`` (as on the head
    node of ``ray up``), if one is up; None otherwise."""
    from ray._private.services import find_bootstrap_address

    address = find_bootstrap_address(None)
    if not address:
        return None
    try:
        _check_address(address)
    except UsageError:  # a stale record of a cluster that has stopped
        return None
    return address


def resolve_address(address: str | None) -> str:
    """Where the sweep runs Ray: ``--address`` / RAY_ADDRESS, else the cluster running on this
    machine, else ``local`` (a private Ray; ``--address local`` forces it)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return address
    address = running_cluster_address()
    if address:
        print(f"joining the Ray cluster running on this machine at {address} "
              "(--address local starts a private one instead)")
    return address or "local"


def check_local_gpus(gpus: int) -> None:
    """A private Ray has this machine's GPUs only: refuse more."""
    import torch

    if gpus > torch.cuda.device_count():
        raise UsageError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} "
                         "GPUs (use --address to join a cluster)")


#: What a user does to let this machine into a cluster that asks for Ray's token (keeping the
#: cluster's token authentication on: it is what keeps others on the network from running code there).
TOKEN_HOW = ("copy the cluster's token (~/.ray/auth_token on its head) to ~/.ray/auth_token here, "
             "or point RAY_AUTH_TOKEN_PATH at a copy (or set RAY_AUTH_TOKEN)")


def _token_source() -> str:
    """Where Ray reads its authentication token from here, in Ray's own order."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return os.environ["RAY_AUTH_TOKEN_PATH"]
    return str(Path.home() / ".ray" / "auth_token")


@contextmanager
def _stderr_held():
    """Keep what Ray's C++ client writes to stderr while it is refused (a warning per try); the
    sweep says what went wrong in its own line. Yields the file that holds it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _check_token(address: str) -> None:
    """Join a cluster that asks for Ray's authentication token (``ray start --head`` turns token
    auth on wherever ~/.ray/auth_token exists), or fail in one line saying what to do.

    ``ray.init(address=...)`` turns token mode on only for a cluster it finds itself, so with an
    explicit address and RAY_AUTH_MODE unset it is refused and retries for ~20 s before a
    "Failed to connect". Here one GCS connection (well under a second) asks first; where the
    cluster wants a token and one is readable here, token mode is turned on as Ray's own
    ``_enable_token_auth`` does. Ray's private API: where it is missing, ray.init decides alone."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config, GcsClient
        from ray.exceptions import AuthenticationError, RpcError
    except ImportError:
        return
    where = f"--address: the Ray cluster at {address}"
    mode = os.environ.get("RAY_AUTH_MODE")
    token_mode = mode is not None and mode.lower() == "token"
    loader = AuthenticationTokenLoader.instance()

    def unreadable() -> str | None:
        """Why no token is readable here (None where one is)."""
        try:
            return None if loader.has_token(ignore_auth_mode=True) else "none is readable here"
        except AuthenticationError:  # Ray's loader refuses a RAY_AUTH_TOKEN_PATH it cannot read
            return f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')} is missing or empty"

    def lets_in() -> bool:
        """True if the cluster lets this process in; False if it wants another token or one."""
        with _stderr_held() as held:
            try:
                GcsClient(address=address)
            except AuthenticationError:
                return False
            except RpcError as e:  # Ray's client logs the reason, its exception often not
                held.seek(0)
                logged = held.read().decode(errors="replace").strip().splitlines()
                said = re.sub(r"^\[[^]]*\] \S+: ", "", logged[-1]) if logged else str(e)
                raise UsageError(f"--address: {address} does not answer as a Ray cluster's head "
                                 f"(the port of `ray start --head --port`, 6379 by default): "
                                 f"{' '.join(said.split())}") from None
        return True

    try:
        if token_mode and (why := unreadable()):  # Ray's client would abort this process
            raise UsageError(f"--address: RAY_AUTH_MODE=token here, to join the Ray cluster at "
                             f"{address}, but {why}: {TOKEN_HOW}")
        if lets_in():
            return
        if not token_mode:
            if mode is not None:
                raise UsageError(f"{where} requires its authentication token and RAY_AUTH_MODE={mode} "
                                 f"here: unset it and {TOKEN_HOW}")
            if why := unreadable():
                raise UsageError(f"{where} requires its authentication token and {why}: {TOKEN_HOW}")
            os.environ["RAY_AUTH_MODE"] = "token"  # what Ray's _enable_token_auth() does
            Config.initialize("")
            loader.reset_cache()
            if lets_in():
                return
    except UsageError:
        raise
    except Exception:  # Ray's private API changed: ray.init decides alone
        return
    raise UsageError(f"{where} refuses the authentication token found here (in {_token_source()}; "
                     f"another cluster's?): {TOKEN_HOW}")


def init_ray(address: str):
    """Join the Ray cluster at ``address`` (from ``resolve_address``) or start a local one."""
    import ray

    if address != "local":
        _check_address(address)
        if address != "auto" and not address.startswith("ray://"):
            _check_token(address)
        try:
            ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, RuntimeError) as e:
            raise UsageError(f"--address: cannot join the Ray cluster at {address}: {e}") from None
    else:
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    return ray


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
