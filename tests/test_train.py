"""run_trial: determinism, resume equality, divergence, and the statistics it records."""

import io
import math

import numpy as np
import pytest
import torch

from study.config import ConfigError, TrialConfig
from study.model import build_model
from study.train import evaluate, run_trial
from tests.conftest import tiny_data


def collect(cfg, data, resume_from=None, stop_after=None, **run_kw):
    records, states = [], []

    def on_epoch(record, state):
        records.append(record)
        states.append(state)
        if stop_after is not None and record["epoch"]["epoch"] == stop_after:
            raise StopIteration

    try:
        summary = run_trial(cfg, data, on_epoch, resume_from=resume_from, device="cpu", **run_kw)
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


def test_channels_last_on_the_cpu_gives_the_numbers_of_the_nchw_layout(monkeypatch):
    """The CPU's channels-last layout is a speed choice only: same statistics to fp32 rounding.

    At a tiny learning rate: training amplifies rounding through ReLU and max-pool decisions
    that flip (at lr 0.01, some seeds' losses part by 1e-3 within 16 steps, in either
    layout pair), which would test the trajectory's chaos, not the layout."""
    import study.train as train

    cfg = TrialConfig(norm="noisy_batch", noise=1.0, epochs=1, lr=1e-6, hist_every=1)
    data = tiny_data()
    runs = {}
    for layout in (False, True):
        monkeypatch.setattr(train, "CPU_CHANNELS_LAST", layout)
        runs[layout], _, _ = collect(cfg, data)
    (ref,), (cl,) = runs[False], runs[True]
    for key in ("train_loss", "train_acc", "val_loss", "test_loss", "test_acc"):
        assert cl["epoch"][key] == pytest.approx(ref["epoch"][key], rel=1e-4, abs=1e-6), key
    np.testing.assert_allclose(cl["steps"]["grad_norm"], ref["steps"]["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(cl["steps"]["loss"], ref["steps"]["loss"], rtol=1e-4)
    for a, b in zip(ref["layers"], cl["layers"], strict=True):
        assert b["count"] == a["count"]
        assert b["mean"] == pytest.approx(a["mean"], rel=1e-4, abs=1e-4 * a["var"] ** 0.5)
        assert b["var"] == pytest.approx(a["var"], rel=1e-4)
        assert np.abs(np.subtract(a["hist"], b["hist"])).sum() <= 1e-3 * a["count"]


def test_diverging_trial_ends_cleanly_as_diverged():
    cfg = TrialConfig(norm="none", lr=1e4, epochs=3)
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
    assert {(x["layer"], x["site"]) for x in r["layers"]} == {
        (f"conv{i}", s) for i in (1, 2, 3) for s in ("conv", "preact")}
    sampled = len(range(0, steps, cfg.hist_every))  # every batch is full here
    for x in r["layers"]:
        assert sum(x["hist"]) * steps == x["count"] * sampled
        if x["site"] == "preact":  # BN in training mode: each batch normalised to ~0 mean, ~1 var
            assert abs(x["mean"]) < 1e-3 and abs(x["var"] - 1) < 1e-2
    assert 0 <= r["epoch"]["train_acc"] <= 1 and 0 <= r["epoch"]["test_acc"] <= 1
    assert r["epoch"]["grad_norm_max"] >= r["epoch"]["grad_norm_mean"] > 0


@pytest.mark.parametrize("bad", [dict(norm="group"), dict(lr=0), dict(lr=-1), dict(noise=-0.5),
                                 dict(epochs=0), dict(batch_size=0),
                                 dict(norm="batch", noise=1.0)])
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
