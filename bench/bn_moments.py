"""What taking BN layers' moments from their batch statistics gains: derived ÷ reduced.

A BatchNorm layer in training mode computes each channel's mean and variance of its input;
``study.stats`` derives the conv output's moments (and plain BN's output's) from them
instead of reducing the tensors again (``study.model.BatchStats``). The alternative it
replaced summed every tap: a sum and a dot over each conv output and each ReLU input, 12
reductions a step. This times run_trial's step (the replica in ``throughput.py``, every
statistic on, the trial's layout) both ways, for plain and noisy BN, interleaved in turns of
5 steps, and prints the ratios of their speeds with 95% bootstrap intervals.

    python bench/bn_moments.py              # CPU only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import ReplicaStep, interleaved, ratio_of_means, synthetic_with_train_size  # noqa: E402

from study.config import TrialConfig  # noqa: E402
from study.stats import EpochStats, TapReducer  # noqa: E402

PARTS = {"data", "moments", "hist", "grads", "book"}


class ReducedTaps(TapReducer):
    """Taps whose BN statistics are dropped, so that every tap is reduced (the replaced way)."""

    def append(self, tap: tuple) -> None:
        super().append(tuple(tap[:2]))


def reducing_every_tap(rep: ReplicaStep) -> ReplicaStep:
    """``rep`` with statistics that reduce every tap, as before BN's statistics were used."""
    old = rep.stats
    stats = EpochStats(old.n_steps, old.n_params, old.weight_idx, old.bins, old.hi, rep.dev)
    stats.tap_reducer = lambda hist: ReducedTaps(stats, hist)
    rep.stats = stats
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=150, help="interleaved rounds of 5 steps each")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    configs = {"BN": TrialConfig(norm="batch", epochs=1),
               "noisy BN": TrialConfig(norm="noisy_batch", noise=1.0, epochs=1)}
    data = synthetic_with_train_size(1600, configs["BN"])
    print(f"bn_moments: batch 16, cpu, {args.threads} torch thread(s), {args.rounds} "
          f"interleaved rounds of 5 steps per variant, torch {torch.__version__}", flush=True)
    for label, cfg in configs.items():  # two at a time: four replicas would crowd the caches
        derived, reduced = f"{label}, moments from BN statistics", f"{label}, every tap reduced"
        times = interleaved({derived: ReplicaStep(data, cfg, dev, PARTS, 10**5).step,
                             reduced: reducing_every_tap(ReplicaStep(data, cfg, dev, PARTS, 10**5)).step},
                            rounds=args.rounds, chunk=5)
        for name, t in times.items():
            print(f"  {name:<42}{t.mean() * 1e3:7.3f} ms a step  ({16 / t.mean():6.0f} images/s)")
        r, lo, hi = ratio_of_means(times[derived], times[reduced])
        print(f"  {label}: derived ÷ reduced (speed){'':<{28 - len(label)}}{r:.3f} "
              f"[95% CI {lo:.3f}-{hi:.3f}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
