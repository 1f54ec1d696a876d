"""PatchMatch over feature patches: the approximate search behind ``patch_nn(method="patchmatch")``.

The algorithm (Barnes et al. 2009, run over VGG features as in Liao et al. 2017), made
parallel so that every backend computes the same field:

- A *field* holds, for every query, one key centre (flat ``y*W' + x`` in the key map)
  and its score ``<q,k>/|k|``. It starts from ``init`` where that is a valid key, else
  from a key drawn uniformly from the key list.
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
- A candidate counts only if it is a valid key (see :func:`search_problems`). The best is
  the highest score, then the lowest key position: the order of the exact search, so the
  exact answer is a fixed point.
- Random numbers are a counter hash (:func:`random_u32`) of ``(seed, t, sample, query)``:
  no generator state, the same in torch, C++ and Triton, which therefore return the same
  field wherever their float sums agree (exactly, for integer-valued features).

This module holds the shared problem setup, the random numbers, the schedule and the
torch reference backend; the fused backends live in ``csrc/patchmatch_cpu.cpp``
(``neuralpatch._cpu``) and ``kernels/patchmatch.py``. ``neuralpatch.ops`` dispatches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
]

# bench/bench_patchmatch.py, relu3_1 of photos, Nq x Nk = 16k x 64k, cold start: mean score
# ratio to the exact best 0.927 after 2 iterations, 0.954 after 4, 0.966 after 8, 0.972
# after 12; each costs about as much as the first. 8 is the knee; warm starts need fewer.
DEFAULT_ITERATIONS = 8

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_INIT_STREAM = 0x5BD1E995
# random samples of one sweep are numbered below this (radii: at most 31), two sweeps per
# iteration, so (iteration, sample) never collide
_SAMPLES_PER_SWEEP = 32
_SAMPLES_PER_ITERATION = 2 * _SAMPLES_PER_SWEEP


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


def _interior(height: int, width: int, patch_size: int, device) -> Tensor:
    r = patch_size // 2
    inside = torch.zeros(height, width, dtype=torch.bool, device=device)
    inside[r : height - r, r : width - r] = True
    return inside


def _round_to_tf32(x: Tensor) -> Tensor:
    """Round float32 to the nearest tf32 value (10 mantissa bits)."""
    bits = x.contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    return ((bits + 0xFFF + lsb) & ~0x1FFF).view(torch.float32)


def _as_search_input(feat: Tensor, precision: str, backend: str) -> Tensor:
    """Features rounded to the precision's input format, held as float32 (float64 for the
    torch backend on float64 input at fp32): products of rounded values are exact in fp32."""
    if precision == "bf16":
        return feat.to(torch.bfloat16).to(torch.float32)
    if backend == "torch" and feat.dtype == torch.float64 and precision == "fp32":
        return feat
    feat = feat.to(torch.float32)
    return _round_to_tf32(feat) if precision == "tf32" else feat


def _box_sum_of_squares(feat_chw: Tensor, patch_size: int) -> Tensor:
    """|patch|^2 at every centre of a (C, H, W) map (zero padding), as (H*W,)."""
    sq = feat_chw.square().sum(0, keepdim=True)[None]
    r = patch_size // 2
    ones = torch.ones(1, 1, patch_size, patch_size, dtype=feat_chw.dtype, device=feat_chw.device)
    return F.conv2d(sq, ones, padding=r).reshape(-1)


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
    interior = _interior(hk, wk, patch_size, key_feat.device)
    for b in range(batch):
        q_centres = query_mask[b].reshape(-1).nonzero().squeeze(1)
        if q_centres.numel() == 0:
            yield b, None
            continue
        k_centres = (key_mask[b] & interior).reshape(-1).nonzero().squeeze(1)
        if k_centres.numel() == 0:
            raise ValueError(
                f"key_mask: selects no key whose {patch_size}x{patch_size} patch lies inside key_feat"
                + (f" (batch item {b})" if batch > 1 else "")
            )
        q_feat = _as_search_input(query_feat[b], precision, backend)
        k_feat = _as_search_input(key_feat[b], precision, backend)
        q_norm = _box_sum_of_squares(q_feat, patch_size).sqrt()[q_centres]
        k_norm = _box_sum_of_squares(k_feat, patch_size).sqrt()[k_centres]
        nonzero = k_norm > 0
        if not bool(nonzero.all()):
            any_nonzero = bool(nonzero.any())
            k_centres = k_centres[nonzero] if any_nonzero else k_centres[:1]
            k_norm = k_norm[nonzero] if any_nonzero else torch.ones_like(k_norm[:1])
        inv_norm = torch.zeros(hk * wk, dtype=torch.float32, device=key_feat.device)
        inv_norm[k_centres] = (1.0 / k_norm).to(torch.float32)
        slot = torch.full((hq * wq,), -1, dtype=torch.int32, device=query_feat.device)
        slot[q_centres] = torch.arange(q_centres.numel(), dtype=torch.int32, device=query_feat.device)
        yield b, {
            "query_map": F.pad(q_feat, (r, r, r, r)).permute(1, 2, 0).contiguous(),
            "key_map": k_feat.permute(1, 2, 0).contiguous(),
            "query_center": q_centres.to(torch.int32),
            "query_slot": slot.view(hq, wq),
            "key_center": k_centres.to(torch.int32),
            "key_inv_norm": inv_norm.view(hk, wk),
            "query_norm": q_norm,
        }


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
                base = sweep * _SAMPLES_PER_SWEEP
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
    "neuralpatch._cpu was not built: reinstall with a C++ compiler available "
    "(`pip install -e .`; NEURALPATCH_NO_CPU_EXT must not be 1)"
)


def cpu_available() -> tuple[bool, str]:
    """(True, "") when the C++ CPU module imports, else (False, reason)."""
    try:
        from neuralpatch import _cpu  # noqa: F401
    except ImportError as exc:
        return False, f"{_CPU_NOT_BUILT} ({exc})"
    return True, ""


def _check_host(name: str, t: Tensor, dtype: torch.dtype, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: dtype must be {dtype}, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: must be a CPU tensor, got {t.device}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


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
    _check_host("query_map", query_map, torch.float32, 3)
    _check_host("key_map", key_map, torch.float32, 3)
    _check_host("query_center", query_center, torch.int32, 1)
    _check_host("query_slot", query_slot, torch.int32, 2)
    _check_host("key_center", key_center, torch.int32, 1)
    _check_host("key_inv_norm", key_inv_norm, torch.float32, 2)
    _check_host("init_field", init_field, torch.int32, 1)
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
# the whole search over a batch (ops.py resolves the backend and passes its launcher)
# --------------------------------------------------------------------------- #


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
        best, value = launch(
            problem["query_map"], problem["key_map"], problem["query_center"], problem["query_slot"],
            problem["key_center"], problem["key_inv_norm"], field, patch_size, iterations, item,
        )  # fmt: skip
        q_norm = problem["query_norm"]
        ncc = torch.where(q_norm > 0, value.to(q_norm.dtype) / q_norm.clamp_min(1e-30), torch.zeros_like(q_norm))
        indices.append(best.to(torch.int64))
        scores.append(ncc.to(torch.float32))
    return torch.cat(indices), torch.cat(scores)
