"""study.data against independent references: torchvision's CIFAR-10 and ImageFolder, PIL-decoded
files, plain numpy, and a trial trained on real images. (The augmentation's tests are in
test_augment.py, the synthetic images' in test_synthetic_images.py.)"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

from study import data as data_mod
from study import imagefolder
from study.data import (
    DataArrays,
    DataError,
    load_dataset,
    make_synthetic,
    resolve_dataset_spec,
    train_val_split,
)
from study.imagefolder import imagefolder_sizes

CIFAR10_JPEG = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_jpeg.tar.gz"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@pytest.fixture(scope="session")
def cifar10_jpeg_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The real CIFAR-10 JPEG tree (``.../cifar10_jpeg`` with train/ and test/), extracted
    once per session from ../shared/data and removed after it; skips where it is absent.

    It goes to RAM (/dev/shm) where there is room: on a disk mounted with ``discard``,
    writing and then deleting 60,000 small files is slow, on tmpfs it is not."""
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
    monkeypatch.setattr(imagefolder, "_DECODE_CHUNK", 3)
    monkeypatch.setattr(imagefolder, "_workers", lambda n: 2)
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


@pytest.fixture(scope="module")
def cifar10_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One --data-dir for the real images' tests: the 60,000 JPEGs are decoded once (~15 s)."""
    return tmp_path_factory.mktemp("cifar10-cache")


def test_real_cifar10_jpegs(cifar10_jpeg_dir: Path, cifar10_cache: Path, monkeypatch) -> None:
    logs: list[str] = []
    spec = f"imagefolder:{cifar10_jpeg_dir}"
    d = load_dataset(spec, data_dir=cifar10_cache, log=logs.append)
    assert d.classes == CIFAR10_CLASSES
    assert (len(d.train_y), len(d.test_y)) == (50_000, 10_000)
    np.testing.assert_array_equal(np.bincount(d.train_y), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(d.test_y), [1000] * 10)
    assert not any("resized" in m for m in logs)
    ref = np.asarray(Image.open(cifar10_jpeg_dir / "test/ship/0007.jpg").convert("RGB"))
    np.testing.assert_array_equal(d.test_x[8 * 1000 + 7], ref.transpose(2, 0, 1))
    monkeypatch.setattr(Image, "open", None)  # the second load must not decode anything
    again = load_dataset(spec, data_dir=cifar10_cache, log=logs.append)
    np.testing.assert_array_equal(again.train_x, d.train_x)


def test_real_cifar10_images_are_learnable_with_bn(cifar10_jpeg_dir: Path, cifar10_cache: Path) -> None:
    """One short epoch on 2,400 real images: the BN network clearly beats chance (10%)."""
    from study.config import TrialConfig
    from study.train import RunOptions, run_trial

    data = load_dataset(f"imagefolder:{cifar10_jpeg_dir}", data_dir=cifar10_cache, subset=3000,
                        log=lambda s: None)
    cfg = TrialConfig(norm="batch", lr=0.02, epochs=1, batch_size=16)
    summary = run_trial(cfg, data, options=RunOptions(device="cpu", threads=1))
    assert summary["status"] == "done"
    assert summary["final"]["test_acc"] > 0.2, summary["final"]


def test_imagefolder_sizes_count_what_the_loader_reads(tree, tmp_path) -> None:
    root, _ = tree
    (root / "train" / "cat" / "nested").mkdir()
    _save(root / "train" / "cat" / "nested" / "deep.png", np.zeros((32, 32, 3), np.uint8))
    data = load_dataset(f"imagefolder:{root}", data_dir=tmp_path)
    assert imagefolder_sizes(root) == (len(data.train_y), len(data.test_y)) == (11, 6)
