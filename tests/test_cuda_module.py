"""The CUDA module neuralpatch._C and its tensor launchers (neuralpatch._cuda).

CPU tests: the module builds and imports, reports its build, validates arguments (ValueError
naming the argument, checked BEFORE the GPU check) and raises RuntimeError without a GPU.
GPU tests (-m cuda): kernel outputs against float64 brute-force references written here from
plain torch, in the kernels' element order d = (dy*k + dx)*C + c.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

C = pytest.importorskip("neuralpatch._C", reason="neuralpatch._C was not built (no nvcc at install time)")

from neuralpatch import _cuda  # noqa: E402
from neuralpatch.reference import LAUNCHER_SCORE_RTOL, launcher_patch_loss, launcher_patches, launcher_scores  # noqa: E402

HAS_GPU = C.device_count() > 0 and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
needs_no_gpu = pytest.mark.skipif(C.device_count() > 0, reason="checks the behaviour without a GPU")

DUMMY = 4096  # a nonzero, aligned fake pointer: the GPU check must fail before it is touched


def nn_args(**overrides):
    args = dict(
        query_map=DUMMY,
        key_map=DUMMY,
        query_pos=DUMMY,
        key_pos=DUMMY,
        key_inv_norm=DUMMY,
        out_index=DUMMY,
        out_value=DUMMY,
        nq=5,
        nk=7,
        channels=3,
        patch_size=3,
        query_height=8,
        query_width=9,
        key_height=6,
        key_width=5,
        dtype="float32",
        precision="fp32",
        stream=0,
    )
    args.update(overrides)
    return args


def loss_fwd_args(**overrides):
    args = dict(
        feat_map=DUMMY,
        target_map=DUMMY,
        query_center=DUMMY,
        target_pos=DUMMY,
        out_per_query=DUMMY,
        nq=5,
        channels=3,
        patch_size=3,
        height=8,
        width=9,
        target_height=6,
        target_width=5,
        dtype="float32",
        stream=0,
    )
    args.update(overrides)
    return args


def loss_bwd_args(**overrides):
    args = dict(
        feat_map=DUMMY,
        target_map=DUMMY,
        query_slot=DUMMY,
        target_pos=DUMMY,
        grad_scale=DUMMY,
        out_grad_map=DUMMY,
        nq=5,
        channels=3,
        patch_size=3,
        height=8,
        width=9,
        target_height=6,
        target_width=5,
        dtype="bfloat16",
        stream=0,
    )
    args.update(overrides)
    return args


# ---------------------------------------------------------------- CPU: build, import, errors


def test_build_info_reports_archs_and_cuda_version():
    info = C.build_info()
    assert info["cuda_runtime_version"] >= 11000
    assert info["nvcc_version"].count(".") == 1
    archs = info["archs"].split(";")
    assert archs and all(a.rstrip("a").isdigit() for a in archs)
    assert info["device_count"] == C.device_count()


@needs_no_gpu
def test_no_device_here():
    assert C.device_count() == 0
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        C.device_properties(0)


@needs_no_gpu
@pytest.mark.parametrize(
    "fn, args",
    [
        (C.patch_nn_fwd, nn_args()),
        (C.patch_nn_fwd, nn_args(dtype="bfloat16", precision="bf16")),
        (C.patch_loss_fwd, loss_fwd_args()),
        (C.patch_loss_bwd, loss_bwd_args()),
    ],
    ids=["nn-fp32", "nn-bf16", "loss-fwd", "loss-bwd"],
)
def test_valid_call_without_gpu_raises_runtime_error(fn, args):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU, but none can be used"):
        fn(**args)
    # the process is still alive and the module still usable
    assert C.device_count() == 0


@pytest.mark.parametrize(
    "override, name",
    [
        (dict(query_map=0), "query_map"),
        (dict(key_map=0), "key_map"),
        (dict(query_pos=0), "query_pos"),
        (dict(key_pos=0), "key_pos"),
        (dict(key_inv_norm=0), "key_inv_norm"),
        (dict(out_index=0), "out_index"),
        (dict(out_value=0), "out_value"),
        (dict(query_pos=DUMMY + 2), "query_pos"),  # misaligned int32 pointer
        (dict(nq=0), "nq"),
        (dict(nk=-3), "nk"),
        (dict(nk=2**31), "nk"),
        (dict(channels=0), "channels"),
        (dict(patch_size=4), "patch_size"),
        (dict(patch_size=0), "patch_size"),
        (dict(query_height=0), "query_height"),
        (dict(key_width=2), "key_height/key_width"),  # smaller than the 3x3 patch
        (dict(query_height=2**16, query_width=2**16), "query_height"),  # positions overflow int32
        (dict(dtype="float16"), "dtype"),
        (dict(precision="fp16"), "precision"),
        (dict(precision="bf16"), "precision"),  # bf16 with float32 maps
        (dict(dtype="bfloat16", precision="tf32"), "precision"),  # tf32 with bf16 maps
        (dict(dtype="bfloat16", precision="fp32"), "precision"),
    ],
)
def test_patch_nn_argument_validation(override, name):
    """Arguments are validated before the GPU check, so this runs (and raises ValueError) anywhere."""
    with pytest.raises(ValueError, match=name):
        C.patch_nn_fwd(**nn_args(**override))


@pytest.mark.parametrize(
    "override, name",
    [
        (dict(feat_map=0), "feat_map"),
        (dict(target_map=0), "target_map"),
        (dict(query_center=0), "query_center"),
        (dict(target_pos=0), "target_pos"),
        (dict(out_per_query=0), "out_per_query"),
        (dict(feat_map=DUMMY + 2), "feat_map"),  # misaligned for float32
        (dict(nq=0), "nq"),
        (dict(channels=-1), "channels"),
        (dict(patch_size=2), "patch_size"),
        (dict(height=0), "height"),
        (dict(target_height=2), "target_height"),
        (dict(dtype="int8"), "dtype"),
    ],
)
def test_patch_loss_fwd_argument_validation(override, name):
    with pytest.raises(ValueError, match=name):
        C.patch_loss_fwd(**loss_fwd_args(**override))


@pytest.mark.parametrize(
    "override, name",
    [
        (dict(query_slot=0), "query_slot"),
        (dict(grad_scale=0), "grad_scale"),
        (dict(out_grad_map=0), "out_grad_map"),
        (dict(feat_map=DUMMY + 1), "feat_map"),  # misaligned for bfloat16
        (dict(nq=0), "nq"),
        (dict(patch_size=6), "patch_size"),
        (dict(width=0), "width"),
        (dict(target_width=1), "target_height/target_width"),
        (dict(dtype="float64"), "dtype"),
    ],
)
def test_patch_loss_bwd_argument_validation(override, name):
    with pytest.raises(ValueError, match=name):
        C.patch_loss_bwd(**loss_bwd_args(**override))


def test_negative_pointer_is_a_type_error():
    with pytest.raises(TypeError):
        C.patch_nn_fwd(**nn_args(query_map=-1))


@needs_no_gpu
def test_available_reports_missing_gpu():
    ok, reason = _cuda.available()
    assert ok is False
    assert "no CUDA GPU is visible" in reason


def test_available_and_launchers_without_the_module(monkeypatch):
    import sys

    import neuralpatch

    monkeypatch.delattr(neuralpatch, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "neuralpatch._C", None)  # import now fails
    ok, reason = _cuda.available()
    assert ok is False and "neuralpatch._C was not built" in reason
    with pytest.raises(RuntimeError, match="neuralpatch._C was not built"):
        _cuda._lib()


def test_launchers_reject_cpu_tensors_naming_the_argument():
    q = torch.zeros(5, 5, 3)
    pos = torch.zeros(4, dtype=torch.int32)
    inv = torch.ones(4)
    with pytest.raises(ValueError, match="query_map: must be on a CUDA device"):
        _cuda.patch_nn_fwd(q, q, pos, pos, inv, 3, "fp32")
    with pytest.raises(TypeError, match="query_map: dtype"):
        _cuda.patch_nn_fwd(q.double(), q, pos, pos, inv, 3, "fp32")
    with pytest.raises(TypeError, match="patch_size: expected an int"):
        _cuda.patch_nn_fwd(q, q, pos, pos, inv, 3.0, "fp32")
    with pytest.raises(ValueError, match="patch_size"):
        _cuda.patch_nn_fwd(q, q, pos, pos, inv, 2, "fp32")
    with pytest.raises(ValueError, match="precision"):
        _cuda.patch_nn_fwd(q, q, pos, pos, inv, 3, "fp16")
    with pytest.raises(TypeError, match="feat_map: dtype"):
        _cuda.patch_loss_fwd(q.double(), q, pos, pos, 3)
    with pytest.raises(ValueError, match="feat_map: must be on a CUDA device"):
        _cuda.patch_loss_bwd(q, q, torch.zeros(5, 5, dtype=torch.int32), pos, 1.0, 3)


# ---------------------------------------------------------------- GPU: references (float64)


def gather_patches(map_hwc, pos, k):
    """(N, k*k*C) float64 patches with top-left `pos` of a channels-last map, on its device."""
    return launcher_patches(map_hwc, pos, k).to(map_hwc.device)


def reference_scores(query_map, key_map, query_pos, key_pos, key_inv_norm, k):
    scores, q = launcher_scores(query_map, key_map, query_pos, key_pos, key_inv_norm, k)
    return scores.to(query_map.device), q.norm(dim=1).to(query_map.device)


def random_positions(h, w, k, n, gen, device, unique=True):
    """n top-left positions whose k x k patch fits an (h, w) map (distinct when unique)."""
    ys, xs = torch.meshgrid(torch.arange(h - k + 1), torch.arange(w - k + 1), indexing="ij")
    valid = (ys * w + xs).reshape(-1)
    if unique:
        assert n <= valid.numel()
        pick = torch.randperm(valid.numel(), generator=gen)[:n]
    else:
        pick = torch.randint(valid.numel(), (n,), generator=gen)
    return valid[pick].to(torch.int32).to(device)


def make_nn_case(nq, nk, c, k, dtype, seed=0, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    side_q = max(k, int(nq**0.5) + k + 1)
    side_k = max(k, int(nk**0.5) + k + 1)
    qmap = torch.randn(side_q, side_q + 1, c, generator=gen).to(device=device, dtype=dtype)
    kmap = torch.randn(side_k + 2, side_k, c, generator=gen).to(device=device, dtype=dtype)
    qpos = random_positions(*qmap.shape[:2], k, nq, gen, device)
    kpos = random_positions(*kmap.shape[:2], k, nk, gen, device)
    inv = (1.0 / gather_patches(kmap, kpos, k).norm(dim=1)).float()
    return qmap, kmap, qpos, kpos, inv


PRECISIONS = [
    # (precision, map dtype, relative tolerance on the float64 score, scaled by |q|): one table
    # for every launcher, in neuralpatch.reference
    (precision, dtype, LAUNCHER_SCORE_RTOL[precision])
    for precision, dtype in (("fp32", torch.float32), ("tf32", torch.float32), ("bf16", torch.bfloat16))
]

NN_SHAPES = [
    # id, nq, nk, channels, patch_size
    ("small-37x53-c19-k3", 37, 53, 19, 3),
    ("small-37x53-c3-k1", 37, 53, 3, 1),
    ("small-41x77-c8-k5", 41, 77, 8, 5),
    ("small-37x3000-c16-k3-split", 37, 3000, 16, 3),  # few query blocks: key splits + merge
    ("small-130x129-c1-k3", 130, 129, 1, 3),
    ("big-4096x4096-c256-k3", 4096, 4096, 256, 3),
]


def check_nn(qmap, kmap, qpos, kpos, inv, k, precision, rtol):
    index, value = _cuda.patch_nn_fwd(qmap, kmap, qpos, kpos, inv, k, precision)
    torch.cuda.synchronize()
    assert index.dtype == torch.int32 and value.dtype == torch.float32
    assert index.shape == qpos.shape and value.shape == qpos.shape
    scores, qnorm = reference_scores(qmap, kmap, qpos, kpos, inv, k)
    idx = index.long()
    assert bool(((idx >= 0) & (idx < kpos.numel())).all()), "index out of the key list"
    rows = torch.arange(qpos.numel(), device=qpos.device)
    chosen = scores[rows, idx]
    best, ref_idx = scores.max(dim=1)
    tol = rtol * qnorm.clamp_min(1e-12)
    # the chosen key is (within the precision) as good as the best one
    assert bool((best - chosen <= tol).all()), f"max shortfall {(best - chosen).max().item():.3g}"
    # the reported value is the score of the chosen key
    assert bool(((value.double() - chosen).abs() <= tol).all()), "best_value differs from the chosen key's score"
    if precision == "fp32":
        # exact index wherever the float64 top-2 gap is beyond fp32 rounding
        top2 = scores.topk(min(2, scores.shape[1]), dim=1).values
        gap = top2[:, 0] - top2[:, -1] if scores.shape[1] > 1 else torch.full_like(best, float("inf"))
        clear = gap > 1e-4 * qnorm
        assert bool((idx[clear] == ref_idx[clear]).all())
    return index, value


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision, dtype, rtol", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("shape", NN_SHAPES, ids=[s[0] for s in NN_SHAPES])
def test_patch_nn_matches_float64_reference(shape, precision, dtype, rtol):
    _, nq, nk, c, k = shape
    qmap, kmap, qpos, kpos, inv = make_nn_case(nq, nk, c, k, dtype, seed=nq + nk + c + k)
    check_nn(qmap, kmap, qpos, kpos, inv, k, precision, rtol)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision, dtype, rtol", PRECISIONS, ids=[p[0] for p in PRECISIONS])
def test_patch_nn_small_unaligned_maps_take_the_scalar_path(precision, dtype, rtol):
    """A map whose data pointer is not 16-byte aligned (C a multiple of 8) must still be right."""
    qmap, kmap, qpos, kpos, inv = make_nn_case(37, 53, 16, 3, dtype, seed=3)
    shifted_q = torch.empty(qmap.numel() + 1, dtype=dtype, device="cuda")[1:].view(qmap.shape)
    shifted_q.copy_(qmap)
    check_nn(shifted_q, kmap, qpos, kpos, inv, 3, precision, rtol)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision, dtype, rtol", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("nk0", [53, 200], ids=["small-one-tile", "small-across-tiles"])
def test_patch_nn_ties_go_to_the_lowest_key_index(precision, dtype, rtol, nk0):
    qmap, kmap, qpos, kpos, inv = make_nn_case(37, nk0, 19, 3, dtype, seed=7)
    kpos2 = torch.cat([kpos, kpos])  # every key twice: j and j + nk0 score identically
    inv2 = torch.cat([inv, inv])
    index, _ = check_nn(qmap, kmap, qpos, kpos2, inv2, 3, precision, rtol)
    assert bool((index < nk0).all()), "a duplicate with a higher index won a tie"


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision, dtype, rtol", PRECISIONS, ids=[p[0] for p in PRECISIONS])
def test_patch_nn_small_all_keys_equal_and_single_key(precision, dtype, rtol):
    qmap, kmap, qpos, kpos, inv = make_nn_case(37, 53, 19, 3, dtype, seed=11)
    same = kpos[:1].repeat(300)  # 300 identical keys over 3 tiles
    index, _ = _cuda.patch_nn_fwd(qmap, kmap, qpos, same, inv[:1].repeat(300), 3, precision)
    assert bool((index == 0).all())
    index, value = check_nn(qmap, kmap, qpos, kpos[:1], inv[:1], 3, precision, rtol)
    assert bool((index == 0).all())


@pytest.mark.cuda
@needs_gpu
def test_patch_nn_launcher_validation_on_gpu():
    qmap, kmap, qpos, kpos, inv = make_nn_case(5, 5, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="precision"):
        _cuda.patch_nn_fwd(qmap, kmap, qpos, kpos, inv, 3, "bf16")
    with pytest.raises(ValueError, match="key_inv_norm"):
        _cuda.patch_nn_fwd(qmap, kmap, qpos, kpos, inv[:-1], 3, "fp32")
    with pytest.raises(ValueError, match="key_pos"):
        _cuda.patch_nn_fwd(qmap, kmap, qpos, kpos[:0], inv[:0], 3, "fp32")
    with pytest.raises(ValueError, match="query_map: must be contiguous"):
        _cuda.patch_nn_fwd(qmap.transpose(0, 1), kmap, qpos, kpos, inv, 3, "fp32")
    index, value = _cuda.patch_nn_fwd(qmap, kmap, qpos[:0], kpos, inv, 3, "fp32")
    assert index.numel() == 0 and value.numel() == 0
    assert _cuda.available() == (True, "")


def test_patch_nn_reference_agrees_with_shared_reference():
    """CPU check of this file's kernel-contract reference against neuralpatch.reference."""
    from neuralpatch import reference

    gen = torch.Generator().manual_seed(0)
    c, h, w, k = 5, 9, 11, 3
    r = k // 2
    qfeat, kfeat = torch.randn(c, h, w, generator=gen), torch.randn(c, h, w, generator=gen)
    qmask = torch.rand(h, w, generator=gen) < 0.4
    kmask = torch.rand(h, w, generator=gen) < 0.7
    ref_index, _ = reference.brute_force_patch_nn(qfeat, kfeat, qmask, kmask, k)

    qmap = F.pad(qfeat, (r, r, r, r)).permute(1, 2, 0).contiguous()  # zero-padded query map
    kmap = kfeat.permute(1, 2, 0).contiguous()
    qy, qx = qmask.nonzero(as_tuple=True)
    qpos = (qy * (w + 2 * r) + qx).to(torch.int32)  # centre (y, x) = padded top-left (y, x)
    kvalid = kmask & reference.interior_mask(h, w, k)
    ky, kx = kvalid.nonzero(as_tuple=True)
    kpos = ((ky - r) * w + (kx - r)).to(torch.int32)
    inv = (1.0 / gather_patches(kmap, kpos, k).norm(dim=1)).float()
    scores, _ = reference_scores(qmap, kmap, qpos, kpos, inv, k)
    best = scores.argmax(dim=1)
    assert torch.equal((ky[best] * w + kx[best]).long(), ref_index)


# ---- patch loss


def make_loss_case(h, w, c, ht, wt, nq, k, dtype, seed=0, offset_elems=0):
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(h, w, c, generator=gen).to(dtype)
    target = torch.randn(ht, wt, c, generator=gen).to(dtype)
    if offset_elems:  # same values, data pointer not 16-byte aligned
        buf = torch.empty(feat.numel() + offset_elems, dtype=dtype)
        buf[offset_elems:] = feat.reshape(-1)
        feat = buf.cuda()[offset_elems:].view(h, w, c)
    else:
        feat = feat.cuda()
    target = target.cuda()
    center = torch.randperm(h * w, generator=gen)[:nq].to(torch.int32).cuda()  # includes border pixels
    tpos = random_positions(ht, wt, k, nq, gen, "cuda", unique=False)
    return feat, target, center, tpos


LOSS_CASES = [
    # id, (h, w, c), (ht, wt), nq, k, dtype, offset_elems
    ("small-c19-k3-fp32", (13, 17, 19), (11, 9), 50, 3, torch.float32, 0),
    ("small-c3-k1-fp32", (7, 5, 3), (4, 4), 35, 1, torch.float32, 0),
    ("small-c16-k5-fp32", (9, 12, 16), (8, 7), 60, 5, torch.float32, 0),
    ("small-c16-k3-fp32-unaligned", (9, 12, 16), (8, 7), 60, 3, torch.float32, 1),
    ("small-c16-k3-bf16", (9, 12, 16), (8, 7), 60, 3, torch.bfloat16, 0),
    ("small-c19-k3-bf16", (13, 17, 19), (11, 9), 50, 3, torch.bfloat16, 0),
    ("small-c8-k3-bf16-unaligned", (9, 12, 8), (8, 7), 60, 3, torch.bfloat16, 3),
    ("big-c256-k3-fp32", (48, 40, 256), (30, 30), 1500, 3, torch.float32, 0),
    ("big-c256-k5-bf16", (48, 40, 256), (30, 30), 1500, 5, torch.bfloat16, 0),
]


def test_patch_loss_reference_agrees_with_shared_reference():
    """CPU check of this file's loss reference against neuralpatch.reference (mean over queries)."""
    from neuralpatch import reference

    gen = torch.Generator().manual_seed(1)
    c, h, w, ht, wt, k = 4, 7, 8, 6, 9, 3
    r = k // 2
    feat = torch.randn(c, h, w, generator=gen, dtype=torch.float64)
    target = torch.randn(c, ht, wt, generator=gen, dtype=torch.float64)
    qmask = torch.rand(h, w, generator=gen) < 0.5  # border pixels included
    nq = int(qmask.sum())
    ty = torch.randint(r, ht - r, (nq,), generator=gen)
    tx = torch.randint(r, wt - r, (nq,), generator=gen)
    expected = reference.brute_force_patch_loss(feat, target, qmask, ty * wt + tx, k)
    center = qmask.reshape(-1).nonzero().squeeze(1).to(torch.int32)
    tpos = ((ty - r) * wt + (tx - r)).to(torch.int32)
    per_query = launcher_patch_loss(feat.permute(1, 2, 0), target.permute(1, 2, 0), center, tpos, k)
    torch.testing.assert_close(per_query.sum() / nq, expected)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("case", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_patch_loss_fwd_bwd_match_float64_reference(case):
    _, (h, w, c), (ht, wt), nq, k, dtype, offset = case
    feat, target, center, tpos = make_loss_case(h, w, c, ht, wt, nq, k, dtype, seed=h + c + k, offset_elems=offset)

    per_query = _cuda.patch_loss_fwd(feat, target, center, tpos, k)
    feat64 = feat.to(torch.float64).requires_grad_(True)
    ref = launcher_patch_loss(feat64, target, center, tpos, k)
    torch.testing.assert_close(per_query.double(), ref.detach(), rtol=1e-5, atol=1e-4)

    # backward of sum_q per_query scaled by grad_scale / 2 (the kernel folds sum (f - t), not 2 (f - t))
    slot = torch.full((h, w), -1, dtype=torch.int32, device="cuda")
    slot.view(-1)[center.long()] = torch.arange(nq, dtype=torch.int32, device="cuda")
    scale = torch.tensor([2.0 * 0.75 / nq], dtype=torch.float32, device="cuda")
    grad = _cuda.patch_loss_bwd(feat, target, slot, tpos, scale, k)
    (ref_grad,) = torch.autograd.grad(ref.sum() * (scale.double() / 2.0), feat64)
    assert grad.shape == (h, w, c) and grad.dtype == torch.float32
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@needs_gpu
def test_patch_loss_bwd_small_writes_zeros_where_no_query_covers():
    feat, target, _, tpos = make_loss_case(16, 16, 4, 8, 8, 1, 3, torch.float32, seed=5)
    # one query centred at the corner (0, 0): its 3x3 patch covers only a 2x2 block
    slot = torch.full((16, 16), -1, dtype=torch.int32, device="cuda")
    slot[0, 0] = 0
    grad = _cuda.patch_loss_bwd(feat, target, slot, tpos, 1.0, 3)
    assert bool((grad[2:] == 0).all()) and bool((grad[:, 2:] == 0).all())
    assert bool((grad[:2, :2] != 0).all())
