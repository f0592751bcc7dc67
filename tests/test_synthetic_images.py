"""The synthetic dataset (study.synthetic_images through study.data.make_synthetic): shapes,
determinism, speed, and learnable by a small CNN but not by a linear model."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study.augment import normalise
from study.data import make_synthetic


def test_synthetic_shapes_dtypes_and_classes() -> None:
    d = make_synthetic(600, 200, seed=3)
    assert d.name == "synthetic" and len(d.classes) == 10 and len(set(d.classes)) == 10
    for x, y, n in ((d.train_x, d.train_y, 600), (d.test_x, d.test_y, 200)):
        assert x.shape == (n, 3, 32, 32) and x.dtype == np.uint8 and x.flags.c_contiguous
        assert y.shape == (n,) and y.dtype == np.int64
        assert y.min() >= 0 and y.max() <= 9
    assert set(np.unique(d.train_y)) == set(range(10))
    counts = np.bincount(d.train_y, minlength=10)
    assert counts.min() > 30  # roughly balanced, 60 expected per class
    assert d.train_x.std() > 30 and d.train_x.min() < 20 and d.train_x.max() > 235


def test_synthetic_deterministic_seeded_and_prefix_stable() -> None:
    a, b, c = make_synthetic(300, 100, seed=7), make_synthetic(300, 100, seed=7), None
    for f in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    c = make_synthetic(300, 100, seed=8)
    assert not np.array_equal(a.train_x, c.train_x) and not np.array_equal(a.test_x, c.test_x)
    big = make_synthetic(1000, 250, seed=7)
    np.testing.assert_array_equal(big.train_x[:300], a.train_x)
    np.testing.assert_array_equal(big.test_y[:100], a.test_y)
    # Train and test come from different streams: no image appears in both.
    train = {x.tobytes() for x in big.train_x}
    assert not any(x.tobytes() in train for x in big.test_x)


def test_synthetic_is_fast() -> None:
    t = time.perf_counter()
    make_synthetic(6000, 0, seed=0)
    assert time.perf_counter() - t < 5.0  # generous: the full 60,000 must stay quick to make


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, opt) -> nn.Module:
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(32):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small, busy machine torch's spinning threads can make a
    tiny model 10x slower, and one thread is as fast for it anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_synthetic_learnable_by_a_cnn_not_by_a_linear_model(one_thread) -> None:
    d = make_synthetic(3000, 1000, seed=0)
    x, y = normalise(torch.from_numpy(d.train_x)), torch.from_numpy(d.train_y)
    tx, ty = normalise(torch.from_numpy(d.test_x)), torch.from_numpy(d.test_y)
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    _fit(cnn, x, y, 3, torch.optim.SGD(cnn.parameters(), lr=0.05, momentum=0.9))
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    _fit(linear, x, y, 10, torch.optim.Adam(linear.parameters(), lr=1e-3))
    cnn_acc, lin_acc = _accuracy(cnn, tx, ty), _accuracy(linear, tx, ty)
    assert cnn_acc > 0.35, (cnn_acc, lin_acc)  # chance is 0.10
    assert cnn_acc > lin_acc + 0.05, (cnn_acc, lin_acc)
