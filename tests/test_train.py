"""run_trial: determinism, resume equality, divergence, and the statistics it records."""

import io
import math
import warnings

import numpy as np
import pytest
import torch

from study.config import ConfigError, TrialConfig
from study.model import build_model
from study.train import RunOptions, evaluate, run_trial
from tests.conftest import tiny_data


def collect(cfg, data, resume_from=None, stop_after=None, **options):
    """Run a trial on the CPU (``options``: more RunOptions); its records, states and summary."""
    records, states = [], []

    def on_epoch(record, state):
        records.append(record)
        states.append(state)
        if stop_after is not None and record["epoch"]["epoch"] == stop_after:
            raise StopIteration

    try:
        summary = run_trial(cfg, data, on_epoch, resume_from=resume_from,
                            options=RunOptions(device="cpu", **options))
    except StopIteration:
        summary = None
    return records, states, summary


def comparable(record: dict) -> dict:
    """A record without its timings, for bit-for-bit comparison."""
    epoch = {k: v for k, v in record["epoch"].items() if k not in ("wall_s", "images_per_s")}
    steps = {k: np.asarray(v).tolist() for k, v in record["steps"].items()}
    return dict(epoch=epoch, layers=record["layers"], steps=steps, status=record["status"])


@pytest.mark.parametrize("norm,noise", [("none", 0.0), ("batch", 0.0), ("noisy_batch", 1.0)])
def test_same_config_same_numbers(norm, noise):
    cfg = TrialConfig(norm=norm, noise=noise, epochs=1, lr=0.01)
    a, _, _ = collect(cfg, tiny_data())
    b, _, _ = collect(cfg, tiny_data())
    assert [comparable(r) for r in a] == [comparable(r) for r in b]


@pytest.mark.parametrize("norm,noise", [("batch", 0.0), ("noisy_batch", 1.0)])
def test_resume_gives_the_same_numbers_as_an_uninterrupted_run(norm, noise):
    cfg = TrialConfig(norm=norm, noise=noise, epochs=3, lr=0.01, grad_every=2)
    data = tiny_data()
    straight, _, summary = collect(cfg, data)
    assert summary["status"] == "done" and len(straight) == 3
    first, states, _ = collect(cfg, data, stop_after=1)
    buf = io.BytesIO()
    torch.save(states[-1], buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    rest, _, summary = collect(cfg, data, resume_from=state)
    assert summary["status"] == "done"
    assert [comparable(r) for r in first + rest] == [comparable(r) for r in straight]


def test_channels_last_on_the_cpu_gives_the_numbers_of_the_nchw_layout():
    """The CPU's channels-last layout is a speed choice only: same statistics to fp32 rounding.

    At a tiny learning rate: training amplifies rounding through ReLU and max-pool decisions
    that flip (at lr 0.01, some seeds' losses part by 1e-3 within 16 steps, in either
    layout pair), which would test the trajectory's chaos, not the layout."""
    cfg = TrialConfig(norm="noisy_batch", noise=1.0, epochs=1, lr=1e-6, hist_every=1)
    data = tiny_data()
    runs = {}
    for layout in (False, True):
        runs[layout], _, _ = collect(cfg, data, cpu_channels_last=layout)
    (ref,), (cl,) = runs[False], runs[True]
    for key in ("train_loss", "train_acc", "val_loss", "test_loss", "test_acc"):
        assert cl["epoch"][key] == pytest.approx(ref["epoch"][key], rel=1e-4, abs=1e-6), key
    np.testing.assert_allclose(cl["steps"]["grad_norm"], ref["steps"]["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(cl["steps"]["loss"], ref["steps"]["loss"], rtol=1e-4)
    for a, b in zip(ref["layers"], cl["layers"], strict=True):
        if a["site"] == "weight":  # the weights after the epoch: the same to fp32 rounding
            assert (b["layer"], b["site"]) == (a["layer"], a["site"])
            assert b["weight_norm"] == pytest.approx(a["weight_norm"], rel=1e-5)
            continue
        assert b["count"] == a["count"]
        assert b["mean"] == pytest.approx(a["mean"], rel=1e-4, abs=1e-4 * a["var"] ** 0.5)
        assert b["var"] == pytest.approx(a["var"], rel=1e-4)
        assert np.abs(np.subtract(a["hist"], b["hist"])).sum() <= 1e-3 * a["count"]


@pytest.mark.parametrize("norm,lr", [("none", 1e4), ("batch", 1e8)])
def test_diverging_trial_ends_cleanly_as_diverged(norm, lr):
    """Its statistics are NaN where the numbers overflowed, quietly: no numpy warnings."""
    cfg = TrialConfig(norm=norm, lr=lr, epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        records, _, summary = collect(cfg, tiny_data())
    assert summary["status"] == "diverged"
    assert records[-1]["status"] == "diverged" and records[-1]["epoch"]["diverged"]
    losses = records[-1]["steps"]["loss"]
    assert not math.isfinite(losses[-1]) and np.isfinite(losses[:-1]).all()
    assert len(records) < 3 or math.isnan(records[-1]["epoch"]["test_acc"])


def test_epoch_record_is_complete_and_consistent():
    cfg = TrialConfig(norm="batch", epochs=1, batch_size=32, grad_every=3)
    records, _, _ = collect(cfg, tiny_data())
    (r,) = records
    n_fit = 320 - 64
    steps = math.ceil(n_fit / 32)
    assert r["epoch"]["steps"] == steps
    assert r["steps"]["step"].tolist() == list(range(0, steps, 3))
    acts = [x for x in r["layers"] if x["site"] != "weight"]
    assert {(x["layer"], x["site"]) for x in acts} == {
        (f"conv{i}", s) for i in (1, 2, 3) for s in ("conv", "preact")}
    assert [x["layer"] for x in r["layers"] if x["site"] == "weight"] == [
        "conv1", "conv2", "conv3", "fc1", "fc2"]
    sampled = len(range(0, steps, cfg.hist_every))  # every batch is full here
    for x in acts:
        assert sum(x["hist"]) * steps == x["count"] * sampled
        if x["site"] == "preact":  # BN in training mode: each batch normalised to ~0 mean, ~1 var
            assert abs(x["mean"]) < 1e-3 and abs(x["var"] - 1) < 1e-2
    assert 0 <= r["epoch"]["train_acc"] <= 1 and 0 <= r["epoch"]["test_acc"] <= 1
    assert r["epoch"]["grad_norm_max"] >= r["epoch"]["grad_norm_mean"] > 0


@pytest.mark.parametrize("bad", [dict(norm="groupnorm"), dict(lr=0), dict(lr=-1), dict(noise=-0.5),
                                 dict(epochs=0), dict(batch_size=0),
                                 dict(norm="batch", noise=1.0), dict(norm="batch", p=1.0),
                                 dict(norm="lp_batch", p=0.5), dict(norm="lp_batch", p=math.nan),
                                 dict(norm="group", groups=3), dict(norm="layer", groups=8)])
def test_bad_config_is_one_clear_error(bad):
    with pytest.raises(ConfigError) as e:
        TrialConfig(**bad)
    assert "\n" not in str(e.value)


def test_the_cpu_optimiser_takes_plain_sgd_steps():
    """On a CPU trials use PyTorch's fused SGD (faster); its steps must be torch's reference
    for-loop SGD with momentum, to fp32 rounding, over several steps."""
    from study.model import build_model
    from study.train import build_optimizer

    cfg = TrialConfig(lr=0.05, momentum=0.9)
    torch.manual_seed(0)
    fused_model = build_model("batch")
    ref_model = build_model("batch")
    ref_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, cfg, torch.device("cpu"))
    assert fused.defaults["fused"]
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in fused_model.parameters()]
        for model, opt in ((fused_model, fused), (ref_model, ref)):
            for p, gr in zip(model.parameters(), grads, strict=True):
                p.grad = gr.clone()
            opt.step()
    for p, q in zip(fused_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_evaluate_on_no_images_is_nan_not_zero():
    """An empty split has no loss and no accuracy (0.0 would read as a real, bad result)."""
    model = build_model("batch")
    x, y = torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    loss, acc = evaluate(model, x, y, 64)
    assert math.isnan(loss) and math.isnan(acc)
    assert model.training  # left in training mode, as after a real evaluation


def test_evaluate_is_the_eval_mode_model_and_changes_nothing():
    """Against a plain loop over an eval-mode copy: BN running statistics, no dropout, no noise,
    the same numbers whatever the RNG, and the model's state left as it was."""
    import copy

    import torch.nn.functional as F

    from study.augment import normalise

    torch.manual_seed(0)
    model = build_model("noisy_batch", noise=1.0)
    model.set_noise_generator(torch.Generator().manual_seed(1))
    data = tiny_data(n_train=64, n_test=50)
    x, y = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)
    model.train()
    with torch.no_grad():  # move the running statistics away from their initial values
        for i in range(0, 64, 16):
            model(normalise(torch.from_numpy(data.train_x[i : i + 16])))
    before = copy.deepcopy(model.state_dict())
    ref_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        logits = ref_model(normalise(x)).double()
    ref_loss = F.cross_entropy(logits, y).item()
    ref_acc = (logits.argmax(1) == y).double().mean().item()
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        results.append(evaluate(model, x, y, 16))  # batches of 16, 16, 16, 2
    assert results[0] == results[1]
    loss, acc = results[0]
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss and acc == ref_acc
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
    plain = build_model("batch")
    plain.load_state_dict(before)
    assert evaluate(plain, x, y, 16) == results[0]  # no noise in eval mode


def test_the_layers_table_holds_each_weights_norm_at_the_epochs_end():
    """Each epoch's ``weight`` rows are the l2 norms of the weights the epoch's checkpoint holds
    (numpy float64, found by name): a growing conv weight under BN shows here."""
    kept = []

    def on_epoch(record, state):  # the state holds the live tensors: copy them now
        kept.append((record, {k: v.detach().clone().numpy() for k, v in state["model"].items()}))

    run_trial(TrialConfig(norm="batch", epochs=2, lr=0.05, batch_size=32), tiny_data(), on_epoch,
              options=RunOptions(device="cpu"))
    weight_of = {"conv1": "blocks.0.conv.weight", "conv2": "blocks.1.conv.weight",
                 "conv3": "blocks.2.conv.weight", "fc1": "fc1.weight", "fc2": "fc2.weight"}
    norms = []
    for record, weights in kept:
        rows = {x["layer"]: x for x in record["layers"] if x["site"] == "weight"}
        assert rows.keys() == weight_of.keys()
        for layer, key in weight_of.items():
            want = np.linalg.norm(weights[key].astype(np.float64).ravel())
            assert rows[layer]["weight_norm"] == pytest.approx(want, rel=1e-12)
            assert rows[layer].get("mean") is None  # a weight row holds no activation moments
        norms.append([rows[n]["weight_norm"] for n in weight_of])
    assert norms[0] != norms[1]  # the weights moved between the epochs


def test_each_layers_gradient_norm_is_its_weights(monkeypatch):
    """The steps table's grad_norm_<layer> is the norm of that layer's weight gradient, found
    by name in the trial's model (not through the trial's own index), and grad_norm covers
    every parameter."""
    import study.train as train_mod
    from study.results import GRAD_LAYERS
    from study.stats import EpochStats

    models, seen = [], []
    real_build, real_accumulate = train_mod.build_model, EpochStats.accumulate
    monkeypatch.setattr(train_mod, "build_model", lambda *a, **k: models.append(real_build(*a, **k))
                        or models[-1])

    def spy(self, taps, loss=None, logits=None, y=None, grads=None):
        if grads is not None:
            seen.append({n: torch.linalg.vector_norm(p.grad.double()).item()
                         for n, p in models[0].named_parameters()})
        return real_accumulate(self, taps, loss, logits, y, grads)

    monkeypatch.setattr(EpochStats, "accumulate", spy)
    records, _, _ = collect(TrialConfig(norm="batch", epochs=1, lr=0.01, batch_size=32), tiny_data())
    steps = records[0]["steps"]
    assert len(seen) == len(steps["step"]) > 0
    weight_of = {"conv1": "blocks.0.conv.weight", "conv2": "blocks.1.conv.weight",
                 "conv3": "blocks.2.conv.weight", "fc1": "fc1.weight", "fc2": "fc2.weight"}
    assert set(weight_of) == set(GRAD_LAYERS)
    for layer in GRAD_LAYERS:
        np.testing.assert_allclose(steps[f"grad_norm_{layer}"], [s[weight_of[layer]] for s in seen],
                                   rtol=1e-5)
    np.testing.assert_allclose(steps["grad_norm"], [math.sqrt(sum(v**2 for v in s.values())) for s in seen],
                               rtol=1e-5)


def test_probes_see_the_step_before_the_optimiser_moves_the_weights(monkeypatch):
    """Santurkar's probes measure the step at W_t: when they run, the weights and momentum are
    those the step's forward pass used, and the gradients are the step's."""
    from study.probes import StepProber

    snapshots, checked = {}, []
    real_after = StepProber.after_backward

    def after(self, model, optimizer, x, y, loss, epoch):
        if self._rng is not None:
            params = [p.detach().clone() for p in model.parameters()]
            assert all(torch.equal(a, b) for a, b in zip(params, snapshots["params"], strict=True))
            bufs = [optimizer.state[p].get("momentum_buffer") for p in model.parameters()]
            assert all((a is None and b is None) or torch.equal(a, b)
                       for a, b in zip(bufs, snapshots["momentum"], strict=True))
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()
                       if p.dim() > 1)
            checked.append(snapshots["step"])
        real_after(self, model, optimizer, x, y, loss, epoch)

    monkeypatch.setattr(StepProber, "after_backward", after)
    import study.step as step_mod

    real_device_work = step_mod.TrainStep.device_work

    def device_work(self, idx, theta, hist, grad, prober=None, step=0, epoch=0):
        if prober is not None and prober.due(step):  # the state the forward pass will use
            snapshots["step"] = step
            snapshots["params"] = [p.detach().clone() for p in self.model.parameters()]
            snapshots["momentum"] = [None if self.opt.state[p].get("momentum_buffer") is None
                                     else self.opt.state[p]["momentum_buffer"].clone()
                                     for p in self.model.parameters()]
        return real_device_work(self, idx, theta, hist, grad, prober, step, epoch)

    monkeypatch.setattr(step_mod.TrainStep, "device_work", device_work)
    cfg = TrialConfig(norm="noisy_batch", noise=1.0, epochs=1, lr=0.05, batch_size=32, probe_every=3,
                      probe_etas=(0.5,))
    records, _, _ = collect(cfg, tiny_data())
    assert checked == [0, 3, 6] and records[0]["probes"]


def test_the_validation_split_depends_on_split_seed_only():
    """Every trial of a study validates on the same images, whatever its own seed."""
    from study.data import train_val_split
    from study.train import DeviceData

    data = tiny_data()
    cpu = torch.device("cpu")
    a = DeviceData.from_arrays(data, TrialConfig(seed=0, split_seed=0), cpu)
    b = DeviceData.from_arrays(data, TrialConfig(seed=7, split_seed=0), cpu)
    c = DeviceData.from_arrays(data, TrialConfig(seed=0, split_seed=1), cpu)
    _, val_idx = train_val_split(len(data.train_y), 0.2, 0)
    assert torch.equal(a.val_x, torch.from_numpy(data.train_x[val_idx]))
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.val_x, c.val_x)
