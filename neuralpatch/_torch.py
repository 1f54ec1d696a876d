"""The torch backend of the exact search and of the patch loss (CPU and GPU), and the pieces the
other backends share with it: tf32 rounding and patch norms.

Launchers take the normalised problem that :mod:`neuralpatch.ops` builds (channels-last maps,
flat positions, inverse key norms), like the Triton and CUDA launchers; ``ops`` dispatches.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["box_sum_of_squares", "cuda_fp32_matmul", "patch_loss_bwd", "patch_loss_fwd", "patch_nn_fwd", "round_to_tf32", "tile_sizes"]


def round_to_tf32(x: Tensor) -> Tensor:
    """Round float32 to the nearest tf32 value (10 mantissa bits), as the tensor cores see it."""
    bits = x.contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = (bits + 0xFFF + lsb) & ~0x1FFF
    return rounded.view(torch.float32)


def box_sum_of_squares(feat_chw: Tensor, patch_size: int) -> Tensor:
    """|patch|^2 at every centre of a (C, H, W) map (zero padding), as (H*W,) float."""
    acc = torch.float64 if feat_chw.dtype == torch.float64 else torch.float32
    sq = feat_chw.to(acc).square().sum(0, keepdim=True)[None]
    r = patch_size // 2
    ones = torch.ones(1, 1, patch_size, patch_size, dtype=acc, device=feat_chw.device)
    return F.conv2d(sq, ones, padding=r).reshape(-1)


def _patch_offsets(patch_size: int, width: int, device) -> Tensor:
    d = torch.arange(patch_size, device=device)
    return (d[:, None] * width + d[None, :]).reshape(-1)


def _gather_patches(flat_map: Tensor, top_left: Tensor, offsets: Tensor) -> Tensor:
    """(n, k*k*C) patches from a (H*W, C) channels-last map, element order (dy*k+dx)*C + c."""
    rows = top_left.to(torch.int64)[:, None] + offsets[None, :]
    return flat_map[rows].reshape(top_left.shape[0], -1)


@contextlib.contextmanager
def cuda_fp32_matmul(precision: str):
    """Let fp32 matmuls on CUDA use tf32 only when precision == "tf32" (restored on exit)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # torch < 2.9
        previous = matmul.allow_tf32
        matmul.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def _scores_tile(q: Tensor, k: Tensor) -> Tensor:
    """q @ k.T with fp32 (or fp64) accumulation and output, whatever the input format."""
    if q.dtype == torch.bfloat16:
        if q.is_cuda:
            try:
                return torch.mm(q, k.T, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):  # torch without mm.dtype
                pass
        return q.float() @ k.float().T  # exact products of bf16 values, fp32 accumulation
    return q @ k.T


def patch_row_bytes(patch_dim: int, itemsize: int) -> int:
    """Bytes of one gathered patch of ``patch_dim`` values (bf16 tiles are widened to fp32 on the CPU)."""
    return patch_dim * max(itemsize, 4)


def tile_sizes(nq: int, nk: int, patch_dim: int, itemsize: int, chunk_bytes: int) -> tuple[int, int]:
    """Query and key tile sizes whose working set (two patch tiles, the fp32 score
    tile and one temporary of its size) stays under ``chunk_bytes``."""
    row = patch_row_bytes(patch_dim, itemsize)
    side = 1
    while side < max(nq, nk) and 8 * (2 * side) ** 2 + 2 * (2 * side) * row <= chunk_bytes:
        side *= 2
    tq, tk = min(nq, side), min(nk, side)
    if tq < side:  # few queries: spend the budget on wider key tiles
        tk = min(nk, max(1, (chunk_bytes - tq * row) // (8 * tq + row)))
    elif tk < side:
        tq = min(nq, max(1, (chunk_bytes - tk * row) // (8 * tk + row)))
    return max(tq, 1), max(tk, 1)


# on the CPU a score tile this size (16 MB) stays in cache between its GEMM and its max, where a
# budget-sized one goes to memory and back: 10 % of the search at relu3_1, 16k x 64k
CPU_SCORE_TILE = (1024, 4096)


def patch_nn_fwd(query_map, key_map, query_pos, key_pos, key_inv_norm, patch_size, precision, chunk_bytes):
    """The backend contract in plain torch: tiles of gathered patches, one GEMM per
    tile, and a running best per query merged with a strict ``>``.

    The query patches are gathered once per block of up to half of ``chunk_bytes``, and each key
    tile once per block (all the queries of a 512² image fit in one block); the other half holds
    a key tile and its score tiles. Key tiles are visited in order for every query, so the first
    maximum wins whatever the tiling."""
    nq, nk = query_pos.shape[0], key_pos.shape[0]
    channels = query_map.shape[-1]
    q_flat = query_map.reshape(-1, channels)
    k_flat = key_map.reshape(-1, channels)
    if precision == "tf32" and not query_map.is_cuda:
        q_flat, k_flat = round_to_tf32(q_flat), round_to_tf32(k_flat)
    q_offsets = _patch_offsets(patch_size, query_map.shape[1], query_map.device)
    k_offsets = _patch_offsets(patch_size, key_map.shape[1], key_map.device)
    patch_dim = channels * patch_size * patch_size
    block = max(1, min(nq, (chunk_bytes // 2) // patch_row_bytes(patch_dim, query_map.element_size())))
    tq, tk = tile_sizes(block, nk, patch_dim, query_map.element_size(), chunk_bytes // 2)
    if not query_map.is_cuda:
        tq, tk = min(tq, CPU_SCORE_TILE[0]), min(tk, CPU_SCORE_TILE[1])
    acc_dtype = torch.float64 if query_map.dtype == torch.float64 else torch.float32
    best_value = torch.full((nq,), float("-inf"), dtype=acc_dtype, device=query_map.device)
    best_index = torch.zeros(nq, dtype=torch.int64, device=query_map.device)
    guard = cuda_fp32_matmul(precision) if query_map.is_cuda else contextlib.nullcontext()
    with guard:
        for b0 in range(0, nq, block):
            q_block = _gather_patches(q_flat, query_pos[b0 : b0 + block], q_offsets)
            for k0 in range(0, nk, tk):
                k = _gather_patches(k_flat, key_pos[k0 : k0 + tk], k_offsets)
                inv_norm = key_inv_norm[k0 : k0 + tk].to(acc_dtype)  # the scores' dtype
                for q0 in range(0, q_block.shape[0], tq):
                    q1 = min(q0 + tq, q_block.shape[0])
                    scores = _scores_tile(q_block[q0:q1], k)
                    scores.mul_(inv_norm)
                    tile_value, tile_index = scores.max(dim=1)  # first maximum on ties
                    run_value = best_value[b0 + q0 : b0 + q1]
                    run_index = best_index[b0 + q0 : b0 + q1]
                    better = tile_value > run_value
                    run_value.copy_(torch.where(better, tile_value.to(acc_dtype), run_value))
                    run_index.copy_(torch.where(better, tile_index + k0, run_index))
                    del scores
    return best_index, best_value.to(torch.float32)


def patch_loss_fwd(feat_map, target_map, query_center, target_pos, patch_size):
    """Per-query squared distances, counting only patch offsets inside ``feat_map``."""
    h, w, c = feat_map.shape
    r = patch_size // 2
    acc = torch.float64 if feat_map.dtype == torch.float64 else torch.float32
    padded = F.pad(feat_map.to(acc), (0, 0, r, r, r, r)).reshape(-1, c)
    qy, qx = query_center // w, query_center % w
    q_top_left = qy * (w + 2 * r) + qx  # the centre in unpadded coords is the top-left in padded ones
    q = _gather_patches(padded, q_top_left, _patch_offsets(patch_size, w + 2 * r, feat_map.device))
    t = _gather_patches(target_map.to(acc).reshape(-1, c), target_pos, _patch_offsets(patch_size, target_map.shape[1], feat_map.device))
    d = torch.arange(patch_size, device=feat_map.device) - r
    inside_y = ((qy[:, None] + d[None, :]) >= 0) & ((qy[:, None] + d[None, :]) < h)
    inside_x = ((qx[:, None] + d[None, :]) >= 0) & ((qx[:, None] + d[None, :]) < w)
    valid = (inside_y[:, :, None] & inside_x[:, None, :]).reshape(-1, patch_size * patch_size, 1)
    diff = (q - t).view(-1, patch_size * patch_size, c) * valid
    return diff.square().sum(dim=(1, 2))


def patch_loss_bwd(feat_map, target_map, query_slot, target_pos, grad_scale, patch_size):
    """Gradient of ``sum_q per_query[q] * grad_scale / 2 * 2``: for each offset, the
    residuals of all queries form one dense map that is shifted onto the pixels it
    touches. Queries have distinct centres, so nothing collides."""
    h, w, c = feat_map.shape
    r = patch_size // 2
    acc = torch.float64 if feat_map.dtype == torch.float64 else torch.float32
    centres = (query_slot.reshape(-1) >= 0).nonzero().squeeze(1)
    slots = query_slot.reshape(-1)[centres].to(torch.int64)
    feat_acc = feat_map.to(acc)
    padded_feat = F.pad(feat_acc, (0, 0, r, r, r, r))
    target_flat = target_map.to(acc).reshape(-1, c)
    grad = torch.zeros(h + 2 * r, w + 2 * r, c, dtype=acc, device=feat_map.device)
    residual = torch.zeros(h * w, c, dtype=acc, device=feat_map.device)
    cy, cx = centres // w, centres % w
    tpos = target_pos.to(torch.int64)[slots]
    wt = target_map.shape[1]
    for dy in range(patch_size):
        for dx in range(patch_size):
            # feat at pixel (cy+dy-r, cx+dx-r) is padded_feat at (cy+dy, cx+dx)
            pixel = padded_feat[cy + dy, cx + dx]
            residual[centres] = pixel - target_flat[tpos + dy * wt + dx]
            grad[dy : dy + h, dx : dx + w] += residual.view(h, w, c)
    return (grad[r : r + h, r : r + w] * grad_scale.to(acc)).contiguous()
