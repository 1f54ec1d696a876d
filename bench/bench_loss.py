"""NeuralPatchLoss overhead: one step against the sum of its parts, in one run.

    python bench/bench_loss.py [--size 256] [--weights vgg16-hed]
    pytest bench/bench_loss.py --benchmark-json=bench/results/loss.json

A step is ``loss(image, mask).backward()``. Its parts: the VGG forward and
backward alone (to the same taps, with a plain sum as the loss), and the raw ops
(patch_nn + patch_loss forward and backward) on the same features. The target is
step <= 1.5 x (VGG + ops): no hidden overhead in the module.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from neuralpatch import NeuralPatchLoss, patch_loss, patch_nn  # noqa: E402
from neuralpatch.loss import grow, mask_to_layer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def setup(size: int, weights: str):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=gen).to(DEVICE)
    mask = torch.zeros(size, size, dtype=torch.bool, device=DEVICE)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    criterion = NeuralPatchLoss(weights=weights).to(DEVICE)
    return image, mask, criterion


def parts(image, mask, criterion):
    """Closures for the step, the VGG alone and the ops alone."""
    vgg = criterion.feature_net

    def step():
        x = image.clone().requires_grad_()
        criterion(x, mask).backward()

    def vgg_only():
        x = image.clone().requires_grad_()
        sum(f.sum() for f in vgg(x).values()).backward()

    feats = {k: v.detach() for k, v in vgg(image).items()}
    prepared = []
    for name in criterion.layers:
        f = feats[name][0]
        hole = mask_to_layer(mask[None], *f.shape[-2:])[0]
        prepared.append((f, hole, ~grow(hole[None], 3)[0]))

    def ops_only():
        for f, hole, keys in prepared:
            index, _ = patch_nn(f, f, hole, keys, 3, criterion.precision, criterion.backend)
            x = f.clone().requires_grad_()
            patch_loss(x, f, hole, index, 3, criterion.backend).backward()

    return step, vgg_only, ops_only


def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("part", ["step", "vgg", "ops"])
def test_loss_step_parts(benchmark, part):
    image, mask, criterion = setup(256, "auto")
    step, vgg_only, ops_only = parts(image, mask, criterion)
    fn = {"step": step, "vgg": vgg_only, "ops": ops_only}[part]
    benchmark.group = "NeuralPatchLoss 256x256"
    benchmark.pedantic(fn, warmup_rounds=1, rounds=5, iterations=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    image, mask, criterion = setup(args.size, args.weights)
    step, vgg_only, ops_only = parts(image, mask, criterion)
    t_step, t_vgg, t_ops = (median_seconds(f, args.reps) for f in (step, vgg_only, ops_only))
    print(f"NeuralPatchLoss step, {args.size}x{args.size}, {criterion.feature_net.source} on {DEVICE} (median of {args.reps}):")
    print(f"  step {t_step * 1e3:.1f} ms | VGG fwd+bwd {t_vgg * 1e3:.1f} ms | ops {t_ops * 1e3:.1f} ms | "
          f"step / (VGG + ops) = {t_step / (t_vgg + t_ops):.2f} (target <= 1.5)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
