"""Leave CUDA's sync-debug mode for work that waits for the device by design.

A trial's step loop must never wait for the device (tests/test_gpu.py runs it with
``torch.cuda.set_sync_debug_mode("error")``); probing a step and capturing a CUDA graph wait
on purpose. Both the step (``study.step``) and the probes (``study.probes``) use this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def syncs_allowed() -> Iterator[None]:
    """CUDA's sync-debug mode off for a while: for work that waits for the device by design
    (probes every N steps, capturing a graph once), inside a step loop that must not."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)
