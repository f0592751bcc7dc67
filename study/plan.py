"""What a sweep does in its results folder: start a study in a new one, or resume or extend the
study already there, or refuse a folder it must not touch; study.json says which study it holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator

from common.cli import UsageError, first_few, unwritable
from study import storage
from study.config import TrialConfig
from study.grid import GRID_KEYS, PARAM_LISTS, TRIAL_GRID_KEYS, Preset
from study.object_lock import object_lock
from study.storage import Location
from study.trial_files import trial_gap
from study.variants import VARIANTS


def check_out_dir(out: Location) -> None:
    """Fail early if the results folder cannot be written."""
    if storage.is_uri(out):
        probe = storage.join(out, f".write-test-{os.getpid()}")
        try:
            storage.write_bytes(probe, b"")
            storage.delete(probe)
        except (OSError, ValueError) as e:  # pyarrow's S3 errors are OSErrors
            raise UsageError(f"--out: cannot write to {out}: {' '.join(str(e).split())}") from None
        return
    why = unwritable(out)
    if why:
        raise UsageError(f"--out: cannot write to {out}: {why}")


@contextlib.contextmanager
def out_lock(out: Location) -> Iterator[None]:
    """One sweep at a time in a results folder (two would train the same trials into the same
    files): a lock on the folder itself, which ends with this process however it ends; on an
    object store, which has no locks, a lease object (study.object_lock)."""
    if storage.is_uri(out):
        with object_lock(storage.join(out, ".sweep-lock")):
            yield
        return
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


def study_record(name: str, p: Preset, grid: list[TrialConfig], dataset: str,
                 execution: dict) -> dict:
    """study.json: the grid, and how it was run (``execution``: what may change speed, not
    the numbers beyond fp32 rounding: GPUs, packing, threads, layout, CUDA graphs)."""
    return dict(name=name, preset=p.__dict__ | {"dataset": dataset},
                trials=[c.to_dict() for c in grid], trial_ids=[c.trial_id for c in grid],
                execution=execution)


def plan_run(out: Location, name: str, grid: list[TrialConfig], record: dict, resume: bool,
             extend: bool) -> tuple[list[TrialConfig], bool]:
    """What a run in ``out`` does: the trials to run and whether they extend the study there
    (the whole grid for a new folder). Raises UsageError for a folder the run must not touch:
    another study, other settings, an unfinished study to extend, a finished one to rerun."""
    study_file = storage.join(out, "study.json")
    if not storage.exists(study_file):
        held = {f.removesuffix(".parquet") for table in ("trials", "epochs", "layers", "steps")
                for f in [*storage.file_names(storage.join(out, table), ".parquet"),
                          *storage.folder_names(storage.join(out, table))]}  # a running trial's parts
        if held:
            raise UsageError(f"{out} holds results of {len(held)} trial(s) but no "
                             "study.json to say which study they belong to; use another --out, or "
                             "move them away")
        return grid, False
    try:
        old = json.loads(storage.read_bytes(study_file))
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
                             f"({first_few(lacking)}): "
                             "give --norms, --noises, --ps, --groups, --lrs and --seeds the "
                             "study's values too")
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
                         f"{len(old_ids)} trials are unfinished ({first_few(unfinished)})")
    return [c for c in grid if c.trial_id not in finished], extending


def grid_flags(preset: dict) -> str:
    """The grid of a study.json's preset as the sweep's flags, for a message."""
    def text(v) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)
    taken = {k for n in preset.get("norms", ()) if n in VARIANTS for k in VARIANTS[n].params}
    unused = {PARAM_LISTS[k] for k in PARAM_LISTS if k not in taken}
    keys = tuple(k for k in GRID_KEYS if k not in unused)
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
