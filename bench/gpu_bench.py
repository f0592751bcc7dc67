"""GPU throughput of one trial and of several trials sharing one GPU (run by bench/gpu_check.sh).

Parts (each its own command, so that the shell script can bound each in time):

  ceiling      bf16 and fp32 (TF32 off) matrix product TFLOP/s, device-to-device copy bandwidth
  seed         the seed's loop (DataLoader of PIL images + per-image transforms + per-layer
               ``.item()`` moments + ``loss.item()``), batch 16, per-trial images/s
  eager        the real ``run_trial`` (all statistics) and the bare step at batch 16 and 128,
               eager and replayed from CUDA graphs, interleaved; the statistics overhead
               (run_trial ÷ bare) and its eager breakdown into parts at batch 16 (see
               bench/throughput.py)
  concurrency  K = 1, 2, 4, 8 processes, each running ``run_trial`` on the GPU (batch 16,
               1 torch thread), released together: aggregate and per-trial images/s
  concurrency_graph   the same with CUDA graphs
  streams      K = 1, 2, 4, 8 graphed trials in one process, one CUDA stream each
  study        whole trials (the full preset's size, a fresh process each: start-up counts),
               4 trials run K = 1, 2, 4 at a time
  mps          concurrency_graph under NVIDIA's MPS daemon (started and stopped here)
  study_mps    one wave of K = 1, 2, 4, 8 whole trials under MPS
  table        read the parts' JSON files and print one table

    python bench/gpu_bench.py ceiling --json /tmp/g/ceiling.json
    python bench/gpu_bench.py all --device cpu --quick      # dry run of every part on CPU
    python bench/gpu_bench.py table /tmp/g

The model costs about 20 MFLOP per training image (forward + backward), so even 50,000
images/s is about 1 TFLOP/s: the ceilings say how far a trial is from the card's limits,
i.e. that the loop is bound by kernel launches and the host, not by the GPU's arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("ceiling", "seed", "eager", "concurrency", "concurrency_graph", "streams", "study", "mps",
         "study_mps")


def model_train_flops_per_image() -> float:
    """Forward multiply-adds ×2 of SeedCNN's convs and linears, ×3 for forward + backward."""
    convs = [(32, 3, 16), (16, 16, 32), (8, 32, 64)]  # (spatial size, in, out), 3×3 kernels
    fwd = sum(2 * s * s * cin * cout * 9 for s, cin, cout in convs) + 2 * (1024 * 500 + 500 * 10)
    return 3.0 * fwd


def _setup(device_name: str):
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import warnings

    import torch

    # a failed capture falls back to eager training: here that must not pass for a graph number
    warnings.filterwarnings("error", message="CUDA graph capture failed", category=RuntimeWarning)

    from study.train import disable_tf32

    dev = torch.device(device_name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available")
    disable_tf32()  # every part's steps in full fp32, as a trial's (run_trial does the same)
    return torch, dev


def _median_time(torch, dev, fn, reps: int, warmup: int) -> float:
    """Median seconds of fn() (CUDA events on a GPU, host clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------- parts


def part_ceiling(args) -> dict:
    torch, dev = _setup(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    n = 1024 if args.quick else 8192
    out: dict = {"matmul_n": n}
    g = torch.Generator(dev).manual_seed(0)
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        if dev.type == "cpu" and dt is torch.bfloat16 and not args.quick:
            continue
        a = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        b = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        c = torch.empty(n, n, device=dev, dtype=dt)
        s = _median_time(torch, dev, lambda a=a, b=b, c=c: torch.mm(a, b, out=c), 10, 3)
        out[f"{name}_tflops"] = 2 * n**3 / s / 1e12
        del a, b, c
    nbytes = (64 if args.quick else 2048) * 2**20
    src = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).uniform_(generator=g)
    dst = torch.empty_like(src)
    s = _median_time(torch, dev, lambda: dst.copy_(src), 20, 3)
    out["copy_bytes"] = nbytes
    out["copy_tb_s"] = 2 * nbytes / s / 1e12  # bytes read + bytes written
    return out


def part_seed(args) -> dict:
    torch, dev = _setup(args.device)
    import throughput as tp

    from study.config import TrialConfig

    steps, warm, reps = (20, 3, 1) if args.quick else (300, 20, 3)
    cfg = TrialConfig(norm="batch", batch_size=16, epochs=1)
    data = tp.synthetic_with_train_size((steps + warm) * 16, cfg)
    torch.set_num_threads(1)
    variants = {
        "seed": lambda: tp.SeedLoop(data, cfg, dev),
        "seed_nohooks": lambda: tp.SeedLoop(data, cfg, dev, hooks=False),
        "seed_loader": lambda: tp.SeedLoop(data, cfg, dev, train=False),
    }
    res: dict[str, list[float]] = {k: [] for k in variants}
    out: dict = {"steps": steps}
    for rep in range(reps):
        for key, make in variants.items():
            res[key].append(tp.time_steps(make().step, steps, warm, dev).images_per_s)
        out.update({k: statistics.median(v) for k, v in res.items()}, reps=rep + 1)
        args.save(out)
    return out


def part_eager(args) -> dict:
    torch, dev = _setup(args.device)
    import throughput as tp

    from study.config import TrialConfig

    steps, warm, reps = (20, 3, 1) if args.quick else (300, 20, 3)
    batches = (16, 128)
    cfgs = {b: TrialConfig(norm="batch", batch_size=b, epochs=1, grad_every=1) for b in batches}
    datas = {b: tp.synthetic_with_train_size(steps * b, cfgs[b]) for b in batches}
    graphs = dev.type == "cuda"
    torch.set_num_threads(1)
    variants = []
    for b in batches:
        cfg, data = cfgs[b], datas[b]
        cfg2 = TrialConfig(**{**cfg.to_dict(), "epochs": 2})  # epoch 1 pays for the captures
        variants.append((f"bare_{b}", lambda cfg=cfg, data=data: tp.time_steps(
            tp.BareStep(data, cfg, dev).step, steps, warm, dev)))
        variants.append((f"run_trial_{b}", lambda cfg=cfg, data=data: tp.run_trial_window(data, cfg, dev, 1)))
        if graphs:
            variants.append((f"graph_bare_{b}", lambda cfg=cfg, data=data: tp.time_steps(
                tp.GraphedBareStep(data, cfg, dev).step, steps, warm, dev)))
            variants.append((f"graph_run_trial_{b}", lambda cfg=cfg2, data=data: tp.run_trial_window(
                data, cfg, dev, 1, cuda_graph=True)))
    on: set[str] = set()
    for part, _ in tp.PARTS:
        on = on | {part}
        variants.append((f"r_{part}_16", lambda on=on: tp.time_steps(
            tp.ReplicaStep(datas[16], cfgs[16], dev, on, steps + warm).step, steps, warm, dev)))
    for b in batches:  # warm-up: CUDA context, cuDNN, allocator
        tp.time_steps(tp.BareStep(datas[b], cfgs[b], dev).step, 5, 2, dev)
        tp.run_trial_window(datas[b], cfgs[b], dev, 1)
    res: dict[str, list[float]] = {k: [] for k, _ in variants}
    reported: dict[int, list[float]] = {b: [] for b in batches}
    out: dict = {"steps": steps}
    for rep in range(reps):
        k = rep * 3 % len(variants)
        for key, fn in variants[k:] + variants[:k]:
            try:
                w = fn()
            except Exception as e:  # a graphed variant may fail on its own; the eager ones go on
                if not key.startswith("graph_"):
                    raise
                out.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:400]
                res[key].append(float("nan"))
                continue
            res[key].append(w.images_per_s)
            if key.startswith("run_trial_"):
                reported[int(key.rsplit("_", 1)[1])].append(w.extra.get("reported", float("nan")))
            if "status" in w.extra and w.extra["status"] != "done":
                raise RuntimeError(f"{key}: the trial ended {w.extra['status']}")
        # summary of the repetitions done so far, saved after each (a timeout keeps them)
        out["reps"] = rep + 1
        for key, v in res.items():
            out[key] = statistics.median(v)
        for b in batches:
            r = [t / a for t, a in zip(res[f"run_trial_{b}"], res[f"bare_{b}"], strict=True)]
            out[f"stats_ratio_{b}"] = statistics.median(r)
            if graphs:
                r = [t / a for t, a in zip(res[f"graph_run_trial_{b}"], res[f"graph_bare_{b}"], strict=True)]
                out[f"graph_stats_ratio_{b}"] = statistics.median(r)
            out[f"run_trial_reported_{b}"] = statistics.median(reported[b])
        prev = [16e3 / v for v in res["bare_16"]]
        out["breakdown_ms"] = {"bare": statistics.median(prev)}
        for part, _ in tp.PARTS:
            cur = [16e3 / v for v in res[f"r_{part}_16"]]
            out["breakdown_ms"][part] = statistics.median([c - p for c, p in zip(cur, prev, strict=True)])
            prev = cur
        args.save(out)
    return out


def part_concurrency(args, cuda_graph: bool = False, env_extra: dict | None = None) -> dict:
    _setup(args.device)
    import cpu_threads as ct

    ks = (1, 2) if args.quick else (1, 2, 4, 8)
    steps = 20 if args.quick else 600
    wargs = argparse.Namespace(steps=steps, batch=16, device=args.device, cuda_graph=cuda_graph)
    workers = [ct.Worker(1, wargs, env_extra) for _ in range(max(ks))]
    out: dict = {"steps": steps, "batch": 16, "k": {}, "cuda_graph": cuda_graph}
    try:
        for w in workers:
            w.wait_ready()
        order = list(ks) + list(reversed(ks))  # K up then down: drift weighs on all alike
        agg: dict[int, list[float]] = {k: [] for k in ks}
        per: dict[int, list[float]] = {k: [] for k in ks}
        for k in order:
            span_ips, _, res = ct.run_together(workers[:k])
            agg[k].append(span_ips)
            per[k] += [r["ips"] for r in res]
            print(f"  K={k}: aggregate {span_ips:.0f} images/s", flush=True)
            out["k"] = {str(j): dict(aggregate=statistics.median(agg[j]), per_trial=statistics.median(per[j]),
                                     per_trial_min=min(per[j]), runs=len(agg[j]))
                        for j in ks if agg[j]}
            args.save(out)
    finally:
        for w in workers:
            w.close()
    return out


def part_streams(args) -> dict:
    """K trials' CUDA-graphed steps (every statistic) in ONE process, each trial on its own CUDA
    stream, replayed in turns by one host thread: whether trials packed in a process overlap on
    the GPU where processes (time-sliced) do not. Each trial has its own data copy, model,
    optimiser, statistics and generators, as separate trials would."""
    torch, dev = _setup(args.device)
    import math

    import throughput as tp

    from study.augment import augment_thetas
    from study.config import TrialConfig
    from study.model import build_model
    from study.stats import EpochStats
    from study.step import GraphedTrainStep, TrainStep
    from study.train import DeviceData, build_optimizer

    ks = (1, 2) if args.quick else (1, 2, 4, 8)
    steps, reps = (20, 1) if args.quick else (400, 3)
    cfg = TrialConfig(norm="batch", batch_size=16, epochs=1, grad_every=1)
    data = tp.synthetic_with_train_size((steps + 60) * 16, cfg)
    cuda = dev.type == "cuda"
    torch.set_num_threads(1)

    class Packed:
        def __init__(self, seed: int):
            torch.manual_seed(seed)
            self.gen = torch.Generator(dev).manual_seed(seed)
            d = DeviceData.from_arrays(data, cfg, dev)
            model = build_model(cfg.norm, cfg.noise, cfg.noise_scope, cfg.p, cfg.groups).to(dev)
            model.set_noise_generator(self.gen)
            opt = build_optimizer(model, cfg, dev)
            n = len(d.train_y)
            stats = EpochStats.for_model(model, math.ceil(n / 16), cfg.hist_bins, cfg.hist_range, dev)
            self.train_step = TrainStep(model, opt, d.train_x, d.train_y, stats)
            self.step = GraphedTrainStep(self.train_step, 16, [self.gen]) if cuda else self.train_step
            order = torch.randperm(n, generator=self.gen, device=dev)
            thetas = augment_thetas(n, self.gen, *d.train_x.shape[-2:])
            self.batches = list(zip(order.split(16), thetas.split(16), strict=True))[: steps + 50]
            self.stream = torch.cuda.Stream(dev) if cuda else None

        def on_stream(self):
            return torch.cuda.stream(self.stream) if cuda else contextlib.nullcontext()

    trials = [Packed(100 + j) for j in range(max(ks))]

    def run(k: int, n_steps: int) -> float:
        for t in trials[:k]:
            t.train_step.reset()
        tp.sync(dev)
        t0 = time.perf_counter()
        for i in range(n_steps):
            hist = i % cfg.hist_every == 0
            for t in trials[:k]:
                idx, theta = t.batches[i]
                with t.on_stream():
                    t.step(idx, theta, i, hist, True)
        tp.sync(dev)
        return k * n_steps * 16 / (time.perf_counter() - t0)

    run(max(ks), cfg.hist_every + 1)  # warm-up, and the captures of both kinds of step (histogram or not)
    out: dict = {"steps": steps, "batch": 16, "k": {}, "cuda_graph": cuda}
    if cuda:
        out["graphs_failed"] = [t.step.failed for t in trials if t.step.failed]
    agg: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(reps):
        for k in list(ks) + list(reversed(ks)):
            agg[k].append(run(k, steps))
        out["k"] = {str(k): dict(aggregate=statistics.median(v), per_trial=statistics.median(v) / k,
                                 runs=len(v)) for k, v in agg.items()}
        args.save(out)
    return out


@contextlib.contextmanager
def mps_daemon(args):
    """NVIDIA's MPS daemon with its own pipe folder (only processes given the yielded environment
    are its clients); yields that environment, or a reason why MPS is not run."""
    import shutil
    import subprocess
    import tempfile

    exe = shutil.which("nvidia-cuda-mps-control")
    if args.device == "cpu" or exe is None:
        yield "not run: " + ("CPU dry run" if args.device == "cpu" else "nvidia-cuda-mps-control not found")
        return
    env = dict(CUDA_MPS_PIPE_DIRECTORY=tempfile.mkdtemp(prefix="mps_pipe_"),
               CUDA_MPS_LOG_DIRECTORY=tempfile.mkdtemp(prefix="mps_log_"))
    full = {**os.environ, **env}
    r = subprocess.run([exe, "-d"], env=full, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        yield f"daemon failed to start (exit {r.returncode}): {(r.stdout + r.stderr)[-300:]}"
        return
    try:
        yield env
    finally:
        servers = subprocess.run([exe], input="get_server_list\n", env=full, capture_output=True,
                                 text=True, timeout=30).stdout.split()
        print(f"MPS servers running at the end: {len(servers)}", flush=True)
        subprocess.run([exe], input="quit\n", env=full, capture_output=True, text=True, timeout=30)
        for name in ("control.log", "server.log"):
            p = Path(env["CUDA_MPS_LOG_DIRECTORY"]) / name
            if p.exists():
                print(f"--- MPS {name} (end):\n" + p.read_text()[-1500:], flush=True)


def part_mps(args) -> dict:
    """concurrency_graph again with NVIDIA's MPS daemon running: do separate trial processes
    then overlap on the GPU?"""
    with mps_daemon(args) as env:
        if isinstance(env, str):
            return {"mps": env}
        out = part_concurrency(args, cuda_graph=True, env_extra=env)
        out["mps"] = "on"
        args.save(out)
    return out


def part_study_mps(args) -> dict:
    """part_study under MPS, one wave of K trials for each K (K trials started together)."""
    with mps_daemon(args) as env:
        if isinstance(env, str):
            return {"mps": env}
        ks = (1, 2) if args.quick else (1, 2, 4, 8)
        out = part_study(args, {k: k for k in ks}, env_extra=env)
        out["mps"] = "on"
        args.save(out)
    return out


def part_study(args, trials_for_k: dict[int, int] | None = None, env_extra: dict | None = None) -> dict:
    """A study's shape: M whole trials, each a fresh process (start, import torch, data to the
    GPU, captures, then every epoch with evaluation, as a Ray trial runs), K at a time; the
    aggregate is all trials' training images over the wall time from first start to last end.
    Trials are the ``full`` preset's size (40,000 training images, 10 epochs) with CUDA graphs,
    so each trial's start-up weighs as it does in a study."""
    import subprocess
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    _setup("cpu")  # the driver does no GPU work: the trial processes do
    import throughput as tp

    from study.config import TrialConfig

    m, ks, n_train, epochs = (2, (1, 2), 200, 2) if args.quick else (4, (1, 2, 4), 40_000, 10)
    trials_for_k = trials_for_k or {k: m for k in ks}
    cfg = TrialConfig(norm="batch", batch_size=16, epochs=epochs)
    data = tp.synthetic_with_train_size(n_train, cfg)
    folder = Path(tempfile.mkdtemp(prefix="study_data_"))
    for name in ("train_x", "train_y", "test_x", "test_y"):  # the trials read them as memory maps,
        np.save(folder / f"{name}.npy", getattr(data, name))  # as Ray's object store hands them over
    images = tp.n_train_images(len(data.train_y), cfg) * epochs

    def one(seed: int) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), "trial", str(folder), "--device",
               args.device, "--epochs", str(epochs), "--seed", str(seed)]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                                    **(env_extra or {})))
        if r.returncode != 0:
            raise RuntimeError(f"trial {seed} failed: {(r.stdout + r.stderr)[-800:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["t0"], res["t1"] = t0, time.time()
        res["startup_s"] = res.pop("epoch1_start") - t0  # launch to the first epoch's first step
        return res

    out: dict = {"images_per_trial": images, "epochs": epochs, "k": {}}
    for k, m in trials_for_k.items():
        t0 = time.time()
        with ThreadPoolExecutor(k) as pool:
            res = list(pool.map(one, range(m)))
        wall = time.time() - t0
        out["k"][str(k)] = dict(trials=m, aggregate=m * images / wall, wall_s=wall,
                                startup_s=statistics.median(r["startup_s"] for r in res),
                                train_s=statistics.median(r["train_s"] for r in res),
                                trial_s=statistics.median(r["t1"] - r["t0"] for r in res))
        print(f"  K={k}: {m} trials in {wall:.1f} s, aggregate {m * images / wall:,.0f} images/s", flush=True)
        args.save(out)
    return out


def trial_child(folder: str, device: str, epochs: int, seed: int) -> int:
    """One whole trial for part_study, timed from the process's start."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import torch

    from study.config import TrialConfig
    from study.data import DataArrays
    from study.train import RunOptions, run_trial

    arrays = {n: np.load(Path(folder) / f"{n}.npy", mmap_mode="r")
              for n in ("train_x", "train_y", "test_x", "test_y")}
    data = DataArrays("synthetic", tuple(str(i) for i in range(10)), **arrays)
    cfg = TrialConfig(norm="batch", batch_size=16, epochs=epochs, seed=seed)
    first: list[float] = []
    rows: list[dict] = []

    def on_epoch(record: dict, state: dict) -> None:
        rows.append(record["epoch"])
        if not first:
            first.append(time.time() - record["epoch"]["wall_s"])  # when epoch 1 began

    dev = torch.device(device)
    summary = run_trial(cfg, data, on_epoch=on_epoch,
                        options=RunOptions(device=device, threads=1, cuda_graph=dev.type == "cuda"))
    if summary["status"] != "done":
        raise SystemExit(f"trial ended {summary['status']}")
    print(json.dumps(dict(epoch1_start=first[0], train_s=sum(r["wall_s"] for r in rows))))
    return 0


# ---------------------------------------------------------------------------- table


def _fmt(v, spec: str = ",.0f") -> str:
    return "failed" if v is None else format(v, spec)


def _k_table(title: str, r: dict, per: str = "per trial (median)") -> list[str]:
    """A part's K rows: aggregate images/s, per trial, and the aggregate ÷ K = 1's."""
    base = r["k"].get("1", {}).get("aggregate")
    lines = [title, f"   {'K':>3} {'aggregate images/s':>20} {per:>20} {'vs K=1':>8}"]
    for k, v in r["k"].items():
        rel = f"{v['aggregate'] / base:.2f}" if base else "-"
        lines.append(f"   {k:>3} {v['aggregate']:>20,.0f} {v['per_trial']:>20,.0f} {rel:>8}")
    return lines


def table(folder: Path) -> str:
    """The parts' results in ``folder`` as one table; parts that ``asked.txt`` (written by
    gpu_check.sh) does not name are left out, and a part asked for without a result shows as
    failed."""
    def load(name: str) -> dict | None:
        p = folder / f"{name}.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    asked_file = folder / "asked.txt"
    asked = set(asked_file.read_text().split()) if asked_file.exists() else {*PARTS, "tests"}
    env, ceil, seed, eager, conc, conc_graph, streams, study, mps, study_mps = (
        load(n) for n in ("env", *PARTS))
    lines = []
    if env:
        lines.append(f"GPU check on {env.get('device')} ({env.get('device_name')}), torch "
                     f"{env.get('torch')}, CUDA {env.get('cuda')}, {env.get('cpus')} CPUs")
    else:
        lines.append("GPU check (environment part failed)")
    w = 56
    lines.append(f"{'measure':<{w}}value")
    lines.append("-" * (w + 30))
    if "ceiling" in asked:
        c = ceil or {}
        lines.append(f"{'ceiling: bf16 matmul ' + str(c.get('matmul_n', '')) + '^3':<{w}}"
                     f"{_fmt(c.get('bf16_tflops'), '.1f')} TFLOP/s")
        lines.append(f"{'ceiling: fp32 matmul (TF32 off)':<{w}}{_fmt(c.get('fp32_tflops'), '.1f')} TFLOP/s")
        lines.append(f"{'ceiling: device copy, read+write':<{w}}{_fmt(c.get('copy_tb_s'), '.2f')} TB/s")
    if "seed" in asked:
        s = seed or {}
        lines.append(f"{'1 trial: seed-style loop, batch 16':<{w}}{_fmt(s.get('seed'))} images/s")
        for key, label in (("seed_nohooks", "   its loop without per-layer .item() moments"),
                           ("seed_loader", "   its DataLoader + PIL transforms alone")):
            lines.append(f"{label:<{w}}{_fmt(s.get(key))} images/s")
    if "eager" in asked:
        e = eager or {}
        for b in (16, 128):
            label = f"1 trial: run_trial eager, all stats, batch {b}"
            lines.append(f"{label:<{w}}{_fmt(e.get(f'run_trial_{b}'))} images/s  (run_trial reports "
                         f"{_fmt(e.get(f'run_trial_reported_{b}'))})")
            lines.append(f"{f'1 trial: bare step, batch {b}':<{w}}{_fmt(e.get(f'bare_{b}'))} images/s")
            lines.append(f"{f'1 trial: run_trial CUDA graphs, all stats, batch {b}':<{w}}"
                         f"{_fmt(e.get(f'graph_run_trial_{b}'))} images/s")
            lines.append(f"{f'1 trial: bare step, one CUDA graph, batch {b}':<{w}}"
                         f"{_fmt(e.get(f'graph_bare_{b}'))} images/s")
        for b in (16, 128):
            lines.append(f"{f'stats on / off (run_trial / bare), batch {b}':<{w}}"
                         f"{_fmt(e.get(f'stats_ratio_{b}'), '.3f')}  (with CUDA graphs "
                         f"{_fmt(e.get(f'graph_stats_ratio_{b}'), '.3f')})")
        for key, err in e.get("errors", {}).items():
            lines.append(f"   {key} failed: {err}")
        if e.get("breakdown_ms"):
            bd = e["breakdown_ms"]
            parts = ", ".join(f"{k} {v:+.3f}" for k, v in bd.items() if k != "bare")
            lines.append(f"{'   breakdown at batch 16, ms/step':<{w}}bare {bd['bare']:.3f}; {parts}")
    for key, label in (("run_trial_16", "run_trial eager / seed loop, batch 16"),
                       ("graph_run_trial_16", "run_trial CUDA graphs / seed loop, batch 16")):
        if seed and eager and seed.get("seed") and eager.get(key):
            lines.append(f"{label:<{w}}{eager[key] / seed['seed']:.2f}")
    flops = model_train_flops_per_image()
    if eager and eager.get("run_trial_128"):
        lines.append(f"{'model arithmetic at run_trial batch 128':<{w}}"
                     f"{eager['run_trial_128'] * flops / 1e12:.3f} TFLOP/s ({flops / 1e6:.1f} MFLOP/image)")
    for name, r, how in (("concurrency", conc, "eager"), ("concurrency_graph", conc_graph, "CUDA graphs"),
                         ("mps", mps, "CUDA graphs, under MPS")):
        if name not in asked:
            continue
        if r and name == "concurrency_graph" and not r.get("cuda_graph"):
            how = "CUDA graphs asked, eager run (CPU dry run)"
        if not r or "k" not in r:
            lines.append(f"{f'K concurrent trials, {how}':<{w}}{(r or {}).get('mps', 'failed')}")
            continue
        lines += _k_table(f"K concurrent run_trial processes on one device, {how}, batch {r['batch']}, "
                          f"{r['steps']} steps each:", r)
    if "streams" in asked and streams:
        how = "CUDA graphs" if streams.get("cuda_graph") else "eager (CPU dry run)"
        lines += _k_table(f"K trials in one process, one CUDA stream each, {how}, batch 16, "
                          f"{streams['steps']} steps:", streams, "per trial")
        if streams.get("graphs_failed"):
            lines.append(f"   captures failed: {streams['graphs_failed'][0]}")
    elif "streams" in asked:
        lines.append(f"{'K trials in one process on K streams':<{w}}failed")
    for name, st, how in (("study", study, "CUDA graphs"),
                          ("study_mps", study_mps, "CUDA graphs, under MPS")):
        if name not in asked:
            continue
        if st is None or "k" not in st:
            lines.append(f"{'Whole trials, K at a time, ' + how:<{w}}{(st or {}).get('mps', 'failed')}")
            continue
        base = st["k"].get("1", {}).get("aggregate")
        lines.append(f"Whole trials ({st['images_per_trial']:,} training images, {st['epochs']} epochs each; "
                     f"a fresh process each), K at a time, {how}:")
        lines.append(f"   {'K':>3} {'trials':>6} {'aggregate images/s':>20} {'wall s':>8} {'start-up s':>11} "
                     f"{'train s':>8} {'vs K=1':>8}")
        for k, r in st["k"].items():
            rel = f"{r['aggregate'] / base:.2f}" if base else "-"
            lines.append(f"   {k:>3} {r.get('trials', st.get('trials', 0)):>6} {r['aggregate']:>20,.0f} "
                         f"{r['wall_s']:>8.1f} {r['startup_s']:>11.1f} {r['train_s']:>8.1f} {rel:>8}")
    rc, summary = folder / "test_gpu.rc", folder / "test_gpu.txt"
    if "tests" in asked and not rc.exists():
        lines.append(f"{'GPU tests':<{w}}failed (no result)")
    if rc.exists():
        code = rc.read_text().strip()
        last = summary.read_text().strip().splitlines()[-1:] if summary.exists() else []
        verdict = "passed" if code == "0" else f"FAILED (exit {code})"
        if last and "skipped" in last[0] and "passed" not in last[0]:
            verdict = "skipped"
        lines.append(f"{'GPU tests (no host sync; graphs = eager; BN moments)':<{w}}{verdict}: "
                     f"{last[0].strip('= ') if last else ''}")
    graphs = graph_test_outcomes(folder / "test_gpu.xml")
    if graphs:
        ok = all(o == "passed" for o in graphs.values())
        lines.append(f"{'CUDA-graph tests':<{w}}{sum(o == 'passed' for o in graphs.values())}/{len(graphs)} "
                     f"passed" + ("" if ok else ": " + ", ".join(f"{k} {o}" for k, o in graphs.items()
                                                                     if o != "passed")))
        skipped = all(o == "skipped" for o in graphs.values())
        verdict = ("not checked here (no CUDA)" if skipped else "True stands" if ok else
                   "FAILED on this GPU: set it to False and find out why")
        lines.append(f"{'   so study.train.RunOptions.cuda_graph':<{w}}{verdict}")
    return "\n".join(lines)


def graph_test_outcomes(xml: Path) -> dict[str, str]:
    """Outcome of each CUDA-graph test case (name contains 'cuda_graph' or a graph parameter)
    in pytest's JUnit XML; empty where there is none."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return {}
    out = {}
    for case in root.iter("testcase"):
        name = case.get("name", "")
        if "cuda_graph" not in name and "True]" not in name:
            continue
        kinds = {child.tag for child in case}
        out[name] = ("failed" if kinds & {"failure", "error"} else
                     "skipped" if "skipped" in kinds else "passed")
    return out


def part_env(args) -> dict:
    torch, dev = _setup(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return dict(device=str(dev), device_name=name, torch=torch.__version__, cuda=torch.version.cuda,
                cpus=os.cpu_count())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("env", *PARTS, "all", "table", "trial"))
    ap.add_argument("folder", nargs="?", help="table: the folder of the parts' JSON files")
    ap.add_argument("--epochs", type=int, default=10, help=argparse.SUPPRESS)  # trial (part study)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the logic")
    ap.add_argument("--json", help="write the part's result here")
    args = ap.parse_args(argv)
    if args.part == "trial":
        return trial_child(args.folder, args.device, args.epochs, args.seed)
    if args.part == "table":
        if not args.folder:
            ap.error("table needs the folder of JSON files")
        print(table(Path(args.folder)))
        return 0
    args.save = lambda d: Path(args.json).write_text(json.dumps(d)) if args.json else None
    fns = dict(env=part_env, ceiling=part_ceiling, seed=part_seed, eager=part_eager,
               concurrency=part_concurrency,
               concurrency_graph=lambda a: part_concurrency(a, cuda_graph=args.device != "cpu"),
               streams=part_streams, study=part_study, mps=part_mps, study_mps=part_study_mps)
    if args.part == "all":
        import tempfile

        folder = Path(args.json) if args.json else Path(tempfile.mkdtemp(prefix="gpu_bench_"))
        folder.mkdir(parents=True, exist_ok=True)
        args.save = lambda d: None
        for name in ("env", *PARTS):
            t0 = time.perf_counter()
            (folder / f"{name}.json").write_text(json.dumps(fns[name](args)))
            print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        print(table(folder))
        return 0
    t0 = time.perf_counter()
    result = fns[args.part](args)
    result["seconds"] = time.perf_counter() - t0
    text = json.dumps(result)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
