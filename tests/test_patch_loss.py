"""patch_loss: value and gradient against the float64 reference, gradcheck, every backend."""

import pytest
import torch

from neuralpatch import patch_loss, patch_nn
from neuralpatch.reference import brute_force_patch_loss
from tests.conftest import device_params, require_backend

BACKENDS = ["torch", "triton", "cuda"]
SHAPES = [(8, 12, 12, 12, 12), (19, 13, 17, 11, 19), (3, 9, 7, 7, 9)]


def _case(shape, patch_size, seed, dtype=torch.float32):
    c, h, w, ht, wt = shape
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(c, h, w, generator=gen, dtype=torch.float64)
    target = torch.randn(c, ht, wt, generator=gen, dtype=torch.float64)
    query_mask = torch.rand(h, w, generator=gen) < 0.5
    query_mask[0, -1] = True  # a border query: only its in-map offsets count
    index, _ = patch_nn(feat, target, query_mask, torch.ones(ht, wt, dtype=torch.bool), patch_size, "fp32", "torch")
    return feat.to(dtype), target.to(dtype), query_mask, index


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("patch_size", [1, 3, 5])
def test_value_and_gradient_match_reference(device, backend, shape, patch_size):
    require_backend(backend, device)
    feat, target, query_mask, index = _case(shape, patch_size, seed=patch_size)
    ref_feat = feat.double().requires_grad_()
    ref = brute_force_patch_loss(ref_feat, target.double(), query_mask, index, patch_size)
    ref.backward()
    x = feat.to(device).requires_grad_()
    loss = patch_loss(x, target.to(device), query_mask.to(device), index.to(device), patch_size, backend)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), ref_feat.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("patch_size", [1, 3, 5, 7])
def test_gradcheck_float64(patch_size):
    feat, target, query_mask, index = _case((4, 9, 10, 8, 9), patch_size, seed=0, dtype=torch.float64)
    feat.requires_grad_()
    assert torch.autograd.gradcheck(lambda f: patch_loss(f, target, query_mask, index, patch_size, "torch"), (feat,))


def test_gradcheck_batched_float64():
    gen = torch.Generator().manual_seed(2)
    feat = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=gen)
    query_mask = torch.rand(2, 7, 8, generator=gen) < 0.4
    index, _ = patch_nn(feat.detach(), target, query_mask, torch.ones(6, 6, dtype=torch.bool), 3, "fp32", "torch")
    assert torch.autograd.gradcheck(lambda f: patch_loss(f, target, query_mask, index, 3, "torch"), (feat,))


def test_target_is_detached():
    feat, target, query_mask, index = _case((4, 8, 8, 8, 8), 3, seed=1)
    target.requires_grad_()
    feat.requires_grad_()
    patch_loss(feat, target, query_mask, index, 3, "torch").backward()
    assert feat.grad is not None and target.grad is None


def test_bf16_features_give_float32_loss():
    feat, target, query_mask, index = _case((4, 8, 8, 8, 8), 3, seed=4)
    x = feat.to(torch.bfloat16).requires_grad_()
    loss = patch_loss(x, target.to(torch.bfloat16), query_mask, index, 3, "torch")
    loss.backward()
    ref = brute_force_patch_loss(x.detach().double(), target.to(torch.bfloat16).double(), query_mask, index, 3)
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
