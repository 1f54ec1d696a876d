"""Print the patch-NN kernel table: each backend and size, next to a same-FLOP GEMM.

    python bench/run.py                       # CPU defaults: n = 2048, 4096; C = 64, k = 3
    python bench/run.py --device cuda         # GPU defaults: n = 4096, 16384; C = 256, k = 3
    python bench/run.py --memory 100000 --channels 4   # one big case: time and peak memory

Columns: ms (median, p20-p80), TFLOP/s (2*Nq*Nk*C*k^2), % of the GEMM's throughput,
% of device peak (GPU), peak extra memory (CUDA allocator on GPU, resident set on CPU).
Writes the rows as CSV with --csv.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import COLUMNS, PeakMemory, bench_gemm, bench_patch_nn, device_name, make_problem, usable_backends  # noqa: E402
from neuralpatch import patch_nn  # noqa: E402


def format_row(row: dict) -> str:
    def num(value, fmt):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    spread = f"{row['ms_p20']:.2f}-{row['ms_p80']:.2f}"
    return (
        f"| {row['backend']:12s} | {row['precision']:4s} | {row['nq']:>7d} | {row['channels']:>4d} | {row['patch_size']} "
        f"| {row['ms_p50']:10.2f} | {spread:>17s} | {num(row['tflops'], '8.3f')} | {num(row['pct_gemm'], '6.1f')} "
        f"| {num(row['pct_peak'], '6.1f')} | {num(row['peak_extra_mib'], '9.1f')} |"
    )


HEADER = (
    "| backend      | prec | Nq = Nk |    C | k |     ms p50 |     ms p20-p80    |  TFLOP/s | % GEMM | % peak | extra MiB |\n"
    "|--------------|------|---------|------|---|------------|-------------------|----------|--------|--------|-----------|"
)


def run_table(args) -> list[dict]:
    rows = []
    print(f"device: {device_name(args.device)}, torch {torch.__version__}")
    print(HEADER)
    for n in args.sizes:
        problem = make_problem(n, args.channels, args.patch_size, args.device)
        for precision in args.precisions:
            gemm = bench_gemm(problem, precision, args.reps)
            rows.append(gemm)
            print(format_row(gemm), flush=True)
            for backend in usable_backends(args.device, args.backends):
                if backend == "triton" and args.device == "cpu" and precision == "bf16":
                    continue  # the Triton interpreter has no bf16 dot
                row = bench_patch_nn(problem, backend, precision, args.reps, gemm["ms_p50"])
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def run_memory_case(args) -> None:
    """One search far too big for a full score matrix, at the default chunk budget."""
    n = args.memory
    problem = make_problem(n, args.channels, args.patch_size, args.device)
    full_matrix_gb = n * n * 4 / 1e9
    inputs_mib = sum(t.numel() * t.element_size() for t in (problem.query_feat, problem.key_feat)) / 2**20
    with PeakMemory(args.device) as memory:
        start = time.perf_counter()
        index, score = patch_nn(
            problem.query_feat,
            problem.key_feat,
            problem.query_mask,
            problem.key_mask,
            args.patch_size,
            args.precisions[0],
            args.backends[0],
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    print(
        f"memory case: Nq = Nk = {n}, C = {args.channels}, k = {args.patch_size}, {args.precisions[0]}, backend {args.backends[0]} on {device_name(args.device)}\n"
        f"  full score matrix would need {full_matrix_gb:.1f} GB; inputs {inputs_mib:.1f} MiB\n"
        f"  time {seconds:.1f} s, peak extra memory {memory.peak_extra_bytes / 2**20:.0f} MiB, mean NCC {score.mean().item():.4f}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--channels", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=3)
    parser.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "tf32", "bf16"])
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["torch", "triton", "cuda"])
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--memory", type=int, default=None, help="run only the big-memory case with this Nq = Nk")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.sizes = args.sizes or ([4096, 16384] if gpu else [2048, 4096])
    args.channels = args.channels or (256 if gpu else 64)
    args.reps = args.reps or (20 if gpu else 3)
    if args.memory:
        run_memory_case(args)
        return 0
    rows = run_table(args)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
