"""Real faults against real Ray, each compared bit for bit with an uninterrupted run.

A killed trial worker, a killed driver, a lost node, an unreadable checkpoint and a diverged
trial. Every test bounds its own time and leaves no Ray processes behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from study import epoch_parts, results
from tests.conftest import ROOT, assert_tables_equal, read_tables, run_sweep, sweep_cmd, sweep_env

#: Long enough epochs (50 steps) that a kill lands mid-trial, short enough for CI.
FAULT = ["--norms", "none,batch", "--seeds", "0", "--lrs", "0.02", "--epochs", "3",
         "--dataset", "synthetic", "--subset", "1000", "--max-failures", "3", "--name", "fault"]
TIMINGS: dict[str, float] = {}


def wait_for(predicate, timeout: float, what: str, poll: float = 0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def reported(out: Path) -> list[dict]:
    """Every result line Tune wrote so far, across trials (each has the trial's pid)."""
    rows = []
    for f in (out / "tune" / "fault").glob("*/result.json"):
        for line in f.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line being written
                    pass
    return rows


@pytest.fixture(scope="module")
def fault_reference(tmp_path_factory) -> dict[str, pd.DataFrame]:
    out = tmp_path_factory.mktemp("fault-ref") / "results"
    t0 = time.time()
    run_sweep(*FAULT, "--out", str(out))
    TIMINGS["uninterrupted"] = time.time() - t0
    return read_tables(out)


def sweep_killing_a_worker(args: list[str], out: Path) -> tuple[int, str, dict]:
    """Run the sweep, SIGKILL the worker of the first trial to checkpoint an epoch, let the
    sweep end: (exit status, its output, that trial's first reported result)."""
    proc = subprocess.Popen(sweep_cmd(*args, "--out", str(out)), cwd=ROOT, env=sweep_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = wait_for(lambda: [r for r in reported(out) if r.get("epoch") == 1], 180,
                         "a trial's first checkpoint")[0]
        os.kill(first["pid"], signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, output, first


def test_killed_trial_worker_is_retried_from_its_checkpoint(tmp_path, fault_reference):
    out = tmp_path / "results"
    t0 = time.time()
    code, output, first = sweep_killing_a_worker(FAULT, out)
    TIMINGS["worker killed"] = time.time() - t0
    assert code == 0, output[-3000:]
    after = read_tables(out)
    assert_tables_equal(fault_reference, after)
    killed = [r for r in reported(out) if r["trial_id"] == first["trial_id"]]
    assert len({r["pid"] for r in killed}) == 2  # it really ran in a second process


def test_a_killed_trial_that_writes_its_own_rows_is_retried_with_whole_epochs_only(tmp_path, fault_reference):
    """--shared-out: the trial writes its rows itself, so the kill may land between its writes
    of an epoch; the retry from its checkpoint replaces that epoch's parts and the study equals
    the reference (rows through the driver), with no epoch twice and nothing left in parts."""
    out = tmp_path / "results"
    code, output, first = sweep_killing_a_worker([*FAULT, "--shared-out"], out)
    assert code == 0, output[-3000:]
    assert_tables_equal(fault_reference, read_tables(out))
    killed = [r for r in reported(out) if r["trial_id"] == first["trial_id"]]
    assert len({r["pid"] for r in killed}) == 2
    assert not [p for p in (out / "steps").iterdir() if p.is_dir()]


def test_a_trial_out_of_retries_errors_and_resume_retries_it_from_its_checkpoint(tmp_path,
                                                                                fault_reference):
    """--max-failures 0 and a killed worker: the trial errors, the sweep exits 1 and says how to
    retry; --resume restarts it from its last checkpoint and the study equals the reference."""
    out = tmp_path / "results"
    no_retries = [*FAULT[:FAULT.index("--max-failures")], "--max-failures", "0",
                  *FAULT[FAULT.index("--max-failures") + 2:]]
    code, output, _ = sweep_killing_a_worker(no_retries, out)
    assert code == 1, output[-3000:]
    assert "1 errored" in output and "1 trial(s) failed, out of retries" in output
    assert "rerun the same command with --resume to retry them" in output
    statuses = sorted(pd.read_parquet(f)["status"].item() for f in (out / "trials").glob("*.parquet"))
    assert statuses == ["done", "error"]
    resumed = run_sweep(*no_retries, "--out", str(out), "--resume")
    assert "resuming 'fault' from Tune's experiment" in resumed.stdout
    assert_tables_equal(fault_reference, read_tables(out))


def test_killed_driver_resumes_in_a_moved_folder_without_loss_or_duplicates(tmp_path, fault_reference):
    out = tmp_path / "results"
    t0 = time.time()
    proc = subprocess.Popen(sweep_cmd(*FAULT, "--out", str(out)), cwd=ROOT, env=sweep_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: len(list((out / "epochs").rglob("*.parquet"))) >= 1, 180,
                 "the first epoch in the Parquet files")
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    # the user moves the folder before resuming: Tune's experiment (under it) says where the
    # study was; results must go where --out says now
    moved = tmp_path / "moved"
    out.rename(moved)
    before = {f.relative_to(moved): f.read_bytes() for f in moved.glob("epochs/**/*.parquet")}
    before_rows = pd.concat([pd.read_parquet(moved / f) for f in before]).drop(
        columns=["wall_s", "images_per_s"])
    proc = run_sweep(*FAULT, "--out", str(moved), "--resume")
    TIMINGS["driver killed"] = time.time() - t0
    assert "resuming 'fault' from Tune's experiment" in proc.stdout, proc.stdout[-2000:]
    assert not out.exists()
    after = read_tables(moved)
    assert_tables_equal(fault_reference, after)
    # rows written before the kill are still there, with the same numbers
    merged = before_rows.merge(after["epochs"], on=["trial_id", "epoch"], suffixes=("", "_after"))
    assert len(merged) == len(before_rows)
    for col in ("train_loss", "val_acc", "test_acc"):
        assert (merged[col] == merged[f"{col}_after"]).all()


def test_ctrl_c_stops_with_a_resume_hint_and_resume_finishes(tmp_path, fault_reference):
    """Ctrl-C in a terminal (SIGINT to the sweep's process group): Tune saves its state and
    the sweep says the study is unfinished, exits 130, and --resume gives the reference. Ray
    gets one CPU, so one trial runs and the other has not started: as in any study with more
    trials than slots, --resume must still restore Tune's experiment and its checkpoints."""
    out = tmp_path / "results"
    one_slot = {"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 1})}
    proc = subprocess.Popen(sweep_cmd(*FAULT, "--out", str(out)), cwd=ROOT, env=sweep_env(**one_slot),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: [r for r in reported(out) if r.get("epoch") == 1], 180,
                 "a trial's first checkpoint")
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, output[-3000:]
    assert "unfinished; continue with the same command and --resume" in output
    assert "Traceback" not in output
    assert "Tuner.restore" not in output and "Failed to fetch metrics" not in output  # Tune's notes
    assert "stopped with 2 of the study's 2 trials unfinished" in output  # one never started
    proc = run_sweep(*FAULT, "--out", str(out), "--resume", env=one_slot)
    assert "resuming 'fault' from Tune's experiment" in proc.stdout, proc.stdout[-3000:]
    assert "(2 in this run)" in proc.stdout
    assert_tables_equal(fault_reference, read_tables(out))


def test_lost_node_trials_move_and_finish_with_the_same_numbers(tmp_path, fault_reference):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    out = tmp_path / "results"
    proc = subprocess.Popen(sweep_cmd(*FAULT, "--out", str(out), "--address", cluster.address),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: [r for r in reported(out) if r.get("epoch") == 1], 180,
                 "a trial's first checkpoint on the worker node")
        cluster.remove_node(worker)  # its raylet and trial processes die
        time.sleep(2)
        replacement = cluster.add_node(num_cpus=2)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
        nodes = {r["node_id"] for r in reported(out)}
        assert nodes == {worker.node_id, replacement.node_id}
    finally:
        proc.kill()
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    assert_tables_equal(fault_reference, read_tables(out))


def test_unreadable_checkpoint_restarts_the_trial_with_a_log_line(tmp_path, caplog):
    import torch
    from ray import tune

    from study.trainable import STATE_FILE, load_checkpoint_state

    good = tmp_path / "good"
    good.mkdir()
    torch.save({"epoch": 1}, good / STATE_FILE)
    assert load_checkpoint_state(tune.Checkpoint.from_directory(str(good))) == {"epoch": 1}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / STATE_FILE).write_bytes((good / STATE_FILE).read_bytes()[:40])  # truncated
    with caplog.at_level("WARNING"):
        assert load_checkpoint_state(tune.Checkpoint.from_directory(str(bad))) is None
    assert "unreadable" in caplog.text and "from scratch" in caplog.text


def test_stray_temporary_parquet_file_is_ignored(tmp_path):
    from analysis.load import load_study

    out = tmp_path / "results"
    row = dict(trial_id="batch-lr0.01-seed0", study="t", norm="batch", noise=0.0, lr=0.01,
               seed=0, epochs=1, dataset="synthetic", status="done", epochs_done=1)
    results.write_trial_row(out, row)
    epoch_parts.write_epoch_rows(out, "epochs", row["trial_id"], results.to_arrow("epochs", [
        dict(trial_id=row["trial_id"], epoch=1, train_acc=0.5, test_acc=0.5, val_acc=0.5)]))
    (out / "epochs" / ".batch-lr0.01-seed0.abc123.tmp").write_bytes(b"PAR1 half a file")
    study = load_study(out)
    assert len(study.epochs) == 1


def test_diverged_trial_keeps_its_rows_and_is_not_retried(tmp_path):
    out = tmp_path / "results"
    run_sweep("--norms", "none", "--seeds", "0", "--lrs", "500", "--epochs", "2", "--dataset",
              "synthetic", "--subset", "300", "--name", "fault", "--out", str(out))
    tables = read_tables(out)
    (trial,) = tables["trials"].itertuples()
    assert trial.status == "diverged"
    assert len(tables["epochs"]) >= 1 and tables["epochs"].diverged.iloc[-1]
    assert len(tables["steps"]) >= 1
    lines = reported(out)
    assert len({r["pid"] for r in lines}) == 1  # one process: no retry
    assert not list((out / "tune" / "fault").glob("*/error.txt"))


def test_report_fault_costs(fault_reference):
    """Not an assertion on time: prints what a fault cost (run with -s to see it)."""
    base = TIMINGS.get("uninterrupted")
    for name in ("worker killed", "driver killed"):
        if base and name in TIMINGS:
            print(f"\nfault cost, {name}: {TIMINGS[name]:.1f} s ÷ {base:.1f} s = "
                  f"{TIMINGS[name] / base:.2f}")
