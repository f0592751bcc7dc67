"""A CPU emulation of what a CUDA graph does, to test ``GraphedTrainStep``'s logic without a GPU.

A CUDA graph records the kernels launched during capture *without running them*, and a replay
runs exactly those kernels again on the same memory: no Python runs, nothing the host did
during capture happens again, and every tensor the kernels touch must still be the one they
touched at capture. This emulation does the same with aten operations:

- capture runs the function under a ``TorchDispatchMode`` that records every operation (with
  its arguments and outputs); then it undoes what the capture changed (every tensor that
  existed before and was written is restored, and the RNGs get their state back), so the
  capture, as on a GPU, has not trained anything;
- replay runs the recorded operations again in order: a mutating operation writes into the
  same tensors as at capture, a new tensor an operation returns is copied into the one it
  returned at capture, a view is not rerun (the view taken at capture still aliases the same memory),
  and a random operation draws from the generator it was given, as a registered generator
  does in a replay;
- a host synchronisation (``.item()``, ``bool(t)``...) inside a capture is an error, as it is
  on a GPU.

What it cannot show is CUDA's own behaviour (what capture allows, cuDNN inside graphs); that
is tests/test_gpu.py's job on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


def _fresh_outputs(func, out) -> list[torch.Tensor]:
    """The outputs that are new tensors (not an alias of an argument, per the op's schema)."""
    rets = func._schema.returns
    if not rets:  # an op that returns nothing (e.g. the fused optimiser's in-place step)
        return []
    outs = out if len(rets) > 1 else (out,)
    fresh = []
    for r, o in zip(rets, outs, strict=True):
        if r.alias_info is None:
            fresh += [t for t in tree_flatten(o)[0] if isinstance(t, torch.Tensor)]
    return fresh


def _is_view(func) -> bool:
    return not func._schema.is_mutable and all(
        r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class _Recorder(TorchDispatchMode):
    def __init__(self, generators: list[torch.Generator]) -> None:
        super().__init__()
        self.generators = generators
        self.ops: list[tuple] = []
        self.made: set[int] = set()  # storages created during the capture
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (pre-existing tensor, its data)
        self._saved_keys: set[tuple] = set()

    def _save(self, t: torch.Tensor) -> None:
        # Every pre-existing tensor an op touches is saved, not only those its schema says it
        # writes: some ops write without saying so (native_batch_norm's running statistics).
        if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape, strict=True)):
            return  # a broadcast (expanded) view: no op may write it, and copy_ could not restore it
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ptr not in self.made and key not in self._saved_keys:
            self._saved_keys.add(key)
            self.saved.append((t, t.detach().clone()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCS:
            raise RuntimeError(f"host synchronisation ({func}) inside a CUDA graph capture")
        gen = kwargs.get("generator")
        # the Python object a generator arrives as here is a new wrapper: match on its seed
        if gen is not None and gen.initial_seed() not in {g.initial_seed() for g in self.generators}:
            raise RuntimeError(f"{func} draws from a generator not registered with the graph")
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                self._save(t)
        out = func(*args, **kwargs)
        if not _is_view(func):  # a view taken at capture still aliases the same memory
            fresh = _fresh_outputs(func, out)
            self.made.update(t.untyped_storage().data_ptr() for t in fresh)
            self.ops.append((func, args, kwargs, fresh))
        return out


class CUDAGraph:
    def __init__(self) -> None:
        self.generators: list[torch.Generator] = []
        self.ops: list[tuple] | None = None
        self.replays = 0

    def register_generator_state(self, generator: torch.Generator) -> None:
        self.generators.append(generator)

    @torch.no_grad()
    def replay(self) -> None:
        if self.ops is None:
            raise RuntimeError("replay of a graph that was never captured")
        for func, args, kwargs, outs in self.ops:
            for old, new in zip(outs, _fresh_outputs(func, func(*args, **kwargs)), strict=True):
                old.copy_(new)
        self.replays += 1


@contextlib.contextmanager
def graph(g: CUDAGraph, pool=None, stream=None, capture_error_mode: str = "global") -> Iterator[None]:
    states = [(gen, gen.get_state()) for gen in g.generators]
    global_rng = torch.get_rng_state()
    recorder = _Recorder(g.generators)
    try:
        with recorder:
            yield
        g.ops = recorder.ops
        CAPTURED.append(g)
    finally:  # as on a GPU, the capture itself ran nothing: put everything back
        with torch.no_grad():
            for t, data in reversed(recorder.saved):
                t.copy_(data)
        for gen, state in states:
            gen.set_state(state)
        torch.set_rng_state(global_rng)


class Stream:
    def __init__(self, device=None) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass


def current_stream(device=None) -> Stream:
    return Stream()


def stream(s) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


#: Every graph captured through this emulation (tests check that graphs were really used).
CAPTURED: list[CUDAGraph] = []
