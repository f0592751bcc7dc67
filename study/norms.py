"""The norm layers beside BatchNorm: Santurkar et al.'s ℓp batch norm (docs/design.md, "The
experiment"). GroupNorm and LayerNorm are ``torch.nn.GroupNorm`` itself (study.model)."""

from __future__ import annotations

import math

import torch
from torch import nn

#: The dimensions a batch norm averages over, per channel: the batch and the positions.
_BATCH_DIMS = (0, 2, 3)


class LpBatchNorm2d(nn.Module):
    """BatchNorm with the standard deviation replaced by the average ℓp norm (Santurkar et al.
    2018, §3.3). Per channel c, over the batch and the positions (as BN):

        μ_c = mean(x),  d = x − μ_c,  ν_c = mean(|d|^p)^(1/p)  (p = ∞: max |d|)
        y = γ_c · d / sqrt(ν_c² + ε) + β_c

    so that p = 2 is BN's training output exactly (ν_2² is BN's biased batch variance). The
    running statistics follow BN's rule with ν² in the variance's place: r_μ ← (1 − m) r_μ + m μ
    and r_ν² ← (1 − m) r_ν² + m ν² (no Bessel correction: it has no analogue for p ≠ 2); in
    eval mode y = γ (x − r_μ) / sqrt(r_ν² + ε) + β. Parameters: γ, β (2 per channel, as BN).

    Every operation is device work of fixed shape (the running statistics are updated in place,
    from tensors), so a CUDA graph can capture it; nothing here reads a value on the host.
    """

    def __init__(self, num_features: int, p: float, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if not p >= 1:
            raise ValueError(f"p must be >= 1 (or inf), got {p}")
        self.num_features, self.p, self.eps, self.momentum = num_features, float(p), eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_sq_scale", torch.ones(num_features))  # r_ν²

    def sq_scale(self, d: torch.Tensor) -> torch.Tensor:
        """ν² per channel of the centred ``d``, shaped (1, C, 1, 1)."""
        if self.p == 2:
            return d.square().mean(_BATCH_DIMS, keepdim=True)
        if math.isinf(self.p):
            return d.abs().amax(_BATCH_DIMS, keepdim=True).square()
        if self.p == 1:
            return d.abs().mean(_BATCH_DIMS, keepdim=True).square()
        return d.abs().pow(self.p).mean(_BATCH_DIMS, keepdim=True).pow(2 / self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        if self.training:
            mean = x.mean(_BATCH_DIMS, keepdim=True)
            d = x - mean
            sq = self.sq_scale(d)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().view(-1), self.momentum)
                self.running_sq_scale.lerp_(sq.detach().view(-1), self.momentum)
        else:
            d, sq = x - self.running_mean.view(shape), self.running_sq_scale.view(shape)
        return d * (self.weight.view(shape) * torch.rsqrt(sq + self.eps)) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, p={self.p:g}, eps={self.eps}, momentum={self.momentum}"
