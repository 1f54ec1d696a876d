"""patch_nn(method="patchmatch"): every backend against the brute-force float64 reference.

Backends: the torch reference, the C++ kernel (neuralpatch._cpu) and the Triton kernel
(interpreted on the CPU, so at tiny shapes and few iterations). Results are compared by the
true NCC of what was returned, plus bit-for-bit agreement between backends on integer
features, where every float sum is exact.
"""

import pytest
import torch

from neuralpatch import BackendUnavailableError, patch_nn
from neuralpatch import patchmatch as pm
from neuralpatch.reference import brute_force_patch_nn, interior_mask, ncc_at
from tests import test_errors
from tests.conftest import require_backend
from tests.photos import chelsea_features

BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture(autouse=True)
def small_reduced_dim(monkeypatch):
    """The tiny test features (C*k*k of 9 to 125) would skip the reduced stage at its default
    64 dimensions: 4 make it run in every test here (tests that need its absence say so)."""
    monkeypatch.setattr(pm, "REDUCED_DIM", 4)


# tolerance on the NCC the op reports against the float64 NCC of the pair it returned
PRECISIONS = [("fp32", 1e-5), ("tf32", 3e-3), ("bf16", 2e-2)]


def _skip(backend):
    require_backend(backend, "cpu")


def _random_case(c, hq, wq, hk, wk, seed, integer=False):
    gen = torch.Generator().manual_seed(seed)
    if integer:
        query = torch.randint(-3, 4, (c, hq, wq), generator=gen).float()
        key = torch.randint(-3, 4, (c, hk, wk), generator=gen).float()
    else:
        query, key = torch.randn(c, hq, wq, generator=gen), torch.randn(c, hk, wk, generator=gen)
    query_mask = torch.rand(hq, wq, generator=gen) < 0.6
    query_mask[0, 0] = True  # a border query
    key_mask = torch.rand(hk, wk, generator=gen) < 0.7
    return query, key, query_mask, key_mask


def _iterations(backend, many):
    """Interpreted Triton costs seconds per sweep, so it runs 1."""
    return 1 if backend == "triton" else many


def assert_valid(query, key, query_mask, key_mask, patch_size, index, score, tol):
    assert index.dtype == torch.int64 and score.dtype == torch.float32
    assert index.shape == score.shape == (int(query_mask.sum()),)
    valid = key_mask.bool() & interior_mask(*key.shape[1:], patch_size)
    assert bool(valid.reshape(-1)[index].all()), "returned a position that is not a valid key"
    true_ncc = ncc_at(query, key, query_mask, index, patch_size)
    torch.testing.assert_close(score.double(), true_ncc, atol=tol, rtol=0)
    return true_ncc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision,tol", PRECISIONS)
@pytest.mark.parametrize("patch_size", [1, 3, 5])
def test_valid_keys_and_exact_scores(backend, precision, tol, patch_size):
    _skip(backend)
    if backend == "triton" and (precision != "fp32" or patch_size != 1):
        pytest.skip("interpreted Triton: one precision and two patch sizes keep the suite fast")
    query, key, query_mask, key_mask = _random_case(6, 9, 11, 10, 13, seed=patch_size)
    index, score = patch_nn(query, key, query_mask, key_mask, patch_size, precision, backend,
                            method="patchmatch", iterations=_iterations(backend, 3))  # fmt: skip
    assert_valid(query, key, query_mask, key_mask, patch_size, index, score, tol)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("patch_size", [1, 3, 5])
def test_enough_iterations_find_the_exact_answer(backend, patch_size):
    _skip(backend)
    if backend == "torch" and patch_size != 3:
        pytest.skip("150 torch iterations take seconds; the C++ kernel covers the other sizes")
    query, key, query_mask, key_mask = _random_case(5, 8, 9, 11, 10, seed=10 + patch_size)
    index, score = patch_nn(query, key, query_mask, key_mask, patch_size, "fp32", backend,
                            method="patchmatch", iterations=150)  # fmt: skip
    true_ncc = assert_valid(query, key, query_mask, key_mask, patch_size, index, score, 1e-5)
    _, best = brute_force_patch_nn(query, key, query_mask, key_mask, patch_size)
    torch.testing.assert_close(true_ncc, best, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_answer_as_init_is_returned_unchanged(backend):
    _skip(backend)
    query, key, query_mask, key_mask = _random_case(6, 9, 10, 11, 12, seed=3)
    exact_index, exact_score = patch_nn(query, key, query_mask, key_mask, 3, "fp32", "torch")
    index, score = patch_nn(query, key, query_mask, key_mask, 3, "fp32", backend, method="patchmatch",
                            init=exact_index, iterations=_iterations(backend, 4))  # fmt: skip
    assert torch.equal(index, exact_index)
    torch.testing.assert_close(score, exact_score, atol=1e-5, rtol=0)


def test_zero_iterations_return_init_with_its_scores():
    query, key, query_mask, key_mask = _random_case(4, 7, 8, 9, 9, seed=4)
    start, _ = patch_nn(query, key, query_mask, key_mask, 3, "fp32", "torch", method="patchmatch", iterations=1, seed=9)
    index, score = patch_nn(query, key, query_mask, key_mask, 3, "fp32", "auto", method="patchmatch", init=start, iterations=0)
    assert torch.equal(index, start)
    assert_valid(query, key, query_mask, key_mask, 3, index, score, 1e-5)


def test_invalid_init_entries_start_from_valid_keys():
    query, key, query_mask, key_mask = _random_case(4, 7, 8, 9, 9, seed=5)
    nq = int(query_mask.sum())
    bad = torch.full((nq,), -1, dtype=torch.int64)
    bad[1::3] = 0  # a border centre: never a key
    bad[2::3] = 10**6  # outside the map
    index, score = patch_nn(query, key, query_mask, key_mask, 3, "fp32", "auto", method="patchmatch", init=bad, iterations=0)
    assert_valid(query, key, query_mask, key_mask, 3, index, score, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_bit_for_bit_on_integer_features(backend):
    """Integer features make every dot product exact: same algorithm, same random numbers, same field."""
    _skip(backend)
    query, key, query_mask, key_mask = _random_case(5, 8, 9, 10, 9, seed=6, integer=True)
    iterations = _iterations(backend, 3)
    args = (query, key, query_mask, key_mask, 3, "fp32")
    ref = patch_nn(*args, "torch", method="patchmatch", iterations=iterations, seed=17)
    got = patch_nn(*args, backend, method="patchmatch", iterations=iterations, seed=17)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1], ref[1])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_deterministic_under_seed(backend):
    _skip(backend)
    query, key, query_mask, key_mask = _random_case(6, 12, 12, 14, 14, seed=7)
    args = (query, key, query_mask, key_mask, 3, "fp32", backend)
    first = patch_nn(*args, method="patchmatch", iterations=1, seed=1)
    again = patch_nn(*args, method="patchmatch", iterations=1, seed=1)
    other = patch_nn(*args, method="patchmatch", iterations=1, seed=2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0]), "the seed does not reach the search"


def test_cpp_result_does_not_depend_on_the_thread_count():
    _skip("cpp")
    query, key, query_mask, key_mask = _random_case(6, 16, 16, 16, 16, seed=8)
    _, problem = next(pm.search_problems(query[None], key[None], query_mask[None], key_mask[None], 3, "fp32", "cpp"))
    names = ("query_map", "key_map", "query_center", "query_slot", "key_center", "key_inv_norm")
    init = pm.initial_field(None, problem["key_center"], problem["key_inv_norm"], problem["query_center"].numel(), 3)
    runs = [pm.cpp_patchmatch_fwd(*[problem[n] for n in names], init, 3, 2, 3, num_threads=t) for t in (1, 2, 3)]
    for field, value in runs[1:]:
        assert torch.equal(field, runs[0][0]) and torch.equal(value, runs[0][1])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_masks_single_key_and_zero_norm_keys(backend):
    _skip(backend)
    query, key = torch.randn(4, 6, 7), torch.randn(4, 8, 8)
    key_mask = torch.zeros(8, 8, dtype=torch.bool)
    key_mask[5, 2] = True
    index, _ = patch_nn(query, key, torch.ones(6, 7, dtype=torch.bool), key_mask, 3, "fp32", backend,
                        method="patchmatch", iterations=1)  # fmt: skip
    assert set(index.tolist()) == {5 * 8 + 2}
    # zero keys everywhere but in the last three columns: never chosen, although they score 0 > -1
    key = torch.zeros(4, 8, 8)
    key[:, :, 5:] = -1.0
    inner = torch.zeros(5, 5, dtype=torch.bool)
    inner[1:4, 1:4] = True  # queries whose patch is all ones (no zero padding)
    index, score = patch_nn(torch.ones(4, 5, 5), key, inner, torch.ones(8, 8, dtype=torch.bool),
                            3, "fp32", backend, method="patchmatch", iterations=1)  # fmt: skip
    assert bool((index % 8 >= 4).all()), "chose a zero-norm key"
    assert bool((score < 0).all())


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_real_photo_features_stay_out_of_the_hole(backend):
    _skip(backend)
    feat = chelsea_features(size=(32, 40))
    h, w = feat.shape[1:]
    hole = torch.zeros(h, w, dtype=torch.bool)
    hole[h // 4 : h // 2, w // 3 : 2 * w // 3] = True
    known = ~torch.nn.functional.max_pool2d(hole[None, None].float(), 3, 1, 1)[0, 0].bool()
    index, score = patch_nn(feat, feat, hole, known, 3, "fp32", backend, method="patchmatch")
    true_ncc = assert_valid(feat, feat, hole, known, 3, index, score, 1e-5)
    assert not bool(hole.reshape(-1)[index].any())
    _, best = brute_force_patch_nn(feat, feat, hole, known, 3)
    assert (true_ncc / best).mean().item() > 0.97  # default iterations on a small real problem


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_batched_items_are_searched_on_their_own(backend):
    _skip(backend)
    gen = torch.Generator().manual_seed(9)
    query, key = torch.randn(3, 4, 7, 8, generator=gen), torch.randn(3, 4, 9, 8, generator=gen)
    query_mask = torch.rand(3, 7, 8, generator=gen) < 0.5
    query_mask[1] = False  # an item without queries contributes nothing
    key_mask = torch.rand(9, 8, generator=gen) < 0.8
    iterations = _iterations(backend, 2)
    index, score = patch_nn(query, key, query_mask, key_mask, 3, "fp32", backend, method="patchmatch", iterations=iterations)
    n0 = int(query_mask[0].sum())
    for b, (lo, hi) in ((0, (0, n0)), (2, (n0, index.numel()))):
        assert_valid(query[b], key[b], query_mask[b], key_mask, 3, index[lo:hi], score[lo:hi], 1e-5)
    # item 0 draws the stream of a single-item call with the same seed
    single = patch_nn(query[0], key[0], query_mask[0], key_mask, 3, "fp32", backend, method="patchmatch", iterations=iterations)
    assert torch.equal(single[0], index[:n0])
    # the exact answer of every item, as init, comes back unchanged
    exact = patch_nn(query, key, query_mask, key_mask, 3, "fp32", "torch")
    warm = patch_nn(query, key, query_mask, key_mask, 3, "fp32", backend, method="patchmatch", init=exact[0], iterations=iterations)
    assert torch.equal(warm[0], exact[0])


# ----------------------------------------------------------------------------- the reduced stage


def _problem(query, key, query_mask, key_mask, patch_size=3):
    return next(pm.search_problems(query[None], key[None], query_mask[None], key_mask[None], patch_size, "fp32", "torch"))[1]


def test_reduced_problem_is_integer_and_exact_in_float32():
    query, key, query_mask, key_mask = _random_case(6, 9, 11, 10, 13, seed=21)
    small = pm.reduced_problem(_problem(query, key, query_mask, key_mask), 3, 4, seed=0)
    d = small["key_map"].shape[-1]
    assert d == 4
    level = pm._reduced_levels(d)
    assert level == 127 and d * level**2 < 2**24  # int8 entries, exact float32 sums
    assert pm._reduced_levels(2000) ** 2 * 2000 < 2**24 <= (pm._reduced_levels(2000) + 1) ** 2 * 2000
    for name in ("query_map", "key_map"):
        t = small[name]
        assert torch.equal(t, t.round()) and float(t.abs().max()) <= level
    # only valid keys carry a projection; validity is unchanged
    valid = _problem(query, key, query_mask, key_mask)["key_inv_norm"] > 0
    assert torch.equal(small["key_inv_norm"] > 0, valid)
    assert not bool(small["key_map"][~valid].any())
    # nothing to save: the stage is skipped
    assert pm.reduced_problem(_problem(query, key, query_mask, key_mask), 3, 27, seed=0) is None


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_reduced_argmax_cpp_equals_torch_with_ties_to_the_lowest_key(threads):
    _skip("cpp")
    gen = torch.Generator().manual_seed(threads)
    # int8 entries (the VNNI kernel), then larger ones (the float32 kernel)
    for nq, nk, d, level in ((1, 1, 1, 127), (37, 101, 5, 127), (70, 333, 48, 127), (9, 40, 200, 127), (70, 333, 48, 500)):
        queries = torch.randint(-level, level + 1, (nq, d), generator=gen).float()
        keys = torch.randint(-level, level + 1, (nk, d), generator=gen).float()
        keys[::7] = keys[nk // 2].clone()  # many equal keys: ties
        keys[-1] = keys[0].clone()
        want = pm.torch_reduced_argmax(queries, keys)
        got = pm.cpp_reduced_argmax(queries, keys, num_threads=threads)
        assert torch.equal(got, want)
        scores = queries @ keys.T
        first = torch.tensor([int((row == row.max()).nonzero()[0]) for row in scores])
        assert torch.equal(want, first)
        if level <= 127:  # the portable integer code gives the same answer
            from neuralpatch import _cpu

            out = torch.empty(nq, dtype=torch.int32)
            assert _cpu.reduced_argmax_i8(queries.data_ptr(), keys.data_ptr(), out.data_ptr(), nq, nk, d, threads, False)
            assert torch.equal(out.long(), want)


@pytest.mark.parametrize("subsample", [1, 2])
def test_reduced_stage_returns_valid_keys_under_masks(subsample, monkeypatch):
    monkeypatch.setattr(pm, "KEY_SUBSAMPLE", subsample)
    query, key, query_mask, key_mask = _random_case(6, 9, 11, 10, 13, seed=22)
    for mask in (key_mask, torch.zeros_like(key_mask)):
        if not bool(mask.any()):
            mask[3, 4] = True  # (y + x) odd: no key on the checkerboard that KEY_SUBSAMPLE = 2 scans
        problem = _problem(query, key, query_mask, mask)
        small = pm.reduced_problem(problem, 3, 4, seed=0)
        best = pm.reduced_best(small)
        assert bool((problem["key_inv_norm"].reshape(-1)[best.long()] > 0).all())
        if int(mask.sum()) == 1:
            assert set(best.tolist()) == {3 * 13 + 4}
        for dy, dx in pm._DIRECTIONS:
            cand = pm.neighbour_candidates(best, problem, dy, dx)
            assert bool((problem["key_inv_norm"].reshape(-1)[cand.long()] > 0).all())


def test_reduced_stage_finds_a_planted_copy():
    """A query patch copied into the key map (and scaled: NCC 1) is found without any sweep."""
    gen = torch.Generator().manual_seed(23)
    key = torch.randn(8, 20, 20, generator=gen)
    query = torch.randn(8, 6, 6, generator=gen)
    query[:, 2:5, 2:5] = 3.0 * key[:, 10:13, 6:9]
    query_mask = torch.zeros(6, 6, dtype=torch.bool)
    query_mask[3, 3] = True
    index, score = patch_nn(query, key, query_mask, torch.ones(20, 20, dtype=torch.bool), 3, "fp32", "torch",
                            method="patchmatch", iterations=1)  # fmt: skip
    assert index.tolist() == [11 * 20 + 7]
    torch.testing.assert_close(score, torch.ones(1), atol=1e-5, rtol=0)


def test_default_iterations_meet_the_quality_bar_on_real_features(monkeypatch):
    """The default schedule (one propagation round), with the reduced stage at 48 dimensions."""
    monkeypatch.setattr(pm, "REDUCED_DIM", 48)
    feat = chelsea_features(size=(40, 48))
    h, w = feat.shape[1:]
    hole = torch.zeros(h, w, dtype=torch.bool)
    hole[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
    known = ~torch.nn.functional.max_pool2d(hole[None, None].float(), 3, 1, 1)[0, 0].bool()
    index, score = patch_nn(feat, feat, hole, known, 3, "fp32", "auto", method="patchmatch")
    true_ncc = assert_valid(feat, feat, hole, known, 3, index, score, 1e-5)
    _, best = brute_force_patch_nn(feat, feat, hole, known, 3)
    assert (true_ncc / best).mean().item() > 0.98


# ----------------------------------------------------------------------------- errors

EXACT_BAD_INPUTS = test_errors.test_patch_nn_rejects.pytestmark[0].args[1]


@pytest.mark.parametrize("changes,error,argument", EXACT_BAD_INPUTS)
def test_rejects_the_bad_inputs_of_the_exact_op(changes, error, argument):
    with pytest.raises(error, match=argument):
        test_errors.call(**changes, method="patchmatch")


def _good():
    query, key, query_mask, key_mask = _random_case(4, 6, 6, 7, 7, seed=0)
    return dict(query_feat=query, key_feat=key, query_mask=query_mask, key_mask=key_mask)


@pytest.mark.parametrize(
    "options,error,argument",
    [
        (dict(method="approx"), ValueError, "method"),
        (dict(method="patchmatch", iterations=-1), ValueError, "iterations"),
        (dict(method="patchmatch", iterations=2.0), TypeError, "iterations"),
        (dict(method="patchmatch", seed=-1), ValueError, "seed"),
        (dict(method="patchmatch", seed="1"), TypeError, "seed"),
        (dict(method="patchmatch", init=torch.zeros(3, dtype=torch.int64)), ValueError, "init"),
        (dict(method="patchmatch", init=torch.zeros(1, 5, dtype=torch.int64)), ValueError, "init"),
        (dict(method="patchmatch", init=torch.zeros(5)), TypeError, "init"),
        (dict(method="patchmatch", init=[0, 1]), TypeError, "init"),
        (dict(method="exact", init=torch.zeros(5, dtype=torch.int64)), ValueError, "init"),
        (dict(method="exact", iterations=3), ValueError, "iterations"),
        (dict(method="exact", seed=3), ValueError, "seed"),
    ],
)
def test_rejects_bad_patchmatch_options(options, error, argument):
    with pytest.raises(error, match=argument):
        patch_nn(**_good(), **options)


def test_backend_names_for_each_method():
    with pytest.raises(BackendUnavailableError, match="backend='cuda'"):
        patch_nn(**_good(), backend="cuda", method="patchmatch")
    with pytest.raises(BackendUnavailableError, match="backend='cpp'"):
        patch_nn(**_good(), backend="cpp")


def test_auto_falls_back_quietly_without_the_cpp_module(monkeypatch):
    monkeypatch.setattr(pm, "cpu_available", lambda: (False, "neuralpatch._cpu was not built (test)"))
    index, _ = patch_nn(**_good(), method="patchmatch", iterations=1)
    assert index.numel() == int(_good()["query_mask"].sum())
    with pytest.raises(BackendUnavailableError, match="neuralpatch._cpu was not built"):
        patch_nn(**_good(), backend="cpp", method="patchmatch")


def test_cpp_module_raises_clear_errors():
    _skip("cpp")
    from neuralpatch import _cpu

    query, key, query_mask, key_mask = _random_case(4, 6, 6, 7, 7, seed=0)
    _, p = next(pm.search_problems(query[None], key[None], query_mask[None], key_mask[None], 3, "fp32", "cpp"))
    nq = p["query_center"].numel()
    field, value = torch.empty(nq, dtype=torch.int32), torch.empty(nq)
    init = pm.initial_field(None, p["key_center"], p["key_inv_norm"], nq, 0)
    tensors = [p[n] for n in ("query_map", "key_map", "query_center", "query_slot", "key_center", "key_inv_norm")]
    ptrs = [t.data_ptr() for t in (*tensors, init, field, value)]
    sizes = dict(nq=nq, nk=p["key_center"].numel(), channels=4, patch_size=3, query_height=6, query_width=6,
                 key_height=7, key_width=7, iterations=1, seed=0)  # fmt: skip
    _cpu.patchmatch(*ptrs, **sizes)  # the good call runs
    with pytest.raises(ValueError, match="patch_size"):
        _cpu.patchmatch(*ptrs, **{**sizes, "patch_size": 4})
    with pytest.raises(ValueError, match="iterations"):
        _cpu.patchmatch(*ptrs, **{**sizes, "iterations": -1})
    with pytest.raises(ValueError, match="query_map: null pointer"):
        _cpu.patchmatch(0, *ptrs[1:], **sizes)
    bad_init = torch.zeros(nq, dtype=torch.int32)  # position 0 is a border centre: not a key
    with pytest.raises(ValueError, match="init_field"):
        _cpu.patchmatch(*ptrs[:6], bad_init.data_ptr(), *ptrs[7:], **sizes)
    with pytest.raises(TypeError, match="query_map"):
        pm.cpp_patchmatch_fwd(tensors[0].double(), *tensors[1:], init, 3, 1, 0)


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("with_init", [False, True])
def test_opcheck(backend, with_init):
    _skip(backend)
    query, key, query_mask, key_mask = _random_case(4, 7, 8, 7, 7, seed=1)
    init = patch_nn(query, key, query_mask, key_mask, 3, "fp32", "torch")[0] if with_init else None
    torch.library.opcheck(torch.ops.neuralpatch.patchmatch.default, (query, key, query_mask, key_mask, init, 3, "fp32", backend, 2, 5))
