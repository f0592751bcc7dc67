"""``python -m study.sweep``: build the grid, start or join Ray, run the study with Ray Tune.

    python -m study.sweep                         # the `full` preset on this machine
    python -m study.sweep --preset smoke          # a 2-minute study (synthetic data offline)
    python -m study.sweep --gpus 8                # on the head node of a Ray cluster
    python -m study.sweep --resume                # continue a stopped study
    python -m study.sweep --seeds 0-4 --extend    # add seeds 3, 4 to a study of seeds 0-2

Results are Parquet tables under ``--out`` (see study/results.py); draw them with
``python -m analysis.figures OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from common.cli import EXIT_USAGE, Parser, UsageError, python_interrupts, quiet_until_main

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): one line, not a traceback
    quiet_until_main("study.sweep")

from study.config import ConfigError, TrialConfig  # noqa: E402
from study.data import split_sizes  # noqa: E402
from study.probes import DEFAULT_ETA_MULTIPLES  # noqa: E402
from study.results import DamagedFileError, trial_finished, trial_gap  # noqa: E402
from study.variants import NOISY_NORMS, NORMS  # noqa: E402

#: Rough per-trial training speed (images/s) used by --dry-run's time estimate, batch 16: CPU,
#: run_trial with 1 thread on a 2-core VM (bench/throughput.py, 1,822); GPU, one of 8 trials
#: with CUDA graphs sharing an H200 without MPS (bench/gpu_check.sh: 32,797 / 8; under MPS
#: 121,649 / 8).
NOMINAL_IMAGES_PER_S = {"cpu": 1800.0, "gpu": 4100.0}
NOMINAL_SIZES = {"cifar10": (50_000, 10_000), "synthetic": (50_000, 10_000)}


@dataclass(frozen=True)
class Preset:
    norms: tuple[str, ...]
    noises: tuple[float, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int = 16
    dataset: str = "cifar10"
    subset: int | None = None
    noise_scope: str = "channel"


PRESETS: dict[str, Preset] = {
    "full": Preset(("none", "batch", "noisy_batch"), (0.5, 1.0, 2.0), (1e-3, 1e-2, 5e-2),
                   tuple(range(5)), epochs=10),
    # the seed notebook's three runs; it shares one noise draw across a layer's channels
    "seed": Preset(("none", "batch", "noisy_batch"), (1.0,), (1e-3,), (0, 1, 2), epochs=10,
                   noise_scope="layer"),
    "smoke": Preset(("none", "batch", "noisy_batch"), (1.0,), (1e-2,), (0, 1), epochs=2,
                    dataset="auto", subset=3000),
}


#: The preset's lists that make the grid, and the trial fields that place a trial in it.
GRID_KEYS = ("norms", "noises", "lrs", "seeds")
TRIAL_GRID_KEYS = ("norm", "noise", "lr", "seed")


def build_grid(p: Preset, grad_every: int = 1, probe_every: int = 0,
               probe_etas: tuple[float, ...] = ()) -> list[TrialConfig]:
    """norm × noise × lr × seed, with noise varied only for the variants it affects."""
    grid = []
    for norm in p.norms:
        for noise in (p.noises if norm in NOISY_NORMS else (0.0,)):
            for lr in p.lrs:
                for seed in p.seeds:
                    grid.append(TrialConfig(
                        norm=norm, noise=noise, noise_scope=p.noise_scope, lr=lr,
                        batch_size=p.batch_size, epochs=p.epochs, seed=seed,
                        grad_every=grad_every, probe_every=probe_every, probe_etas=probe_etas))
    return grid


def _list(kind, name: str):
    def parse(text: str):
        try:
            values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a comma-separated list "
                                             f"of {kind.__name__}s") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name}: the list is empty")
        return values
    return parse


def _seeds(text: str) -> tuple[int, ...]:
    """'0-4' or '0,1,2'."""
    if "-" in text and "," not in text and not text.startswith("-"):
        a, _, b = text.partition("-")
        try:
            lo, hi = int(a), int(b)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--seeds: {text!r} is not a range like 0-4") from None
        if hi < lo:
            raise argparse.ArgumentTypeError(f"--seeds: empty range {text!r}")
        return tuple(range(lo, hi + 1))
    return _list(int, "--seeds")(text)


def _positive_int(name: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name}: must be >= {minimum}, got {v}")
        return v
    return parse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the preset-given ones (None), whose help says so."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, ()):
            return action.help or ""
        return super()._get_help_string(action)


def make_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m study.sweep",
        name="study.sweep",
        description="Run the BatchNorm / noisy-BatchNorm study as a Ray Tune sweep and write "
        "Parquet results. Lists are comma-separated; overrides replace the preset's values.",
        formatter_class=_Formatter,
    )
    g = p.add_argument_group("what to run")
    g.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="full: 75 trials, none/batch/noisy_batch × noise 0.5,1,2 × lr 1e-3,1e-2,"
                   "5e-2 × seeds 0-4, 10 epochs, cifar10; seed: the seed notebook's 3 runs × 3 "
                   "seeds; smoke: 6 short trials on a few thousand images (auto dataset)")
    g.add_argument("--norms", type=_list(str, "--norms"), default=None,
                   help=f"norm variants, from {', '.join(NORMS)} (default: the preset's)")
    g.add_argument("--noises", type=_list(float, "--noises"), default=None,
                   help="noise magnitudes (noisy variants only; 1 = Santurkar et al.; default: the "
                   "preset's)")
    g.add_argument("--noise-scope", choices=("channel", "layer"), default=None,
                   help="draw the noise's mean/scale per channel (the paper) or per layer (the "
                   "seed notebook) (default: the preset's)")
    g.add_argument("--lrs", type=_list(float, "--lrs"), default=None,
                   help="learning rates (default: the preset's)")
    g.add_argument("--seeds", type=_seeds, default=None,
                   help="seeds, e.g. 0-4 or 0,3 (default: the preset's)")
    g.add_argument("--epochs", type=_positive_int("--epochs"), default=None,
                   help="epochs per trial (default: the preset's)")
    g.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None,
                   help="training batch size (default: the preset's, 16)")
    g.add_argument("--dataset", default=None,
                   help="cifar10, synthetic, imagefolder:PATH or auto (cifar10 if on disk, "
                   "else synthetic) (default: the preset's)")
    g.add_argument("--data-dir", default="data", help="where cifar10 is (downloaded if absent) "
                   "and where decoded image folders are cached")
    g.add_argument("--subset", type=_positive_int("--subset", 3), default=None,
                   help="use at most this many images per split (train, test) for quick runs; "
                   "at least 3, as a fifth of the training images validate "
                   "(default: the preset's; all for full and seed)")
    g.add_argument("--grad-every", type=_positive_int("--grad-every"), default=1,
                   help="record per-step gradient norms every k-th step")
    g.add_argument("--probe-every", type=_positive_int("--probe-every", 0), default=0,
                   help="run the ICS and loss-landscape probes every N steps (0 = off)")
    g.add_argument("--probe-etas", type=_list(float, "--probe-etas"), default=(),
                   help="probe step sizes as multiples of lr (default: 8 log-spaced in [0.5, 4])")
    w = p.add_argument_group("where and how")
    w.add_argument("--out", default="results", help="results folder (Parquet tables)")
    w.add_argument("--name", default=None, help="study name (default: the preset's)")
    w.add_argument("--gpus", type=_positive_int("--gpus", 0), default=0,
                   help="total GPUs the study may use; trials get 1/--trials-per-gpu GPU each")
    w.add_argument("--trials-per-gpu", type=_positive_int("--trials-per-gpu"), default=8,
                   help="trials packed on one GPU: one trial of this small CNN leaves most of a GPU "
                   "idle. Start NVIDIA MPS on GPU nodes (nvidia-cuda-mps-control -d; cluster.yaml "
                   "does) so that their kernels overlap: 8 whole trials then gave 5.5x the "
                   "images/s of 1 on an H200 (without MPS they take turns: 1.6x at 4)")
    w.add_argument("--cpus-per-trial", type=_positive_int("--cpus-per-trial"), default=1,
                   help="CPUs reserved per trial, also torch's intra-op threads")
    w.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each GPU trial's training steps from CUDA graphs (the eager steps' "
                   "numbers to fp32 rounding, one launch a step: 8x as fast at batch 16 on an "
                   "H200); default: on (study.train's CUDA_GRAPH_DEFAULT). CPU trials ignore it")
    w.add_argument("--address", default=None,
                   help="join a running Ray cluster (host:port or auto; RAY_ADDRESS works too); "
                   "without it the sweep joins a cluster started on this machine by `ray start` "
                   "(as on a `ray up` head node), else starts Ray locally; `local` forces that")
    w.add_argument("--storage", default=None,
                   help="Tune's storage_path for checkpoints (default OUT/tune); a multi-node "
                   "cluster needs s3://... or a shared file system path")
    w.add_argument("--max-failures", type=_positive_int("--max-failures", 0), default=3,
                   help="retries of a failed trial, each from its last checkpoint")
    w.add_argument("--resume", action="store_true",
                   help="continue a stopped study in OUT: rerun the command that started it "
                   "with --resume (only what is missing runs)")
    w.add_argument("--extend", action="store_true",
                   help="add to the finished study in OUT the trials this command names that it "
                   "lacks (more seeds, learning rates, noises or variants): name the whole study, "
                   "e.g. --seeds 0-4 for a study of seeds 0-2, with its other settings; its trials "
                   "are kept, not rerun. It also resumes, as --resume does")
    w.add_argument("--dry-run", action="store_true",
                   help="print the grid, trial count, resources and an estimate, then exit")
    return p


def preset_from_args(args: argparse.Namespace) -> Preset:
    base = PRESETS[args.preset]
    overrides = {k: getattr(args, k) for k in ("norms", "noises", "lrs", "seeds", "epochs",
                                               "batch_size", "dataset", "subset", "noise_scope")
                 if getattr(args, k) is not None}
    p = replace(base, **overrides)
    for n in p.norms:
        if n not in NORMS:
            raise UsageError(f"--norms: unknown norm {n!r}; known: {', '.join(NORMS)}")
    for v in p.noises:
        if not (math.isfinite(v) and v >= 0):
            raise UsageError(f"--noises: noise magnitudes must be >= 0, got {v:g}")
    for v in p.lrs:
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"--lrs: learning rates must be > 0, got {v:g}")
    if any(s < 0 for s in p.seeds):
        raise UsageError("--seeds: seeds must be >= 0")
    if len(set(p.seeds)) != len(p.seeds) or len(set(p.lrs)) != len(p.lrs):
        raise UsageError("--seeds/--lrs: duplicate values would run the same trial twice")
    return p


def check_out_dir(out: Path) -> None:
    """Fail early if the results folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out: cannot write to {out}: {e.strerror or e}") from None


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """One sweep at a time in a results folder (two would train the same trials into the same
    files): a lock on the folder itself, which ends with this process however it ends."""
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another sweep is running in {out}: let it finish, or stop it "
                             "(Ctrl-C) and continue with --resume") from None
        yield
    finally:
        os.close(fd)


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


def study_record(name: str, p: Preset, grid: list[TrialConfig], dataset: str,
                 execution: dict) -> dict:
    """study.json: the grid, and how it was run (``execution``: what may change speed, not
    the numbers beyond fp32 rounding: GPUs, packing, threads, layout, CUDA graphs)."""
    return dict(name=name, preset=p.__dict__ | {"dataset": dataset},
                trials=[c.to_dict() for c in grid], trial_ids=[c.trial_id for c in grid],
                execution=execution)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes" if seconds >= 60 else f"{seconds:.0f} seconds"


def dry_run_text(name: str, p: Preset, grid: list[TrialConfig], resources: dict) -> str:
    n_train, n_test = NOMINAL_SIZES.get(p.dataset.split(":")[0], (50_000, 10_000))
    if p.dataset.startswith("imagefolder:"):
        from study.data import imagefolder_sizes

        n_train, n_test = imagefolder_sizes(p.dataset.split(":", 1)[1])
    if p.subset:
        n_train, n_test = min(n_train, p.subset), min(n_test, p.subset)
    fit = split_sizes(n_train, grid[0].val_fraction)[0] if grid else 0
    images = len(grid) * p.epochs * fit
    steps = len(grid) * p.epochs * math.ceil(fit / p.batch_size)
    kind = "gpu" if resources.get("GPU") else "cpu"
    hours = images / NOMINAL_IMAGES_PER_S[kind] / 3600
    lines = [f"study {name!r}: {len(grid)} trials on dataset {p.dataset}"]
    for c in grid:
        noise = f" noise={c.noise:g} ({c.noise_scope})" if c.norm in NOISY_NORMS else ""
        lines.append(f"  {c.trial_id:<34} norm={c.norm}{noise} lr={c.lr:g} seed={c.seed}")
    lines += [
        f"resources per trial: {resources}",
        f"work: {len(grid)} trials × {p.epochs} epochs × {fit:,} training images "
        f"= {images:,} images, {steps:,} steps (batch {p.batch_size})",
        f"estimate: ~{_duration(hours * 3600)} of trial time at ~{NOMINAL_IMAGES_PER_S[kind]:,.0f} images/s "
        f"per trial on {kind.upper()}; divide by the trials that run at once",
    ]
    return "\n".join(lines)


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


def trial_name(trial) -> str:
    """Tune's trial name and folder: the same readable key as the Parquet files."""
    return TrialConfig.from_dict(trial.config["trial"]).trial_id


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


def run(args: argparse.Namespace) -> int:
    p = preset_from_args(args)
    if args.noises is not None and not set(p.norms) & NOISY_NORMS:
        print(f"note: --noises has no effect: none of --norms ({', '.join(p.norms)}) is noisy "
              f"({', '.join(sorted(NOISY_NORMS))})", file=sys.stderr)
    if args.probe_etas and not args.probe_every:
        print("note: --probe-etas has no effect without --probe-every", file=sys.stderr)
    if args.cuda_graph and not args.gpus:
        print("note: --cuda-graph has no effect without --gpus (CPU trials train eagerly)",
              file=sys.stderr)
    if args.gpus and (note := mps_notice(args.trials_per_gpu)):
        print(note, file=sys.stderr)
    if args.name is not None and (not args.name.strip() or args.name in (".", "..")
                                  or re.search(r"[/\\\s]", args.name)):
        raise UsageError(f"--name {args.name!r}: a study name names a folder: give a word "
                         "without spaces or slashes")
    if any(not (math.isfinite(e) and e > 0) for e in args.probe_etas):
        raise UsageError(f"--probe-etas: step sizes must be > 0, got "
                         f"{', '.join(f'{e:g}' for e in args.probe_etas)}")
    name = args.name or args.preset
    probe_etas = args.probe_etas or (DEFAULT_ETA_MULTIPLES if args.probe_every else ())
    try:
        grid = build_grid(p, args.grad_every, args.probe_every, probe_etas)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if not grid:
        raise UsageError("the grid is empty")
    repeated = sorted(tid for tid, n in Counter(c.trial_id for c in grid).items() if n > 1)
    if repeated:
        raise UsageError(f"the grid names {len(repeated)} trial(s) more than once ({', '.join(repeated[:3])}"
                         f"{', ...' if len(repeated) > 3 else ''}): a value repeats in --norms, --noises "
                         "or --lrs (values equal to 6 significant digits name the same trial)")
    resources: dict = {"CPU": args.cpus_per_trial}
    if args.gpus:
        resources["GPU"] = 1 / args.trials_per_gpu

    from study.data import DataError, resolve_dataset_spec

    try:
        dataset = resolve_dataset_spec(p.dataset, args.data_dir)
    except DataError as e:
        raise UsageError(str(e)) from None
    if args.dry_run:
        try:
            print(dry_run_text(name, replace(p, dataset=dataset), grid, resources))
        except DataError as e:  # an image folder its loader would refuse
            raise UsageError(str(e)) from None
        out = Path(args.out).resolve()
        if (out / "study.json").exists():  # what --resume or --extend would do with it
            try:
                pending, extending = plan_run(out, name, grid, study_record(name, p, grid, dataset, {}),
                                              resume=True, extend=True)
                print(f"{out} holds {len(grid) - len(pending)} of these {len(grid)} trials finished: "
                      f"{'--extend' if extending else '--resume'} would run the other {len(pending)}")
            except (UsageError, DamagedFileError) as e:
                print(f"{out}: the sweep would refuse it: {e}")
        return 0

    out = Path(args.out).resolve()
    if (args.resume or args.extend) and not (out / "study.json").exists():
        flag = "--extend" if args.extend else "--resume"
        raise UsageError(f"{flag}: no study in {out} to {flag[2:]}")
    check_out_dir(out)
    storage = args.storage or str(out / "tune")
    from study.train import CPU_CHANNELS_LAST, CUDA_GRAPH_DEFAULT

    cuda_graph = CUDA_GRAPH_DEFAULT if args.cuda_graph is None else args.cuda_graph
    execution = dict(gpus=args.gpus, trials_per_gpu=args.trials_per_gpu if args.gpus else None,
                     cpus_per_trial=args.cpus_per_trial, cuda_graph=bool(cuda_graph and args.gpus),
                     cpu_channels_last=CPU_CHANNELS_LAST)
    record = study_record(name, p, grid, dataset, execution)
    with out_lock(out):  # held until the study stops
        pending, extending = plan_run(out, name, grid, record, args.resume, args.extend)
        if not pending:
            print(f"study {name!r} in {out} is already complete ({len(grid)} trials); nothing to do")
            return 0
        check_storage(storage, name, new_study=pending == grid and not (args.resume or args.extend))

        address = resolve_address(args.address)
        if args.gpus and address == "local":
            import torch

            if args.gpus > torch.cuda.device_count():
                raise UsageError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} "
                                 "GPUs (use --address to join a cluster)")
        ray = init_ray(address)
        try:
            return _run_tune(ray, args, p, name, grid, pending, extending, resources, dataset, out,
                             storage, record)
        finally:
            ray.shutdown()


def plan_run(out: Path, name: str, grid: list[TrialConfig], record: dict, resume: bool,
             extend: bool) -> tuple[list[TrialConfig], bool]:
    """What a run in ``out`` does: the trials to run and whether they extend the study there
    (the whole grid for a new folder). Raises UsageError for a folder the run must not touch:
    another study, other settings, an unfinished study to extend, a finished one to rerun."""
    study_file = out / "study.json"
    if not study_file.exists():
        held = {f.stem for table in ("trials", "epochs", "layers", "steps")
                for f in (out / table).glob("*.parquet")}
        if held:
            raise UsageError(f"{out} holds results of {len(held)} trial(s) but no "
                             "study.json to say which study they belong to; use another --out, or "
                             "move them away")
        return grid, False
    try:
        old = json.loads(study_file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{study_file} is unreadable ({e}); restore it (its trials' results are "
                         "there), or use another --out") from None
    old_ids, ids = old.get("trial_ids", []), {c.trial_id for c in grid}
    if old.get("name") != name:
        raise UsageError(f"{out} holds a different study ({old.get('name')!r}, {len(old_ids)} "
                         f"trials, not {name!r}); use another --out or the study's --name")
    if extend:
        lacking = [t for t in old_ids if t not in ids]
        if lacking:
            raise UsageError(f"--extend: the command must name the whole study; it lacks "
                             f"{len(lacking)} of the {len(old_ids)} trials in {out} "
                             f"({', '.join(lacking[:3])}{', ...' if len(lacking) > 3 else ''}): "
                             "give --norms, --noises, --lrs and --seeds the study's values too")
    elif set(old_ids) != ids:
        flags = grid_flags(old.get("preset", {}))
        raise UsageError(f"{out} holds another grid of study {old.get('name')!r} ({len(old_ids)} "
                         f"trials, not these {len(ids)}): to continue it, rerun the command that "
                         f"started it{f' ({flags} ...)' if flags else ''}; to add trials, name "
                         "them all with --extend; else use another --out")
    elif not resume:
        raise UsageError(f"{out} already holds this study; add --resume to continue it, or use "
                         "another --out")
    flag = "--extend" if extend else "--resume"
    changed = changed_settings(old, record)
    if changed:
        raise UsageError(f"{flag}: {out} holds this study run with other settings "
                         f"({'; '.join(changed)}); {flag[2:]} it with the study's own settings, "
                         "or use another --out")
    gaps = {t: trial_gap(out, t) for t in ids | set(old_ids)}  # results.DamagedFileError: main
    finished = {t for t, gap in gaps.items() if gap is None}
    for t, gap in gaps.items():
        if gap and gap not in ("not run", "running", "error"):
            print(f"note: {t} runs again from its first epoch: {gap}", file=sys.stderr)
    extending = bool(ids - set(old_ids))
    unfinished = [t for t in old_ids if t not in finished]
    if extending and unfinished:
        raise UsageError(f"--extend: {out} holds this study unfinished: finish it with --resume "
                         f"(the study's own grid), then extend it; {len(unfinished)} of the study's "
                         f"{len(old_ids)} trials are unfinished ({', '.join(unfinished[:3])}"
                         f"{', ...' if len(unfinished) > 3 else ''})")
    return [c for c in grid if c.trial_id not in finished], extending


def grid_flags(preset: dict) -> str:
    """The grid of a study.json's preset as the sweep's flags, for a message."""
    def text(v) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)
    keys = ("norms", "noises", "lrs", "seeds")
    if not set(preset.get("norms", ())) & NOISY_NORMS:
        keys = ("norms", "lrs", "seeds")
    return " ".join(f"--{k} {','.join(text(v) for v in preset[k])}" for k in keys if preset.get(k))


def changed_settings(old: dict, new: dict) -> list[str]:
    """What differs between a study.json and the study a command asks for, beyond the trial
    ids (which the caller compares): the preset's settings (dataset, subset, ...) and the
    trials' configs (epochs, batch size, probes, ...), as 'key: old -> new'. A trial is
    compared with the study's trial of its id, an added one (--extend) with the study's first
    on all but its grid point. Keys an older study.json lacks are not compared."""
    new = json.loads(json.dumps(new))  # tuples as lists, as the file has them
    changed = {}
    for k, v in new["preset"].items():
        if k in GRID_KEYS:  # the trial ids say what matters of these
            continue
        if k in old.get("preset", {}) and old["preset"][k] != v:
            changed[k] = (old["preset"][k], v)
    old_trials = old.get("trials", [])  # an old file may lack them
    by_id = dict(zip(old.get("trial_ids", []), old_trials, strict=False))
    for tid, b in zip(new["trial_ids"], new["trials"], strict=True):
        a = by_id.get(tid)
        if a is None:
            if not old_trials:
                continue
            a = {k: v for k, v in old_trials[0].items() if k not in TRIAL_GRID_KEYS}
        for k, v in b.items():
            if k in a and a[k] != v and k not in changed:
                changed[k] = (a[k], v)
    return [f"{k}: {a} -> {b}" for k, (a, b) in changed.items()]


class _TuneStopNotes(logging.Filter):
    """Drops what Tune logs when stopped by Ctrl-C: "Resume experiment with: Tuner.restore(...)"
    (the sweep's own line says to rerun with --resume) and that the results of trials that had
    not started yet cannot be read (the sweep does not read them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "Resume experiment with:" not in text and "Failed to fetch metrics" not in text


TUNE_STOP_NOTES = _TuneStopNotes()


def _run_tune(ray, args, p: Preset, name: str, grid: list[TrialConfig], pending: list[TrialConfig],
              extending: bool, resources: dict, dataset: str, out: Path, storage: str,
              record: dict) -> int:
    from ray import tune

    from study.data import DataError, load_dataset
    from study.trainable import ParquetWriterCallback, data_to_numpy, train_trial

    cluster = ray.cluster_resources()
    if args.gpus > cluster.get("GPU", 0):
        raise UsageError(f"--gpus {args.gpus}: the Ray cluster has {cluster.get('GPU', 0):g} "
                         "GPUs")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = max((n.get("Resources", {}).get("CPU", 0) for n in nodes), default=0)
    if args.cpus_per_trial > largest:  # Tune would wait for such a node for ever
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial}: the largest node of the Ray "
                         f"cluster has {largest:g} CPUs")
    if len(nodes) > 1 and "://" not in storage:
        print(f"note: {len(nodes)} nodes share this study but --storage is the local path "
              f"{storage}; checkpoints of trials on other nodes need s3://... or a shared file "
              "system to survive a node loss", file=sys.stderr)

    t0 = time.time()
    try:
        data = load_dataset(p.dataset, args.data_dir, subset=p.subset)  # prints the auto notice
    except DataError as e:
        raise UsageError(str(e)) from None
    print(f"dataset {data.name}: {len(data.train_y):,} training images, "
          f"{len(data.test_y):,} test images ({time.time() - t0:.1f} s)")
    n_fit, n_val = split_sizes(len(data.train_y), grid[0].val_fraction)
    if n_val < 1 or n_fit < 1:
        raise UsageError(f"{data.name}: {len(data.train_y)} training image(s) leave {n_fit} to train on "
                         f"and {n_val} to validate on ({grid[0].val_fraction:g} of them); it needs "
                         "at least 3 (--subset)")
    (out / "study.json").write_text(json.dumps(record, indent=1))
    sizes = dict(train=n_fit, val=n_val, test=len(data.test_y))

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, data=data_to_numpy(data),
                             cpus_per_trial=args.cpus_per_trial,
                             cuda_graph=record["execution"]["cuda_graph"]),
        {k.lower(): v for k, v in resources.items()},
    )
    writer = ParquetWriterCallback(str(out), name, data.name, sizes)
    exp_path = os.path.join(storage, name)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # so the trimmed CLIReporter is used
    tuner = None
    if (args.resume or args.extend) and not extending and tune.Tuner.can_restore(exp_path):
        # Tune brings back the study's own run settings (failures, concurrency); its Parquet
        # writer is this run's (the folder may have moved): see ParquetWriterCallback
        try:
            with ParquetWriterCallback.driving(writer):
                restored = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
            # Tune runs only the trials its experiment holds unfinished. An extension stopped
            # before Tune saved leaves the study's older experiment, which lacks the added
            # trials; a finished trial whose rows were moved away is one Tune holds as ended. A
            # trial's folder is its id (trial_name); one that has not reported has no config here
            last_status = {Path(r.path).name: (r.metrics or {}).get("status")
                           for r in restored.get_results()}
        except RuntimeError:  # stopped as Tune began: its tuner.pkl without an experiment state
            last_status = {}
        if last_status and all(c.trial_id in last_status
                               and last_status[c.trial_id] not in ("done", "diverged") for c in pending):
            tuner = restored
            print(f"resuming {name!r} from Tune's experiment in {exp_path}: "
                  f"{len(grid) - len(pending)} of {len(grid)} trials are finished")
    if tuner is None:
        if extending:  # a new Tune experiment state beside the old one; Tune restores the newest
            print(f"extending {name!r}: {len(pending)} trials added to its {len(grid) - len(pending)}; "
                  "the finished trials are kept")
        elif args.resume or args.extend:
            print(f"resuming {name!r}: {len(grid) - len(pending)} of {len(grid)} trials are finished; "
                  f"Tune's experiment in {exp_path} cannot be restored, lacks some of the others or "
                  f"holds some as ended, so the other {len(pending)} start from their first epoch")
        reporter = tune.CLIReporter(
            parameter_columns={"trial/norm": "norm", "trial/noise": "noise", "trial/lr": "lr",
                               "trial/seed": "seed"},
            metric_columns={"epoch": "epoch", "train_acc": "train acc", "test_acc": "test acc",
                            "status": "outcome"},
            max_report_frequency=30,
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([c.to_dict() for c in pending])},
            tune_config=tune.TuneConfig(
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
                max_concurrent_trials=(args.gpus * args.trials_per_gpu) or None,
                # a finished trial's worker process runs the next trial: no new process, PyTorch
                # import or CUDA context per trial (the smoke sweep in 0.74x the time, bench/ray_overhead.py)
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                callbacks=[writer],
                progress_reporter=reporter,
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=1,
            ),
        )
    for logger in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis"):
        logging.getLogger(logger).addFilter(TUNE_STOP_NOTES)  # the same object is added once
    grid_result = tuner.fit()  # a first Ctrl-C makes Tune save its state and return
    errors = grid_result.num_errors
    unfinished = [c for c in grid if not trial_finished(out, c.trial_id)]
    print(f"\nstudy {name!r}: {len(grid)} trials ({len(pending)} in this run), {errors} errored, "
          f"{time.time() - t0:.0f} s. Results: {out}")
    if errors:
        print(f"study.sweep: {errors} trial(s) failed, out of retries (--max-failures; the "
              f"'error' column of {out / 'trials'}, and error.txt in their folders under "
              f"{exp_path}); rerun the same command with --resume to retry them from their last "
              "checkpoint", file=sys.stderr)
        return 1
    if unfinished:
        print(f"study.sweep: stopped with {len(unfinished)} of the study's {len(grid)} trials "
              "unfinished; continue with the same command and --resume", file=sys.stderr)
        return 130
    print(f"draw the figures with:  python -m analysis.figures {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    python_interrupts()
    args = make_parser().parse_args(argv)
    try:
        return run(args)
    except (UsageError, ConfigError, DamagedFileError) as e:
        print(f"study.sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        started = (Path(args.out) / "study.json").exists() and not args.dry_run
        print("\nstudy.sweep: interrupted; " + ("continue with the same command and --resume"
              if started else "the study had not started (nothing to resume)"), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
