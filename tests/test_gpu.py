"""On a CUDA GPU, a trial's step loop never waits for the device (docs/design.md, "What is
recorded").

``torch.cuda.set_sync_debug_mode("error")`` turns every host synchronisation (``.item()``,
``float(t)``, a device-to-host copy, ``nonzero``, ``bincount`` sizing its output...) into a
RuntimeError. It is switched on around each epoch's step loop through
``study.train.RunOptions.step_loop_context`` and off again before the epoch's end, where moving the
statistics to the host legitimately waits. Skipped where there is no CUDA device; it runs on
the lent GPU machine as part of ``bash bench/gpu_check.sh``.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine: bash bench/gpu_check.sh)"
)

#: The variants of issue 23, by a name that sets them up (``settings``): the ℓp norms, GroupNorm,
#: LayerNorm and noisy BN with the sample_channel scope.
NEW_NORMS = ("lp_batch-p1", "lp_batch-pinf", "group", "layer", "noisy_batch-sample_channel")


def settings(norm: str, noise: float) -> dict:
    """TrialConfig's settings of a parametrized case (``NEW_NORMS`` or a plain norm and noise)."""
    return {"lp_batch-p1": dict(norm="lp_batch", p=1.0), "lp_batch-pinf": dict(norm="lp_batch", p=math.inf),
            "noisy_batch-sample_channel": dict(norm="noisy_batch", noise=1.0, noise_scope="sample_channel"),
            }.get(norm, dict(norm=norm, noise=noise))


@contextlib.contextmanager
def syncs_are_errors(entered: list[int]):
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    entered.append(1)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_sync_debug_mode_turns_a_host_sync_into_an_error():
    x = torch.arange(4.0, device="cuda")
    with syncs_are_errors([]), pytest.raises(RuntimeError):
        x.sum().item()
    assert x.sum().item() == 6.0  # and it is off again afterwards


@pytest.mark.parametrize(
    "norm,noise,probe_every,cuda_graph",
    # probes wait for the device by design, inside study.probes' own sync-allowed block; the
    # steps around them must still not wait. With CUDA graphs, probed steps run eagerly
    # between replays.
    [("none", 0.0, 0, False), ("batch", 0.0, 0, False), ("noisy_batch", 1.0, 0, False),
     ("noisy_batch", 1.0, 4, False), ("batch", 0.0, 0, True), ("noisy_batch", 1.0, 4, True)]
    + [(norm, 0.0, 0, graph) for norm in NEW_NORMS for graph in (False, True)],
)
def test_step_loop_never_waits_for_the_device(norm, noise, probe_every, cuda_graph):
    from study.config import TrialConfig
    from study.data import load_dataset
    from study.train import RunOptions, run_trial

    entered: list[int] = []
    # 168 training images at batch 16: 11 steps, the last one short; histogram and gradient
    # norms every step, so every statistics path runs inside the checked loop
    cfg = TrialConfig(lr=0.01, batch_size=16, epochs=2, seed=3,
                      hist_every=1, grad_every=1, probe_every=probe_every,
                      probe_etas=(0.5, 1.0, 2.0) if probe_every else (), **settings(norm, noise))
    data = load_dataset("synthetic", subset=210, log=lambda s: None)
    records: list[dict] = []
    with no_capture_failure():
        out = run_trial(cfg, data, on_epoch=lambda rec, state: records.append(rec), options=RunOptions(
            device="cuda", cuda_graph=cuda_graph, step_loop_context=lambda: syncs_are_errors(entered)))

    assert len(entered) == cfg.epochs, "run_trial did not enter step_loop_context once per epoch"
    assert torch.cuda.get_sync_debug_mode() == 0
    assert out["status"] == "done" and out["device"].startswith("cuda")
    steps_per_epoch = math.ceil(168 / 16)
    for rec in records:
        assert rec["epoch"]["steps"] == steps_per_epoch
        assert len(rec["steps"]["step"]) == steps_per_epoch
        assert np.isfinite(rec["steps"]["grad_norm"]).all() and np.isfinite(rec["steps"]["loss"]).all()
        for row in rec["layers"]:
            if row["site"] == "weight":
                assert math.isfinite(row["weight_norm"]) and row["weight_norm"] > 0
                continue
            assert math.isfinite(row["mean"]) and math.isfinite(row["var"])
            assert sum(row["hist"]) == row["count"]  # hist_every=1: every element binned
        assert bool(rec.get("probes")) == bool(probe_every)


@contextlib.contextmanager
def no_capture_failure():
    """A failed capture falls back to eager with a warning; here it must fail the test."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed", category=RuntimeWarning)
        yield


def _numbers(records: list[dict]) -> list:
    return [(r["epoch"]["train_loss"], r["epoch"]["test_acc"], r["steps"]["grad_norm"].tolist(),
             [(x["mean"], x["var"], x["hist"], x.get("weight_norm")) for x in r["layers"]]) for r in records]


@pytest.mark.parametrize("norm,noise", [("none", 0.0), ("batch", 0.0), ("noisy_batch", 1.0)]
                         + [(norm, 0.0) for norm in NEW_NORMS])
def test_cuda_graph_steps_give_the_eager_numbers(norm, noise):
    """The graphed step against the eager reference: every statistic to fp32 tolerance.

    170 training images at batch 16: 10 full steps (graphed after 3 eager warm-up steps) and a
    short last one (eager); hist_every=3 and grad_every=2 make all four kinds of graph.
    Two epochs: the second starts from the RNG offsets the replays advanced.
    """
    from study.config import TrialConfig
    from study.data import load_dataset
    from study.train import RunOptions, run_trial

    cfg = TrialConfig(lr=0.01, batch_size=16, epochs=2, seed=5, hist_every=3, grad_every=2,
                      **settings(norm, noise))
    data = load_dataset("synthetic", subset=213, log=lambda s: None)

    def run(cuda_graph: bool) -> list[dict]:
        records: list[dict] = []
        with torch.backends.cudnn.flags(enabled=True, deterministic=True, benchmark=False):
            out = run_trial(cfg, data, lambda rec, state: records.append(rec),
                            options=RunOptions(device="cuda", cuda_graph=cuda_graph))
        assert out["status"] == "done"
        return records

    eager = run(False)
    with no_capture_failure():
        graphed = run(True)
    tol = dict(rtol=1e-5, atol=1e-6)
    for e, g in zip(eager, graphed, strict=True):
        assert e["epoch"]["steps"] == g["epoch"]["steps"] == 11
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
            np.testing.assert_allclose(g["epoch"][key], e["epoch"][key], **tol, err_msg=key)
        assert g["steps"]["step"].tolist() == e["steps"]["step"].tolist()
        for col in e["steps"]:
            np.testing.assert_allclose(g["steps"][col], e["steps"][col], **tol, err_msg=col)
        for le, lg in zip(e["layers"], g["layers"], strict=True):
            assert (lg["layer"], lg["site"], lg.get("count")) == (le["layer"], le["site"], le.get("count"))
            if le["site"] == "weight":  # taken after the epoch, outside the graphs
                np.testing.assert_allclose(lg["weight_norm"], le["weight_norm"], **tol)
                continue
            for key in ("mean", "var", "batch_mean_std", "batch_var_std"):
                scale = max(abs(le[key]), math.sqrt(le["var"]) * 1e-3)
                assert abs(lg[key] - le[key]) <= 1e-5 * scale, (le["layer"], le["site"], key)
            # a value within rounding of a bin edge may land one bin over
            assert sum(lg["hist"]) == sum(le["hist"])
            assert np.abs(np.subtract(lg["hist"], le["hist"])).sum() <= 1e-4 * sum(le["hist"]) + 2


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_resume_on_the_gpu_gives_the_same_numbers(cuda_graph):
    """2 epochs straight vs 1 epoch, a torch.save/load round trip of the state, then 1 more."""
    import io

    from study.config import TrialConfig
    from study.data import load_dataset
    from study.train import RunOptions, run_trial

    cfg = TrialConfig(norm="noisy_batch", noise=1.0, lr=0.01, epochs=2, seed=1)
    data = load_dataset("synthetic", subset=210, log=lambda s: None)

    def run(resume=None, stop_after=None):
        records, states = [], []

        def on_epoch(rec, state):
            records.append(rec)
            states.append(state)
            if stop_after and rec["epoch"]["epoch"] == stop_after:
                raise StopIteration

        try:
            run_trial(cfg, data, on_epoch, resume_from=resume,
                      options=RunOptions(device="cuda", cuda_graph=cuda_graph))
        except StopIteration:
            pass
        return records, states

    with no_capture_failure(), torch.backends.cudnn.flags(enabled=True, deterministic=True,
                                                           benchmark=False):
        straight, _ = run()
        first, states = run(stop_after=1)
        buf = io.BytesIO()
        torch.save(states[-1], buf)
        buf.seek(0)
        rest, _ = run(resume=torch.load(buf, weights_only=False))
    assert _numbers(first + rest) == _numbers(straight)
