"""torch.library registration: opcheck, torch.compile(fullgraph=True) against eager."""

import pytest
import torch

from neuralpatch import patch_loss, patch_nn


def sample_inputs():
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(4, 9, 10, generator=gen)
    key = torch.randn(4, 8, 7, generator=gen)
    query_mask = torch.zeros(9, 10, dtype=torch.bool)
    query_mask[2:6, 0:8] = True
    key_mask = torch.ones(8, 7, dtype=torch.bool)
    return query, key, query_mask, key_mask


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_opcheck_patch_nn(precision):
    query, key, query_mask, key_mask = sample_inputs()
    torch.library.opcheck(torch.ops.neuralpatch.patch_nn.default, (query, key, query_mask, key_mask, 3, precision, "torch", 1 << 20))


def test_opcheck_patch_loss():
    query, key, query_mask, key_mask = sample_inputs()
    index, _ = patch_nn(query, key, query_mask, key_mask, 3, "fp32", "torch")
    feat = query.double().requires_grad_()
    torch.library.opcheck(torch.ops.neuralpatch.patch_loss.default, (feat, key.double(), query_mask, index, 3, "torch"))
    grad = torch.tensor(1.5, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.neuralpatch.patch_loss_backward.default, (grad, feat.detach(), key.double(), query_mask, index, 3, "torch")
    )


def test_torch_compile_fullgraph_matches_eager():
    query, key, query_mask, key_mask = sample_inputs()

    def texture_loss(x, exemplar):
        index, _ = patch_nn(x.detach(), exemplar, query_mask, key_mask, 3, "fp32", "torch")
        return patch_loss(x, exemplar, query_mask, index, 3, "torch") * 0.5 + x.square().mean()

    x_eager = query.clone().requires_grad_()
    loss_eager = texture_loss(x_eager, key)
    loss_eager.backward()

    compiled = torch.compile(texture_loss, fullgraph=True)
    x_compiled = query.clone().requires_grad_()
    loss_compiled = compiled(x_compiled, key)
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_triton_runs_interpreted_where_torch_sees_no_gpu():
    import os

    import torch

    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
