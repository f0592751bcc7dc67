"""The CNN and its norm variants against docs/design.md, "The experiment", and the noise's
definition."""

import pytest
import torch
from torch import nn

from study.model import NoisyBatchNorm2d, build_model, noise_constants
from study.results import GRAD_LAYERS


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_output_shape_and_parameter_counts():
    x = torch.randn(4, 3, 32, 32)
    for norm in ("none", "batch", "noisy_batch"):
        m = build_model(norm, noise=1.0)
        m.set_noise_generator(torch.Generator().manual_seed(0))
        assert m(x).shape == (4, 10)
    assert n_params(build_model("none")) == 541_094
    assert n_params(build_model("batch")) == 541_094 + 224
    assert n_params(build_model("noisy_batch", 1.0)) == 541_094 + 224


def test_layers_sit_where_the_design_says():
    m = build_model("batch")
    convs = [(m.blocks[0].conv, 3, 16), (m.blocks[1].conv, 16, 32), (m.blocks[2].conv, 32, 64)]
    for conv, cin, cout in convs:
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (
            cin, cout, (3, 3), (1, 1))
    assert [b.norm.num_features for b in m.blocks] == [16, 32, 64]
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (1024, 500, 10)
    assert m.dropout.p == 0.25
    assert build_model("none").blocks[0].norm is None
    assert isinstance(build_model("noisy_batch", 1.0).blocks[1].norm, NoisyBatchNorm2d)
    taps = []
    m(torch.randn(2, 3, 32, 32), taps)
    assert [t[0].shape[1:] for t in taps] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_layers_are_named_as_the_results_name_them_and_ordered_as_the_seeds_network():
    """GRAD_LAYERS name conv1..3 (the blocks' convs) and fc1, fc2; the parameters come conv
    before norm, block after block, then fc1, fc2: the seed's order, which the gradient-norm
    sums and the optimiser follow."""
    m = build_model("batch")
    weights = m.weight_layers()
    assert list(weights) == list(GRAD_LAYERS) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert [weights[n] for n in GRAD_LAYERS] == [m.blocks[0].conv, m.blocks[1].conv, m.blocks[2].conv,
                                                 m.fc1, m.fc2]
    assert list(m.stages().values()) == [*m.blocks, m.fc1, m.fc2]
    order = [p for _, p in m.named_parameters()]
    want = [t for b in m.blocks for t in (b.conv.weight, b.conv.bias, b.norm.weight, b.norm.bias)]
    want += [m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias]
    assert len(order) == len(want) and all(p is q for p, q in zip(order, want, strict=True))


#: The state dict keys of the layout before ConvBlock (checkpoints of older studies), in order.
OLD_KEYS = {
    "none": ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "conv3.weight",
             "conv3.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
    "batch": [f"{layer}{i}.{name}" for i in (1, 2, 3)
              for layer, names in (("conv", ("weight", "bias")),
                                   ("norm", ("weight", "bias", "running_mean", "running_var",
                                             "num_batches_tracked")))
              for name in names] + ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
}


@pytest.mark.parametrize("norm", ["none", "batch", "noisy_batch"])
def test_a_checkpoint_of_the_layout_before_the_blocks_loads(norm):
    """A state dict keyed conv1.*, norm1.*, ... (as the state.pt of older studies) loads into the
    same layers, and the model then computes what the saved one did."""
    torch.manual_seed(0)
    saved = build_model(norm, 1.0 if norm == "noisy_batch" else 0.0)
    saved.set_noise_generator(torch.Generator().manual_seed(1))
    with torch.no_grad():  # running statistics and a step count away from their defaults
        saved(torch.randn(8, 3, 32, 32))
    keys = OLD_KEYS["none" if norm == "none" else "batch"]
    old = dict(zip(keys, (v.clone() for v in saved.state_dict().values()), strict=True))
    loaded = build_model(norm, 1.0 if norm == "noisy_batch" else 0.0)
    assert str(loaded.load_state_dict(old)) == "<All keys matched successfully>"
    assert list(old) == keys  # the caller's dict is left as it was
    for i, block in enumerate(loaded.blocks, 1):
        assert torch.equal(block.conv.weight, old[f"conv{i}.weight"])
        if norm != "none":
            assert torch.equal(block.norm.running_var, old[f"norm{i}.running_var"])
            assert torch.equal(block.norm.num_batches_tracked, old[f"norm{i}.num_batches_tracked"])
    assert torch.equal(loaded.fc2.bias, old["fc2.bias"])
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), saved.eval()(x))
    bad = dict(old, **{"norm4.weight": torch.ones(3)})
    with pytest.raises(RuntimeError, match="norm4.weight|blocks.3"):
        build_model(norm).load_state_dict(bad)


def _forward_train(norm: str, noise: float, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    m = build_model(norm, noise)
    m.set_noise_generator(torch.Generator().manual_seed(1))
    torch.manual_seed(5)  # same dropout masks
    return m(x)


def test_noise_zero_is_exactly_batchnorm():
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(_forward_train("noisy_batch", 0.0, x), _forward_train("batch", 0.0, x))
    assert not torch.equal(_forward_train("noisy_batch", 1.0, x), _forward_train("batch", 0.0, x))


def test_noise_follows_its_definition():
    torch.manual_seed(0)
    layer = NoisyBatchNorm2d(6, noise=1.0)
    layer.generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, 5) * 3 + 1
    out = layer(x)
    bn = nn.BatchNorm2d(6)
    bn.load_state_dict({k: v for k, v in layer.state_dict().items()})
    bn.running_mean.zero_(), bn.running_var.fill_(1), bn.num_batches_tracked.zero_()
    a = bn(x)
    replay = NoisyBatchNorm2d(6, noise=1.0)
    replay.generator = torch.Generator().manual_seed(3)
    s, m = replay.draw(a)
    torch.testing.assert_close(out, s * a + m, rtol=0, atol=0)


def test_noise_moments_at_noise_one():
    """Per-channel mu ~ U(-.5,.5), sigma ~ U(1,1.25); per element m ~ U(mu±.1), s ~ N(sigma,.1)."""
    n_mu, n_sigma, r_mu, r_sigma = noise_constants(1.0)
    assert (n_mu, n_sigma, r_mu, r_sigma) == (0.5, 1.25, 0.1, 0.1)
    layer = NoisyBatchNorm2d(4000, noise=1.0)
    layer.generator = torch.Generator().manual_seed(0)
    s, m = layer.draw(torch.zeros(50, 4000, 1, 1, dtype=torch.float64))
    mu, sigma = m.mean(0).flatten(), s.mean(0).flatten()  # per-channel centres (50 elements each)
    # channel centres: U(-n_mu, n_mu) has var n_mu^2/3; plus the within-channel average's noise
    assert abs(mu.mean()) < 0.02
    expected = torch.tensor(n_mu**2 / 3 + r_mu**2 / 3 / 50, dtype=torch.float64)
    torch.testing.assert_close(mu.var(), expected, rtol=0.08, atol=0)
    assert abs(sigma.mean() - (1 + n_sigma) / 2) < 0.01
    assert sigma.min() > 1 - 0.1 and sigma.max() < n_sigma + 0.1
    # within a channel: m - mu_j uniform of half-width r_mu; s - sigma_j normal with std r_sigma
    dm, ds = m - m.mean(0, keepdim=True), s - s.mean(0, keepdim=True)
    assert dm.abs().max() <= 2 * r_mu
    torch.testing.assert_close(dm.var(), torch.tensor(r_mu**2 / 3, dtype=torch.float64), rtol=0.05, atol=0)
    torch.testing.assert_close(ds.std(), torch.tensor(r_sigma, dtype=torch.float64), rtol=0.05, atol=0)


@pytest.mark.parametrize("scope", ["channel", "layer"])
def test_noise_follows_its_definition_in_either_memory_layout(scope):
    """The draws, against the definition computed out of place from the same generator stream
    (u for mu and sigma, then m's uniforms and s's normals in (N, C, H, W) order), are the same
    values whether the layer's input is NCHW or channels-last; they come in the input's layout."""
    n_mu, n_sigma, r_mu, r_sigma = noise_constants(2.0)
    shape = (4, 6, 5, 3)
    g = torch.Generator().manual_seed(7)
    c = 6 if scope == "channel" else 1
    u = torch.rand(2, 1, c, 1, 1, generator=g)
    mu, sigma = (2 * u[0] - 1) * n_mu, 1 + u[1] * (n_sigma - 1)
    m_ref = mu + (2 * torch.rand(shape, generator=g) - 1) * r_mu
    s_ref = sigma + torch.randn(shape, generator=g) * r_sigma
    for fmt in (torch.contiguous_format, torch.channels_last):
        layer = NoisyBatchNorm2d(6, noise=2.0, scope=scope)
        layer.generator = torch.Generator().manual_seed(7)
        a = torch.randn(shape).contiguous(memory_format=fmt)
        s, m = layer.draw(a)
        assert torch.equal(s, s_ref) and torch.equal(m, m_ref), fmt
        assert s.is_contiguous(memory_format=fmt) and m.is_contiguous(memory_format=fmt), fmt


def test_layer_scope_shares_mu_and_sigma_across_channels():
    layer = NoisyBatchNorm2d(64, noise=1.0, scope="layer")
    layer.generator = torch.Generator().manual_seed(0)
    s, m = layer.draw(torch.zeros(200, 64, 4, 4, dtype=torch.float64))
    per_channel = m.mean((0, 2, 3))
    assert per_channel.std() < 0.01  # one shared centre, only element noise left
    assert torch.unique(torch.round(s.mean((0, 2, 3)), decimals=1)).numel() == 1


def test_eval_mode_adds_no_noise():
    torch.manual_seed(0)
    noisy, plain = build_model("noisy_batch", 2.0), build_model("batch")
    plain.load_state_dict(noisy.state_dict())
    noisy.set_noise_generator(torch.Generator().manual_seed(0))
    noisy.eval(), plain.eval()
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(noisy(x), plain(x))


def test_freeze_noise_replays_the_sample():
    layer = NoisyBatchNorm2d(3, noise=1.0)
    layer.generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    a = layer(x)
    layer.freeze_noise = True
    assert torch.equal(layer(x), a)
    layer.freeze_noise = False
    assert not torch.equal(layer(x), a)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_batchnorm_with_stats_is_batchnorm_to_the_bit(layout):
    """The "batch" variant's layer gives nn.BatchNorm2d's output, gradients, running statistics
    and step count exactly, and hands over the batch mean and 1/sqrt(var + eps) of its input
    (var biased) as the definition gives them in float64."""
    from study.model import BatchNorm2dWithStats

    torch.manual_seed(0)
    ref, ours = nn.BatchNorm2d(8), BatchNorm2dWithStats(8)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2), ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(6, 8, 5, 7) * 3 + 1).contiguous(memory_format=layout)
    g = torch.randn(6, 8, 5, 7)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # the second step sees the running statistics the first one left
        out_ref = ref(x_ref)
        out_ours, stats = ours.forward_with_stats(x_ours)
        assert torch.equal(out_ours, out_ref) and out_ours.is_contiguous(memory_format=layout)
        out_ref.backward(g), out_ours.backward(g)
    for a, b in [(x_ours, x_ref), (ours.weight, ref.weight), (ours.bias, ref.bias)]:
        assert torch.equal(a.grad, b.grad)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())
    xd = x.double()
    torch.testing.assert_close(stats.mean.double(), xd.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    rstd = 1 / torch.sqrt(xd.var((0, 2, 3), unbiased=False) + ref.eps)
    torch.testing.assert_close(stats.rstd.double(), rstd, rtol=1e-5, atol=0)
    assert stats.weight is ours.weight and stats.bias is ours.bias and stats.covers_output
    ours.eval(), ref.eval()
    out, stats = ours.forward_with_stats(x)
    assert stats is None and torch.equal(out, ref(x))


def test_noisy_bn_hands_over_its_bn_statistics_but_not_for_its_output():
    layer = NoisyBatchNorm2d(4, noise=1.0)
    layer.generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5)
    out, stats = layer.forward_with_stats(x)
    assert not stats.covers_output
    torch.testing.assert_close(stats.mean, x.mean((0, 2, 3)))
    layer.generator = torch.Generator().manual_seed(0)
    assert torch.equal(layer(x), out)  # forward is forward_with_stats' output
