"""Where the sweep runs: joining or starting Ray, the resources a trial asks for and whether the
cluster has them, Tune's storage, and NVIDIA MPS on this machine (docs/cluster.md)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
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


def init_ray(address: str):
    """Join the Ray cluster at ``address`` (from ``resolve_address``) or start a local one."""
    import ray

    if address != "local":
        _check_address(address)
        try:
            ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, RuntimeError) as e:
            raise UsageError(f"--address: cannot join the Ray cluster at {address}: {e}") from None
    else:
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    return ray


def check_cluster(ray, gpus: int, cpus_per_trial: int, storage: str) -> None:
    """Refuse what the joined cluster cannot give (Tune would wait for it for ever); note a
    local --storage that the cluster's other nodes cannot reach."""
    cluster = ray.cluster_resources()
    if gpus > cluster.get("GPU", 0):
        raise UsageError(f"--gpus {gpus}: the Ray cluster has {cluster.get('GPU', 0):g} GPUs")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = max((n.get("Resources", {}).get("CPU", 0) for n in nodes), default=0)
    if cpus_per_trial > largest:
        raise UsageError(f"--cpus-per-trial {cpus_per_trial}: the largest node of the Ray "
                         f"cluster has {largest:g} CPUs")
    if len(nodes) > 1 and "://" not in storage:
        print(f"note: {len(nodes)} nodes share this study but --storage is the local path "
              f"{storage}; checkpoints of trials on other nodes need s3://... or a shared file "
              "system to survive a node loss", file=sys.stderr)
