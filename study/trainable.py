"""The Ray Tune function trainable around ``run_trial``, and the driver-side Parquet callback.

Each epoch the trial reports its metrics with a checkpoint of the whole ``run_trial``
state; a retried or restored trial continues from ``tune.get_checkpoint()``. The
epoch's table rows travel inside the result (pickled under ``ROWS_KEY``) to the driver,
where ``ParquetWriterCallback`` writes them and takes them out of the result before
Tune's own loggers see it. So results arrive wherever the trial ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune

from study import epoch_parts, results, trial_files
from study.cluster import mps_missing, mps_note
from study.config import TrialConfig
from study.data import DataArrays
from study.train import STATE_FILE, RunOptions, run_trial

log = logging.getLogger(__name__)

ROWS_KEY = "_rows"
#: A result key whose value says why the trial cannot run at all; the sweep stops on it.
FATAL_KEY = "_fatal"


def nvidia_driver() -> str:
    """The NVIDIA kernel driver's version on this node, or why there is none."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return "none found"
    found = re.search(r"Kernel Module\s+(\S+)", text)
    return found.group(1) if found else text.splitlines()[0]


def no_gpu_reason(gpu_share: float) -> str | None:
    """Why a trial given a share of a GPU cannot use one on this node, or None if it can:
    such a trial must not train on the CPU for hours under a progress table that looks normal."""
    if not gpu_share or torch.cuda.is_available():
        return None
    needs = (f"CUDA {torch.version.cuda}, so an NVIDIA driver that supports it" if torch.version.cuda
             else "a CUDA build of torch (this one is CPU-only)")
    return (f"was given {gpu_share:g} of a GPU on node {ray.util.get_node_ip_address()}, where torch "
            f"{torch.__version__} finds no usable CUDA device (NVIDIA driver: {nvidia_driver()}; "
            f"this torch needs {needs})")


class StopOnFatal(tune.Stopper):
    """Stops the whole study once a trial reports that it cannot run (``FATAL_KEY``): every
    other trial would meet the same node and retrying would not help."""

    def __init__(self) -> None:
        self.fatal = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.fatal = self.fatal or bool(result.get(FATAL_KEY))
        return bool(result.get(FATAL_KEY))

    def stop_all(self) -> bool:
        return self.fatal


def load_checkpoint_state(checkpoint: tune.Checkpoint) -> dict | None:
    """The ``run_trial`` state in a checkpoint, or None (with a log line) if it is unreadable."""
    try:
        with checkpoint.as_directory() as d:
            return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or missing file: start over rather than crash-loop
        log.warning("checkpoint %s is unreadable (%s: %s); restarting the trial from scratch",
                    checkpoint.path, type(e).__name__, e)
        return None


def train_trial(space: dict, data: dict, cpus_per_trial: int = 1, cuda_graph: bool | None = None) -> None:
    """Tune function trainable: ``space["trial"]`` is a TrialConfig dict; ``data`` the arrays.

    ``cuda_graph``: replay the steps from CUDA graphs where the trial runs on a GPU (None:
    ``RunOptions``' default); a trial on a CPU trains eagerly whatever it says."""
    # Ray logs "Checkpoint successfully created at ..." for every epoch of every trial (750
    # lines in a full study), burying the progress table; the checkpoints' place is in the docs
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    cfg = TrialConfig.from_dict(space["trial"])
    arrays = DataArrays(**data)
    gpu_share = tune.get_context().get_trial_resources().required_resources.get("GPU", 0)
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    reason = no_gpu_reason(gpu_share)
    if reason:
        tune.report({FATAL_KEY: f"{cfg.trial_id} {reason}", "status": "error", "gpus": gpu_share,
                     "node_id": ray.get_runtime_context().get_node_id()})
        return
    device = "cuda" if gpu_share else "cpu"
    node = ray.util.get_node_ip_address()
    no_mps = mps_missing(gpu_share)  # looked at here, on the GPU's node, not on the driver's

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume = load_checkpoint_state(checkpoint)

    def on_epoch(record: dict, state: dict) -> None:
        row = record["epoch"]
        metrics = {k: row[k] for k in ("epoch", "train_loss", "train_acc", "val_acc", "test_acc")}
        metrics.update(status=record["status"], pid=os.getpid(), device=device, gpus=gpu_share,
                       node_id=ray.get_runtime_context().get_node_id(), gpu_ids=",".join(gpu_ids),
                       node=node, mps_missing=no_mps)
        metrics[ROWS_KEY] = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    options = RunOptions(device=device, threads=cpus_per_trial)
    if cuda_graph is not None:
        options = dataclasses.replace(options, cuda_graph=cuda_graph)
    run_trial(cfg, arrays, on_epoch, resume_from=resume, options=options)


class MpsNote(tune.Callback):
    """Says once per GPU node, on the driver, that its packed trials run without NVIDIA MPS
    (the trials look, since only the GPU's own node can tell)."""

    def __init__(self) -> None:
        self.noted: set[str] = set()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        node = result.get("node", "")
        if result.get("mps_missing") and node not in self.noted:
            self.noted.add(node)
            print(mps_note(node, result["gpus"]), file=sys.stderr, flush=True)


class ParquetWriterCallback(tune.Callback):
    """Writes every reported epoch to the results folder, on the driver.

    Each epoch's rows go into their own files (``epoch_parts.write_epoch_rows``), replacing those
    of the same epoch already written, so a trial retried from its checkpoint or a restored
    study never duplicates rows, and a report costs the same at any epoch; a trial that ends
    (done, diverged, out of retries) is compacted into one file per table.

    Tune pickles its callbacks into the experiment and ``Tuner.restore`` brings them back as
    they were, so a restored study would write to the folder it was started in, even after
    the folder moved. Unpickled inside ``driving(writer)``, a writer becomes ``writer``: the
    one the resuming command made for its ``--out``.
    """

    _driving: ParquetWriterCallback | None = None

    def __init__(self, out_dir: str, study: str, dataset: str, sizes: dict[str, int]):
        self.out_dir, self.study, self.dataset, self.sizes = str(out_dir), study, dataset, sizes
        # per trial, what this driver has learnt or written (not pickled: see __reduce__)
        self._ended: dict[str, bool] = {}
        self._histories: dict[str, dict[int, dict]] = {}

    @classmethod
    @contextlib.contextmanager
    def driving(cls, writer: ParquetWriterCallback) -> Iterator[None]:
        """Writers unpickled meanwhile (a restored Tuner's) are ``writer``."""
        cls._driving = writer
        try:
            yield
        finally:
            cls._driving = None

    def __reduce__(self):
        return _unpickle_writer, (self.out_dir, self.study, self.dataset, self.sizes)

    def _trial_row(self, cfg: TrialConfig, status: str, history: list[dict], **extra) -> dict:
        last = history[-1] if history else {}
        columns = results.TABLES["trials"].names
        row = {k: v for k, v in cfg.to_dict().items() if k in columns}
        row.update(
            trial_id=cfg.trial_id,
            study=self.study,
            dataset=self.dataset,
            status=status,
            epochs_done=len(history),
            wall_s=float(sum(h["wall_s"] for h in history)),
            config_json=cfg.to_json(),
            **{f"{k}_size": v for k, v in self.sizes.items()},
        )
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
            row[f"final_{k}"] = last.get(k)
        row.update(extra)
        return row

    def _finished(self, cfg: TrialConfig) -> bool:
        """Whether the folder already holds the trial's whole results. Tune saves its experiment
        after the rows are written, so a study stopped in between restores a trial that has
        finished and runs its last epoch again: that run must not replace what is written.
        A trial this writer is writing is not looked up again (a report must read no file);
        one recorded as ended is, since its rows may have gone since (moved away)."""
        tid = cfg.trial_id
        if self._ended.get(tid) is False:
            return False
        try:
            self._ended[tid] = trial_files.trial_finished(self.out_dir, tid)
        except results.DamagedFileError:  # damaged since the sweep checked the folder: write as before
            self._ended[tid] = False
        return self._ended[tid]

    def _history(self, tid: str) -> dict[int, dict]:
        """The trial's epochs rows by epoch, kept here so that its trials row never re-reads
        its epochs table: read once, where this driver meets a trial that ran before it."""
        if tid not in self._histories:
            held = epoch_parts.read_trial_table(self.out_dir, "epochs", tid)
            self._histories[tid] = {r["epoch"]: r for r in (held.to_pylist() if held else [])}
        return self._histories[tid]

    def _rows_so_far(self, tid: str) -> list[dict]:
        history = self._history(tid)
        return [history[e] for e in sorted(history)]

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        blob = result.pop(ROWS_KEY, None)
        cfg = TrialConfig.from_dict(trial.config["trial"])
        if result.get(FATAL_KEY) and not self._finished(cfg):
            results.write_trial_row(self.out_dir, self._trial_row(cfg, "error", [], error=result[FATAL_KEY]))
        if blob is None:
            return
        if self._finished(cfg):
            return
        record = pickle.loads(blob)
        tid, epoch = cfg.trial_id, record["epoch"]["epoch"]
        out = self.out_dir
        if record.get("probes"):
            epoch_parts.write_epoch_rows(out, "probes", tid, results.to_arrow("probes", [
                dict(r, trial_id=tid) for r in record["probes"]]))
        steps = dict(record["steps"])
        steps["trial_id"] = [tid] * len(steps["step"])
        epoch_parts.write_epoch_rows(out, "steps", tid, results.to_arrow("steps", steps), epoch)
        epoch_parts.write_epoch_rows(out, "layers", tid, results.to_arrow("layers", [
            dict(r, trial_id=tid, epoch=epoch) for r in record["layers"]]))
        # the epochs row last: where it is written, the epoch's other rows are too
        epoch_parts.write_epoch_rows(out, "epochs", tid, results.to_arrow("epochs", [
            dict(record["epoch"], trial_id=tid)]))
        self._history(tid)[epoch] = dict(record["epoch"], trial_id=tid)
        ended = record["status"] in ("done", "diverged")
        if ended:  # few files for readers; before the row that records the end, so that a
            epoch_parts.compact_trial(out, tid)  # trial recorded as ended is compacted
        results.write_trial_row(out, self._trial_row(
            cfg, record["status"], self._rows_so_far(tid), host=result.get("hostname"),
            device=result.get("device")))
        self._ended[tid] = ended

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        cfg = TrialConfig.from_dict(trial.config["trial"])
        if self._finished(cfg):
            return
        err = ""
        if trial.error_file and os.path.exists(trial.error_file):
            err = Path(trial.error_file).read_text(errors="replace")[-4000:]
        tid = cfg.trial_id
        history = self._rows_so_far(tid)
        epoch_parts.compact_trial(self.out_dir, tid)  # out of retries: it has ended too
        results.write_trial_row(self.out_dir, self._trial_row(cfg, "error", history, error=err))

    def on_experiment_end(self, trials, **info) -> None:
        """Compact every trial this driver wrote rows of: those still running when the study
        stopped (a resumed one appends parts on top of its compacted files)."""
        for tid in self._histories:
            epoch_parts.compact_trial(self.out_dir, tid)


def _unpickle_writer(out_dir: str, study: str, dataset: str, sizes: dict[str, int]) -> ParquetWriterCallback:
    return ParquetWriterCallback._driving or ParquetWriterCallback(out_dir, study, dataset, sizes)


def data_to_numpy(data: DataArrays) -> dict:
    """The dataset as a dict of numpy arrays, for ``tune.with_parameters`` (object store)."""
    return dict(
        name=data.name,
        classes=tuple(data.classes),
        train_x=np.ascontiguousarray(data.train_x),
        train_y=np.ascontiguousarray(data.train_y),
        test_x=np.ascontiguousarray(data.test_x),
        test_y=np.ascontiguousarray(data.test_y),
    )

