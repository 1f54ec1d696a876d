"""Argument checks shared by the ops and the launchers of every backend (each raw launcher can be
called on its own, by people who profile the kernels, so each checks what it is given; the rules
live here once)."""

from __future__ import annotations

import torch


def check_patch_size(patch_size) -> None:
    """A positive odd int: TypeError for a non-int, ValueError for a bad value."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int):
        raise TypeError(f"patch_size: expected an int, got {type(patch_size).__name__}")
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size: expected a positive odd int (1, 3, 5, 7, ...), got {patch_size}")


def check_launch_tensor(name: str, t, *, ndim: int, dtypes, device_type: str | None = None, max_numel: int | None = None):
    """One raw launcher input: a contiguous tensor of ``ndim`` dims and one of ``dtypes`` (on a
    ``device_type`` device if given, at most ``max_numel`` elements if given); returns its device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: dtype must be {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if device_type is not None and t.device.type != device_type:
        raise ValueError(f"{name}: must be on a {device_type.upper()} device, got {t.device}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (channels-last maps are (H, W, C) contiguous)")
    if max_numel is not None and t.numel() > max_numel:
        raise ValueError(f"{name}: has {t.numel()} elements; the kernels index with int32 (at most {max_numel})")
    return t.device


# The PatchMatch launchers' inputs: name, dtype, dimensions (the normalised problem of
# neuralpatch.patchmatch.search_problems).
PATCHMATCH_LAUNCH_INPUTS = (
    ("query_map", torch.float32, 3),
    ("key_map", torch.float32, 3),
    ("query_center", torch.int32, 1),
    ("query_slot", torch.int32, 2),
    ("key_center", torch.int32, 1),
    ("key_inv_norm", torch.float32, 2),
    ("init_field", torch.int32, 1),
)


def check_patchmatch_launch(tensors: dict, patch_size, device_type: str | None = None, max_numel: int | None = None) -> None:
    """Every PatchMatch launcher input of ``tensors`` (by name) and the patch size."""
    for name, dtype, ndim in PATCHMATCH_LAUNCH_INPUTS:
        check_launch_tensor(name, tensors[name], ndim=ndim, dtypes=(dtype,), device_type=device_type, max_numel=max_numel)
    check_patch_size(patch_size)
