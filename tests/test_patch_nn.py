"""patch_nn: every backend against the brute-force float64 reference.

One matrix: BACKENDS x (precision, tolerance) x SHAPES x patch sizes. Backends are
compared by the true NCC of what they chose, not by raw indices, which may differ
legitimately between equally good keys in reduced precision.
"""

import pytest
import torch

from neuralpatch import patch_nn
from neuralpatch._torch import tile_sizes as _tile_sizes
from neuralpatch.reference import brute_force_patch_nn, ncc_at
from tests.conftest import device_params, require_backend
from tests.photos import chelsea_features

BACKENDS = ["torch", "triton", "cuda"]
# tolerance on the true NCC (in float64) of the chosen key, against the best one's
PRECISIONS = [("fp32", 1e-5), ("tf32", 3e-3), ("bf16", 2e-2)]
# (C, Hq, Wq, Hk, Wk): a plain shape and deliberately odd ones
SHAPES = [(8, 12, 12, 12, 12), (19, 13, 17, 11, 19), (3, 9, 7, 7, 9)]


def _skip_unsupported(backend, device, precision):
    require_backend(backend, device)
    if backend == "triton" and device == "cpu" and precision == "bf16":
        pytest.skip("the Triton interpreter has no bf16 tl.dot")


def _random_case(shape, device, seed):
    c, hq, wq, hk, wk = shape
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(c, hq, wq, generator=gen)
    key = torch.randn(c, hk, wk, generator=gen)
    query_mask = torch.rand(hq, wq, generator=gen) < 0.5
    query_mask[0, 0] = True  # always one border query
    key_mask = torch.rand(hk, wk, generator=gen) < 0.7
    return [t.to(device) for t in (query, key, query_mask, key_mask)]


def assert_matches_reference(query, key, query_mask, key_mask, patch_size, index, score, tol):
    cpu = [t.cpu() for t in (query, key, query_mask, key_mask)]
    ref_index, ref_score = brute_force_patch_nn(*cpu, patch_size)
    index, score = index.cpu(), score.cpu()
    assert index.dtype == torch.int64 and score.dtype == torch.float32
    assert index.shape == ref_index.shape == score.shape
    key_ok = cpu[3] & _interior(cpu[1].shape[1:], patch_size)
    assert bool(key_ok.reshape(-1)[index].all()), "chose a position that is not a valid key"
    chosen = ncc_at(cpu[0], cpu[1], cpu[2], index, patch_size)
    torch.testing.assert_close(chosen, ref_score, atol=tol, rtol=0)
    torch.testing.assert_close(score.double(), chosen, atol=tol, rtol=0)


def _interior(hw, patch_size):
    from neuralpatch.reference import interior_mask

    return interior_mask(*hw, patch_size)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision,tol", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("patch_size", [1, 3, 5, 7])
def test_matches_brute_force(device, backend, precision, tol, shape, patch_size):
    _skip_unsupported(backend, device, precision)
    if patch_size > min(shape[3:]):
        pytest.skip("patch larger than the key map")
    query, key, query_mask, key_mask = _random_case(shape, device, seed=patch_size)
    index, score = patch_nn(query, key, query_mask, key_mask, patch_size, precision, backend)
    assert index.device.type == device
    assert_matches_reference(query, key, query_mask, key_mask, patch_size, index, score, tol)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision,tol", PRECISIONS)
def test_real_photo_features(device, backend, precision, tol):
    """Photo features have many near-duplicate patches: the hard case for ties and rounding."""
    _skip_unsupported(backend, device, precision)
    size = (24, 32) if backend == "triton" and device == "cpu" else (48, 64)
    feat = chelsea_features(size=size)
    h, w = feat.shape[1:]
    hole = torch.zeros(h, w, dtype=torch.bool)
    hole[h // 4 : h // 2, w // 3 : 2 * w // 3] = True
    known = ~torch.nn.functional.max_pool2d(hole[None, None].float(), 3, 1, 1)[0, 0].bool()
    args = [t.to(device) for t in (feat, feat, hole, known)]
    index, score = patch_nn(*args, 3, precision, backend)
    assert_matches_reference(*args, 3, index, score, tol)
    assert not bool(hole.reshape(-1)[index.cpu()].any()), "matched a patch inside the hole"


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_ties_go_to_lowest_key_index(device, backend, precision):
    """Small integers are exact in every precision, so duplicated keys tie exactly."""
    _skip_unsupported(backend, device, precision)
    gen = torch.Generator().manual_seed(3)
    key = torch.randint(-3, 4, (5, 10, 12), generator=gen).float()
    key[:, 6:9, 7:10] = key[:, 1:4, 2:5]  # the patch centred at (2, 3) again at (7, 8)
    key[:, 2:5, 8:11] = key[:, 1:4, 2:5]  # and at (3, 9), which is later than (2, 3)
    query = torch.zeros(5, 6, 6)
    query[:, 1:4, 1:4] = key[:, 1:4, 2:5]  # query centre (2, 2) is that patch
    query_mask = torch.zeros(6, 6, dtype=torch.bool)
    query_mask[2, 2] = True
    key_mask = torch.ones(10, 12, dtype=torch.bool)
    args = [t.to(device) for t in (query, key, query_mask, key_mask)]
    index, score = patch_nn(*args, 3, precision, backend)
    assert index.tolist() == [2 * 12 + 3]
    assert score.item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_norm_keys_are_never_chosen(device, backend):
    _skip_unsupported(backend, device, "fp32")
    query = torch.ones(4, 5, 5)
    key = torch.zeros(4, 8, 8)
    key[:, :, 5:] = -1.0  # every nonzero key anticorrelates: the zero keys would score 0 > -1
    key[0, 0, 7] = -2.0
    query_mask = torch.zeros(5, 5, dtype=torch.bool)
    query_mask[2, 2] = True
    args = [t.to(device) for t in (query, key, query_mask, torch.ones(8, 8, dtype=torch.bool))]
    index, score = patch_nn(*args, 3, "fp32", backend)
    y, x = divmod(index.item(), 8)
    assert x >= 4, "chose a zero-norm key"
    assert score.item() < 0


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_keys_and_zero_query(device, backend):
    _skip_unsupported(backend, device, "fp32")
    query_mask = torch.ones(4, 4, dtype=torch.bool)
    key_mask = torch.zeros(6, 6, dtype=torch.bool)
    key_mask[2:, 3:] = True
    args = [t.to(device) for t in (torch.randn(2, 4, 4), torch.zeros(2, 6, 6), query_mask, key_mask)]
    index, score = patch_nn(*args, 3, "fp32", backend)
    assert index.tolist() == [2 * 6 + 3] * 16  # the lowest valid key
    assert score.abs().max().item() == 0.0
    # a zero query scores 0 against anything and takes the lowest nonzero key
    key = torch.randn(2, 6, 6)
    key[:, :, :4] = 0.0
    args = [t.to(device) for t in (torch.zeros(2, 4, 4), key, query_mask, torch.ones(6, 6, dtype=torch.bool))]
    index, score = patch_nn(*args, 3, "fp32", backend)
    assert set(index.tolist()) == {1 * 6 + 3}
    assert score.abs().max().item() == 0.0


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_key(device, backend):
    _skip_unsupported(backend, device, "fp32")
    key_mask = torch.zeros(7, 7, dtype=torch.bool)
    key_mask[4, 2] = True
    query, key = torch.randn(6, 5, 9), torch.randn(6, 7, 7)
    args = [t.to(device) for t in (query, key, torch.ones(5, 9, dtype=torch.bool), key_mask)]
    index, score = patch_nn(*args, 3, "fp32", backend)
    assert set(index.tolist()) == {4 * 7 + 2}
    assert_matches_reference(*args, 3, index, score, 1e-5)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_per_item(device, backend):
    _skip_unsupported(backend, device, "fp32")
    gen = torch.Generator().manual_seed(7)
    query, key = torch.randn(3, 6, 9, 8, generator=gen), torch.randn(3, 6, 10, 7, generator=gen)
    query_mask = torch.rand(3, 9, 8, generator=gen) < 0.4
    query_mask[1] = False  # an item with no queries contributes nothing
    key_mask = torch.rand(10, 7, generator=gen) < 0.8  # one mask shared by all items
    args = [t.to(device) for t in (query, key, query_mask, key_mask)]
    index, score = patch_nn(*args, 3, "fp32", backend)
    parts = [
        patch_nn(query[b].to(device), key[b].to(device), query_mask[b].to(device), key_mask.to(device), 3, "fp32", backend) for b in (0, 2)
    ]
    assert torch.equal(index, torch.cat([p[0] for p in parts]))
    torch.testing.assert_close(score, torch.cat([p[1] for p in parts]))


def test_chunking_does_not_change_the_answer():
    """Integer features make every dot product exact, so any tiling must agree bit for bit."""
    gen = torch.Generator().manual_seed(11)
    query = torch.randint(-4, 5, (7, 21, 23), generator=gen).float()
    key = torch.randint(-4, 5, (7, 25, 19), generator=gen).float()
    query_mask = torch.ones(21, 23, dtype=torch.bool)
    key_mask = torch.ones(25, 19, dtype=torch.bool)
    whole = patch_nn(query, key, query_mask, key_mask, 3, "fp32", "torch")
    for budget in (4096, 50_000, 1 << 20):
        chunked = patch_nn(query, key, query_mask, key_mask, 3, "fp32", "torch", chunk_bytes=budget)
        assert torch.equal(chunked[0], whole[0])
        assert torch.equal(chunked[1], whole[1])


@pytest.mark.parametrize(
    "nq,nk,dim,budget",
    [(100_000, 100_000, 36, 1 << 30), (16384, 16384, 2304, 1 << 30), (10, 10**6, 2304, 1 << 28), (262144, 262144, 2304, 1 << 30)],
)
def test_tiles_respect_the_byte_budget(nq, nk, dim, budget):
    tq, tk = _tile_sizes(nq, nk, dim, 4, budget)
    working_set = 8 * tq * tk + (tq + tk) * dim * 4
    assert working_set <= budget
    assert tq * tk < nq * nk or nq * nk * 4 <= budget, "the full score matrix was allowed"
    whole_problem = tq == nq and tk == nk
    assert whole_problem or working_set >= budget // 8, "tiles so small that the GEMMs would starve"


def test_float64_input_stays_exact():
    query, key, query_mask, key_mask = _random_case((5, 8, 8, 9, 9), "cpu", seed=1)
    index, score = patch_nn(query.double(), key.double(), query_mask, key_mask, 3, "fp32", "torch")
    ref_index, ref_score = brute_force_patch_nn(query, key, query_mask, key_mask, 3)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(score.double(), ref_score, atol=1e-6, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision,tol", PRECISIONS)
def test_realistic_size_on_gpu(backend, precision, tol):
    """relu3_1-like sizes: 4096 queries x 4096 keys, C = 256, k = 3."""
    require_backend(backend, "cuda")
    gen = torch.Generator().manual_seed(5)
    feat = torch.randn(256, 64, 128, generator=gen).relu()
    hole = torch.zeros(64, 128, dtype=torch.bool)
    hole[:, :64] = True
    args = [t.cuda() for t in (feat, feat, hole, ~hole)]
    index, score = patch_nn(*args, 3, precision, backend)
    ref_index, ref_score = patch_nn(*args, 3, "fp32", "torch")
    chosen = ncc_at(feat, feat, hole, index.cpu(), 3)
    torch.testing.assert_close(chosen.float(), ref_score.cpu(), atol=tol, rtol=0)
