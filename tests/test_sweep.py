"""The sweep CLI against real Ray: tables, resume, refusals, a two-node cluster, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from study import cluster, grid, plan, results, sweep
from tests.conftest import ROOT, TINY, assert_tables_equal, read_tables, run_sweep, sweep_env

EXPECTED_STEP_COLS = ["trial_id", "step", "epoch", "loss", "grad_norm"] + [
    f"grad_norm_{n}" for n in results.GRAD_LAYERS]


def test_dry_run_counts_the_full_grid(capsys):
    assert sweep.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "75 trials" in out  # (1 + 1 + 3 noises) × 3 lrs × 5 seeds
    assert out.count("noisy_batch-noise") == 45 and out.count("none-lr") == 15
    assert "resources per trial: {'CPU': 1}" in out


def test_dry_run_seed_and_smoke_presets(capsys):
    assert sweep.main(["--preset", "seed", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "9 trials" in out and "noise=1 (layer)" in out
    assert sweep.main(["--preset", "smoke", "--dataset", "synthetic", "--dry-run"]) == 0
    assert "6 trials" in capsys.readouterr().out


def test_local_sweep_writes_every_table(tiny_reference):
    out, tables = tiny_reference
    trial_ids = {f"{n}-lr0.02-seed{s}" for n in ("none", "batch") for s in (0, 1)}
    for name in ("trials", "epochs", "layers", "steps"):
        files = {f.stem for f in (out / name).glob("*.parquet")}
        assert files == trial_ids, name
        schema = pq.read_schema(next((out / name).glob("*.parquet")))
        assert schema.names == results.TABLES[name].names
        assert schema.metadata[results.VERSION_KEY] == b"1"
    assert set(tables["trials"].status) == {"done"}
    assert (tables["trials"].dataset == "synthetic").all()
    assert (tables["trials"].train_size == 160).all() and (tables["trials"].test_size == 200).all()
    assert len(tables["epochs"]) == 4 * 3
    assert len(tables["layers"]) == 4 * 3 * (6 + 5)  # 3 layers × 2 sites, 5 weight norms
    assert len(tables["steps"]) == 4 * 3 * 10  # 160 images / batch 16, every step
    assert list(read_steps_columns(out)) == EXPECTED_STEP_COLS
    for df, keys in ((tables["epochs"], ["trial_id", "epoch"]),
                     (tables["steps"], ["trial_id", "step"]),
                     (tables["layers"], ["trial_id", "epoch", "layer", "site"])):
        assert not df.duplicated(keys).any()
    study = json.loads((out / "study.json").read_text())
    assert study["trial_ids"]
    assert study["execution"] == dict(gpus=0, trials_per_gpu=None, cpus_per_trial=1, cuda_graph=False,
                                      cpu_channels_last=True)


def test_trials_writing_their_own_rows_give_the_tables_written_through_the_driver(tiny_reference, tmp_path):
    """--shared-out: each trial writes its rows where it runs and compacts them at its end, the
    driver only its trials row; the tables equal those of the rows that went through the
    driver, and no trial is left in parts."""
    out = tmp_path / "results"
    run_sweep(*TINY, "--out", str(out), "--shared-out")
    assert_tables_equal(tiny_reference[1], read_tables(out))
    assert not [p for t in results.EPOCH_TABLES if (out / t).exists()
                for p in (out / t).iterdir() if p.is_dir()]


def read_steps_columns(out: Path) -> list[str]:
    return pq.read_schema(next((out / "steps").glob("*.parquet"))).names


def _trial_pids(out: Path) -> dict[str, int]:
    """The worker process each trial ran in, from Tune's per-trial result.json."""
    return {f.parent.name: json.loads(f.read_text().splitlines()[-1])["pid"]
            for f in (out / "tune").rglob("result.json")}


def test_a_trial_in_a_reused_worker_process_gives_the_numbers_of_one_in_a_new_process(
        tiny_reference, tmp_path):
    """Tune runs the next trial in a finished trial's worker process (reuse_actors): what a trial
    leaves in its process (generator states, thread counts, caches) must not change the next
    trial's numbers. Reference: the same study with every trial in a new process."""
    out, reference = tiny_reference
    pids = _trial_pids(out)
    assert len(pids) == 4 and len(set(pids.values())) < 4, pids  # some process ran two trials
    fresh = tmp_path / "fresh"
    # study.sweep with Tune's reuse_actors off, as bench/ray_overhead.py times it
    without_reuse = [sys.executable, str(ROOT / "bench" / "ray_overhead.py"), "--fresh"]
    proc = subprocess.run([*without_reuse, *TINY, "--out", str(fresh)], cwd=ROOT,
                          env=sweep_env(), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(set(_trial_pids(fresh).values())) == 4  # one process per trial
    assert_tables_equal(reference, read_tables(fresh))


def test_resume_of_a_finished_study_does_nothing(tiny_reference):
    out, before = tiny_reference
    mtimes = {f: f.stat().st_mtime_ns for f in out.rglob("*.parquet")}
    proc = run_sweep(*TINY, "--out", str(out), "--resume")
    assert "already complete" in proc.stdout and "nothing to do" in proc.stdout
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*.parquet")} == mtimes


def test_trial_ids_name_every_setting_of_the_grid(capsys):
    from study.config import TrialConfig

    assert TrialConfig(norm="noisy_batch", noise=0.5, lr=0.01, seed=0).trial_id == \
        "noisy_batch-noise0.5-lr0.01-seed0"
    assert TrialConfig(norm="batch", lr=1e-3, seed=12).trial_id == "batch-lr0.001-seed12"
    assert sweep.main(["--norms", "noisy_batch", "--noises", "0,0.5,1.5,2", "--lrs", "0.01",
                       "--seeds", "0,1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    ids = {f"noisy_batch-noise{z}-lr0.01-seed{s}" for z in ("0", "0.5", "1.5", "2") for s in (0, 1)}
    assert "8 trials" in out and all(i in out for i in ids)


def test_list_flags_take_spaces_after_commas(capsys):
    assert sweep.main(["--norms", "batch, none", "--lrs", "0.01, 0.1", "--dry-run"]) == 0
    assert "20 trials" in capsys.readouterr().out


def test_flags_that_change_nothing_get_a_note(capsys):
    assert sweep.main(["--norms", "batch,none", "--noises", "2", "--probe-etas", "0.5",
                       "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "--noises has no effect" in err and "--probe-etas has no effect" in err
    assert sweep.main(["--norms", "noisy_batch", "--noises", "2", "--dry-run"]) == 0
    assert "no effect" not in capsys.readouterr().err
    assert sweep.main(["--cuda-graph", "--dry-run"]) == 0
    assert "--cuda-graph has no effect without --gpus" in capsys.readouterr().err


def test_packed_gpu_trials_without_mps_get_a_note_per_gpu_node(tmp_path, monkeypatch, capsys):
    """Each trial looks on its own node, by NVIDIA's rule for where clients find the daemon (the
    control socket in CUDA_MPS_PIPE_DIRECTORY, default /tmp/nvidia-mps); the driver says it
    once per GPU node whose packed trials run without it, and never for the head's machine."""
    from study.trainable import MpsNote

    pipes = tmp_path / "mps"
    pipes.mkdir()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipes))
    assert cluster.mps_control_socket() == pipes / "control"
    assert cluster.mps_missing(0.125) and not cluster.mps_missing(1) and not cluster.mps_missing(0)
    (pipes / "control").touch()  # a running daemon's socket
    assert not cluster.mps_missing(0.125)

    note = MpsNote()
    for node, missing in [("10.0.0.2", True), ("10.0.0.2", True), ("10.0.0.3", False),
                          ("10.0.0.4", True)]:
        note.on_trial_result(0, [], None, dict(node=node, gpus=0.125, mps_missing=missing))
    err = capsys.readouterr().err.splitlines()
    assert [line.split("GPU node ")[1].split(",")[0] for line in err] == ["10.0.0.2", "10.0.0.4"]
    assert "so the 8 trials that share each of its GPUs take turns" in err[0]
    assert "nvidia-cuda-mps-control -d" in err[0]
    assert sweep.main(["--gpus", "1", "--dry-run"]) == 0  # the driver's machine says nothing
    assert "MPS" not in capsys.readouterr().err


def test_changed_settings_are_what_changes_a_trial():
    """Only what changes some trial's config or the data counts: unused noise values do not."""
    from dataclasses import replace

    base = replace(grid.PRESETS["smoke"], norms=("none", "batch"))

    def record(p):
        return json.loads(json.dumps(plan.study_record("s", p, grid.build_grid(p), "synthetic", {})))

    old = record(base)
    assert plan.changed_settings(old, record(replace(base, noises=(3.0,)))) == []
    assert plan.changed_settings(old, record(replace(base, epochs=5))) == ["epochs: 2 -> 5"]
    assert plan.changed_settings(old, record(replace(base, subset=100))) == ["subset: 3000 -> 100"]
    assert plan.changed_settings({"name": "s"}, record(base)) == []  # an older study.json
    # --extend: added trials are compared on all but their grid point
    more = replace(base, seeds=(*base.seeds, 7), lrs=(*base.lrs, 0.5), norms=(*base.norms, "noisy_batch"))
    assert plan.changed_settings(old, record(more)) == []
    assert plan.changed_settings(old, record(replace(more, batch_size=8))) == ["batch_size: 16 -> 8"]
    assert plan.changed_settings(old, record(replace(more, noise_scope="layer"))) == [
        "noise_scope: channel -> layer"]


def _copy_study(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_resume_refuses_other_settings_and_damaged_files(tiny_reference, tmp_path, capsys):
    """Refused before Ray starts, with one line, and nothing in the folder touched."""
    out = _copy_study(tiny_reference[0], tmp_path / "results")
    tid = "none-lr0.02-seed1"
    (out / "trials" / f"{tid}.parquet").unlink()  # so the study is not complete
    snapshot = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    base = [*TINY, "--out", str(out), "--resume"]

    def refused(args: list[str], *words: str) -> None:
        assert sweep.main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
        assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == snapshot

    refused([*base[:7], "5", *base[8:]], "other settings", "epochs: 3 -> 5")
    refused([*base, "--subset", "100", "--batch-size", "8"], "subset: 200 -> 100", "batch_size: 16 -> 8")
    refused([*base, "--probe-every", "2"], "probe_every: 0 -> 2")
    damaged = out / "trials" / "batch-lr0.02-seed0.parquet"
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 2])
    snapshot[damaged] = damaged.read_bytes()
    refused(base, "unreadable", damaged.name)
    damaged.write_bytes(good)
    snapshot[damaged] = good
    (out / "study.json").write_text('{"name": "smo')
    snapshot[out / "study.json"] = (out / "study.json").read_bytes()
    refused(base, "study.json is unreadable")


def test_extend_refuses_what_it_cannot_add(tiny_reference, tmp_path, capsys):
    """Refused before Ray starts, with one line, and nothing in the folder touched."""
    out = _copy_study(tiny_reference[0], tmp_path / "results")
    snapshot = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    more = [*TINY[:3], "0,1,2", *TINY[4:], "--out", str(out), "--extend"]

    def refused(args: list[str], *words: str) -> None:
        assert sweep.main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
        assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == snapshot

    refused([*TINY[:3], "1,2", *TINY[4:], "--out", str(out), "--extend"],
            "whole study", "lacks 2 of the 4", "none-lr0.02-seed0")
    refused([*more, "--epochs", "5"], "--extend", "other settings", "epochs: 3 -> 5")
    refused([*more, "--name", "other"], "different study", "'full'")
    refused([*more[:-3], "--out", str(tmp_path / "none"), "--extend"], "no study in", "to extend")
    assert not (tmp_path / "none").exists()  # refused before the folder is made
    unfinished = out / "trials" / "batch-lr0.02-seed1.parquet"
    unfinished.unlink()
    del snapshot[unfinished]
    refused(more, "1 of the study's 4 trials are unfinished", "batch-lr0.02-seed1", "--resume")
    refused([*more, "--resume"], "unfinished")  # --extend also resumes: the two go together
    assert sweep.main([*more, "--dry-run"]) == 0
    assert "holds this study unfinished: finish it with --resume" in capsys.readouterr().out
    assert sweep.main([*more, "--dry-run", "--epochs", "5"]) == 0
    assert "other settings (epochs: 3 -> 5)" in capsys.readouterr().out
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == snapshot


def test_extend_runs_only_the_added_trials(tiny_reference, tmp_path):
    """A study of seed 0 extended to seeds 0, 1 holds the numbers of the study run whole, and
    its first trials' files are not rewritten. An extension stopped before Tune saved its
    experiment (study.json already names the added trials) is finished by --resume."""
    import shutil

    out = tmp_path / "results"
    run_sweep(*TINY[:3], "0", *TINY[4:], "--out", str(out))
    stopped = _copy_study(out, tmp_path / "stopped")
    shutil.copy(tiny_reference[0] / "study.json", stopped / "study.json")
    first = {f: f.read_bytes() for f in out.rglob("*.parquet")}
    assert len(first) == 2 * 4
    proc = run_sweep(*TINY, "--out", str(out), "--extend")
    assert "2 trials added to its 2" in proc.stdout
    assert "study 'full': 4 trials (2 in this run), 0 errored" in proc.stdout
    assert {f: f.read_bytes() for f in first} == first
    assert_tables_equal(tiny_reference[1], read_tables(out))
    study = json.loads((out / "study.json").read_text())
    assert study["trial_ids"] == json.loads((tiny_reference[0] / "study.json").read_text())["trial_ids"]
    again = run_sweep(*TINY, "--out", str(out), "--extend")
    assert "already complete" in again.stdout
    resumed = run_sweep(*TINY, "--out", str(out), "--resume")
    assert "already complete" in resumed.stdout
    more = run_sweep(*TINY[:3], "0-2", *TINY[4:], "--out", str(out), "--dry-run")
    assert "holds 4 of these 6 trials finished: --extend would run the other 2" in more.stdout
    proc = run_sweep(*TINY, "--out", str(stopped), "--resume")
    assert "lacks some of the others or holds some as ended, so the other 2 start from their " \
        "first epoch" in proc.stdout
    assert_tables_equal(tiny_reference[1], read_tables(stopped))


@pytest.mark.parametrize("lost", ["tune/", "all but tuner.pkl"])
def test_resume_without_tunes_experiment_runs_only_the_unfinished_trials(tiny_reference, tmp_path, lost):
    """Tune's experiment lost (another --storage, a deleted tune/) or never saved (a stop as Tune
    began leaves only its tuner.pkl): the results folder says which trials are finished, and
    only the others run, giving the reference numbers."""
    import shutil

    out = _copy_study(tiny_reference[0], tmp_path / "results")
    if lost == "tune/":
        shutil.rmtree(out / "tune")
    else:
        for path in (out / "tune" / "full").iterdir():
            if path.name != "tuner.pkl":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    tid = "batch-lr0.02-seed1"
    for table in ("trials", "epochs", "layers", "steps"):
        (out / table / f"{tid}.parquet").unlink()
    kept = {f: f.stat().st_mtime_ns for f in out.rglob("*.parquet")}
    proc = run_sweep(*TINY, "--out", str(out), "--resume")
    assert "3 of 4 trials are finished" in proc.stdout and "cannot be restored" in proc.stdout
    assert "Checkpoint successfully created" not in proc.stdout + proc.stderr  # progress, not log spam
    assert {f: f.stat().st_mtime_ns for f in kept} == kept  # the finished trials were not rerun
    assert_tables_equal(tiny_reference[1], read_tables(out))


def test_resume_reruns_finished_trials_whose_rows_are_gone(tiny_reference, tmp_path):
    """A trial's rows moved away (the trials row, as the unreadable-file message advises, or
    its epoch rows) make it run again, though Tune's saved experiment holds it as ended; the
    study then holds the reference numbers and the other trials are not rerun."""
    out = _copy_study(tiny_reference[0], tmp_path / "results")
    (out / "trials" / "batch-lr0.02-seed1.parquet").unlink()
    (out / "epochs" / "none-lr0.02-seed0.parquet").unlink()
    kept = {f: f.stat().st_mtime_ns for f in out.rglob("*.parquet")
            if f.stem not in ("batch-lr0.02-seed1", "none-lr0.02-seed0")}
    dry = run_sweep(*TINY, "--out", str(out), "--dry-run")
    assert "holds 2 of these 4 trials finished" in dry.stdout
    assert "none-lr0.02-seed0 runs again" in dry.stderr and "epochs/none-lr0.02-seed0.parquet is " \
        "missing" in dry.stderr
    proc = run_sweep(*TINY, "--out", str(out), "--resume")
    assert "holds some as ended, so the other 2 start from their first epoch" in proc.stdout
    assert "unfinished" not in proc.stderr
    assert {f: f.stat().st_mtime_ns for f in kept} == kept
    assert_tables_equal(tiny_reference[1], read_tables(out))
    cut = out / "epochs" / "batch-lr0.02-seed0.parquet"  # a copy that lost its last epoch
    results.write_atomic(results.read_table_file(cut).slice(0, 2), cut)
    again = run_sweep(*TINY, "--out", str(out), "--resume")
    assert "trials/batch-lr0.02-seed0.parquet records 3 epochs, but epochs/" in again.stderr
    assert_tables_equal(tiny_reference[1], read_tables(out))


def test_folders_it_must_not_write_into_are_refused_before_anything_is_written(tiny_reference, tmp_path,
                                                                             capsys):
    """Results without a study.json, a --storage shared with another study's experiment of the
    same name, a --storage Tune cannot use, and --resume with another grid: one line each, exit
    2, nothing written."""
    def refused(args: list[str], *words: str) -> None:
        assert sweep.main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err

    orphans = _copy_study(tiny_reference[0], tmp_path / "orphans")
    (orphans / "study.json").unlink()
    refused([*TINY, "--out", str(orphans)], "holds results of 4 trial(s) but no study.json")
    assert not (orphans / "study.json").exists()
    shared = [*TINY, "--storage", str(tiny_reference[0] / "tune")]
    refused([*shared, "--out", str(tmp_path / "second")], "already holds a Tune experiment named 'full'",
            "another --name")
    assert not (tmp_path / "second" / "study.json").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    refused([*TINY, "--out", str(tmp_path / "third"), "--storage", str(a_file)], "--storage")
    refused([*TINY, "--out", str(tmp_path / "third"), "--storage", "foo://x"], "--storage foo://x")
    assert not (tmp_path / "third" / "study.json").exists()
    refused(["--norms", "batch", "--out", str(tiny_reference[0]), "--resume"],
            "holds another grid of study 'full' (4 trials, not these 15)",
            "rerun the command that started it (--norms none,batch --lrs 0.02 --seeds 0,1 ...)")


def test_flag_messages_name_the_flag_once(capsys):
    for args, message in (
        (["--norms", ","], "study.sweep: error: --norms: the list is empty"),
        (["--epochs", "0"], "study.sweep: error: --epochs: must be >= 1, got 0"),
        (["--name", "", "--dry-run"], "--name '': a study name names a folder"),
        (["--name", "a/b", "--dry-run"], "--name 'a/b'"),
        (["--probe-every", "5", "--probe-etas", "0,-1", "--dry-run"],
         "--probe-etas: step sizes must be > 0, got 0, -1"),
    ):
        try:
            code = sweep.main(args)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_more_cpus_per_trial_than_a_node_has_is_an_error_not_a_wait(tmp_path):
    proc = run_sweep(*TINY, "--out", str(tmp_path / "r"), "--cpus-per-trial", "512", check=False,
                     timeout=120)
    assert proc.returncode == 2
    assert "--cpus-per-trial 512: the largest node of the Ray cluster has" in proc.stderr


def test_a_finished_trial_run_again_by_tune_does_not_replace_its_results(tiny_reference, tmp_path):
    """Tune saves its experiment after the rows are written, so a study stopped in between
    restores a finished trial as running and runs its last epoch again (on a GPU, not always to
    the bit). The writer leaves a finished trial's files alone, and a fault in that rerun does
    not turn its 'done' into 'error'. A trial whose rows are gone is still written."""
    import pickle
    from types import SimpleNamespace

    from study.config import TrialConfig
    from study.results_writer import ROWS_KEY, ParquetWriterCallback

    out = _copy_study(tiny_reference[0], tmp_path / "results")
    study = json.loads((out / "study.json").read_text())
    cfg = next(c for c in study["trials"] if TrialConfig(**c).trial_id == "batch-lr0.02-seed0")
    trial = SimpleNamespace(config={"trial": cfg}, error_file=None)
    writer = ParquetWriterCallback(str(out), "full", "synthetic", {"train": 160, "val": 40, "test": 200})
    before = {f: f.read_bytes() for f in out.rglob("*.parquet")}
    rerun = {"epoch": {"epoch": 3, "train_loss": 9.0}, "layers": [], "steps": {"step": []},
             "status": "done"}
    writer.on_trial_result(0, [], trial, {ROWS_KEY: pickle.dumps(rerun)})
    writer.on_trial_error(0, [], trial)
    assert {f: f.read_bytes() for f in out.rglob("*.parquet")} == before
    (out / "trials" / "batch-lr0.02-seed0.parquet").unlink()
    writer.on_trial_error(0, [], trial)
    assert pq.read_table(out / "trials" / "batch-lr0.02-seed0.parquet")["status"].to_pylist() == ["error"]


def test_a_second_sweep_in_the_same_folder_is_refused_while_the_first_runs(tiny_reference, tmp_path,
                                                                         capsys):
    """Two sweeps in one --out would train the same trials into the same files; the folder's
    lock (held here as a running sweep holds it) refuses the second, and ends with its holder."""
    out = _copy_study(tiny_reference[0], tmp_path / "results")
    (out / "trials" / "none-lr0.02-seed1.parquet").unlink()
    with plan.out_lock(out):
        assert sweep.main([*TINY, "--out", str(out), "--resume"]) == 2
        assert "another sweep is running in" in capsys.readouterr().err
    assert not (out / "trials" / "none-lr0.02-seed1.parquet").exists()
    with plan.out_lock(out):  # released: it can be taken again
        pass


def test_refuses_to_mix_studies(tiny_reference):
    out, _ = tiny_reference
    mtimes = {f: f.stat().st_mtime_ns for f in out.rglob("*.parquet")}
    same = run_sweep(*TINY, "--out", str(out), check=False)
    assert same.returncode == 2 and "--resume" in same.stderr
    other = run_sweep(*TINY[:-2], "--seeds", "5", "--out", str(out), check=False)
    assert other.returncode == 2 and "another grid of study" in other.stderr
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*.parquet")} == mtimes


@pytest.mark.parametrize("flag,value,message", [
    ("--norms", "groupnorm", "unknown norm"),
    ("--ps", "0.5", "p must be >= 1 or inf"),
    ("--groups", "3", "must divide every conv layer's channels"),
    ("--lrs", "-0.1", "learning rates must be > 0"),
    ("--lrs", "-1e-3,1e-2", "learning rates must be > 0"),  # a value, not an unknown flag
    ("--noises", "-1", "noise magnitudes must be >= 0"),
    ("--seeds", ",", "empty"),
    ("--seeds", "a,b", "not a comma-separated list"),
    ("--gpus", "-1", "must be >= 0"),
    ("--gpus", "4", "this machine has 0 GPUs"),
    ("--epochs", "0", "must be >= 1"),
    ("--dataset", "mnist", "mnist"),
    ("--dataset", "imagefolder:/nonexistent/tree", "does not exist"),
    ("--out", "/proc/forbidden/results", "cannot write"),
    ("--address", "127.0.0.1:1", "cannot reach a Ray cluster"),
    ("--subset", "2", "must be >= 3"),  # an empty validation split
    ("--norms", "batch,none,batch", "more than once"),
    ("--lrs", "1e-3,1.0000001e-3", "more than once"),  # the same trial id: lr0.001
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, flag, value, message):
    existing = tmp_path / "results"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    args = ["--dataset", "synthetic", "--subset", "50", "--epochs", "1", "--out", str(existing)]
    args += [flag, value]
    proc = subprocess.run([sys.executable, "-m", "study.sweep", *args], cwd=ROOT, timeout=120,
                          capture_output=True, text=True, env=sweep_env())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    workers = config["available_node_types"]["gpu_worker"]
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert workers["node_config"]["InstanceType"].startswith(("g5", "g6"))
    assert "127.0.0.1" in " ".join(config["head_start_ray_commands"])
    # MPS on the GPU nodes, started before Ray (its workers must find the daemon when they start)
    start = config["worker_start_ray_commands"]
    mps = next(i for i, c in enumerate(start) if "nvidia-cuda-mps-control -d" in c)
    assert mps < next(i for i, c in enumerate(start) if "ray start" in c)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a node whose GPUs CUDA cannot see")
def test_a_gpu_share_on_a_node_without_cuda_stops_the_study_in_one_line(tmp_path):
    """A head and a node with 2 fake GPUs (no CUDA); --gpus 2 --trials-per-gpu 2 → 0.5 GPU per
    trial, placed on the GPU node, where each trial finds no CUDA: it must not train on the CPU
    (it did, silently, as 'done'); the sweep stops with one line naming the node and the driver,
    exit 1, and writes no epoch of any trial.

    No --address, as on a `ray up` head node: the sweep finds the cluster running here."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    gpu_node = cluster.add_node(num_cpus=4, num_gpus=2)
    cluster.wait_for_nodes()
    try:
        out = tmp_path / "results"
        env = {k: v for k, v in sweep_env().items() if k != "RAY_ADDRESS"}
        proc = subprocess.run(
            [sys.executable, "-m", "study.sweep", "--norms", "batch,noisy_batch", "--noises", "1",
             "--seeds", "0,1", "--lrs", "0.02", "--epochs", "1", "--dataset", "synthetic",
             "--subset", "120", "--gpus", "2", "--trials-per-gpu", "2", "--out", str(out)],
            cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"joining the Ray cluster running on this machine at {cluster.address}" in proc.stdout
        errors = [line for line in proc.stderr.splitlines() if line.startswith("study.sweep: error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert "was given 0.5 of a GPU on node" in errors[0] and "finds no usable CUDA device" in errors[0]
        # the sweep's own lines carry no traceback (Ray forwards those of the trials it stops,
        # prefixed with their worker)
        own = [line for line in proc.stderr.splitlines() if "pid=" not in line]
        assert "NVIDIA driver:" in errors[0] and not any("Traceback" in line for line in own)
        trial_ids = {f.stem for f in (out / "trials").glob("*.parquet")}
        assert trial_ids, "the trial that met the node is recorded"
        for tid in trial_ids:
            row = results.read_table_file(results.table_path(out, "trials", tid)).to_pylist()[0]
            assert row["status"] == "error" and "no usable CUDA device" in row["error"]
            assert row["epochs_done"] == 0
            lines = (out / "tune" / "full" / tid / "result.json").read_text().splitlines()
            reported = json.loads(lines[-1])
            assert reported["node_id"] == gpu_node.node_id and reported["gpus"] == 0.5
        assert not list((out / "epochs").rglob("*.parquet")), "no trial trained on the CPU"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_no_stray_ray_processes_after_the_sweeps():
    """Local studies stop the Ray they started (the cluster test shuts its own down)."""
    mine = subprocess.run(["pgrep", "-f", "-P", str(os.getpid()), "raylet"], capture_output=True,
                          text=True)
    assert mine.stdout.strip() == ""


def test_a_dataset_too_small_to_split_is_refused_before_any_trial(tmp_path):
    """Two training images leave none to validate on: one message, no study written."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "tiny"
    for split, n in (("train", 2), ("test", 1)):
        (root / split / "cat").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / split / "cat" / f"{i}.png")
    out = tmp_path / "results"
    proc = run_sweep("--norms", "batch", "--seeds", "0", "--lrs", "0.01", "--epochs", "1",
                     "--dataset", f"imagefolder:{root}", "--out", str(out), check=False,
                     data_dir=tmp_path / "data")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "2 training image(s) leave 2 to train on and 0 to validate on" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "study.json").exists()
