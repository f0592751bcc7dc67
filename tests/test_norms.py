"""The normalisations beside BN (docs/design.md, "The experiment"): the ℓp batch norm, GroupNorm,
LayerNorm and noisy BN's sample_channel scope against their definitions in float64, and each
in a trial: it learns, resumes bit for bit, replays from (emulated) CUDA graphs, and its
statistics are those of the tensors."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from study.config import TrialConfig
from study.model import BatchNorm2dWithStats, NoisyBatchNorm2d, build_model, noise_constants
from study.norms import LpBatchNorm2d
from study.stats import EpochStats
from study.train import RunOptions, run_trial
from study.variants import NOISE_SCOPES
from tests.conftest import tiny_data
from tests.test_step import emulated_graphs  # noqa: F401 -- a fixture
from tests.test_train import collect, comparable

INF = math.inf
#: Each new variant as a trial sets it: (norm, its config settings).
NEW_VARIANTS = [
    ("lp_batch", dict(p=1.0)), ("lp_batch", dict(p=2.0)), ("lp_batch", dict(p=INF)),
    ("group", dict(groups=8)), ("layer", {}),
    ("noisy_batch", dict(noise=1.0, noise_scope="sample_channel")),
]
IDS = ["l1", "l2", "linf", "group", "layer", "noisy_sample_channel"]


def lp_reference(x: np.ndarray, p: float, w: np.ndarray, b: np.ndarray, eps: float = 1e-5):
    """The ℓp batch norm's training output, batch centre and ν² per channel, in float64, from
    the definition in docs/design.md (written with loops over channels, not the layer's ops)."""
    y, mus, sqs = np.empty_like(x), [], []
    for c in range(x.shape[1]):
        v = x[:, c]
        mu = v.mean()
        d = v - mu
        nu = np.abs(d).max() if math.isinf(p) else (np.abs(d) ** p).mean() ** (1 / p)
        y[:, c] = w[c] * d / np.sqrt(nu**2 + eps) + b[c]
        mus.append(mu)
        sqs.append(nu**2)
    return y, np.array(mus), np.array(sqs)


def _affine(layer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) + 0.5)
        layer.bias.copy_(torch.rand(layer.bias.shape, generator=g) - 0.5)


@pytest.mark.parametrize("p", [1.0, 2.0, INF, 3.0])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_lp_batch_norm_follows_its_definition_in_training_and_in_eval(p, layout):
    layer = LpBatchNorm2d(3, p)
    _affine(layer)
    w, b = (t.detach().double().numpy() for t in (layer.weight, layer.bias))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 5, 5, generator=g) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1, 1) + 2
               for _ in range(2)]
    r_mu, r_sq = np.zeros(3), np.ones(3)
    for x in batches:
        out = layer(x.to(memory_format=layout))
        want, mu, sq = lp_reference(x.double().numpy(), p, w, b)
        np.testing.assert_allclose(out.detach().double().numpy(), want, rtol=1e-5, atol=1e-5)
        r_mu, r_sq = 0.9 * r_mu + 0.1 * mu, 0.9 * r_sq + 0.1 * sq  # BN's rule, ν² for the variance
    np.testing.assert_allclose(layer.running_mean.double().numpy(), r_mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.running_sq_scale.double().numpy(), r_sq, rtol=1e-5)
    layer.eval()
    x = torch.randn(2, 3, 5, 5, generator=g)
    want = (w[None, :, None, None] * (x.double().numpy() - r_mu[None, :, None, None])
            / np.sqrt(r_sq[None, :, None, None] + 1e-5) + b[None, :, None, None])
    np.testing.assert_allclose(layer(x.to(memory_format=layout)).detach().double().numpy(), want,
                               rtol=1e-5, atol=1e-5)


def test_lp_batch_norm_with_p_2_is_bn_but_for_bessels_correction_of_the_running_variance():
    """ν_2² is the biased batch variance, so in training ℓ2 is BN; BN's running variance
    takes the unbiased batch variance, ℓ2's running ν² the biased one."""
    lp, bn = LpBatchNorm2d(4, 2.0), torch.nn.BatchNorm2d(4)
    _affine(lp)
    _affine(bn)
    x = torch.randn(3, 4, 6, 6) * 2 + 1
    torch.testing.assert_close(lp(x), bn(x), rtol=1e-6, atol=1e-6)
    n = x.numel() // 4
    torch.testing.assert_close(lp.running_mean, bn.running_mean)
    torch.testing.assert_close(0.9 + (bn.running_var - 0.9) * (n - 1) / n, lp.running_sq_scale)


def test_lp_batch_norm_with_p_1_and_inf_is_not_bn():
    """The ℓ1 mean is below and the max above the standard deviation: ℓ1's output spreads wider
    than BN's, ℓ∞'s stays within [-1, 1] (weight 1, bias 0): its moments are not fixed."""
    x = torch.randn(8, 2, 6, 6)
    bn = torch.nn.BatchNorm2d(2)(x)
    l1, linf = LpBatchNorm2d(2, 1.0)(x), LpBatchNorm2d(2, INF)(x)
    assert (l1.std() > 1.1 * bn.std()) and linf.abs().max() <= 1.0 < bn.abs().max()


def _norms(model) -> list:
    return [b.norm for b in model.blocks]


def test_group_and_layer_norm_are_torchs_group_and_layer_norm():
    """``group``: each image's channels in groups, normalised over a group's channels and
    positions; ``layer``: over all of an image's (C, H, W), i.e. F.layer_norm, with BN's
    per-channel affine. Both against float64 references and torch.nn.functional."""
    x = torch.randn(3, 16, 4, 4) * 2 + 1
    for norm, groups in (("group", 8), ("group", 2), ("layer", 1)):
        layer = _norms(build_model(norm, groups=groups if norm == "group" else None))[0]
        _affine(layer)
        w, b = layer.weight.detach().view(1, -1, 1, 1), layer.bias.detach().view(1, -1, 1, 1)
        xd = x.double().view(3, groups, -1)
        ref = ((xd - xd.mean(2, keepdim=True)) / torch.sqrt(xd.var(2, unbiased=False, keepdim=True) + 1e-5))
        ref = ref.view_as(x) * w.double() + b.double()
        for mode in ("train", "eval"):  # no batch statistics: the same in either mode
            getattr(layer, mode)()
            out = layer(x)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out, F.group_norm(x, groups, layer.weight, layer.bias))
        if norm == "layer":
            torch.testing.assert_close(layer(x), F.layer_norm(x, x.shape[1:]) * w + b, rtol=1e-5, atol=1e-5)
        # each image on its own: the others do not change its output
        torch.testing.assert_close(layer(x[:1]), layer(x)[:1])


@pytest.mark.parametrize("norm,settings", NEW_VARIANTS, ids=IDS)
def test_every_variant_has_bns_parameter_count(norm, settings):
    """Two per channel (weight and bias), as BN: 541,094 without norm + 2·(16 + 32 + 64)."""
    model = build_model(norm, **settings)
    assert sum(p.numel() for p in model.parameters()) == 541_094 + 224
    assert [sum(p.numel() for p in n.parameters()) for n in _norms(model)] == [32, 64, 128]


def test_sample_channel_noise_follows_its_definition():
    """Per channel μ ~ U(-n_μ, n_μ), σ ~ U(1, n_σ) (one draw each, as the channel scope), then
    one m ~ U(μ - r_μ, μ + r_μ) and s ~ N(σ, r_σ) per image and channel, the same at every
    position: the draws replayed from the generator give the output exactly."""
    n_mu, n_sigma, r_mu, r_sigma = noise_constants(2.0)
    layer = NoisyBatchNorm2d(5, noise=2.0, scope="sample_channel")
    layer.generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 4, 4)
    out = layer(x)
    a = torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, training=True)
    g = torch.Generator().manual_seed(3)
    u = torch.rand(2, 1, 5, 1, 1, generator=g)
    mu, sigma = (2 * u[0] - 1) * n_mu, 1 + u[1] * (n_sigma - 1)
    m = mu + (2 * torch.rand(6, 5, 1, 1, generator=g) - 1) * r_mu
    s = sigma + torch.randn(6, 5, 1, 1, generator=g) * r_sigma
    torch.testing.assert_close(out, s * a + m)
    ones = torch.ones(6, 5, 4, 4)
    shared = layer.add_noise(ones)  # s + m per (image, channel): constant over the positions
    assert torch.equal(shared, shared[:, :, :1, :1].expand_as(shared))


def test_sample_channel_noise_moments_at_noise_one():
    """Over many images and channels: the channel centres μ have variance n_μ²/3 and the scales
    σ mean (1 + n_σ)/2; within a channel m spreads as U(±r_μ) (variance r_μ²/3) and s as
    N(·, r_σ); and the draws of one image and channel do not vary over its positions."""
    n_mu, n_sigma, r_mu, r_sigma = noise_constants(1.0)
    layer = NoisyBatchNorm2d(2000, noise=1.0, scope="sample_channel")
    layer.generator = torch.Generator().manual_seed(0)
    s, m = layer.draw(torch.zeros(400, 2000, 3, 3))
    assert s.shape == m.shape == (400, 2000, 1, 1)
    s, m = s[:, :, 0, 0].double(), m[:, :, 0, 0].double()
    centres, scales = m.mean(0), s.mean(0)  # each channel's μ, σ to ±r/sqrt(400)
    assert abs(centres.var().item() - n_mu**2 / 3) < 0.1 * n_mu**2 / 3
    assert abs(scales.mean().item() - (1 + n_sigma) / 2) < 0.005
    assert abs((m - centres).var(0).mean().item() - r_mu**2 / 3) < 0.03 * r_mu**2 / 3
    assert abs((s - scales).std(0).mean().item() - r_sigma) < 0.03 * r_sigma


@pytest.mark.parametrize("scope", NOISE_SCOPES)
def test_noise_zero_is_exactly_bn_in_every_scope(scope):
    bn, noisy = BatchNorm2dWithStats(6), NoisyBatchNorm2d(6, noise=0.0, scope=scope)
    noisy.generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 5)
    assert torch.equal(noisy(x), bn(x))


@pytest.mark.parametrize("norm,settings", NEW_VARIANTS, ids=IDS)
def test_every_variant_learns_and_resumes_bit_for_bit(norm, settings):
    """2 epochs of the tiny set (its label in the red channel): beyond chance (accuracy 0.1,
    loss ln 10); resumed from the checkpoint written after epoch 1 (serialised at once, as
    Tune does), epoch 2 gives the numbers of the uninterrupted run."""
    cfg = TrialConfig(norm=norm, epochs=2, lr=0.02, grad_every=2, **settings)
    data, saved, records = tiny_data(), io.BytesIO(), []

    def on_epoch(record, state):
        records.append(record)
        if record["epoch"]["epoch"] == 1:
            torch.save(state, saved)

    summary = run_trial(cfg, data, on_epoch, options=RunOptions(device="cpu"))
    last = records[-1]["epoch"]
    # chance: accuracy 0.1 (over epoch 2's 256 images, 0.15 is 2.7 sd above it), loss ln 10
    assert summary["status"] == "done" and last["train_acc"] > 0.15 and last["val_loss"] < math.log(10), last
    saved.seek(0)
    rest, _, summary = collect(cfg, data, resume_from=torch.load(saved, weights_only=False))
    assert summary["status"] == "done"
    assert [comparable(r) for r in rest] == [comparable(records[1])]


@pytest.mark.parametrize("norm,settings", [NEW_VARIANTS[i] for i in (2, 5)], ids=[IDS[2], IDS[5]])
def test_graphed_steps_of_the_new_variants_give_the_eager_numbers(emulated_graphs, norm, settings):  # noqa: F811
    """Through the CPU emulation of CUDA-graph semantics (tests/test_step.py): no host work
    inside a step, and a replay draws the noise the eager step would."""
    cfg = TrialConfig(norm=norm, lr=0.01, batch_size=24, epochs=1, seed=4, hist_every=3, grad_every=2,
                      **settings)
    data = tiny_data()
    eager, _, _ = collect(cfg, data, cuda_graph=False)
    graphed, _, summary = collect(cfg, data, cuda_graph=True)
    assert summary["status"] == "done" and len(emulated_graphs) == 4
    assert [comparable(r) for r in graphed] == [comparable(r) for r in eager]


@pytest.mark.parametrize("norm,settings", NEW_VARIANTS, ids=IDS)
def test_statistics_of_every_variant_match_a_float64_recount(norm, settings):
    """The recorded moments of both sites of each layer, and the gradient norms, against float64
    recomputations of the tapped tensors and gradients (as tests/test_stats.py does for BN)."""
    torch.manual_seed(0)
    model = build_model(norm, **settings).to(memory_format=torch.channels_last)
    model.set_noise_generator(torch.Generator().manual_seed(1))
    params = list(model.parameters())
    acc = EpochStats.for_model(model, 3, 64, 8.0, torch.device("cpu"))
    batches, grads = [], []
    for n in (16, 16, 7):
        taps = acc.tap_reducer(hist=True)
        x = torch.randn(n, 3, 32, 32).to(memory_format=torch.channels_last)
        loss = model(x, taps).logsumexp(1).mean()
        model.zero_grad()
        loss.backward()
        acc.count(acc.accumulate(taps, grads=[p.grad for p in params]), 0, True, n)
        batches.append([(c.detach().double().numpy(), p.detach().double().numpy()) for c, p, *_ in taps])
        grads.append(np.sqrt(sum((p.grad.double() ** 2).sum().item() for p in params)))
    assert acc.derived == ([True, False] * 3 if norm == "noisy_batch" else [False] * 6)
    finished = acc.finish()
    for i, row in enumerate(finished["layers"]):
        xs = [b[i // 2][i % 2] for b in batches]
        flat = np.concatenate([x.ravel() for x in xs])
        assert row["count"] == flat.size == sum(row["hist"])
        sd = flat.std()
        assert abs(row["mean"] - flat.mean()) <= 1e-5 * max(abs(flat.mean()), sd), i
        assert abs(row["var"] - flat.var()) <= 1e-5 * flat.var(), i
        bv = np.array([x.var() for x in xs])
        assert abs(row["batch_var_std"] - bv.std()) <= 1e-5 * bv.max(), i
    np.testing.assert_allclose(finished["steps"]["grad_norm"], grads, rtol=1e-5)


def test_the_grid_varies_each_parameter_only_for_its_variant_and_keeps_the_old_ids():
    """The norms preset: 8 variants (ℓp at 3 p's) × 2 lrs × 5 seeds, no duplicates; a
    parameter list changes nothing for the variants that do not take it; the ids of the
    variants without parameters, and of a study.json written before p and groups, are the
    old ones."""
    import json
    from collections import Counter
    from dataclasses import replace

    from study import grid, plan

    trials = grid.build_grid(grid.PRESETS["norms"])
    ids = [c.trial_id for c in trials]
    assert len(ids) == len(set(ids)) == 80
    assert Counter(c.norm for c in trials) == dict(none=10, batch=10, noisy_batch=10, lp_batch=30,
                                                    group=10, layer=10)
    assert {c.p for c in trials if c.norm == "lp_batch"} == {1.0, 2.0, INF}
    assert {c.p for c in trials if c.norm != "lp_batch"} == {None}
    assert "lp_batch-pinf-lr0.01-seed4" in ids and "group-groups8-lr0.001-seed0" in ids
    assert "batch-lr0.001-seed0" in ids and "noisy_batch-noise1-lr0.01-seed0" in ids
    base = replace(grid.PRESETS["norms"], norms=("batch", "noisy_batch"))
    assert grid.build_grid(replace(base, ps=(1.0,), groups=(2, 4))) == grid.build_grid(base)
    old = {k: v for k, v in TrialConfig(norm="noisy_batch", noise=1.0).to_dict().items()
           if k not in ("p", "groups")}  # a config of a study.json written before them
    assert TrialConfig.from_dict(json.loads(json.dumps(old))).trial_id == "noisy_batch-noise1-lr0.001-seed0"
    assert "--ps" in plan.grid_flags(grid.PRESETS["norms"].__dict__)
    assert "--ps" not in plan.grid_flags(base.__dict__) and "--noises" in plan.grid_flags(base.__dict__)
