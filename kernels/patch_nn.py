"""Fused patch nearest-neighbour search: implicit-im2col GEMM + online argmax.

For every query patch ``q`` the kernel finds ``argmax_j <q, k_j> * inv_norm[j]`` over a
list of key patches, reading both straight from channels-last feature maps through
position lists, so that no ``Nq x D``, ``Nk x D`` or ``Nq x Nk`` buffer ever exists.

Patch layout: a patch of size ``k`` whose top-left corner has flat index ``pos`` in a
channels-last ``(H, W, C)`` map is the vector of ``map[(pos + dy*W + dx)*C + c]`` for
``dy, dx`` in ``[0, k)`` and ``c`` in ``[0, C)``, element ``(dy*k + dx)*C + c``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from neuralpatch._checks import check_launch_tensor, check_patch_size

__all__ = ["patch_nn_fwd"]

# Offsets are int32; the margin covers masked lanes of the last channel chunk.
_MAX_NUMEL = 2**31 - 4096


@triton.heuristics({"EVEN_C": lambda args: args["C"] % args["BLOCK_C"] == 0})
@triton.jit(do_not_specialize=["Nq", "Nk", "Q_CLASS", "K_CLASS"])
def _patch_nn_fwd_kernel(
    q_map_ptr,  # [Hq*Wq*C] query feature map, channels-last (float32 or bfloat16)
    k_map_ptr,  # [Hk*Wk*C] key feature map, channels-last, same dtype
    q_pos_ptr,  # [Nq] int32 query top-left positions y*Wq + x
    k_pos_ptr,  # [Nk] int32 key top-left positions y*Wk + x
    k_inv_norm_ptr,  # [Nk] float32 1/|k_j|
    out_val_ptr,  # [S, Nq] float32 best score per (key split, query)
    out_idx_ptr,  # [S, Nq] int32 best key-list index per (key split, query)
    Nq,
    Nk,
    C,
    Wq,
    Wk,
    keys_per_split,  # keys scanned by one program along grid axis 1
    Q_CLASS,  # autotune key only: size class of Nq
    K_CLASS,  # autotune key only: size class of keys_per_split
    PATCH_SIZE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)

    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_in = offs_q < Nq
    # Rows past Nq re-read the last query, so the hot loop needs no row mask;
    # their results are dropped at the store.
    q_pos = tl.load(q_pos_ptr + tl.minimum(offs_q, Nq - 1))
    q_row = q_pos * C  # map size < 2**31 is checked by the launcher
    offs_c = tl.arange(0, BLOCK_C)

    k_begin = pid_s * keys_per_split
    k_end = tl.minimum(k_begin + keys_per_split, Nk)

    n_c = tl.cdiv(C, BLOCK_C)
    n_steps = PATCH_SIZE * PATCH_SIZE * n_c

    best_val = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_Q], dtype=tl.int32)

    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < k_end
        # Same trick for keys: columns past k_end repeat the last key and are masked to -inf.
        k_pos = tl.load(k_pos_ptr + tl.minimum(offs_k, k_end - 1))
        k_row = k_pos * C

        acc = tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32)
        # One flat loop over (tap, channel chunk) so the software pipeliner sees a single
        # long loop of k*k*ceil(C/BLOCK_C) steps instead of k*k short ones.
        for step in range(0, n_steps):
            tap = step // n_c
            c0 = (step - tap * n_c) * BLOCK_C
            dy = tap // PATCH_SIZE
            dx = tap - dy * PATCH_SIZE
            q_ptrs = q_map_ptr + (q_row + ((dy * Wq + dx) * C + c0))[:, None] + offs_c[None, :]
            k_ptrs = k_map_ptr + (k_row + ((dy * Wk + dx) * C + c0))[None, :] + offs_c[:, None]
            if EVEN_C:
                a = tl.load(q_ptrs)  # [BLOCK_Q, BLOCK_C]
                b = tl.load(k_ptrs)  # [BLOCK_C, BLOCK_K]
            else:
                c_in = (c0 + offs_c) < C
                a = tl.load(q_ptrs, mask=c_in[None, :], other=0.0)
                b = tl.load(k_ptrs, mask=c_in[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

        inv = tl.load(k_inv_norm_ptr + offs_k, mask=k_in, other=0.0)
        score = acc * inv[None, :]
        score = tl.where(k_in[None, :], score, float("-inf"))
        tile_max = tl.max(score, axis=1)
        # lowest key index among the tile's equal maxima
        tile_idx = tl.min(tl.where(score == tile_max[:, None], offs_k[None, :], 2147483647), axis=1)
        # strict '>' so an earlier tile keeps a tie
        better = tile_max > best_val
        best_val = tl.where(better, tile_max, best_val)
        best_idx = tl.where(better, tile_idx, best_idx)

    out = pid_s * Nq + offs_q
    tl.store(out_val_ptr + out, best_val, mask=q_in)
    tl.store(out_idx_ptr + out, best_idx, mask=q_in)


# ----------------------------------------------------------------------------- launchers

_PRECISIONS = {
    # precision -> (map dtype, tl.dot input_precision)
    "fp32": (torch.float32, "ieee"),
    "tf32": (torch.float32, "tf32"),
    # bf16 operands go to the tensor cores whatever input_precision says; "ieee" only
    # states that nothing is rounded beyond the inputs.
    "bf16": (torch.bfloat16, "ieee"),
}

# Every CUDA config uses BLOCK_Q = 128 (one or two wgmma warpgroups along M), which lets
# the launcher size the key split for the grid before the autotuner picks a config.
_CUDA_BLOCK_Q = 128
# Keys per split are a multiple of the largest BLOCK_K, so no config sees a ragged tile
# except the last one.
_MAX_BLOCK_K = 256
# Each split scans at least 4 tiles of 256 keys, so the pipeline prologue per tile and
# the cross-split merge stay small next to the GEMM.
_MIN_KEYS_PER_SPLIT = 1024
_MAX_SPLITS = 32
# H100: 228 KiB shared memory per SM, 227 KiB per block; leave room for the epilogue.
_SMEM_BUDGET = 200 * 1024

# Interpreter: the smallest tile tl.dot accepts, so the CPU tests stay fast.
_INTERP_BLOCKS = {"BLOCK_Q": 16, "BLOCK_K": 16, "BLOCK_C": 16}


def _patch_nn_configs():
    """Hopper-suited tiles: 128 x {128, 256} score tiles, 32/64 channels per step."""
    configs = []
    for block_k in (128, 256):
        for block_c in (32, 64):
            for num_warps in (4, 8):
                for num_stages in (3, 4):
                    if block_k == 256 and num_warps == 4:
                        # a 128x256 fp32 accumulator is 256 registers per thread at 4 warps
                        continue
                    configs.append(
                        triton.Config(
                            {"BLOCK_Q": _CUDA_BLOCK_Q, "BLOCK_K": block_k, "BLOCK_C": block_c},
                            num_warps=num_warps,
                            num_stages=num_stages,
                        )
                    )
    return configs


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose pipelined operand tiles exceed the shared-memory budget."""
    elem = named_args["q_map_ptr"].element_size()
    kept = [
        cfg
        for cfg in configs
        if cfg.num_stages * (cfg.kwargs["BLOCK_Q"] + cfg.kwargs["BLOCK_K"]) * cfg.kwargs["BLOCK_C"] * elem <= _SMEM_BUDGET
    ]
    return kept or configs[:1]


_patch_nn_fwd_autotuned = triton.autotune(
    configs=_patch_nn_configs(),
    key=["C", "PATCH_SIZE", "INPUT_PRECISION", "Q_CLASS", "K_CLASS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_patch_nn_fwd_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _size_class(n: int) -> int:
    """Power-of-two bucket of ``n``: the autotuner retunes per bucket, not per size."""
    return max(int(n), 1).bit_length()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _auto_key_splits(n_q_blocks: int, nk: int, sm_count: int) -> int:
    """Split the key list across programs when the query blocks alone leave SMs idle.

    Returns the smallest split count whose grid fills its last wave (one 128-row program
    per SM) to 90 %, or the best-filling one if none does.
    """
    max_splits = max(1, min(_MAX_SPLITS, nk // _MIN_KEYS_PER_SPLIT))
    best, best_fill = 1, 0.0
    for s in range(1, max_splits + 1):
        programs = n_q_blocks * s
        fill = programs / (triton.cdiv(programs, sm_count) * sm_count)
        if fill >= 0.9:
            return s
        if fill > best_fill:
            best, best_fill = s, fill
    return best


def _check_tensor(name, t, ndim, dtypes):
    check_launch_tensor(name, t, ndim=ndim, dtypes=dtypes, max_numel=_MAX_NUMEL)


def _check_devices(**tensors):
    """All tensors on one device, which must be CUDA unless the interpreter runs."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; all inputs must share a device")
    if first.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"{first_name} is on {first.device}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported)"
        )


def _check_map_fits(name, m, patch_size):
    if m.shape[0] < patch_size or m.shape[1] < patch_size:
        raise ValueError(f"{name} of shape {tuple(m.shape)} is smaller than one {patch_size}x{patch_size} patch")


def patch_nn_fwd(
    query_map: torch.Tensor,
    key_map: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_inv_norm: torch.Tensor,
    patch_size: int,
    precision: str,
    *,
    key_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best key for every query patch.

    Args:
        query_map: ``(Hq, Wq, C)`` contiguous channels-last, float32 or bfloat16, already
            padded so that every query patch is inside it.
        key_map: ``(Hk, Wk, C)`` contiguous, same dtype as ``query_map``.
        query_pos: ``(Nq,)`` int32 flat top-left index ``y*Wq + x`` of each query patch.
        key_pos: ``(Nk,)`` int32 flat top-left index ``y*Wk + x`` of each key patch, Nk >= 1.
        key_inv_norm: ``(Nk,)`` float32 ``1/|k_j|``, finite and > 0.
        patch_size: odd int ``k >= 1``.
        precision: ``"fp32"`` (exact), ``"tf32"`` (float32 maps, TF32 tensor cores) or
            ``"bf16"`` (bfloat16 maps); products are always accumulated in float32.
        key_splits: number of programs the key list is split across per query block;
            ``None`` picks it from the SM count (1 under the interpreter).

    Returns:
        ``best_index`` int32 ``(Nq,)``: the key-list index ``j`` maximising
        ``<q, k_j> * key_inv_norm[j]``, the lowest ``j`` on ties; and ``best_value``
        float32 ``(Nq,)``: that maximum.

    Positions are not bounds-checked (that would need a host sync); out-of-range
    positions read out of bounds.

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices, contiguity, or a precision that does not
            match the map dtype.
    """
    _check_tensor("query_map", query_map, 3, (torch.float32, torch.bfloat16))
    _check_tensor("key_map", key_map, 3, (torch.float32, torch.bfloat16))
    _check_tensor("query_pos", query_pos, 1, (torch.int32,))
    _check_tensor("key_pos", key_pos, 1, (torch.int32,))
    _check_tensor("key_inv_norm", key_inv_norm, 1, (torch.float32,))
    check_patch_size(patch_size)
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    map_dtype, input_precision = _PRECISIONS[precision]
    if query_map.dtype != map_dtype:
        raise ValueError(
            f"precision {precision!r} needs {str(map_dtype).replace('torch.', '')} maps, "
            f"but query_map is {str(query_map.dtype).replace('torch.', '')}"
        )
    if key_map.dtype != query_map.dtype:
        raise ValueError(f"key_map dtype {key_map.dtype} differs from query_map dtype {query_map.dtype}")
    if key_map.shape[2] != query_map.shape[2]:
        raise ValueError(f"key_map has {key_map.shape[2]} channels but query_map has {query_map.shape[2]}")
    if query_map.shape[2] < 1:
        raise ValueError("query_map must have at least one channel")
    nk = key_pos.shape[0]
    if nk == 0:
        raise ValueError("key_pos is empty; there must be at least one key")
    if key_inv_norm.shape[0] != nk:
        raise ValueError(f"key_inv_norm has {key_inv_norm.shape[0]} entries but key_pos has {nk}")
    _check_map_fits("query_map", query_map, patch_size)
    _check_map_fits("key_map", key_map, patch_size)
    if key_splits is not None and (isinstance(key_splits, bool) or not isinstance(key_splits, int) or key_splits < 1):
        raise ValueError(f"key_splits must be None or an int >= 1, got {key_splits!r}")
    _check_devices(query_map=query_map, key_map=key_map, query_pos=query_pos, key_pos=key_pos, key_inv_norm=key_inv_norm)

    device = query_map.device
    nq = query_pos.shape[0]
    if nq == 0:
        return (
            torch.empty(0, dtype=torch.int32, device=device),
            torch.empty(0, dtype=torch.float32, device=device),
        )
    c = query_map.shape[2]
    wq, wk = query_map.shape[1], key_map.shape[1]

    interpret = _interpreting()
    tile_k = _INTERP_BLOCKS["BLOCK_K"] if interpret else _MAX_BLOCK_K
    if key_splits is None:
        if interpret or device.type != "cuda":
            key_splits = 1
        else:
            n_q_blocks = triton.cdiv(nq, _CUDA_BLOCK_Q)
            key_splits = _auto_key_splits(n_q_blocks, nk, _sm_count(device.index or 0))
    keys_per_split = triton.cdiv(triton.cdiv(nk, key_splits), tile_k) * tile_k
    n_split = triton.cdiv(nk, keys_per_split)

    out_val = torch.empty((n_split, nq), dtype=torch.float32, device=device)
    out_idx = torch.empty((n_split, nq), dtype=torch.int32, device=device)
    args = (
        query_map, key_map, query_pos, key_pos, key_inv_norm, out_val, out_idx,
        nq, nk, c, wq, wk, keys_per_split, _size_class(nq), _size_class(keys_per_split),
    )  # fmt: skip
    if interpret:
        grid = (triton.cdiv(nq, _INTERP_BLOCKS["BLOCK_Q"]), n_split)
        _patch_nn_fwd_kernel[grid](*args, PATCH_SIZE=patch_size, INPUT_PRECISION=input_precision, **_INTERP_BLOCKS)
    else:

        def grid(meta):
            return (triton.cdiv(nq, meta["BLOCK_Q"]), n_split)

        with torch.cuda.device(device):
            _patch_nn_fwd_autotuned[grid](*args, PATCH_SIZE=patch_size, INPUT_PRECISION=input_precision)

    if n_split == 1:
        return out_idx[0], out_val[0]
    # Splits cover increasing key ranges, so the first split reaching the maximum holds
    # the lowest key index (torch.argmax returns the first maximal entry).
    best_value = out_val.amax(dim=0)
    first = (out_val == best_value).to(torch.int32).argmax(dim=0)
    best_index = out_idx.gather(0, first[None]).squeeze(0)
    return best_index, best_value
