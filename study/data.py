"""Datasets as uint8 arrays: the official train and test splits, the validation split.

Three sources (docs/design.md, "Running"): torchvision's CIFAR-10, any ``train/<class>/*`` +
``test/<class>/*`` image tree (decoded once, then cached as ``.npz``), and a procedurally
generated CIFAR-shaped dataset for offline use and tests (``study.synthetic_images``). All of
them come back as the same :class:`DataArrays`, which is what the driver puts in Ray's object
store once. The training augmentation is ``study.augment``'s.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from study.data_arrays import DataArrays, DataError
from study.imagefolder import load_imagefolder
from study.synthetic_images import SYNTHETIC_CLASSES, synthetic_split

#: Sizes of the synthetic dataset when no subset is asked for (CIFAR-10's).
SYNTHETIC_SIZES = (50_000, 10_000)
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: Seconds a stalled CIFAR-10 download may wait on the network before it counts as failed.
DOWNLOAD_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------- specs


def resolve_dataset_spec(spec: str, data_dir: str | os.PathLike) -> str:
    """The concrete dataset a spec names: ``auto`` becomes ``cifar10`` where its files are
    under ``data_dir`` and ``synthetic`` elsewhere; ``imagefolder:PATH`` gets an absolute
    PATH (so the name recorded with results does not depend on the working directory)."""
    if not isinstance(spec, str):
        raise DataError(f"dataset must be a string, not {type(spec).__name__}")
    s = spec.strip()
    if s in ("cifar10", "synthetic"):
        return s
    if s == "auto":
        return "cifar10" if cifar10_present(data_dir) else "synthetic"
    if s.startswith("imagefolder:"):
        path = s[len("imagefolder:") :].strip()
        if not path:
            raise DataError("dataset imagefolder:PATH needs a PATH (imagefolder:/data/mytree)")
        root = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(root):  # before any study starts (and in --dry-run's count)
            raise DataError(f"imagefolder: {root} does not exist or is not a folder")
        return "imagefolder:" + root
    raise DataError(
        f"unknown dataset {spec!r}: use cifar10, synthetic, imagefolder:PATH or auto"
    )


def cifar10_present(data_dir: str | os.PathLike) -> bool:
    """Whether torchvision's CIFAR-10 files (extracted or the archive) are under data_dir."""
    root = Path(data_dir).expanduser()
    return (root / CIFAR10_FOLDER).is_dir() or (root / CIFAR10_ARCHIVE).is_file()


def load_dataset(
    spec: str,
    data_dir: str | os.PathLike = "data",
    subset: int | None = None,
    seed: int = 0,
    log: Callable[[str], object] = print,
) -> DataArrays:
    """Load a dataset by spec; ``subset`` keeps a seeded random subset of at most that many
    images of each split (the synthetic set then generates only that many)."""
    if subset is not None and (
        isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 1
    ):
        raise DataError(f"subset must be a whole number >= 1, not {subset!r}")
    _check_seed(seed)
    resolved = resolve_dataset_spec(spec, data_dir)
    if spec.strip() == "auto" and resolved == "synthetic":
        where = Path(data_dir).expanduser().resolve()
        log(
            f"dataset auto: no CIFAR-10 in {where} ({CIFAR10_FOLDER}/ or {CIFAR10_ARCHIVE}), "
            "so using the synthetic dataset; pass --dataset cifar10 to download CIFAR-10"
        )
    if resolved == "synthetic":
        n_train, n_test = SYNTHETIC_SIZES
        if subset is not None:
            n_train, n_test = min(n_train, int(subset)), min(n_test, int(subset))
        return make_synthetic(n_train, n_test, seed)
    if resolved == "cifar10":
        data = _load_cifar10(Path(data_dir))
    else:
        data = load_imagefolder(Path(resolved[len("imagefolder:") :]), Path(data_dir), log)
    return data if subset is None else take_subset(data, int(subset), seed)


def take_subset(data: DataArrays, subset: int, seed: int) -> DataArrays:
    """At most ``subset`` images of each split, drawn without replacement, kept in order."""

    def pick(n: int, stream: int) -> np.ndarray:
        if subset >= n:
            return np.arange(n)
        rng = np.random.default_rng([seed, stream])
        return np.sort(rng.choice(n, size=subset, replace=False))

    tr, te = pick(len(data.train_y), 0), pick(len(data.test_y), 1)
    return DataArrays(
        data.name,
        data.classes,
        np.ascontiguousarray(data.train_x[tr]),
        data.train_y[tr],
        np.ascontiguousarray(data.test_x[te]),
        data.test_y[te],
    )


def split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    """(training, validation) images of ``train_val_split`` over n images."""
    n_val = round(n * val_fraction)
    return n - n_val, n_val


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx) of a seeded permutation of range(n); the validation part has
    round(n * val_fraction) indices. Depends only on its arguments, so every trial of a
    study that shares the split seed trains and validates on the same images."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), not {val_fraction!r}")
    if n < 0:
        raise DataError(f"cannot split {n} images")
    _check_seed(seed)
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n).astype(np.int64)
    n_val = split_sizes(n, val_fraction)[1]
    return perm[n_val:], perm[:n_val]


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a whole number >= 0, not {seed!r}")


# ---------------------------------------------------------------------------- synthetic


def make_synthetic(n_train: int, n_test: int, seed: int = 0) -> DataArrays:
    """The synthetic dataset (``study.synthetic_images``): ``n_train`` and ``n_test`` images
    generated from ``seed``; a smaller set is a prefix of a larger one."""
    for what, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise DataError(f"{what} must be a whole number >= 0, not {n!r}")
    _check_seed(seed)
    train_x, train_y = synthetic_split(int(n_train), seed, 0)
    test_x, test_y = synthetic_split(int(n_test), seed, 1)
    return DataArrays("synthetic", SYNTHETIC_CLASSES, train_x, train_y, test_x, test_y)


# ---------------------------------------------------------------------------- CIFAR-10


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _load_cifar10(data_dir: Path) -> DataArrays:
    """torchvision's CIFAR-10 under data_dir, downloaded there if absent."""
    import torchvision

    root = data_dir.expanduser().resolve()
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            sets = [
                torchvision.datasets.CIFAR10(root=str(root), train=train, download=True)
                for train in (True, False)
            ]
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise DataError(
            f"CIFAR-10 could not be loaded or downloaded into {root} ({reason}); put "
            f"{CIFAR10_ARCHIVE} (from {CIFAR10_URL}) in {root}, or use --dataset synthetic "
            "or --dataset imagefolder:PATH, which work offline"
        ) from exc
    xs = [np.ascontiguousarray(np.asarray(s.data, np.uint8).transpose(0, 3, 1, 2)) for s in sets]
    ys = [np.asarray(s.targets, np.int64) for s in sets]
    return DataArrays("cifar10", tuple(sets[0].classes), xs[0], ys[0], xs[1], ys[1])
