"""Shared pieces of the benchmarks: problems, timers, the GEMM baseline, memory.

Every backend is timed on the same problem in the same run, next to a same-FLOP
GEMM (torch.matmul in the same precision), so the ratios are taken side by side.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from neuralpatch import patch_nn
from neuralpatch.masks import centre_square
from neuralpatch.ops import available_backends

COLUMNS = [
    "op",
    "backend",
    "device",
    "precision",
    "nq",
    "nk",
    "channels",
    "patch_size",
    "ms_p50",
    "ms_p20",
    "ms_p80",
    "tflops",
    "pct_gemm",
    "pct_peak",
    "peak_extra_mib",
    "gpu",
    "torch",
]

# Dense tensor-core peaks (TFLOP/s) by precision, for the "% of device peak" column.
# H100 SXM datasheet, dense: 989 bf16, 495 tf32, 67 fp32 (FFMA).
DEVICE_PEAK_TFLOPS = {"H100": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}}


@dataclass
class Problem:
    """Nq = Nk = n patches of a (channels, h, w) map, a third of it queries."""

    n: int
    channels: int
    patch_size: int
    device: str
    query_feat: torch.Tensor = field(repr=False, default=None)
    key_feat: torch.Tensor = field(repr=False, default=None)
    query_mask: torch.Tensor = field(repr=False, default=None)
    key_mask: torch.Tensor = field(repr=False, default=None)

    @property
    def flops(self) -> float:
        return 2.0 * self.n * self.n * self.channels * self.patch_size**2


def make_problem(n: int, channels: int, patch_size: int, device: str, seed: int = 0) -> Problem:
    """A query map with exactly n queries and a key map with exactly n interior keys."""
    width = 128 if n >= 128 * 4 else max(1, int(n**0.5))
    height = -(-n // width)
    gen = torch.Generator().manual_seed(seed)
    r = patch_size // 2
    # ReLU features, as VGG's relu3_1 gives: nonnegative with many zeros
    query = torch.randn(channels, height, width, generator=gen).relu_().to(device)
    key = torch.randn(channels, height + 2 * r, width + 2 * r, generator=gen).relu_().to(device)
    query_mask = torch.zeros(height * width, dtype=torch.bool)
    query_mask[:n] = True
    key_mask = torch.zeros(height + 2 * r, width + 2 * r, dtype=torch.bool)
    inner = torch.zeros(height * width, dtype=torch.bool)
    inner[:n] = True
    key_mask[r : r + height, r : r + width] = inner.view(height, width)
    return Problem(n, channels, patch_size, device, query, key, query_mask.view(height, width).to(device), key_mask.to(device))


def astronaut_problem(size: int, hole: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's astronaut (512²) resized to (3, size, size) in [0, 1] (area-averaged
    down, bicubic up) and a centred hole x hole mask: the end-to-end benchmarks' input."""
    from skimage import data

    photo = torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1).float() / 255
    if size <= photo.shape[-1]:
        image = torch.nn.functional.interpolate(photo[None], size=(size, size), mode="area")[0]
    else:
        image = torch.nn.functional.interpolate(photo[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    mask = centre_square(size, size, hole / size)
    return image.to(device), mask.to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn, device: str, warmup: int = 1, reps: int = 5) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds; CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return statistics.median(times), q[1], q[7]


class PeakMemory:
    """Peak memory above what was in use when entering: CUDA allocator stats on the GPU,
    the process's resident high-water mark (reset through /proc) on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.peak_extra_bytes = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _reset_rss_peak()
            self.base = rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_extra_bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak_extra_bytes = max(0, rss_bytes("VmHWM") - self.base)
        return False


def rss_bytes(field_name: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes; 0 where there is none."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def gemm_fn(problem: Problem, precision: str):
    """A closure running a same-FLOP GEMM: (n x D) @ (D x n) in the same precision.

    Where the n x n output would not fit, it runs n x D @ D x m, m/n-th of the FLOPs,
    repeated n/m times, which is the same work as a chunked search's GEMMs."""
    d = problem.channels * problem.patch_size**2
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if problem.device == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # the CPU torch backend computes bf16 inputs in fp32
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(problem.n, d, generator=gen).to(problem.device, dtype)
    cols = problem.n
    while problem.n * cols * 4 > (4 << 30):
        cols //= 2
    b = torch.randn(d, cols, generator=gen).to(problem.device, dtype)
    repeats = problem.n // cols

    def run():
        for _ in range(repeats):
            torch.matmul(a, b)

    return run


def matmul_precision(precision: str):
    from neuralpatch._torch import cuda_fp32_matmul as _cuda_fp32_matmul

    return _cuda_fp32_matmul(precision)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu x{os.cpu_count()}"


def peak_tflops(device: str, precision: str) -> float | None:
    name = device_name(device)
    for key, table in DEVICE_PEAK_TFLOPS.items():
        if key in name:
            return table[precision]
    return None


def usable_backends(device: str, requested) -> list[str]:
    status = available_backends(device)
    return [b for b in requested if status[b][0]]


def bench_patch_nn(problem: Problem, backend: str, precision: str, reps: int, gemm_ms: float | None) -> dict:
    args = (problem.query_feat, problem.key_feat, problem.query_mask, problem.key_mask, problem.patch_size, precision, backend)

    def run():
        return patch_nn(*args)

    run()  # warm-up outside the memory window: compilation, autotuning, caches
    with PeakMemory(problem.device) as memory:
        run()
    p50, p20, p80 = time_ms(run, problem.device, warmup=0, reps=reps)
    pct_gemm = 100.0 * gemm_ms / p50 if gemm_ms else float("nan")
    return _row(problem, "patch_nn", backend, precision, (p50, p20, p80), pct_gemm, memory.peak_extra_bytes / 2**20)


def _row(problem: Problem, op: str, backend: str, precision: str, times, pct_gemm: float, peak_extra_mib: float) -> dict:
    """One table row in the fixed COLUMNS."""
    p50, p20, p80 = times
    tflops = problem.flops / (p50 * 1e-3) / 1e12
    peak = peak_tflops(problem.device, precision)
    values = [op, backend, problem.device, precision, problem.n, problem.n, problem.channels, problem.patch_size,
              p50, p20, p80, tflops, pct_gemm, 100.0 * tflops / peak if peak else float("nan"), peak_extra_mib,
              device_name(problem.device), torch.__version__]  # fmt: skip
    return dict(zip(COLUMNS, values, strict=True))


def bench_gemm(problem: Problem, precision: str, reps: int) -> dict:
    fn = gemm_fn(problem, precision)
    with matmul_precision(precision) if problem.device.startswith("cuda") else contextlib.nullcontext():
        times = time_ms(fn, problem.device, warmup=1, reps=reps)
    return _row(problem, "gemm", "torch.matmul", precision, times, 100.0, float("nan"))
