"""On this machine's CPUs: do two 1-thread trials at once beat one 2-thread trial?

Four long-lived worker processes each hold synthetic data and run the real
``study.train.run_trial`` (one epoch, norm batch, all statistics, batch 16) whenever the
driver says "go": W2 with ``threads=2``, W2p the same with ``OMP_WAIT_POLICY=PASSIVE``
(OpenMP threads sleep instead of spinning while they wait), W1a and W1b with ``threads=1``.
Per repetition, in rotating order: W2 alone; W1a and W1b together (released at the same
instant); W1a alone; W2p alone. Idle workers wait on a pipe and use no CPU. A trial's step loop is
timed through ``study.train.RunOptions.step_loop_context``; the aggregate of the pair is the images
of both over the span from the first start to the last end (and, beside it, the sum of the
two trials' own rates). Ratios are medians of the per-repetition ratios.

    python bench/cpu_threads.py [--reps 5] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import loadavg  # noqa: E402  (bench/ is on sys.path when run as a script)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(threads: int, steps: int, batch: int, device: str, cuda_graph: bool = False) -> int:
    """Child: wait for 'go' lines on stdin, answer one JSON line per trial (with CUDA graphs:
    two epochs, the second timed, so the captures are not)."""
    sys.path.insert(0, str(HERE))
    import throughput as tp
    import torch  # noqa: F401  (import before timing)

    from study.config import TrialConfig

    dev = torch.device(device)
    cfg = TrialConfig(norm="batch", batch_size=batch, epochs=2 if cuda_graph else 1, grad_every=1)
    data = tp.synthetic_with_train_size(steps * batch, cfg)
    small = tp.synthetic_with_train_size(5 * batch, cfg)
    kw = dict(cuda_graph=True) if cuda_graph else {}
    if cuda_graph:  # a failed capture falls back to eager: that must not pass for a graph number
        import warnings

        warnings.filterwarnings("error", message="CUDA graph capture failed", category=RuntimeWarning)
    tp.run_trial_window(small, cfg, dev, threads, **kw)  # warm-up: imports, allocator, thread pool
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        w = tp.run_trial_window(data, cfg, dev, threads, **kw)
        print(json.dumps(dict(ips=w.images_per_s, reported=w.extra["reported"], n=w.extra["images"],
                              cpu=w.cpu_util, t0=w.extra["loop_t0"], t1=w.extra["loop_t1"])),
              flush=True)
    return 0


class Worker:
    def __init__(self, threads: int, args: argparse.Namespace, env_extra: dict | None = None):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads", str(threads),
               "--steps", str(args.steps), "--batch", str(args.batch), "--device", args.device]
        if getattr(args, "cuda_graph", False):
            cmd.append("--cuda-graph")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), **(env_extra or {}))
        self.threads = threads
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=ROOT, env=env)

    def wait_ready(self) -> None:
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"worker ({self.threads} threads) failed to start: {line!r}")

    def go(self) -> None:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def result(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker ({self.threads} threads) died")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.close()
            self.p.wait(timeout=30)
        except Exception:
            self.p.kill()


def run_together(workers: list[Worker]) -> tuple[float, float, list[dict]]:
    """Release the workers at once; (span aggregate images/s, sum of their rates, results)."""
    for w in workers:
        w.go()
    res = [w.result() for w in workers]
    span = max(r["t1"] for r in res) - min(r["t0"] for r in res)
    return sum(r["n"] for r in res) / span, sum(r["ips"] for r in res), res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100, help="steps per trial epoch")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--cuda-graph", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.threads, args.steps, args.batch, args.device, args.cuda_graph)

    print(f"cpu_threads: {os.cpu_count()} CPUs, run_trial (norm batch, all statistics), batch "
          f"{args.batch}, {args.steps} steps per trial, {args.reps} reps, synthetic data; "
          f"load average at start {loadavg()}", flush=True)
    w2, w1a, w1b = Worker(2, args), Worker(1, args), Worker(1, args)
    w2p = Worker(2, args, {"OMP_WAIT_POLICY": "PASSIVE"})
    everyone = (w2, w2p, w1a, w1b)
    try:
        for w in everyone:
            w.wait_ready()
        modes = {
            "one 2-thread trial": [w2],
            "two 1-thread trials at once": [w1a, w1b],
            "one 1-thread trial alone": [w1a],
            "one 2-thread, OMP passive": [w2p],
        }
        keys = list(modes)
        agg: dict[str, list[float]] = {k: [] for k in keys}
        summed: dict[str, list[float]] = {k: [] for k in keys}
        per_trial: dict[str, list[float]] = {k: [] for k in keys}
        t_start = time.perf_counter()
        for rep in range(args.reps):
            order = keys[rep % len(keys):] + keys[: rep % len(keys)]
            for k in order:
                span_ips, sum_ips, res = run_together(modes[k])
                agg[k].append(span_ips if len(res) > 1 else res[0]["ips"])
                summed[k].append(sum_ips)
                per_trial[k] += [r["ips"] for r in res]
            print(f"  rep {rep + 1}/{args.reps} ({time.perf_counter() - t_start:.0f} s, load "
                  f"{loadavg()})", flush=True)
    finally:
        for w in everyone:
            w.close()

    def med(v: list[float]) -> str:
        return f"{statistics.median(v):8.1f} [{min(v):.1f}-{max(v):.1f}]"

    print(f"\nload average at end {loadavg()}")
    print(f"{'':<30}{'aggregate images/s':>28}{'sum of trial rates':>28}{'per trial':>26}")
    for k in keys:
        print(f"{k:<30}{med(agg[k]):>28}{med(summed[k]):>28}{med(per_trial[k]):>26}")
    two, one2 = agg["two 1-thread trials at once"], agg["one 2-thread trial"]
    r = [a / b for a, b in zip(two, one2, strict=True)]
    print(f"\nratio (two 1-thread trials at once) / (one 2-thread trial), aggregate images/s: "
          f"{statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]")
    s = [a / b for a, b in zip(one2, agg["one 1-thread trial alone"], strict=True)]
    print(f"2-thread speed-up of one trial over 1 thread: {statistics.median(s):.3f} "
          f"[{min(s):.3f}-{max(s):.3f}]")
    p = [a / b for a, b in zip(two, agg["one 2-thread, OMP passive"], strict=True)]
    print(f"ratio (two 1-thread trials at once) / (one 2-thread trial with OMP_WAIT_POLICY=PASSIVE): "
          f"{statistics.median(p):.3f} [{min(p):.3f}-{max(p):.3f}]")
    verdict = "yes" if statistics.median(r) > 1 else "no"
    print(f"two 1-thread trials beat one 2-thread trial in aggregate: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
