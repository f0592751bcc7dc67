"""An ``imagefolder:`` dataset: a ``train/<class>/*`` + ``test/<class>/*`` image tree, listed
as torchvision's ImageFolder lists it, decoded once (in a process pool for large trees) and
cached as ``.npz`` under the data folder, returned as ``study.data.DataArrays``."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from study.data_arrays import DataArrays, DataError
from study.image_format import IMAGE_SIZE, N_CLASSES

#: File extensions read from an image folder (torchvision's ImageFolder's).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CACHE_VERSION = 1
_DECODE_CHUNK = 1000
_PROGRESS_EVERY = 10_000



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


def load_imagefolder(root: Path, data_dir: Path, log: Callable[[str], object]) -> DataArrays:
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
