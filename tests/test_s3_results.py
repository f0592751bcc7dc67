"""Results on S3, on a real S3 endpoint (moto's server on 127.0.0.1): the TINY study with --out
and --storage on s3://, its driver SIGKILLed mid-study and resumed, gives the tables of the
uninterrupted local run bit for bit; the analysis draws it from the URI with the same tables;
no local folder named after the URI appears."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import ROOT, TINY, assert_tables_equal, read_tables, run_sweep, sweep_cmd, sweep_env
from s3_server import s3_server

from study import storage

pytest.importorskip("moto")


@pytest.fixture()
def s3(monkeypatch):
    with s3_server() as server:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        storage._filesystem.cache_clear()  # a file system made for another endpoint
        yield server
    storage._filesystem.cache_clear()


def test_a_study_on_s3_killed_and_resumed_gives_the_local_runs_tables(s3, tiny_reference, tmp_path):
    ref_out, reference = tiny_reference
    out, tune = f"s3://{s3.bucket}/studies/tiny", f"s3://{s3.bucket}/tune"
    args = [*TINY, "--out", out, "--storage", tune]
    proc = subprocess.Popen(sweep_cmd(*args), cwd=ROOT, env=sweep_env(**s3.env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        # an epoch's rows: a running trial's part (epochs/TRIAL/epoch=0001.parquet) or a compacted file
        while not (storage.folder_names(f"{out}/epochs") or storage.file_names(f"{out}/epochs", ".parquet")):
            assert proc.poll() is None and time.time() < deadline, "no epoch reached S3"
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert storage.exists(f"{out}/.sweep-lock")  # the dead sweep's; the resume takes it over
    resumed = run_sweep(*args, "--resume", env=s3.env)
    assert "resuming 'full' from Tune's experiment in s3:" in resumed.stdout, resumed.stdout[-2000:]
    assert not storage.exists(f"{out}/.sweep-lock")

    figures = tmp_path / "figures"
    drawn = subprocess.run([*sweep_cmd()[:2], "analysis.figures", out, "--out", str(figures),
                           "--format", "png"],
                           cwd=tmp_path, env=sweep_env(**s3.env, XDG_CACHE_HOME=str(tmp_path / "cache")),
                           capture_output=True, text=True, timeout=300)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    copy = tmp_path / "cache" / "bnstudy" / "results" / "s3" / s3.bucket / "studies" / "tiny"
    assert_tables_equal(reference, read_tables(copy))
    local = tmp_path / "local-figures"
    subprocess.run([*sweep_cmd()[:2], "analysis.figures", str(ref_out), "--out", str(local),
                    "--format", "png"],
                   cwd=tmp_path, env=sweep_env(), check=True, capture_output=True, timeout=300)
    for table in ("accuracy_table.csv", "comparisons.csv"):
        assert (figures / table).read_bytes() == (local / table).read_bytes(), table
    assert not any(p.name.startswith("s3") for p in [*ROOT.iterdir(), *tmp_path.iterdir()])


def test_a_second_sweep_on_the_same_s3_folder_is_refused_while_the_first_runs(s3, tmp_path):
    out = f"s3://{s3.bucket}/busy"
    storage.write_bytes(f"{out}/.sweep-lock", (
        f'{{"host": "elsewhere", "pid": 1, "since": {time.time()}, "beat": {time.time()}}}').encode())
    proc = run_sweep(*TINY, "--out", out, check=False, env=s3.env, timeout=120)
    assert proc.returncode == 2
    assert "another sweep (pid 1 on elsewhere) is running in" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not storage.exists(f"{out}/study.json")


def test_an_unwritable_bucket_is_refused_in_one_line(s3):
    proc = run_sweep(*TINY, "--out", "s3://no-such-bucket/x", check=False, env=s3.env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("study.sweep: error: --out: cannot write to s3://no-such-bucket/x")
    assert proc.stderr.count("\n") == 1


def test_per_epoch_files_on_s3_are_compacted_and_leave_no_prefix_behind(s3):
    """The writer's per-epoch objects and their compaction on an object store (no rename, no
    folders): an epoch written again replaces its object, compaction leaves one object per
    table and nothing under the trial's prefix, and a second compaction changes nothing."""

    from study import epoch_parts, results

    out, tid = f"s3://{s3.bucket}/parts", "t"

    def epochs(*rows):
        return results.to_arrow("epochs", [dict(trial_id=tid, epoch=e, train_loss=v) for e, v in rows])

    for rows in ([(1, 1.0)], [(2, 2.0)], [(2, 0.5)]):
        epoch_parts.write_epoch_rows(out, "epochs", tid, epochs(*rows))
    assert sorted(epoch_parts.parts(out, "epochs", tid)) == [1, 2]
    assert storage.folder_names(f"{out}/epochs") == [tid]
    expected = epochs((1, 1.0), (2, 0.5))
    assert epoch_parts.read_trial_table(out, "epochs", tid).equals(expected)
    epoch_parts.compact_trial(out, tid)
    assert storage.folder_names(f"{out}/epochs") == [] and not epoch_parts.parts(out, "epochs", tid)
    data = storage.read_bytes(f"{out}/epochs/{tid}.parquet")
    assert results.read_table_file(f"{out}/epochs/{tid}.parquet").equals(expected)
    epoch_parts.compact_trial(out, tid)
    assert storage.read_bytes(f"{out}/epochs/{tid}.parquet") == data
