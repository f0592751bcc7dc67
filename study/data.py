"""Datasets as uint8 arrays: the official train and test splits, the validation split.

Three sources (docs/design.md, "Running"): torchvision's CIFAR-10, any ``train/<class>/*`` +
``test/<class>/*`` image tree (decoded once, then cached as ``.npz``), and a procedurally
generated CIFAR-shaped dataset for offline use and tests (``study.synthetic_images``). All of
them come back as the same :class:`DataArrays`, which is what the driver puts in Ray's object
store once. The training augmentation is ``study.augment``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import socket
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study.image_format import IMAGE_SIZE, N_CLASSES
from study.synthetic_images import SYNTHETIC_CLASSES, synthetic_split

#: Sizes of the synthetic dataset when no subset is asked for (CIFAR-10's).
SYNTHETIC_SIZES = (50_000, 10_000)
#: File extensions read from an image folder (torchvision's ImageFolder's).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: Seconds a stalled CIFAR-10 download may wait on the network before it counts as failed.
DOWNLOAD_TIMEOUT_S = 60.0
_CACHE_VERSION = 1
_DECODE_CHUNK = 1000
_PROGRESS_EVERY = 10_000


class DataError(Exception):
    """A user-facing data problem: the message is shown as one line, exit 2."""


@dataclass(frozen=True, eq=False)
class DataArrays:
    """A dataset's official train and test splits as uint8 (N, 3, 32, 32) arrays."""

    name: str
    classes: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"{split}_x must be uint8 (N, 3, 32, 32), not {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (len(x),):
                raise ValueError(f"{split}_y must be int64 ({len(x)},), not {y.dtype} {y.shape}")


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
        data = _load_imagefolder(Path(resolved[len("imagefolder:") :]), Path(data_dir), log)
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


# ---------------------------------------------------------------------------- image folders


def _list_split(root: Path, split: str) -> tuple[list[str], list[list[str]]]:
    """Sorted class names and each class's image files, as torchvision's ImageFolder finds
    them (sub-folders walked, files by extension, sorted)."""
    top = root / split
    if not top.is_dir():
        raise DataError(
            f"imagefolder: {top} is missing; expected {root}/train/<class>/* and "
            f"{root}/test/<class>/*"
        )
    classes = sorted(e.name for e in os.scandir(top) if e.is_dir())
    if not classes:
        raise DataError(f"imagefolder: {top} has no class folders; expected {top}/<class>/*")
    files = []
    for c in classes:
        found = [
            os.path.join(d, f)
            for d, _, names in sorted(os.walk(top / c, followlinks=True))
            for f in sorted(names)
            if f.lower().endswith(IMG_EXTENSIONS)
        ]
        if not found:
            raise DataError(f"imagefolder: class folder {top / c} has no images")
        files.append(found)
    return classes, files


def _decode_files(paths: Sequence[str]) -> tuple[np.ndarray, int, str | None, str | None]:
    """Decode image files to (n, 32, 32, 3) uint8; also the number resized, the first
    resized file, and the first undecodable file's message (then the array is partial)."""
    from PIL import Image

    out = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    n_resized, first_resized = 0, None
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                    if first_resized is None:
                        first_resized = f"{p}, {im.size[0]}×{im.size[1]}"
                    n_resized += 1
                    im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
                out[i] = np.asarray(im)
        except Exception as exc:
            return out, n_resized, first_resized, f"{p} ({type(exc).__name__}: {exc})"
    return out, n_resized, first_resized, None


def _workers(n_files: int) -> int:
    """Decoding processes: one on small machines (a pool gains little over decoding serially
    there), up to 8 where there are cores to spare and enough files."""
    if sys.platform != "linux":  # the pool forks, which only Linux does safely
        return 1
    cpus = len(os.sched_getaffinity(0))
    return 1 if cpus < 4 else max(1, min(cpus, 8, n_files // 5_000))


def _decode_all(paths: list[str], log: Callable[[str], object]) -> np.ndarray:
    """Decode every file to (n, 3, 32, 32) uint8, in a process pool when there are many."""
    chunks = [paths[i : i + _DECODE_CHUNK] for i in range(0, len(paths), _DECODE_CHUNK)]
    out = np.empty((len(paths), 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    workers = _workers(len(paths))
    # fork, as torch's DataLoader does: spawn would re-import the caller's __main__ in every
    # worker (slow, and fatal for a script without a main guard); workers only run PIL.
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        if workers > 1
        else None
    )
    try:
        results = pool.map(_decode_files, chunks) if pool else map(_decode_files, chunks)
        n_resized, done, first = 0, 0, None
        for chunk, (arr, k, first_resized, error) in zip(chunks, results, strict=True):
            if error is not None:
                raise DataError(f"imagefolder: cannot decode image {error}")
            out[done : done + len(chunk)] = arr.transpose(0, 3, 1, 2)
            n_resized, first = n_resized + k, first or first_resized
            before, done = done, done + len(chunk)
            if done // _PROGRESS_EVERY > before // _PROGRESS_EVERY:
                log(f"imagefolder: decoded {done}/{len(paths)} images")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if n_resized:
        log(
            f"imagefolder: {n_resized} image(s) are not 32×32 (first: {first}) and were "
            "resized to 32×32 (bilinear, aspect ratio not kept)"
        )
    return out


def _cache_key(root: Path, split_files: list[list[list[str]]]) -> str:
    """A hash of every file's path relative to root, size and mtime."""
    h = hashlib.sha256(f"bnstudy imagefolder cache v{_CACHE_VERSION} {IMAGE_SIZE}\n".encode())
    skip = len(str(root)) + 1
    for files in split_files:
        for cls in files:
            for p in cls:
                st = os.stat(p)
                h.update(f"{p[skip:]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            h.update(b"\1\n")
    return h.hexdigest()[:24]


def _read_cache(path: Path, classes: list[str]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("classes", "train_x", "train_y", "test_x", "test_y")}
    if list(arrays["classes"]) != classes:
        raise ValueError("class list differs from the folder's")
    DataArrays("check", tuple(classes), *(arrays[k] for k in ("train_x", "train_y", "test_x", "test_y")))
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray], log: Callable[[str], object]) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        log(f"imagefolder: could not write the cache {path} ({exc}); next load decodes again")
        with contextlib.suppress(OSError):
            tmp.unlink()


def imagefolder_sizes(root: str | os.PathLike) -> tuple[int, int]:
    """(training, test) images an ``imagefolder:`` tree holds, as its loader would read them,
    without decoding any (DataError for a tree it would refuse)."""
    return tuple(sum(map(len, _list_split(Path(root), split)[1])) for split in ("train", "test"))


def _load_imagefolder(root: Path, data_dir: Path, log: Callable[[str], object]) -> DataArrays:
    """A train/<class>/*, test/<class>/* tree, decoded once and cached under data_dir/cache."""
    if not root.is_dir():
        raise DataError(f"imagefolder: {root} does not exist or is not a folder")
    train_classes, train_files = _list_split(root, "train")
    test_classes, test_files = _list_split(root, "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(
            f"imagefolder: {root}/train and {root}/test have different classes "
            f"(only in train: {only_train or 'none'}; only in test: {only_test or 'none'})"
        )
    if len(train_classes) > N_CLASSES:
        raise DataError(f"imagefolder: {root} has {len(train_classes)} classes; the study's CNN has "
                        f"{N_CLASSES} outputs, so at most {N_CLASSES}")
    name = f"imagefolder:{root}"
    cache = data_dir / "cache" / f"imagefolder-{_cache_key(root, [train_files, test_files])}.npz"
    arrays = None
    if cache.is_file():
        try:
            arrays = _read_cache(cache, train_classes)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            reason = " ".join(str(exc).split())
            log(f"imagefolder: ignoring unreadable cache {cache} ({reason}); rebuilding it")
        else:
            log(f"imagefolder: {root} read from the cache {cache}")
    if arrays is None:
        log(f"imagefolder: decoding the images of {root} (once; cached in {cache})")
        paths = [p for files in (train_files, test_files) for cls in files for p in cls]
        x = _decode_all(paths, log)
        n_train = sum(len(c) for c in train_files)
        arrays = {
            "classes": np.array(train_classes),
            "train_x": x[:n_train],
            "test_x": x[n_train:],
            **{
                f"{split}_y": np.repeat(np.arange(len(files)), [len(c) for c in files])
                for split, files in (("train", train_files), ("test", test_files))
            },
        }
        _write_cache(cache, arrays, log)
    return DataArrays(
        name,
        tuple(train_classes),
        arrays["train_x"],
        arrays["train_y"].astype(np.int64),
        arrays["test_x"],
        arrays["test_y"].astype(np.int64),
    )
