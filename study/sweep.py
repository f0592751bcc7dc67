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
import re
import sys
from collections import Counter
from dataclasses import replace

from common.cli import EXIT_USAGE, Parser, UsageError, first_few, python_interrupts, quiet_until_main

if __name__ == "__main__":  # Ctrl-C while its libraries load: one line, not a traceback
    quiet_until_main("study.sweep")

from study import storage  # noqa: E402
from study.cluster import (  # noqa: E402
    check_local_gpus,
    check_storage,
    init_ray,
    resolve_address,
    trial_resources,
)
from study.config import DEFAULT_ETA_MULTIPLES, ConfigError  # noqa: E402
from study.grid import PARAM_LISTS, PRESETS, Preset, build_grid, dry_run_text  # noqa: E402
from study.plan import check_out_dir, out_lock, plan_run, study_record  # noqa: E402
from study.results import DamagedFileError  # noqa: E402
from study.tune_run import Study, TuneSettings, run_tune  # noqa: E402
from study.variants import NOISE_SCOPES, NORMS, VARIANTS  # noqa: E402

#: The flag that sets each TrialConfig setting: a value TrialConfig refuses is refused as its flag.
SETTING_FLAGS = {"norm": "--norms", "noise": "--noises", "noise_scope": "--noise-scope", "lr": "--lrs",
                 "p": "--ps", "groups": "--groups",
                 "seed": "--seeds", "epochs": "--epochs", "batch_size": "--batch-size",
                 "grad_every": "--grad-every", "probe_every": "--probe-every", "probe_etas": "--probe-etas"}


def flag_refusal(e: ConfigError) -> UsageError:
    """TrialConfig's refusal of a value, naming the flag that gave it."""
    flag = SETTING_FLAGS.get(e.setting)
    return UsageError(f"{flag}: {e.rule}" if flag else str(e))


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


def _results_folder(text: str) -> str:
    # pyarrow names the file systems it takes; a typo'd scheme is refused here, not mid-study.
    if storage.is_uri(text):
        try:
            storage.resolve(text)
        except (OSError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"--out: {text}: {' '.join(str(e).split())}") from None
    return text


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
                   "seeds; smoke: 6 short trials on a few thousand images (auto dataset); norms: "
                   "80 trials, none/batch/noisy_batch (noise 1)/lp_batch (p 1,2,inf)/group/layer × "
                   "lr 1e-3,1e-2 × seeds 0-4, 10 epochs, cifar10")
    g.add_argument("--norms", type=_list(str, "--norms"), default=None,
                   help=f"norm variants, from {', '.join(NORMS)} (default: the preset's)")
    g.add_argument("--noises", type=_list(float, "--noises"), default=None,
                   help="noise magnitudes (noisy variants only; 1 = Santurkar et al.; default: the "
                   "preset's)")
    g.add_argument("--noise-scope", choices=NOISE_SCOPES, default=None,
                   help="draw the noise's mean/scale per channel, one draw per element (the "
                   "paper), per layer (the seed notebook), or per channel with one draw per "
                   "image and channel, shared by its positions (default: the preset's)")
    g.add_argument("--ps", type=_list(float, "--ps"), default=None,
                   help="the ℓp norms' p, each >= 1 or inf (lp_batch only; default: the "
                   "preset's, 1,2,inf)")
    g.add_argument("--groups", type=_list(int, "--groups"), default=None,
                   help="GroupNorm's group counts, each dividing 16 (group only; default: the "
                   "preset's, 8)")
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
    w.add_argument("--out", type=_results_folder, default="results",
                   help="results folder (Parquet tables): a local path, or a URI pyarrow's file "
                   "systems take (s3://BUCKET/PREFIX) so that results outlive the driver's node")
    w.add_argument("--shared-out", action="store_true",
                   help="the local --out folder is one every node of the cluster sees (a shared file "
                   "system): each trial writes its own rows there, and only its status goes through "
                   "the driver. A URI (s3://) always is; without either, every row goes through the "
                   "driver, which writes them on its node")
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
                   "H200); default: on (study.train.RunOptions). CPU trials ignore it")
    w.add_argument("--address", default=None,
                   help="join a running Ray cluster (host:port or auto; RAY_ADDRESS works too); "
                   "without it the sweep joins a cluster started on this machine by `ray start` "
                   "(as on a `ray up` head node), else starts Ray locally; `local` forces that")
    w.add_argument("--wait-for-cluster", type=_positive_int("--wait-for-cluster", 0), default=1800,
                   metavar="SECONDS",
                   help="where the joined cluster cannot hold a trial yet but its autoscaler can add "
                   "nodes (`ray up`), ask it for the study's resources and wait up to this long for a "
                   "node, saying what it waits for every 30 s; trials start as nodes join "
                   "(0 = refuse at once)")
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
    """The preset with the flags' overrides, each value checked by TrialConfig."""
    overrides = {k: getattr(args, k) for k in ("norms", "noises", "ps", "groups", "lrs", "seeds",
                                               "epochs", "batch_size", "dataset", "subset",
                                               "noise_scope")
                 if getattr(args, k) is not None}
    try:
        p = replace(PRESETS[args.preset], **overrides)
    except ConfigError as e:
        raise flag_refusal(e) from None
    if len(set(p.seeds)) != len(p.seeds) or len(set(p.lrs)) != len(p.lrs):
        raise UsageError("--seeds/--lrs: duplicate values would run the same trial twice")
    return p


def run(args: argparse.Namespace) -> int:
    """Check the command, plan it in its results folder, run it; the exit status."""
    p = preset_from_args(args)
    for param, key in PARAM_LISTS.items():
        owners = sorted(v.name for v in VARIANTS.values() if param in v.params)
        if getattr(args, key) is not None and not set(p.norms) & set(owners):
            print(f"note: --{key} has no effect: none of --norms ({', '.join(p.norms)}) takes "
                  f"{param} ({', '.join(owners)})", file=sys.stderr)
    if args.probe_etas and not args.probe_every:
        print("note: --probe-etas has no effect without --probe-every", file=sys.stderr)
    if args.shared_out and storage.is_uri(args.out):
        print("note: --shared-out has no effect with a URI --out: its trials write their own rows "
              "anyway", file=sys.stderr)
    if args.cuda_graph and not args.gpus:
        print("note: --cuda-graph has no effect without --gpus (CPU trials train eagerly)",
              file=sys.stderr)
    if args.name is not None and (not args.name.strip() or args.name in (".", "..")
                                  or re.search(r"[/\\\s]", args.name)):
        raise UsageError(f"--name {args.name!r}: a study name names a folder: give a word "
                         "without spaces or slashes")
    name = args.name or args.preset
    probe_etas = args.probe_etas or (DEFAULT_ETA_MULTIPLES if args.probe_every else ())
    try:
        grid = build_grid(p, args.grad_every, args.probe_every, probe_etas)
    except ConfigError as e:
        raise flag_refusal(e) from None
    if not grid:
        raise UsageError("the grid is empty")
    repeated = sorted(tid for tid, n in Counter(c.trial_id for c in grid).items() if n > 1)
    if repeated:
        raise UsageError(f"the grid names {len(repeated)} trial(s) more than once ({first_few(repeated)}): "
                         "a value repeats in --norms, --noises, --ps, --groups or --lrs (values equal "
                         "to 6 significant "
                         "digits name the same trial)")
    resources = trial_resources(args.cpus_per_trial, args.gpus, args.trials_per_gpu)

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
        out = storage.location(args.out)
        if storage.exists(storage.join(out, "study.json")):  # what --resume or --extend would do
            try:
                pending, extending = plan_run(out, name, grid, study_record(name, p, grid, dataset, {}),
                                              resume=True, extend=True)
                print(f"{out} holds {len(grid) - len(pending)} of these {len(grid)} trials finished: "
                      f"{'--extend' if extending else '--resume'} would run the other {len(pending)}")
            except (UsageError, DamagedFileError) as e:
                print(f"{out}: the sweep would refuse it: {e}")
        return 0

    out = storage.location(args.out)
    if (args.resume or args.extend) and not storage.exists(storage.join(out, "study.json")):
        flag = "--extend" if args.extend else "--resume"
        raise UsageError(f"{flag}: no study in {out} to {flag[2:]}")
    check_out_dir(out)
    tune_storage = args.storage or str(storage.join(out, "tune"))
    from study.train import RunOptions

    defaults = RunOptions()  # what run_trial does where the sweep does not say
    cuda_graph = defaults.cuda_graph if args.cuda_graph is None else args.cuda_graph
    execution = dict(gpus=args.gpus, trials_per_gpu=args.trials_per_gpu if args.gpus else None,
                     cpus_per_trial=args.cpus_per_trial, cuda_graph=bool(cuda_graph and args.gpus),
                     cpu_channels_last=defaults.cpu_channels_last)
    record = study_record(name, p, grid, dataset, execution)
    with out_lock(out):  # held until the study stops
        pending, extending = plan_run(out, name, grid, record, args.resume, args.extend)
        if not pending:
            print(f"study {name!r} in {out} is already complete ({len(grid)} trials); nothing to do")
            return 0
        check_storage(tune_storage, name, new_study=pending == grid and not (args.resume or args.extend))

        address = resolve_address(args.address)
        if args.gpus and address == "local":
            check_local_gpus(args.gpus)
        ray = init_ray(address)
        try:
            return run_tune(ray, Study(name, p, grid, pending, extending, out, tune_storage, record),
                            TuneSettings(args.data_dir, resources, args.gpus,
                                         max_concurrent=args.gpus * args.trials_per_gpu or None,
                                         max_failures=args.max_failures,
                                         continuing=args.resume or args.extend,
                                         trials_write_rows=storage.is_uri(out) or args.shared_out,
                                         wait_for_cluster=None if address == "local"
                                         else args.wait_for_cluster))
        finally:
            ray.shutdown()


def _has_study(out: str) -> bool:
    try:
        return storage.exists(storage.join(storage.location(out), "study.json"))
    except OSError:  # the store is out of reach: say the safe thing
        return True


def main(argv: list[str] | None = None) -> int:
    python_interrupts()
    args = make_parser().parse_args(argv)
    try:
        return run(args)
    except (UsageError, ConfigError, DamagedFileError) as e:
        print(f"study.sweep: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        started = not args.dry_run and _has_study(args.out)
        print("\nstudy.sweep: interrupted; " + ("continue with the same command and --resume"
              if started else "the study had not started (nothing to resume)"), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
