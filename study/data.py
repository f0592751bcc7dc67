"""Datasets as uint8 arrays, and the batched on-device training augmentation.

Three sources (DESIGN §4): torchvision's CIFAR-10, any ``train/<class>/*`` +
``test/<class>/*`` image tree (decoded once, then cached as ``.npz``), and a procedurally
generated CIFAR-shaped dataset for offline use and tests. All of them come back as the
same :class:`DataArrays`, which is what the driver puts in Ray's object store once.

The augmentation reproduces RandomHorizontalFlip + RandomRotation(10) + ToTensor +
Normalize(0.5, 0.5) on whole batches with one ``grid_sample``, on the training device, so
that augmenting costs no per-image Python work and no host synchronisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
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
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
#: Classes the CNN can tell apart (its last layer's outputs, study.model): CIFAR-10's.
N_CLASSES = 10
#: Maximum rotation of the training augmentation, in degrees (RandomRotation(10)).
MAX_ANGLE = 10.0
#: Sizes of the synthetic dataset when no subset is asked for (CIFAR-10's).
SYNTHETIC_SIZES = (50_000, 10_000)
SYNTHETIC_CLASSES = (
    "disc", "square", "ring", "cross", "triangle", "stripes", "checker", "star", "ellipse",
    "crescent",
)  # fmt: skip
#: File extensions read from an image folder (torchvision's ImageFolder's).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: Seconds a stalled CIFAR-10 download may wait on the network before it counts as failed.
DOWNLOAD_TIMEOUT_S = 60.0
_CACHE_VERSION = 1
_SYNTH_CHUNK = 128
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


# ---------------------------------------------------------------------------- augmentation


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (or floats in 0..255) to float32 ``(x/255 - 0.5)/0.5``: ToTensor +
    Normalize((0.5,)*3, (0.5,)*3), to the bit (see ``_to_unit_range``)."""
    return _to_unit_range(x.to(torch.float32, copy=True))  # never the caller's tensor, in place


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """float32 pixel values 0..255 to ``(x/255 - 0.5)/0.5``, in place, as ``x/127.5 - 1``: the
    same float32 number for every value, in two operations instead of three. (Doubling is
    exact in binary floating point and commutes with rounding, so fl(x/127.5) = 2·fl(x/255)
    and fl(2·fl(x/255) - 1) = 2·fl(fl(x/255) - 0.5), which is torchvision's result.)"""
    return x.div_(127.5).sub_(1.0)


def draw_augment_params(
    batch: int, generator: torch.Generator, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: a rotation angle ~ U(-10, 10) degrees and a horizontal flip with p = 0.5,
    drawn on ``device`` (the generator's by default) from ``generator`` only."""
    dev = generator.device if device is None else device
    u = torch.rand((2, batch), generator=generator, device=dev)
    return u[0].mul(2 * MAX_ANGLE).sub(MAX_ANGLE), u[1] < 0.5


_BASE_GRIDS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _base_grid(h: int, w: int, device: torch.device) -> torch.Tensor:
    """``F.affine_grid``'s base grid for an (h, w) output (align_corners=False) as (h·w, 3) rows
    of (x, y, 1), made once per shape and device: making it is most of affine_grid's time on a
    CPU at batch 16."""
    key = (h, w, torch.device(device))
    if key not in _BASE_GRIDS:
        eye = torch.eye(2, 3, device=device).unsqueeze(0)  # x·1 + y·0 + 0: the grid itself, exactly
        xy = F.affine_grid(eye, [1, 1, h, w], align_corners=False).view(h * w, 2)
        _BASE_GRIDS[key] = torch.cat((xy, torch.ones(h * w, 1, device=device)), 1)
    return _BASE_GRIDS[key]


def flip_rotation_thetas(angles_deg: torch.Tensor, flips: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, 2, 3) affine matrices (affine_grid's theta) that flip (where ``flips``), then rotate
    by ``angles_deg`` (degrees, counter-clockwise) an (h, w) image about its centre. Both on
    one device."""
    rad = torch.deg2rad(angles_deg.to(torch.float32))
    cos, sin = rad.cos(), rad.sin()
    sign = torch.where(flips.to(torch.bool), -1.0, 1.0)
    zero = torch.zeros_like(cos)
    # Output pixel p samples the input at S·R·p (normalised coordinates): R rotates back by the
    # angle, with the aspect ratio undone for non-square images, and S = diag(-1, 1) mirrors x.
    return torch.stack(
        (sign * cos, sign * sin * (-h / w), zero, sin * (w / h), cos, zero), -1
    ).view(-1, 2, 3)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` through its ``theta`` (see flip_rotation_thetas) with nearest
    interpolation and black outside, as float32 with the input's pixel values."""
    b, _, h, w = x.shape
    # affine_grid's own product (base grid × thetaᵀ, one bmm) without rebuilding its base grid
    grid = _base_grid(h, w, x.device).expand(b, h * w, 3).bmm(theta.transpose(1, 2)).view(b, h, w, 2)
    return F.grid_sample(
        x.to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )


def rotate_flip(x: torch.Tensor, angles_deg: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip (where ``flips``), then rotate each image by its angle (degrees, counter-clockwise)
    about its centre with nearest interpolation and black corners, keeping its size: what
    torchvision's hflip then rotate(NEAREST, fill=0) do to one image, for a whole batch in
    one grid_sample. Returns float32 with the input's pixel values (0..255 for uint8)."""
    h, w = x.shape[-2:]
    return warp(x, flip_rotation_thetas(angles_deg.to(x.device), flips.to(x.device), h, w))


def augment_thetas(n: int, generator: torch.Generator, h: int, w: int) -> torch.Tensor:
    """Draw n images' flips and rotations from ``generator`` (on its device), as thetas for
    ``augment_with``: a trial draws a whole epoch's at once, which leaves each step ~20 fewer
    small operations (on a CPU ~0.25 ms of a ~8 ms batch-16 step)."""
    return flip_rotation_thetas(*draw_augment_params(n, generator), h, w)


def augment_with(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """A uint8 (B, 3, H, W) batch flipped and rotated by its thetas, then ToTensor +
    Normalize(0.5, 0.5) with the same operations as torchvision (so the values match)."""
    return _to_unit_range(warp(x, theta))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandomHorizontalFlip + RandomRotation(10) + ToTensor + Normalize(0.5, 0.5) for a uint8
    (B, 3, H, W) batch on x's device, with draws from ``generator`` (on the same device)."""
    return augment_with(x, augment_thetas(x.shape[0], generator, *x.shape[-2:]))


# ---------------------------------------------------------------------------- synthetic


def make_synthetic(n_train: int, n_test: int, seed: int = 0) -> DataArrays:
    """A learnable, not trivial, CIFAR-shaped 10-class dataset, generated from ``seed``.

    Each class is a shape (see SYNTHETIC_CLASSES) drawn at a random position, size and
    orientation over a random gradient background with clutter (a faint grating and small
    distractor blobs) and pixel noise. Classes come in pairs that share a typical hue
    (c and c + 5), and a quarter of the shapes get a random hue, so colour alone gets a
    linear model to about a third and a network has to see shapes to go further. Images are
    generated in fixed chunks from (seed, split, chunk), so a smaller set is a prefix of a
    larger one and train and test never share a random stream.
    """
    for what, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise DataError(f"{what} must be a whole number >= 0, not {n!r}")
    _check_seed(seed)
    train_x, train_y = _synthetic_split(int(n_train), seed, 0)
    test_x, test_y = _synthetic_split(int(n_test), seed, 1)
    return DataArrays("synthetic", SYNTHETIC_CLASSES, train_x, train_y, test_x, test_y)


def _synthetic_split(n: int, seed: int, split: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    y = np.empty(n, np.int64)
    for k, start in enumerate(range(0, n, _SYNTH_CHUNK)):
        stop = min(start + _SYNTH_CHUNK, n)
        rng = np.random.default_rng([seed, split, k])
        x[start:stop], y[start:stop] = _synthetic_chunk(rng, _SYNTH_CHUNK, stop - start)
    return x, y


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(n,) hue, saturation, value in [0, 1] -> (n, 3) RGB in [0, 1]."""
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)])
    return table[i, :, np.arange(len(h))].astype(np.float32)


def _shape_distance(c: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside, in units of the shape's radius) of
    class c's shape at rotated, centred, size-normalised coordinates (u, v)."""
    r = np.hypot(u, v)
    if c == 0:  # disc
        return r - 1.0
    if c == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if c == 2:  # ring
        return np.abs(r - 0.72) - 0.28
    if c == 3:  # cross
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 0.3, av - 1.0), np.maximum(av - 0.3, au - 1.0))
    if c == 4:  # triangle (circumradius 1)
        k = math.sqrt(3) / 2
        return np.maximum(np.maximum(-v, k * u + 0.5 * v), -k * u + 0.5 * v) - 0.5
    if c == 5:  # striped disc
        return np.maximum(r - 1.0, -np.sin(u * 2.5 * math.pi) / (2.5 * math.pi))
    if c == 6:  # checkered square
        sq = np.maximum(np.abs(u), np.abs(v)) - 0.85
        return np.maximum(sq, -np.sin(u * 2.2 * math.pi) * np.sin(v * 2.2 * math.pi) / 7.0)
    if c == 7:  # five-pointed star
        return r - (0.62 + 0.33 * np.cos(5.0 * np.arctan2(v, u)))
    if c == 8:  # ellipse
        return 0.45 * (np.hypot(u, v / 0.45) - 1.0)
    return np.maximum(r - 1.0, 0.75 - np.hypot(u - 0.5, v))  # crescent


def _synthetic_chunk(rng: np.random.Generator, size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``size`` images (always, so the stream does not depend on n), return the first n."""
    f32 = np.float32
    y = np.sort(rng.integers(0, 10, size))  # by class, for the shapes; shuffled at the end
    g = np.arange(IMAGE_SIZE, dtype=f32) + 0.5 - IMAGE_SIZE / 2
    gx, gy = g[None, None, :], g[None, :, None]

    def col(a: np.ndarray) -> np.ndarray:
        return a.astype(f32)[:, None, None]

    def rgb(s: tuple[float, float], v: tuple[float, float], h: np.ndarray | None = None):
        hue = rng.random(size) if h is None else h
        return _hsv_to_rgb(hue, rng.uniform(*s, size), rng.uniform(*v, size))[:, :, None, None]

    # Background: a gradient between two muted random colours, plus a faint grating.
    c0, c1 = rgb((0, 0.6), (0.1, 0.9)), rgb((0, 0.6), (0.1, 0.9))
    a, fr, ph = rng.uniform(0, 2 * np.pi, (3, size)), rng.uniform(0.2, 1.2, size), rng.random(size)
    t = (gx * col(np.cos(a[0])) + gy * col(np.sin(a[0]))) / IMAGE_SIZE + 0.5
    np.clip(t, 0, 1, out=t)
    wave = np.sin((gx * col(np.cos(a[1])) + gy * col(np.sin(a[1]))) * col(fr) + col(ph * 2 * np.pi))
    wave *= col(rng.uniform(0, 0.12, size))
    img = (c1 - c0) * t[:, None]
    img += c0
    img += wave[:, None]

    # Clutter: two small hard-edged blobs of random colour, behind the main shape.
    for _ in range(2):
        cx, cy = rng.uniform(-IMAGE_SIZE / 2, IMAGE_SIZE / 2, (2, size))
        r2 = rng.uniform(1.5, 4.0, size) ** 2
        inside = (gx - col(cx)) ** 2 + (gy - col(cy)) ** 2 < col(r2)
        np.copyto(img, rgb((0.2, 1), (0.2, 1)), where=inside[:, None])

    # The class's shape: random centre, radius and orientation; mostly its pair's hue.
    cx, cy = rng.uniform(-7, 7, (2, size))
    rad = rng.uniform(6.0, 11.0, size)
    a = rng.uniform(0, 2 * np.pi, size)
    dx, dy = (gx - col(cx)) / col(rad), (gy - col(cy)) / col(rad)
    cos, sin = col(np.cos(a)), col(np.sin(a))
    u, v = dx * cos + dy * sin, dy * cos - dx * sin
    dist = np.empty((size, IMAGE_SIZE, IMAGE_SIZE), f32)
    bounds = np.searchsorted(y, np.arange(11))
    for c in range(10):
        k = slice(bounds[c], bounds[c + 1])
        dist[k] = _shape_distance(c, u[k], v[k])
    alpha = dist
    alpha *= -col(rad)
    alpha += 0.5
    np.clip(alpha, 0, 1, out=alpha)
    hue = np.where(rng.random(size) < 0.75, (y % 5) / 5.0 + 0.03, rng.random(size))
    fg = rgb((0.45, 1), (0.45, 1), hue + rng.normal(0, 0.05, size))
    shade = gx * col(rng.normal(0, 0.016, size)) + gy * col(rng.normal(0, 0.016, size)) + 1
    layer = fg * shade[:, None]
    layer -= img
    layer *= alpha[:, None]
    img += layer

    # Pixel noise of a random strength, then quantise; then shuffle the classes' order.
    noise = np.frombuffer(rng.bytes(img.size), np.uint8).reshape(img.shape).astype(f32)
    noise -= 127.5
    noise *= rng.uniform(0.03, 0.2, size).astype(f32)[:, None, None, None]
    img *= 255
    img += noise
    img += 0.5
    np.clip(img, 0, 255, out=img)
    order = rng.permutation(size)[:n]
    return img[order].astype(np.uint8), y[order].astype(np.int64)


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
    """Decoding processes: one on small machines (a pool gains little over ~10 s of serial
    decoding there), up to 8 where there are cores to spare and enough files."""
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
