"""One training step of a trial, run eagerly or replayed from a CUDA graph.

``TrainStep`` is the reference: gather the batch from the device-resident data, augment it
(with the flips and rotations the trial drew for the epoch), forward with taps, backward,
write the step's row of statistics (activation moments, loss, number correct, gradient
norms) and take the optimiser step. All of it is device work; nothing waits for the device.

``GraphedTrainStep`` captures that same device work once per kind of step (with or without
the histogram, with or without gradient norms) into a CUDA graph and replays it. At batch 16
a step is about a hundred small kernels and the GPU waits on their launches, so one replay
per step is what lets a trial use the GPU. The numbers are the eager step's: replay runs the
captured kernels on the same tensors, and the generators a step draws from (the noise's;
dropout's default one) are registered with the graph, so each replay draws the random
numbers the eager step would have drawn next.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
import torch.nn.functional as F

from study.augment import augment_with
from study.model import SeedCNN
from study.stats import EpochStats
from study.sync_debug import syncs_allowed

#: Where ``GraphedTrainStep`` takes CUDAGraph, graph, Stream, stream and current_stream from.
#: tests/cuda_graph_emulation.py puts a CPU emulation of their semantics here.
graph_api = torch.cuda


class Prober(Protocol):
    """What a step asks of its probes (``study.probes.StepProber``): a look before the forward
    pass and one after the backward pass, before the optimiser step."""

    def before_forward(self, step: int) -> None: ...

    def after_backward(self, model: SeedCNN, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                       y: torch.Tensor, loss: torch.Tensor, epoch: int) -> None: ...


def graphs_run_on(device: torch.device) -> bool:
    """Whether ``GraphedTrainStep`` can run on ``device``: a CUDA one, or any where
    ``graph_api`` is an emulation (tests)."""
    return device.type == "cuda" or graph_api is not torch.cuda


def grads_to_none(device: torch.device) -> bool:
    """Whether a step on ``device`` clears its gradients by dropping them (``zero_grad(set_to_none
    =True)``), so that the backward pass hands over fresh tensors: on a CPU that saves the fill
    and the add per parameter of zeroing in place. On a GPU they are zeroed in place, as a
    captured CUDA graph needs (it holds their addresses)."""
    return device.type == "cpu"


class TrainStep:
    """One SGD step and its statistics, in the order the seed's loop takes them.

    ``device_work`` is everything the device does for a step; ``book`` is the host's side (the
    statistics' counts, step numbers, images). Calling the object does both, eagerly.
    """

    def __init__(self, model: SeedCNN, optimizer: torch.optim.Optimizer, train_x: torch.Tensor,
                 train_y: torch.Tensor, stats: EpochStats) -> None:
        self.model, self.opt = model, optimizer
        self.params = list(model.parameters())
        self.train_x, self.train_y, self.stats = train_x, train_y, stats
        self.grads_to_none = grads_to_none(train_x.device)

    def reset(self) -> None:
        """Empty the epoch's statistics, in place (a captured graph holds them)."""
        self.stats.reset()

    def __call__(self, idx: torch.Tensor, theta: torch.Tensor, step: int, hist: bool, grad: bool,
                 prober: Prober | None = None, epoch: int = 0) -> None:
        numels = self.device_work(idx, theta, hist, grad, prober, step, epoch)
        self.book(numels, step, grad, len(idx))

    def device_work(self, idx: torch.Tensor, theta: torch.Tensor, hist: bool, grad: bool,
                    prober: Prober | None = None, step: int = 0, epoch: int = 0) -> list[int]:
        """Train on the images at ``idx``, each flipped and rotated by its ``theta``
        (``study.augment.augment_thetas``); returns the taps' element counts for ``book``."""
        # index_select, not x[idx]: the same gather without advanced indexing's overhead on a CPU
        x = augment_with(self.train_x.index_select(0, idx), theta)
        y = self.train_y.index_select(0, idx)
        taps = self.stats.tap_reducer(hist)  # reduces each layer's activations as they are made
        if prober is not None:
            prober.before_forward(step)
        logits = self.model(x, taps)
        loss = F.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=self.grads_to_none)
        loss.backward()
        numels = self.stats.accumulate(taps, loss=loss, logits=logits, y=y,
                                       grads=[p.grad for p in self.params] if grad else None)
        if prober is not None:  # before the optimiser step; changes nothing
            prober.after_backward(self.model, self.opt, x, y, loss, epoch)
        self.opt.step()
        return numels

    def book(self, numels: list[int], step: int, grad: bool, n_images: int) -> None:
        self.stats.count(numels, step, grad, n_images)


class GraphedTrainStep:
    """``TrainStep`` replayed from CUDA graphs, for full batches (same shapes every step).

    The first ``warmup`` calls run eagerly on a side stream (real steps: cuDNN, cuBLAS and the
    optimiser's momentum buffers are set up before any capture, as PyTorch's CUDA-graph notes
    ask). Each kind of step (histogram or not, gradient norms or not) is then captured the
    first time it comes and replayed ever after; the step's batch indices and thetas go in
    through static buffers. If a capture fails, the trial warns once and goes on eagerly.
    """

    def __init__(self, step: TrainStep, batch_size: int, generators: list[torch.Generator],
                 warmup: int = 3) -> None:
        dev = step.train_x.device
        if not graphs_run_on(dev):
            raise ValueError(f"CUDA graphs need a CUDA device; this trial runs on {dev}")
        self.step, self.generators, self.warmup = step, list(generators), warmup
        step.grads_to_none = False  # the graphs hold the gradients' addresses
        self.idx = torch.zeros(batch_size, dtype=torch.int64, device=dev)
        self.theta = torch.zeros(batch_size, 2, 3, dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[bool, bool], tuple[torch.cuda.CUDAGraph, list[int]]] = {}
        self.side = graph_api.Stream(dev)
        self.failed: str | None = None

    def __call__(self, idx: torch.Tensor, theta: torch.Tensor, step: int, hist: bool, grad: bool) -> None:
        if len(idx) != len(self.idx):
            raise ValueError(f"a graphed step takes batches of {len(self.idx)}, not {len(idx)}")
        if self.failed is not None:
            self.step(idx, theta, step, hist, grad)
            return
        if self.warmup > 0:
            self.side.wait_stream(graph_api.current_stream())
            with graph_api.stream(self.side):
                self.step(idx, theta, step, hist, grad)
            graph_api.current_stream().wait_stream(self.side)
            self.warmup -= 1
            return
        key = (hist, grad)
        if key not in self.graphs and not self._capture(key):
            self.step(idx, theta, step, hist, grad)
            return
        graph, numels = self.graphs[key]
        self.idx.copy_(idx)
        self.theta.copy_(theta)
        graph.replay()
        self.step.book(numels, step, grad, len(idx))

    def _capture(self, key: tuple[bool, bool]) -> bool:
        """Capture the device work of one kind of step (it does not run; a replay runs it)."""
        graph = graph_api.CUDAGraph()
        try:
            for g in self.generators:  # the default generator (dropout) is registered by capture
                graph.register_generator_state(g)
            with syncs_allowed(), graph_api.graph(graph):  # capturing synchronises, once
                numels = self.step.device_work(self.idx, self.theta, *key)
        except Exception as e:  # noqa: BLE001 -- any capture failure: the eager step is the reference
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA graph capture failed, training eagerly instead ({self.failed})",
                          RuntimeWarning, stacklevel=3)
            return False
        self.graphs[key] = (graph, numels)
        return True
