"""The Tune run of a study the sweep has planned: load the dataset once, write study.json, run
the pending trials (a new Tune experiment, or the study's saved one restored), and say how the
study stands after it."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import UsageError
from study import storage
from study.cluster_room import check_cluster
from study.config import TrialConfig
from study.data import split_sizes
from study.grid import Preset
from study.storage import Location
from study.trial_files import trial_finished


@dataclass(frozen=True)
class Study:
    """The study a sweep command runs, as planned in its results folder."""

    name: str
    preset: Preset  # the flags' (an ``auto`` dataset is resolved as it loads)
    grid: list[TrialConfig]  # the whole study
    pending: list[TrialConfig]  # the trials this run trains
    extending: bool  # the pending trials are added to a finished study (--extend)
    out: Location  # the results folder: a local Path or a URI
    storage: str  # Tune's storage_path
    record: dict  # study.json, written once the dataset has loaded

    @property
    def experiment(self) -> str:
        """Tune's experiment folder of the study."""
        return os.path.join(self.storage, self.name)

    @property
    def n_finished(self) -> int:
        """How many of the study's trials were finished before this run."""
        return len(self.grid) - len(self.pending)


@dataclass(frozen=True)
class TuneSettings:
    """How the sweep's flags have Tune run the trials."""

    data_dir: str  # where the dataset is
    resources: dict  # what each trial asks Ray for
    gpus: int  # the study's GPUs, checked against the cluster's
    max_concurrent: int | None  # trials at a time (None: as many as the resources allow)
    max_failures: int  # retries of a failed trial, each from its last checkpoint
    continuing: bool  # --resume or --extend: restore Tune's saved experiment where it can
    wait_for_cluster: float | None = None  # seconds an autoscaler may take to add nodes (None: private Ray)
    trials_write_rows: bool = False  # --out is shared storage: trials write their own rows there
    compact_in_background: bool = True  # rows through the driver: compact ended trials off its thread


def trial_name(trial) -> str:
    """Tune's trial name and folder: the same readable key as the Parquet files."""
    return TrialConfig.from_dict(trial.config["trial"]).trial_id


class _TuneStopNotes(logging.Filter):
    """Drops what Tune logs when stopped by Ctrl-C: "Resume experiment with: Tuner.restore(...)"
    (the sweep's own line says to rerun with --resume) and that the results of trials that had
    not started yet cannot be read (the sweep does not read them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "Resume experiment with:" not in text and "Failed to fetch metrics" not in text


TUNE_STOP_NOTES = _TuneStopNotes()


def run_tune(ray, study: Study, how: TuneSettings) -> int:
    """See that the cluster can run a trial (waiting for its autoscaler to add nodes where it
    can), load the dataset, write study.json, run the pending trials with Tune; the exit status."""
    slots = min(len(study.pending), how.max_concurrent or len(study.pending))  # trials at once
    with check_cluster(ray, how.resources, how.gpus, slots, study.storage, how.wait_for_cluster):
        return _run(study, how)


def _run(study: Study, how: TuneSettings) -> int:
    """run_tune's work, on a cluster that can hold a trial."""
    from ray import tune

    from study.data import DataError, load_dataset
    from study.results_writer import FATAL_KEY, ParquetWriterCallback
    from study.trainable import data_to_numpy, train_trial

    t0 = time.time()
    p = study.preset
    try:
        data = load_dataset(p.dataset, how.data_dir, subset=p.subset)  # prints the auto notice
    except DataError as e:
        raise UsageError(str(e)) from None
    print(f"dataset {data.name}: {len(data.train_y):,} training images, "
          f"{len(data.test_y):,} test images ({time.time() - t0:.1f} s)")
    val_fraction = study.grid[0].val_fraction
    n_fit, n_val = split_sizes(len(data.train_y), val_fraction)
    if n_val < 1 or n_fit < 1:
        raise UsageError(f"{data.name}: {len(data.train_y)} training image(s) leave {n_fit} to train on "
                         f"and {n_val} to validate on ({val_fraction:g} of them); it needs "
                         "at least 3 (--subset)")
    storage.write_bytes(storage.join(study.out, "study.json"),
                        json.dumps(study.record, indent=1).encode())
    sizes = dict(train=n_fit, val=n_val, test=len(data.test_y))

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, data=data_to_numpy(data),
                             cpus_per_trial=how.resources["CPU"],
                             cuda_graph=study.record["execution"]["cuda_graph"],
                             results_out=str(study.out) if how.trials_write_rows else None),
        {k.lower(): v for k, v in how.resources.items()},
    )
    writer = ParquetWriterCallback(str(study.out), study.name, data.name, sizes,
                                   compact_in_background=how.compact_in_background)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # so the trimmed CLIReporter is used
    tuner = restored_tuner(study, trainable, writer) if how.continuing and not study.extending else None
    if tuner is None:
        if study.extending:  # a new Tune experiment state beside the old one; Tune restores the newest
            print(f"extending {study.name!r}: {len(study.pending)} trials added to its "
                  f"{study.n_finished}; the finished trials are kept")
        elif how.continuing:
            print(f"resuming {study.name!r}: {study.n_finished} of {len(study.grid)} trials are finished; "
                  f"Tune's experiment in {study.experiment} cannot be restored, lacks some of the others "
                  f"or holds some as ended, so the other {len(study.pending)} start from their first epoch")
        tuner = new_tuner(study, how, trainable, writer)
    for logger in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis"):
        logging.getLogger(logger).addFilter(TUNE_STOP_NOTES)  # the same object is added once
    grid = tuner.fit()  # a first Ctrl-C makes Tune save its state and return
    writer.flush()  # the compactions still under way, before the study's state is read
    fatal = [r.metrics[FATAL_KEY] for r in grid if r.metrics and r.metrics.get(FATAL_KEY)]
    if fatal:
        print(f"study.sweep: error: trial {fatal[0]}; the study stopped (resume it with --resume "
              "once that is fixed)", file=sys.stderr)
        return 1
    import ray

    n_nodes = len([n for n in ray.nodes() if n.get("Alive")])
    return outcome(study, grid.num_errors, time.time() - t0, n_nodes, how.trials_write_rows)


def restored_tuner(study: Study, trainable, writer):
    """Tune's saved experiment of the study, if it can run every pending trial; else None.

    Tune brings back the study's own run settings (failures, concurrency); its Parquet writer
    is this run's (the folder may have moved): see ParquetWriterCallback."""
    from ray import tune

    from study.results_writer import ParquetWriterCallback

    if not tune.Tuner.can_restore(study.experiment):
        return None
    try:
        with ParquetWriterCallback.driving(writer):
            restored = tune.Tuner.restore(study.experiment, trainable=trainable, resume_errored=True)
        # Tune runs only the trials its experiment holds unfinished. An extension stopped
        # before Tune saved leaves the study's older experiment, which lacks the added
        # trials; a finished trial whose rows were moved away is one Tune holds as ended. A
        # trial's folder is its id (trial_name); one that has not reported has no config here
        last_status = {Path(r.path).name: (r.metrics or {}).get("status")
                       for r in restored.get_results()}
    except RuntimeError:  # stopped as Tune began: its tuner.pkl without an experiment state
        return None
    if not last_status or any(c.trial_id not in last_status
                              or last_status[c.trial_id] in ("done", "diverged") for c in study.pending):
        return None
    print(f"resuming {study.name!r} from Tune's experiment in {study.experiment}: "
          f"{study.n_finished} of {len(study.grid)} trials are finished")
    return restored


def new_tuner(study: Study, how: TuneSettings, trainable, writer):
    """A new Tune experiment of the study's pending trials, one Tune trial per grid point."""
    from ray import tune

    from study.trainable import MpsNote, StopOnFatal

    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([c.to_dict() for c in study.pending])},
        tune_config=tune.TuneConfig(
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
            max_concurrent_trials=how.max_concurrent,
            # a finished trial's worker process runs the next trial: no new process, PyTorch
            # import or CUDA context per trial (bench/ray_overhead.py)
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=study.name,
            storage_path=study.storage,
            callbacks=[writer, MpsNote()],
            stop=StopOnFatal(),
            progress_reporter=tune.CLIReporter(
                parameter_columns={"trial/norm": "norm", "trial/noise": "noise", "trial/lr": "lr",
                                   "trial/seed": "seed"},
                metric_columns={"epoch": "epoch", "train_acc": "train acc", "test_acc": "test acc",
                                "status": "outcome"},
                max_report_frequency=30,
            ),
            failure_config=tune.FailureConfig(max_failures=how.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=1,
        ),
    )


def outcome(study: Study, errors: int, seconds: float, n_nodes: int = 1, shared_out: bool = False) -> int:
    """Say how the study stands after Tune's run; the exit status (1 errors, 130 stopped).
    ``shared_out``: every node sees the results folder (it is not only on the driver's)."""
    unfinished = [c for c in study.grid if not trial_finished(study.out, c.trial_id)]
    print(f"\nstudy {study.name!r}: {len(study.grid)} trials ({len(study.pending)} in this run), "
          f"{errors} errored, {seconds:.0f} s. Results: {study.out}")
    if errors:
        print(f"study.sweep: {errors} trial(s) failed, out of retries (--max-failures; the "
              f"'error' column of {storage.join(study.out, 'trials')}, and error.txt in their folders under "
              f"{study.experiment}); rerun the same command with --resume to retry them from their "
              "last checkpoint", file=sys.stderr)
        return 1
    if unfinished:
        print(f"study.sweep: stopped with {len(unfinished)} of the study's {len(study.grid)} trials "
              "unfinished; continue with the same command and --resume", file=sys.stderr)
        return 130
    if n_nodes > 1 and not shared_out:  # on a cluster: the head's disk
        print(f"the results are on this node ({socket.gethostname()}), the driver's, only; from the "
              f"machine that ran `ray up`:  ray rsync-down cluster.yaml {study.out}/ results/ "
              "(or use --out s3://BUCKET/PREFIX, which outlives the node)")
    print(f"draw the figures with:  python -m analysis.figures {study.out}")
    return 0
