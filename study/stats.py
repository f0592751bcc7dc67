"""One epoch's statistics, accumulated on the training device (docs/design.md, "What is
recorded").

Nothing here waits for the device during an epoch. Each step writes one row of a
preallocated device buffer: the (sum, sum of squares) of every tap (the conv output and the
ReLU input of each conv layer), the batch's loss and number of correct predictions, and on a
gradient step the l2 norm of every parameter's gradient, in one stack and one write (each
small operation costs a CPU training loop dearly). Every ``hist_every``-th step also counts
each tap into its histogram. ``finish()`` moves it all to the host once, at the end of the
epoch, and derives the rows of the layers and steps tables and the epoch's training loss and
accuracy, in float64.

A layer whose BatchNorm computed batch statistics (``study.model.BatchStats``) costs no
pass at all: its conv output's moments follow from BN's per-channel mean and variance, and
plain BN's output's from its weight and bias (its normalised output has, per channel, mean 0
and mean square var/(var + eps)). The step's row then holds BN's four per-channel vectors,
and ``finish()`` derives the moments from them in float64 (bench/bn_moments.py measures what
that saves).

Recording a step is two halves so that a CUDA graph can replay the first: ``accumulate`` is
device work only (it writes the row a device-side cursor points at, then advances it) and
``count`` is the host's bookkeeping (element counts, step numbers, images), which a graph
replay cannot do and the caller repeats after each replay. The buffers live for the whole
trial (a captured graph holds their addresses); ``reset()`` empties them for the next epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from study.results import ACT_LAYERS, GRAD_LAYERS, SITES, WEIGHT_SITE


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` as a 1-D view in memory order (no copy for NCHW or channels-last
    tensors): moments and histograms do not depend on the order."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided((t.numel(),), (1,))  # dense: its memory, in order, is its elements
    return t.reshape(-1)


@torch.no_grad()
def weight_norm_rows(model: torch.nn.Module) -> list[dict]:
    """Rows for the layers table (without trial_id and epoch): the l2 norm of each GRAD_LAYERS
    weight of ``model`` (a ``SeedCNN``) as it is now, in float64, one host sync. Taken at the
    epoch's end, outside any captured step: with BN the loss ignores a conv weight's scale, so
    its growth is a confound of the gradient norms that only these norms show."""
    weights = model.weight_layers()
    norms = torch.stack([torch.linalg.vector_norm(weights[n].weight.double()) for n in GRAD_LAYERS])
    return [dict(layer=name, site=WEIGHT_SITE, weight_norm=value)
            for name, value in zip(GRAD_LAYERS, norms.tolist(), strict=True)]


class EpochStats:
    """Per step: each tap's moments, the loss and number correct, and every parameter's
    gradient norm; per tap: a histogram every ``hist_every``-th step.

    Per batch the sum and the sum of squares are taken in float32 (a pairwise sum and a
    BLAS dot: one fast pass each); the epoch's mean and variance are then merged from the
    per-batch moments in float64 (Chan et al.'s parallel formula), which also gives the
    spread of the per-batch moments across the epoch. The histogram has equal bins over
    [-range, range] (values outside land in the first or last bin); binning every element of
    every batch would cost a third of a CPU training step (at ``hist_every = 50``, 1%). The
    global gradient norm and the layers' (``weight_idx``: positions of GRAD_LAYERS' weights
    among the parameters) are taken from the parameters' norms on the host, in float64.
    ``bn_channels``: per layer, the width of the BN layer whose batch statistics its taps bring
    (``SeedCNN.bn_channels()``), 0 where there is none.
    """

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_steps: int, bins: int, value_range: float,
                  device: torch.device) -> EpochStats:
        """Sized for ``model`` (a ``SeedCNN``): its parameters, where the GRAD_LAYERS weights sit
        among them, and its BN layers' widths."""
        params, weights = list(model.parameters()), model.weight_layers()
        weight_idx = [next(i for i, p in enumerate(params) if p is weights[n].weight) for n in GRAD_LAYERS]
        return cls(n_steps, len(params), weight_idx, bins, value_range, device, model.bn_channels())

    def __init__(self, n_steps: int, n_params: int, weight_idx: Sequence[int], bins: int,
                 value_range: float, device: torch.device, bn_channels: Sequence[int] = ()):
        self.n_taps = len(ACT_LAYERS) * len(SITES)
        # per layer, the channels of a BN layer whose batch statistics the taps bring (0: none)
        self.bn_channels = list(bn_channels) or [0] * len(ACT_LAYERS)
        if len(self.bn_channels) != len(ACT_LAYERS):
            raise ValueError(f"bn_channels must give one width per layer ({len(ACT_LAYERS)}), "
                             f"not {self.bn_channels}")
        self.derived: list[bool] | None = None  # per tap: moments from BN's statistics
        self.bn_eps: list[float] = []
        self.n_params, self.weight_idx = n_params, list(weight_idx)
        if len(self.weight_idx) != len(GRAD_LAYERS) or not all(0 <= i < n_params for i in self.weight_idx):
            raise ValueError(f"weight_idx must give {len(GRAD_LAYERS)} positions among {n_params} "
                             f"parameters, not {self.weight_idx}")
        self.bins, self.lo, self.hi = bins, -float(value_range), float(value_range)
        self.scale = bins / (self.hi - self.lo)
        self.n_steps = n_steps
        self.loss_col = 2 * self.n_taps  # then the number correct, then the parameters' norms
        self.bn_col = self.loss_col + 2 + n_params  # then 4 vectors per BN layer
        width = self.bn_col + 4 * sum(self.bn_channels)
        self.rows = torch.zeros(n_steps, width, dtype=torch.float32, device=device)
        self.cursor = torch.zeros(1, dtype=torch.int64, device=device)  # the row the next step fills
        self.hist = torch.zeros(self.n_taps, bins, dtype=torch.int64, device=device)
        self._zero = torch.zeros((), dtype=torch.float32, device=device)  # what a step did not record
        self.numels = np.zeros((n_steps, self.n_taps), dtype=np.int64)
        self.step_index = np.zeros(n_steps, dtype=np.int64)
        self.grad_step = np.zeros(n_steps, dtype=bool)
        self.images = np.zeros(n_steps, dtype=np.int64)
        self.steps = 0

    def reset(self) -> None:
        """Empty, in place, for the next epoch."""
        self.rows.zero_()
        self.cursor.zero_()
        self.hist.zero_()
        for a in (self.numels, self.step_index, self.grad_step, self.images):
            a[:] = 0
        self.steps = 0

    @property
    def seen(self) -> int:
        """Images trained on this epoch."""
        return int(self.images[: self.steps].sum())

    def bin_index(self, x: torch.Tensor) -> torch.Tensor:
        """Bin of each element: floor((x - lo) * bins / (hi - lo)), clamped to the edge bins.

        NaN (a diverging trial) lands in bin 0 through the second clamp. In place after the
        first operation and as int32: on a CPU much faster than out of place in int64.
        """
        idx = x.reshape(-1).sub(self.lo).mul_(self.scale).clamp_(0, self.bins - 1).to(torch.int32)
        return idx.clamp_(0, self.bins - 1)

    def add_to_hist(self, k: int, bins: torch.Tensor) -> None:
        """Count ``bins`` (``bin_index`` of a tap's elements) into tap k's histogram."""
        if bins.is_cuda:  # bincount would wait for the device to size its output
            self.hist[k].index_add_(0, bins, torch.ones_like(bins, dtype=self.hist.dtype))
        else:
            self.hist[k] += torch.bincount(bins, minlength=self.bins)

    def tap_reducer(self, hist: bool) -> TapReducer:
        """A list to hand ``SeedCNN.forward`` as its taps: it reduces each layer's pair as the
        forward pass appends it (then ``accumulate`` takes it as the step's taps)."""
        return TapReducer(self, hist)

    @torch.no_grad()
    def accumulate(self, taps: TapReducer, loss: torch.Tensor | None = None,
                   logits: torch.Tensor | None = None, y: torch.Tensor | None = None,
                   grads: Sequence[torch.Tensor] | None = None) -> list[int]:
        """The device half of ``record``: write the step's row; returns the taps' element
        counts for ``count``. ``taps``: the step's filled ``tap_reducer``; ``grads``: every
        parameter's gradient, on a gradient step."""
        if len(taps.numels) != self.n_taps:
            raise ValueError(f"expected {self.n_taps} taps, got {len(taps.numels)}")
        self._check_bn(taps)
        z = self._zero
        batch = [z if loss is None else loss.detach().float(),
                 z if logits is None else (logits.argmax(1) == y).sum(dtype=torch.float32)]
        if grads is None:
            norms = [z] * self.n_params
        elif len(grads) != self.n_params:
            raise ValueError(f"expected {self.n_params} gradients, got {len(grads)}")
        else:
            norms = list(torch._foreach_norm(list(grads)))
        row = torch.stack(taps.moments + batch + norms)
        if taps.bn:
            row = torch.cat([row] + [v for b in taps.bn for v in b[:4]])  # no_grad: no graph
        self.rows.index_copy_(0, self.cursor, row.unsqueeze(0))
        self.cursor += 1
        return taps.numels

    def _check_bn(self, taps: TapReducer) -> None:
        """The taps bring BN statistics for the layers this was made for, the same every step."""
        widths = [c for c in self.bn_channels if c]
        if [len(b.mean) for b in taps.bn] != widths:
            raise ValueError(f"expected BN statistics of widths {widths} (bn_channels), got "
                             f"{[len(b.mean) for b in taps.bn]}")
        if self.derived is None:
            self.derived, self.bn_eps = list(taps.derived), [b.eps for b in taps.bn]
        elif taps.derived != self.derived:
            raise ValueError("a step's taps changed which moments come from BN statistics")

    def count(self, numels: Sequence[int], step: int, grad: bool, n_images: int) -> None:
        """The host half of ``record``: the row just written is ``step``'s, of ``n_images``
        images with ``numels`` elements per tap, with gradient norms if ``grad``."""
        if self.steps >= self.n_steps:
            raise IndexError(f"EpochStats holds {self.n_steps} steps; reset() it first")
        k = self.steps
        self.numels[k], self.step_index[k], self.grad_step[k], self.images[k] = numels, step, grad, n_images
        self.steps += 1

    def record(self, taps: Sequence[tuple[torch.Tensor, torch.Tensor]], hist: bool = True,
               loss: torch.Tensor | None = None, logits: torch.Tensor | None = None,
               y: torch.Tensor | None = None, grads: Sequence[torch.Tensor] | None = None,
               step: int = 0) -> None:
        """Add one step (both halves); ``taps`` is the model's list of (conv output, ReLU
        input) per layer."""
        reducer = self.tap_reducer(hist)
        for pair in taps:
            reducer.append(pair)
        numels = self.accumulate(reducer, loss, logits, y, grads)
        self.count(numels, step, grads is not None, len(taps[0][0]))

    def losses_finite(self) -> bool:
        """Whether every loss so far is finite. Reads the device: a CPU trial's divergence check."""
        return bool(torch.isfinite(self.rows[: self.steps, self.loss_col]).all())

    def finish(self) -> dict:
        """The epoch on the host: ``layers`` (a row per (layer, site) for the layers table),
        ``steps`` (columns of the steps table, one entry per gradient step), ``loss_sum``
        (the sum of the batches' mean loss x their images) and ``correct`` (without trial_id
        and epoch)."""
        k = self.steps
        rows = self.rows[:k].cpu().numpy().astype(np.float64)
        loss, correct = rows[:, self.loss_col], rows[:, self.loss_col + 1]
        with np.errstate(invalid="ignore"):  # inf * 0 in a diverged batch is NaN: fine
            loss_sum = float((loss * self.images[:k]).sum())
        g = self.grad_step[:k]
        norms = rows[g, self.loss_col + 2 : self.bn_col]
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.sqrt((norms**2).sum(1))
        steps = {"step": self.step_index[:k][g].copy(), "loss": loss[g].astype(np.float32),
                 "grad_norm": total.astype(np.float32)}
        for name, i in zip(GRAD_LAYERS, self.weight_idx, strict=True):
            steps[f"grad_norm_{name}"] = norms[:, i].astype(np.float32)
        sums = rows[:, : self.loss_col].reshape(k, self.n_taps, 2)
        self._derive_bn_moments(sums, rows[:, self.bn_col :])
        return dict(layers=self._layer_rows(sums),
                    steps=steps, loss_sum=loss_sum, correct=int(correct.sum()))

    def _derive_bn_moments(self, sums: np.ndarray, bn: np.ndarray) -> None:
        """Fill in, in place, the (sum, sum of squares) of the taps the BN statistics cover:
        the conv output x from its per-channel mean and variance, and plain BN's output
        w * (x - mean) * rstd + b, whose normalised part has per-channel mean 0 and mean square
        var * rstd^2 = 1 - eps * rstd^2. Each channel holds numel / C elements."""
        if self.derived is None:  # no step recorded yet
            return
        col, k = 0, self.steps
        bn_layers = [layer for layer, c in enumerate(self.bn_channels) if c]
        for layer, eps in zip(bn_layers, self.bn_eps, strict=True):
            c = self.bn_channels[layer]
            mean, rstd, w, b = bn[:, col : col + 4 * c].reshape(k, 4, c).transpose(1, 0, 2)
            col += 4 * c
            conv, relu_in = 2 * layer, 2 * layer + 1
            n = self.numels[:k, conv].astype(np.float64) / c
            with np.errstate(all="ignore"):  # a diverged batch: inf, NaN, rstd 0
                norm_sq = np.maximum(1.0 - eps * rstd**2, 0.0)  # var / (var + eps)
                var = np.maximum(1.0 / rstd**2 - eps, 0.0)
                if self.derived[conv]:
                    sums[:, conv] = np.stack([n * mean.sum(1), n * (var + mean**2).sum(1)], 1)
                if self.derived[relu_in]:
                    sums[:, relu_in] = np.stack([n * b.sum(1), n * (w**2 * norm_sq + b**2).sum(1)], 1)

    def _layer_rows(self, s: np.ndarray) -> list[dict]:
        k = self.steps
        hist = self.hist.cpu().numpy()
        n = self.numels[:k].astype(np.float64)
        rows = []
        for i in range(self.n_taps):
            layer, site = ACT_LAYERS[i // len(SITES)], SITES[i % len(SITES)]
            n_b = n[:, i]
            total = n_b.sum()
            nan = float("nan")
            with np.errstate(invalid="ignore", over="ignore"):  # a diverged batch's inf, NaN: fine
                m_b = s[:, i, 0] / n_b
                v_b = np.maximum(s[:, i, 1] / n_b - m_b**2, 0.0)
                mean = float((n_b * m_b).sum() / total) if k else nan
                var = float((n_b * (v_b + (m_b - mean) ** 2)).sum() / total) if k else nan
                mean_std, var_std = (float(m_b.std()), float(v_b.std())) if k else (nan, nan)
            rows.append(
                dict(
                    layer=layer,
                    site=site,
                    count=int(total),
                    mean=mean,
                    var=var,
                    batch_mean_std=mean_std,
                    batch_var_std=var_std,
                    hist_lo=self.lo,
                    hist_hi=self.hi,
                    hist=hist[i].tolist(),
                )
            )
        return rows


class TapReducer(list):
    """The taps list of one batch, reduced as it fills: the sum and the sum of squares of each
    tensor (float32, one pass each: a pairwise sum and a BLAS dot), and its histogram on a
    histogram step. Reducing a layer's (conv output, ReLU input) while the forward pass has
    just written them finds them in cache: on a CPU the moments then cost less than after the
    backward pass. A tap that brings its BN layer's batch statistics (``study.model.BatchStats``)
    is not reduced: the statistics go into the row, and ``EpochStats.finish`` derives the
    moments they cover."""

    def __init__(self, stats: EpochStats, hist: bool) -> None:
        super().__init__()
        self.stats, self.hist = stats, hist
        self.moments: list[torch.Tensor] = []  # sum, sum of squares, sum, ... tap after tap
        self.numels: list[int] = []
        self.derived: list[bool] = []  # per tap: its moments come from BN statistics
        self.bn: list = []  # the BatchStats brought, layer after layer

    @torch.no_grad()
    def append(self, tap: tuple) -> None:
        """One conv block's ``(conv output, ReLU input)`` or ``(conv output, ReLU input,
        BatchStats)``."""
        super().append(tap)
        stats, bins, zero = self.stats, None, self.stats._zero
        bn = tap[2] if len(tap) > 2 else None
        if bn is not None:
            self.bn.append(bn)
        for site, t in enumerate(tap[:2]):
            k = len(self.numels)
            if site == 1 and t is tap[0]:  # `none`: the ReLU input is the conv output
                self.moments += self.moments[-2:]
                self.numels.append(self.numels[-1])
                self.derived.append(self.derived[-1])
            else:
                derived = bn is not None and (site == 0 or bn.covers_output)
                f = flat_view(t) if self.hist or not derived else None
                self.moments += (zero, zero) if derived else (f.sum(), torch.dot(f, f))
                self.numels.append(t.numel())
                self.derived.append(derived)
                bins = stats.bin_index(f) if self.hist else None
            if bins is not None:
                stats.add_to_hist(k, bins)
