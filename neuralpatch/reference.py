"""Brute-force float64 reference for the patch ops, shared by tests and benchmarks.

It builds the full score matrix, so it is only for small maps. It follows the op
contract (docs/architecture.md, "The op contract") literally:

- a patch is the ``C*k*k`` vector centred at a grid position;
- a key centre whose patch would leave the map is never a key;
- a query centre near the border is zero-padded outside the map;
- the best key maximises ``<q, k>/|k|``; ties go to the lowest key index;
- a zero-norm key is never chosen unless all keys are zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patches_float64(feat: torch.Tensor, patch_size: int) -> torch.Tensor:
    """All zero-padded patches of ``feat`` (C, H, W) as a float64 (H*W, k*k*C) matrix.

    The element order inside a patch is ``(dy*k + dx)*C + c``, the same as the kernels.
    """
    c, h, w = feat.shape
    r = patch_size // 2
    padded = F.pad(feat.detach().to(torch.float64), (r, r, r, r))
    cols = F.unfold(padded[None], patch_size)  # (1, C*k*k, H*W), order c*k*k + dy*k + dx
    cols = cols.view(c, patch_size * patch_size, h * w).permute(2, 1, 0)
    return cols.reshape(h * w, patch_size * patch_size * c)


def interior_mask(height: int, width: int, patch_size: int, device=None) -> torch.Tensor:
    """True where a patch centred there lies fully inside a (height, width) map."""
    r = patch_size // 2
    m = torch.zeros(height, width, dtype=torch.bool, device=device)
    if height > 2 * r and width > 2 * r:
        m[r : height - r, r : width - r] = True
    return m


def brute_force_patch_nn(query_feat, key_feat, query_mask, key_mask, patch_size=3):
    """Exact (index, score) for one (C, H, W) item, in float64 from the full score matrix."""
    q_all = patches_float64(query_feat, patch_size)
    k_all = patches_float64(key_feat, patch_size)
    q_pos = query_mask.reshape(-1).nonzero().squeeze(1)
    k_valid = key_mask.to(torch.bool) & interior_mask(*key_feat.shape[1:], patch_size, key_mask.device)
    k_pos = k_valid.reshape(-1).nonzero().squeeze(1)
    q = q_all[q_pos]
    k = k_all[k_pos]
    k_norm = k.norm(dim=1)
    q_norm = q.norm(dim=1)
    nonzero = k_norm > 0
    if nonzero.any():
        scores = (q @ k.T) / k_norm.clamp_min(1e-300)
        scores[:, ~nonzero] = float("-inf")
    else:
        scores = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    # argmax with ties to the lowest index: max, then the first column that reaches it
    best = scores.max(dim=1, keepdim=True).values
    first = (scores == best).to(torch.int64).argmax(dim=1)
    index = k_pos[first]
    best_dot = (q * k[first]).sum(1)
    denom = q_norm * k_norm[first]
    score = torch.where(denom > 0, best_dot / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return index.to(torch.int64), score


def ncc_at(query_feat, key_feat, query_mask, index, patch_size=3) -> torch.Tensor:
    """True float64 NCC between each query patch and the key patch at ``index``.

    Used to compare backends by the quality of what they chose rather than by raw
    indices, which may legitimately differ in reduced precision.
    """
    q_all = patches_float64(query_feat, patch_size)
    k_all = patches_float64(key_feat, patch_size)
    q = q_all[query_mask.reshape(-1).nonzero().squeeze(1)]
    k = k_all[index.cpu()] if k_all.device != index.device else k_all[index]
    denom = q.norm(dim=1) * k.norm(dim=1)
    dot = (q * k).sum(1)
    return torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.zeros_like(denom))


def brute_force_patch_loss(feat, target_feat, query_mask, index, patch_size=3) -> torch.Tensor:
    """Mean over queries of the squared L2 distance between each query patch of ``feat``
    and its matched patch of ``target_feat``, counting only offsets inside ``feat``.

    Differentiable in ``feat`` (float64 autograd through unfold), for checking gradients.
    """
    c, h, w = feat.shape
    k2 = patch_size * patch_size
    r = patch_size // 2
    q_pos = query_mask.reshape(-1).nonzero().squeeze(1)
    padded = F.pad(feat, (r, r, r, r))
    cols = F.unfold(padded[None], patch_size).view(c, k2, h * w)[:, :, q_pos]  # (C, k2, Nq)
    ones = F.pad(torch.ones(1, h, w, dtype=feat.dtype, device=feat.device), (r, r, r, r))
    valid = F.unfold(ones[None], patch_size).view(1, k2, h * w)[:, :, q_pos]
    t_cols = F.unfold(F.pad(target_feat.detach(), (r, r, r, r))[None], patch_size)
    t_cols = t_cols.view(c, k2, -1)[:, :, index]
    diff = (cols - t_cols.to(feat.dtype)) * valid
    return (diff * diff).sum() / max(q_pos.numel(), 1)


# --------------------------------------------------------------------------- #
# launcher level: the normalised problem the Triton and CUDA launchers take
# (channels-last maps, flat top-left positions, inverse key norms)
# --------------------------------------------------------------------------- #

# Relative tolerance on a launcher's score, in units of |q| (scores are <q,k>/|k| <= |q|), by
# precision: fp32 accumulation error; TF32 rounds the inputs to 10 mantissa bits (2**-11
# relative); bf16 maps are exact in float64 but the kernels may round partial sums.
LAUNCHER_SCORE_RTOL = {"fp32": 2e-5, "tf32": 5e-3, "bf16": 2e-2}


def launcher_patches(map_hwc: torch.Tensor, top_left: torch.Tensor, patch_size: int) -> torch.Tensor:
    """float64 (N, k*k*C) patches with flat top-left ``top_left`` of a channels-last (H, W, C)
    map, element order (dy*k + dx)*C + c, on the CPU (whatever the map's device)."""
    _, w, c = map_hwc.shape
    d = torch.arange(patch_size)
    taps = (d[:, None] * w + d[None, :]).reshape(-1)
    rows = top_left.long().cpu()[:, None] + taps[None, :]
    return map_hwc.detach().cpu().double().reshape(-1, c)[rows].reshape(top_left.shape[0], -1)


def launcher_scores(query_map, key_map, query_pos, key_pos, key_inv_norm, patch_size):
    """float64 (Nq, Nk) scores ``<q, k_j> * key_inv_norm[j]`` and the (Nq, k*k*C) query patches, on the CPU."""
    q = launcher_patches(query_map, query_pos, patch_size)
    k = launcher_patches(key_map, key_pos, patch_size)
    return (q @ k.T) * key_inv_norm.detach().cpu().double()[None, :], q


def argmax_lowest(scores: torch.Tensor) -> torch.Tensor:
    """argmax along dim 1, the lowest index among equal maxima (the op's tie rule)."""
    best = scores.max(dim=1, keepdim=True).values
    return (scores == best).to(torch.int64).argmax(dim=1)


def launcher_patch_loss(feat_hwc, target_hwc, query_center, target_pos, patch_size):
    """Per-query squared distance between the patch of ``feat_hwc`` (H, W, C) centred at
    ``query_center`` (zero outside the map, those offsets not counted) and the patch of
    ``target_hwc`` with top-left ``target_pos``; differentiable in ``feat_hwc``, in its dtype."""
    h, w, c = feat_hwc.shape
    wt = target_hwc.shape[1]
    r = patch_size // 2
    padded = F.pad(feat_hwc, (0, 0, r, r, r, r))
    cy, cx = query_center.long() // w, query_center.long() % w
    dy = torch.arange(patch_size, device=feat_hwc.device).repeat_interleave(patch_size)
    dx = torch.arange(patch_size, device=feat_hwc.device).repeat(patch_size)
    fy, fx = cy[:, None] + dy[None, :], cx[:, None] + dx[None, :]  # padded coordinates
    f = padded.reshape(-1, c)[fy * (w + 2 * r) + fx]  # (Nq, k*k, C)
    inside = (fy >= r) & (fy < h + r) & (fx >= r) & (fx < w + r)
    t = target_hwc.reshape(-1, c)[target_pos.long()[:, None] + dy * wt + dx].to(feat_hwc.dtype)
    d = (f - t) * inside[..., None].to(feat_hwc.dtype)
    return (d * d).sum(dim=(1, 2))
