"""On-device accumulators for one epoch's activation and gradient statistics (DESIGN §2).

Nothing here waits for the device during an epoch: each step writes into preallocated
device buffers, and ``finish()`` moves them to the host once, at the end of the epoch.

Each ``record`` is two halves so that a CUDA graph can replay the first: ``accumulate`` is
device work only (it writes the row a device-side cursor points at, then advances it) and
``count`` is the host's bookkeeping (element counts, step numbers), which a graph replay
cannot do and the caller repeats after each replay. The buffers live for the whole trial
(a captured graph holds their addresses); ``reset()`` empties them for the next epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from study.results import ACT_LAYERS, GRAD_LAYERS, SITES


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` as a 1-D view in memory order (no copy for NCHW or channels-last
    tensors): moments and histograms do not depend on the order."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.as_strided((t.numel(),), (1,))  # dense: its memory, in order, is its elements
    return t.reshape(-1)


class ActivationMoments:
    """Per-batch moments of each (layer, site), merged over the epoch, and a histogram.

    Per batch the sum and the sum of squares are taken in float32 (a pairwise sum and a
    BLAS dot: one fast pass each); the epoch's mean and variance are then merged from the
    per-batch moments in float64 (Chan et al.'s parallel formula), which also gives the
    spread of the per-batch moments across the epoch. The histogram has equal bins over
    [-range, range] (values outside land in the first or last bin) and counts every
    ``hist_every``-th batch: binning every element of every batch would cost a third
    of a CPU training step (at ``hist_every = 50`` it costs 1%).
    """

    def __init__(self, n_steps: int, bins: int, value_range: float, device: torch.device):
        self.n_taps = len(ACT_LAYERS) * len(SITES)
        self.bins, self.lo, self.hi = bins, -float(value_range), float(value_range)
        self.scale = bins / (self.hi - self.lo)
        self.n_steps = n_steps
        self.sums = torch.zeros(n_steps, self.n_taps, 2, dtype=torch.float32, device=device)
        self.cursor = torch.zeros(1, dtype=torch.int64, device=device)  # the row the next batch fills
        self.counts = np.zeros((n_steps, self.n_taps), dtype=np.int64)
        self.hist = torch.zeros(self.n_taps, bins, dtype=torch.int64, device=device)
        self.steps = 0

    def reset(self) -> None:
        """Empty, in place, for the next epoch."""
        self.sums.zero_()
        self.cursor.zero_()
        self.hist.zero_()
        self.counts[:] = 0
        self.steps = 0

    def bin_index(self, x: torch.Tensor) -> torch.Tensor:
        """Bin of each element: floor((x - lo) * bins / (hi - lo)), clamped to the edge bins.

        NaN (a diverging trial) lands in bin 0 through the second clamp. In place after the
        first operation and as int32: ~4x faster on a CPU than out of place in int64.
        """
        idx = x.reshape(-1).sub(self.lo).mul_(self.scale).clamp_(0, self.bins - 1).to(torch.int32)
        return idx.clamp_(0, self.bins - 1)

    def record(self, taps: Sequence[tuple[torch.Tensor, torch.Tensor]], hist: bool = True) -> None:
        """Add one batch; ``taps`` is the model's list of (conv output, ReLU input) per layer."""
        self.count(self.accumulate(taps, hist))

    def add_to_hist(self, k: int, bins: torch.Tensor) -> None:
        """Count ``bins`` (``bin_index`` of a tap's elements) into tap k's histogram."""
        if bins.is_cuda:  # bincount would wait for the device to size its output
            self.hist[k].index_add_(0, bins, torch.ones_like(bins, dtype=self.hist.dtype))
        else:
            self.hist[k] += torch.bincount(bins, minlength=self.bins)

    def tap_reducer(self, hist: bool) -> TapReducer:
        """A list to hand ``SeedCNN.forward`` as its taps: it reduces each layer's pair as the
        forward pass appends it; its ``commit()`` is then ``accumulate``'s work, done."""
        return TapReducer(self, hist)

    def accumulate(self, taps: Sequence[tuple[torch.Tensor, torch.Tensor]], hist: bool) -> list[int]:
        """The device half of ``record``; returns each tap's element count for ``count``."""
        reducer = self.tap_reducer(hist)
        for pair in taps:
            reducer.append(pair)
        return reducer.commit()

    def count(self, numels: Sequence[int]) -> None:
        """The host half of ``record``: one more batch of ``numels`` elements per tap."""
        if self.steps >= self.n_steps:
            raise IndexError(f"ActivationMoments holds {self.n_steps} batches; reset() it first")
        self.counts[self.steps] = numels
        self.steps += 1

    def finish(self) -> list[dict]:
        """One row per (layer, site) for the ``layers`` table (without trial_id and epoch)."""
        k = self.steps
        s = self.sums[:k].cpu().numpy().astype(np.float64)
        hist = self.hist.cpu().numpy()
        n = self.counts[:k].astype(np.float64)
        rows = []
        for i in range(self.n_taps):
            layer, site = ACT_LAYERS[i // len(SITES)], SITES[i % len(SITES)]
            n_b = n[:, i]
            with np.errstate(invalid="ignore"):  # inf - inf in a diverged batch is NaN: fine
                m_b = s[:, i, 0] / n_b
                v_b = np.maximum(s[:, i, 1] / n_b - m_b**2, 0.0)
            total = n_b.sum()
            nan = float("nan")
            mean = float((n_b * m_b).sum() / total) if k else nan
            var = float((n_b * (v_b + (m_b - mean) ** 2)).sum() / total) if k else nan
            rows.append(
                dict(
                    layer=layer,
                    site=site,
                    count=int(total),
                    mean=mean,
                    var=var,
                    batch_mean_std=float(m_b.std()) if k else nan,
                    batch_var_std=float(v_b.std()) if k else nan,
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
    just written them finds them in cache: on a CPU the moments then cost ~20% less than
    after the backward pass."""

    def __init__(self, acts: ActivationMoments, hist: bool) -> None:
        super().__init__()
        self.acts, self.hist = acts, hist
        self.moments: list[torch.Tensor] = []  # sum, sum of squares, sum, ... tap after tap
        self.numels: list[int] = []

    @torch.no_grad()
    def append(self, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().append(pair)
        acts, bins = self.acts, None
        for t in pair:
            k = len(self.numels)
            if k % 2 == 1 and t is pair[0]:  # `none`: the ReLU input is the conv output
                self.moments += self.moments[-2:]
                self.numels.append(self.numels[-1])
            else:
                f = flat_view(t)
                self.moments += (f.sum(), torch.dot(f, f))
                self.numels.append(f.numel())
                bins = acts.bin_index(f) if self.hist else None
            if bins is not None:
                acts.add_to_hist(k, bins)

    @torch.no_grad()
    def commit(self) -> list[int]:
        """Write the batch's moments to the accumulator's next row; the taps' element counts."""
        acts = self.acts
        if len(self.numels) != acts.n_taps:
            raise ValueError(f"expected {acts.n_taps} taps, got {len(self.numels)}")
        row = torch.stack(self.moments).view(1, acts.n_taps, 2)
        acts.sums.index_copy_(0, acts.cursor, row)
        acts.cursor += 1
        return self.numels


class GradientNorms:
    """Per recorded step: loss, global gradient l2 norm and each layer's weight-gradient norm."""

    columns = ("loss", "grad_norm") + tuple(f"grad_norm_{n}" for n in GRAD_LAYERS)

    def __init__(self, n_rows: int, device: torch.device):
        self.n_rows = n_rows
        self.buf = torch.zeros(n_rows, len(self.columns), dtype=torch.float32, device=device)
        self.cursor = torch.zeros(1, dtype=torch.int64, device=device)
        self.step_index = np.zeros(n_rows, dtype=np.int64)
        self.rows = 0

    def reset(self) -> None:
        """Empty, in place, for the next epoch."""
        self.buf.zero_()
        self.cursor.zero_()
        self.step_index[:] = 0
        self.rows = 0

    def record(self, step: int, loss: torch.Tensor, grads: list[torch.Tensor], weight_idx: list[int]):
        """``grads``: every parameter's gradient; ``weight_idx``: positions of GRAD_LAYERS' weights."""
        self.accumulate(loss, grads, weight_idx)
        self.count(step)

    @torch.no_grad()
    def accumulate(self, loss: torch.Tensor, grads: list[torch.Tensor], weight_idx: list[int]) -> None:
        """The device half of ``record``."""
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack(norms))
        row = torch.stack([loss.detach().float(), total] + [norms[i] for i in weight_idx])
        self.buf.index_copy_(0, self.cursor, row.unsqueeze(0))
        self.cursor += 1

    def count(self, step: int) -> None:
        """The host half of ``record``: the row just written belongs to ``step``."""
        if self.rows >= self.n_rows:
            raise IndexError(f"GradientNorms holds {self.n_rows} rows; reset() it first")
        self.step_index[self.rows] = step
        self.rows += 1

    def finish(self) -> dict[str, np.ndarray]:
        """Columns for the ``steps`` table (without trial_id and epoch)."""
        data = self.buf[: self.rows].cpu().numpy().copy()  # on a CPU, .numpy() would share buf
        out = {"step": self.step_index[: self.rows].copy()}
        out.update({name: data[:, j] for j, name in enumerate(self.columns)})
        return out
