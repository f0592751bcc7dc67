"""Training throughput of one trial: bare step vs run_trial (all statistics) vs the seed's loop.

Measured in one process, variants interleaved within each repetition (the order rotates from
one repetition to the next) so that whatever else loads the machine weighs on all of them
alike; every ratio is the median over repetitions of the ratio within one repetition.

  a  bare step: ``build_model("batch")`` (``--norm``: another variant) + SGD on pre-made,
     normalised float batches; no augmentation, no statistics, no taps; in run_trial's
     memory layout (channels-last on a CPU, ``RunOptions.cpu_channels_last``), and beside it
     in the NCHW layout (a_nchw, as is b_nchw for run_trial), which says what the layout gains
  b  ``study.train.run_trial`` itself (norm batch or ``--norm``, every statistic on: activation moments,
     a histogram every ``hist_every``-th step, per-step gradient norms), on synthetic data;
     its step loop is timed through ``RunOptions.step_loop_context`` (synchronised on a GPU),
     and its own reported ``images_per_s`` is shown beside it
  c  the seed's loop: a torchvision-CIFAR10-like dataset of PIL images + DataLoader(shuffle)
     + RandomHorizontalFlip, RandomRotation(10), ToTensor, Normalize(0.5, 0.5), with
     ``torch.mean(x.detach().cpu()).item()`` / ``torch.var(...).item()`` of each conv
     block's ReLU input every step (forward hooks) and ``loss.item()`` every step

and, to say what the statistics cost, a replica of run_trial's inner loop with its parts
switched on one after another (data gather + augmentation, activation moments, histogram,
gradient norms, loss/accuracy bookkeeping).

    python bench/throughput.py                       # CPU, batch 16, 1 and 2 torch threads
    python bench/throughput.py --threads 1 --reps 3  # quicker
    python bench/throughput.py --norm noisy_batch    # the same for noisy BN (noise 1), or none

and, last, the same ratios from an interleaved measurement (``--interleave-rounds``): the
bare step, the replica with and without statistics and the seed loop take turns, 5 steps at
a time, so that the machine's drift falls on all of them alike.

``bench/gpu_bench.py`` imports the measuring pieces from here.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import loadavg  # noqa: E402  (bench/ is on sys.path when run as a script)

from study.augment import augment_thetas, augment_with, normalise  # noqa: E402
from study.config import TrialConfig  # noqa: E402
from study.data import DataArrays, load_dataset, train_val_split  # noqa: E402
from study.model import build_model  # noqa: E402
from study.results import ACT_LAYERS  # noqa: E402
from study.stats import EpochStats  # noqa: E402
from study.step import grads_to_none  # noqa: E402
from study.train import (  # noqa: E402
    DIVERGENCE_CHECK_EVERY,
    DeviceData,
    RunOptions,
    build_optimizer,
    run_trial,
    trial_seeds,
)
from study.variants import NOISY_NORMS, NORMS  # noqa: E402

GOAL_B_OVER_A = 0.90
GOAL_B_OVER_C = 1.5
#: Cumulative parts of the replica of run_trial's step, in the order they are switched on.
PARTS = (
    ("data", "+ gather uint8 batch & augment"),
    ("moments", "+ activation moments (taps, the row)"),
    ("hist", "+ histogram (every hist_every-th)"),
    ("grads", "+ gradient norms"),
    ("book", "+ loss and number correct"),
)


def trial_layout(model: torch.nn.Module, device: torch.device,
                 channels_last: bool | None = None) -> torch.nn.Module:
    """The model in run_trial's memory layout on ``device`` (or the one asked for)."""
    if channels_last is None:
        channels_last = device.type == "cpu" and RunOptions().cpu_channels_last
    return model.to(memory_format=torch.channels_last) if channels_last else model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def n_train_images(n: int, cfg: TrialConfig) -> int:
    return len(train_val_split(n, cfg.val_fraction, cfg.split_seed)[0])


def synthetic_with_train_size(n_train: int, cfg: TrialConfig, base: int = 2000) -> DataArrays:
    """Synthetic data whose training split (after the validation split) holds at least
    ``n_train`` images: a ``base``-image synthetic set, tiled (speed does not depend on the
    pixels, and generating tens of thousands of images would take longer than the timing)."""
    n = math.ceil(n_train / (1 - cfg.val_fraction)) + 1
    d = load_dataset("synthetic", subset=min(n, base), log=lambda s: None)
    if n <= len(d.train_y):
        return d
    reps = math.ceil(n / len(d.train_y))
    x = np.ascontiguousarray(np.tile(d.train_x, (reps, 1, 1, 1))[:n])
    y = np.ascontiguousarray(np.tile(d.train_y, reps)[:n])
    return DataArrays(d.name, d.classes, x, y, d.test_x, d.test_y)


class Window:
    """One timed measurement: images/s over ``steps`` steps after ``warmup`` steps, and the
    process's CPU time over wall time (under 1 per thread means others took the CPU)."""

    def __init__(self, images_per_s: float, cpu_util: float, extra: dict | None = None):
        self.images_per_s, self.cpu_util, self.extra = images_per_s, cpu_util, extra or {}


def time_steps(step: Callable[[], int], steps: int, warmup: int, device: torch.device,
               max_s: float | None = None) -> Window:
    """images/s over ``steps`` steps after ``warmup``; on the CPU, stop early once ``max_s``
    seconds have passed (at least 10 steps), so a badly slowed variant cannot stall the run."""
    for _ in range(warmup):
        step()
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    images = 0
    for k in range(steps):
        images += step()
        if max_s is not None and k >= 9 and device.type == "cpu" and time.perf_counter() - t0 > max_s:
            break
    sync(device)
    wall = time.perf_counter() - t0
    return Window(images / wall, (time.process_time() - c0) / wall)


# ---------------------------------------------------------------------------- a: bare step


class BareStep:
    """A training step of the same model on pre-made normalised float batches: nothing else."""

    def __init__(self, data: DataArrays, cfg: TrialConfig, device: torch.device, n_batches: int = 32,
                 channels_last: bool | None = None):
        torch.manual_seed(0)
        model = build_model(cfg.norm, cfg.noise, cfg.noise_scope, cfg.p, cfg.groups)
        self.model = trial_layout(model.to(device), device, channels_last)
        if self.model.noisy_layers():
            self.model.set_noise_generator(torch.Generator(device).manual_seed(0))
        self.opt = build_optimizer(self.model, cfg, device)  # run_trial's optimiser
        bs = cfg.batch_size
        n = min(len(data.train_y) // bs, n_batches) * bs
        x = normalise(torch.from_numpy(data.train_x[:n])).to(device)
        y = torch.from_numpy(data.train_y[:n]).to(device)
        self.batches = [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]
        self.i = 0
        self.model.train()

    def step(self) -> int:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.train_on(x, y)
        return len(y)

    def train_on(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=grads_to_none(x.device))  # as run_trial
        loss.backward()
        self.opt.step()


class GraphedBareStep(BareStep):
    """BareStep replayed from one CUDA graph: the floor of a graphed step without statistics."""

    def __init__(self, data: DataArrays, cfg: TrialConfig, device: torch.device, n_batches: int = 32):
        super().__init__(data, cfg, device, n_batches)
        self.x, self.y = (t.clone() for t in self.batches[0])
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                super().step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.train_on(self.x, self.y)

    def step(self) -> int:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return len(y)


# ---------------------------------------------------------------------------- b: run_trial


def run_trial_window(data: DataArrays, cfg: TrialConfig, device: torch.device,
                     threads: int | None, cuda_graph: bool = False,
                     channels_last: bool | None = None) -> Window:
    """The real ``run_trial`` (``cfg.epochs`` epochs); its last epoch's step loop, timed through
    ``RunOptions.step_loop_context``. Eager unless ``cuda_graph`` (the benches' eager variants
    must not take RunOptions' default, graphs); with CUDA graphs give 2 epochs: the first pays
    for the captures. ``channels_last``: RunOptions.cpu_channels_last (None: its default)."""
    loops: list[tuple[float, float, float, float]] = []

    @contextlib.contextmanager
    def timed_loop():
        sync(device)
        c0, t0, w0 = time.process_time(), time.perf_counter(), time.time()
        yield
        sync(device)
        loops.append((time.perf_counter() - t0, time.process_time() - c0, w0, time.time()))

    records: list[dict] = []
    layout = {} if channels_last is None else dict(cpu_channels_last=channels_last)
    options = RunOptions(device=str(device), threads=threads, cuda_graph=cuda_graph,
                         step_loop_context=timed_loop, **layout)
    run_trial(cfg, data, on_epoch=lambda rec, state: records.append(rec), options=options)
    row = records[-1]["epoch"]
    reported = float(row["images_per_s"])
    wall, cpu, w0, w1 = loops[-1]
    n = n_train_images(len(data.train_y), cfg)
    return Window(n / wall, cpu / wall, dict(reported=reported, status=records[-1]["status"],
                                             loop_t0=w0, loop_t1=w1, images=n))


# ---------------------------------------------------------------------------- replica of b's parts


class ReplicaStep:
    """run_trial's inner loop (same calls, same order) with its parts switched on by name:
    ``data`` (gather the uint8 batch and augment it; else pre-made float batches as in a),
    ``moments`` (taps reduced by EpochStats, the step's row written), ``hist`` (the histogram
    every hist_every-th step), ``grads`` (the gradient norms in the row), ``book`` (loss and
    number correct in the row, and the CPU divergence look). Parts after ``moments`` need it."""

    def __init__(self, data: DataArrays, cfg: TrialConfig, device: torch.device, parts: set[str],
                 capacity: int):
        seed_torch, seed_data, seed_noise = trial_seeds(cfg.seed)
        torch.manual_seed(seed_torch)
        self.gen = torch.Generator(device).manual_seed(seed_data)
        self.d = DeviceData.from_arrays(data, cfg, device)
        model = build_model(cfg.norm, cfg.noise, cfg.noise_scope, cfg.p, cfg.groups)
        self.model = trial_layout(model.to(device), device)
        self.model.set_noise_generator(torch.Generator(device).manual_seed(seed_noise))
        self.opt = build_optimizer(self.model, cfg, device)
        self.params = list(self.model.parameters())
        self.cfg, self.dev, self.parts = cfg, device, parts
        self.n = len(self.d.train_y)
        self.order = torch.randperm(self.n, generator=self.gen, device=device)
        self.thetas = augment_thetas(self.n, self.gen, *self.d.train_x.shape[-2:])
        if parts & {"hist", "grads", "book"} and "moments" not in parts:
            raise ValueError("the replica's hist, grads and book parts need its moments part")
        self.stats = EpochStats.for_model(self.model, capacity, cfg.hist_bins, cfg.hist_range, device)
        bs = cfg.batch_size
        self.spe = self.n // bs
        if "data" not in parts:
            x = normalise(self.d.train_x[: self.spe * bs])
            self.batches = [(x[i : i + bs], self.d.train_y[i : i + bs]) for i in range(0, len(x), bs)]
        self.i = 0
        self.model.train()

    def step(self) -> int:
        cfg, parts, bs = self.cfg, self.parts, self.cfg.batch_size
        i = self.i % self.spe
        if "data" in parts:
            idx = self.order[i * bs : (i + 1) * bs]
            x = augment_with(self.d.train_x.index_select(0, idx), self.thetas[i * bs : (i + 1) * bs])
            y = self.d.train_y.index_select(0, idx)
        else:
            x, y = self.batches[i]
        hist = "hist" in parts and i % cfg.hist_every == 0
        taps = self.stats.tap_reducer(hist) if "moments" in parts else None
        logits = self.model(x, taps)
        loss = F.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=grads_to_none(x.device))
        loss.backward()
        if taps is not None:
            grad = "grads" in parts and i % cfg.grad_every == 0
            book = dict(loss=loss, logits=logits, y=y) if "book" in parts else {}
            numels = self.stats.accumulate(taps, grads=[p.grad for p in self.params] if grad else None,
                                           **book)
            self.stats.count(numels, self.i, grad, len(y))
        self.opt.step()
        if "book" in parts and self.dev.type == "cpu" and (i + 1) % DIVERGENCE_CHECK_EVERY == 0:
            self.stats.losses_finite()
        self.i += 1
        return len(y)


# ---------------------------------------------------------------------------- c: the seed's loop


class PILCifar(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: HWC uint8 array -> PIL image -> transform."""

    def __init__(self, x_nchw: np.ndarray, y: np.ndarray, transform):
        self.data = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
        self.targets = [int(t) for t in y]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.data[i])
        return self.transform(img), self.targets[i]


class SeedLoop:
    """The seed notebook's training loop (DataLoader of PIL images, per-image transforms,
    per-layer moments and the loss fetched to the host every step).

    ``hooks=False`` leaves out the per-layer ``.item()`` moments; ``train=False`` only
    iterates the DataLoader (the input pipeline alone)."""

    def __init__(self, data: DataArrays, cfg: TrialConfig, device: torch.device,
                 hooks: bool = True, train: bool = True, n_images: int | None = None):
        import torchvision.transforms as T

        tf = T.Compose([T.RandomHorizontalFlip(), T.RandomRotation(10), T.ToTensor(),
                        T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        n = n_images or len(data.train_y)
        self.loader = torch.utils.data.DataLoader(
            PILCifar(data.train_x[:n], data.train_y[:n], tf), batch_size=cfg.batch_size, shuffle=True)
        self.it = iter(self.loader)
        self.device, self.train = device, train
        torch.manual_seed(0)
        self.model = build_model(cfg.norm, cfg.noise, cfg.noise_scope, cfg.p, cfg.groups).to(device)
        if self.model.noisy_layers():
            self.model.set_noise_generator(torch.Generator(device).manual_seed(0))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.means: dict[str, list[float]] = {}
        self.vars: dict[str, list[float]] = {}
        self.losses: list[float] = []
        if hooks:
            for name, block in zip(ACT_LAYERS, self.model.blocks, strict=True):
                site = block.norm if block.norm is not None else block.conv  # the ReLU's input
                site.register_forward_hook(self._hook(name))
        self.model.train()

    def _hook(self, name: str):
        self.means[name], self.vars[name] = [], []

        def hook(module, inputs, out):
            a = out.detach().cpu()
            self.means[name].append(torch.mean(a).item())
            self.vars[name].append(torch.var(a).item())

        return hook

    def step(self) -> int:
        try:
            x, y = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            x, y = next(self.it)
        if not self.train:
            return len(y)
        x, y = x.to(self.device), y.to(self.device)
        self.opt.zero_grad()
        loss = self.criterion(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.losses.append(loss.item())
        return len(y)


# ---------------------------------------------------------------------------- the CPU benchmark


def interleaved(steppers: dict[str, Callable[[], int]], rounds: int, chunk: int) -> dict[str, np.ndarray]:
    """Seconds per step of each stepper, measured in alternation: every round times ``chunk``
    steps of each in turn (the order rotating), so that a machine whose speed drifts (a shared
    one's does) slows them all alike. Returns (rounds,) arrays."""
    names = list(steppers)
    for step in steppers.values():
        for _ in range(chunk):
            step()
    out = {k: np.empty(rounds) for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(chunk):
                steppers[k]()
            out[k][r] = (time.perf_counter() - t0) / chunk
    return out


def ratio_of_means(num: np.ndarray, den: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Speed ratio (den's time ÷ num's time, i.e. num's speed ÷ den's) with a 95% bootstrap
    interval over rounds."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(2000, len(num)))
    boot = den[idx].mean(1) / num[idx].mean(1)
    return float(den.mean() / num.mean()), *np.percentile(boot, [2.5, 97.5])


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):9.1f}  [{min(values):.1f}-{max(values):.1f}]"


def ratio_text(num: list[float], den: list[float]) -> tuple[float, str]:
    r = [a / b for a, b in zip(num, den, strict=True)]
    return statistics.median(r), f"{statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="torch intra-op thread counts to measure")
    ap.add_argument("--reps", type=int, default=4, help="repetitions (median taken)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per window (run_trial: "
                    "one epoch of about this many steps)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--norm", default="batch", choices=sorted(NORMS),
                    help="the norm variant of every loop measured (a, b and c alike)")
    ap.add_argument("--noise", type=float, default=1.0, help="noise magnitude of noisy variants")
    ap.add_argument("--max-window-s", type=float, default=8.0, help="stop a step window after this "
                    "many seconds (run_trial's epoch always runs whole)")
    ap.add_argument("--interleave-rounds", type=int, default=150, help="rounds of the interleaved "
                    "1-thread measurement (0: skip it)")
    ap.add_argument("--breakdown-threads", default="1", help="thread counts for which to measure the "
                    "per-part breakdown ('' for none)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    threads = [int(t) for t in args.threads.split(",")]
    breakdown = {int(t) for t in args.breakdown_threads.split(",") if t.strip()}
    noise = args.noise if args.norm in NOISY_NORMS else 0.0
    cfg = TrialConfig(norm=args.norm, noise=noise, batch_size=args.batch, epochs=1, grad_every=1)
    data = synthetic_with_train_size(args.steps * args.batch, cfg)
    n_train = n_train_images(len(data.train_y), cfg)
    seed_images = args.steps * args.batch  # c iterates an epoch of the same size as b's

    variant = args.norm + (f" (noise {noise:g}, {cfg.noise_scope})" if noise else "")
    print(f"throughput: {variant}, device {device}, batch {args.batch}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, reps {args.reps}, {args.steps} timed steps per window "
          f"(+{args.warmup} warm-up; run_trial: one epoch of {n_train} images, "
          f"{math.ceil(n_train / args.batch)} steps, hist_every {cfg.hist_every}, grad_every "
          f"{cfg.grad_every}), synthetic data")
    print(f"load average (1/5/15 min) at start: {loadavg()}", flush=True)

    variants: list[tuple[str, Callable[[], Window]]] = []

    def add(key: str, make: Callable[[], Window]) -> None:
        variants.append((key, make))

    for t in threads:
        def steps_of(obj, t=t):
            torch.set_num_threads(t)
            return time_steps(obj().step, args.steps, args.warmup, device, args.max_window_s)

        add(f"a/{t}", lambda t=t, s=steps_of: s(lambda: BareStep(data, cfg, device)))
        add(f"b/{t}", lambda t=t: run_trial_window(data, cfg, device, t))
        if device.type == "cpu":
            add(f"a_nchw/{t}", lambda t=t, s=steps_of: s(
                lambda: BareStep(data, cfg, device, channels_last=False)))
            add(f"b_nchw/{t}", lambda t=t: run_trial_window(data, cfg, device, t, channels_last=False))
        add(f"c/{t}", lambda t=t, s=steps_of: s(lambda: SeedLoop(data, cfg, device, n_images=seed_images)))
        add(f"c_nohooks/{t}", lambda t=t, s=steps_of: s(
            lambda: SeedLoop(data, cfg, device, hooks=False, n_images=seed_images)))
        add(f"c_loader/{t}", lambda t=t, s=steps_of: s(
            lambda: SeedLoop(data, cfg, device, train=False, n_images=seed_images)))
        if t in breakdown:
            on: set[str] = set()
            for part, _ in PARTS:
                on = on | {part}
                cap = args.steps + args.warmup
                add(f"r_{part}/{t}", lambda t=t, s=steps_of, on=on, cap=cap: s(
                    lambda: ReplicaStep(data, cfg, device, on, cap)))

    # one untimed round of the cheapest variants per thread count: imports, allocator, OpenMP pool
    for t in threads:
        torch.set_num_threads(t)
        time_steps(BareStep(data, cfg, device).step, 10, 2, device)
        run_trial_window(data, cfg, device, t)

    results: dict[str, list[Window]] = {k: [] for k, _ in variants}
    t_start = time.perf_counter()
    for rep in range(args.reps):
        k = (rep * 3) % len(variants)
        for key, make in variants[k:] + variants[:k]:
            results[key].append(make())
        print(f"  rep {rep + 1}/{args.reps} done ({time.perf_counter() - t_start:.0f} s, "
              f"load {loadavg()})", flush=True)

    def ips(key: str) -> list[float]:  # images per wall second
        return [w.images_per_s for w in results[key]]

    def ipc(key: str) -> list[float]:  # images per CPU second of this process
        return [w.images_per_s / max(w.cpu_util, 1e-9) for w in results[key]]

    print(f"\nload average (1/5/15 min) at end: {loadavg()}; total {time.perf_counter() - t_start:.0f} s")
    print("wall: images per wall second; cpu: this process's CPU seconds per wall second (below the "
          "thread count: other processes took the CPU); per CPU-s: images per CPU second of this "
          "process, which other load barely moves for 1-thread variants (for 2 threads it also "
          "counts OpenMP's spin-waiting)")
    for t in threads:
        print(f"\n== {t} torch thread(s), batch {args.batch}, {device} ==")
        print(f"  {'variant':<52}{'wall images/s median [min-max]':>32}  cpu {'per CPU-s':>10}")
        rows = [
            (f"a/{t}", "a  bare step (pre-made floats, no stats)"),
            (f"b/{t}", "b  run_trial, all statistics (step loop)"),
            (f"a_nchw/{t}", "   a in the NCHW layout"),
            (f"b_nchw/{t}", "   b in the NCHW layout"),
            (f"c/{t}", "c  seed-style loop (DataLoader+PIL, .item() stats)"),
            (f"c_nohooks/{t}", "   c without the per-layer .item() moments"),
            (f"c_loader/{t}", "   c's DataLoader + PIL transforms alone"),
        ]
        for key, label in rows:
            if key not in results:
                continue
            cpu = statistics.median(w.cpu_util for w in results[key])
            print(f"  {label:<52}{median_range(ips(key)):>32}  {cpu:.2f} {statistics.median(ipc(key)):10.1f}")
        reported = [w.extra.get("reported", float("nan")) for w in results[f"b/{t}"]]
        print(f"  {'   b as run_trial reports it (images_per_s)':<52}{median_range(reported):>32}")
        print("  ratios, median of per-repetition ratios [min-max]:")
        for name, num, den, goal in (
                ("b / a", "b", "a", GOAL_B_OVER_A), ("b / c", "b", "c", GOAL_B_OVER_C),
                ("a / c", "a", "c", None), ("c_nohooks / c", "c_nohooks", "c", None),
                ("a / a_nchw", "a", "a_nchw", None), ("b / b_nchw", "b", "b_nchw", None)):
            if f"{den}/{t}" not in results:
                continue
            for metric, fn in (("wall", ips), ("CPU", ipc)):
                r, text = ratio_text(fn(f"{num}/{t}"), fn(f"{den}/{t}"))
                met = "met" if goal is not None and r >= goal else "NOT met"
                verdict = "" if goal is None else f"   goal >= {goal:.2f}: {met}"
                print(f"    {name:<14}{metric:<5}{text}{verdict}")
        if t not in breakdown:
            continue
        print(f"  breakdown of b over a: replica of run_trial's step, parts added in turn (ms per step "
              f"of {args.batch}; median of per-rep differences; % of a's step)")
        print(f"    {'':<40}{'CPU ms':>9}{'':>9}{'wall ms':>10}")
        per_step = {m: (lambda key, fn=fn: [args.batch * 1e3 / v for v in fn(key)])
                    for m, fn in (("cpu", ipc), ("wall", ips))}
        bare = {m: f(f"a/{t}") for m, f in per_step.items()}
        prev = dict(bare)
        print(f"    {'a  bare step':<40}{statistics.median(bare['cpu']):9.2f}{'':>9}"
              f"{statistics.median(bare['wall']):10.2f}")
        for part, label in PARTS:
            cells = []
            for m, f in per_step.items():
                cur = f(f"r_{part}/{t}")
                delta = [c - p for c, p in zip(cur, prev[m], strict=True)]
                share = statistics.median([d / b for d, b in zip(delta, bare[m], strict=True)])
                cells.append(f"{statistics.median(delta):+9.2f} ({100 * share:+5.1f}%)")
                prev[m] = cur
            print(f"    {label:<40}{cells[0]}{cells[1]}")
        full = {m: statistics.median(f(f"r_{PARTS[-1][0]}/{t}")) for m, f in per_step.items()}
        run = {m: statistics.median(f(f"b/{t}")) for m, f in per_step.items()}
        print(f"    {'= replica, all parts':<40}{full['cpu']:9.2f}{'':>9}{full['wall']:10.2f}")
        print(f"    {'   run_trial step loop (b)':<40}{run['cpu']:9.2f}{'':>9}{run['wall']:10.2f}")
        _, text = ratio_text(ips(f"r_{PARTS[-1][0]}/{t}"), ips(f"r_{PARTS[0][0]}/{t}"))
        print(f"  statistics alone, stats on / off with the same data pipeline (replica, all parts / "
              f"{PARTS[0][0]} only), wall: {text}")
    if args.interleave_rounds and device.type == "cpu":
        chunk = 5
        print(f"\n== interleaved, 1 torch thread: {args.interleave_rounds} rounds of {chunk} steps of each "
              f"(the steadiest ratios this script gives on a drifting machine) ==", flush=True)
        torch.set_num_threads(1)
        full = {p for p, _ in PARTS}
        cap = (args.interleave_rounds + 2) * chunk
        per_step = interleaved({
            "a": BareStep(data, cfg, device).step,
            "r_data": ReplicaStep(data, cfg, device, {"data"}, cap).step,
            "r_all": ReplicaStep(data, cfg, device, full, cap).step,
            "c": SeedLoop(data, cfg, device, n_images=seed_images).step,
        }, args.interleave_rounds, chunk)
        labels = {"a": "a  bare step", "r_data": "   replica, data pipeline only (statistics off)",
                  "r_all": "   replica, all parts (b's step)", "c": "c  seed-style loop"}
        for k, label in labels.items():
            print(f"  {label:<52}{args.batch / per_step[k].mean():9.1f} images/s"
                  f"  ({1e3 * per_step[k].mean():.2f} ms a step)")
        comparisons = (("b / a  (replica, all parts / bare step)", "r_all", "a", GOAL_B_OVER_A),
                       ("statistics on / off (same data pipeline)", "r_all", "r_data", GOAL_B_OVER_A),
                       ("b / c  (replica, all parts / seed loop)", "r_all", "c", GOAL_B_OVER_C))
        for name, num, den, goal in comparisons:
            r, lo, hi = ratio_of_means(per_step[num], per_step[den])
            met = "met" if r >= goal else "NOT met"
            print(f"    {name:<44}{r:.3f} [95% CI {lo:.3f}-{hi:.3f}]   goal >= {goal:.2f}: {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
