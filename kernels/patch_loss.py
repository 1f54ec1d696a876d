"""Patch matching loss: squared L2 between query patches and their matched target patches.

Forward: one program per block of queries sums ``(feat - target)^2`` over the ``k*k``
taps that lie inside the feature map. Backward: one program per block of pixels x
channels gathers, over the ``k*k`` taps, the queries whose patch covers the pixel, so no
atomics are needed. Both are memory-bound: contiguous channel loads, fp32 accumulation.

Layout: maps are channels-last ``(H, W, C)``; patch tap ``(dy, dx)`` of a target patch
whose top-left corner has flat index ``pos`` is row ``pos + dy*Wt + dx`` of the target.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from neuralpatch._checks import check_patch_size

from .patch_nn import _check_devices, _check_tensor, _interpreting

__all__ = ["patch_loss_fwd", "patch_loss_bwd"]


@triton.jit
def _patch_loss_fwd_kernel(
    feat_ptr,  # [H*W*C] feature map, channels-last (float32 or bfloat16)
    target_ptr,  # [Ht*Wt*C] target feature map, channels-last, same dtype
    q_center_ptr,  # [Nq] int32 query centres y*W + x in feat
    t_pos_ptr,  # [Nq] int32 top-left y*Wt + x of each query's matched target patch
    out_ptr,  # [Nq] float32 per-query squared distance
    Nq,
    H,
    W,
    C,
    Wt,
    PATCH_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_in = offs_q < Nq
    center = tl.load(q_center_ptr + offs_q, mask=q_in, other=0)
    t_pos = tl.load(t_pos_ptr + offs_q, mask=q_in, other=0)
    cy = center // W
    cx = center - cy * W
    offs_c = tl.arange(0, BLOCK_C)

    acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=tl.float32)
    for tap in range(0, PATCH_SIZE * PATCH_SIZE):
        dy = tap // PATCH_SIZE
        dx = tap - dy * PATCH_SIZE
        y = cy + (dy - PATCH_SIZE // 2)
        x = cx + (dx - PATCH_SIZE // 2)
        inside = q_in & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        f_row = (y * W + x) * C
        t_row = (t_pos + dy * Wt + dx) * C
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            m = inside[:, None] & (cc < C)[None, :]
            f = tl.load(feat_ptr + f_row[:, None] + cc[None, :], mask=m, other=0.0).to(tl.float32)
            t = tl.load(target_ptr + t_row[:, None] + cc[None, :], mask=m, other=0.0).to(tl.float32)
            d = f - t
            acc += d * d
    tl.store(out_ptr + offs_q, tl.sum(acc, axis=1), mask=q_in)


@triton.jit
def _patch_loss_bwd_kernel(
    feat_ptr,  # [H*W*C] feature map, channels-last (float32 or bfloat16)
    target_ptr,  # [Ht*Wt*C] target feature map, channels-last, same dtype
    slot_ptr,  # [H*W] int32 index of the query centred at each pixel, -1 where none
    t_pos_ptr,  # [Nq] int32 top-left y*Wt + x of each query's matched target patch
    scale_ptr,  # [1] float32 gradient scale (2 * grad_output / Nq)
    grad_ptr,  # [H*W*C] float32 gradient w.r.t. feat, channels-last
    HW,
    H,
    W,
    C,
    Wt,
    PATCH_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_in = offs_p < HW
    c_in = offs_c < C
    pc_in = p_in[:, None] & c_in[None, :]
    py = offs_p // W
    px = offs_p - py * W

    f = tl.load(feat_ptr + offs_p[:, None] * C + offs_c[None, :], mask=pc_in, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for tap in range(0, PATCH_SIZE * PATCH_SIZE):
        dy = tap // PATCH_SIZE
        dx = tap - dy * PATCH_SIZE
        # the query whose tap (dy, dx) lands on this pixel is centred at p - (dy - r, dx - r), r = k//2
        cy = py - (dy - PATCH_SIZE // 2)
        cx = px - (dx - PATCH_SIZE // 2)
        inside = p_in & (cy >= 0) & (cy < H) & (cx >= 0) & (cx < W)
        slot = tl.load(slot_ptr + cy * W + cx, mask=inside, other=-1)
        hit = slot >= 0
        t_pos = tl.load(t_pos_ptr + slot, mask=hit, other=0)
        t_row = (t_pos + dy * Wt + dx) * C
        hit_c = hit[:, None] & c_in[None, :]
        t = tl.load(target_ptr + t_row[:, None] + offs_c[None, :], mask=hit_c, other=0.0).to(tl.float32)
        acc += tl.where(hit_c, f - t, 0.0)
    scale = tl.load(scale_ptr)
    tl.store(grad_ptr + offs_p[:, None] * C + offs_c[None, :], acc * scale, mask=pc_in)


# ----------------------------------------------------------------------------- launchers

# About 2048 elements per operand per loop step: 16 per thread at 4 warps, enough
# independent loads in flight to cover DRAM latency without spilling.
_TILE_ELEMS = 2048
# Up to 128 channels per row: 512 contiguous bytes in fp32, whole 128-byte lines.
_MAX_BLOCK_C = 128
_NUM_WARPS = 4


def _blocks(c: int) -> tuple[int, int]:
    """(rows per program, channels per chunk) for a C-channel map."""
    block_c = min(max(triton.next_power_of_2(c), 16), _MAX_BLOCK_C)
    return _TILE_ELEMS // block_c, block_c


def _check_maps(feat_map, target_map, patch_size):
    _check_tensor("feat_map", feat_map, 3, (torch.float32, torch.bfloat16))
    _check_tensor("target_map", target_map, 3, (torch.float32, torch.bfloat16))
    check_patch_size(patch_size)
    if target_map.dtype != feat_map.dtype:
        raise ValueError(f"target_map dtype {target_map.dtype} differs from feat_map dtype {feat_map.dtype}")
    if target_map.shape[2] != feat_map.shape[2]:
        raise ValueError(f"target_map has {target_map.shape[2]} channels but feat_map has {feat_map.shape[2]}")
    if feat_map.shape[2] < 1:
        raise ValueError("feat_map must have at least one channel")
    if target_map.shape[0] < patch_size or target_map.shape[1] < patch_size:
        raise ValueError(f"target_map of shape {tuple(target_map.shape)} is smaller than one {patch_size}x{patch_size} patch")


def patch_loss_fwd(
    feat_map: torch.Tensor,
    target_map: torch.Tensor,
    query_center: torch.Tensor,
    target_pos: torch.Tensor,
    patch_size: int,
) -> torch.Tensor:
    """Squared L2 distance of each query patch to its matched target patch.

    Args:
        feat_map: ``(H, W, C)`` contiguous channels-last, float32 or bfloat16 (not padded).
        target_map: ``(Ht, Wt, C)`` contiguous, same dtype.
        query_center: ``(Nq,)`` int32 flat centre ``y*W + x`` of each query in ``feat_map``.
        target_pos: ``(Nq,)`` int32 flat top-left ``ty*Wt + tx`` of each matched patch,
            fully inside ``target_map``.
        patch_size: odd int ``k >= 1``.

    Returns:
        ``(Nq,)`` float32: for each query, the sum over the taps ``(dy, dx)`` whose pixel
        ``(y+dy-r, x+dx-r)`` lies inside ``feat_map`` (``r = k//2``) of
        ``sum_c (feat[y+dy-r, x+dx-r, c] - target[ty+dy, tx+dx, c])^2``.

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices or contiguity.
    """
    _check_maps(feat_map, target_map, patch_size)
    _check_tensor("query_center", query_center, 1, (torch.int32,))
    _check_tensor("target_pos", target_pos, 1, (torch.int32,))
    if target_pos.shape[0] != query_center.shape[0]:
        raise ValueError(f"target_pos has {target_pos.shape[0]} entries but query_center has {query_center.shape[0]}")
    _check_devices(feat_map=feat_map, target_map=target_map, query_center=query_center, target_pos=target_pos)

    h, w, c = feat_map.shape
    nq = query_center.shape[0]
    out = torch.empty(nq, dtype=torch.float32, device=feat_map.device)
    if nq == 0:
        return out
    block_q, block_c = _blocks(c)
    grid = (triton.cdiv(nq, block_q),)
    launch = dict(PATCH_SIZE=patch_size, BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    args = (feat_map, target_map, query_center, target_pos, out, nq, h, w, c, target_map.shape[1])
    if _interpreting():
        _patch_loss_fwd_kernel[grid](*args, **launch)
    else:
        with torch.cuda.device(feat_map.device):
            _patch_loss_fwd_kernel[grid](*args, **launch)
    return out


def patch_loss_bwd(
    feat_map: torch.Tensor,
    target_map: torch.Tensor,
    query_slot: torch.Tensor,
    target_pos: torch.Tensor,
    grad_scale: torch.Tensor,
    patch_size: int,
) -> torch.Tensor:
    """Gradient of ``grad_scale/2 * sum(patch_loss_fwd(...))`` with respect to ``feat_map``.

    Args:
        feat_map: ``(H, W, C)`` contiguous channels-last, float32 or bfloat16.
        target_map: ``(Ht, Wt, C)`` contiguous, same dtype.
        query_slot: ``(H, W)`` int32: ``q`` at the centre pixel of query ``q``, -1 elsewhere.
        target_pos: ``(Nq,)`` int32 flat top-left of each query's matched target patch.
        grad_scale: ``(1,)`` float32 on the same device, e.g. ``2*grad_output/Nq``; it is
            read inside the kernel, so there is no host sync.
        patch_size: odd int ``k >= 1``.

    Returns:
        ``(H, W, C)`` float32: ``grad[p, c] = grad_scale * sum_q (feat[p, c] - target_q(p, c))``
        over the queries ``q`` whose patch covers pixel ``p``; 0 where none does.

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices or contiguity.
    """
    _check_maps(feat_map, target_map, patch_size)
    _check_tensor("query_slot", query_slot, 2, (torch.int32,))
    _check_tensor("target_pos", target_pos, 1, (torch.int32,))
    _check_tensor("grad_scale", grad_scale, 1, (torch.float32,))
    if tuple(query_slot.shape) != tuple(feat_map.shape[:2]):
        raise ValueError(f"query_slot must have shape {tuple(feat_map.shape[:2])} (feat_map's H, W), got {tuple(query_slot.shape)}")
    if grad_scale.shape[0] != 1:
        raise ValueError(f"grad_scale must have shape (1,), got {tuple(grad_scale.shape)}")
    _check_devices(feat_map=feat_map, target_map=target_map, query_slot=query_slot, target_pos=target_pos, grad_scale=grad_scale)

    h, w, c = feat_map.shape
    grad = torch.empty((h, w, c), dtype=torch.float32, device=feat_map.device)
    if grad.numel() == 0:
        return grad
    block_p, block_c = _blocks(c)
    grid = (triton.cdiv(h * w, block_p), triton.cdiv(c, block_c))
    launch = dict(PATCH_SIZE=patch_size, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    args = (feat_map, target_map, query_slot, target_pos, grad_scale, grad, h * w, h, w, c, target_map.shape[1])
    if _interpreting():
        _patch_loss_bwd_kernel[grid](*args, **launch)
    else:
        with torch.cuda.device(feat_map.device):
            _patch_loss_bwd_kernel[grid](*args, **launch)
    return grad
