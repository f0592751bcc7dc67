"""Where a trial's Parquet rows are written: by the trial itself, where the results folder is
shared storage, or on the driver by ``ParquetWriterCallback``, which records every trial's
``trials`` row (its status) either way (docs/design.md, "Who writes the rows").

A trial reports each epoch's record (``run_trial``'s) pickled under ``ROWS_KEY`` in its Tune
result. Where it wrote its rows itself (``write_epoch_record`` where it runs, and
``epoch_parts.compact_trial`` when it ends) the record holds only its epochs row and status
(``WRITTEN_KEY``); otherwise the whole record, which the driver writes. The callback takes the
record out of the result before Tune's own loggers see it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ray import tune

from study import epoch_parts, results, trial_files
from study.config import TrialConfig

ROWS_KEY = "_rows"
#: A result key whose value says why the trial cannot run at all; the sweep stops on it.
FATAL_KEY = "_fatal"
#: In a reported record: the trial wrote its rows itself; the record holds only its epochs row.
WRITTEN_KEY = "written_by_trial"
#: A record's status where its trial has ended (not a fault).
ENDED = ("done", "diverged")


def write_epoch_record(out_dir: str, trial_id: str, record: dict) -> None:
    """Write one epoch's record into the per-epoch tables, each epoch's part replacing the same
    epoch's (``epoch_parts.write_epoch_rows``); the epochs row last, so that where it is
    written, the epoch's other rows are too."""
    epoch = record["epoch"]["epoch"]
    if record.get("probes"):
        epoch_parts.write_epoch_rows(out_dir, "probes", trial_id, results.to_arrow("probes", [
            dict(r, trial_id=trial_id) for r in record["probes"]]))
    steps = dict(record["steps"])
    steps["trial_id"] = [trial_id] * len(steps["step"])
    epoch_parts.write_epoch_rows(out_dir, "steps", trial_id, results.to_arrow("steps", steps), epoch)
    epoch_parts.write_epoch_rows(out_dir, "layers", trial_id, results.to_arrow("layers", [
        dict(r, trial_id=trial_id, epoch=epoch) for r in record["layers"]]))
    epoch_parts.write_epoch_rows(out_dir, "epochs", trial_id, results.to_arrow("epochs", [
        dict(record["epoch"], trial_id=trial_id)]))


def status_record(record: dict) -> dict:
    """What a trial that wrote its own rows reports of its epoch: the epochs row (the driver's
    ``trials`` row is built from those) and the status."""
    return {"epoch": record["epoch"], "status": record["status"], WRITTEN_KEY: True}


def finished_already(out_dir: str, trial_id: str) -> bool:
    """Whether the folder already holds the trial's whole results; a damaged file counts as not
    (the trial is written as before)."""
    try:
        return trial_files.trial_finished(out_dir, trial_id)
    except results.DamagedFileError:
        return False


class ParquetWriterCallback(tune.Callback):
    """Records every trial in the results folder, on the driver: its epochs' rows where they
    come through the driver, and its ``trials`` row (status, final metrics) always.

    Each epoch's rows go into their own files, replacing those of the same epoch already
    written, so a trial retried from its checkpoint or a restored study never duplicates rows,
    and a report costs the same at any epoch; a trial that ends (done, diverged, out of retries)
    is compacted into one file per table. ``compact_in_background``: where rows come through the
    driver, a trial's compaction (and then its final ``trials`` row) runs on a worker thread, off
    the thread that absorbs the reports; ``flush`` waits for it (when Tune's run returns).

    Tune pickles its callbacks into the experiment and ``Tuner.restore`` brings them back as
    they were, so a restored study would write to the folder it was started in, even after
    the folder moved. Unpickled inside ``driving(writer)``, a writer becomes ``writer``: the
    one the resuming command made for its ``--out``.
    """

    _driving: ParquetWriterCallback | None = None

    def __init__(self, out_dir: str, study: str, dataset: str, sizes: dict[str, int],
                 compact_in_background: bool = False):
        self.out_dir, self.study, self.dataset, self.sizes = str(out_dir), study, dataset, sizes
        self.compact_in_background = compact_in_background
        # per trial, what this driver has learnt or written (not pickled: see __reduce__)
        self._ended: dict[str, bool] = {}
        self._histories: dict[str, dict[int, dict]] = {}
        self._pending: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

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
        return _unpickle_writer, (self.out_dir, self.study, self.dataset, self.sizes,
                                  self.compact_in_background)

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

    def _settle(self, tid: str) -> None:
        """Wait for the trial's compaction on the worker thread, if one is under way (its
        files are then as a reader or the next write expects them); re-raises its error."""
        pending = self._pending.pop(tid, None)
        if pending is not None:
            pending.result()

    def flush(self) -> None:
        """Wait for every compaction on the worker thread; re-raises the first error."""
        for tid in list(self._pending):
            self._settle(tid)

    def _finished(self, cfg: TrialConfig) -> bool:
        """Whether the folder already holds the trial's whole results. Tune saves its experiment
        after the rows are written, so a study stopped in between restores a trial that has
        finished and runs its last epoch again: that run must not replace what is written.
        A trial this writer is writing is not looked up again (a report must read no file);
        one recorded as ended is, since its rows may have gone since (moved away)."""
        tid = cfg.trial_id
        if self._ended.get(tid) is False:
            return False
        self._settle(tid)
        self._ended[tid] = finished_already(self.out_dir, tid)
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
        by_trial = bool(record.get(WRITTEN_KEY))  # its rows written, and compacted at its end
        if not by_trial:
            write_epoch_record(self.out_dir, tid, record)
        history = self._history(tid)  # read before this epoch is added: a trial's files may hold it
        history[epoch] = dict(record["epoch"], trial_id=tid)
        ended = record["status"] in ENDED
        row = self._trial_row(cfg, record["status"], self._rows_so_far(tid),
                              host=result.get("hostname"), device=result.get("device"))
        self._ended[tid] = ended
        if not ended or by_trial:
            results.write_trial_row(self.out_dir, row)
        elif self.compact_in_background:
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="compaction")
            self._pending[tid] = self._pool.submit(self._end, tid, row)
        else:
            self._end(tid, row)

    def _end(self, tid: str, row: dict) -> None:
        """Compact an ended trial, then write the row that records its end: a trial recorded
        as ended is compacted (few files for readers)."""
        epoch_parts.compact_trial(self.out_dir, tid)
        results.write_trial_row(self.out_dir, row)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        cfg = TrialConfig.from_dict(trial.config["trial"])
        if self._finished(cfg):
            return
        err = ""
        if trial.error_file and os.path.exists(trial.error_file):
            err = Path(trial.error_file).read_text(errors="replace")[-4000:]
        tid = cfg.trial_id
        epoch_parts.compact_trial(self.out_dir, tid)  # out of retries: it has ended too
        # read back: a trial that writes its own rows may have written an epoch it never reported
        self._histories.pop(tid, None)
        history = self._rows_so_far(tid)
        results.write_trial_row(self.out_dir, self._trial_row(cfg, "error", history, error=err))

    def on_experiment_end(self, trials, **info) -> None:
        """Compact every trial this driver met whose end it has not seen: those still running
        when the study stopped (a resumed one appends parts on top of its compacted files)."""
        self.flush()
        for tid in self._histories:
            if not self._ended.get(tid):
                epoch_parts.compact_trial(self.out_dir, tid)


def _unpickle_writer(out_dir: str, study: str, dataset: str, sizes: dict[str, int],
                     compact_in_background: bool = False) -> ParquetWriterCallback:
    return ParquetWriterCallback._driving or ParquetWriterCallback(out_dir, study, dataset, sizes,
                                                                   compact_in_background)
