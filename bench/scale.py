"""Scale (issue 24): the results writer's cost per epoch report as a trial grows, the reports
one driver absorbs, and the analysis' time and peak memory as a study grows.

Every row goes through the real writer: made-up epochs of the ``full`` preset's size
(``analysis.synthetic.trial_records``: 2,500 step rows with every step column, 3 layers x 2
sites with 128-bin histograms and 5 weight rows, one epochs row) are pickled as a trial
pickles them and handed to ``ParquetWriterCallback.on_trial_result``, as Tune's driver does.

- Writer: two trials of 101 epochs each; the time of the report of epoch 1, 10, 30 and 100
  (the median of the two trials), and of the last report, which ends the trial.
- Studies: N trials of 10 epochs (no BN, BN, noisy BN at noise 0.5, 1, 2; lr 1e-3, 1e-2,
  5e-2; as many seeds as N needs), their records made first, then handed to one driver's
  writer back to back three ways (issue 24, item 2): every row through the driver, each ended
  trial compacted on its thread; the same with compactions on the writer's worker thread; and
  each trial writing its own rows (``write_epoch_record`` and its compaction, as the trainable
  does where the results folder is shared storage; timed apart, per epoch) with only its status
  record reaching the driver. Reports per second one driver absorbs = reports ÷ the wall
  seconds of its loop and of the compactions it waits for at the end. Then
  ``python -m analysis.figures`` on the first way's folder in a child process: its wall seconds
  and its peak RSS (``os.wait4``'s ``ru_maxrss`` of that child). 1,500 (where not measured) and
  10,000 trials are extrapolated linearly from the measured points and printed as
  extrapolations.

One run each: the numbers move with other load on the machine (the load average is printed).
``--reuse`` analyses the studies already kept in ``--keep DIR`` again instead of writing them
(a 1,500-trial study takes ~10 minutes to write); ``--baseline CHECKOUT`` also analyses each
study with the analysis of another checkout (e.g. the commit before a change), in the same run.

    python bench/scale.py [--trials 75,300] [--writer-epochs 100] [--keep DIR [--reuse]]
                          [--baseline CHECKOUT] [--no-analysis]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.synthetic import trial_records  # noqa: E402
from study import epoch_parts  # noqa: E402
from study.config import TrialConfig  # noqa: E402
from study.results_writer import (  # noqa: E402
    ENDED,
    ROWS_KEY,
    ParquetWriterCallback,
    status_record,
    write_epoch_record,
)

#: The full preset's shape, as bench/bench_analysis.py draws it.
VARIANTS = (("none", 0.0), ("batch", 0.0), ("noisy_batch", 0.5), ("noisy_batch", 1.0),
            ("noisy_batch", 2.0))
LRS = (1e-3, 1e-2, 5e-2)
STUDY_EPOCHS = 10
SIZES = dict(train=40000, val=10000, test=10000)
WRITER_TRIALS = 2
#: Who writes a study's rows (write_study): the first is the one the analysis then reads.
ROWS_BY = ("driver", "driver-bg", "trial")
MARKS = (1, 10, 30, 100)


def timed_report(writer: ParquetWriterCallback, cfg: TrialConfig, record: dict) -> float:
    """Seconds ``writer`` takes to absorb one epoch report, as the driver receives it."""
    trial = SimpleNamespace(config={"trial": cfg.to_dict()})
    result = {ROWS_KEY: pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL),
              "hostname": "bench", "device": "cpu"}
    t0 = time.perf_counter()
    writer.on_trial_result(0, [], trial, result)
    return time.perf_counter() - t0


def writer_curve(folder: Path, epochs: int) -> dict:
    """Per-report seconds of ``WRITER_TRIALS`` trials of ``epochs`` + 1 epochs.

    Returns:
        ``per_epoch``: epoch -> median seconds over the trials (the trial still running);
        ``last``: the median seconds of the report that ends a trial; ``rate``: reports per
        second over every report.
    """
    writer = ParquetWriterCallback(str(folder), "scale", "synthetic", SIZES, compact_in_background=False)
    times: dict[int, list[float]] = {}
    rng = np.random.default_rng(1)
    for seed in range(WRITER_TRIALS):
        cfg = TrialConfig(norm="batch", lr=1e-2, seed=seed, epochs=epochs + 1)
        for record in trial_records("batch", 0.0, 1e-2, seed, epochs=epochs + 1, rng=rng):
            times.setdefault(record["epoch"]["epoch"], []).append(timed_report(writer, cfg, record))
    total = sum(sum(v) for v in times.values())
    return dict(per_epoch={e: statistics.median(v) for e, v in times.items() if e <= epochs},
                last=statistics.median(times[epochs + 1]),
                rate=sum(len(v) for v in times.values()) / total)


def grid(n: int) -> list[tuple[str, float, float, int]]:
    """The first ``n`` trials (norm, noise, lr, seed) of the full preset's shape, seeds 0, 1, ..."""
    per_seed = len(VARIANTS) * len(LRS)
    seeds = range(-(-n // per_seed))
    points = [(norm, noise, lr, s) for s in seeds for norm, noise in VARIANTS for lr in LRS]
    return points[:n]


def study_reports(n: int) -> list[tuple[TrialConfig, dict]]:
    """The records of a study of ``n`` trials of ``STUDY_EPOCHS`` epochs, trial after trial."""
    rng = np.random.default_rng(0)
    reports = []
    for norm, noise, lr, seed in grid(n):
        cfg = TrialConfig(norm=norm, noise=noise, lr=lr, seed=seed, epochs=STUDY_EPOCHS)
        reports.extend((cfg, r) for r in trial_records(norm, noise, lr, seed, epochs=STUDY_EPOCHS, rng=rng))
    return reports


def write_study(folder: Path, reports: list[tuple[TrialConfig, dict]], rows_by: str) -> dict:
    """Write a study through the writer as one driver would, its reports back to back; the
    reports per second it absorbs (reports ÷ the wall seconds of the loop, and of the
    background compactions it waits for at the end).

    ``rows_by``: ``driver`` (every row through the driver, each ended trial compacted on its
    thread), ``driver-bg`` (the same, compactions on the writer's worker thread) or ``trial``
    (each trial writes its own rows and compacts them, untimed, as it would on its own node;
    the driver gets the status records: the trial's seconds are reported apart)."""
    writer = ParquetWriterCallback(str(folder), "scale", "synthetic", SIZES,
                                   compact_in_background=rows_by == "driver-bg")
    blobs, trial_s = [], 0.0
    for cfg, record in reports:
        if rows_by == "trial":
            t0 = time.perf_counter()
            write_epoch_record(str(folder), cfg.trial_id, record)
            if record["status"] in ENDED:
                epoch_parts.compact_trial(str(folder), cfg.trial_id)
            trial_s += time.perf_counter() - t0
            record = status_record(record)
        blobs.append((cfg, pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)))
    t0 = time.perf_counter()
    for cfg, blob in blobs:
        writer.on_trial_result(0, [], SimpleNamespace(config={"trial": cfg.to_dict()}),
                               {ROWS_KEY: blob, "hostname": "bench", "device": "cpu"})
    loop_s = time.perf_counter() - t0
    writer.flush()
    driver_s = time.perf_counter() - t0
    ids = list(dict.fromkeys(cfg.trial_id for cfg, _ in reports))
    # what the sweep writes, so that the analysis reads the planned trials as in a real study
    (folder / "study.json").write_text(json.dumps(dict(name="scale", preset={}, trial_ids=ids)))
    return dict(rate=len(blobs) / driver_s, loop_rate=len(blobs) / loop_s, driver_s=driver_s,
                trial_ms=1000 * trial_s / len(blobs))


def analyse(folder: Path, out: Path, code: Path = ROOT) -> tuple[float, float]:
    """``python -m analysis.figures folder`` in a child process, with the analysis of the
    checkout ``code``: (wall seconds, peak RSS in MB)."""
    log = out.with_suffix(".log")
    with open(log, "w") as sink:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "analysis.figures", str(folder), "--out", str(out)],
                                cwd=code, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's
        seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"analysis.figures failed on {folder}:\n{log.read_text()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024  # Linux: kilobytes


def extrapolate(ns: list[int], values: list[float], at: int) -> float:
    """The straight line through the measured points (least squares; two points: through both) at ``at``."""
    slope, intercept = np.polyfit(ns, values, 1)
    return float(slope * at + intercept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", default="75,300", help="study sizes, comma-separated (default 75,300)")
    parser.add_argument("--writer-epochs", type=int, default=100,
                        help="the writer trials' length before their last report; 0: no writer "
                        "trials (default 100)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the studies here and keep them (default: a temporary folder)")
    parser.add_argument("--no-analysis", dest="analysis", action="store_false",
                        help="measure the writer and the driver only (the analysis columns read 0)")
    parser.add_argument("--reuse", action="store_true",
                        help="analyse a study already in --keep DIR again instead of writing it "
                        "(no reports/s for it)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="CHECKOUT",
                        help="also analyse each study with this checkout's analysis (before a change)")
    args = parser.parse_args(argv)
    if args.reuse and args.keep is None:
        parser.error("--reuse needs --keep DIR")
    ns = sorted({int(x) for x in args.trials.split(",")})
    marks = [m for m in MARKS if m <= args.writer_epochs]
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, load average at start "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scale-", dir="/tmp") as tmp:
        base = args.keep or Path(tmp)
        if marks:
            curve = writer_curve(base / "writer", args.writer_epochs)
            ms = {m: 1000 * curve["per_epoch"][m] for m in marks}
            print("\nwriter, ms per epoch report (median of "
                  f"{WRITER_TRIALS} trials of {args.writer_epochs + 1} epochs):")
            print("| " + " | ".join(f"epoch {m}" for m in marks) + " | last report (ends the trial) "
                  f"| epoch {marks[-1]} ÷ epoch 1 | reports/s over the trials |")
            print("| " + " | ".join("---" for _ in range(len(marks) + 3)) + " |")
            print("| " + " | ".join(f"{ms[m]:.1f}" for m in marks) + f" | {1000 * curve['last']:.1f} "
                  f"| {ms[marks[-1]] / ms[1]:.2f} | {curve['rate']:.1f} |", flush=True)

        rows = []
        for n in ns:
            folder = base / f"study-{n}-{ROWS_BY[0]}"
            drivers = None
            if not (args.reuse and (folder / "study.json").exists()):
                reports = study_reports(n)
                drivers = {}
                for rows_by in ROWS_BY:  # one study each way, in the same run: their ratios are the numbers
                    written = base / f"study-{n}-{rows_by}"
                    drivers[rows_by] = write_study(written, reports, rows_by)
                    print(f"  {n} trials, rows by {rows_by}: {drivers[rows_by]['rate']:.1f} reports/s "
                          f"({drivers[rows_by]['driver_s']:.1f} s in the driver)", flush=True)
                    if rows_by != ROWS_BY[0] and args.keep is None:
                        subprocess.run(["rm", "-rf", str(written)], check=True)
            before = (analyse(folder, base / f"figures-{n}-baseline", args.baseline)
                      if args.analysis and args.baseline is not None else None)
            seconds, rss = analyse(folder, base / f"figures-{n}") if args.analysis else (0.0, 0.0)
            rows.append((n, drivers, seconds, rss, before))
            print(f"  {n} trials: analysed in {seconds:.1f} s"
                  + (f" (baseline {before[0]:.1f} s)" if before else ""), flush=True)
            if args.keep is None:
                subprocess.run(["rm", "-rf", str(folder)], check=True)
        print(f"\nstudies of {STUDY_EPOCHS}-epoch trials, reports back to back; reports/s one driver "
              "absorbs (wall seconds, waiting for background compactions included) with the rows "
              "through it (compaction on its thread | on a worker thread) and with trials writing "
              "their own rows; analysis = python -m analysis.figures:")
        extra = " | baseline analysis s | baseline peak RSS MB" if args.baseline else ""
        print("| trials | rows through the driver | the same, compaction off its thread | rows written "
              "by the trials | trial-written ÷ through the driver | a trial's ms per epoch writing its "
              f"rows | analysis s | analysis peak RSS MB{extra} |")
        print("| --- " * (10 if args.baseline else 8) + "|")
        for n, d, seconds, rss, before in rows:
            writer = (f"{d['driver']['rate']:.1f} | {d['driver-bg']['rate']:.1f} | {d['trial']['rate']:.1f} "
                      f"| {d['trial']['rate'] / d['driver']['rate']:.1f} | {d['trial']['trial_ms']:.1f}"
                      if d else "(reused) | | | |")
            also = f" | {before[0]:.1f} | {before[1]:,.0f}" if before else ""
            print(f"| {n:,} | {writer} | {seconds:.1f} | {rss:,.0f}{also} |")
        if len(rows) >= 2 and args.analysis:
            measured = [r[0] for r in rows]
            for at in [a for a in (1500, 10000) if a not in measured]:
                s = extrapolate(measured, [r[2] for r in rows], at)
                m = extrapolate(measured, [r[3] for r in rows], at)
                # a time that falls with the size is noise (other load), not a slope to follow
                shown = f"{s:.0f}" if s > max(r[2] for r in rows) else "(no rising slope measured)"
                print(f"| {at:,} (extrapolated) | | | | | | {shown} | {m:,.0f} |")
            print(f"\npeak RSS slope: {np.polyfit(measured, [r[3] for r in rows], 1)[0]:.2f} MB per trial "
                  "(extrapolations: a straight line through the measured sizes)")
            print(f"peak RSS at {rows[-1][0]:,} trials ÷ at {rows[0][0]:,}: {rows[-1][3] / rows[0][3]:.2f}"
                  + (f" (baseline {rows[-1][4][1] / rows[0][4][1]:.2f})" if args.baseline else ""))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
