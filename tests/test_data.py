"""study.data against independent references: torchvision's transforms (tensor and PIL),
PIL-decoded files, plain numpy, and small models trained on the synthetic set."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from study import data as data_mod
from study.data import (
    DataArrays,
    DataError,
    augment,
    augment_with,
    draw_augment_params,
    imagefolder_sizes,
    load_dataset,
    make_synthetic,
    normalise,
    resolve_dataset_spec,
    rotate_flip,
    train_val_split,
    warp,
)

CIFAR10_JPEG = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_jpeg.tar.gz"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@pytest.fixture(scope="session")
def cifar10_jpeg_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The real CIFAR-10 JPEG tree (``.../cifar10_jpeg`` with train/ and test/), extracted
    once per session from ../shared/data and removed after it; skips where it is absent.

    It goes to RAM (/dev/shm) where there is room: on a disk mounted with ``discard``,
    writing and then deleting 60,000 small files took minutes, on tmpfs seconds."""
    if not CIFAR10_JPEG.is_file():
        pytest.skip(f"real CIFAR-10 images not available: {CIFAR10_JPEG} is absent")
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2**30:
        dest = Path(tempfile.mkdtemp(prefix="bnstudy-cifar10-jpeg-", dir=shm))
    else:
        dest = tmp_path_factory.mktemp("cifar10_jpeg_extract")
    try:
        with tarfile.open(CIFAR10_JPEG) as tar:
            tar.extractall(dest, filter="data")
        yield dest / "cifar10_jpeg"
    finally:
        shutil.rmtree(dest, ignore_errors=True)


# ---------------------------------------------------------------------------- synthetic


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
    assert time.perf_counter() - t < 5.0  # ~0.3 s here; 60,000 images take a few seconds


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


# ---------------------------------------------------------------------------- normalise


def test_normalise_constants_and_torchvision() -> None:
    for v, want in ((255, 1.0), (0, -1.0), (128, (128 / 255 - 0.5) / 0.5)):
        out = normalise(torch.full((2, 3, 4, 4), v, dtype=torch.uint8))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, torch.full_like(out, want), rtol=0, atol=1e-6)
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ref = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)]
    )(Image.fromarray(hwc))
    out = normalise(torch.from_numpy(hwc).permute(2, 0, 1)[None])[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- augmentation


def _images(n: int = 6) -> torch.Tensor:
    return torch.from_numpy(make_synthetic(n, 0, seed=11).train_x)


@pytest.mark.parametrize("flip", [False, True])
def test_rotate_flip_matches_torchvision_tensor_rotate(flip: bool) -> None:
    x = _images()
    for angle in (-10.0, -7.3, -2.5, 0.0, 0.4, 3.0, 6.25, 9.99, 10.0):
        out = rotate_flip(x, torch.full((len(x),), angle), torch.full((len(x),), flip))
        assert out.dtype == torch.float32 and out.shape == x.shape
        ref = TF.rotate(TF.hflip(x) if flip else x, angle, InterpolationMode.NEAREST, fill=0)
        same = (out.to(torch.uint8) == ref).all(1).float().mean().item()
        assert same >= 0.99, (angle, same)


def test_rotate_flip_matches_torchvision_pil_pipeline() -> None:
    x = _images(4)
    angles = torch.tensor([-9.5, -4.0, 2.2, 8.8])
    flips = torch.tensor([True, False, True, False])
    out = normalise(rotate_flip(x, angles, flips))
    to_tensor = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)]
    )
    for i in range(len(x)):
        im = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        im = TF.hflip(im) if flips[i] else im
        ref = to_tensor(TF.rotate(im, float(angles[i]), InterpolationMode.NEAREST, fill=0))
        same = (out[i] - ref).abs().max(0).values.le(1e-6).float().mean().item()
        assert same >= 0.99, (i, same)


def test_rotate_flip_per_image_and_non_square() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 24, 40), dtype=torch.uint8, generator=g)
    angles, flips = torch.tensor([-8.0, 0.0, 5.0]), torch.tensor([False, True, True])
    out = rotate_flip(x, angles, flips).to(torch.uint8)
    for i in range(3):
        src = TF.hflip(x[i]) if flips[i] else x[i]
        ref = TF.rotate(src, float(angles[i]), InterpolationMode.NEAREST, fill=0)
        assert (out[i] == ref).all(0).float().mean().item() >= 0.99
    torch.testing.assert_close(out[1], TF.hflip(x[1]), rtol=0, atol=0)


def test_rotated_corners_are_black_before_normalisation() -> None:
    white = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    out = normalise(rotate_flip(white, torch.tensor([-10.0, -5.0, 5.0, 10.0]), torch.zeros(4)))
    for r, c in ((0, 0), (0, 31), (31, 0), (31, 31)):
        assert (out[:, :, r, c] == -1.0).all()
    assert (out[:, :, 8:24, 8:24] == 1.0).all()


def test_draw_augment_params_ranges_and_determinism() -> None:
    angles, flips = draw_augment_params(20_000, torch.Generator().manual_seed(1))
    assert angles.shape == flips.shape == (20_000,) and flips.dtype == torch.bool
    assert angles.min() >= -10 and angles.max() <= 10
    assert angles.min() < -9.9 and angles.max() > 9.9 and abs(angles.mean().item()) < 0.2
    assert 0.48 < flips.float().mean().item() < 0.52
    again = draw_augment_params(20_000, torch.Generator().manual_seed(1))
    assert torch.equal(angles, again[0]) and torch.equal(flips, again[1])


def test_augment_varies_per_image_and_flips_both_ways() -> None:
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    img[:, 4:28, 2:12] = 255  # a bright bar on the left: asymmetric under a horizontal flip
    x = img.expand(64, 3, 32, 32).contiguous()
    before = torch.get_rng_state()
    out = augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(before, torch.get_rng_state())  # only the given generator is used
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert out.min() >= -1 and out.max() <= 1
    assert len({o.numpy().tobytes() for o in out}) > 32
    left, right = out[:, :, :, :16].mean((1, 2, 3)), out[:, :, :, 16:].mean((1, 2, 3))
    flipped = right > left
    assert 10 < flipped.sum().item() < 54
    # The same draws replayed through the deterministic parts give the same batch.
    angles, flips = draw_augment_params(64, torch.Generator().manual_seed(5))
    assert torch.equal(flips, flipped)
    torch.testing.assert_close(out, normalise(rotate_flip(x, angles, flips)), rtol=0, atol=0)
    torch.testing.assert_close(out, augment(x, torch.Generator().manual_seed(5)), rtol=0, atol=0)


def test_warp_samples_where_affine_grid_says() -> None:
    """warp reuses a cached base grid; its sampling must be affine_grid's, bit for bit, for
    square and non-square images and for the base grid's second and later uses."""
    g = torch.Generator().manual_seed(3)
    for shape in ((16, 3, 32, 32), (5, 2, 20, 36), (16, 3, 32, 32)):
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        theta = torch.randn(shape[0], 2, 3, generator=g) * 0.7
        grid = F.affine_grid(theta, [shape[0], 1, *shape[-2:]], align_corners=False)
        ref = F.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        assert torch.equal(warp(x, theta), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_augment_on_gpu_matches_cpu_without_host_sync() -> None:
    x = _images(64)
    xg, g = x.cuda(), torch.Generator("cuda").manual_seed(3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment(xg, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == xg.device and out.dtype == torch.float32
    angles, flips = draw_augment_params(64, torch.Generator("cuda").manual_seed(3))
    # the geometry is identical on both devices; the normalisation may differ by an ulp,
    # since CUDA divides by a scalar through its reciprocal
    assert torch.equal(rotate_flip(xg, angles, flips).cpu(), rotate_flip(x, angles.cpu(), flips.cpu()))
    ref = normalise(rotate_flip(x, angles.cpu(), flips.cpu()))
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- splits, subsets


def test_train_val_split() -> None:
    tr, va = train_val_split(1000, 0.2, seed=4)
    assert tr.dtype == va.dtype == np.int64 and (len(tr), len(va)) == (800, 200)
    assert set(tr.tolist()).isdisjoint(va.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(1000))
    again = train_val_split(1000, 0.2, seed=4)
    np.testing.assert_array_equal(tr, again[0])
    np.testing.assert_array_equal(va, again[1])
    assert not np.array_equal(va, train_val_split(1000, 0.2, seed=5)[1])
    assert len(train_val_split(50_000, 0.2, 0)[1]) == 10_000
    assert len(train_val_split(7, 0.25, 0)[1]) == round(7 * 0.25)
    assert len(train_val_split(10, 0.0, 0)[1]) == 0
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(DataError):
            train_val_split(10, bad, 0)


def test_subset_of_synthetic_sizes_and_determinism() -> None:
    a = load_dataset("synthetic", subset=300, seed=2, log=lambda m: None)
    assert (len(a.train_y), len(a.test_y)) == (300, 300)
    b = load_dataset("synthetic", subset=300, seed=2, log=lambda m: None)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    c = load_dataset("synthetic", subset=12_000, seed=2, log=lambda m: None)
    assert (len(c.train_y), len(c.test_y)) == (12_000, 10_000)
    for bad in (0, -3, 2.5, "10", True):
        with pytest.raises(DataError, match="subset"):
            load_dataset("synthetic", subset=bad)


def test_take_subset_is_a_seeded_subset() -> None:
    full = make_synthetic(500, 80, seed=0)
    a, b = data_mod.take_subset(full, 100, 1), data_mod.take_subset(full, 100, 1)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert (len(a.train_y), len(a.test_y)) == (100, 80)
    rows = {x.tobytes(): y for x, y in zip(full.train_x, full.train_y, strict=True)}
    assert all(rows[x.tobytes()] == y for x, y in zip(a.train_x, a.train_y, strict=True))
    assert len({x.tobytes() for x in a.train_x}) == 100
    assert not np.array_equal(a.train_y, data_mod.take_subset(full, 100, 2).train_y)


# ---------------------------------------------------------------------------- image folders


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, dict[str, list[np.ndarray]]]]:
    """A tiny image folder: classes written unsorted, 32×32 PNGs, one 40×40 image, a stray
    text file; returns its root and the pixels written, per split and class (sorted)."""
    rng = np.random.default_rng(0)
    root, pixels = tmp_path / "tree", {"train": {}, "test": {}}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "ant", "bee"):
            imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
            for i, img in enumerate(imgs):
                _save(root / split / cls / f"{i:02d}.png", img)
            pixels[split][cls] = imgs
    _save(root / "train" / "bee" / "zz_big.png", rng.integers(0, 256, (40, 40, 3), np.uint8))
    (root / "train" / "ant" / "README.txt").write_text("not an image")
    return root, pixels


def test_imagefolder_loads_sorted_classes_and_exact_pixels(tree, tmp_path: Path) -> None:
    root, pixels = tree
    logs: list[str] = []
    d = load_dataset(f"imagefolder:{root}", data_dir=tmp_path / "data", log=logs.append)
    assert d.name == f"imagefolder:{root}"
    assert d.classes == ("ant", "bee", "cat")
    assert (len(d.train_y), len(d.test_y)) == (10, 6)
    np.testing.assert_array_equal(np.bincount(d.train_y), [3, 4, 3])
    np.testing.assert_array_equal(d.test_y, [0, 0, 1, 1, 2, 2])
    assert d.train_x.dtype == np.uint8 and d.train_x.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(d.train_x[0], pixels["train"]["ant"][0].transpose(2, 0, 1))
    np.testing.assert_array_equal(d.test_x[5], pixels["test"]["cat"][1].transpose(2, 0, 1))
    bee_big = np.asarray(Image.open(root / "train/bee/zz_big.png").resize((32, 32)))
    assert np.abs(d.train_x[6].astype(int) - bee_big.transpose(2, 0, 1)).max() <= 40
    resize_notes = [m for m in logs if "32×32" in m]
    assert len(resize_notes) == 1 and "1 image" in resize_notes[0] and "zz_big" in resize_notes[0]
    assert all("\n" not in m for m in logs)
    assert len(list((tmp_path / "data" / "cache").glob("*.npz"))) == 1


def test_imagefolder_second_load_uses_the_cache(tree, tmp_path, monkeypatch) -> None:
    root, _ = tree
    first = load_dataset(f"imagefolder:{root}", data_dir=tmp_path, log=lambda m: None)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded although the cache is valid")

    monkeypatch.setattr(Image, "open", no_decoding)
    second = load_dataset(f"imagefolder:{root}", data_dir=tmp_path, log=lambda m: None)
    for f in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(first, f), getattr(second, f))
    assert second.classes == first.classes


def test_imagefolder_cache_follows_the_files(tree, tmp_path) -> None:
    root, _ = tree
    load_dataset(f"imagefolder:{root}", data_dir=tmp_path, log=lambda m: None)
    _save(root / "test" / "ant" / "09.png", np.zeros((32, 32, 3), np.uint8))
    d = load_dataset(f"imagefolder:{root}", data_dir=tmp_path, log=lambda m: None)
    assert len(d.test_y) == 7 and (d.test_x[2] == 0).all()
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_imagefolder_corrupt_cache_is_rebuilt(tree, tmp_path) -> None:
    root, _ = tree
    good = load_dataset(f"imagefolder:{root}", data_dir=tmp_path, log=lambda m: None)
    (cache,) = (tmp_path / "cache").glob("*.npz")
    cache.write_bytes(b"PK\x03\x04 this is not a zip file")
    logs: list[str] = []
    again = load_dataset(f"imagefolder:{root}", data_dir=tmp_path, log=logs.append)
    np.testing.assert_array_equal(good.train_x, again.train_x)
    assert any("ignoring unreadable cache" in m and str(cache) in m for m in logs)
    with np.load(cache) as z:
        np.testing.assert_array_equal(z["train_x"], good.train_x)


def test_imagefolder_corrupt_image(tree, tmp_path) -> None:
    root, _ = tree
    bad = root / "test" / "bee" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="broken.png") as err:
        load_dataset(f"imagefolder:{root}", data_dir=tmp_path, log=lambda m: None)
    assert "\n" not in str(err.value)


def test_imagefolder_process_pool_gives_the_same_arrays(tree, tmp_path, monkeypatch) -> None:
    root, _ = tree
    serial = load_dataset(f"imagefolder:{root}", data_dir=tmp_path / "a", log=lambda m: None)
    monkeypatch.setattr(data_mod, "_DECODE_CHUNK", 3)
    monkeypatch.setattr(data_mod, "_workers", lambda n: 2)
    pooled = load_dataset(f"imagefolder:{root}", data_dir=tmp_path / "b", log=lambda m: None)
    for f in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(serial, f), getattr(pooled, f))
    (root / "test" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="broken.jpg"):
        load_dataset(f"imagefolder:{root}", data_dir=tmp_path / "b", log=lambda m: None)


def test_imagefolder_bad_trees(tree, tmp_path) -> None:
    root, _ = tree
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}", data_dir=tmp_path)
    _save(root / "train" / "dog" / "0.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="different classes"):
        load_dataset(f"imagefolder:{root}", data_dir=tmp_path)
    (root / "test" / "dog").mkdir()
    with pytest.raises(DataError, match=f"{root / 'test' / 'dog'}.* no images"):
        load_dataset(f"imagefolder:{root}", data_dir=tmp_path)
    for f in (root / "test").rglob("*.png"):
        f.unlink()
    for d in sorted((root / "test").rglob("*"), reverse=True):
        d.rmdir()
    (root / "test").rmdir()
    with pytest.raises(DataError, match=f"{root / 'test'} is missing") as err:
        load_dataset(f"imagefolder:{root}", data_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_imagefolder_with_more_classes_than_the_cnn_has_outputs_is_refused(tmp_path) -> None:
    root = tmp_path / "eleven"
    for split in ("train", "test"):
        for c in range(11):
            _save(root / split / f"c{c:02d}" / "0.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="11 classes; the study's CNN has 10 outputs"):
        load_dataset(f"imagefolder:{root}", data_dir=tmp_path)
    for split in ("train", "test"):  # ten are fine
        for f in (root / split / "c10").iterdir():
            f.unlink()
        (root / split / "c10").rmdir()
    assert len(load_dataset(f"imagefolder:{root}", data_dir=tmp_path).classes) == 10


def test_imagefolder_subset(tree, tmp_path) -> None:
    root, _ = tree
    full = load_dataset(f"imagefolder:{root}", data_dir=tmp_path, log=lambda m: None)
    sub = load_dataset(f"imagefolder:{root}", data_dir=tmp_path, subset=4, seed=3)
    assert (len(sub.train_y), len(sub.test_y)) == (4, 4)
    rows = {x.tobytes(): y for x, y in zip(full.train_x, full.train_y, strict=True)}
    assert all(rows[x.tobytes()] == y for x, y in zip(sub.train_x, sub.train_y, strict=True))


# ---------------------------------------------------------------------------- specs, CIFAR-10


def test_resolve_dataset_spec(tmp_path, monkeypatch) -> None:
    assert resolve_dataset_spec("cifar10", tmp_path) == "cifar10"
    assert resolve_dataset_spec("synthetic", tmp_path) == "synthetic"
    assert resolve_dataset_spec("auto", tmp_path / "absent") == "synthetic"
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    assert resolve_dataset_spec("auto", tmp_path) == "cifar10"
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert resolve_dataset_spec("auto", tmp_path) == "cifar10"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"{tmp_path}/imgs does not exist"):
        resolve_dataset_spec("imagefolder:imgs", "data")
    (tmp_path / "imgs").mkdir()
    assert resolve_dataset_spec("imagefolder:imgs", "data") == f"imagefolder:{tmp_path}/imgs"
    for bad in ("cifar100", "", "imagefolder:", "CIFAR-10", "folder:/x"):
        with pytest.raises(DataError) as err:
            resolve_dataset_spec(bad, tmp_path)
        assert "\n" not in str(err.value)


def test_auto_without_cifar_falls_back_to_synthetic_with_a_notice(tmp_path) -> None:
    logs: list[str] = []
    d = load_dataset("auto", data_dir=tmp_path, subset=50, log=logs.append)
    assert d.name == "synthetic" and len(d.train_y) == 50
    assert len(logs) == 1 and "synthetic" in logs[0] and str(tmp_path) in logs[0]


def test_cifar10_offline_gives_one_clear_error(tmp_path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    where = tmp_path / "empty"
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", data_dir=where)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(where) in msg and "cifar-10-python.tar.gz" in msg
    assert "--dataset synthetic" in msg and "imagefolder:PATH" in msg


def test_cifar10_arrays_from_torchvision_are_transposed(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(0)

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            assert download and Path(root) == tmp_path.resolve()
            n = 12 if train else 5
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = list(rng.integers(0, 10, n))
            self.classes = list(CIFAR10_CLASSES)
            made.append(self)

    made: list[FakeCIFAR10] = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    d = load_dataset("cifar10", data_dir=tmp_path)
    assert d.name == "cifar10" and d.classes == CIFAR10_CLASSES
    assert d.train_x.shape == (12, 3, 32, 32) and d.train_x.flags.c_contiguous
    assert d.train_x[3, 1, 5, 7] == made[0].data[3, 5, 7, 1]
    np.testing.assert_array_equal(d.test_x, made[1].data.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(d.test_y, made[1].targets)
    sub = load_dataset("cifar10", data_dir=tmp_path, subset=4)
    assert (len(sub.train_y), len(sub.test_y)) == (4, 4)


def test_data_arrays_checks_its_arrays() -> None:
    x, y = np.zeros((2, 3, 32, 32), np.uint8), np.zeros(2, np.int64)
    DataArrays("ok", ("a",), x, y, x, y)
    with pytest.raises(ValueError):
        DataArrays("bad", ("a",), x.astype(np.float32), y, x, y)
    with pytest.raises(ValueError):
        DataArrays("bad", ("a",), x, y[:1], x, y)


# ---------------------------------------------------------------------------- real images


def test_real_cifar10_jpegs(cifar10_jpeg_dir: Path, tmp_path: Path, monkeypatch) -> None:
    logs: list[str] = []
    spec = f"imagefolder:{cifar10_jpeg_dir}"
    d = load_dataset(spec, data_dir=tmp_path, log=logs.append)
    assert d.classes == CIFAR10_CLASSES
    assert (len(d.train_y), len(d.test_y)) == (50_000, 10_000)
    np.testing.assert_array_equal(np.bincount(d.train_y), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(d.test_y), [1000] * 10)
    assert not any("resized" in m for m in logs)
    ref = np.asarray(Image.open(cifar10_jpeg_dir / "test/ship/0007.jpg").convert("RGB"))
    np.testing.assert_array_equal(d.test_x[8 * 1000 + 7], ref.transpose(2, 0, 1))
    monkeypatch.setattr(Image, "open", None)  # the second load must not decode anything
    again = load_dataset(spec, data_dir=tmp_path, log=logs.append)
    np.testing.assert_array_equal(again.train_x, d.train_x)


def test_real_cifar10_images_are_learnable_with_bn(cifar10_jpeg_dir: Path, tmp_path: Path) -> None:
    """One short epoch on 2,400 real images: the BN network clearly beats chance (10%)."""
    from study.config import TrialConfig
    from study.train import run_trial

    data = load_dataset(f"imagefolder:{cifar10_jpeg_dir}", data_dir=tmp_path, subset=3000,
                        log=lambda s: None)
    cfg = TrialConfig(norm="batch", lr=0.02, epochs=1, batch_size=16)
    summary = run_trial(cfg, data, device="cpu", threads=1)
    assert summary["status"] == "done"
    assert summary["final"]["test_acc"] > 0.2, summary["final"]


def test_normalise_is_torchvisions_arithmetic_to_the_bit() -> None:
    """x/127.5 - 1 against ToTensor + Normalize(0.5, 0.5)'s own operations, every pixel value."""
    v = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    ref = v.to(torch.float32).div(255).sub(0.5).div(0.5)
    assert torch.equal(normalise(v), ref)
    hwc = v[0].permute(1, 2, 0).expand(16, 16, 3).contiguous().numpy()
    tv = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert torch.equal(normalise(torch.from_numpy(hwc).permute(2, 0, 1)), tv(Image.fromarray(hwc)))
    f = v.to(torch.float32)
    assert torch.equal(normalise(f), ref) and torch.equal(f, v.to(torch.float32))  # input untouched
    theta = torch.eye(2, 3).expand(1, 2, 3)  # the identity warp: augment_with is normalise
    assert torch.equal(augment_with(v.expand(1, 3, 16, 16), theta), normalise(v.expand(1, 3, 16, 16)))


def test_imagefolder_sizes_count_what_the_loader_reads(tree, tmp_path) -> None:
    root, _ = tree
    (root / "train" / "cat" / "nested").mkdir()
    _save(root / "train" / "cat" / "nested" / "deep.png", np.zeros((32, 32, 3), np.uint8))
    data = load_dataset(f"imagefolder:{root}", data_dir=tmp_path)
    assert imagefolder_sizes(root) == (len(data.train_y), len(data.test_y)) == (11, 6)
