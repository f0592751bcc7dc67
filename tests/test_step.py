"""GraphedTrainStep's logic on the CPU, through an emulation of CUDA-graph semantics.

The eager run is the reference. A graphed run replays recorded operations on static tensors
after a capture that changed nothing (tests/cuda_graph_emulation.py); on the CPU the replayed
operations are the eager ones, so the two runs must agree bit for bit. That holds only if
everything the host does per step (counts, step numbers, images seen) happens outside the
captured work, every tensor a graph touches outlives it (accumulators reset in place, batch
indices through a static buffer), and each replay draws the random numbers the eager step
would have drawn.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import study.step as step_mod
from study.config import TrialConfig
from tests import cuda_graph_emulation as emulation
from tests.conftest import tiny_data
from tests.test_train import collect, comparable


@pytest.fixture
def emulated_graphs(monkeypatch):
    """CUDA-graph semantics on the CPU; a failed capture (an eager fallback) fails the test."""
    monkeypatch.setattr(step_mod, "graph_api", emulation)
    emulation.CAPTURED.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed", category=RuntimeWarning)
        yield emulation.CAPTURED
    emulation.CAPTURED.clear()


def _collect_graphed(cfg, data, **kw):
    return collect(cfg, data, cuda_graph=True, **kw)


@pytest.mark.parametrize("norm,noise,probe_every", [
    ("none", 0.0, 0), ("batch", 0.0, 0), ("noisy_batch", 1.0, 0),
    ("noisy_batch", 1.0, 5),  # probed steps run eagerly between replays
])
def test_graphed_steps_give_the_eager_numbers_bit_for_bit(monkeypatch, emulated_graphs, norm, noise,
                                                           probe_every):
    # 256 training images at batch 24: 10 full steps and a short one (eager); hist_every=3 and
    # grad_every=2 make all four kinds of step; 2 epochs, so epoch 2 starts from the RNG state
    # the replays left
    cfg = TrialConfig(norm=norm, noise=noise, lr=0.01, batch_size=24, epochs=2, seed=4, hist_every=3,
                      grad_every=2, probe_every=probe_every,
                      probe_etas=(0.5, 2.0) if probe_every else ())
    data = tiny_data()
    eager, _, summary = collect(cfg, data, cuda_graph=False)  # the emulation would graph it too
    assert summary["status"] == "done"
    graphed, _, summary = _collect_graphed(cfg, data)
    assert summary["status"] == "done"
    assert [comparable(r) for r in graphed] == [comparable(r) for r in eager]
    if probe_every:
        assert [r["probes"] for r in graphed] == [r["probes"] for r in eager]
        assert graphed[0]["probes"]
    assert len(emulated_graphs) == 4, "one graph per kind of step (histogram x gradient norms)"
    replays = sum(g.replays for g in emulated_graphs)
    full_steps = 2 * (256 // 24)
    probed = sum(1 for s in range(2 * 11) if probe_every and s % probe_every == 0 and s % 11 != 10)
    assert replays == full_steps - 3 - probed  # 3 eager warm-up steps


def test_graphed_resume_gives_the_numbers_of_an_uninterrupted_run(monkeypatch, emulated_graphs):
    cfg = TrialConfig(norm="noisy_batch", noise=1.0, lr=0.01, batch_size=24, epochs=3, seed=2,
                      hist_every=4)
    data = tiny_data()
    straight, _, _ = _collect_graphed(cfg, data)
    first, states, _ = _collect_graphed(cfg, data, stop_after=1)
    buf = io.BytesIO()
    torch.save(states[-1], buf)
    buf.seek(0)
    rest, _, summary = _collect_graphed(cfg, data, resume_from=torch.load(buf, weights_only=False))
    assert summary["status"] == "done"
    assert [comparable(r) for r in first + rest] == [comparable(r) for r in straight]


def test_the_emulation_catches_host_work_inside_a_capture(emulated_graphs):
    """The emulation is strict where a GPU is: a capture runs nothing, a sync inside it fails."""
    x = torch.zeros(3)
    g = emulation.CUDAGraph()
    with emulation.graph(g):
        x.add_(1)
        host_steps = 1  # noqa: F841 -- host code runs once, at capture, never at replay
    assert x.tolist() == [0, 0, 0]
    g.replay()
    g.replay()
    assert x.tolist() == [2, 2, 2]
    with pytest.raises(RuntimeError, match="host synchronisation"), emulation.graph(emulation.CUDAGraph()):
        float(x.sum())


def test_graphs_on_a_cpu_without_the_emulation_are_one_clear_error():
    """A graphed step refuses a CPU; a trial asked for CUDA graphs on a CPU trains eagerly
    (the option applies on a CUDA device only), with the numbers of a trial not asked."""
    from study.model import build_model
    from study.stats import EpochStats
    from study.train import build_optimizer

    model = build_model("batch")
    x, y = torch.zeros(32, 3, 32, 32, dtype=torch.uint8), torch.zeros(32, dtype=torch.int64)
    stats = EpochStats.for_model(model, 2, 8, 8.0, torch.device("cpu"))
    step = step_mod.TrainStep(model, build_optimizer(model, TrialConfig(), torch.device("cpu")), x, y, stats)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        step_mod.GraphedTrainStep(step, 16, [])
    cfg, data = TrialConfig(epochs=1), tiny_data()
    asked, _, _ = collect(cfg, data, cuda_graph=True)
    not_asked, _, _ = collect(cfg, data, cuda_graph=False)
    assert [comparable(r) for r in asked] == [comparable(r) for r in not_asked]


@pytest.mark.parametrize("norm,noise", [("batch", 0.0), ("noisy_batch", 1.0)])
def test_dropping_the_gradients_gives_the_numbers_of_zeroing_them_in_place(monkeypatch, norm, noise):
    """A CPU step lets backward hand over fresh gradients (zero_grad(set_to_none=True)); the
    reference is PyTorch's zeroing in place, which a GPU step (and a graph) keeps."""
    cfg = TrialConfig(norm=norm, noise=noise, lr=0.01, batch_size=24, epochs=2, seed=3, hist_every=3)
    data = tiny_data()
    assert step_mod.grads_to_none(torch.device("cpu"))
    dropped, _, _ = collect(cfg, data)
    monkeypatch.setattr(step_mod, "grads_to_none", lambda device: False)
    in_place, _, _ = collect(cfg, data)
    assert [comparable(r) for r in dropped] == [comparable(r) for r in in_place]
