"""The on-device epoch statistics against a plain float64 recomputation of the same batches."""

import numpy as np
import pytest
import torch

from study.stats import EpochStats


def _stats(n_steps: int, bins: int = 64, n_params: int = 1, weight_idx=(0,) * 5) -> EpochStats:
    return EpochStats(n_steps, n_params, weight_idx, bins, 8.0, torch.device("cpu"))


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 16, 32, 32), (16, 32, 16, 16), (16, 64, 8, 8)]
    out = []
    for b in range(5):
        n = 16 if b < 4 else 7  # a short last batch
        taps = []
        for k, shape in enumerate(shapes):
            conv = torch.randn((n,) + shape[1:], generator=g) * (1 + k + b) + (3.0 * k - b)
            taps.append((conv, torch.randn(conv.shape, generator=g) * 12))  # some beyond the range
        out.append(taps)
    return out


def test_activation_moments_match_float64_reference():
    batches = _batches()
    acc = _stats(len(batches))
    for taps in batches:
        acc.record(taps)
    rows = acc.finish()["layers"]
    for i, row in enumerate(rows):
        layer, site = i // 2, i % 2
        xs = [taps[layer][site].numpy() for taps in batches]
        flat = np.concatenate([x.ravel() for x in xs]).astype(np.float64)
        assert row["count"] == flat.size
        sd = flat.std()
        assert abs(row["mean"] - flat.mean()) <= 1e-6 * max(abs(flat.mean()), sd)
        assert abs(row["var"] - flat.var()) <= 1e-6 * flat.var()
        bm = np.array([x.astype(np.float64).mean() for x in xs])
        bv = np.array([x.astype(np.float64).var() for x in xs])
        # a spread is a difference of near-equal numbers: its error is relative to their scale
        assert abs(row["batch_mean_std"] - bm.std()) <= 1e-6 * max(bm.std(), sd)
        assert abs(row["batch_var_std"] - bv.std()) <= 1e-6 * bv.max()
        # bin k holds [lo + k w, lo + (k+1) w), w = 16/64, computed in float32 like the device
        x32 = np.concatenate([x.ravel() for x in xs])
        k = np.floor(np.clip((x32 - np.float32(-8)) * np.float32(64 / 16), 0, 63))
        ref = np.bincount(k.astype(np.int64), minlength=64)
        assert row["hist"] == ref.tolist()
        assert sum(row["hist"]) == flat.size


def test_gradient_norms_match_vector_norm():
    torch.manual_seed(0)
    grads = [torch.randn(16, 3, 3, 3), torch.randn(16), torch.randn(500, 1024) * 1e-3, torch.randn(10)]
    acc = _stats(3, n_params=4, weight_idx=[0, 2, 2, 0, 3])
    taps = _batches()[0]
    acc.record(taps, loss=torch.tensor(2.5), grads=grads, step=7)
    acc.record(taps, loss=torch.tensor(9.0), step=8)  # not a gradient step: no row in the table
    cols = acc.finish()["steps"]
    ref_global = torch.linalg.vector_norm(torch.cat([g.flatten().double() for g in grads]))
    assert cols["step"].tolist() == [7]
    # rtol 1e-5: the device sums 0.5 M squares in float32
    np.testing.assert_allclose(cols["grad_norm"], [ref_global.item()], rtol=1e-5)
    for name, i in (("conv1", 0), ("conv2", 2), ("fc2", 3)):
        ref = torch.linalg.vector_norm(grads[i].double()).item()
        np.testing.assert_allclose(cols[f"grad_norm_{name}"], [ref], rtol=1e-5)
    assert cols["loss"].tolist() == [2.5]
    assert all(v.dtype == (np.int64 if k == "step" else np.float32) for k, v in cols.items())


def test_epoch_loss_and_accuracy_match_a_float64_recount():
    g = torch.Generator().manual_seed(4)
    batches = _batches(2)
    acc = _stats(len(batches))
    ref_loss = ref_correct = n = 0
    for taps in batches:
        b = len(taps[0][0])
        logits, y = torch.randn(b, 10, generator=g), torch.randint(0, 10, (b,), generator=g)
        loss = torch.nn.functional.cross_entropy(logits, y)
        acc.record(taps, loss=loss, logits=logits, y=y)
        ref_loss += float(torch.nn.functional.cross_entropy(logits.double(), y, reduction="sum"))
        ref_correct += int((logits.argmax(1) == y).sum())
        n += b
    out = acc.finish()
    assert acc.seen == n == 16 * 4 + 7
    assert out["correct"] == ref_correct
    assert abs(out["loss_sum"] - ref_loss) <= 1e-6 * ref_loss


def test_finished_rows_survive_the_next_epochs_reset():
    """The statistics are reused across epochs: what ``finish`` handed out must not alias them."""
    batches = _batches()
    acc = _stats(len(batches), bins=16, n_params=1)
    for k, taps in enumerate(batches):
        acc.record(taps, loss=torch.tensor(1.5), grads=[torch.ones(4)] if k == 0 else None, step=3 + k)
    out = acc.finish()
    kept = ([dict(r) for r in out["layers"]], {k: v.copy() for k, v in out["steps"].items()})
    acc.reset()
    for taps in batches[:2]:
        acc.record(taps, loss=torch.tensor(7.0), grads=[torch.full((4,), 3.0)], step=9)
    assert out["layers"] == kept[0]
    assert all(np.array_equal(out["steps"][k], kept[1][k]) for k in kept[1])
    again = acc.finish()
    assert out["steps"]["loss"].tolist() == [1.5] and again["steps"]["loss"].tolist() == [7.0, 7.0]
    assert again["layers"][0]["count"] == sum(t[0][0].numel() for t in batches[:2])
    assert acc.steps == 2 and acc.seen == 32


def test_channels_last_taps_give_the_same_statistics_without_a_copy():
    from study.stats import flat_view

    batches = _batches(seed=1)
    cl = [[tuple(t.contiguous(memory_format=torch.channels_last) for t in pair) for pair in taps]
          for taps in batches]
    t = cl[0][0][0]
    assert not t.is_contiguous() and flat_view(t).data_ptr() == t.data_ptr()
    assert sorted(flat_view(t).tolist()) == sorted(t.reshape(-1).tolist())
    rows = {}
    for name, bs in (("nchw", batches), ("cl", cl)):
        acc = _stats(len(bs), bins=32)
        for taps in bs:
            acc.record(taps)
        rows[name] = acc.finish()["layers"]
    for a, b in zip(rows["nchw"], rows["cl"], strict=True):
        assert a["hist"] == b["hist"] and a["count"] == b["count"]
        sd = a["var"] ** 0.5
        assert abs(a["mean"] - b["mean"]) <= 1e-6 * max(abs(a["mean"]), sd)
        assert abs(a["var"] - b["var"]) <= 1e-6 * a["var"]


def test_shared_conv_and_relu_input_count_once_per_site():
    """The `none` variant hands the same tensor as conv output and ReLU input: both sites get
    its statistics, and reducing it once must not leave either site short."""
    batches = [[(c, c) for c, _ in taps] for taps in _batches(1)]
    acc = _stats(len(batches), bins=32)
    for taps in batches:
        acc.record(taps)
    rows = acc.finish()["layers"]
    for layer in range(3):
        conv, pre = rows[2 * layer], rows[2 * layer + 1]
        x = np.concatenate([taps[layer][0].double().numpy().ravel() for taps in batches])
        for row in (conv, pre):
            assert row["count"] == x.size and sum(row["hist"]) == x.size
            assert abs(row["mean"] - x.mean()) <= 1e-6 * max(1.0, abs(x.mean()))
            assert abs(row["var"] - x.var()) <= 1e-6 * x.var()
        assert conv["hist"] == pre["hist"]


def test_taps_reduced_during_the_forward_pass_equal_the_taps_reduced_after():
    """The trial hands the model a TapReducer, which reduces each layer while the forward pass
    runs; it must record what the same taps give when reduced afterwards."""
    from study.model import build_model

    torch.manual_seed(0)
    model = build_model("none")
    x = torch.randn(16, 3, 32, 32)
    during, after = _stats(1, bins=32), _stats(1, bins=32)
    reducer = during.tap_reducer(hist=True)
    model(x, reducer)
    during.count(during.accumulate(reducer), 0, False, len(x))
    assert len(reducer) == 3
    after.record([(c.detach().clone(), p.detach().clone()) for c, p in reducer])
    rows = during.finish()["layers"]
    assert rows == after.finish()["layers"]
    for row, t in zip(rows, (t for pair in reducer for t in pair), strict=True):
        ref = t.detach().double().numpy().ravel()
        assert row["count"] == ref.size and sum(row["hist"]) == ref.size
        assert abs(row["mean"] - ref.mean()) <= 1e-6 * max(1.0, ref.std())
        # fp32 tolerance: a tap here is 262,144 values, and one thread's BLAS dot sums their
        # squares in a few float32 lanes (1.4e-6 off for one tap at 1 thread; 2 threads halve it)
        assert abs(row["var"] - ref.var()) <= 1e-5 * ref.var()


def test_values_beyond_the_histogram_range_land_in_its_edge_bins():
    """+inf and huge values in the last bin, -inf, huge negatives and NaN (a diverging trial)
    in the first, by the definition floor(clip((x - lo)·bins/(hi - lo), 0, bins - 1))."""
    acc = _stats(1, bins=16)
    odd = torch.tensor([np.inf, 1e30, 8.0, 7.99, -np.inf, -1e30, -8.0, np.nan, 0.0], dtype=torch.float32)
    values = torch.cat([odd, torch.zeros(16 * 16 * 32 * 32 - len(odd))]).view(16, 16, 32, 32)
    taps = [(values, values)] + [(torch.zeros(16, c, s, s),) * 2 for c, s in ((32, 16), (64, 8))]
    acc.record(taps)
    hist = np.array(acc.finish()["layers"][0]["hist"])
    x = odd.numpy().astype(np.float64)
    x = np.where(np.isnan(x), -np.inf, x)  # NaN counts as below the range
    ref = np.floor(np.clip((x + 8) * 16 / 16, 0, 15)).astype(int)
    assert ref.tolist() == [15, 15, 15, 15, 0, 0, 0, 0, 8]
    expect = np.bincount(ref, minlength=16)
    expect[8] += values.numel() - len(odd)  # the zeros
    assert hist.tolist() == expect.tolist()


@pytest.mark.parametrize("norm", ["batch", "noisy_batch"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("degenerate", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)"))])
def test_moments_from_bn_statistics_match_float64_reference(norm, layout, degenerate, device):
    """Taps that bring their BN layer's statistics are not reduced: the conv output's moments
    (and plain BN's output's) are derived from them. They must still be the moments of the
    tensors, checked as in the float64 test above, on batches of two sizes.

    ``degenerate`` adds a constant conv channel (variance 0) and one whose variance is under
    BN's eps, so that eps counts. In such a channel the fp32 BN output is off its definition
    by the kernel's rounding of the mean times 1/sqrt(var + eps) (~1e-4 of the layer's spread
    on a CPU in channels-last); the derived moments follow the definition, so plain BN's
    output is checked there against BN computed in float64 from the conv output."""
    from study.model import build_model

    torch.manual_seed(0)
    model = build_model(norm, 1.0).to(device, memory_format=layout)
    model.set_noise_generator(torch.Generator(device).manual_seed(1))
    with torch.no_grad():
        if degenerate:
            model.blocks[0].conv.weight[0] = 0  # channel 0: constant conv output
            model.blocks[0].conv.weight[1] *= 1e-3  # channel 1: variance ~1e-6, under eps = 1e-5
        for block in model.blocks:
            block.norm.weight.uniform_(0.5, 2)
            block.norm.bias.uniform_(-1, 1)
    acc = EpochStats(3, 1, (0,) * 5, 64, 8.0, torch.device(device), model.bn_channels())
    batches = []
    for n in (16, 16, 7):
        taps = acc.tap_reducer(hist=True)
        model(torch.randn(n, 3, 32, 32).to(device, memory_format=layout), taps)
        acc.count(acc.accumulate(taps), 0, False, n)
        ref = []
        for block, (c, p, _bn) in zip(model.blocks, taps, strict=True):
            c, p = c.detach().cpu().double(), p.detach().cpu().double()
            if norm == "batch":  # BN's output by its definition, in float64
                layer = block.norm
                mean, var = c.mean((0, 2, 3), keepdim=True), c.var((0, 2, 3), unbiased=False, keepdim=True)
                w, b = (t.detach().cpu().double().view(1, -1, 1, 1) for t in (layer.weight, layer.bias))
                defined = (c - mean) / torch.sqrt(var + layer.eps) * w + b
                if not degenerate:  # then it is the fp32 tensor's, to fp32 rounding
                    torch.testing.assert_close(defined, p, rtol=1e-5, atol=1e-5)
                p = defined
            ref.append((c, p))
        batches.append(ref)
    assert acc.derived == [True, norm == "batch"] * 3  # noisy BN's output is still reduced
    rows = acc.finish()["layers"]
    for i, row in enumerate(rows):
        xs = [taps[i // 2][i % 2].numpy() for taps in batches]
        flat = np.concatenate([x.ravel() for x in xs])
        assert row["count"] == flat.size == sum(row["hist"])
        sd = flat.std()
        # fp32 tolerance: the CPU's channels-last BN kernel sums its mean and variance to ~1e-6
        assert abs(row["mean"] - flat.mean()) <= 1e-5 * max(abs(flat.mean()), sd), i
        assert abs(row["var"] - flat.var()) <= 1e-5 * flat.var(), i
        bm = np.array([x.mean() for x in xs])
        bv = np.array([x.var() for x in xs])
        assert abs(row["batch_mean_std"] - bm.std()) <= 1e-5 * max(bm.std(), sd), i
        assert abs(row["batch_var_std"] - bv.std()) <= 1e-5 * bv.max(), i


def test_bn_statistics_an_epoch_was_not_made_for_are_refused():
    from study.model import build_model

    model = build_model("batch")
    acc = _stats(1)  # made without bn_channels
    taps = acc.tap_reducer(hist=False)
    model(torch.randn(2, 3, 32, 32), taps)
    with pytest.raises(ValueError, match=r"widths \[\] \(bn_channels\), got \[16, 32, 64\]"):
        acc.accumulate(taps)
