"""pytest-benchmark suite for the patch-NN search and the patch loss.

    pytest bench/bench_patch_nn.py --benchmark-json=bench/results/patch_nn.json

Each benchmark records TFLOP/s (search) or GB/s (loss) and the problem in
``extra_info``; the GEMM baseline runs in the same session so ratios are side by side.
Sizes: small on the CPU, relu3_1-sized (n = 16384, C = 256, k = 3) on a GPU.
"""

import pytest
import torch

from bench.common import gemm_fn, make_problem, matmul_precision, synchronize, usable_backends
from neuralpatch import patch_loss, patch_nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, CHANNELS = (16384, 256) if DEVICE == "cuda" else (1024, 32)
PATCH_SIZE = 3
PRECISIONS = ["fp32", "tf32", "bf16"]
BACKENDS = ["torch", "triton", "cuda"]


@pytest.fixture(scope="module")
def problem():
    return make_problem(N, CHANNELS, PATCH_SIZE, DEVICE)


def _pedantic(benchmark, fn):
    def run():
        fn()
        synchronize(DEVICE)

    benchmark.pedantic(run, warmup_rounds=1, rounds=10 if DEVICE == "cuda" else 3, iterations=1)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_gemm_baseline(benchmark, problem, precision):
    fn = gemm_fn(problem, precision)
    benchmark.group = f"patch_nn-{precision}"
    benchmark.extra_info.update(op="gemm", precision=precision, n=N, channels=CHANNELS, flops=problem.flops)
    with matmul_precision(precision) if DEVICE == "cuda" else torch.autograd.grad_mode.no_grad():
        _pedantic(benchmark, fn)
    benchmark.extra_info["tflops"] = problem.flops / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_patch_nn(benchmark, problem, backend, precision):
    if backend not in usable_backends(DEVICE, [backend]):
        pytest.skip(f"backend {backend} is not available on {DEVICE}")
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter is a correctness tool, not a benchmark")
    benchmark.group = f"patch_nn-{precision}"
    benchmark.extra_info.update(op="patch_nn", backend=backend, precision=precision, n=N, channels=CHANNELS, flops=problem.flops)
    args = (problem.query_feat, problem.key_feat, problem.query_mask, problem.key_mask, PATCH_SIZE, precision, backend)
    _pedantic(benchmark, lambda: patch_nn(*args))
    benchmark.extra_info["tflops"] = problem.flops / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_loss_forward_backward(benchmark, problem, backend):
    if backend not in usable_backends(DEVICE, [backend]):
        pytest.skip(f"backend {backend} is not available on {DEVICE}")
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("the Triton interpreter is a correctness tool, not a benchmark")
    index, _ = patch_nn(problem.query_feat, problem.key_feat, problem.query_mask, problem.key_mask, PATCH_SIZE, "bf16", "auto")
    feat = problem.query_feat.clone().requires_grad_()

    def step():
        loss = patch_loss(feat, problem.key_feat, problem.query_mask, index, PATCH_SIZE, backend)
        loss.backward()

    # bytes a fused forward + backward must move: feat read twice, target patches read twice, grad written
    element = feat.element_size()
    moved = (2 * feat.numel() + 2 * N * CHANNELS * PATCH_SIZE**2 + feat.numel()) * element
    benchmark.group = "patch_loss"
    benchmark.extra_info.update(op="patch_loss", backend=backend, n=N, channels=CHANNELS, bytes=moved)
    _pedantic(benchmark, step)
    benchmark.extra_info["gb_per_s"] = moved / benchmark.stats.stats.median / 1e9
