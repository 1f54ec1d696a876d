"""Tensor launchers for the CUDA backend (``neuralpatch._C``), same signatures as the Triton ones.

Each launcher checks its tensors (CUDA, same device, dtype, shape, contiguity; ``TypeError`` or
``ValueError`` naming the argument), allocates the outputs and launches on the current stream of
the inputs' device. ``neuralpatch._C`` is imported lazily, so this module imports without it.
Launches are asynchronous; no launcher synchronises the device.
"""

from __future__ import annotations

import torch

from neuralpatch._checks import check_launch_tensor, check_patch_size

__all__ = ["available", "patch_nn_fwd", "patch_loss_fwd", "patch_loss_bwd"]

_NOT_BUILT = "neuralpatch._C was not built: reinstall with nvcc on PATH"
_NO_GPU = "no CUDA GPU is visible"
_MAP_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_PRECISIONS = ("fp32", "tf32", "bf16")


def _lib():
    try:
        from neuralpatch import _C
    except ImportError as exc:
        raise RuntimeError(_NOT_BUILT) from exc
    return _C


def available() -> tuple[bool, str]:
    """(True, "") when neuralpatch._C imports and a CUDA GPU is visible, else (False, reason)."""
    try:
        from neuralpatch import _C
    except ImportError:
        return False, _NOT_BUILT
    if _C.device_count() == 0:
        return False, _NO_GPU
    if not torch.cuda.is_available():
        return False, f"{_NO_GPU} to torch (torch {torch.__version__} has no CUDA support or sees no GPU)"
    return True, ""


def _check_tensor(name, t, *, dtypes, ndim, device=None):
    """Checks one input tensor; returns its device."""
    found = check_launch_tensor(name, t, ndim=ndim, dtypes=dtypes, device_type="cuda")
    if device is not None and found != device:
        raise ValueError(f"{name}: must be on {device} like the other inputs, got {found}")
    return found


def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def patch_nn_fwd(query_map, key_map, query_pos, key_pos, key_inv_norm, patch_size, precision):
    """Best key per query patch.

    query_map:    (Hq, Wq, C) float32 | bfloat16, zero-padded so every query patch is inside
    key_map:      (Hk, Wk, C) same dtype
    query_pos:    (Nq,) int32 flat top-left index into query_map
    key_pos:      (Nk,) int32 flat top-left index into key_map, Nk >= 1
    key_inv_norm: (Nk,) float32 1/|k_j|, finite and > 0
    patch_size:   odd int k; a patch is d = (dy*k + dx)*C + c
    precision:    "fp32" | "tf32" (float32 maps) or "bf16" (bfloat16 maps)
    Returns (best_index int32 (Nq,) into the key list, best_value float32 (Nq,)) where
    best_index = argmax_j <q, k_j> * key_inv_norm[j], ties to the lowest j.
    """
    check_patch_size(patch_size)
    if precision not in _PRECISIONS:
        raise ValueError(f"precision: must be one of {_PRECISIONS}, got {precision!r}")
    device = _check_tensor("query_map", query_map, dtypes=tuple(_MAP_DTYPES), ndim=3)
    _check_tensor("key_map", key_map, dtypes=(query_map.dtype,), ndim=3, device=device)
    _check_tensor("query_pos", query_pos, dtypes=(torch.int32,), ndim=1, device=device)
    _check_tensor("key_pos", key_pos, dtypes=(torch.int32,), ndim=1, device=device)
    _check_tensor("key_inv_norm", key_inv_norm, dtypes=(torch.float32,), ndim=1, device=device)
    if (precision == "bf16") != (query_map.dtype == torch.bfloat16):
        raise ValueError(
            f"precision: {precision!r} does not match {query_map.dtype} maps ('fp32'/'tf32' need float32, 'bf16' needs bfloat16)"
        )
    hq, wq, c = query_map.shape
    hk, wk, ck = key_map.shape
    if ck != c:
        raise ValueError(f"key_map: has {ck} channels, query_map has {c}")
    if c < 1:
        raise ValueError("query_map: needs at least one channel")
    nq, nk = query_pos.numel(), key_pos.numel()
    if key_inv_norm.numel() != nk:
        raise ValueError(f"key_inv_norm: has {key_inv_norm.numel()} entries, key_pos has {nk}")
    if nk < 1:
        raise ValueError("key_pos: needs at least one key")
    for name, h, w in (("query_map", hq, wq), ("key_map", hk, wk)):
        if h < patch_size or w < patch_size:
            raise ValueError(f"{name}: {h}x{w} map is smaller than the {patch_size}x{patch_size} patch")

    best_index = torch.empty(nq, dtype=torch.int32, device=device)
    best_value = torch.empty(nq, dtype=torch.float32, device=device)
    if nq == 0:
        return best_index, best_value
    lib = _lib()
    with torch.cuda.device(device):
        lib.patch_nn_fwd(
            query_map.data_ptr(),
            key_map.data_ptr(),
            query_pos.data_ptr(),
            key_pos.data_ptr(),
            key_inv_norm.data_ptr(),
            best_index.data_ptr(),
            best_value.data_ptr(),
            nq,
            nk,
            c,
            patch_size,
            hq,
            wq,
            hk,
            wk,
            _MAP_DTYPES[query_map.dtype],
            precision,
            _stream(device),
        )
    return best_index, best_value


def patch_loss_fwd(feat_map, target_map, query_center, target_pos, patch_size):
    """Per-query squared L2 between query patches and their matched target patches.

    feat_map:     (H, W, C) float32 | bfloat16, not padded
    target_map:   (Ht, Wt, C) same dtype
    query_center: (Nq,) int32 flat centre y*W + x in feat_map
    target_pos:   (Nq,) int32 flat top-left in target_map (patch fully inside)
    Returns per_query float32 (Nq,): offsets whose feat pixel leaves the map are skipped.
    """
    check_patch_size(patch_size)
    device = _check_tensor("feat_map", feat_map, dtypes=tuple(_MAP_DTYPES), ndim=3)
    _check_tensor("target_map", target_map, dtypes=(feat_map.dtype,), ndim=3, device=device)
    _check_tensor("query_center", query_center, dtypes=(torch.int32,), ndim=1, device=device)
    _check_tensor("target_pos", target_pos, dtypes=(torch.int32,), ndim=1, device=device)
    h, w, c = feat_map.shape
    ht, wt, ct = target_map.shape
    if ct != c:
        raise ValueError(f"target_map: has {ct} channels, feat_map has {c}")
    if h < 1 or w < 1 or c < 1:
        raise ValueError(f"feat_map: empty map of shape {tuple(feat_map.shape)}")
    if ht < patch_size or wt < patch_size:
        raise ValueError(f"target_map: {ht}x{wt} map is smaller than the {patch_size}x{patch_size} patch")
    nq = query_center.numel()
    if target_pos.numel() != nq:
        raise ValueError(f"target_pos: has {target_pos.numel()} entries, query_center has {nq}")

    per_query = torch.empty(nq, dtype=torch.float32, device=device)
    if nq == 0:
        return per_query
    lib = _lib()
    with torch.cuda.device(device):
        lib.patch_loss_fwd(
            feat_map.data_ptr(),
            target_map.data_ptr(),
            query_center.data_ptr(),
            target_pos.data_ptr(),
            per_query.data_ptr(),
            nq,
            c,
            patch_size,
            h,
            w,
            ht,
            wt,
            _MAP_DTYPES[feat_map.dtype],
            _stream(device),
        )
    return per_query


def patch_loss_bwd(feat_map, target_map, query_slot, target_pos, grad_scale, patch_size):
    """Gradient of the summed patch loss, scaled, folded back onto the map (no atomics).

    feat_map:   (H, W, C) float32 | bfloat16
    target_map: (Ht, Wt, C) same dtype
    query_slot: (H, W) int32: index q of the query centred at that pixel, or -1
    target_pos: (Nq,) int32 flat top-left in target_map
    grad_scale: float32 tensor with one element on the same device (e.g. 2 * grad_out / Nq);
                a Python number is also accepted
    Returns grad_map float32 (H, W, C) = grad_scale * sum over covering queries of (feat - target).
    """
    check_patch_size(patch_size)
    device = _check_tensor("feat_map", feat_map, dtypes=tuple(_MAP_DTYPES), ndim=3)
    _check_tensor("target_map", target_map, dtypes=(feat_map.dtype,), ndim=3, device=device)
    _check_tensor("query_slot", query_slot, dtypes=(torch.int32,), ndim=2, device=device)
    _check_tensor("target_pos", target_pos, dtypes=(torch.int32,), ndim=1, device=device)
    if isinstance(grad_scale, (int, float)) and not isinstance(grad_scale, bool):
        grad_scale = torch.full((1,), float(grad_scale), dtype=torch.float32, device=device)
    if not isinstance(grad_scale, torch.Tensor):
        raise TypeError(f"grad_scale: expected a float32 tensor or a number, got {type(grad_scale).__name__}")
    if grad_scale.dtype != torch.float32:
        raise TypeError(f"grad_scale: dtype must be torch.float32, got {grad_scale.dtype}")
    if grad_scale.device != device:
        raise ValueError(f"grad_scale: must be on {device} like the other inputs, got {grad_scale.device}")
    if grad_scale.numel() != 1:
        raise ValueError(f"grad_scale: must hold exactly one element, got shape {tuple(grad_scale.shape)}")
    h, w, c = feat_map.shape
    ht, wt, ct = target_map.shape
    if ct != c:
        raise ValueError(f"target_map: has {ct} channels, feat_map has {c}")
    if tuple(query_slot.shape) != (h, w):
        raise ValueError(f"query_slot: shape {tuple(query_slot.shape)} does not match feat_map's {(h, w)}")
    if h < 1 or w < 1 or c < 1:
        raise ValueError(f"feat_map: empty map of shape {tuple(feat_map.shape)}")
    if ht < patch_size or wt < patch_size:
        raise ValueError(f"target_map: {ht}x{wt} map is smaller than the {patch_size}x{patch_size} patch")
    nq = target_pos.numel()

    if nq == 0:  # no query can cover any pixel
        return torch.zeros(h, w, c, dtype=torch.float32, device=device)
    grad_map = torch.empty(h, w, c, dtype=torch.float32, device=device)
    lib = _lib()
    with torch.cuda.device(device):
        lib.patch_loss_bwd(
            feat_map.data_ptr(),
            target_map.data_ptr(),
            query_slot.data_ptr(),
            target_pos.data_ptr(),
            grad_scale.data_ptr(),
            grad_map.data_ptr(),
            nq,
            c,
            patch_size,
            h,
            w,
            ht,
            wt,
            _MAP_DTYPES[feat_map.dtype],
            _stream(device),
        )
    return grad_map
