"""The batched, on-device training augmentation, and the normalisation every image gets.

It reproduces RandomHorizontalFlip + RandomRotation(10) + ToTensor + Normalize(0.5, 0.5) on
whole batches with one ``grid_sample``, on the training device, so that augmenting costs no
per-image Python work and no host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Maximum rotation of the training augmentation, in degrees (RandomRotation(10)).
MAX_ANGLE = 10.0


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
    of (x, y, 1), made once per shape and device: making it is most of affine_grid's work on
    a CPU at small batches."""
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
    ``augment_with``: a trial draws a whole epoch's at once, which leaves each step about
    twenty fewer small operations."""
    return flip_rotation_thetas(*draw_augment_params(n, generator), h, w)


def augment_with(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """A uint8 (B, 3, H, W) batch flipped and rotated by its thetas, then ToTensor +
    Normalize(0.5, 0.5) with the same operations as torchvision (so the values match)."""
    return _to_unit_range(warp(x, theta))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandomHorizontalFlip + RandomRotation(10) + ToTensor + Normalize(0.5, 0.5) for a uint8
    (B, 3, H, W) batch on x's device, with draws from ``generator`` (on the same device)."""
    return augment_with(x, augment_thetas(x.shape[0], generator, *x.shape[-2:]))
