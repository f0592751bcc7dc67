"""What each norm variant's training step costs on a CPU, as a ratio to BN's step.

Times run_trial's step (the replica in ``throughput.py``: augmentation, forward with taps,
backward, every statistic, the optimiser step; channels-last; batch 16) for every variant of
the ``norms`` preset (noisy BN at noise 1 in each noise scope), interleaved in turns of 5
steps so that a machine whose speed drifts slows them all alike, and prints each mean step
time ÷ BN's, with a 95% bootstrap interval over the rounds:

    python bench/norm_cost.py
    python bench/norm_cost.py --rounds 40 --threads 1
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import loadavg  # noqa: E402
from throughput import ReplicaStep, interleaved, ratio_of_means, synthetic_with_train_size  # noqa: E402

from study.config import TrialConfig  # noqa: E402

PARTS = {"data", "moments", "hist", "grads", "book"}  # every statistic, as run_trial records them
#: The variants timed, by the label printed: the norms preset's, and noisy BN's other scopes.
VARIANTS = {
    "BN": dict(norm="batch"),
    "no BN": dict(norm="none"),
    "noisy BN (channel)": dict(norm="noisy_batch", noise=1.0, noise_scope="channel"),
    "noisy BN (layer)": dict(norm="noisy_batch", noise=1.0, noise_scope="layer"),
    "noisy BN (sample_channel)": dict(norm="noisy_batch", noise=1.0, noise_scope="sample_channel"),
    "l1 BN": dict(norm="lp_batch", p=1.0),
    "l2 BN": dict(norm="lp_batch", p=2.0),
    "linf BN": dict(norm="lp_batch", p=math.inf),
    "GN (8 groups)": dict(norm="group", groups=8),
    "LN": dict(norm="layer"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40, help="interleaved rounds of 5 steps each")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    configs = {name: TrialConfig(epochs=1, **v) for name, v in VARIANTS.items()}
    data = synthetic_with_train_size(1600, configs["BN"])
    steppers = {name: ReplicaStep(data, cfg, dev, PARTS, capacity=10**5).step
                for name, cfg in configs.items()}
    print(f"norm_cost: batch 16, {args.threads} torch thread(s), every statistic, channels-last, "
          f"{args.rounds} interleaved rounds of 5 steps, torch {torch.__version__}, load {loadavg()}",
          flush=True)
    times = interleaved(steppers, rounds=args.rounds, chunk=5)
    print(f"  {'variant':<28}{'ms a step':>10}  step time ÷ BN's [95% CI]")
    for name, t in times.items():
        r, lo, hi = ratio_of_means(times["BN"], t)  # t's mean ÷ BN's mean
        print(f"  {name:<28}{t.mean() * 1e3:10.2f}  {r:.3f} [{lo:.3f}-{hi:.3f}]")
    print(f"load at the end {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
