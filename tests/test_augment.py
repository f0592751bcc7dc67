"""study.augment against independent references: torchvision's transforms (tensor and PIL),
affine_grid, and torchvision's normalisation arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from study.augment import augment, augment_with, draw_augment_params, normalise, rotate_flip, warp
from study.data import make_synthetic


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
