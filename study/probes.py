"""Santurkar et al. (2018) probes of one training step: gradient ICS and the loss landscape.

At a probed step t, with weights W_t, the step's batch (x, y) and its loss L (§2.2, §3.2, App. A.2.2):

* **ICS (gradient form)**, per block i (conv1 < conv2 < conv3 < fc1 < fc2): G = ∇_{W_i} L at W_t
  and G' = the same gradient on the same batch after every block *before* i has taken this
  step's update. "A block" is all the parameters of that stage of the network: conv_j's weight
  and bias and norm_j's affine weight and bias (fc_j: weight and bias); so G' sees the blocks
  j < i at t+1 and the blocks j >= i at t. "This step's update" is the optimiser's own: a deep
  copy of the optimiser (its state included: SGD's momentum buffers, Adam's moments, ...) is
  stepped on copies of the weights carrying the step's gradients, which gives exactly what
  ``optimizer.step()`` will apply. Recorded: ||G - G'||_2 and cos(G, G'). For the first block
  nothing comes before it, so G' = G by definition (0 and 1, without a pass).
* **Loss landscape along the gradient**: with g the full gradient at W_t (every parameter),
  for each step size eta of the grid, L(W - eta g) and ∇L(W - eta g) on the same batch.
  Recorded: the min and max of the loss over the grid (the loss variation; the grid only,
  eta = 0 is not added); the min and max over the grid of the loss change beyond its
  first-order prediction, L(W - eta g) - L(W) + eta ||g||^2 (the raw range at small eta is
  mostly the first-order decrease eta ||g||^2, a restatement of the gradient norm; what is
  left is the curvature's share, 1/2 eta^2 g^T H g on a quadratic); max_eta ||∇L(W - eta g) - g||
  (gradient predictiveness) and max_eta ||∇L(W - eta g) - g|| / ||eta g|| (effective
  beta-smoothness, the gradient change per unit of step length); norms over all parameters
  together. These six numbers belong to the step, not to a layer: ``probe_rows`` repeats them
  on each layer's row of that step (group by step, take any one row).
* **Weight norms**: per block, ||W_i|| of the weight the ICS probe compares, at W_t (BN makes
  the loss invariant to a conv weight's scale, so its gradient shrinks as the weight grows).

Every pass replays the step's forward exactly, and nothing that training uses is changed:

* weights are never written: passes run the model through ``torch.func.functional_call`` on
  separate tensors, and gradients come from ``torch.autograd.grad`` (no ``.grad`` is touched);
* BatchNorm stays in training mode (batch statistics of the probed batch, as in the step),
  but its running statistics are updated only in clones of the buffers;
* the step's noise sample is reused: ``NoisyBatchNorm2d.freeze_noise`` is set during the
  probe, so every pass uses the layer's ``_last`` sample (and its generator is not drawn from;
  its state is saved and restored all the same);
* the step's dropout masks are replayed: the caller saves the global RNG state (CPU and CUDA)
  before the step's forward, and the probe restores it before each of its passes; at the end
  the RNG state the probe found (the post-step state) is put back;
* the optimiser is only deep-copied.

The machinery is generic (``probe_module``: any ``nn.Module``, a loss of its output and an
ordered list of blocks) so that it can be checked on small models with known answers;
``probe_step`` is the CNN of docs/design.md, "The experiment", as one instance of it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from study.config import DEFAULT_ETA_MULTIPLES
from study.model import SeedCNN
from study.results import PROBE_LAYERS
from study.sync_debug import syncs_allowed

#: Keys of a probe result that hold one number per step (the loss-landscape measures).
LANDSCAPE_KEYS = ("loss_min", "loss_max", "loss_dev_min", "loss_dev_max", "grad_pred", "beta_smooth")


@dataclass(frozen=True)
class Block:
    """One stage of the network, in forward order: ``weight`` (a parameter name) is the tensor
    whose gradient the ICS probe compares; ``params`` are all the parameter names of the stage
    (they take the step's update when a later block is probed)."""

    layer: str
    weight: str
    params: tuple[str, ...]


# ----------------------------------------------------------------------------------- RNG state

def save_rng() -> dict:
    """The global torch RNG state (CPU, and every CUDA device's when CUDA is available)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back a state from ``save_rng``."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------- the generic probe

def optimizer_update(
    optimizer: torch.optim.Optimizer, named: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """What ``optimizer.step()`` would make of each parameter in ``named`` (name -> parameter),
    given the gradients now in ``.grad``, computed on a deep copy of the optimiser and its
    state: neither the parameters nor the optimiser change."""
    where = {id(p): (gi, pi) for gi, group in enumerate(optimizer.param_groups)
             for pi, p in enumerate(group["params"])}
    twin = copy.deepcopy(optimizer)  # copies its params (without .grad) and its state, consistently
    for p in named.values():
        if id(p) in where:
            gi, pi = where[id(p)]
            q = twin.param_groups[gi]["params"][pi]
            q.grad = None if p.grad is None else p.grad.detach().clone()
    with torch.no_grad():
        twin.step()
    out = {}
    for name, p in named.items():
        if id(p) in where:
            gi, pi = where[id(p)]
            out[name] = twin.param_groups[gi]["params"][pi].detach()
        else:  # not optimised: it keeps its value
            out[name] = p.detach()
    return out


def _norm(t: torch.Tensor) -> torch.Tensor:
    """l2 norm in float64 (a 0-d tensor on t's device)."""
    return torch.linalg.vector_norm(t.double())


def _flat_norm(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """l2 norm of the tensors taken together as one vector."""
    return torch.linalg.vector_norm(torch.stack([_norm(t) for t in ts]))


def ics(
    loss_at: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    updated: dict[str, torch.Tensor],
    blocks: Sequence[Block],
) -> tuple[dict[str, float], dict[str, float]]:
    """(||G - G'|| per layer, cos(G, G') per layer): ``params`` are W_t, ``grads`` the gradients
    at W_t, ``updated`` W_{t+1}; ``loss_at(values)`` the batch loss at the given parameter values."""
    l2, cos = {}, {}
    for i, block in enumerate(blocks):
        g = grads[block.weight].detach()
        if i == 0:  # nothing before the first block: G' = G
            l2[block.layer], cos[block.layer] = 0.0, 1.0 if float(_norm(g)) > 0 else float("nan")
            continue
        values = dict(params)
        for before in blocks[:i]:
            for name in before.params:
                values[name] = updated[name]
        w = values[block.weight].detach().clone().requires_grad_(True)
        values[block.weight] = w
        (g2,) = torch.autograd.grad(loss_at(values), w)
        g64, g264 = g.double(), g2.double()
        dot = (g64 * g264).sum() / (_norm(g64) * _norm(g264))  # 0/0 gives NaN
        l2[block.layer], cos[block.layer] = torch.stack([_norm(g64 - g264), dot]).tolist()
    return l2, cos


def landscape(
    loss_at: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    etas: Sequence[float],
) -> dict[str, float]:
    """Loss variation (raw and beyond the first-order term), gradient predictiveness and
    effective beta-smoothness along -g over ``etas`` (absolute step sizes): see the module's
    docstring."""
    if not etas:
        return dict.fromkeys(LANDSCAPE_KEYS, float("nan"))
    names = [n for n in params if n in grads]
    g = [grads[n].detach() for n in names]
    g_norm = _flat_norm(g)
    with torch.no_grad():  # L(W) through the same replayed pass as the moved losses
        loss0 = loss_at(dict(params)).detach().double()
    losses, devs, preds, betas = [], [], [], []
    for eta in etas:
        values = dict(params)
        moved = {n: (params[n].detach() - eta * gn).requires_grad_(True)
                 for n, gn in zip(names, g, strict=True)}
        values.update(moved)
        loss = loss_at(values)
        new = torch.autograd.grad(loss, [moved[n] for n in names], allow_unused=True)
        diff = _flat_norm([(torch.zeros_like(a) if b is None else b.detach()) - a
                           for a, b in zip(g, new, strict=True)])
        losses.append(loss.detach().double())
        devs.append(losses[-1] - loss0 + eta * g_norm**2)
        preds.append(diff)
        betas.append(diff / (eta * g_norm))  # 0/0 (a zero gradient) gives NaN
    # One host sync; torch's min/max propagate NaN, so a non-finite value shows, never vanishes.
    losses_t, devs_t = torch.stack(losses), torch.stack(devs)
    preds_t, betas_t = torch.stack(preds), torch.stack(betas)
    out = torch.stack([losses_t.min(), losses_t.max(), devs_t.min(), devs_t.max(),
                       preds_t.max(), betas_t.max()]).tolist()
    return dict(zip(LANDSCAPE_KEYS, out, strict=True))


def probe_module(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: tuple,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    blocks: Sequence[Block],
    rng_before_forward: dict | None,
    etas: Sequence[float],
) -> dict:
    """Both probes on any module, called after ``backward()`` and before ``optimizer.step()``
    (``.grad`` holds the step's gradient). ``loss_of(model(*inputs))`` is the step's loss;
    ``rng_before_forward`` the ``save_rng()`` state taken just before the step's forward
    (restored before each pass, so dropout replays its masks; None: leave the RNG alone).
    Returns ``{"ics_l2": {layer: float}, "ics_cos": {layer: float}, "weight_norm": {layer:
    float}}`` and the floats of LANDSCAPE_KEYS. The module, its buffers, its ``.grad``, the optimiser and the
    global RNG are left as they were."""
    after = save_rng()
    named = dict(model.named_parameters())
    params = {n: p.detach() for n, p in named.items()}
    grads = {n: p.grad.detach() if p.grad is not None else torch.zeros_like(p) for n, p in named.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # BN running stats: scratch

    def loss_at(values: dict[str, torch.Tensor]) -> torch.Tensor:
        if rng_before_forward is not None:
            restore_rng(rng_before_forward)
        return loss_of(functional_call(model, {**values, **buffers}, inputs))

    try:
        with torch.enable_grad():
            updated = optimizer_update(optimizer, named)
            l2, cos = ics(loss_at, params, grads, updated, blocks)
            out = landscape(loss_at, params, grads, etas)
    finally:
        restore_rng(after)
    norms = torch.stack([_norm(params[b.weight]) for b in blocks]).tolist()  # one host sync
    weight_norm = dict(zip([b.layer for b in blocks], norms, strict=True))
    return dict(ics_l2=l2, ics_cos=cos, weight_norm=weight_norm, **out)


# ------------------------------------------------------------------------------ the CNN probe

def cnn_blocks(model: SeedCNN) -> list[Block]:
    """The CNN's blocks in forward order: conv_j (+ norm_j's affine when it has one), fc1, fc2."""
    names = {p: n for n, p in model.named_parameters()}
    stages, weights = model.stages(), model.weight_layers()
    return [Block(layer, names[weights[layer].weight], tuple(names[p] for p in stages[layer].parameters()))
            for layer in PROBE_LAYERS]


def probe_step(
    model: SeedCNN,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    rng_before_forward: dict,
    etas: Sequence[float],
) -> dict:
    """Probe one step of the CNN (cross-entropy loss on the batch ``x``, ``y``): called after
    ``loss.backward()`` and before ``optimizer.step()``; ``etas`` are absolute step sizes.
    The step's noise sample is reused (noisy layers are frozen during the probe; the state of
    their generators is restored as well). See ``probe_module`` for the result."""
    noisy = model.noisy_layers()
    if any(m._last is None for m in noisy):
        raise RuntimeError("probe_step must follow the step's forward (no noise sample to replay)")
    frozen = [m.freeze_noise for m in noisy]
    gens = {id(m.generator): m.generator for m in noisy if m.generator is not None}
    gen_states = {k: g.get_state() for k, g in gens.items()}
    try:
        for m in noisy:
            m.freeze_noise = True
        return probe_module(model, optimizer, (x,), lambda logits: F.cross_entropy(logits, y),
                            cnn_blocks(model), rng_before_forward, etas)
    finally:
        for m, f in zip(noisy, frozen, strict=True):
            m.freeze_noise = f
        for k, g in gens.items():
            g.set_state(gen_states[k])


def probe_rows(step: int, epoch: int, result: dict) -> list[dict]:
    """Rows for the ``probes`` table (without trial_id): one per layer of PROBE_LAYERS; the
    step's landscape numbers are repeated on each of its rows."""
    per_step = {k: float(result[k]) for k in LANDSCAPE_KEYS}
    return [
        dict(step=int(step), epoch=int(epoch), layer=layer, ics_l2=float(result["ics_l2"][layer]),
             ics_cos=float(result["ics_cos"][layer]),
             weight_norm=float(result["weight_norm"][layer]), **per_step)
        for layer in PROBE_LAYERS
    ]


class StepProber:
    """The training loop's side of the probes: every ``every``-th step (0: never), save the RNG
    before the step's forward (``before_forward``), probe after its backward and before the
    optimiser step (``after_backward``), and hand over the epoch's rows (``take_rows``).

    ``eta_multiples`` are step sizes as multiples of ``lr`` (empty: the paper's grid). A step
    whose loss is not finite is not probed (the trial has diverged). Probes wait for the device
    (they run every N steps), so they run with CUDA's sync-debug mode off.
    """

    def __init__(self, every: int, eta_multiples: Sequence[float], lr: float) -> None:
        self.every = int(every)
        self.etas = [float(e) * lr for e in (eta_multiples or DEFAULT_ETA_MULTIPLES)]
        self.rows: list[dict] = []
        self._rng: dict | None = None
        self._step = -1

    def due(self, step: int) -> bool:
        """Whether ``step`` is probed (such a step runs eagerly, never from a CUDA graph)."""
        return self.every > 0 and step % self.every == 0

    def before_forward(self, step: int) -> None:
        if self.due(step):
            with syncs_allowed():
                self._rng, self._step = save_rng(), step
        else:
            self._rng, self._step = None, -1

    def after_backward(self, model: SeedCNN, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                       y: torch.Tensor, loss: torch.Tensor, epoch: int) -> None:
        if self._rng is None:
            return
        rng, self._rng = self._rng, None
        with syncs_allowed():
            if bool(torch.isfinite(loss.detach())):
                result = probe_step(model, optimizer, x, y, rng, self.etas)
                self.rows.extend(probe_rows(self._step, epoch, result))

    def take_rows(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows
