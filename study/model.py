"""The seed's CNN (docs/design.md, "The experiment") with a registry of norm variants, noisy
BatchNorm included (the ℓp batch norm is in study.norms)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from study.image_format import CONV_WIDTHS, N_CLASSES
from study.norms import LpBatchNorm2d
from study.results import GRAD_LAYERS
from study.variants import NOISE_SCOPES, PARAM_DEFAULTS


def noise_constants(noise: float) -> tuple[float, float, float, float]:
    """(n_mu, n_sigma, r_mu, r_sigma) at noise magnitude ``noise``; 1 is Santurkar et al.'s."""
    return 0.5 * noise, 1.0 + 0.25 * noise, 0.1 * noise, 0.1 * noise


def expected_scale(noise: float) -> float:
    """E[s] = E[sigma] = (1 + n_sigma) / 2 = 1 + noise / 8: the mean scale noisy BN applies in
    training (E[m] = 0), which its noise-free evaluation leaves out (study.noise_eval)."""
    return (1.0 + noise_constants(noise)[1]) / 2


class BatchStats(NamedTuple):
    """What a BatchNorm layer in training mode computes anyway: per channel, the batch mean
    and 1/sqrt(var + eps) of its input (var biased), beside its affine weight and bias. The
    moments of its input and of its output follow from them exactly (``study.stats``), so the
    trial's statistics need no pass of their own over either tensor. ``covers_output``: the
    tapped ReLU input is this BN output itself (plain BN; noisy BN distorts it first)."""

    mean: torch.Tensor
    rstd: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    covers_output: bool


class BatchNorm2dWithStats(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state dict) whose training-mode forward
    also hands over the batch statistics it computed (``forward_with_stats``). Training mode
    calls ``torch.native_batch_norm``, the kernel ``F.batch_norm`` runs on a CPU: the same
    output, gradients and running statistics to the bit (tests/test_model.py); on a GPU it is
    PyTorch's own kernel rather than cuDNN's."""

    #: Whether this layer's training output is BN's own (``BatchStats.covers_output``).
    output_is_bn = True

    def forward_with_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, BatchStats | None]:
        if not (self.training and self.track_running_stats and self.affine and self.momentum is not None):
            return super().forward(x), None
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)  # as nn.BatchNorm2d.forward does
        out, mean, rstd = torch.native_batch_norm(x, self.weight, self.bias, self.running_mean,
                                                  self.running_var, True, self.momentum, self.eps)
        return out, BatchStats(mean, rstd, self.weight, self.bias, self.eps, self.output_is_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_stats(x)[0]


class NoisyBatchNorm2d(BatchNorm2dWithStats):
    """BatchNorm2d whose output is distorted as ``s * a + m`` in training mode.

    Per step, per channel j (``scope="channel"``, Algorithm 1 of the paper, and
    ``"sample_channel"``) or once per layer (``scope="layer"``, the seed's notebook):
    mu ~ U(-n_mu, n_mu), sigma ~ U(1, n_sigma); then per element (per image and channel,
    shared by its positions, for ``"sample_channel"``) m ~ U(mu - r_mu, mu + r_mu) and
    s ~ N(sigma, r_sigma). All draws come from ``self.generator`` (the trial's own, on the
    training device), never the global RNG; their shapes are fixed, so a CUDA graph replays them.
    ``freeze_noise`` keeps reusing the last sample, so probes can replay a step exactly.
    """

    output_is_bn = False  # its output is s * a + m

    def __init__(self, num_features: int, noise: float = 1.0, scope: str = "channel") -> None:
        super().__init__(num_features)
        if scope not in NOISE_SCOPES:
            raise ValueError(f"noise scope must be one of {', '.join(NOISE_SCOPES)}, not {scope!r}")
        self.noise, self.scope = float(noise), scope
        self.generator: torch.Generator | None = None
        self.freeze_noise = False
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def draw(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One noise sample (scale s, shift m), shaped like ``a`` and in its memory layout
        (for ``"sample_channel"``: (N, C, 1, 1), broadcast over the positions).

        The per-element draws fill (N, C, H, W) order whatever ``a``'s layout, so a seed gives
        the same noise in either; a channels-last ``a`` (a CPU trial) then gets them as
        channels-last copies: ``s * a + m`` on mixed layouts, and the NCHW tensor it returns
        to the next layers, cost a noisy CPU step more than the copies (bench/noise_layout.py).
        The arithmetic is in place, on the drawn buffers; it gives the same values as out of
        place.
        """
        n_mu, n_sigma, r_mu, r_sigma = noise_constants(self.noise)
        g, dev, dt = self.generator, a.device, a.dtype
        c = 1 if self.scope == "layer" else a.shape[1]
        u = torch.rand(2, 1, c, 1, 1, generator=g, device=dev, dtype=dt)
        mu, sigma = (2 * u[0] - 1) * n_mu, 1 + u[1] * (n_sigma - 1)
        shape = (*a.shape[:2], 1, 1) if self.scope == "sample_channel" else a.shape
        m = torch.rand(shape, generator=g, device=dev, dtype=dt).mul_(2).sub_(1).mul_(r_mu).add_(mu)
        s = torch.randn(shape, generator=g, device=dev, dtype=dt).mul_(r_sigma).add_(sigma)
        cl = torch.channels_last
        if shape == a.shape and not a.is_contiguous() and a.is_contiguous(memory_format=cl):
            s, m = s.contiguous(memory_format=cl), m.contiguous(memory_format=cl)
        return s, m

    def forward_with_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, BatchStats | None]:
        a, bn = super().forward_with_stats(x)
        return self.add_noise(a), bn

    def add_noise(self, a: torch.Tensor) -> torch.Tensor:
        """``s * a + m`` for the BN output ``a`` in training mode; ``a`` itself in eval mode."""
        if not self.training:
            return a
        if self.generator is None:
            raise RuntimeError("NoisyBatchNorm2d needs its generator set (model.set_noise_generator)")
        if not (self.freeze_noise and self._last is not None):
            self._last = self.draw(a)
        s, m = self._last
        return s * a + m

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise={self.noise}, scope={self.scope}"


class NormSettings(NamedTuple):
    """A variant's parameters (``study.variants.PARAMS``, and the noise's scope), as its layer
    factory takes them."""

    noise: float = 0.0
    noise_scope: str = "channel"
    p: float = PARAM_DEFAULTS["p"]
    groups: int = PARAM_DEFAULTS["groups"]


#: norm variant name (``study.variants``) -> factory(num_channels, NormSettings) -> module (or
#: None for no norm). LayerNorm is GroupNorm with one group: the mean and variance over
#: (C, H, W) of each image, with a per-channel affine as every other variant has (nn.LayerNorm
#: over (C, H, W) would learn an affine per element, 2·C·H·W parameters).
NORM_LAYERS: dict[str, Callable[[int, NormSettings], nn.Module | None]] = {
    "none": lambda c, s: None,
    "batch": lambda c, s: BatchNorm2dWithStats(c),
    "noisy_batch": lambda c, s: NoisyBatchNorm2d(c, s.noise, s.noise_scope),
    "lp_batch": lambda c, s: LpBatchNorm2d(c, s.p),
    "group": lambda c, s: nn.GroupNorm(s.groups, c),
    "layer": lambda c, s: nn.GroupNorm(1, c),
}


class ConvBlock(nn.Module):
    """conv 3×3 → [norm] → ReLU → maxpool 2: one conv stage of ``SeedCNN``.

    Its conv is registered before its norm, so ``parameters()`` lists them in that order, the
    order of the seed's network (the sum over parameters of gradient norms and the optimiser
    take them in that order).
    """

    def __init__(self, c_in: int, c_out: int, norm: nn.Module | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = norm  # None: no norm layer (the `none` variant)

    def forward(self, x: torch.Tensor, taps: list | None = None) -> torch.Tensor:
        c = self.conv(x)  # (B, C_out, H, W)
        if self.norm is None:
            p, bn = c, None
        elif taps is not None and isinstance(self.norm, BatchNorm2dWithStats):
            p, bn = self.norm.forward_with_stats(c)
        else:
            p, bn = self.norm(c), None
        if taps is not None:
            taps.append((c, p) if bn is None else (c, p, bn))
        return F.max_pool2d(F.relu(p), 2)  # (B, C_out, H/2, W/2)


class SeedCNN(nn.Module):
    """conv(3→16→32→64, 3×3) → [norm] → ReLU → maxpool ×3 → dropout → fc 1024→500 → fc 500→10.

    ``forward(x, taps)`` appends ``(conv_output, relu_input)`` of each conv block to
    ``taps`` when a list is given, which is how statistics are recorded without hooks; a block
    whose BN layer computed batch statistics appends them third (``BatchStats``). A forward
    with taps calls the norm layers' ``forward_with_stats`` directly, past their hooks.

    ``blocks[i]`` is the conv layer the results call ``ACT_LAYERS[i]`` (``study.results``).
    Checkpoints written before the blocks existed (``conv1.*``, ``norm1.*``, ...) still load.
    """

    def __init__(self, norm: str = "batch", noise: float = 0.0, noise_scope: str = "channel",
                 p: float | None = None, groups: int | None = None):
        super().__init__()
        if norm not in NORM_LAYERS:
            raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORM_LAYERS)}")
        given = dict(p=p, groups=groups)  # None: the variant's default (or a variant without it)
        settings = NormSettings(noise, noise_scope, **{k: v for k, v in given.items() if v is not None})
        widths = (3, *CONV_WIDTHS)
        self.blocks = nn.ModuleList(
            ConvBlock(c_in, c_out, NORM_LAYERS[norm](c_out, settings))
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(64 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, N_CLASSES)

    def forward(self, x: torch.Tensor, taps: list | None = None) -> torch.Tensor:
        for block in self.blocks:  # (B, 3, 32, 32) → (B, 16, 16, 16) → (B, 32, 8, 8) → (B, 64, 4, 4)
            x = block(x, taps)
        x = self.dropout(torch.flatten(x, 1))  # (B, 1024)
        x = self.dropout(F.relu(self.fc1(x)))  # (B, 500)
        return self.fc2(x)  # (B, 10)

    def bn_channels(self) -> list[int]:
        """Per conv block, the channels of a norm layer that hands over its batch statistics
        (``BatchNorm2dWithStats``, noisy BN included), else 0: the widths ``EpochStats`` keeps
        them in."""
        return [b.norm.num_features if isinstance(b.norm, BatchNorm2dWithStats) else 0 for b in self.blocks]

    def noisy_layers(self) -> list[NoisyBatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, NoisyBatchNorm2d)]

    def set_noise_generator(self, generator: torch.Generator) -> None:
        for m in self.noisy_layers():
            m.generator = generator

    def stages(self) -> dict[str, nn.Module]:
        """Each stage of the network by its layer's name (GRAD_LAYERS, in forward order): a conv
        block (its conv and norm layer) or a fully connected layer."""
        return dict(zip(GRAD_LAYERS, [*self.blocks, self.fc1, self.fc2], strict=True))

    def weight_layers(self) -> dict[str, nn.Module]:
        """The layers whose weight-gradient norm is recorded, by name (GRAD_LAYERS)."""
        return {name: stage.conv if isinstance(stage, ConvBlock) else stage
                for name, stage in self.stages().items()}

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # A state dict of the layout before ConvBlock (the state.pt of older studies, which
        # resume and study.noise_eval read) names block i's layers conv{i+1} and norm{i+1}.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            old = _OLD_KEY.fullmatch(key[len(prefix) :])
            if old is not None:
                kind, number, rest = old.groups()
                state_dict[f"{prefix}blocks.{int(number) - 1}.{kind}.{rest}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


#: A key of the layout before ConvBlock: (conv|norm)(block's number from 1).(parameter or buffer).
_OLD_KEY = re.compile(r"(conv|norm)([1-9])\.(.+)")


def build_model(norm: str, noise: float = 0.0, noise_scope: str = "channel",
                p: float | None = None, groups: int | None = None) -> SeedCNN:
    return SeedCNN(norm, noise, noise_scope, p, groups)
