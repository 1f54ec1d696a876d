"""Approximate patch search behind ``patch_nn(method="patchmatch")``: an exhaustive search in
a reduced space, propagation, then PatchMatch sweeps (Barnes et al. 2009, over VGG features
as in Liao et al. 2017), made parallel so that every backend computes the same field.

Stages, per batch item (:func:`staged_search`); ``iterations`` = n >= 1 runs all three:

1. *Reduced space* (:func:`reduced_problem`, :func:`reduced_best`). Every query and valid key
   patch (D = C*k*k values) is projected on the top d principal directions of 1024 evenly
   spaced query and key patches (uncentred; a randomised range finder with a seeded sketch;
   one projection of the map when queries and keys share it), with d = :func:`reduced_dim`:
   ``REDUCED_DIM`` = 64 up to D = 2304 (relu3_1, 3x3), in proportion above (128 at relu4_1).
   Keys are divided by their full norm, each direction put on its own key scale (the queries
   scaled inversely, so dot products are unchanged), then rounded to integers in [-L, L],
   L = 127 (int8; less where ``d * L**2 >= 2**24``): keys on one scale per direction, each
   query on its own (that leaves the query's ranking of keys unchanged). Every reduced dot
   product is then an exact integer, in float32 and in int32, whatever the summation order, so
   the stage's answer is the same in every backend and for any thread count. Each query takes
   the key of the highest reduced score among all keys (``KEY_SUBSAMPLE`` = 1), the lowest
   position among ties, by an exhaustive scan (on the CPU a fused C++ kernel on int8 entries,
   AVX512-VNNI where the CPU has it, portable integer code otherwise; else a torch matmul and
   the first argmax). ``KEY_SUBSAMPLE`` = 2 scans only the checkerboard ``(y + x) % 2 == 0`` of
   the keys (all keys where none is on it), then takes the best (in reduced score) of that key
   and its four neighbours: half the scan, but in the pipeline it raised the hole L1 of chelsea's
   free-form mask by 5 % over the exact search, on every seed, where the full scan is level with
   it. The full scan costs Nq * Nk * d multiply-adds, D/d = 36x fewer than the exact search at
   relu3_1, in int8, plus a projection of O((Nq + Nk) * D * d). Skipped when D <= 2 * d (nothing to save).
2. *Full-dimension choice and propagation*. The starting field is the reduced answer, or with
   an ``init`` the better of the two in exact score; then ``PROPAGATION_ROUNDS`` = 1 round
   (Jacobi: each round from the previous round's field) in which each query also scores its
   four neighbours' keys shifted by the offset (:func:`neighbour_candidates`), keeping the
   best. Each candidate costs one full patch dot product: 5 per query (6 with ``init``).
3. ``n - 1`` *PatchMatch iterations* at full dimension, as below, from that field.

The best is always the highest score, then the lowest key position: the order of the exact
search, so the exact answer as ``init`` comes back unchanged. ``iterations=0`` returns
``init`` (repaired where it names no valid key) with its scores.

PatchMatch iterations:

- A *field* holds, for every query, one key centre (flat ``y*W' + x`` in the key map)
  and its score ``<q,k>/|k|``.
- Each iteration ``t`` runs two sweeps: along the rows (left to right), then along the
  columns (top to bottom); both run backwards on odd iterations. At each query ``p``:

  1. *Propagation* from the neighbour ``n = p - d`` one step back along the sweep (``d``
     the sweep direction), if it is a query: the candidate ``field[n] + d``, using ``n``'s
     value from this sweep (Gauss-Seidel along the line).
  2. *Random search* around the best so far, ``(cy, cx)``: one candidate
     ``(cy + u, cx + v)``, clamped to the key map, with ``u, v`` uniform in ``[-R, R]`` for
     each radius ``R = max(H', W'), R/2, ..., 1`` (integer halving); then one key drawn
     uniformly from the key list, which keeps sparse key masks reachable.

  A query reads only its own line, so the lines of a sweep are independent chains: that
  is the parallelism (OpenMP threads, Triton program lanes, torch vectorises one step of
  all lines), and the result does not depend on it.
- A candidate counts only if it is a valid key (see :func:`search_problems`).
- Random numbers are a counter hash (:func:`random_u32`) of ``(seed, t, sample, query)``:
  no generator state, the same in torch, C++ and Triton, which therefore return the same
  field wherever their float sums agree (exactly, for integer-valued features).

Measured (real relu3_1 / relu4_1 features of photos, 16k x 64k, 2 shared cores; the
ratios are deterministic, the times vary with the load): relu3_1 at 64 dimensions reaches a
mean score ratio of 0.9924 to the exact best (48 dimensions 0.9885; the float32 scan of 48
dimensions took 0.42 s where the int8 VNNI scan takes about 0.13 s, and 127 quantisation
levels cost nothing measurable against 591: 0.9886 for 0.9887); relu4_1 (D = 4608) 0.958 at 64
dimensions, 0.974 at 96, 0.9805 at 128 (the default), 0.987 at 128 with two propagation
rounds. Earlier: a further PatchMatch iteration adds about +0.003 for the cost of about 22
full candidates per query; PatchMatch iterations alone plateau near 0.97 (12 iterations) at
about 3 us per candidate (a 9 KB key patch read), and a PatchMatch over the reduced features
instead of the exhaustive scan plateaued the same way (0.96 after 8 iterations): hence the
exhaustive reduced scan and ``iterations=1`` by default. See the README's "Approximate
search" table for the times against the exact search.

This module holds the shared problem setup, the reduced stage, the random numbers, the
schedule and the torch reference backend; the fused backends live in
``csrc/patchmatch_cpu.cpp`` (``neuralpatch._cpu``: the sweeps and the reduced scan) and
``kernels/patchmatch.py`` (the sweeps; the reduced scan runs as a torch matmul on the GPU).
``neuralpatch.ops`` dispatches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from neuralpatch._checks import check_launch_tensor, check_patchmatch_launch
from neuralpatch._torch import box_sum_of_squares, round_to_tf32
from neuralpatch.geometry import interior

__all__ = [
    "DEFAULT_ITERATIONS",
    "hash_u32",
    "random_u32",
    "sample_base",
    "search_radii",
    "search_problems",
    "initial_field",
    "item_seed",
    "torch_patchmatch_fwd",
    "reduced_problem",
    "reduced_best",
    "torch_reduced_argmax",
    "cpp_reduced_argmax",
    "staged_search",
]

# iterations = 1: the reduced stage and the propagation round, no full PatchMatch sweep (see
# the module docstring); every further iteration costs about 22 full candidates per query.
DEFAULT_ITERATIONS = 1

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_INIT_STREAM = 0x5BD1E995
# random samples of one sweep are numbered below this (radii: at most 31), two sweeps per
# iteration, so (iteration, sample) never collide
SAMPLES_PER_SWEEP = 32
_SAMPLES_PER_ITERATION = 2 * SAMPLES_PER_SWEEP


# --------------------------------------------------------------------------- #
# counter-based random numbers (identical in every backend)
# --------------------------------------------------------------------------- #


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for int64 tensors holding uint32 values, without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def hash_u32(x):
    """The ``lowbias32`` integer hash (C. Wellons) of uint32 values: a Python int or an int64 tensor."""
    if isinstance(x, Tensor):
        x = x ^ (x >> 16)
        x = _mul32(x, 0x7FEB352D)
        x = x ^ (x >> 15)
        x = _mul32(x, 0x846CA68B)
        return x ^ (x >> 16)
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def sample_base(seed: int, iteration: int, sample: int) -> int:
    """The uint32 stream key of one random sample of one iteration."""
    return hash_u32((seed + _GOLDEN * (iteration * _SAMPLES_PER_ITERATION + sample + 1)) & _MASK32)


def random_u32(seed: int, iteration: int, sample: int, query: Tensor) -> Tensor:
    """uint32 random numbers (in int64) for query indices ``query`` (Nq,) int64."""
    return hash_u32(query ^ sample_base(seed, iteration, sample))


def item_seed(seed: int, item: int) -> int:
    """The uint32 seed of batch item ``item``: distinct items draw distinct streams."""
    return hash_u32((seed & _MASK32) ^ hash_u32(item + 1))


# --------------------------------------------------------------------------- #
# schedule
# --------------------------------------------------------------------------- #


def search_radii(key_height: int, key_width: int) -> list[int]:
    """Random-search radii ``max(H', W')``, halved (integer division) down to 1."""
    radius, radii = max(key_height, key_width), []
    while radius >= 1:
        radii.append(radius)
        radius //= 2
    return radii


# --------------------------------------------------------------------------- #
# the per-item problem every backend receives
# --------------------------------------------------------------------------- #


def _as_search_input(feat: Tensor, precision: str, backend: str) -> Tensor:
    """Features rounded to the precision's input format, held as float32 (float64 for the
    torch backend on float64 input at fp32): products of rounded values are exact in fp32."""
    if precision == "bf16":
        return feat.to(torch.bfloat16).to(torch.float32)
    if backend == "torch" and feat.dtype == torch.float64 and precision == "fp32":
        return feat
    feat = feat.to(torch.float32)
    return round_to_tf32(feat) if precision == "tf32" else feat


def search_problems(query_feat, key_feat, query_mask, key_mask, patch_size, precision, backend):
    """Per batch item, ``(item, problem)``; ``problem`` is None for an item without queries, else
    a dict of the backend contract:

    - ``query_map``: (Hq+2r, Wq+2r, C) channels-last, zero-padded by r = k//2;
    - ``key_map``: (Hk, Wk, C) channels-last;
    - ``query_center``: (Nq,) int32 flat ``y*Wq + x`` of each query (row-major order);
    - ``query_slot``: (Hq, Wq) int32, the query index at each position or -1;
    - ``key_center``: (Nk,) int32 flat centres of the valid keys, ascending;
    - ``key_inv_norm``: (Hk, Wk) float32 ``1/|k|`` at valid keys, 0 elsewhere (the validity map);
    - ``query_norm``: (Nq,) ``|q|``, for turning scores into NCC.

    Valid keys are those of the exact search: inside ``key_mask``, the whole patch in the
    map, nonzero norm (unless every key is zero; then only the first one).

    Inputs are batched: (B, C, H, W) features and (B, H, W) bool masks.
    """
    r = patch_size // 2
    batch, _, hq, wq = query_feat.shape
    hk, wk = key_feat.shape[-2:]
    key_interior = interior(hk, wk, patch_size, key_feat.device)
    for b in range(batch):
        q_centres = query_mask[b].reshape(-1).nonzero().squeeze(1)
        if q_centres.numel() == 0:
            yield b, None
            continue
        k_centres = (key_mask[b] & key_interior).reshape(-1).nonzero().squeeze(1)
        if k_centres.numel() == 0:
            raise ValueError(
                f"key_mask: selects no key whose {patch_size}x{patch_size} patch lies inside key_feat"
                + (f" (batch item {b})" if batch > 1 else "")
            )
        # the inpainting search passes one map as both: its setup is shared
        same = (
            query_feat[b].data_ptr() == key_feat[b].data_ptr()
            and query_feat[b].shape == key_feat[b].shape
            and query_feat[b].stride() == key_feat[b].stride()
        )
        k_feat = _as_search_input(key_feat[b], precision, backend)
        q_feat = k_feat if same else _as_search_input(query_feat[b], precision, backend)
        k_box = box_sum_of_squares(k_feat, patch_size)
        q_box = k_box if same else box_sum_of_squares(q_feat, patch_size)
        q_norm = q_box.sqrt()[q_centres]
        k_norm = k_box.sqrt()[k_centres]
        nonzero = k_norm > 0
        if not bool(nonzero.all()):
            any_nonzero = bool(nonzero.any())
            k_centres = k_centres[nonzero] if any_nonzero else k_centres[:1]
            k_norm = k_norm[nonzero] if any_nonzero else torch.ones_like(k_norm[:1])
        inv_norm = torch.zeros(hk * wk, dtype=torch.float32, device=key_feat.device)
        inv_norm[k_centres] = (1.0 / k_norm).to(torch.float32)
        slot = torch.full((hq * wq,), -1, dtype=torch.int32, device=query_feat.device)
        slot[q_centres] = torch.arange(q_centres.numel(), dtype=torch.int32, device=query_feat.device)
        key_map = k_feat.permute(1, 2, 0).contiguous()
        query_map = F.pad(key_map if same else q_feat.permute(1, 2, 0), (0, 0, r, r, r, r))
        yield (
            b,
            {
                "query_map": query_map.contiguous(),
                "key_map": key_map,
                "query_center": q_centres.to(torch.int32),
                "query_slot": slot.view(hq, wq),
                "key_center": k_centres.to(torch.int32),
                "key_inv_norm": inv_norm.view(hk, wk),
                "query_norm": q_norm,
                "same_map": same,
            },
        )


def initial_field(init: Tensor | None, key_center: Tensor, key_inv_norm: Tensor, nq: int, seed: int) -> Tensor:
    """(Nq,) int32 starting key centres: ``init`` where it names a valid key, else a key
    drawn uniformly from ``key_center`` (Nk,) with the seed's init stream.

    init: None or (Nq,) int64/int32 flat key positions, e.g. the previous round's index.
    """
    device = key_center.device
    q = torch.arange(nq, dtype=torch.int64, device=device)
    draw = hash_u32(q ^ hash_u32(seed ^ _INIT_STREAM)) % key_center.numel()
    field = key_center.to(torch.int64)[draw]
    if init is not None:
        init = init.to(device=device, dtype=torch.int64)
        inside = (init >= 0) & (init < key_inv_norm.numel())
        valid = inside & (key_inv_norm.reshape(-1)[init.clamp(0, key_inv_norm.numel() - 1)] > 0)
        field = torch.where(valid, init, field)
    return field.to(torch.int32)


# --------------------------------------------------------------------------- #
# torch backend (reference; CPU and GPU)
# --------------------------------------------------------------------------- #


def _taps(patch_size: int, width: int, device) -> Tensor:
    d = torch.arange(patch_size, device=device)
    return (d[:, None] * width + d[None, :]).reshape(-1)


def _line_order(query_center: Tensor, height: int, width: int, vertical: bool, reverse: bool) -> list[Tensor]:
    """The queries of a sweep, grouped by step: for a horizontal sweep, step ``x`` holds the
    queries of column ``x`` (ascending ``y``); steps run in reverse for a backward sweep."""
    qc = query_center.to(torch.int64)
    along, across = (qc // width, qc % width) if vertical else (qc % width, qc // width)
    steps = height if vertical else width
    order = torch.argsort(along * (width + height) + across)
    counts = torch.bincount(along, minlength=steps).tolist()
    groups = list(torch.split(order, counts))
    return groups[::-1] if reverse else groups


def torch_patchmatch_fwd(
    query_map: Tensor,
    key_map: Tensor,
    query_center: Tensor,
    query_slot: Tensor,
    key_center: Tensor,
    key_inv_norm: Tensor,
    init_field: Tensor,
    patch_size: int,
    iterations: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """PatchMatch in plain torch, one vectorised step per column (row) of a sweep.

    Args:
        query_map: (Hq+2r, Wq+2r, C) float32/float64, zero-padded by r = k//2.
        key_map: (Hk, Wk, C) same dtype.
        query_center: (Nq,) int32 flat ``y*Wq + x`` of the queries.
        query_slot: (Hq, Wq) int32 query index at each position, -1 where none.
        key_center: (Nk,) int32 flat centres of the valid keys, Nk >= 1.
        key_inv_norm: (Hk, Wk) float32 ``1/|k|`` at valid keys, 0 elsewhere.
        init_field: (Nq,) int32 valid key centres to start from.
        patch_size: odd k; iterations >= 0; seed: uint32.

    Returns:
        best centre (Nq,) int32 and its score ``<q,k>/|k|`` (Nq,) float32.

    Working set: the patches of one column (row) of queries and of one candidate per query.
    """
    device = query_map.device
    hq, wq = query_slot.shape
    hk, wk, channels = key_map.shape
    wq_pad = query_map.shape[1]
    r = patch_size // 2
    nq, nk = query_center.numel(), key_center.numel()
    q_flat = query_map.reshape(-1, channels)
    k_flat = key_map.reshape(-1, channels)
    q_taps = _taps(patch_size, wq_pad, device)
    k_taps = _taps(patch_size, wk, device)
    inv_flat = key_inv_norm.reshape(-1).to(query_map.dtype)
    slot_flat = query_slot.reshape(-1).to(torch.int64)
    qc = query_center.to(torch.int64)
    qy, qx = qc // wq, qc % wq
    q_top_left = qy * wq_pad + qx
    key_center = key_center.to(torch.int64)
    radii = search_radii(hk, wk)

    def patches(ids: Tensor) -> Tensor:
        return q_flat[q_top_left[ids, None] + q_taps[None, :]].reshape(ids.shape[0], -1)

    def score(q_patches: Tensor, centre: Tensor, ok: Tensor) -> Tensor:
        """<q, k>/|k| of each query's candidate centre; -inf where ``ok`` is False or the key invalid."""
        centre = torch.where(ok, centre, 0)
        inv = inv_flat[centre]
        ok = ok & (inv > 0)
        top_left = torch.where(ok, centre - r * wk - r, 0)
        k_patches = k_flat[top_left[:, None] + k_taps[None, :]].reshape(centre.shape[0], -1)
        dot = (q_patches * k_patches).sum(1)
        return torch.where(ok, dot * inv, torch.full_like(dot, float("-inf")))

    def better(value, centre, best_value, best_centre):
        take = (value > best_value) | ((value == best_value) & (centre < best_centre))
        return torch.where(take, value, best_value), torch.where(take, centre, best_centre)

    field = init_field.to(torch.int64).clone()
    value = torch.empty(nq, dtype=query_map.dtype, device=device)
    everyone = torch.arange(nq, device=device)
    for ids in torch.split(everyone, max(1, (1 << 26) // (channels * patch_size**2 * 8))):
        value[ids] = score(patches(ids), field[ids], torch.ones_like(ids, dtype=torch.bool))

    for t in range(iterations):
        reverse = t % 2 == 1
        for sweep, vertical in enumerate((False, True)):
            dy, dx = (1, 0) if vertical else (0, 1)
            if reverse:
                dy, dx = -dy, -dx
            for ids in _line_order(query_center, hq, wq, vertical, reverse):
                if ids.numel() == 0:
                    continue
                qp = patches(ids)
                best_value, best_centre = value[ids], field[ids]
                # 1. propagation from the neighbour one step back along the sweep (already updated)
                ny, nx = qy[ids] - dy, qx[ids] - dx
                inside = (ny >= 0) & (ny < hq) & (nx >= 0) & (nx < wq)
                neighbour = slot_flat[torch.where(inside, ny * wq + nx, 0)]
                ok = inside & (neighbour >= 0)
                f = field[neighbour.clamp_min(0)]
                cy, cx = f // wk + dy, f % wk + dx
                ok = ok & (cy >= 0) & (cy < hk) & (cx >= 0) & (cx < wk)
                candidate = cy * wk + cx
                best_value, best_centre = better(score(qp, candidate, ok), candidate, best_value, best_centre)
                # 2. random search around that best, then one key drawn from the whole list
                cy, cx = best_centre // wk, best_centre % wk
                always = torch.ones_like(ids, dtype=torch.bool)
                base = sweep * SAMPLES_PER_SWEEP
                for sample, radius in enumerate(radii):
                    h = random_u32(seed, t, base + sample, ids)
                    u = h % (2 * radius + 1) - radius
                    v = hash_u32(h) % (2 * radius + 1) - radius
                    candidate = (cy + u).clamp(0, hk - 1) * wk + (cx + v).clamp(0, wk - 1)
                    best_value, best_centre = better(score(qp, candidate, always), candidate, best_value, best_centre)
                candidate = key_center[random_u32(seed, t, base + len(radii), ids) % nk]
                best_value, best_centre = better(score(qp, candidate, always), candidate, best_value, best_centre)
                field[ids], value[ids] = best_centre, best_value
    return field.to(torch.int32), value.to(torch.float32)


# --------------------------------------------------------------------------- #
# cpp backend: tensor launcher for neuralpatch._cpu (imported lazily)
# --------------------------------------------------------------------------- #

_CPU_NOT_BUILT = (
    "neuralpatch._cpu was not built: reinstall with a C++ compiler available (`pip install -e .`; NEURALPATCH_NO_CPU_EXT must not be 1)"
)


def cpu_available() -> tuple[bool, str]:
    """(True, "") when the C++ CPU module imports, else (False, reason)."""
    try:
        from neuralpatch import _cpu  # noqa: F401
    except ImportError as exc:
        return False, f"{_CPU_NOT_BUILT} ({exc})"
    return True, ""


def cpp_patchmatch_fwd(
    query_map: Tensor,
    key_map: Tensor,
    query_center: Tensor,
    query_slot: Tensor,
    key_center: Tensor,
    key_inv_norm: Tensor,
    init_field: Tensor,
    patch_size: int,
    iterations: int,
    seed: int,
    num_threads: int | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`torch_patchmatch_fwd` on the C++ kernel (float32 CPU tensors, same shapes).

    num_threads: OpenMP threads; None follows ``torch.get_num_threads()``.
    Returns best centre (Nq,) int32 and its score (Nq,) float32.
    """
    inputs = dict(
        query_map=query_map, query_center=query_center, query_slot=query_slot, key_map=key_map,
        key_center=key_center, key_inv_norm=key_inv_norm, init_field=init_field,
    )  # fmt: skip
    check_patchmatch_launch(inputs, patch_size, device_type="cpu")
    hq, wq = query_slot.shape
    hk, wk, channels = key_map.shape
    r = patch_size // 2
    if tuple(query_map.shape) != (hq + 2 * r, wq + 2 * r, channels):
        raise ValueError(
            f"query_map: expected shape {(hq + 2 * r, wq + 2 * r, channels)} (query_slot's map padded by "
            f"{r}, key_map's channels), got {tuple(query_map.shape)}"
        )
    if tuple(key_inv_norm.shape) != (hk, wk):
        raise ValueError(f"key_inv_norm: expected shape {(hk, wk)} to match key_map, got {tuple(key_inv_norm.shape)}")
    nq = query_center.numel()
    if init_field.numel() != nq:
        raise ValueError(f"init_field: has {init_field.numel()} entries, query_center has {nq}")
    field = torch.empty(nq, dtype=torch.int32)
    value = torch.empty(nq, dtype=torch.float32)
    if nq == 0:
        return field, value
    try:
        from neuralpatch import _cpu
    except ImportError as exc:
        raise RuntimeError(_CPU_NOT_BUILT) from exc
    threads = torch.get_num_threads() if num_threads is None else num_threads
    _cpu.patchmatch(
        query_map.data_ptr(), key_map.data_ptr(), query_center.data_ptr(), query_slot.data_ptr(),
        key_center.data_ptr(), key_inv_norm.data_ptr(), init_field.data_ptr(), field.data_ptr(),
        value.data_ptr(), nq, key_center.numel(), channels, patch_size, hq, wq, hk, wk, iterations,
        seed, threads,
    )  # fmt: skip
    return field, value


# --------------------------------------------------------------------------- #
# the reduced-space stage: PatchMatch over PCA-projected, integer-quantised patches
# --------------------------------------------------------------------------- #

REDUCED_DIM = 64  # the reduced dimension at patch dimensions up to REDUCED_DIM_AT
REDUCED_DIM_AT = 2304  # relu3_1 with 3x3 patches; larger patches get proportionally more


def reduced_dim(full_dim: int) -> int:
    """The reduced dimension for patches of ``full_dim`` values: REDUCED_DIM up to
    REDUCED_DIM_AT, then in proportion (a multiple of 4, at most 256): 128 at relu4_1."""
    if full_dim <= REDUCED_DIM_AT:
        return REDUCED_DIM
    return min(256, -(-REDUCED_DIM * full_dim // (4 * REDUCED_DIM_AT)) * 4)


_PCA_SAMPLES = 1024
_PCA_OVERSAMPLE = 8
_REDUCED_STREAM = 0x27D4EB2F


def _reduced_levels(dim: int) -> int:
    """The quantisation bound L of the reduced entries: 127 (int8, for the C++ VNNI scan), or
    less where ``dim * L**2 >= 2**24``, so that integer dot products of vectors with entries in
    [-L, L] are exact in float32 (the torch backends), whatever the summation order."""
    level = min(127, int((2**24 / dim) ** 0.5))
    while dim * level * level >= 2**24:
        level -= 1
    return level


def _sample_patches(feat_hwc: Tensor, centres: Tensor, width: int, patch_size: int, count: int) -> Tensor:
    """(n, C*k*k) patches (layout (dy*k + dx)*C + c) at up to ``count`` evenly spaced ``centres``."""
    n = centres.numel()
    pick = centres if n <= count else centres[torch.linspace(0, n - 1, count, device=centres.device).long()]
    channels = feat_hwc.shape[-1]
    r = patch_size // 2
    flat = feat_hwc.reshape(-1, channels)
    top_left = (pick // width - r) * width + pick % width - r
    taps = _taps(patch_size, width, feat_hwc.device)
    return flat[top_left[:, None] + taps[None, :]].reshape(pick.numel(), -1)


def _orthonormal(y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of tall ``y`` (n, l), from the Cholesky factor of the
    small Gram matrix (cheaper than a QR of the tall matrix), or its eigenvectors where it is
    nearly singular (near-null directions are then dropped)."""
    gram = (y.T @ y).to(torch.float64)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0 and bool((chol.diagonal() > chol.diagonal().amax() * 1e-6).all()):
        eye = torch.eye(gram.shape[0], dtype=torch.float64, device=y.device)
        return (y.to(torch.float64) @ torch.linalg.solve_triangular(chol.T, eye, upper=True)).to(y.dtype)
    evals, evecs = torch.linalg.eigh(gram)  # (nearly) rank-deficient: tiny problems
    keep = evals > evals[-1].clamp_min(1e-300) * 1e-10
    return (y.to(torch.float64) @ (evecs[:, keep] / evals[keep].sqrt())).to(y.dtype)


def _pca_basis(samples: Tensor, dim: int, seed: int) -> Tensor:
    """(D, d <= dim) orthonormal top right-singular vectors of the (uncentred) samples (n, D), by a
    randomised range finder (a seeded Gaussian sketch, one power iteration), then the
    eigenvectors of the small projected Gram matrix, in order of decreasing eigenvalue."""
    n, d_full = samples.shape
    sketch = min(d_full, n, dim + _PCA_OVERSAMPLE)
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(d_full, sketch, generator=gen, dtype=torch.float32).to(samples.device)
    x = samples.to(torch.float32)
    z = omega
    for _ in range(1):
        z = _orthonormal(x.T @ _orthonormal(x @ z))  # (D, l): the dominant right subspace
    b = (x @ z).to(torch.float64)  # (n, l)
    evals, evecs = torch.linalg.eigh(b.T @ b)
    order = torch.argsort(evals, descending=True)[:dim]
    return (z.to(torch.float64) @ evecs[:, order]).to(torch.float32).contiguous()


def _project(feat_hwc: Tensor, top_left: Tensor, basis: Tensor, patch_size: int) -> Tensor:
    """(N, d) projections on ``basis`` (D, d) of the patches whose top-left positions in the
    channels-last map ``feat_hwc`` (H, W, C) are ``top_left`` (N,): one GEMM of the map's rows
    that some patch touches with every tap's block of the basis, then the taps' sums."""
    _, w, c = feat_hwc.shape
    k = patch_size
    d = basis.shape[1]
    offsets = _taps(k, w, feat_hwc.device)  # (k*k,)
    flat = feat_hwc.reshape(-1, c)
    row = torch.zeros(flat.shape[0], dtype=torch.int64, device=flat.device)
    row[(top_left[:, None] + offsets[None, :]).reshape(-1)] = 1
    touched = row.nonzero().squeeze(1)
    row[touched] = torch.arange(touched.numel(), device=flat.device)
    taps = basis.reshape(k * k, c, d).permute(1, 0, 2).reshape(c, k * k * d)
    m = (flat[touched].to(torch.float32) @ taps).view(-1, d)  # row i*k*k + t: tap t at touched[i]
    taps_of = row[top_left[:, None] + offsets[None, :]] * (k * k) + torch.arange(k * k, device=flat.device)
    return F.embedding_bag(taps_of, m, mode="sum")  # (N, d): the sum of each patch's k*k tap rows


def reduced_problem(problem: dict, patch_size: int, dim: int, seed: int) -> dict | None:
    """The problem in a reduced space, for a patch size of 1: every position's patch projected on
    the top ``dim`` principal directions of sampled query and key patches, keys divided by their
    full norm, then rounded to integers (keys on one scale, each query on its own, which leaves
    its ranking of keys unchanged) so that every backend's dot products are exact. None when the
    patches have no more than ``dim`` dimensions (nothing to save) or too few samples.

    Returns a dict of :func:`search_problems`' keys (``key_inv_norm`` is 1 at valid keys), plus
    ``queries`` (Nq, d) and ``keys`` (Nk, d): the rows of the query and valid key centres.
    """
    query_map, key_map = problem["query_map"], problem["key_map"]
    channels = key_map.shape[-1]
    full_dim = channels * patch_size**2
    if full_dim <= 2 * dim:
        return None
    r = patch_size // 2
    hq, wq = problem["query_slot"].shape
    hk, wk = key_map.shape[:2]
    qc = problem["query_center"].to(torch.int64)
    kc = problem["key_center"].to(torch.int64)
    wq_pad = wq + 2 * r
    q_centres_padded = (qc // wq + r) * wq_pad + qc % wq + r
    samples = torch.cat(
        [
            _sample_patches(query_map, q_centres_padded, wq_pad, patch_size, _PCA_SAMPLES // 2),
            _sample_patches(key_map, kc, wk, patch_size, _PCA_SAMPLES // 2),
        ]
    ).to(torch.float32)
    if samples.shape[0] < dim:
        return None
    basis = _pca_basis(samples, dim, seed)  # (D, d), rows in patch layout (dy*k + dx)*C + c
    d = basis.shape[1]
    inv = problem["key_inv_norm"].reshape(-1).to(torch.float32)
    q_top_left = (qc // wq) * wq_pad + qc % wq
    if problem.get("same_map", False):
        # one map for both (the inpainting search): one projection of the padded map's rows
        k_top_left = (kc // wk) * wq_pad + kc % wk
        both = _project(query_map, torch.cat([q_top_left, k_top_left]), basis, patch_size)
        q_red, k_red = both[: qc.numel()], both[qc.numel() :] * inv[kc, None]
    else:
        q_red = _project(query_map, q_top_left, basis, patch_size)  # (Nq, d)
        k_red = _project(key_map, kc - r * wk - r, basis, patch_size) * inv[kc, None]  # (Nk, d)
    levels = _reduced_levels(d)
    # each direction on its own key scale (the query scaled inversely: dot products unchanged),
    # then each query on its own scale (its ranking of keys unchanged)
    k_range = k_red.abs().amax(0).clamp_min(1e-30)  # (d,)
    k_scale = levels / k_range
    q_red = q_red * k_range
    q_scale = levels / q_red.abs().amax(1, keepdim=True).clamp_min(1e-30)
    q_int = torch.round(q_red * q_scale).clamp(-levels, levels)
    k_int = torch.zeros(hk * wk, d, dtype=torch.float32, device=key_map.device)
    k_int[kc] = torch.round(k_red * k_scale).clamp(-levels, levels)
    q_map = torch.zeros(hq * wq, d, dtype=torch.float32, device=query_map.device)
    q_map[qc] = q_int
    return {
        "queries": q_int.contiguous(),
        "keys": k_int[kc],
        "query_map": q_map.view(hq, wq, d),
        "key_map": k_int.view(hk, wk, d),
        "query_center": problem["query_center"],
        "query_slot": problem["query_slot"],
        "key_center": problem["key_center"],
        "key_inv_norm": (inv > 0).to(torch.float32).view(hk, wk),
    }


def _problem_args(problem: dict) -> tuple:
    return tuple(problem[n] for n in ("query_map", "key_map", "query_center", "query_slot", "key_center", "key_inv_norm"))


def _better(value_a, centre_a, value_b, centre_b):
    """Per query, the better of two (value, centre) fields: the higher value, then the lower centre."""
    take = (value_b > value_a) | ((value_b == value_a) & (centre_b < centre_a))
    return torch.where(take, value_b, value_a), torch.where(take, centre_b, centre_a)


def _reduced_operands(small: dict):
    return small["queries"], small["keys"], small["key_center"].to(torch.int64)


def torch_reduced_argmax(queries: Tensor, keys: Tensor, chunk_bytes: int = 1 << 24) -> Tensor:
    """(Nq,) int64: for every row of ``queries`` (Nq, d) the first row of ``keys`` (Nk, d) of
    the highest dot product (matmul, then the first argmax)."""
    keys_t = keys.T.contiguous()
    rows = max(1, chunk_bytes // (4 * keys.shape[0]))
    best = torch.empty(queries.shape[0], dtype=torch.int64, device=queries.device)
    for s in range(0, queries.shape[0], rows):
        # torch.max returns the first maximal index
        best[s : s + rows] = (queries[s : s + rows] @ keys_t).max(1).indices
    return best


def cpp_reduced_argmax(queries: Tensor, keys: Tensor, num_threads: int | None = None) -> Tensor:
    """:func:`torch_reduced_argmax` on the C++ kernel (float32 CPU tensors); equal to it when
    the entries are integers whose dot products stay below 2**24 (every sum exact). Entries
    that are integers in [-127, 127] take the int8 kernel (AVX512-VNNI where the CPU has it)."""
    check_launch_tensor("queries", queries, ndim=2, dtypes=(torch.float32,), device_type="cpu")
    if keys.dtype != torch.float32 or keys.dim() != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(f"keys: expected float32 (Nk, {queries.shape[1]}), got {keys.dtype} {tuple(keys.shape)}")
    nq, d = queries.shape
    nk = keys.shape[0]
    nk_pad = -(-nk // 16) * 16
    out = torch.empty(nq, dtype=torch.int32)
    if nq == 0:
        return out.to(torch.int64)
    try:
        from neuralpatch import _cpu
    except ImportError as exc:
        raise RuntimeError(_CPU_NOT_BUILT) from exc
    threads = torch.get_num_threads() if num_threads is None else num_threads
    queries, keys = queries.contiguous(), keys.contiguous()
    if nk > 0 and d <= 256 and _cpu.reduced_argmax_i8(queries.data_ptr(), keys.data_ptr(), out.data_ptr(), nq, nk, d, threads):
        return out.to(torch.int64)
    keys_t = torch.zeros(d, nk_pad, dtype=torch.float32)
    keys_t[:, :nk] = keys.T
    _cpu.reduced_argmax(queries.data_ptr(), keys_t.data_ptr(), out.data_ptr(), nq, nk, nk_pad, d, threads)
    return out.to(torch.int64)


KEY_SUBSAMPLE = 1  # the exhaustive stage scans all keys (2: those with (y + x) % 2 == 0; see the module docstring)


def _reduced_score(small: dict, queries: Tensor, cand: Tensor) -> Tensor:
    """(Nq, m) reduced scores (exact integer sums) of ``cand`` (Nq, m) key centres; -inf where invalid."""
    d = small["key_map"].shape[-1]
    flat = small["key_map"].reshape(-1, d)
    valid = small["key_inv_norm"].reshape(-1)[cand] > 0
    dots = (flat[cand] * queries[:, None, :]).sum(-1)
    return torch.where(valid, dots, torch.full_like(dots, float("-inf")))


def _pick(scores: Tensor, cand: Tensor) -> Tensor:
    """Per row, the candidate of the highest score, the lowest centre among ties."""
    top = scores.amax(1, keepdim=True)
    big = torch.iinfo(torch.int64).max
    return torch.where(scores == top, cand, big).amin(1)


def reduced_best(small: dict, argmax=torch_reduced_argmax) -> Tensor:
    """(Nq,) int32: for every query a valid key of high reduced score: the exhaustive best over
    the scanned keys (every key, or the checkerboard (y + x) % 2 == 0 of them when
    KEY_SUBSAMPLE = 2, the lowest position among ties; integer dot products, exact in
    float32), then the best of it and its four neighbours in the key map."""
    queries, keys, kc = _reduced_operands(small)
    hk, wk = small["key_inv_norm"].shape
    scan = kc
    if KEY_SUBSAMPLE == 2:
        on = (kc // wk + kc % wk) % 2 == 0
        if bool(on.any()):
            scan = kc[on]
            keys = keys[on]
    best = scan[argmax(queries, keys)]
    if scan.numel() != kc.numel():
        by, bx = best // wk, best % wk
        cands = [best]
        for dy, dx in _DIRECTIONS:
            y, x = (by + dy).clamp(0, hk - 1), (bx + dx).clamp(0, wk - 1)
            cands.append(y * wk + x)
        cand = torch.stack(cands, 1)
        best = _pick(_reduced_score(small, queries, cand), cand)
    return best.to(torch.int32)


def neighbour_candidates(field: Tensor, problem: dict, dy: int, dx: int) -> Tensor:
    """(Nq,) int32: for every query p, the field of its neighbour p - (dy, dx) shifted by
    (dy, dx), where that neighbour is a query and the shifted centre a valid key; else field[p]."""
    hq, wq = problem["query_slot"].shape
    hk, wk = problem["key_inv_norm"].shape
    qc = problem["query_center"].to(torch.int64)
    qy, qx = qc // wq, qc % wq
    ny, nx = qy - dy, qx - dx
    inside = (ny >= 0) & (ny < hq) & (nx >= 0) & (nx < wq)
    neighbour = problem["query_slot"].reshape(-1)[torch.where(inside, ny * wq + nx, 0)].to(torch.int64)
    ok = inside & (neighbour >= 0)
    f = field.to(torch.int64)[neighbour.clamp_min(0)]
    cy, cx = f // wk + dy, f % wk + dx
    ok = ok & (cy >= 0) & (cy < hk) & (cx >= 0) & (cx < wk)
    cand = torch.where(ok, cy * wk + cx, 0)
    ok = ok & (problem["key_inv_norm"].reshape(-1)[cand] > 0)
    return torch.where(ok, cand, field.to(torch.int64)).to(torch.int32).contiguous()


PROPAGATION_ROUNDS = 1
_DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def staged_search(
    problem, init_field, patch_size, iterations, seed, launch, argmax=torch_reduced_argmax, has_init=True, dim=None, rounds=None
):
    """(field (Nq,) int32, value (Nq,)) of one item: the reduced stage, the propagation rounds,
    then ``iterations - 1`` PatchMatch iterations (module docstring); ``init_field`` (Nq,)
    int32 valid keys; ``has_init``: False when it is only the seed's random draw, which the
    reduced stage then replaces without a comparison. ``argmax`` is the reduced scan (:func:`torch_reduced_argmax` or
    :func:`cpp_reduced_argmax`); ``launch`` has the signature of :func:`torch_patchmatch_fwd`."""
    if dim is None:
        dim = reduced_dim(problem["key_map"].shape[-1] * patch_size**2)
    rounds = PROPAGATION_ROUNDS if rounds is None else rounds
    full = _problem_args(problem)
    if iterations == 0 or dim == 0:
        return launch(*full, init_field, patch_size, iterations, seed)
    small = reduced_problem(problem, patch_size, dim, seed)
    if small is None:
        return launch(*full, init_field, patch_size, iterations, seed)
    red_field = reduced_best(small, argmax)
    field, value = launch(*full, red_field, patch_size, 0, seed)
    if has_init:
        value, field = _better(value, field, *launch(*full, init_field, patch_size, 0, seed)[::-1])
    for _ in range(rounds):
        current = field
        for dy, dx in _DIRECTIONS:
            cand = neighbour_candidates(current, problem, dy, dx)
            cv = launch(*full, cand, patch_size, 0, seed)[1]
            value, field = _better(value, field, cv, cand)
    return launch(*full, field.contiguous(), patch_size, iterations - 1, seed)


def search_all(query_feat, key_feat, query_mask, key_mask, init, patch_size, precision, backend, iterations, seed, launch):
    """(index (Nq,) int64, NCC (Nq,) float32) over a batch, items in order.

    query_feat/key_feat: (B, C, H, W) and (B, C, H', W'); masks (B, H, W) / (B, H', W') bool;
    init: None or (Nq,) int key positions over the concatenated items; ``launch`` has the
    signature of :func:`torch_patchmatch_fwd` (without ``chunk_bytes``).
    """
    counts = query_mask.reshape(query_mask.shape[0], -1).sum(1).tolist()
    if init is not None and init.shape[0] != sum(counts):
        raise ValueError(f"init: has {init.shape[0]} entries but query_mask selects {sum(counts)} positions")
    indices, scores = [], []
    start = 0
    for b, problem in search_problems(query_feat, key_feat, query_mask, key_mask, patch_size, precision, backend):
        if problem is None:
            continue
        nq = counts[b]
        item = item_seed(seed, b)
        item_init = None if init is None else init[start : start + nq]
        start += nq
        field = initial_field(item_init, problem["key_center"], problem["key_inv_norm"], nq, item)
        argmax = cpp_reduced_argmax if backend == "cpp" else torch_reduced_argmax
        best, value = staged_search(problem, field, patch_size, iterations, item, launch, argmax, item_init is not None)
        q_norm = problem["query_norm"]
        ncc = torch.where(q_norm > 0, value.to(q_norm.dtype) / q_norm.clamp_min(1e-30), torch.zeros_like(q_norm))
        indices.append(best.to(torch.int64))
        scores.append(ncc.to(torch.float32))
    return torch.cat(indices), torch.cat(scores)
