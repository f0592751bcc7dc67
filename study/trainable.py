"""The Ray Tune function trainable around ``run_trial``, and the driver's small callbacks
(stop on a fatal report, the MPS note).

Each epoch the trial reports its metrics with a checkpoint of the whole ``run_trial``
state; a retried or restored trial continues from ``tune.get_checkpoint()``. Where the results
folder is shared storage the trial writes the epoch's table rows itself, else they travel
inside the result to the driver (``study.results_writer``). So results arrive wherever the
trial ran.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune

from study import epoch_parts, storage
from study.cluster import mps_missing, mps_note
from study.config import TrialConfig
from study.data import DataArrays
from study.results_writer import (
    ENDED,
    FATAL_KEY,
    ROWS_KEY,
    finished_already,
    status_record,
    write_epoch_record,
)
from study.train import STATE_FILE, RunOptions, run_trial

log = logging.getLogger(__name__)


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


def train_trial(space: dict, data: dict, cpus_per_trial: int = 1, cuda_graph: bool | None = None,
                results_out: str | None = None) -> None:
    """Tune function trainable: ``space["trial"]`` is a TrialConfig dict; ``data`` the arrays.

    ``cuda_graph``: replay the steps from CUDA graphs where the trial runs on a GPU (None:
    ``RunOptions``' default); a trial on a CPU trains eagerly whatever it says.
    ``results_out``: the results folder, where it is shared storage: the trial writes its rows
    there and compacts them when it ends, and reports only its epochs row; None: its rows go
    to the driver in the result."""
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
    if results_out is not None and not storage.exists(storage.join(results_out, "study.json")):
        tune.report({FATAL_KEY: f"{cfg.trial_id} cannot see the results folder {results_out} on node "
                     f"{node} (no study.json there, which the sweep wrote before any trial): give "
                     "--shared-out only for a folder every node sees, or use --out s3://...",
                     "status": "error", "node_id": ray.get_runtime_context().get_node_id()})
        return
    no_mps = mps_missing(gpu_share)  # looked at here, on the GPU's node, not on the driver's

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume = load_checkpoint_state(checkpoint)
    # a study stopped after a trial's last rows, before Tune saved, reruns that epoch: leave them
    writes = results_out is not None and not (checkpoint is not None
                                               and finished_already(results_out, cfg.trial_id))

    def on_epoch(record: dict, state: dict) -> None:
        row = record["epoch"]
        metrics = {k: row[k] for k in ("epoch", "train_loss", "train_acc", "val_acc", "test_acc")}
        metrics.update(status=record["status"], pid=os.getpid(), device=device, gpus=gpu_share,
                       node_id=ray.get_runtime_context().get_node_id(), gpu_ids=",".join(gpu_ids),
                       node=node, mps_missing=no_mps)
        if writes:  # before the report: a trial recorded as ended by the driver is compacted
            write_epoch_record(results_out, cfg.trial_id, record)
            if record["status"] in ENDED:
                epoch_parts.compact_trial(results_out, cfg.trial_id)
        sent = status_record(record) if results_out is not None else record
        metrics[ROWS_KEY] = pickle.dumps(sent, protocol=pickle.HIGHEST_PROTOCOL)
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

