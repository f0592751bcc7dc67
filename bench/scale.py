"""Scale (issue 24): the results writer's cost per epoch report as a trial grows, the reports
one driver absorbs, and the analysis' time and peak memory as a study grows.

Every row goes through the real writer: made-up epochs of the ``full`` preset's size
(``analysis.synthetic.trial_records``: 2,500 step rows with every step column, 3 layers x 2
sites with 128-bin histograms and 5 weight rows, one epochs row) are pickled as a trial
pickles them and handed to ``ParquetWriterCallback.on_trial_result``, as Tune's driver does.

- Writer: two trials of 101 epochs each; the time of the report of epoch 1, 10, 30 and 100
  (the median of the two trials), and of the last report, which ends the trial.
- Studies: N trials of 10 epochs (no BN, BN, noisy BN at noise 0.5, 1, 2; lr 1e-3, 1e-2,
  5e-2; as many seeds as N needs), written through the writer (its reports per second are the
  reports ÷ the seconds spent inside ``on_trial_result``), then ``python -m analysis.figures``
  on the folder in a child process: its wall seconds and its peak RSS (``os.wait4``'s
  ``ru_maxrss`` of that child). 1,500 (where not measured) and 10,000 trials are extrapolated
  linearly from the measured points and printed as extrapolations.

One run each: the numbers move with other load on the machine (the load average is printed).
``--reuse`` analyses the studies already kept in ``--keep DIR`` again instead of writing them
(a 1,500-trial study takes ~10 minutes to write); ``--baseline CHECKOUT`` also analyses each
study with the analysis of another checkout (e.g. the commit before a change), in the same run.

    python bench/scale.py [--trials 75,300] [--writer-epochs 100] [--keep DIR [--reuse]]
                          [--baseline CHECKOUT]
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
from study.config import TrialConfig  # noqa: E402
from study.trainable import ROWS_KEY, ParquetWriterCallback  # noqa: E402

#: The full preset's shape, as bench/bench_analysis.py draws it.
VARIANTS = (("none", 0.0), ("batch", 0.0), ("noisy_batch", 0.5), ("noisy_batch", 1.0),
            ("noisy_batch", 2.0))
LRS = (1e-3, 1e-2, 5e-2)
STUDY_EPOCHS = 10
SIZES = dict(train=40000, val=10000, test=10000)
WRITER_TRIALS = 2
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
    writer = ParquetWriterCallback(str(folder), "scale", "synthetic", SIZES)
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


def write_study(folder: Path, n: int) -> dict:
    """Write a study of ``n`` trials through the writer; its reports per second and seconds."""
    writer = ParquetWriterCallback(str(folder), "scale", "synthetic", SIZES)
    rng = np.random.default_rng(0)
    points = grid(n)
    ids, in_writer, reports, t0 = [], 0.0, 0, time.perf_counter()
    for norm, noise, lr, seed in points:
        cfg = TrialConfig(norm=norm, noise=noise, lr=lr, seed=seed, epochs=STUDY_EPOCHS)
        ids.append(cfg.trial_id)
        for record in trial_records(norm, noise, lr, seed, epochs=STUDY_EPOCHS, rng=rng):
            in_writer += timed_report(writer, cfg, record)
            reports += 1
    # what the sweep writes, so that the analysis reads the planned trials as in a real study
    (folder / "study.json").write_text(json.dumps(dict(name="scale", preset={}, trial_ids=ids)))
    return dict(rate=reports / in_writer, writer_s=in_writer, total_s=time.perf_counter() - t0)


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
            folder = base / f"study-{n}"
            if args.reuse and (folder / "study.json").exists():
                written = None
            else:
                written = write_study(folder, n)
                print(f"  {n} trials: written in {written['total_s']:.0f} s ({written['writer_s']:.0f} s "
                      "in the writer)", flush=True)
            before = (analyse(folder, base / f"figures-{n}-baseline", args.baseline)
                      if args.baseline is not None else None)
            seconds, rss = analyse(folder, base / f"figures-{n}")
            rows.append((n, written, seconds, rss, before))
            print(f"  {n} trials: analysed in {seconds:.1f} s"
                  + (f" (baseline {before[0]:.1f} s)" if before else ""), flush=True)
            if args.keep is None:
                subprocess.run(["rm", "-rf", str(folder)], check=True)
        print(f"\nstudies of {STUDY_EPOCHS}-epoch trials; analysis = python -m analysis.figures:")
        extra = " | baseline analysis s | baseline peak RSS MB" if args.baseline else ""
        print(f"| trials | reports/s one driver absorbs | analysis s | analysis peak RSS MB{extra} |")
        print("| --- | --- | --- | ---" + (" | --- | ---" if args.baseline else "") + " |")
        for n, written, seconds, rss, before in rows:
            rate = f"{written['rate']:.1f}" if written else "(reused)"
            also = f" | {before[0]:.1f} | {before[1]:,.0f}" if before else ""
            print(f"| {n:,} | {rate} | {seconds:.1f} | {rss:,.0f}{also} |")
        if len(rows) >= 2:
            measured = [r[0] for r in rows]
            for at in [a for a in (1500, 10000) if a not in measured]:
                s = extrapolate(measured, [r[2] for r in rows], at)
                m = extrapolate(measured, [r[3] for r in rows], at)
                # a time that falls with the size is noise (other load), not a slope to follow
                shown = f"{s:.0f}" if s > max(r[2] for r in rows) else "(no rising slope measured)"
                print(f"| {at:,} (extrapolated) | | {shown} | {m:,.0f} |")
            print(f"\npeak RSS slope: {np.polyfit(measured, [r[3] for r in rows], 1)[0]:.2f} MB per trial "
                  "(extrapolations: a straight line through the measured sizes)")
            print(f"peak RSS at {rows[-1][0]:,} trials ÷ at {rows[0][0]:,}: {rows[-1][3] / rows[0][3]:.2f}"
                  + (f" (baseline {rows[-1][4][1] / rows[0][4][1]:.2f})" if args.baseline else ""))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
