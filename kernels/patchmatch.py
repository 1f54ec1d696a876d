"""PatchMatch sweeps over feature patches: propagation along lines + random search.

The algorithm, its random numbers and its order are those of the torch reference
(``neuralpatch.patchmatch.torch_patchmatch_fwd``): each iteration runs a sweep along the
rows, then one along the columns (backwards on odd iterations). Within a sweep every row
(column) is an independent chain, so one program walks ``BLOCK_L`` lines at once, one
position per step, vectorised over lines and channels; the propagated neighbour is the
previous query of the same line, kept in registers. Patch dot products are computed on the
fly from the channels-last maps.

Patch layout as in ``patch_nn``: element ``(dy*k + dx)*C + c`` of the patch whose top-left is
``pos`` in an ``(H, W, C)`` map is ``map[(pos + dy*W + dx)*C + c]``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from neuralpatch._checks import check_patchmatch_launch
from neuralpatch.patchmatch import SAMPLES_PER_SWEEP, sample_base

__all__ = ["patchmatch_fwd"]


@triton.jit
def _hash_u32(x):
    """lowbias32 on uint32 values held in int64 (products wrap; the low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _score(q_map_ptr, k_map_ptr, k_inv_ptr, q_top, centre, ok, C, Wq_pad, Wk, PATCH_SIZE: tl.constexpr, BLOCK_C: tl.constexpr):
    """<q, k>/|k| for [BLOCK_L] query top-lefts and key centres; -inf where not ok or invalid."""
    safe = tl.where(ok, centre, 0)
    inv = tl.load(k_inv_ptr + safe, mask=ok, other=0.0)
    ok = ok & (inv > 0)
    k_top = tl.where(ok, safe - (PATCH_SIZE // 2) * Wk - PATCH_SIZE // 2, 0)
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros(q_top.shape, dtype=tl.float32)
    for tap in tl.static_range(PATCH_SIZE * PATCH_SIZE):
        dy = tap // PATCH_SIZE
        dx = tap % PATCH_SIZE
        q_row = (q_top + dy * Wq_pad + dx) * C
        k_row = (k_top + dy * Wk + dx) * C
        for c0 in range(0, C, BLOCK_C):
            c_in = (c0 + offs_c) < C
            m = ok[:, None] & c_in[None, :]
            a = tl.load(q_map_ptr + q_row[:, None] + (c0 + offs_c)[None, :], mask=m, other=0.0)
            b = tl.load(k_map_ptr + k_row[:, None] + (c0 + offs_c)[None, :], mask=m, other=0.0)
            acc += tl.sum(a * b, axis=1)
    return tl.where(ok, acc * inv, float("-inf"))


@triton.jit
def _consider(value, centre, best_value, best_centre):
    take = (value > best_value) | ((value == best_value) & (centre < best_centre))
    return tl.where(take, value, best_value), tl.where(take, centre, best_centre)


@triton.jit
def _patchmatch_init_kernel(
    q_map_ptr,  # [Hq+2r, Wq+2r, C] float32 query map, zero-padded by r
    k_map_ptr,  # [Hk, Wk, C] float32 key map
    k_inv_ptr,  # [Hk*Wk] float32 1/|k| at valid keys, 0 elsewhere
    q_center_ptr,  # [Nq] int32 flat y*Wq + x
    field_ptr,  # [Nq] int32 key centres (in: init, valid)
    value_ptr,  # [Nq] float32 out: their scores
    Nq,
    C,
    Wq,
    Wq_pad,
    Wk,
    PATCH_SIZE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    ok = offs < Nq
    qc = tl.load(q_center_ptr + offs, mask=ok, other=0)
    q_top = (qc // Wq) * Wq_pad + qc % Wq
    centre = tl.load(field_ptr + offs, mask=ok, other=0)
    v = _score(q_map_ptr, k_map_ptr, k_inv_ptr, q_top, centre, ok, C, Wq_pad, Wk, PATCH_SIZE, BLOCK_C)
    tl.store(value_ptr + offs, v, mask=ok)


@triton.jit
def _patchmatch_sweep_kernel(
    q_map_ptr,  # [Hq+2r, Wq+2r, C] float32 query map, zero-padded by r
    k_map_ptr,  # [Hk, Wk, C] float32 key map
    k_inv_ptr,  # [Hk*Wk] float32 1/|k| at valid keys, 0 elsewhere
    k_center_ptr,  # [Nk] int32 valid key centres
    q_center_ptr,  # [Nq] int32 flat y*Wq + x
    lines_ptr,  # [n_lines, max_len] int32 query indices of each line in sweep order, -1 padded
    radii_ptr,  # [n_radii] int64 random-search radii
    bases_ptr,  # [n_radii + 1] int64 uint32 stream keys of this sweep's samples
    field_ptr,  # [Nq] int32 key centres, updated in place
    value_ptr,  # [Nq] float32 their scores, updated in place
    n_lines,
    max_len,
    n_radii,
    Nk,
    C,
    Wq,
    Wq_pad,
    Hk,
    Wk,
    DY: tl.constexpr,  # propagation offset of this sweep (one of -1, 0, 1)
    DX: tl.constexpr,
    REVERSE: tl.constexpr,
    PATCH_SIZE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_in = offs_l < n_lines
    prev_centre = tl.full([BLOCK_L], -1, tl.int32)  # centre of the previous query of the line
    prev_field = tl.zeros([BLOCK_L], dtype=tl.int32)
    for j in range(0, max_len):
        if REVERSE:
            jj = max_len - 1 - j
        else:
            jj = j
        q = tl.load(lines_ptr + offs_l * max_len + jj, mask=l_in, other=-1)
        active = q >= 0
        qs = tl.where(active, q, 0)
        qc = tl.load(q_center_ptr + qs, mask=active, other=0)
        y = qc // Wq
        x = qc % Wq
        q_top = y * Wq_pad + x
        best_v = tl.load(value_ptr + qs, mask=active, other=float("-inf"))
        best_c = tl.load(field_ptr + qs, mask=active, other=0)
        # 1. propagation from the neighbour one step back: the previous query of the line, if adjacent
        adjacent = active & (prev_centre == (y - DY) * Wq + (x - DX))
        cy = prev_field // Wk + DY
        cx = prev_field % Wk + DX
        ok = adjacent & (cy >= 0) & (cy < Hk) & (cx >= 0) & (cx < Wk)
        cand = cy * Wk + cx
        v = _score(q_map_ptr, k_map_ptr, k_inv_ptr, q_top, cand, ok, C, Wq_pad, Wk, PATCH_SIZE, BLOCK_C)
        best_v, best_c = _consider(v, cand, best_v, best_c)
        # 2. random search around that best, then one key drawn from the whole list
        by = best_c // Wk
        bx = best_c % Wk
        q64 = qs.to(tl.int64)
        for s in range(0, n_radii):
            radius = tl.load(radii_ptr + s)
            h = _hash_u32(q64 ^ tl.load(bases_ptr + s))
            span = 2 * radius + 1
            u = (h % span - radius).to(tl.int32)
            w = (_hash_u32(h) % span - radius).to(tl.int32)
            sy = tl.minimum(tl.maximum(by + u, 0), Hk - 1)
            sx = tl.minimum(tl.maximum(bx + w, 0), Wk - 1)
            cand = sy * Wk + sx
            v = _score(q_map_ptr, k_map_ptr, k_inv_ptr, q_top, cand, active, C, Wq_pad, Wk, PATCH_SIZE, BLOCK_C)
            best_v, best_c = _consider(v, cand, best_v, best_c)
        h = _hash_u32(q64 ^ tl.load(bases_ptr + n_radii))
        cand = tl.load(k_center_ptr + (h % Nk).to(tl.int32), mask=active, other=0)
        v = _score(q_map_ptr, k_map_ptr, k_inv_ptr, q_top, cand, active, C, Wq_pad, Wk, PATCH_SIZE, BLOCK_C)
        best_v, best_c = _consider(v, cand, best_v, best_c)
        tl.store(field_ptr + qs, best_c, mask=active)
        tl.store(value_ptr + qs, best_v, mask=active)
        prev_centre = tl.where(active, qc, prev_centre)
        prev_field = tl.where(active, best_c, prev_field)


# ----------------------------------------------------------------------------- launchers

# Interpreter: small blocks keep the CPU tests fast. GPU: 32 lines x 64 channels per step,
# a [32, 64] tile per load (untuned: no GPU was available when this was written).
_INTERP_BLOCKS = {"BLOCK_L": 16, "BLOCK_C": 16}
_CUDA_BLOCKS = {"BLOCK_L": 32, "BLOCK_C": 64}


def _lines(query_center: torch.Tensor, height: int, width: int, columns: bool) -> torch.Tensor:
    """[n_lines, max_len] int32 query indices per row (columns=False) or column, in ascending
    order along the line, padded with -1."""
    qc = query_center.to(torch.int64)
    line = qc % width if columns else qc // width
    along = qc // width if columns else qc % width
    n_lines = width if columns else height
    order = torch.argsort(line * (height + width) + along)
    counts = torch.bincount(line, minlength=n_lines)
    max_len = max(int(counts.max()), 1)
    starts = torch.cumsum(counts, 0) - counts
    sorted_line = line[order]
    slot = torch.arange(qc.numel(), device=qc.device) - starts[sorted_line]
    out = torch.full((n_lines, max_len), -1, dtype=torch.int32, device=qc.device)
    out[sorted_line, slot] = order.to(torch.int32)
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def patchmatch_fwd(
    query_map: torch.Tensor,
    key_map: torch.Tensor,
    query_center: torch.Tensor,
    query_slot: torch.Tensor,
    key_center: torch.Tensor,
    key_inv_norm: torch.Tensor,
    init_field: torch.Tensor,
    patch_size: int,
    iterations: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchMatch field for every query patch.

    Args:
        query_map: ``(Hq+2r, Wq+2r, C)`` float32 channels-last, zero-padded by ``r = k//2``.
        key_map: ``(Hk, Wk, C)`` float32 channels-last.
        query_center: ``(Nq,)`` int32 flat ``y*Wq + x`` of each query, row-major order.
        query_slot: ``(Hq, Wq)`` int32 query index at each position, -1 elsewhere.
        key_center: ``(Nk,)`` int32 flat centres of the valid keys, Nk >= 1.
        key_inv_norm: ``(Hk, Wk)`` float32 ``1/|k|`` at valid keys, 0 elsewhere.
        init_field: ``(Nq,)`` int32 valid key centres to start from.
        patch_size: odd ``k``; iterations: >= 0; seed: uint32.

    Returns:
        ``field`` int32 ``(Nq,)``: key centres, and ``value`` float32 ``(Nq,)``: ``<q,k>/|k|``.

    Raises:
        TypeError / ValueError: wrong dtypes, shapes, devices or contiguity.
    """
    inputs = dict(
        query_map=query_map, query_center=query_center, query_slot=query_slot, key_map=key_map,
        key_center=key_center, key_inv_norm=key_inv_norm, init_field=init_field,
    )  # fmt: skip
    check_patchmatch_launch(inputs, patch_size, max_numel=2**31 - 4096)
    device = query_map.device
    for name, t in (("key_map", key_map), ("query_center", query_center), ("query_slot", query_slot),
                    ("key_center", key_center), ("key_inv_norm", key_inv_norm), ("init_field", init_field)):  # fmt: skip
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but query_map is on {device}")
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"query_map is on {device}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    hq, wq = query_slot.shape
    hk, wk, c = key_map.shape
    r = patch_size // 2
    if tuple(query_map.shape) != (hq + 2 * r, wq + 2 * r, c):
        raise ValueError(f"query_map must have shape {(hq + 2 * r, wq + 2 * r, c)}, got {tuple(query_map.shape)}")
    if tuple(key_inv_norm.shape) != (hk, wk):
        raise ValueError(f"key_inv_norm must have shape {(hk, wk)}, got {tuple(key_inv_norm.shape)}")
    nq, nk = query_center.numel(), key_center.numel()
    if init_field.numel() != nq:
        raise ValueError(f"init_field has {init_field.numel()} entries but query_center has {nq}")
    if nk < 1:
        raise ValueError("key_center is empty; there must be at least one key")
    field = init_field.clone()
    value = torch.empty(nq, dtype=torch.float32, device=device)
    if nq == 0:
        return field, value
    blocks = _INTERP_BLOCKS if _interpreting() else _CUDA_BLOCKS
    inv = key_inv_norm.reshape(-1)
    wq_pad = wq + 2 * r
    guard = torch.cuda.device(device) if device.type == "cuda" else _nullcontext()
    with guard:
        _patchmatch_init_kernel[(triton.cdiv(nq, blocks["BLOCK_L"]),)](
            query_map, key_map, inv, query_center, field, value, nq, c, wq, wq_pad, wk,
            PATCH_SIZE=patch_size, **blocks,
        )  # fmt: skip
        if iterations == 0:
            return field, value
        radii, radius = [], max(hk, wk)
        while radius >= 1:
            radii.append(radius)
            radius //= 2
        radii_t = torch.tensor(radii, dtype=torch.int64, device=device)
        lines = [_lines(query_center, hq, wq, columns=False), _lines(query_center, hq, wq, columns=True)]
        for t in range(iterations):
            reverse = t % 2 == 1
            for sweep in (0, 1):
                dy, dx = (1, 0) if sweep == 1 else (0, 1)
                if reverse:
                    dy, dx = -dy, -dx
                first = sweep * SAMPLES_PER_SWEEP
                bases = torch.tensor([sample_base(seed, t, first + s) for s in range(len(radii) + 1)], dtype=torch.int64, device=device)
                line = lines[sweep]
                _patchmatch_sweep_kernel[(triton.cdiv(line.shape[0], blocks["BLOCK_L"]),)](
                    query_map, key_map, inv, key_center, query_center, line, radii_t, bases, field, value,
                    line.shape[0], line.shape[1], len(radii), nk, c, wq, wq_pad, hk, wk,
                    DY=dy, DX=dx, REVERSE=reverse, PATCH_SIZE=patch_size, **blocks,
                )  # fmt: skip
    return field, value


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
