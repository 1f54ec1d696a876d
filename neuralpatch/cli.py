"""Command line: `neuralpatch demo | backends`.

Each command imports its heavy modules inside itself, so `--help` stays instant.
Exit codes: 0 ok, 2 bad input, 1 other failure.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args) -> int:
    from neuralpatch.demo import run

    report = run(photo=args.photo, output=args.output, device=args.device, backend=args.backend, precision=args.precision)
    h, w = report["image"]
    c, fh, fw = report["features"]
    print(f"photo            {report['photo']} ({w}x{h}), features {c}x{fh}x{fw} from fixed conv layers")
    print(f"search           {report['queries']} hole patches against {report['keys']} known patches (3x3) in {report['seconds'] * 1e3:.1f} ms")
    print(f"NCC of matches   mean {report['mean_ncc']:.4f}, min {report['min_ncc']:.4f}")
    print(f"matches          {report['distinct_sources']} distinct source patches, mean distance {report['mean_match_distance']:.1f} feature cells")
    if "output" in report:
        print(f"wrote            {report['output']} (left: input with the hole, right: hole filled by copying matched pixels)")
    return 0


def _cmd_backends(args) -> int:
    import torch

    from neuralpatch.ops import available_backends

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name, (ok, reason) in available_backends(device).items():
            print(f"{device:5s} {name:7s} {'yes' if ok else 'no: ' + reason}")
    try:
        from neuralpatch import _C

        print("neuralpatch._C  ", _C.build_info())
    except ImportError:
        print("neuralpatch._C   not built (reinstall with nvcc on PATH)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuralpatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="match the patches of a hole in a real photo and fill it by copying")
    demo.add_argument("--photo", default="chelsea", help="a scikit-image photo (default: chelsea)")
    demo.add_argument("-o", "--output", default="neuralpatch_demo.png", help="side-by-side PNG to write ('' for none)")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"))
    demo.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    demo.set_defaults(func=_cmd_demo)
    backends = sub.add_parser("backends", help="list which backends can run here, and the CUDA module's build info")
    backends.set_defaults(func=_cmd_backends)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        print(f"neuralpatch: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        print(f"neuralpatch: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
