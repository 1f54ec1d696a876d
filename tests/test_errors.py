"""Bad input raises the documented exception, and the message names the argument."""

import pytest
import torch

from neuralpatch import BackendUnavailableError, patch_loss, patch_nn


def good():
    gen = torch.Generator().manual_seed(0)
    return dict(
        query_feat=torch.randn(4, 8, 8, generator=gen),
        key_feat=torch.randn(4, 9, 7, generator=gen),
        query_mask=torch.ones(8, 8, dtype=torch.bool),
        key_mask=torch.ones(9, 7, dtype=torch.bool),
    )


def call(**changes):
    args = good()
    options = {k: changes.pop(k) for k in ("patch_size", "precision", "backend", "chunk_bytes") if k in changes}
    args.update(changes)
    return patch_nn(**args, **options)


@pytest.mark.parametrize(
    "changes,error,argument",
    [
        (dict(query_feat=torch.randn(8, 8)), ValueError, "query_feat"),
        (dict(key_feat=torch.randn(1, 1, 4, 9, 7)), ValueError, "key_feat"),
        (dict(key_feat=torch.randn(5, 9, 7)), ValueError, "key_feat"),
        (dict(key_feat=torch.randn(2, 4, 9, 7)), ValueError, "key_feat"),
        (dict(query_mask=torch.ones(8, 7, dtype=torch.bool)), ValueError, "query_mask"),
        (dict(key_mask=torch.ones(9, 7, 1, dtype=torch.bool)), ValueError, "key_mask"),
        (dict(query_mask=torch.zeros(8, 8, dtype=torch.bool)), ValueError, "query_mask"),
        (dict(key_mask=torch.zeros(9, 7, dtype=torch.bool)), ValueError, "key_mask"),
        (dict(patch_size=4), ValueError, "patch_size"),
        (dict(patch_size=0), ValueError, "patch_size"),
        (dict(patch_size=9), ValueError, "patch_size"),
        (dict(patch_size=3.0), TypeError, "patch_size"),
        (dict(query_feat=torch.ones(4, 8, 8, dtype=torch.int64)), TypeError, "query_feat"),
        (dict(key_feat=torch.ones(4, 9, 7, dtype=torch.int32)), TypeError, "key_feat"),
        (dict(query_mask=torch.ones(8, 8, dtype=torch.float32)), TypeError, "query_mask"),
        (dict(key_feat=torch.randn(4, 9, 7, dtype=torch.complex64)), TypeError, "key_feat"),
        (dict(precision="fp16"), ValueError, "precision"),
        (dict(backend="numpy"), ValueError, "backend"),
        (dict(chunk_bytes=0), ValueError, "chunk_bytes"),
        (dict(query_feat=[[1.0]]), TypeError, "query_feat"),
    ],
)
def test_patch_nn_rejects(changes, error, argument):
    with pytest.raises(error, match=argument):
        call(**changes)


def test_keys_must_fit_inside_the_map():
    """Keys exist only where the whole patch fits; a mask selecting only border keys is empty."""
    key_mask = torch.zeros(9, 7, dtype=torch.bool)
    key_mask[0, :] = True
    with pytest.raises(ValueError, match="key_mask"):
        call(key_mask=key_mask)


@pytest.mark.parametrize("name", ["query_feat", "key_feat"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features(name, value):
    feat = good()[name].clone()
    feat[1, 2, 3] = value
    with pytest.raises(ValueError, match=f"{name}: contains NaN or Inf"):
        call(**{name: feat})


def test_different_devices():
    meta = torch.randn(4, 9, 7, device="meta")
    with pytest.raises(ValueError, match="key_feat"):
        call(key_feat=meta)
    with pytest.raises(ValueError, match="query_mask"):
        call(query_mask=torch.ones(8, 8, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unavailable_backend_names_what_is_missing(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match=f"backend='{backend}'"):
        call(backend=backend)


def test_auto_falls_back_quietly_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    index, score = call(backend="auto")
    assert index.shape == score.shape == (64,)


def test_inputs_are_not_modified():
    args = good()
    copies = {k: v.clone() for k, v in args.items()}
    patch_nn(**args, precision="bf16", backend="torch")
    for name, value in args.items():
        assert torch.equal(value, copies[name]), name


def loss_args():
    args = good()
    index, _ = patch_nn(**args, precision="fp32", backend="torch")
    return dict(feat=args["query_feat"], target_feat=args["key_feat"], query_mask=args["query_mask"], index=index)


@pytest.mark.parametrize(
    "changes,error,argument",
    [
        (dict(feat=torch.randn(8, 8)), ValueError, "feat"),
        (dict(target_feat=torch.randn(3, 9, 7)), ValueError, "target_feat"),
        (dict(query_mask=torch.ones(7, 8, dtype=torch.bool)), ValueError, "query_mask"),
        (dict(index=torch.zeros(64, dtype=torch.float32)), TypeError, "index"),
        (dict(index=torch.zeros(8, 8, dtype=torch.int64)), ValueError, "index"),
        (dict(index=torch.full((63,), 10, dtype=torch.int64)), ValueError, "index"),
        (dict(index=torch.zeros(64, dtype=torch.int64)), ValueError, "index"),  # centre 0 is on the border
        (dict(index=torch.full((64,), 9 * 7, dtype=torch.int64)), ValueError, "index"),
        (dict(feat=torch.ones(4, 8, 8, dtype=torch.int64)), TypeError, "feat"),
        (dict(patch_size=2), ValueError, "patch_size"),
        (dict(backend="cpp"), ValueError, "backend"),
    ],
)
def test_patch_loss_rejects(changes, error, argument):
    args = loss_args()
    patch_size = changes.pop("patch_size", 3)
    backend = changes.pop("backend", "torch")
    args.update(changes)
    with pytest.raises(error, match=argument):
        patch_loss(**args, patch_size=patch_size, backend=backend)


def test_patch_loss_non_finite():
    args = loss_args()
    args["feat"] = args["feat"].clone()
    args["feat"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="feat: contains NaN or Inf"):
        patch_loss(**args)
