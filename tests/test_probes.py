"""Santurkar et al.'s probes: known answers on small models, and no effect on training."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study import results
from study.config import DEFAULT_ETA_MULTIPLES, TrialConfig
from study.data import DataArrays
from study.model import SeedCNN
from study.probes import (
    LANDSCAPE_KEYS,
    Block,
    StepProber,
    cnn_blocks,
    landscape,
    probe_module,
    probe_rows,
    probe_step,
    save_rng,
)
from study.results import PROBE_LAYERS
from study.train import RunOptions, run_trial
from tests.conftest import tiny_data

F64 = torch.float64


def test_default_grid_is_the_papers_and_the_sweeps():
    ratios = [b / a for a, b in zip(DEFAULT_ETA_MULTIPLES, DEFAULT_ETA_MULTIPLES[1:], strict=False)]
    assert ratios == pytest.approx([ratios[0]] * 7, rel=1e-12)  # log-spaced
    assert len(DEFAULT_ETA_MULTIPLES) == 8
    assert DEFAULT_ETA_MULTIPLES[0] == 0.5 and DEFAULT_ETA_MULTIPLES[-1] == pytest.approx(4.0, rel=1e-15)


# ------------------------------------------------------------------ ICS against closed forms

def linear_stack(seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False),
                        nn.Linear(3, 2, bias=False)).to(F64)
    x, y = torch.randn(7, 4, dtype=F64), torch.randn(7, 2, dtype=F64)
    return net, x, y


def half_sq(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum() / len(y)


def by_hand_grads(ws: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Gradients of 0.5/n ||x W1' W2' W3' - y||^2 (W as stored by nn.Linear: out × in)."""
    h = [x]
    for w in ws:
        h.append(h[-1] @ w.T)
    back = (h[-1] - y) / len(y)
    grads = [None] * len(ws)
    for k in reversed(range(len(ws))):
        grads[k] = back.T @ h[k]
        back = back @ ws[k]
    return grads


def test_ics_matches_the_closed_form_on_a_linear_network_with_momentum():
    net, x, y = linear_stack()
    lr, mu = 0.3, 0.9
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=mu)
    half_sq(net(x), y).backward()  # one earlier step, so the momentum buffers are not zero
    opt.step()
    opt.zero_grad()
    half_sq(net(x), y).backward()

    ws = [m.weight.detach().numpy().copy() for m in net]
    bufs = [opt.state[m.weight]["momentum_buffer"].numpy().copy() for m in net]
    xn, yn = x.numpy(), y.numpy()
    g = by_hand_grads(ws, xn, yn)
    assert all(np.allclose(gk, m.weight.grad.numpy(), rtol=1e-13) for gk, m in zip(g, net, strict=True))
    new = [w - lr * (mu * b + gk) for w, b, gk in zip(ws, bufs, g, strict=True)]  # SGD with momentum

    blocks = [Block(f"l{k}", f"{k}.weight", (f"{k}.weight",)) for k in range(3)]
    got = probe_module(net, opt, (x,), lambda out: half_sq(out, y), blocks, None, [0.1])
    for k in range(3):  # layer k sees layers < k at t+1, layers >= k at t
        g2 = by_hand_grads(new[:k] + ws[k:], xn, yn)[k]
        l2 = np.linalg.norm(g[k] - g2)
        cos = (g[k] * g2).sum() / (np.linalg.norm(g[k]) * np.linalg.norm(g2))
        assert got["ics_l2"][f"l{k}"] == pytest.approx(l2, rel=1e-10, abs=1e-15)
        assert got["ics_cos"][f"l{k}"] == pytest.approx(cos, rel=1e-12)
    assert got["ics_l2"]["l0"] == 0 and got["ics_cos"]["l0"] == 1
    assert got["ics_l2"]["l2"] > 0 and got["ics_cos"]["l2"] < 1

    # Nothing changed: the real step still applies exactly the update the probe assumed.
    assert all(np.array_equal(m.weight.detach().numpy(), w) for m, w in zip(net, ws, strict=True))
    assert all(np.array_equal(opt.state[m.weight]["momentum_buffer"].numpy(), b)
               for m, b in zip(net, bufs, strict=True))
    opt.step()
    assert all(np.allclose(m.weight.detach().numpy(), w, rtol=1e-14) for m, w in zip(net, new, strict=True))


class Quadratic(nn.Module):
    """L(w) = 1/2 w^T A w + b^T w with w = (u, v): two blocks, so ICS has a closed form too."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor, split: int, b: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", torch.zeros_like(w) if b is None else b)
        self.u = nn.Parameter(w[:split].clone())
        self.v = nn.Parameter(w[split:].clone())

    def forward(self, _x: torch.Tensor) -> torch.Tensor:
        w = torch.cat([self.u, self.v])
        return 0.5 * w @ self.a @ w + self.b @ w


def quadratic(seed: int = 1, n: int = 6, split: int = 2):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=F64)
    a = (m + m.T) / 2  # symmetric, indefinite: the loss along -g is a parabola either way up
    w = torch.randn(n, generator=gen, dtype=F64)
    return Quadratic(a, w, split), a, w


@pytest.mark.parametrize("lr", [0.05, 0.5])
def test_landscape_matches_the_closed_form_on_a_quadratic(lr):
    model, a, w = quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = model(None)
    loss.backward()
    g = a @ w
    assert torch.allclose(torch.cat([model.u.grad, model.v.grad]), g, rtol=1e-14)
    etas = [e * lr for e in DEFAULT_ETA_MULTIPLES]
    blocks = [Block("u", "u", ("u",)), Block("v", "v", ("v",))]
    got = probe_module(model, opt, (None,), lambda out: out, blocks, None, etas)

    l0, gg, gag, ag = float(loss.detach()), float(g @ g), float(g @ a @ g), float(torch.linalg.norm(a @ g))
    along = [l0 - eta * gg + 0.5 * eta**2 * gag for eta in etas]
    assert got["loss_min"] == pytest.approx(min(along), rel=1e-12)
    assert got["loss_max"] == pytest.approx(max(along), rel=1e-12)
    assert got["grad_pred"] == pytest.approx(max(etas) * ag, rel=1e-12)  # ||-eta A g||, largest eta
    assert got["beta_smooth"] == pytest.approx(ag / math.sqrt(gg), rel=1e-12)  # the same for every eta

    # ICS of v: G - G' = A_vu (u - u') = lr A_vu g_u (plain SGD); u comes first, so its ICS is 0.
    a_vu, g_u = a[2:, :2], g[:2]
    gv, gv2 = g[2:], g[2:] - lr * a_vu @ g_u
    assert got["ics_l2"]["v"] == pytest.approx(float(torch.linalg.norm(lr * a_vu @ g_u)), rel=1e-10)
    cos = float(gv @ gv2 / (torch.linalg.norm(gv) * torch.linalg.norm(gv2)))
    assert got["ics_cos"]["v"] == pytest.approx(cos, rel=1e-12)
    assert (got["ics_l2"]["u"], got["ics_cos"]["u"]) == (0.0, 1.0)


@pytest.mark.parametrize("definite", [True, False])
def test_loss_beyond_first_order_is_the_curvature_term_on_a_quadratic(definite):
    """On L(w) = 1/2 w^T H w + b^T w, L(w - eta g) - L(w) + eta ||g||^2 = 1/2 eta^2 g^T H g
    exactly, and the gradient change ÷ ||eta g|| is ||H g|| / ||g|| at every eta. Reference:
    numpy float64 from the definitions, g = H w + b by hand; the weight norms are the blocks'."""
    rng = np.random.default_rng(3)
    m = rng.normal(size=(5, 5))
    h = m @ m.T + 0.5 * np.eye(5) if definite else (m + m.T) / 2  # convex, or a saddle
    w, b = rng.normal(size=5), rng.normal(size=5)
    model = Quadratic(torch.tensor(h), torch.tensor(w), 3, torch.tensor(b))
    lr = 0.02
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model(None).backward()
    etas = [e * lr for e in DEFAULT_ETA_MULTIPLES]
    blocks = [Block("u", "u", ("u",)), Block("v", "v", ("v",))]
    got = probe_module(model, opt, (None,), lambda out: out, blocks, None, etas)

    def loss(x):
        return 0.5 * x @ h @ x + b @ x

    g = h @ w + b
    dev = [loss(w - eta * g) - loss(w) + eta * (g @ g) for eta in etas]
    curvature = [0.5 * eta**2 * (g @ h @ g) for eta in etas]
    np.testing.assert_allclose(dev, curvature, rtol=1e-9)  # the reference is the closed form
    assert got["loss_dev_min"] == pytest.approx(min(curvature), rel=1e-8, abs=1e-14)
    assert got["loss_dev_max"] == pytest.approx(max(curvature), rel=1e-8, abs=1e-14)
    assert (got["loss_dev_min"] > 0) == definite
    betas = [np.linalg.norm((h @ (w - eta * g) + b) - g) / (eta * np.linalg.norm(g)) for eta in etas]
    assert got["beta_smooth"] == pytest.approx(max(betas), rel=1e-12)
    assert got["beta_smooth"] == pytest.approx(np.linalg.norm(h @ g) / np.linalg.norm(g), rel=1e-12)
    assert got["weight_norm"] == pytest.approx({"u": np.linalg.norm(w[:3]), "v": np.linalg.norm(w[3:])},
                                               rel=1e-15)


def test_landscape_takes_the_maxima_over_the_step_sizes():
    """On L(w) = w^4/4 - w^2 along -g, with step sizes out of order, the largest gradient
    change and the largest beta come at different etas, neither of them the last (float64,
    by hand from the definitions)."""
    w0, etas = 1.5, [0.4, 2.0, 8.0]

    def loss(w):
        return w**4 / 4 - w**2

    def grad(w):
        return w**3 - 2 * w

    g = grad(w0)
    moved = [w0 - eta * g for eta in etas]
    change = [abs(grad(w) - g) for w in moved]
    beta = [c / (eta * abs(g)) for c, eta in zip(change, etas, strict=True)]
    assert change.index(max(change)) == 1 and beta.index(max(beta)) == 0  # the test's premise
    got = landscape(lambda v: loss(v["w"]).sum(), {"w": torch.tensor([w0], dtype=F64)},
                    {"w": torch.tensor([g], dtype=F64)}, etas)
    assert got["grad_pred"] == pytest.approx(max(change), rel=1e-12)
    assert got["beta_smooth"] == pytest.approx(max(beta), rel=1e-12)
    assert got["loss_min"] == pytest.approx(min(map(loss, moved)), rel=1e-12)
    assert got["loss_max"] == pytest.approx(max(map(loss, moved)), rel=1e-12)


@pytest.mark.parametrize("norm", ["none", "batch", "noisy_batch"])
def test_cnn_blocks_hold_each_conv_with_its_own_norm(norm):
    """Block i is conv_i with norm_i's affine (the layer the norm normalises), then fc1, fc2."""
    blocks = cnn_blocks(SeedCNN(norm, 1.0 if norm == "noisy_batch" else 0.0))
    assert [b.layer for b in blocks] == list(PROBE_LAYERS)
    for i, b in enumerate(blocks):
        module = f"blocks.{i}.conv" if b.layer.startswith("conv") else b.layer  # conv_i: block i-1
        want = {f"{module}.weight", f"{module}.bias"}
        if norm != "none" and b.layer.startswith("conv"):
            want |= {f"blocks.{i}.norm.weight", f"blocks.{i}.norm.bias"}
        assert set(b.params) == want and b.weight == f"{module}.weight"


# ------------------------------------------------------------ the CNN: replay, nothing changed

def snapshot(model: SeedCNN, opt: torch.optim.Optimizer, gens: list[torch.Generator]) -> dict:
    return dict(
        state={k: v.clone() for k, v in model.state_dict().items()},
        grads=[p.grad.clone() for p in model.parameters()],
        opt=[{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()],
        rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        gens=[g.get_state() for g in gens],
        noise=[(m.freeze_noise, m._last) for m in model.noisy_layers()],
    )


def assert_same(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    assert all(torch.equal(p, q) for p, q in zip(a["grads"], b["grads"], strict=True))
    for sa, sb in zip(a["opt"], b["opt"], strict=True):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["rng"], b["rng"])
    assert all(torch.equal(p, q) for p, q in zip(a["cuda_rng"], b["cuda_rng"], strict=True))
    assert all(torch.equal(p, q) for p, q in zip(a["gens"], b["gens"], strict=True))
    for (fa, la), (fb, lb) in zip(a["noise"], b["noise"], strict=True):
        assert fa == fb and la[0] is lb[0] and la[1] is lb[1]  # the very same sample, not redrawn


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def cnn_step(norm: str, noise: float, seed: int = 0, device: str = "cpu"):
    """A CNN one step into training (momentum state present), then the next step's forward and
    backward, with the RNG saved before that forward, as train.py does."""
    torch.manual_seed(seed)
    model = SeedCNN(norm, noise).to(device)
    gen = torch.Generator(device).manual_seed(seed + 1)
    model.set_noise_generator(gen)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(16, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    before = save_rng()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return model, opt, x, y, loss, before, [gen]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,noise", [("none", 0.0), ("batch", 0.0), ("noisy_batch", 1.0)])
def test_cnn_probe_replays_the_step_and_changes_nothing(norm, noise, device):
    model, opt, x, y, loss, before, gens = cnn_step(norm, noise, device=device)
    snap = snapshot(model, opt, gens)
    # eta = 0 replays the step itself: the same loss and the same gradient (to the bit on the
    # CPU; cuDNN's weight gradients may sum in another order), which holds only if the dropout
    # masks and the noise sample are the step's.
    got = probe_step(model, opt, x, y, before, [0.0])
    assert got["loss_min"] == got["loss_max"] == float(loss.detach())
    assert got["loss_dev_min"] == got["loss_dev_max"] == 0.0  # L(W) is the step's loss, replayed
    g_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    assert got["grad_pred"] <= (0.0 if device == "cpu" else 1e-5 * g_norm)
    assert math.isnan(got["beta_smooth"]) or device != "cpu"
    assert_same(snap, snapshot(model, opt, gens))
    got = probe_step(model, opt, x, y, before, [0.01 * e for e in DEFAULT_ETA_MULTIPLES])
    assert_same(snap, snapshot(model, opt, gens))
    assert set(got["ics_l2"]) == set(got["ics_cos"]) == set(PROBE_LAYERS)
    assert got["ics_l2"]["conv1"] == 0.0
    assert all(got["ics_l2"][k] > 0 and -1 <= got["ics_cos"][k] < 1 for k in PROBE_LAYERS[1:])
    assert got["grad_pred"] > 0 and got["beta_smooth"] > 0 and got["loss_min"] < got["loss_max"]
    weights = {"conv1": model.blocks[0].conv.weight, "conv2": model.blocks[1].conv.weight,
               "conv3": model.blocks[2].conv.weight, "fc1": model.fc1.weight, "fc2": model.fc2.weight}
    assert got["weight_norm"] == pytest.approx(
        {k: float(torch.linalg.vector_norm(w.detach().double())) for k, w in weights.items()}, rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_without_the_saved_rng_the_dropout_masks_differ(device):
    """The replay test above has teeth: other dropout masks give another loss."""
    model, opt, x, y, loss, _, _ = cnn_step("batch", 0.0, device=device)
    got = probe_step(model, opt, x, y, save_rng(), [0.0])  # the post-step state: new masks
    assert got["loss_min"] != float(loss.detach()) and got["grad_pred"] > 0


def test_step_prober_skips_a_non_finite_step_and_names_rows():
    model, opt, x, y, loss, _, _ = cnn_step("batch", 0.0)
    prober = StepProber(2, (), 0.01)
    assert prober.etas == pytest.approx([0.01 * e for e in DEFAULT_ETA_MULTIPLES])
    prober.before_forward(3)  # not due
    prober.after_backward(model, opt, x, y, loss, 1)
    prober.before_forward(4)
    prober.after_backward(model, opt, x, y, torch.tensor(float("nan")), 1)
    assert prober.take_rows() == []
    prober.before_forward(6)
    prober.after_backward(model, opt, x, y, loss, 2)
    rows = prober.take_rows()
    assert [(r["step"], r["epoch"], r["layer"]) for r in rows] == [(6, 2, n) for n in PROBE_LAYERS]
    assert prober.take_rows() == []


def test_probe_rows_fit_the_probes_table():
    result = dict(ics_l2={n: 1.0 for n in PROBE_LAYERS}, ics_cos={n: 0.5 for n in PROBE_LAYERS},
                  weight_norm={n: float(i) for i, n in enumerate(PROBE_LAYERS)},
                  loss_min=1.0, loss_max=2.0, loss_dev_min=0.1, loss_dev_max=0.2, grad_pred=3.0,
                  beta_smooth=float("nan"))
    rows = probe_rows(12, 3, result)
    table = results.to_arrow("probes", [dict(r, trial_id="t") for r in rows])
    assert isinstance(table, pa.Table) and table.num_rows == len(PROBE_LAYERS)
    assert table.column("layer").to_pylist() == list(PROBE_LAYERS)
    assert table.column("weight_norm").to_pylist() == [float(i) for i in range(len(PROBE_LAYERS))]
    assert table.column("loss_dev_max").to_pylist() == [0.2] * len(PROBE_LAYERS)
    assert set(table.schema.names) == set(results.TABLES["probes"].names)


# ---------------------------------------------------------------- run_trial: on = off, to the bit

def run(cfg: TrialConfig, data: DataArrays):
    records, states = [], []
    summary = run_trial(cfg, data, lambda r, s: (records.append(r), states.append(s)),
                        options=RunOptions(device="cpu"))
    return records, states, summary


TIMING = ("wall_s", "images_per_s")


def same_numbers(a: tuple, b: tuple) -> None:
    (ra, sa, suma), (rb, sb, sumb) = a, b
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        assert {k: v for k, v in x["epoch"].items() if k not in TIMING} == \
               {k: v for k, v in y["epoch"].items() if k not in TIMING}
        assert x["layers"] == y["layers"] and x["status"] == y["status"]
        assert x["steps"].keys() == y["steps"].keys()
        assert all(np.array_equal(x["steps"][k], y["steps"][k]) for k in x["steps"])
    for x, y in zip(sa, sb, strict=True):  # the checkpoints: weights, optimiser, every RNG
        assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])
        assert str(x["optimizer"]["param_groups"]) == str(y["optimizer"]["param_groups"])
        for k, st in x["optimizer"]["state"].items():
            assert torch.equal(st["momentum_buffer"], y["optimizer"]["state"][k]["momentum_buffer"])
        assert x["rng"].keys() == y["rng"].keys()
        assert all(torch.equal(x["rng"][k], y["rng"][k]) for k in x["rng"])
    strip = lambda s: {k: v for k, v in s.items() if k not in TIMING}  # noqa: E731
    assert [strip(h) for h in suma["history"]] == [strip(h) for h in sumb["history"]]
    assert suma["status"] == sumb["status"]


@pytest.mark.parametrize("norm,noise", [("none", 0.0), ("batch", 0.0), ("noisy_batch", 1.0)])
def test_probes_do_not_change_training(norm, noise):
    data = tiny_data()
    off = TrialConfig(norm=norm, noise=noise, epochs=2, lr=0.01, grad_every=2)
    on = TrialConfig(norm=norm, noise=noise, epochs=2, lr=0.01, grad_every=2, probe_every=3)
    a, b = run(off, data), run(on, data)
    same_numbers(a, b)
    assert all(r["probes"] == [] for r in a[0])

    steps_per_epoch = 256 // 16  # 320 images, 20% held out for validation, batches of 16
    for epoch, record in enumerate(b[0], start=1):
        rows = record["probes"]
        steps = [s for s in range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch) if s % 3 == 0]
        assert [(r["step"], r["epoch"], r["layer"]) for r in rows] == \
               [(s, epoch, n) for s in steps for n in PROBE_LAYERS]
        assert all(math.isfinite(r[k]) for r in rows for k in r if k not in ("step", "epoch", "layer"))
        for s in steps:
            mine = [r for r in rows if r["step"] == s]
            assert len({tuple(r[k] for k in LANDSCAPE_KEYS) for r in mine}) == 1  # per step
            assert mine[0]["loss_min"] <= mine[0]["loss_max"]
            assert mine[0]["ics_l2"] == 0.0 and mine[0]["ics_cos"] == 1.0  # conv1: nothing before it
        results.to_arrow("probes", [dict(r, trial_id="t") for r in rows])  # fits the schema


@CUDA
def test_probes_do_not_change_training_on_cuda():
    """On a GPU, where two runs without probes agree (cuDNN may not), with probes agrees too."""
    data = tiny_data()
    cfg = TrialConfig(norm="noisy_batch", noise=1.0, epochs=2, lr=0.01, grad_every=2)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        runs = [run_trial(c, data, lambda r, s: None, options=RunOptions(device="cuda"))["history"]
                for c in (cfg, cfg, TrialConfig(**dict(cfg.to_dict(), probe_every=3)))]
    strip = [[{k: v for k, v in h.items() if k not in TIMING} for h in r] for r in runs]
    if strip[0] != strip[1]:
        pytest.skip("two CUDA runs without probes already differ (non-deterministic kernels)")
    assert strip[2] == strip[0]
