"""What Ray Tune costs: the smoke sweep's wall time ÷ the same 6 trials run by run_trial directly.

  sweep  ``python -m study.sweep --preset smoke --dataset synthetic --out TMP`` (a local Ray,
         2 trials at a time on 2 CPUs, 1 torch thread each, Parquet results, a checkpoint
         per epoch; Tune reuses a finished trial's worker process for the next trial)
  fresh  the same sweep with Tune's actor reuse off (``reuse_actors=False``): every trial
         starts a new worker process
  plain  ``python bench/ray_overhead.py --plain``: the same process start, the same dataset
         (``load_dataset("synthetic", subset=3000)``), the same TrialConfigs
         (``build_grid(PRESETS["smoke"])``), run by ``run_trial`` with 1 thread in a pool of 2
         worker processes (spawn), so 2 trials at a time as in the sweep; nothing written

All are timed as whole commands (interpreter start to exit), alternated ABBA over the
repetitions so that drift in the machine's load weighs on both alike; the CPU seconds of each
command's process tree (Ray's daemons and workers included, sampled from /proc) are shown
too. The ratio is the median of the per-repetition ratios; the goal is <= 1.3.

    python bench/ray_overhead.py [--reps 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _common import loadavg  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.3
PRESET = "smoke"
CONCURRENCY = 2


def _one_trial(cfg_dict: dict, data) -> tuple[str, str, float]:
    from study.config import TrialConfig
    from study.train import RunOptions, run_trial

    cfg = TrialConfig.from_dict(cfg_dict)
    out = run_trial(cfg, data, options=RunOptions(device="cpu", threads=1))
    return cfg.trial_id, out["status"], out["wall_s"]


def sweep_without_actor_reuse(argv: list[str]) -> int:
    """``study.sweep`` with every trial in a new worker process (Tune's ``reuse_actors`` off)."""
    sys.path.insert(0, str(ROOT))
    from ray import tune

    tune_config = tune.TuneConfig

    def without_reuse(*args, **kwargs):
        return tune_config(*args, **{**kwargs, "reuse_actors": False})

    tune.TuneConfig = without_reuse
    from study import sweep

    return sweep.main(argv)


def plain(concurrency: int) -> int:
    """The 6 smoke trials without Ray: run_trial in a pool of ``concurrency`` processes."""
    import multiprocessing

    sys.path.insert(0, str(ROOT))
    from study.data import load_dataset
    from study.grid import PRESETS, build_grid

    p = PRESETS[PRESET]
    grid = build_grid(p)
    data = load_dataset("synthetic", subset=p.subset, log=lambda s: None)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(concurrency, mp_context=ctx) as pool:
        futures = [pool.submit(_one_trial, c.to_dict(), data) for c in grid]
        for f in futures:
            tid, status, wall = f.result()
            print(f"  plain: {tid} {status} {wall:.1f} s", flush=True)
    return 0


class TreeCPU:
    """CPU seconds of a process and all its descendants, also those that a daemon re-parents
    (Ray's raylet and workers are not reaped by the command, so RUSAGE_CHILDREN misses them):
    /proc is sampled every ``every`` seconds; a process once seen in the tree stays counted with
    its last sampled CPU time. Processes living shorter than one sample are missed."""

    def __init__(self, root_pid: int, every: float = 0.25):
        self.root, self.every = root_pid, every
        self.members: set[int] = {root_pid}
        self.cpu: dict[int, float] = {}
        self.tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        stats = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[0] is the state (stat field 3): ppid is field 4, utime 14, stime 15
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self.tick)
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _) in stats.items():
                if ppid in self.members and pid not in self.members:
                    self.members.add(pid)
                    grew = True
        for pid in self.members:
            if pid in stats:
                self.cpu[pid] = stats[pid][1]

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.cpu.values())


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the command's whole process tree, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    tree = TreeCPU(proc.pid)
    stdout, stderr = proc.communicate(timeout=1800)
    wall = time.perf_counter() - t0
    time.sleep(2 * tree.every)  # the daemons of a Ray that is shutting down: one more sample
    cpu = tree.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout[-3000:]}\n"
                           f"{stderr[-3000:]}")
    return wall, cpu, stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each (ABBA order)")
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fresh", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain:
        return plain(CONCURRENCY)
    if args.fresh is not None:
        return sweep_without_actor_reuse(args.fresh)

    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    print(f"ray_overhead: smoke preset (6 trials, 2 epochs, synthetic subset 3000), {os.cpu_count()} "
          f"CPUs, {CONCURRENCY} trials at a time, 1 torch thread each; {args.reps} reps, ABBA; load "
          f"average at start {loadavg()}", flush=True)
    kinds = ("sweep", "fresh", "plain")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    inner: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ray_overhead_") as tmp:
        for rep in range(args.reps):
            order = kinds if rep % 2 == 0 else tuple(reversed(kinds))
            for kind in order:
                sweep_args = ["--preset", PRESET, "--dataset", "synthetic", "--out",
                              str(Path(tmp) / f"{kind}{rep}")]
                if kind == "sweep":
                    cmd = [sys.executable, "-m", "study.sweep", *sweep_args]
                elif kind == "fresh":
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--fresh", *sweep_args]
                else:
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain"]
                wall, cpu, stdout = timed(cmd, env)
                times[kind].append(wall)
                cpus[kind].append(cpu)
                m = re.search(r"study '[^']*': \d+ trials(?: \(\d+ in this run\))?, (\d+) errored, "
                              r"(\d+) s", stdout)
                if kind != "plain" and not m:
                    raise RuntimeError(f"{kind}: no summary line in its output:\n{stdout[-2000:]}")
                if kind != "plain" and int(m.group(1)):
                    raise RuntimeError(f"{kind}: the sweep had {m.group(1)} errored trials")
                if kind == "sweep":
                    inner.append(float(m.group(2)))
                print(f"  rep {rep + 1}: {kind:<5} {wall:6.1f} s wall, {cpu:6.1f} CPU-s   (load {loadavg()})",
                      flush=True)
    r = [s / p for s, p in zip(times["sweep"], times["plain"], strict=True)]
    fresh = [s / f for s, f in zip(times["sweep"], times["fresh"], strict=True)]
    print(f"\nload average at end {loadavg()}")
    print(f"sweep wall time: median {statistics.median(times['sweep']):.1f} s  "
          f"{[round(t, 1) for t in times['sweep']]}")
    if inner:
        print(f"  (of which the sweep itself reports from data loading to the end: "
              f"{[round(t) for t in inner]} s)")
    print(f"plain run_trial (2 processes): median {statistics.median(times['plain']):.1f} s  "
          f"{[round(t, 1) for t in times['plain']]}")
    med = statistics.median(r)
    print(f"ratio sweep / plain, wall time: {med:.3f} [{min(r):.3f}-{max(r):.3f}]   goal <= {GOAL}: "
          f"{'met' if med <= GOAL else 'NOT met'}")
    print(f"without actor reuse (fresh): median {statistics.median(times['fresh']):.1f} s  "
          f"{[round(t, 1) for t in times['fresh']]}; ratio sweep / fresh, wall time: "
          f"{statistics.median(fresh):.3f} [{min(fresh):.3f}-{max(fresh):.3f}]")
    c = [s / p for s, p in zip(cpus["sweep"], cpus["plain"], strict=True)]
    print(f"ratio sweep / plain, CPU seconds of the whole process tree: {statistics.median(c):.3f} "
          f"[{min(c):.3f}-{max(c):.3f}]  (sweep {[round(x) for x in cpus['sweep']]}, plain "
          f"{[round(x) for x in cpus['plain']]}; CPU time moves little with other load, so this says "
          "what Ray adds in work, the wall ratio what it adds in time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
