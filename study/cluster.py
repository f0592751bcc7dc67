"""Where the sweep runs: joining or starting Ray (token authentication included), the resources a
trial asks for, Tune's storage, and NVIDIA MPS on this machine (docs/cluster.md). Whether the
cluster has room for the study is cluster_room.py."""

from __future__ import annotations

import os
import re
import socket
import sys
import tempfile
from contextlib import contextmanager
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


def mps_missing(gpu_share: float) -> bool:
    """Whether a trial holding ``gpu_share`` of a GPU on this node shares it with other trials
    but no MPS daemon runs here: they would take turns on the GPU instead of overlapping."""
    return 0 < gpu_share < 1 and not mps_control_socket().exists()


def mps_note(node: str, gpu_share: float) -> str:
    """The sweep's note for a GPU node where ``mps_missing`` held."""
    return (f"note: NVIDIA MPS is not running on GPU node {node}, so the {round(1 / gpu_share)} "
            "trials that share each of its GPUs take turns on it; `nvidia-cuda-mps-control -d` "
            "before `ray start` lets their kernels overlap (8 trials: 5.5x the images/s of one on "
            "an H200, against 1.6x at best without; README, \"Packing trials\")")


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
