"""A procedurally generated, CIFAR-shaped 10-class image set, for offline use and tests.

Learnable, not trivial: each class is a shape (see SYNTHETIC_CLASSES) drawn at a random
position, size and orientation over a random gradient background with clutter (a faint grating
and small distractor blobs) and pixel noise. Classes come in pairs that share a typical hue
(c and c + 5), and a quarter of the shapes get a random hue, so colour alone gets a linear
model to about a third and a network has to see shapes to go further. Images are generated in
fixed chunks from (seed, split, chunk), so a smaller set is a prefix of a larger one and train
and test never share a random stream. ``study.data.make_synthetic`` makes a dataset of them.
"""

from __future__ import annotations

import math

import numpy as np

from study.image_format import IMAGE_SIZE

SYNTHETIC_CLASSES = (
    "disc", "square", "ring", "cross", "triangle", "stripes", "checker", "star", "ellipse",
    "crescent",
)  # fmt: skip
_CHUNK = 128


def synthetic_split(n: int, seed: int, split: int) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 (3, 32, 32) images and their int64 labels of one split (0: train, 1: test),
    generated in fixed chunks from (seed, split, chunk)."""
    x = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    y = np.empty(n, np.int64)
    for k, start in enumerate(range(0, n, _CHUNK)):
        stop = min(start + _CHUNK, n)
        rng = np.random.default_rng([seed, split, k])
        x[start:stop], y[start:stop] = _synthetic_chunk(rng, _CHUNK, stop - start)
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
