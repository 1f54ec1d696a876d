"""Triton kernels against brute-force float64 references, at the launcher contract.

Without a GPU these run under the Triton interpreter at tiny shapes; tests marked
``cuda`` need a real GPU (bf16, realistic sizes, the autotuned configs).
"""

import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from neuralpatch.reference import LAUNCHER_SCORE_RTOL, argmax_lowest, launcher_patch_loss, launcher_patches, launcher_scores

triton = pytest.importorskip("triton")

try:
    from neuralpatch.kernels import patch_loss_bwd, patch_loss_fwd, patch_nn_fwd
except ModuleNotFoundError as exc:
    if exc.name not in ("neuralpatch", "neuralpatch.kernels"):
        raise
    from kernels import patch_loss_bwd, patch_loss_fwd, patch_nn_fwd

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

cuda = pytest.mark.cuda
requires_gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU")

PRECISIONS = [
    "fp32",
    "tf32",
    pytest.param("bf16", marks=[cuda, pytest.mark.skipif(INTERPRET, reason="the interpreter has no bf16 tl.dot")]),
]
MAP_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- references


# ----------------------------------------------------------------------------- helpers


def _top_lefts(gen, h, w, k, n=None):
    """int32 top-left flat positions of in-bounds k x k patches of an (h, w) map, shuffled."""
    ys, xs = torch.meshgrid(torch.arange(h - k + 1), torch.arange(w - k + 1), indexing="ij")
    pos = (ys * w + xs).reshape(-1)
    pos = pos[torch.randperm(pos.numel(), generator=gen)]
    return pos[:n].to(torch.int32)


def _nn_case(seed, hq, wq, hk, wk, c, k, nq, nk, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    query_map = torch.randn(hq, wq, c, generator=gen).to(dtype)
    key_map = torch.randn(hk, wk, c, generator=gen).to(dtype)
    query_pos = _top_lefts(gen, hq, wq, k, nq)
    key_pos = _top_lefts(gen, hk, wk, k, nk)
    assert query_pos.numel() == nq and key_pos.numel() == nk
    key_inv_norm = (1.0 / launcher_patches(key_map, key_pos, k).norm(dim=1)).float()
    return [t.to(DEVICE) for t in (query_map, key_map, query_pos, key_pos, key_inv_norm)]


def _assert_nn(best_index, best_value, scores, q, rtol):
    """Chosen key is optimal up to tolerance, its value is right, and clear winners match exactly."""
    nq, nk = scores.shape
    assert best_index.dtype == torch.int32 and best_value.dtype == torch.float32
    assert best_index.shape == (nq,) and best_value.shape == (nq,)
    idx = best_index.cpu().long()
    assert bool(((idx >= 0) & (idx < nk)).all())
    tol = rtol * q.norm(dim=1) + 1e-12
    rows = torch.arange(nq)
    best = scores.max(dim=1).values
    chosen = scores[rows, idx]
    assert bool((chosen >= best - tol).all()), (best - chosen).max()
    assert bool(((best_value.cpu().double() - chosen).abs() <= tol).all())
    top2 = scores.topk(min(2, nk), dim=1).values
    clear = (top2[:, 0] - top2[:, -1] > 2 * tol) | (nk == 1)
    assert bool((idx[clear] == argmax_lowest(scores)[clear]).all())


# ----------------------------------------------------------------------------- patch_nn_fwd

NN_SHAPES = {
    # (Hq, Wq, Hk, Wk, C, k, Nq, Nk)
    "ragged_k3": (9, 10, 8, 11, 19, 3, 37, 53),  # Nq, Nk, C all off the 16-blocks
    "even_c_k1": (6, 7, 7, 8, 32, 1, 40, 50),  # C a multiple of BLOCK_C: unmasked loads
    "k5": (9, 9, 9, 10, 5, 5, 17, 20),
}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", list(NN_SHAPES), ids=list(NN_SHAPES))
def test_patch_nn_matches_reference(shape, precision):
    hq, wq, hk, wk, c, k, nq, nk = NN_SHAPES[shape]
    args = _nn_case(0, hq, wq, hk, wk, c, k, nq, nk, MAP_DTYPE[precision])
    best_index, best_value = patch_nn_fwd(*args, k, precision)
    scores, q = launcher_scores(*args, k)
    _assert_nn(best_index, best_value, scores, q, LAUNCHER_SCORE_RTOL[precision])


@pytest.mark.parametrize("key_splits", [2, 4])
def test_patch_nn_key_splits(key_splits):
    args = _nn_case(1, 9, 10, 8, 11, 19, 3, 37, 53)
    best_index, best_value = patch_nn_fwd(*args, 3, "fp32", key_splits=key_splits)
    scores, q = launcher_scores(*args, 3)
    _assert_nn(best_index, best_value, scores, q, LAUNCHER_SCORE_RTOL["fp32"])


def test_patch_nn_single_key():
    args = _nn_case(2, 7, 7, 5, 6, 19, 3, 21, 1)
    best_index, best_value = patch_nn_fwd(*args, 3, "fp32")
    scores, q = launcher_scores(*args, 3)
    assert bool((best_index == 0).all())
    _assert_nn(best_index, best_value, scores, q, LAUNCHER_SCORE_RTOL["fp32"])


def test_patch_nn_query_subsets():
    """Subsets of query positions (as from a mask): one query, a sparse mask, none."""
    hq, wq, hk, wk, c, k = 9, 10, 8, 11, 19, 3
    query_map, key_map, _, key_pos, key_inv_norm = _nn_case(3, hq, wq, hk, wk, c, k, 5, 53)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(hq - k + 1, wq - k + 1, generator=gen) < 0.3
    ys, xs = mask.nonzero(as_tuple=True)
    sparse = (ys * wq + xs).to(torch.int32)
    for query_pos in (sparse[:1], sparse, sparse.flip(0)):
        query_pos = query_pos.to(DEVICE)
        best_index, best_value = patch_nn_fwd(query_map, key_map, query_pos, key_pos, key_inv_norm, k, "fp32")
        scores, q = launcher_scores(query_map, key_map, query_pos, key_pos, key_inv_norm, k)
        _assert_nn(best_index, best_value, scores, q, LAUNCHER_SCORE_RTOL["fp32"])
    empty = torch.empty(0, dtype=torch.int32, device=DEVICE)
    best_index, best_value = patch_nn_fwd(query_map, key_map, empty, key_pos, key_inv_norm, k, "fp32")
    assert best_index.shape == (0,) and best_index.dtype == torch.int32
    assert best_value.shape == (0,) and best_value.dtype == torch.float32


# Interpreter tiles are 16 keys wide: {2, 11} tie inside tile 0, {21, 38} across tiles 1
# and 2, {5, 21, 38} across all three (and across key splits of 16 keys).
@pytest.mark.parametrize("key_splits", [None, 3])
@pytest.mark.parametrize("dups", [(2, 11), (21, 38), (5, 21, 38)], ids=["in_tile", "across_tiles", "three"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_nn_ties_go_to_lowest_index(dups, key_splits, precision):
    """Duplicate keys score bit-identically (small integers, unit inv_norm): lowest index wins."""
    gen = torch.Generator().manual_seed(4)
    hk, wk, c, k, nk = 10, 10, 4, 3, 40
    key_map = torch.randint(-2, 3, (hk, wk, c), generator=gen).float()
    winner_y, winner_x = 4, 5
    key_map[winner_y : winner_y + k, winner_x : winner_x + k] = 3.0  # the only all-3 patch
    winner = winner_y * wk + winner_x
    candidates = _top_lefts(gen, hk, wk, k)
    key_pos = candidates[candidates != winner][:nk].clone()
    key_pos[list(dups)] = winner
    # positive queries: <q, k> <= 3*sum(q), with equality only for the all-3 patch
    query_map = torch.randint(1, 3, (6, 7, c), generator=gen).float()
    query_pos = _top_lefts(gen, 6, 7, k, 20)
    key_inv_norm = torch.ones(nk)
    dtype = MAP_DTYPE[precision]
    args = [t.to(DEVICE) for t in (query_map.to(dtype), key_map.to(dtype), query_pos, key_pos, key_inv_norm)]

    best_index, best_value = patch_nn_fwd(*args, k, precision, key_splits=key_splits)

    scores, q = launcher_scores(*args, k)
    assert bool(((scores == scores.max(dim=1, keepdim=True).values).sum(dim=1) == len(dups)).all())
    assert bool((best_index.cpu() == min(dups)).all())
    assert torch.equal(best_value.cpu().double(), 3.0 * q.sum(dim=1))


# ----------------------------------------------------------------------------- patch_loss

LOSS_SHAPES = {
    # (H, W, C, Ht, Wt, Nq)
    "ragged": (7, 9, 19, 6, 8, 23),
    "two_chunks": (5, 6, 130, 5, 6, 11),  # C > 128: two channel chunks / channel blocks
}
LOSS_DTYPES = {torch.float32: 1e-5, torch.bfloat16: 1e-5}  # bf16 inputs, fp32 math: same bound


def _loss_case(seed, h, w, c, ht, wt, nq, k, dtype):
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(h, w, c, generator=gen).to(dtype)
    target = torch.randn(ht, wt, c, generator=gen).to(dtype)
    corners = torch.tensor([0, w - 1, (h - 1) * w, h * w - 1])
    rest = torch.randperm(h * w, generator=gen)
    rest = rest[~torch.isin(rest, corners)]
    centers = torch.cat([corners, rest])[:nq].to(torch.int32)  # border queries included
    target_pos = _top_lefts(gen, ht, wt, k)
    target_pos = target_pos[torch.randint(0, target_pos.numel(), (nq,), generator=gen)]
    return feat, target, centers, target_pos


def _slots(h, w, centers):
    slot = torch.full((h, w), -1, dtype=torch.int32)
    slot.view(-1)[centers.long()] = torch.arange(centers.numel(), dtype=torch.int32)
    return slot


@pytest.mark.parametrize("dtype", list(LOSS_DTYPES), ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("shape", list(LOSS_SHAPES), ids=list(LOSS_SHAPES))
def test_patch_loss_fwd_bwd_match_autograd(shape, k, dtype):
    h, w, c, ht, wt, nq = LOSS_SHAPES[shape]
    feat, target, centers, target_pos = _loss_case(5, h, w, c, ht, wt, nq, k, dtype)
    slot = _slots(h, w, centers)
    grad_scale = torch.tensor([0.37])
    dev = [t.to(DEVICE) for t in (feat, target, centers, target_pos, slot, grad_scale)]
    feat_d, target_d, centers_d, target_pos_d, slot_d, grad_scale_d = dev

    per_query = patch_loss_fwd(feat_d, target_d, centers_d, target_pos_d, k)
    grad = patch_loss_bwd(feat_d, target_d, slot_d, target_pos_d, grad_scale_d, k)

    feat64 = feat.double().requires_grad_()
    expected = launcher_patch_loss(feat64, target.double(), centers, target_pos, k)
    (expected.sum() * (grad_scale.double() / 2)).sum().backward()
    rtol = LOSS_DTYPES[dtype]
    assert per_query.dtype == torch.float32 and per_query.shape == (nq,)
    torch.testing.assert_close(per_query.cpu().double(), expected.detach(), rtol=rtol, atol=rtol)
    assert grad.dtype == torch.float32 and grad.shape == (h, w, c)
    torch.testing.assert_close(grad.cpu().double(), feat64.grad, rtol=rtol, atol=rtol)


def test_patch_loss_bwd_zero_where_uncovered():
    h, w, c, k = 8, 8, 3, 3
    feat, target, _, _ = _loss_case(6, h, w, c, 5, 5, 1, k, torch.float32)
    centers = torch.tensor([2 * w + 2], dtype=torch.int32)  # covers rows/cols 1..3
    target_pos = torch.tensor([0], dtype=torch.int32)
    slot = _slots(h, w, centers)
    grad = patch_loss_bwd(*(t.to(DEVICE) for t in (feat, target, slot, target_pos, torch.ones(1))), k).cpu()
    covered = torch.zeros(h, w, dtype=torch.bool)
    covered[1:4, 1:4] = True
    assert bool((grad[~covered] == 0).all())
    torch.testing.assert_close(grad[1:4, 1:4], feat[1:4, 1:4] - target[0:3, 0:3])


def test_patch_loss_no_queries():
    feat, target, _, _ = _loss_case(7, 4, 5, 6, 4, 5, 1, 3, torch.float32)
    empty = torch.empty(0, dtype=torch.int32)
    slot = torch.full((4, 5), -1, dtype=torch.int32)
    dev = [t.to(DEVICE) for t in (feat, target, empty, slot)]
    assert patch_loss_fwd(dev[0], dev[1], dev[2], dev[2], 3).shape == (0,)
    grad = patch_loss_bwd(dev[0], dev[1], dev[3], dev[2], torch.ones(1, device=DEVICE), 3)
    assert bool((grad == 0).all())


# ----------------------------------------------------------------------------- bad arguments


def _nn_args():
    query_map, key_map, query_pos, key_pos, key_inv_norm = _nn_case(8, 6, 6, 6, 6, 4, 3, 5, 7)
    return dict(
        query_map=query_map, key_map=key_map, query_pos=query_pos, key_pos=key_pos,
        key_inv_norm=key_inv_norm, patch_size=3, precision="fp32",
    )  # fmt: skip


NN_BAD = {
    "map_not_tensor": ("query_map", lambda a: a["query_map"].tolist(), TypeError),
    "map_float64": ("query_map", lambda a: a["query_map"].double(), TypeError),
    "map_2d": ("query_map", lambda a: a["query_map"][0], ValueError),
    "map_not_contiguous": ("query_map", lambda a: a["query_map"].transpose(0, 1), ValueError),
    "key_map_dtype": ("key_map", lambda a: a["key_map"].bfloat16(), ValueError),
    "key_map_channels": ("key_map", lambda a: a["key_map"][..., :3].contiguous(), ValueError),
    "query_pos_int64": ("query_pos", lambda a: a["query_pos"].long(), TypeError),
    "key_pos_2d": ("key_pos", lambda a: a["key_pos"][None], ValueError),
    "key_inv_norm_length": ("key_inv_norm", lambda a: a["key_inv_norm"][:-1].contiguous(), ValueError),
    "key_inv_norm_float64": ("key_inv_norm", lambda a: a["key_inv_norm"].double(), TypeError),
    "key_inv_norm_device": ("key_inv_norm", lambda a: a["key_inv_norm"].to("meta"), ValueError),
    "patch_size_even": ("patch_size", lambda a: 4, ValueError),
    "patch_size_zero": ("patch_size", lambda a: 0, ValueError),
    "patch_size_float": ("patch_size", lambda a: 3.0, TypeError),
    "patch_size_bool": ("patch_size", lambda a: True, TypeError),
    "patch_too_big": ("patch_size", lambda a: 7, ValueError),
    "precision_unknown": ("precision", lambda a: "fp16", ValueError),
    "precision_vs_dtype": ("precision", lambda a: "bf16", ValueError),
}


@pytest.mark.parametrize("case", list(NN_BAD), ids=list(NN_BAD))
def test_patch_nn_bad_arguments(case):
    name, mutate, error = NN_BAD[case]
    args = _nn_args()
    args[name] = mutate(args)
    pattern = {"patch_too_big": "query_map", "precision_vs_dtype": "precision"}.get(case, name)
    with pytest.raises(error, match=pattern):
        patch_nn_fwd(**args)


def test_patch_nn_bad_combinations():
    args = _nn_args()
    empty = torch.empty(0, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="key_pos"):
        patch_nn_fwd(**{**args, "key_pos": empty, "key_inv_norm": empty.float()})
    with pytest.raises(ValueError, match="key_splits"):
        patch_nn_fwd(**args, key_splits=0)
    bf16_maps = {"query_map": args["query_map"].bfloat16(), "key_map": args["key_map"].bfloat16()}
    with pytest.raises(ValueError, match="precision"):
        patch_nn_fwd(**{**args, **bf16_maps, "precision": "tf32"})


def test_cpu_tensors_refused_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in _nn_args().items()}
    with pytest.raises(ValueError, match="CUDA"):
        patch_nn_fwd(**args)


def _loss_args():
    feat, target, centers, target_pos = _loss_case(9, 5, 6, 4, 5, 6, 7, 3, torch.float32)
    slot = _slots(5, 6, centers)
    return {
        k: v.to(DEVICE)
        for k, v in dict(
            feat_map=feat, target_map=target, query_center=centers, target_pos=target_pos,
            query_slot=slot, grad_scale=torch.ones(1),
        ).items()
    }  # fmt: skip


LOSS_BAD = {
    # case: (argument, mutation, error, launchers that take the argument)
    "feat_float64": ("feat_map", lambda a: a["feat_map"].double(), TypeError, "fwd bwd"),
    "feat_not_contiguous": ("feat_map", lambda a: a["feat_map"].transpose(0, 1), ValueError, "fwd bwd"),
    "target_dtype": ("target_map", lambda a: a["target_map"].bfloat16(), ValueError, "fwd bwd"),
    "target_channels": ("target_map", lambda a: a["target_map"][..., :2].contiguous(), ValueError, "fwd bwd"),
    "center_int64": ("query_center", lambda a: a["query_center"].long(), TypeError, "fwd"),
    "target_pos_length": ("target_pos", lambda a: a["target_pos"][:-1].contiguous(), ValueError, "fwd"),
    "target_pos_int64": ("target_pos", lambda a: a["target_pos"].long(), TypeError, "fwd bwd"),
    "slot_shape": ("query_slot", lambda a: a["query_slot"][:-1].contiguous(), ValueError, "bwd"),
    "slot_int64": ("query_slot", lambda a: a["query_slot"].long(), TypeError, "bwd"),
    "scale_shape": ("grad_scale", lambda a: torch.ones(2, device=DEVICE), ValueError, "bwd"),
    "scale_0d": ("grad_scale", lambda a: torch.tensor(1.0, device=DEVICE), ValueError, "bwd"),
    "scale_float64": ("grad_scale", lambda a: a["grad_scale"].double(), TypeError, "bwd"),
    "scale_device": ("grad_scale", lambda a: a["grad_scale"].to("meta"), ValueError, "bwd"),
}
LOSS_ARGS = {
    "fwd": (patch_loss_fwd, ("feat_map", "target_map", "query_center", "target_pos")),
    "bwd": (patch_loss_bwd, ("feat_map", "target_map", "query_slot", "target_pos", "grad_scale")),
}


@pytest.mark.parametrize("case", list(LOSS_BAD), ids=list(LOSS_BAD))
def test_patch_loss_bad_arguments(case):
    name, mutate, error, launchers = LOSS_BAD[case]
    a = _loss_args()
    a[name] = mutate(a)
    for launcher in launchers.split():
        fn, names = LOSS_ARGS[launcher]
        with pytest.raises(error, match=name):
            fn(*(a[n] for n in names), 3)


@pytest.mark.parametrize("patch_size,error", [(2, ValueError), (3.0, TypeError), (9, ValueError)])
def test_patch_loss_bad_patch_size(patch_size, error):
    a = _loss_args()
    with pytest.raises(error, match="patch_size|target_map"):
        patch_loss_fwd(a["feat_map"], a["target_map"], a["query_center"], a["target_pos"], patch_size)
    with pytest.raises(error, match="patch_size|target_map"):
        patch_loss_bwd(a["feat_map"], a["target_map"], a["query_slot"], a["target_pos"], a["grad_scale"], patch_size)


# ----------------------------------------------------------------------------- end to end


def test_matches_shared_reference_on_chw_maps():
    """The layout conversion ops.py performs, checked against neuralpatch.reference."""
    reference = pytest.importorskip("neuralpatch.reference")
    gen = torch.Generator().manual_seed(10)
    c, h, w, k = 6, 7, 8, 3
    r = k // 2
    query_feat = torch.randn(c, h, w, generator=gen)
    key_feat = torch.randn(c, h + 1, w - 1, generator=gen)
    query_mask = torch.rand(h, w, generator=gen) < 0.4
    key_mask = ~(torch.rand(h + 1, w - 1, generator=gen) < 0.2)
    hk, wk = key_feat.shape[1:]

    query_map = F.pad(query_feat, (r, r, r, r)).permute(1, 2, 0).contiguous()
    qy, qx = query_mask.nonzero(as_tuple=True)
    query_pos = (qy * (w + 2 * r) + qx).to(torch.int32)  # centre in the map = top-left in the padded map
    key_map = key_feat.permute(1, 2, 0).contiguous()
    valid = key_mask & reference.interior_mask(hk, wk, k)
    ky, kx = valid.nonzero(as_tuple=True)
    key_centers = ky * wk + kx
    key_pos = ((ky - r) * wk + (kx - r)).to(torch.int32)
    key_inv_norm = (1.0 / launcher_patches(key_map, key_pos, k).norm(dim=1)).float()

    dev = [t.to(DEVICE) for t in (query_map, key_map, query_pos, key_pos, key_inv_norm)]
    best_index, best_value = patch_nn_fwd(*dev, k, "fp32")
    index = key_centers[best_index.cpu().long()]
    ref_index, ref_score = reference.brute_force_patch_nn(query_feat, key_feat, query_mask, key_mask, k)
    q_norm = launcher_patches(query_map, query_pos, k).norm(dim=1)
    chosen = reference.ncc_at(query_feat, key_feat, query_mask, index, k)
    assert bool((chosen >= ref_score - 1e-5).all())
    torch.testing.assert_close(best_value.cpu().double() / q_norm, ref_score, rtol=1e-5, atol=1e-5)
    assert (index == ref_index).float().mean() > 0.9

    # patch_loss: mean over queries, matched to the reference's indices
    feat = query_feat.double().requires_grad_()
    loss = reference.brute_force_patch_loss(feat, key_feat.double(), query_mask, ref_index, k)
    loss.backward()
    ry, rx = ref_index // wk, ref_index % wk
    target_pos = ((ry - r) * wk + (rx - r)).to(torch.int32)
    feat_map = query_feat.permute(1, 2, 0).contiguous()
    centers = (qy * w + qx).to(torch.int32)
    slot = _slots(h, w, centers)
    nq = centers.numel()
    dev = [t.to(DEVICE) for t in (feat_map, key_map, centers, target_pos, slot, torch.tensor([2.0 / nq]))]
    per_query = patch_loss_fwd(dev[0], dev[1], dev[2], dev[3], k)
    torch.testing.assert_close(per_query.sum().cpu().double() / nq, loss.detach(), rtol=1e-5, atol=1e-6)
    grad = patch_loss_bwd(dev[0], dev[1], dev[4], dev[3], dev[5], k)
    torch.testing.assert_close(grad.cpu().double().permute(2, 0, 1), feat.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- GPU only


@cuda
@requires_gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_patch_nn_realistic_size_gpu(precision):
    """Nq = Nk = 4096, C = 256, k = 3 (relu3_1-like): autotuned configs and the key split."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    c, k, side = 256, 3, 66
    dtype = MAP_DTYPE[precision]
    query_map = torch.randn(side, side, c, device="cuda", generator=gen).relu().to(dtype)
    key_map = torch.randn(side, side, c, device="cuda", generator=gen).relu().to(dtype)
    ys, xs = torch.meshgrid(torch.arange(side - k + 1), torch.arange(side - k + 1), indexing="ij")
    pos = (ys * side + xs).reshape(-1).to(torch.int32).cuda()
    q, kk = launcher_patches(query_map, pos, k).cuda(), launcher_patches(key_map, pos, k).cuda()
    key_inv_norm = (1.0 / kk.norm(dim=1)).float()
    best_index, best_value = patch_nn_fwd(query_map, key_map, pos, pos, key_inv_norm, k, precision)
    scores = (q @ kk.T) * key_inv_norm.double()
    rows = torch.arange(pos.numel(), device="cuda")
    best = scores.max(dim=1).values
    chosen = scores[rows, best_index.long()]
    tol = LAUNCHER_SCORE_RTOL[precision] * q.norm(dim=1)
    assert bool((chosen >= best - tol).all())
    assert bool(((best_value.double() - chosen).abs() <= tol).all())
