"""One trial's training loop: plain PyTorch, no Ray, checkpointable at every epoch.

Read top to bottom: set up (data on the device, model, optimiser, generators), then per
epoch: shuffle and draw every image's flip and rotation; take the steps (``study.step``:
augment, forward, backward, statistics on the device, SGD; eagerly, or replayed from CUDA
graphs); evaluate; hand the epoch's rows and a checkpointable state to ``on_epoch``.
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from study.augment import augment_thetas, normalise
from study.config import TrialConfig
from study.data import DataArrays, train_val_split
from study.model import SeedCNN, build_model
from study.probes import StepProber
from study.stats import EpochStats, weight_norm_rows
from study.step import GraphedTrainStep, TrainStep, graphs_run_on

#: How often (in steps) a CPU trial looks at the loss for divergence. A look would wait for a
#: GPU, so there the loop looks only at the end of the epoch (a lost epoch is cheap there).
DIVERGENCE_CHECK_EVERY = 100

#: The file a checkpoint holds ``run_trial``'s state in (study.trainable writes it).
STATE_FILE = "state.pt"

EpochCallback = Callable[[dict, dict], None]


@dataclass(frozen=True)
class RunOptions:
    """How a trial runs, as opposed to what it computes (its ``TrialConfig``).

    ``device``: where it trains (None or "auto": a GPU if there is one). ``threads``: torch's
    process-wide thread count (None: left as it is). ``cuda_graph``: replay the full batches'
    steps from CUDA graphs, with the eager step's numbers; it applies on a CUDA device only
    (tests/test_gpu.py and bench/gpu_check.sh check it there). ``cpu_channels_last``: the
    model's memory layout on a CPU, where channels-last convolutions are faster (speed only:
    tests/test_train.py). ``step_loop_context``: entered around each epoch's step loop; tests
    put torch.cuda's sync-debug mode there to prove the steps never wait for the device, and
    the benches a timer.
    """

    device: str | None = None
    threads: int | None = None
    cuda_graph: bool = True
    cpu_channels_last: bool = True
    step_loop_context: Callable[[], AbstractContextManager] = contextlib.nullcontext


def disable_tf32() -> None:
    """Keep float32 convolutions and matmuls in full float32 on GPUs that could use TF32 for them
    (cuDNN does by default), so that a trial's numbers do not depend on the card it ran on.
    Process-wide: called where a trial or an evaluation of one starts."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@dataclass
class DeviceData:
    """The trial's splits as uint8 tensors on the training device (loaded once)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @classmethod
    def from_arrays(cls, data: DataArrays, cfg: TrialConfig, device: torch.device) -> DeviceData:
        train_idx, val_idx = train_val_split(len(data.train_y), cfg.val_fraction, cfg.split_seed)
        with warnings.catch_warnings():  # arrays from Ray's object store are read-only; we never write
            warnings.simplefilter("ignore", UserWarning)
            x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
            tx, ty = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)
        ti, vi = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        return cls(
            *(t.to(device) for t in (x[ti], y[ti].long(), x[vi], y[vi].long(), tx, ty.long()))
        )


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_optimizer(model: SeedCNN, cfg: TrialConfig, device: torch.device) -> torch.optim.SGD:
    """The trial's SGD with momentum. On a CPU it is PyTorch's fused kernel (one pass over each
    parameter for momentum and update, faster than the per-parameter loop). On a GPU it is
    PyTorch's default (foreach), the path the CUDA-graph step was written and tested against."""
    fused = {"fused": True} if device.type == "cpu" else {}
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, **fused)


def trial_seeds(seed: int) -> tuple[int, int, int]:
    """Independent seeds for (global torch RNG: init + dropout, data order + augmentation, noise)."""
    return tuple(int(s) for s in np.random.SeedSequence(seed).generate_state(3, dtype=np.uint32))


@torch.no_grad()
def evaluate(model: SeedCNN, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode: BN running statistics, no dropout, no noise; NaN
    for no images."""
    if len(y) == 0:
        return float("nan"), float("nan")
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, len(y), batch):
        logits = model(normalise(x[i : i + batch]))
        loss_sum += F.cross_entropy(logits, y[i : i + batch], reduction="sum")
        correct += (logits.argmax(1) == y[i : i + batch]).sum()
    model.train()
    return float(loss_sum) / len(y), int(correct) / len(y)


def _rng_state(gens: dict[str, torch.Generator], dev: torch.device) -> dict:
    """Every RNG the trial draws from; CUDA's only for the trial's own device, so a checkpoint
    restores on a node that shows a different number of GPUs."""
    state = {name: g.get_state() for name, g in gens.items()}
    state["torch"] = torch.get_rng_state()
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def _set_rng_state(gens: dict[str, torch.Generator], state: dict, dev: torch.device) -> None:
    for name, g in gens.items():
        g.set_state(state[name])
    torch.set_rng_state(state["torch"])
    if dev.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dev)


def run_trial(
    cfg: TrialConfig,
    data: DataArrays,
    on_epoch: EpochCallback | None = None,
    resume_from: dict | None = None,
    options: RunOptions | None = None,
) -> dict:
    """Train one trial; call ``on_epoch(record, state)`` after every epoch.

    ``record`` holds the epoch's rows for the results tables (``epoch``: a dict,
    ``layers``: a list of dicts, the activation rows then the weight norms, ``steps``: a
    dict of columns) and ``status``;
    ``state`` is a ``torch.save``-able dict that ``resume_from`` continues from,
    giving the same numbers as a run that never stopped; it holds the live model's and
    optimiser's tensors, so save it during the call (later epochs change them).
    ``options``: where and how it runs (``RunOptions``; None: the defaults). Returns a
    summary dict.
    """
    options = RunOptions() if options is None else options
    dev = pick_device(options.device)
    cuda_graph = options.cuda_graph and graphs_run_on(dev)
    if options.threads:
        torch.set_num_threads(options.threads)
    disable_tf32()
    seed_torch, seed_data, seed_noise = trial_seeds(cfg.seed)
    torch.manual_seed(seed_torch)
    gens = {
        "data": torch.Generator(dev).manual_seed(seed_data),
        "noise": torch.Generator(dev).manual_seed(seed_noise),
    }

    d = DeviceData.from_arrays(data, cfg, dev)
    model = build_model(cfg.norm, cfg.noise, cfg.noise_scope, cfg.p, cfg.groups).to(dev)
    if dev.type == "cpu" and options.cpu_channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.set_noise_generator(gens["noise"])
    opt = build_optimizer(model, cfg, dev)
    prober = StepProber(cfg.probe_every, cfg.probe_etas, cfg.lr)  # Santurkar's probes (0: off)

    first_epoch, history, status, elapsed = 1, [], "running", 0.0
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        opt.load_state_dict(resume_from["optimizer"])
        _set_rng_state(gens, resume_from["rng"], dev)
        first_epoch = resume_from["epoch"] + 1
        history, status = list(resume_from["history"]), resume_from["status"]
        elapsed = resume_from["elapsed_s"]

    n_train, bs = len(d.train_y), cfg.batch_size
    check_often = dev.type == "cpu"
    steps_per_epoch = math.ceil(n_train / bs)
    # the epoch's statistics live for the whole trial: a captured graph holds their addresses
    stats = EpochStats.for_model(model, steps_per_epoch, cfg.hist_bins, cfg.hist_range, dev)
    train_step = TrainStep(model, opt, d.train_x, d.train_y, stats)
    # the graphs draw only the noise (the data generator's order and augmentation are drawn
    # eagerly at each epoch's start), so only the noise generator is registered with them
    graphed = GraphedTrainStep(train_step, bs, [gens["noise"]]) if cuda_graph else None
    model.train()
    epoch = first_epoch
    while epoch <= cfg.epochs and status == "running":
        t0 = time.perf_counter()
        train_step.reset()
        order = torch.randperm(n_train, generator=gens["data"], device=dev)
        thetas = augment_thetas(n_train, gens["data"], *d.train_x.shape[-2:])  # each slot's flip, rotation
        batches = list(zip(order.split(bs), thetas.split(bs), strict=True))  # views, made at once
        with options.step_loop_context():
            for i in range(steps_per_epoch):
                idx, theta = batches[i]
                step = (epoch - 1) * steps_per_epoch + i
                hist, grad = i % cfg.hist_every == 0, i % cfg.grad_every == 0
                if graphed is not None and len(idx) == bs and not prober.due(step):
                    graphed(idx, theta, step, hist, grad)
                else:
                    train_step(idx, theta, step, hist, grad, prober, epoch)
                if check_often and (i + 1) % DIVERGENCE_CHECK_EVERY == 0 and not stats.losses_finite():
                    status = "diverged"
                    break
        if dev.type == "cuda":  # the epoch's one wait for the device, so the timing is true
            torch.cuda.synchronize(dev)
        train_s = time.perf_counter() - t0
        epoch_stats, seen = stats.finish(), stats.seen
        if not math.isfinite(epoch_stats["loss_sum"]):
            status = "diverged"

        steps = epoch_stats["steps"]
        if status == "diverged":
            val_loss = val_acc = test_loss = test_acc = float("nan")
            bad = np.flatnonzero(~np.isfinite(steps["loss"]))
            if bad.size:  # keep rows up to and including the first non-finite loss
                steps = {k: v[: bad[0] + 1] for k, v in steps.items()}
        else:
            val_loss, val_acc = evaluate(model, d.val_x, d.val_y, cfg.eval_batch_size)
            test_loss, test_acc = evaluate(model, d.test_x, d.test_y, cfg.eval_batch_size)
        norms = steps["grad_norm"].astype(np.float64)
        norms = norms[np.isfinite(norms)]
        wall = time.perf_counter() - t0
        elapsed += wall
        row = dict(
            epoch=epoch,
            train_loss=epoch_stats["loss_sum"] / max(seen, 1),
            train_acc=epoch_stats["correct"] / max(seen, 1),
            val_loss=val_loss,
            val_acc=val_acc,
            test_loss=test_loss,
            test_acc=test_acc,
            lr=opt.param_groups[0]["lr"],
            steps=stats.steps,
            wall_s=wall,
            images_per_s=seen / train_s,
            diverged=status == "diverged",
            grad_norm_mean=float(norms.mean()) if norms.size else float("nan"),
            grad_norm_std=float(norms.std()) if norms.size else float("nan"),
            grad_norm_max=float(norms.max()) if norms.size else float("nan"),
        )
        if status == "running" and epoch == cfg.epochs:
            status = "done"
        history.append(row)
        steps["epoch"] = np.full(len(steps["step"]), epoch, dtype=np.int64)
        layers = epoch_stats["layers"] + weight_norm_rows(model)  # the weights after the epoch
        record = dict(epoch=row, layers=layers, steps=steps, status=status)
        record["probes"] = prober.take_rows()
        state = dict(
            epoch=epoch,
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            rng=_rng_state(gens, dev),
            history=history,
            status=status,
            elapsed_s=elapsed,
            config=cfg.to_dict(),
        )
        if on_epoch is not None:
            on_epoch(record, state)
        epoch += 1

    last = history[-1] if history else {}
    return dict(
        status=status,
        epochs_done=len(history),
        wall_s=elapsed,
        host=socket.gethostname(),
        device=str(dev),
        final=last,
        history=history,
    )
