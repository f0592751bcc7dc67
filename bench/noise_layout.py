"""What noisy BatchNorm's layout choice gains on a CPU: noise in the input's layout ÷ in NCHW.

A CPU trial runs the model channels-last. ``NoisyBatchNorm2d.draw`` draws its per-element
noise in (N, C, H, W) order (so a seed gives the same noise in any layout) and hands it over
as channels-last copies. The alternative it replaced left the noise in NCHW: ``s * a + m``
then mixes layouts, and its NCHW output goes on to ReLU, max-pool and the next convolution.
This times run_trial's step (the replica in ``throughput.py``, every statistic on) three
ways, interleaved (turns of 5 steps), and prints the ratios of their speeds:

  noisy BN as it is  ·  noisy BN with the noise left in NCHW  ·  plain BN (what the noise costs)

    python bench/noise_layout.py
    python bench/noise_layout.py --noise 2 --scope layer
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import ReplicaStep, interleaved, ratio_of_means, synthetic_with_train_size  # noqa: E402

from study.config import TrialConfig  # noqa: E402
from study.model import NoisyBatchNorm2d  # noqa: E402

PARTS = {"data", "moments", "hist", "grads", "book"}


def draw_nchw(self: NoisyBatchNorm2d, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same draws, left in NCHW whatever ``a``'s layout (the replaced behaviour)."""
    s, m = NoisyBatchNorm2d.draw(self, a)
    return s.contiguous(), m.contiguous()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--scope", default="channel", choices=("channel", "layer"))
    ap.add_argument("--rounds", type=int, default=60, help="interleaved rounds of 5 steps each")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    noisy = TrialConfig(norm="noisy_batch", noise=args.noise, noise_scope=args.scope, epochs=1)
    plain = TrialConfig(norm="batch", epochs=1)
    data = synthetic_with_train_size(1600, noisy)
    steppers = {}
    for name, cfg in (("noisy BN, noise in the input's layout", noisy),
                      ("noisy BN, noise left in NCHW", noisy), ("BN", plain)):
        rep = ReplicaStep(data, cfg, dev, PARTS, capacity=10**5)
        if "NCHW" in name:
            for layer in rep.model.noisy_layers():
                layer.draw = types.MethodType(draw_nchw, layer)
        steppers[name] = rep.step
    print(f"noise_layout: batch 16, {args.threads} torch thread(s), noise {args.noise:g} ({args.scope}), "
          f"{args.rounds} interleaved rounds of 5 steps, torch {torch.__version__}", flush=True)
    times = interleaved(steppers, rounds=args.rounds, chunk=5)
    ref = times["noisy BN, noise in the input's layout"]
    for name, t in times.items():
        print(f"  {name:<40}{t.mean() * 1e3:7.2f} ms a step  ({16 / t.mean():6.0f} images/s)")
    r, lo, hi = ratio_of_means(ref, times["noisy BN, noise left in NCHW"])
    print(f"  input's layout ÷ NCHW (speed)          {r:.3f} [95% CI {lo:.3f}-{hi:.3f}]")
    r, lo, hi = ratio_of_means(ref, times["BN"])
    print(f"  noisy BN ÷ BN (speed)                  {r:.3f} [95% CI {lo:.3f}-{hi:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
