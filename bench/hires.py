"""High resolution end to end: one `neuralpatch.inpaint` of scikit-image's astronaut,
upscaled to SIZE x SIZE, with a centred HOLE x HOLE hole; prints wall time and peak memory.

    python bench/hires.py --size 2048 --hole 512 --preset fast --device cpu     # 24 GiB CPU case
    python bench/hires.py --size 4096 --hole 2048 --device cuda                 # the 80 GB GPU case

Peak memory is the CUDA allocator's peak on a GPU and the process's peak RSS (VmHWM,
what `/usr/bin/time -v` reports) on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import astronaut_problem, rss_bytes  # noqa: E402
from neuralpatch.io import save_image_atomic  # noqa: E402
from neuralpatch.synthesis import inpaint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--hole", type=int, default=512)
    parser.add_argument("--preset", default="default", choices=("fast", "default", "best"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the result here (PNG)")
    args = parser.parse_args(argv)
    if not 0 < args.hole < args.size:
        parser.error("--hole must be between 0 and --size")
    image, mask = astronaut_problem(args.size, args.hole, args.device)
    on_cuda = args.device.startswith("cuda")
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = inpaint(image, mask, preset=args.preset, device=args.device, progress=False)
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if on_cuda:
        peak = f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    else:
        peak = f"peak RSS {rss_bytes('VmHWM') / 2**30:.2f} GiB"
    print(f"{args.size}x{args.size}, hole {args.hole}x{args.hole}, preset {args.preset}, {args.device}: {seconds:.1f} s, {peak}")
    if args.out is not None:
        save_image_atomic(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
