"""The patch nearest-neighbour op and the patch loss built on it.

Public entry points (the contract: docs/architecture.md, "The op contract"):

- :func:`patch_nn`: for every query patch, the key patch of highest normalised
  cross-correlation (NCC), searched exactly and in chunks (``method="exact"``), or
  approximately by PatchMatch (``method="patchmatch"``, see :mod:`neuralpatch.patchmatch`).
- :func:`patch_loss`: mean squared distance of query patches to their matched
  patches; differentiable in the query map.

Both are ``torch.library`` custom ops (``torch.ops.neuralpatch.patch_nn``,
``torch.ops.neuralpatch.patchmatch`` and ``torch.ops.neuralpatch.patch_loss``) with fake and
autograd registrations, so
``torch.compile`` and ``torch.library.opcheck`` work.

Every backend receives the same normalised problem (see :func:`_search_problem`):
channels-last maps, int32 top-left positions of the patches, and ``1/|k|`` of
each key. A patch is read in the order ``(dy*k + dx)*C + c``. Backends return the
best position in the *key list* and ``max <q,k>/|k|``; this module turns that
into the flat key position and the NCC.

Errors: ``TypeError`` for wrong dtypes, ``ValueError`` for wrong shapes, values
or arguments (every message names the argument), and
:class:`BackendUnavailableError` when an explicitly requested backend cannot run.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from neuralpatch import _torch
from neuralpatch._checks import check_patch_size
from neuralpatch.geometry import interior

__all__ = [
    "BACKENDS",
    "METHODS",
    "PRECISIONS",
    "DEFAULT_CHUNK_BYTES",
    "BackendUnavailableError",
    "available_backends",
    "resolve_backend",
    "patch_nn",
    "patch_loss",
]

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")
METHODS = ("exact", "patchmatch")
LOSS_BACKENDS = ("auto", "torch", "triton", "cuda")  # "cpp" serves the PatchMatch search only
PRECISIONS = ("fp32", "tf32", "bf16")
# 1 GiB: big enough that a 16k x 16k problem runs in a handful of GEMMs,
# small enough to leave room for VGG activations on any GPU.
DEFAULT_CHUNK_BYTES = 1 << 30
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8)


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range around a long stage, visible in Nsight; free when CUDA is not in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says what is missing."""


# --------------------------------------------------------------------------- #
# backends
# --------------------------------------------------------------------------- #


def _triton_status(device: torch.device) -> tuple[bool, str]:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "backend='triton' needs a CUDA device (or TRITON_INTERPRET=1, for testing on the CPU)"
    if device.type not in ("cpu", "cuda"):
        return False, f"backend='triton' does not run on {device.type} tensors"
    try:
        import triton  # noqa: F401

        from neuralpatch.kernels import patch_loss as _loss  # noqa: F401
        from neuralpatch.kernels import patch_nn as _nn  # noqa: F401
    except ImportError as exc:
        return False, f"backend='triton' needs the triton package ({exc}); install it with `pip install triton`"
    return True, ""


def _cuda_status(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"backend='cuda' needs CUDA tensors, got {device.type} tensors"
    try:
        from neuralpatch import _cuda
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        return False, f"backend='cuda' is missing its launcher module ({exc})"
    return _cuda.available()


def _cpp_status(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"backend='cpp' needs CPU tensors, got {device.type} tensors"
    from neuralpatch.patchmatch import cpu_available

    ok, reason = cpu_available()
    return ok, "" if ok else f"backend='cpp': {reason}"


_CPP_ONLY = "backend='cpp' (neuralpatch._cpu) implements patch_nn(method='patchmatch') only; use 'auto' or 'torch'"


def available_backends(device: torch.device | str) -> dict[str, tuple[bool, str]]:
    """For each concrete backend, ``(usable, reason_if_not)`` on ``device``. "cpp" serves
    ``method="patchmatch"`` only; "cuda" serves ``method="exact"`` and the loss only."""
    device = torch.device(device)
    return {
        "torch": (True, ""),
        "triton": _triton_status(device),
        "cuda": _cuda_status(device),
        "cpp": _cpp_status(device),
    }


# Measured preference order of the fused backends on CUDA, per precision; "auto"
# takes the first one available. The torch backend is the fallback everywhere.
AUTO_ORDER_CUDA = {"fp32": ("cuda", "triton"), "tf32": ("triton", "cuda"), "bf16": ("triton", "cuda")}


def resolve_backend(backend: str, device: torch.device, precision: str = "tf32") -> str:
    """The concrete backend for ``backend`` on ``device``; "auto" falls back quietly,
    an explicit backend that cannot run raises :class:`BackendUnavailableError`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "cpp":
        raise BackendUnavailableError(_CPP_ONLY)
    if backend == "auto":
        if device.type == "cuda":
            for candidate in AUTO_ORDER_CUDA[precision]:
                status = _cuda_status if candidate == "cuda" else _triton_status
                if status(device)[0]:
                    return candidate
        return "torch"
    ok, reason = (_cuda_status if backend == "cuda" else _triton_status)(device)
    if not ok:
        raise BackendUnavailableError(reason)
    return backend


def resolve_patchmatch_backend(backend: str, device: torch.device) -> str:
    """The concrete backend of ``method="patchmatch"``: "auto" takes the Triton kernel on CUDA
    and the C++ kernel on the CPU where they are available, else the torch reference, quietly;
    an explicit backend that cannot run raises :class:`BackendUnavailableError`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _triton_status(device)[0]:
            return "triton"
        if device.type == "cpu" and _cpp_status(device)[0]:
            return "cpp"
        return "torch"
    if backend == "cuda":
        raise BackendUnavailableError("backend='cuda' has no PatchMatch kernel; use backend='triton' (CUDA), 'cpp' (CPU) or 'auto'")
    if backend != "torch":
        ok, reason = (_cpp_status if backend == "cpp" else _triton_status)(device)
        if not ok:
            raise BackendUnavailableError(reason)
    return backend


# --------------------------------------------------------------------------- #
# input checks (shape-only ones also run on fake tensors under torch.compile)
# --------------------------------------------------------------------------- #


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _check_feature(name: str, feat: Tensor) -> None:
    if not isinstance(feat, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(feat).__name__}")
    if feat.dtype not in FEATURE_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype {FEATURE_DTYPES}, got {feat.dtype}")
    if feat.dim() not in (3, 4):
        raise ValueError(f"{name}: expected shape (C, H, W) or (B, C, H, W), got {tuple(feat.shape)}")


def _check_mask(name: str, mask: Tensor, feat_name: str, feat: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype not in MASK_DTYPES:
        raise TypeError(f"{name}: expected dtype bool or uint8 (nonzero = selected), got {mask.dtype}")
    spatial = tuple(feat.shape[-2:])
    batched = feat.dim() == 4
    ok = tuple(mask.shape) == spatial or (batched and tuple(mask.shape) == (feat.shape[0], *spatial))
    if not ok:
        want = f"{spatial}" + (f" or {(feat.shape[0], *spatial)}" if batched else "")
        raise ValueError(f"{name}: expected shape {want} to match {feat_name} {tuple(feat.shape)}, got {tuple(mask.shape)}")
    if mask.device != feat.device:
        raise ValueError(f"{name}: is on {mask.device} but {feat_name} is on {feat.device}")


def _check_pair(query_feat: Tensor, key_feat: Tensor, q_name: str, k_name: str) -> None:
    if query_feat.device != key_feat.device:
        raise ValueError(f"{k_name}: is on {key_feat.device} but {q_name} is on {query_feat.device}")
    if query_feat.dim() != key_feat.dim():
        raise ValueError(f"{k_name}: has {key_feat.dim()} dims but {q_name} has {query_feat.dim()}")
    if query_feat.shape[-3] != key_feat.shape[-3]:
        raise ValueError(f"{k_name}: has {key_feat.shape[-3]} channels but {q_name} has {query_feat.shape[-3]}")
    if query_feat.dim() == 4 and query_feat.shape[0] != key_feat.shape[0]:
        raise ValueError(f"{k_name}: batch size {key_feat.shape[0]} differs from {q_name}'s {query_feat.shape[0]}")


def _check_fits(name: str, feat: Tensor, patch_size: int) -> None:
    h, w = feat.shape[-2:]
    if patch_size > h or patch_size > w:
        raise ValueError(f"patch_size: {patch_size} is larger than {name}'s spatial size {h}x{w}")


def _check_nn_args(query_feat, key_feat, query_mask, key_mask, patch_size, precision, backend, chunk_bytes) -> None:
    _check_feature("query_feat", query_feat)
    _check_feature("key_feat", key_feat)
    _check_pair(query_feat, key_feat, "query_feat", "key_feat")
    _check_mask("query_mask", query_mask, "query_feat", query_feat)
    _check_mask("key_mask", key_mask, "key_feat", key_feat)
    check_patch_size(patch_size)
    _check_fits("key_feat", key_feat, patch_size)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("backend", backend, BACKENDS)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes: expected a positive int, got {chunk_bytes!r}")


def _check_index(name: str, index, feat_name: str, feat: Tensor) -> None:
    """A (Nq,) int64/int32 key index, as patch_nn returns, on ``feat``'s device."""
    if not isinstance(index, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(index).__name__}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected dtype int64 (as returned by patch_nn), got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name}: expected shape (Nq,), got {tuple(index.shape)}")
    if index.device != feat.device:
        raise ValueError(f"{name}: is on {index.device} but {feat_name} is on {feat.device}")


def _check_patchmatch_args(query_feat, init, iterations, seed) -> None:
    if init is not None and not isinstance(init, Tensor):
        raise TypeError(f"init: expected None or a torch.Tensor, got {type(init).__name__}")
    if init is not None:
        _check_index("init", init, "query_feat", query_feat)
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"iterations: expected an int, got {type(iterations).__name__}")
    if iterations < 0:
        raise ValueError(f"iterations: expected an int >= 0, got {iterations}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an int in [0, 2**32), got {seed}")


def _check_loss_args(feat, target_feat, query_mask, index, patch_size, backend) -> None:
    _check_feature("feat", feat)
    _check_feature("target_feat", target_feat)
    _check_pair(feat, target_feat, "feat", "target_feat")
    _check_mask("query_mask", query_mask, "feat", feat)
    _check_index("index", index, "feat", feat)
    check_patch_size(patch_size)
    _check_fits("target_feat", target_feat, patch_size)
    _check_choice("backend", backend, LOSS_BACKENDS)


def _all_finite(t: Tensor) -> Tensor:
    """0-dim bool: no NaN or Inf in ``t``. min and max propagate NaN, so one fused reduction
    decides it: 16x faster than ``isfinite(t).all()``, which writes a mask the size of ``t``."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(t)
    return torch.isfinite(low) & torch.isfinite(high)


def _check_finite(**tensors: Tensor) -> None:
    """One host sync for all tensors; raises naming the first non-finite one."""
    names = list(tensors)
    flags = torch.stack([_all_finite(t) for t in tensors.values()]).tolist()
    for name, ok in zip(names, flags):
        if not ok:
            raise ValueError(f"{name}: contains NaN or Inf")


# --------------------------------------------------------------------------- #
# geometry shared by every backend
# --------------------------------------------------------------------------- #


def _batched(feat: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    if feat.dim() == 3:
        feat = feat.unsqueeze(0)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0).expand(feat.shape[0], -1, -1)
    return feat, mask.to(torch.bool)


def _search_dtype(feat: Tensor, precision: str, backend: str) -> Tensor:
    """The features as the search reads them: rounded to the precision's input format."""
    if precision == "bf16":
        return feat.to(torch.bfloat16)
    if backend == "torch" and feat.dtype == torch.float64 and precision == "fp32":
        return feat  # the reference stays exact for float64 inputs
    return feat.to(torch.float32)


# --------------------------------------------------------------------------- #
# dispatch
# --------------------------------------------------------------------------- #


def _kernel_module(backend: str, op: str):
    if backend == "triton":
        if op == "nn":
            from neuralpatch.kernels import patch_nn as module
        else:
            from neuralpatch.kernels import patch_loss as module
        return module
    from neuralpatch import _cuda

    return _cuda


def _nn_launcher(backend: str, chunk_bytes: int) -> Callable:
    if backend == "torch":
        return lambda *args: _torch.patch_nn_fwd(*args, chunk_bytes)
    return _kernel_module(backend, "nn").patch_nn_fwd


def _search_problem(query_feat, key_feat, query_mask, key_mask, patch_size, precision, backend):
    """Per-item inputs of the backend contract (see the module docstring)."""
    r = patch_size // 2
    batch, channels, hq, wq = query_feat.shape
    hk, wk = key_feat.shape[-2:]
    key_interior = interior(hk, wk, patch_size, key_feat.device)
    for b in range(batch):
        q_feat = _search_dtype(query_feat[b], precision, backend)
        k_feat = _search_dtype(key_feat[b], precision, backend)
        q_centres = query_mask[b].reshape(-1).nonzero().squeeze(1)
        k_centres = (key_mask[b] & key_interior).reshape(-1).nonzero().squeeze(1)
        if q_centres.numel() == 0:
            yield b, None
            continue
        if k_centres.numel() == 0:
            raise ValueError(
                f"key_mask: selects no key whose {patch_size}x{patch_size} patch lies inside key_feat"
                + (f" (batch item {b})" if batch > 1 else "")
            )
        q_norm = _torch.box_sum_of_squares(q_feat, patch_size).sqrt()[q_centres]
        k_norm = _torch.box_sum_of_squares(k_feat, patch_size).sqrt()[k_centres]
        nonzero = k_norm > 0
        if not bool(nonzero.all()):
            # a zero-norm key is never chosen, unless every key is zero (then the first one is)
            k_centres = k_centres[nonzero] if bool(nonzero.any()) else k_centres[:1]
            k_norm = k_norm[nonzero] if bool(nonzero.any()) else torch.ones_like(k_norm[:1])
        query_map = F.pad(q_feat, (r, r, r, r)).permute(1, 2, 0).contiguous()
        key_map = k_feat.permute(1, 2, 0).contiguous()
        qy, qx = q_centres // wq, q_centres % wq
        query_pos = (qy * (wq + 2 * r) + qx).to(torch.int32)
        ky, kx = k_centres // wk, k_centres % wk
        key_pos = ((ky - r) * wk + (kx - r)).to(torch.int32)
        inv_norm = (1.0 / k_norm).to(torch.float64 if k_feat.dtype == torch.float64 else torch.float32)
        yield b, (query_map, key_map, query_pos, key_pos, inv_norm, q_norm, k_centres)


def _patch_nn_impl(query_feat, key_feat, query_mask, key_mask, patch_size, precision, backend, chunk_bytes):
    _check_nn_args(query_feat, key_feat, query_mask, key_mask, patch_size, precision, backend, chunk_bytes)
    concrete = resolve_backend(backend, query_feat.device, precision)
    _check_finite(**({"query_feat": query_feat} if key_feat is query_feat else {"query_feat": query_feat, "key_feat": key_feat}))
    query_feat, query_mask = _batched(query_feat, query_mask)
    key_feat, key_mask = _batched(key_feat, key_mask)
    if not bool(query_mask.any()):
        raise ValueError("query_mask: selects no query position")
    launch = _nn_launcher(concrete, chunk_bytes)
    with nvtx_range(f"neuralpatch.patch_nn[{concrete},{precision}]"):
        return _search_all(query_feat, key_feat, query_mask, key_mask, patch_size, precision, concrete, launch)


def _search_all(query_feat, key_feat, query_mask, key_mask, patch_size, precision, concrete, launch):
    """Search every batch item with ``launch``; turn key-list indices into positions and values into NCC."""
    indices, scores = [], []
    for _, problem in _search_problem(query_feat, key_feat, query_mask, key_mask, patch_size, precision, concrete):
        if problem is None:
            continue
        query_map, key_map, query_pos, key_pos, inv_norm, q_norm, k_centres = problem
        if concrete != "torch":
            inv_norm = inv_norm.float()
        best, value = launch(query_map, key_map, query_pos, key_pos, inv_norm, patch_size, precision)
        best = best.to(torch.int64)
        ncc = torch.where(q_norm > 0, value.to(q_norm.dtype) / q_norm.clamp_min(1e-30), torch.zeros_like(q_norm))
        indices.append(k_centres[best])
        scores.append(ncc.to(torch.float32))
    return torch.cat(indices), torch.cat(scores)


def _patchmatch_launcher(backend: str) -> Callable:
    from neuralpatch import patchmatch

    if backend == "torch":
        return patchmatch.torch_patchmatch_fwd
    if backend == "cpp":
        return patchmatch.cpp_patchmatch_fwd
    from neuralpatch.kernels import patchmatch as kernel

    return kernel.patchmatch_fwd


def _patchmatch_impl(query_feat, key_feat, query_mask, key_mask, init, patch_size, precision, backend, iterations, seed):
    from neuralpatch.patchmatch import search_all

    _check_nn_args(query_feat, key_feat, query_mask, key_mask, patch_size, precision, backend, DEFAULT_CHUNK_BYTES)
    _check_patchmatch_args(query_feat, init, iterations, seed)
    concrete = resolve_patchmatch_backend(backend, query_feat.device)
    _check_finite(**({"query_feat": query_feat} if key_feat is query_feat else {"query_feat": query_feat, "key_feat": key_feat}))
    query_feat, query_mask = _batched(query_feat, query_mask)
    key_feat, key_mask = _batched(key_feat, key_mask)
    if not bool(query_mask.any()):
        raise ValueError("query_mask: selects no query position")
    launch = _patchmatch_launcher(concrete)
    with nvtx_range(f"neuralpatch.patchmatch[{concrete},{precision}]"):
        return search_all(query_feat, key_feat, query_mask, key_mask, init, patch_size, precision, concrete, iterations, seed, launch)


class _LossGeometry(NamedTuple):
    """Where one item's queries and their matches lie: (item, query_center (Nq_b,) int32 flat
    centres in the query map, target_pos (Nq_b,) int32 flat top-left corners in the target map,
    query_slot (H, W) int32 query number per centre or -1)."""

    item: int
    query_center: Tensor
    target_pos: Tensor
    query_slot: Tensor


# The geometry of the last few (query_mask, index) pairs, by identity: a loss evaluated many
# times against one neighbour search (the pipeline's rounds, NeuralPatchLoss with nn_every) and
# its backward build it once, with the host syncs that validating it takes.
_GEOMETRY_CACHE: dict[int, tuple] = {}
_GEOMETRY_CACHE_SIZE = 16


def _loss_geometry(query_mask: Tensor, index: Tensor, patch_size: int, feat_shape, target_shape) -> list[_LossGeometry]:
    """The per-item geometry of a loss problem, validated (``index`` entries count and range),
    built once per (query_mask, index) pair while both are alive and unmodified."""
    key = (patch_size, tuple(feat_shape), tuple(target_shape))
    cached = _GEOMETRY_CACHE.get(id(index))
    if cached is not None:
        index_ref, mask_ref, versions, cached_key, geometry = cached
        if index_ref() is index and mask_ref() is query_mask and versions == (index._version, query_mask._version) and cached_key == key:
            return geometry
    geometry = _build_loss_geometry(query_mask, index, patch_size, feat_shape, target_shape)
    if len(_GEOMETRY_CACHE) >= _GEOMETRY_CACHE_SIZE:
        for stale in [k for k, v in _GEOMETRY_CACHE.items() if v[0]() is None or v[1]() is None] or list(_GEOMETRY_CACHE)[:1]:
            del _GEOMETRY_CACHE[stale]
    try:
        refs = (weakref.ref(index), weakref.ref(query_mask))
    except TypeError:  # tensors that take no weak reference (fakes): do not cache
        return geometry
    _GEOMETRY_CACHE[id(index)] = (*refs, (index._version, query_mask._version), key, geometry)
    return geometry


def _build_loss_geometry(query_mask, index, patch_size, feat_shape, target_shape) -> list[_LossGeometry]:
    r = patch_size // 2
    batch, _, h, w = feat_shape
    ht, wt = target_shape[-2:]
    counts = query_mask.reshape(batch, -1).sum(1).tolist()
    if sum(counts) != index.shape[0]:
        raise ValueError(f"index: has {index.shape[0]} entries but query_mask selects {sum(counts)} positions")
    index = index.to(torch.int64)
    iy, ix = index // wt, index % wt
    inside = (index >= 0) & (index < ht * wt) & (iy >= r) & (iy < ht - r) & (ix >= r) & (ix < wt - r)
    if not bool(inside.all()):
        raise ValueError(f"index: every entry must be the flat centre of a {patch_size}x{patch_size} patch inside target_feat")
    geometry, start = [], 0
    for b, count in enumerate(counts):
        if count == 0:
            continue
        item_index = index[start : start + count]
        centres = query_mask[b].reshape(-1).nonzero().squeeze(1)
        slot = torch.full((h * w,), -1, dtype=torch.int32, device=index.device)
        slot[centres] = torch.arange(count, dtype=torch.int32, device=index.device)
        target_pos = ((item_index // wt - r) * wt + (item_index % wt - r)).to(torch.int32)
        geometry.append(_LossGeometry(b, centres.to(torch.int32), target_pos, slot.view(h, w)))
        start += count
    return geometry


def _loss_problem(feat, target_feat, query_mask, index, patch_size):
    """Per item with queries: (geometry, feat_map, target_map), the maps channels-last."""
    for item in _loss_geometry(query_mask, index, patch_size, feat.shape, target_feat.shape):
        b = item.item
        yield item, feat[b].permute(1, 2, 0).contiguous(), target_feat[b].detach().permute(1, 2, 0).contiguous()


def _loss_dtype(feat: Tensor) -> torch.dtype:
    return torch.float64 if feat.dtype == torch.float64 else torch.float32


def _kernel_map(t: Tensor, backend: str) -> Tensor:
    """Maps as the fused kernels take them: float32 or bfloat16."""
    if backend == "torch" or t.dtype in (torch.float32, torch.bfloat16):
        return t
    return t.to(torch.float32)


def _patch_loss_impl(feat, target_feat, query_mask, index, patch_size, backend):
    _check_loss_args(feat, target_feat, query_mask, index, patch_size, backend)
    concrete = resolve_backend(backend, feat.device)
    feat, query_mask = _batched(feat, query_mask)
    target_feat = target_feat if target_feat.dim() == 4 else target_feat.unsqueeze(0)
    if index.shape[0] == 0:
        raise ValueError("index: is empty; query_mask must select at least one position")
    fwd = _torch.patch_loss_fwd if concrete == "torch" else _kernel_module(concrete, "loss").patch_loss_fwd
    total = torch.zeros((), dtype=_loss_dtype(feat), device=feat.device)
    for item, feat_map, target_map in _loss_problem(feat, target_feat, query_mask, index, patch_size):
        if target_map.dtype != feat_map.dtype:
            target_map = target_map.to(feat_map.dtype)
        per_query = fwd(_kernel_map(feat_map, concrete), _kernel_map(target_map, concrete), item.query_center, item.target_pos, patch_size)
        total = total + per_query.sum().to(total.dtype)
    return total / index.shape[0]


def _patch_loss_backward_impl(grad, feat, target_feat, query_mask, index, patch_size, backend):
    concrete = resolve_backend(backend, feat.device)
    squeeze = feat.dim() == 3
    feat, query_mask = _batched(feat, query_mask)
    target_feat = target_feat if target_feat.dim() == 4 else target_feat.unsqueeze(0)
    bwd = _torch.patch_loss_bwd if concrete == "torch" else _kernel_module(concrete, "loss").patch_loss_bwd
    acc = _loss_dtype(feat) if concrete == "torch" else torch.float32
    grad_scale = (2.0 * grad.to(acc) / index.shape[0]).reshape(1)
    grads = torch.zeros(feat.shape, dtype=feat.dtype, device=feat.device)
    for item, feat_map, target_map in _loss_problem(feat, target_feat, query_mask, index, patch_size):
        if target_map.dtype != feat_map.dtype:
            target_map = target_map.to(feat_map.dtype)
        g = bwd(
            _kernel_map(feat_map, concrete), _kernel_map(target_map, concrete), item.query_slot, item.target_pos, grad_scale, patch_size
        )
        grads[item.item] = g.permute(2, 0, 1).to(feat.dtype)
    return grads[0] if squeeze else grads


# --------------------------------------------------------------------------- #
# torch.library registration
# --------------------------------------------------------------------------- #


@torch.library.custom_op("neuralpatch::patch_nn", mutates_args=())
def _patch_nn_op(
    query_feat: Tensor,
    key_feat: Tensor,
    query_mask: Tensor,
    key_mask: Tensor,
    patch_size: int,
    precision: str,
    backend: str,
    chunk_bytes: int,
) -> tuple[Tensor, Tensor]:
    return _patch_nn_impl(query_feat, key_feat, query_mask, key_mask, patch_size, precision, backend, chunk_bytes)


@_patch_nn_op.register_fake
def _(query_feat, key_feat, query_mask, key_mask, patch_size, precision, backend, chunk_bytes):
    torch._check(query_feat.shape[-3] == key_feat.shape[-3], lambda: "key_feat: channel count differs from query_feat")
    nq = torch.library.get_ctx().new_dynamic_size()
    index = query_feat.new_empty((nq,), dtype=torch.int64)
    score = query_feat.new_empty((nq,), dtype=torch.float32)
    return index, score


@torch.library.custom_op("neuralpatch::patchmatch", mutates_args=())
def _patchmatch_op(
    query_feat: Tensor,
    key_feat: Tensor,
    query_mask: Tensor,
    key_mask: Tensor,
    init: Tensor | None,
    patch_size: int,
    precision: str,
    backend: str,
    iterations: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    return _patchmatch_impl(query_feat, key_feat, query_mask, key_mask, init, patch_size, precision, backend, iterations, seed)


@_patchmatch_op.register_fake
def _(query_feat, key_feat, query_mask, key_mask, init, patch_size, precision, backend, iterations, seed):
    torch._check(query_feat.shape[-3] == key_feat.shape[-3], lambda: "key_feat: channel count differs from query_feat")
    if init is not None:
        nq = init.shape[0]
    else:
        nq = torch.library.get_ctx().new_dynamic_size()
    index = query_feat.new_empty((nq,), dtype=torch.int64)
    score = query_feat.new_empty((nq,), dtype=torch.float32)
    return index, score


@torch.library.custom_op("neuralpatch::patch_loss", mutates_args=())
def _patch_loss_op(feat: Tensor, target_feat: Tensor, query_mask: Tensor, index: Tensor, patch_size: int, backend: str) -> Tensor:
    return _patch_loss_impl(feat, target_feat, query_mask, index, patch_size, backend)


@_patch_loss_op.register_fake
def _(feat, target_feat, query_mask, index, patch_size, backend):
    torch._check(feat.shape[-3] == target_feat.shape[-3], lambda: "target_feat: channel count differs from feat")
    return feat.new_empty((), dtype=_loss_dtype(feat))


@torch.library.custom_op("neuralpatch::patch_loss_backward", mutates_args=())
def _patch_loss_backward_op(
    grad: Tensor,
    feat: Tensor,
    target_feat: Tensor,
    query_mask: Tensor,
    index: Tensor,
    patch_size: int,
    backend: str,
) -> Tensor:
    return _patch_loss_backward_impl(grad, feat, target_feat, query_mask, index, patch_size, backend)


@_patch_loss_backward_op.register_fake
def _(grad, feat, target_feat, query_mask, index, patch_size, backend):
    return torch.empty_like(feat)


def _loss_setup_context(ctx, inputs, output):
    feat, target_feat, query_mask, index, patch_size, backend = inputs
    ctx.save_for_backward(feat, target_feat, query_mask, index)
    ctx.patch_size = patch_size
    ctx.backend = backend


def _loss_backward(ctx, grad):
    feat, target_feat, query_mask, index = ctx.saved_tensors
    grad_feat = None
    if ctx.needs_input_grad[0]:
        grad_feat = torch.ops.neuralpatch.patch_loss_backward(grad, feat, target_feat, query_mask, index, ctx.patch_size, ctx.backend)
    # target_feat is the detached target; masks, indices and ints have no gradient
    return grad_feat, None, None, None, None, None


_patch_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #


def patch_nn(
    query_feat: Tensor,
    key_feat: Tensor,
    query_mask: Tensor,
    key_mask: Tensor,
    patch_size: int = 3,
    precision: str = "tf32",
    backend: str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    method: str = "exact",
    init: Tensor | None = None,
    iterations: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Nearest key patch of every query patch, by normalised cross-correlation.

    Args:
        query_feat: (C, H, W) or (B, C, H, W) float features holding the queries.
        key_feat: (C, H', W') or (B, C, H', W') features holding the keys (may be ``query_feat``).
        query_mask: (H, W) or (B, H, W) bool/uint8; queries are the nonzero positions.
            A query near the border is zero-padded outside the map.
        key_mask: (H', W') or (B, H', W') bool/uint8; keys are the nonzero positions whose
            whole ``patch_size`` x ``patch_size`` patch lies inside the map.
        patch_size: odd side k of the square patch; a patch is the C*k*k vector centred there.
        precision: "fp32" (exact), "tf32" or "bf16" (inputs rounded, fp32 accumulation).
        backend: "auto", "torch", "triton", "cuda" (exact only) or "cpp" (patchmatch only).
        chunk_bytes: working-set budget of the exact torch backend (the others need none).
        method: "exact" (the default) or "patchmatch": approximate, by propagation and random
            search (:mod:`neuralpatch.patchmatch`); "auto" then runs the C++ kernel on CPU
            tensors and the Triton kernel on CUDA tensors.
        init: patchmatch only: None, or (Nq,) int64 key positions to start from, e.g. the
            index of the previous call with the same masks. Entries that are not valid keys
            (outside ``key_mask`` or the map, or zero-norm) start from a random key instead.
        iterations: patchmatch only: 1 (the default,
            :data:`neuralpatch.patchmatch.DEFAULT_ITERATIONS`) runs the reduced-space search
            and the propagation rounds; each more adds one PatchMatch iteration (two sweeps);
            0 returns ``init`` (repaired as above) with its scores.
        seed: patchmatch only: uint32; the result is a deterministic function of the inputs
            and the seed (whatever the thread count), per backend.

    Returns:
        index: int64 (Nq,), the flat position ``y*W' + x`` of the best key in key_feat.
        score: float32 (Nq,), the NCC ``<q,k>/(|q||k|)`` of that pair (0 for a zero query).
        Batched queries are concatenated item by item, each in row-major order (the order
        of ``query_mask.nonzero()``); each item is searched against its own keys only.

    The best key maximises ``<q,k>/|k|``; ties go to the lowest key index; a zero-norm
    key is chosen only when every key is zero. PatchMatch returns valid keys only, with the
    scores of the pairs it returns; a query keeps its key unless a strictly better one (or
    an equal one at a lower index) turns up, so the exact answer as ``init`` is returned as is.
    """
    _check_nn_args(query_feat, key_feat, query_mask, key_mask, patch_size, precision, backend, chunk_bytes)
    _check_choice("method", method, METHODS)
    if method == "patchmatch":
        from neuralpatch.patchmatch import DEFAULT_ITERATIONS

        iterations = DEFAULT_ITERATIONS if iterations is None else iterations
        _check_patchmatch_args(query_feat, init, iterations, seed)
        return torch.ops.neuralpatch.patchmatch(
            query_feat, key_feat, query_mask, key_mask, init, patch_size, precision, backend, iterations, seed
        )
    for name, value, default in (("init", init, None), ("iterations", iterations, None), ("seed", seed, 0)):
        if value is not default and not (name == "seed" and value == 0):
            raise ValueError(f"{name}: is a method='patchmatch' option; method='exact' takes none")
    return torch.ops.neuralpatch.patch_nn(query_feat, key_feat, query_mask, key_mask, patch_size, precision, backend, chunk_bytes)


def patch_loss(
    feat: Tensor,
    target_feat: Tensor,
    query_mask: Tensor,
    index: Tensor,
    patch_size: int = 3,
    backend: str = "auto",
) -> Tensor:
    """Mean over queries of the squared L2 distance to the matched patch.

    Args:
        feat: (C, H, W) or (B, C, H, W) features; the loss is differentiable in them.
        target_feat: (C, H', W') or (B, C, H', W') features of the matches; treated as detached.
        query_mask: (H, W) or (B, H, W) bool/uint8 query positions, as given to :func:`patch_nn`.
        index: int64 (Nq,) matched key centres in target_feat, as returned by :func:`patch_nn`.
        patch_size: odd patch side k.
        backend: "auto", "torch", "triton" or "cuda".

    Returns:
        A 0-dim tensor (float32, or float64 for float64 ``feat``): the sum over each
        query's patch offsets that lie inside ``feat`` of the squared difference, averaged
        over the Nq queries. Its gradient is ``2 (P_q - P_t) / Nq`` folded back onto the map.
    """
    _check_loss_args(feat, target_feat, query_mask, index, patch_size, backend)
    if not torch.compiler.is_compiling():  # a data-dependent check: eager calls only
        _check_finite(feat=feat, target_feat=target_feat)
    return torch.ops.neuralpatch.patch_loss(feat, target_feat, query_mask, index, patch_size, backend)
