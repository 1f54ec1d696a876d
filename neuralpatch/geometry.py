"""Image and mask geometry shared by the pipeline, the loss, the content network and the benchmarks
(the hole generators, centre squares included, are in :mod:`neuralpatch.masks`).

Masks are bool, True = hole. The one rule for making a mask coarser: a coarse pixel (or feature
cell) is hole if any fine pixel under it is, so no hole pixel ever leaks into a key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bbox", "dilate", "edge_distance", "feature_cells", "interior", "resize_image", "shrink_mask", "thin_keys", "window"]


def resize_image(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, H, W) or (B, C, H, W) in [0, 1] -> the same at ``size`` (height, width): area averaging
    when no side grows, bicubic otherwise (clamped to [0, 1])."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    batched = x if x.dim() == 4 else x[None]
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        out = F.interpolate(batched, size=size, mode="area")
    else:
        out = F.interpolate(batched, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return out if x.dim() == 4 else out[0]


def shrink_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) or (B, H, W) bool -> the same at ``size``: a pixel is hole if any pixel under it
    is (nearest neighbour where a side grows)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    batched = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    if size[0] <= mask.shape[-2] and size[1] <= mask.shape[-1]:
        out = F.interpolate(batched, size=size, mode="area") > 0
    else:
        out = F.interpolate(batched, size=size, mode="nearest") > 0
    return out.reshape(*mask.shape[:-2], *size)


def feature_cells(mask: Tensor, stride: int, size: tuple[int, int]) -> Tensor:
    """(H, W) or (B, H, W) pixel mask -> the mask of a feature map of ``size`` whose cell (i, j)
    covers pixels [i*stride, (i+1)*stride) x [j*stride, (j+1)*stride): set if any of them is."""
    batched = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    cells = F.max_pool2d(batched, stride, stride, ceil_mode=True)[:, 0] > 0
    out = torch.zeros(batched.shape[0], *size, dtype=torch.bool, device=mask.device)
    h, w = min(size[0], cells.shape[-2]), min(size[1], cells.shape[-1])
    out[:, :h, :w] = cells[:, :h, :w]
    return out.reshape(*mask.shape[:-2], *size)


def dilate(mask: Tensor, radius: int) -> Tensor:
    """``mask`` ((H, W) or (B, H, W) bool) grown by ``radius`` pixels in the chessboard metric:
    the positions whose (2*radius + 1)-square window touches it."""
    if radius <= 0:
        return mask
    batched = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    return (F.max_pool2d(batched, 2 * radius + 1, 1, radius) > 0).reshape(mask.shape)


def edge_distance(mask: Tensor, limit: int) -> Tensor:
    """(H, W) bool hole -> (H, W) float32: each hole pixel's distance in pixels to the nearest
    known pixel, up to ``limit`` (0 on known pixels, ``limit`` where none is that close).

    The octagonal distance (rings grown by alternating 4- and 8-neighbour steps): exact along
    rows and columns, and within 11 % of the Euclidean distance from 8 pixels on. Pixels
    outside the image are not known pixels.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask: expected (H, W), got shape {tuple(mask.shape)}")
    reached = (~mask)[None, None].float()
    distance = torch.full(mask.shape, float(limit), device=mask.device)
    distance[~mask] = 0
    for ring in range(1, limit):
        if ring % 2:  # 4-neighbour step: max over the cross
            padded = F.pad(reached, (1, 1, 1, 1))
            grown = torch.maximum(
                torch.maximum(padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]),
                torch.maximum(torch.maximum(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1]), reached),
            )
        else:
            grown = F.max_pool2d(reached, 3, 1, 1)
        new = (grown > reached)[0, 0]
        if not bool(new.any()):
            break
        distance[new] = ring
        reached = grown
    return distance


def interior(height: int, width: int, patch_size: int, device=None) -> Tensor:
    """(height, width) bool: the centres whose whole ``patch_size`` square lies inside the map."""
    r = patch_size // 2
    inside = torch.zeros(height, width, dtype=torch.bool, device=device)
    inside[r : height - r, r : width - r] = True
    return inside


def bbox(mask: Tensor) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end-exclusive, of the set pixels of a non-empty (H, W) mask."""
    rows = mask.any(1).nonzero().squeeze(1)
    cols = mask.any(0).nonzero().squeeze(1)
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def window(box: tuple[int, int, int, int], grow: int, align: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``box`` grown by ``grow`` on each side, its origin aligned down to a multiple of ``align``,
    clipped to the (height, width) image."""
    y0, y1, x0, x1 = box
    y0 = max(0, (y0 - grow) // align * align)
    x0 = max(0, (x0 - grow) // align * align)
    return y0, min(height, y1 + grow), x0, min(width, x1 + grow)


def thin_keys(key_mask: Tensor, max_keys: int) -> Tensor:
    """``key_mask`` ((h, w) or (B, h, w)) restricted to every s-th row and column, with the smallest s
    that leaves at most ``max_keys`` keys per item (s = 1: unchanged; never thinned to nothing)."""
    if key_mask.dim() == 3:
        return torch.stack([thin_keys(item, max_keys) for item in key_mask])
    thinned, count, stride = key_mask, int(key_mask.sum()), 1
    while count > max_keys:
        stride += 1
        grid = torch.zeros_like(key_mask)
        grid[::stride, ::stride] = True
        candidate = key_mask & grid
        candidate_count = int(candidate.sum())
        if candidate_count == 0:
            break
        thinned, count = candidate, candidate_count
    return thinned
