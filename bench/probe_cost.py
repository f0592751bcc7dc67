"""Cost of Santurkar et al.'s probes: one trial with ``probe_every`` 0 and N, the ratio of times.

Runs ``run_trial`` on the synthetic dataset (``--subset`` images per split; 80% of the train
split is trained on), batch 16, ``--norm`` (batch by default), the default 8-point step-size
grid, ``--epochs`` epochs, without probes and with ``--probe-every`` (100 by default), after a
short warm-up trial; ``--repeats`` runs the pair again (in alternating order) and keeps each
one's fastest. Prints both trials' wall time (training plus evaluation, as the trial reports
it), their training-loop time and this process's CPU time, and the ratios with ÷ without (goal
≤ 1.15). On a busy machine wall times swing; with ``--threads 1`` the CPU time swings less.

    python bench/probe_cost.py [--subset 5000] [--probe-every 100] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from study.config import TrialConfig  # noqa: E402
from study.data import load_dataset  # noqa: E402
from study.train import RunOptions, run_trial  # noqa: E402

GOAL = 1.15


def timed(cfg: TrialConfig, data, device: str | None, threads: int | None) -> tuple:
    """(trial wall s, training-loop s, trial CPU s of this process, probe rows) of one trial."""
    rows = []
    t0, c0 = time.perf_counter(), time.process_time()
    summary = run_trial(cfg, data, lambda r, s: rows.extend(r.get("probes", [])),
                        options=RunOptions(device=device, threads=threads))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    train = sum(h["steps"] * cfg.batch_size / h["images_per_s"] for h in summary["history"])
    return wall, train, cpu, len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subset", type=int, default=5000, help="synthetic images per split (default 5000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--probe-every", type=int, default=100)
    p.add_argument("--norm", default="batch")
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1,
                   help="run the pair this many times, alternating, and take each one's fastest")
    a = p.parse_args(argv)

    data = load_dataset("synthetic", subset=a.subset, log=lambda m: None)
    base = dict(norm=a.norm, noise=a.noise, lr=a.lr, epochs=a.epochs, batch_size=16)
    timed(TrialConfig(**dict(base, epochs=1)), load_dataset("synthetic", subset=200), a.device, a.threads)
    offs, ons = [], []
    for r in range(a.repeats):  # alternate which goes first, so that order effects cancel
        for probes in ((0, a.probe_every) if r % 2 == 0 else (a.probe_every, 0)):
            (ons if probes else offs).append(
                timed(TrialConfig(**base, probe_every=probes), data, a.device, a.threads))
        print(f"  pair: without {offs[-1][0]:.2f} s, with {ons[-1][0]:.2f} s "
              f"(CPU {offs[-1][2]:.2f} s, {ons[-1][2]:.2f} s)", flush=True)
    off, on = (tuple(min(c) for c in zip(*t, strict=True)) for t in (offs, ons))
    n_train = round(len(data.train_y) * 0.8)
    print(f"{a.norm}, {n_train} training images × {a.epochs} epoch(s), batch 16, "
          f"probe every {a.probe_every} steps ({on[3] // 5} probes, 8 step sizes), "
          f"device {a.device or 'auto'}")
    print(f"  without probes: trial {off[0]:.2f} s, training loop {off[1]:.2f} s, CPU {off[2]:.2f} s")
    print(f"  with probes:    trial {on[0]:.2f} s, training loop {on[1]:.2f} s, CPU {on[2]:.2f} s")
    ratio, loop_ratio, cpu_ratio = on[0] / off[0], on[1] / off[1], on[2] / off[2]
    print(f"ratio with ÷ without: trial {ratio:.3f}, training loop {loop_ratio:.3f}, "
          f"process CPU time {cpu_ratio:.3f} "
          f"(goal ≤ {GOAL}: {'met' if ratio <= GOAL else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
