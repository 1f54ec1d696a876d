"""Inpainting quality on real photos against the peers: PatchMatch, OpenCV, the content network.

    python bench/quality.py --methods ours-fast,patchmatch,content-net,telea,ns \\
        --csv bench/results/quality.csv --sheet docs/quality_sheet.png

Protocol (the paper's): each photo is resized so that its short side is ``--size`` (512)
and centre-cropped to ``--size``²; it gets a centre hole of half the side (256²) and a
free-form stroke mask seeded by the photo's name (``--stroke-masks 0,1,2`` runs more, each
seeded by the photo's name and its index, and ``--square-masks 0,1,2`` squares of the same
side at seeded positions, for differences too small for one mask per photo). Photos:
12 permissively licensed ones that install here (:data:`PHOTOS`: scikit-image's bundled photos and Debian
``opencv-doc``'s ``examples/data``; ``apt-get install opencv-doc``). Every setting of the
pipeline was chosen on these. ``--held-out`` runs instead on the 12 photos of Debian
``mate-backgrounds``' ``nature`` folder, and ``--held-out plasma`` on the 11 photographs among
Debian ``plasma-workspace-wallpapers`` (:data:`HELD_OUT_SETS`; ``apt-get install`` the
package): packages reserved for this final check, never for tuning, training or tests.

Methods: ``ours-<preset>`` (the pipeline with its defaults, or with ``--set key=value``
overrides), ``content-net`` (the content network's prediction alone), ``telea`` and ``ns``
(OpenCV), and ``patchmatch`` (Barnes et al. 2009, the ``pypatchmatch`` package, patch
radius ``--patchmatch-radius``). Metrics, in the hole: mean L1 and L2 of pixel values in
[0, 1], PSNR, SSIM (skimage's SSIM map averaged over the hole pixels), the gradient-energy
ratio (squared finite differences of the result over the ground truth's: 1 = as much detail
as the photo, < 1 = too smooth) and the wall time per image.

    python bench/quality.py --content-val DIR [--content-compare WEIGHTS]

evaluates the content network alone at its working size (128²) on the validation photos
that ``python -m neuralpatch.train_content --prepare-data`` puts in DIR, against its prior,
OpenCV Telea and other weights (the previous shipped ones), as the training's last epoch does.

    python bench/quality.py --paired new.csv baseline.csv

compares two runs' ``--csv`` hole by hole (the mean relative L1 difference with its standard
error, and on how many holes the new one is lower), for settings whose means differ by less
than the texture stage's per-hole scatter.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


@dataclass(frozen=True)
class HeldOutSet:
    """Photos of a Debian package reserved for checking settings already chosen (--held-out):
    never used to choose them, to train or in tests. A photo's name is "<prefix>:<stem>", and
    its masks are seeded by that name."""

    package: str
    prefix: str
    directory: Path
    stems: tuple[str, ...] | None = None  # None: every *.jpg of the directory
    file: str = "{stem}.jpg"  # where a stem's photo is, under the directory

    def path(self, stem: str) -> Path:
        return self.directory / self.file.format(stem=stem)

    def photos(self) -> list[str]:
        """The set's photo names, sorted; empty when the package is not installed."""
        stems = self.stems if self.stems is not None else [path.stem for path in self.directory.glob("*.jpg")]
        return sorted(f"{self.prefix}:{stem}" for stem in stems if self.path(stem).is_file())


HELD_OUT_SETS = {
    "mate": HeldOutSet("mate-backgrounds", "held-out", Path("/usr/share/backgrounds/mate/nature")),
    # the wallpapers that are photographs; the package's others are drawn or rendered
    "plasma": HeldOutSet(
        "plasma-workspace-wallpapers",
        "held-out-plasma",
        Path("/usr/share/wallpapers"),
        stems=(
            "BytheWater",
            "ColdRipple",
            "ColorfulCups",
            "DarkestHour",
            "EveningGlow",
            "FallenLeaf",
            "Grey",
            "Kite",
            "OneStandsOut",
            "Path",
            "summer_1am",
        ),
        file="{stem}/contents/images/2560x1600.jpg",
    ),
}
# name -> where it comes from; "skimage:<name>" or an opencv-doc file name
PHOTOS = {
    "astronaut": "skimage:astronaut",
    "chelsea": "skimage:chelsea",
    "coffee": "skimage:coffee",
    "rocket": "skimage:rocket",
    "motorcycle": "skimage:motorcycle_left",
    "aero3": "aero3.jpg",
    "board": "board.jpg",
    "building": "building.jpg",
    "ela": "ela_original.jpg",
    "fruits": "fruits.jpg",
    "leuven": "leuvenA.jpg",
    "squirrel": "squirrel_cls.jpg",
}
# photos the shipped content network was trained on (see README); the others were held out of it
CONTENT_TRAINING_PHOTOS = {"astronaut", "rocket", "motorcycle", "aero3", "board", "building", "ela", "fruits", "leuven", "squirrel"}
METRICS = ("l1", "l2", "psnr", "ssim", "grad_ratio", "seconds")


def photo_array(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a photo of :data:`PHOTOS` or of a :class:`HeldOutSet`."""
    source = PHOTOS.get(name, name)
    if source.startswith("skimage:"):
        from skimage import data

        from neuralpatch.demo import _photo_array

        array = _photo_array(data, source.split(":", 1)[1])
    else:
        from PIL import Image

        prefix, _, stem = source.partition(":")
        held_out = next((held for held in HELD_OUT_SETS.values() if stem and held.prefix == prefix), None)
        path = held_out.path(stem) if held_out else OPENCV_DATA / source
        if not path.is_file():
            package = held_out.package if held_out else "opencv-doc"
            raise FileNotFoundError(f"{path}: install the photos with: apt-get install {package}")
        array = np.asarray(Image.open(path).convert("RGB"))
    return np.ascontiguousarray(array[..., :3])


def load(name: str, size: int) -> torch.Tensor:
    """The photo with its short side resized to ``size`` (area when shrinking, bicubic when
    growing), centre-cropped to (3, size, size) in [0, 1]."""
    image = torch.tensor(photo_array(name)).permute(2, 0, 1).float() / 255  # a copy: Pillow's arrays are read-only
    scale = size / min(image.shape[1:])
    new = (max(size, round(image.shape[1] * scale)), max(size, round(image.shape[2] * scale)))
    mode = {"mode": "area"} if scale <= 1 else {"mode": "bicubic", "align_corners": False}
    image = F.interpolate(image[None], size=new, **mode)[0].clamp(0, 1)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return image[:, top : top + size, left : left + size].contiguous()


def masks(
    name: str, size: int, stroke_masks: tuple[int, ...] = (0,), square_masks: tuple[int, ...] = (0,)
) -> list[tuple[str, int, torch.Tensor]]:
    """(kind, index, hole): the square holes of half the side of the given indices (index 0, kind
    "centre", is the centred one; index k, kind "square", one placed at a position seeded by the
    name and k), then the free-form masks of the given indices. Stroke mask 0 is seeded by the
    photo's name alone, so its strokes never change; mask k by the name and k."""
    from neuralpatch.masks import centre_square, free_form_strokes

    holes = []
    for index in square_masks:
        if index == 0:
            holes.append(("centre", 0, centre_square(size, size, 0.5)))
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}#square{index}".encode()))
        side = max(1, round(size / 2))
        top, left = (int(torch.randint(0, size - side + 1, (1,), generator=gen)) for _ in range(2))
        hole = torch.zeros(size, size, dtype=torch.bool)
        hole[top : top + side, left : left + side] = True
        holes.append(("square", index, hole))
    for index in stroke_masks:
        seed = zlib.crc32(name.encode() if index == 0 else f"{name}#{index}".encode())
        gen = torch.Generator().manual_seed(seed)
        holes.append(("free-form", index, free_form_strokes(size, size, gen, strokes=(2, 4), width_frac=(0.04, 0.09))))
    return holes


def metrics(result: torch.Tensor, truth: torch.Tensor, hole: torch.Tensor) -> dict[str, float]:
    from skimage.metrics import structural_similarity

    diff = (result - truth)[:, hole]
    l1 = diff.abs().mean().item()
    l2 = diff.square().mean().item()
    _, ssim_map = structural_similarity(
        truth.permute(1, 2, 0).numpy(), result.permute(1, 2, 0).numpy(), channel_axis=2, data_range=1.0, full=True
    )

    def energy(x):
        gy = (x[:, 1:] - x[:, :-1]).square()[:, hole[1:] & hole[:-1]].sum()
        gx = (x[:, :, 1:] - x[:, :, :-1]).square()[:, hole[:, 1:] & hole[:, :-1]].sum()
        return (gy + gx).item()

    return {
        "l1": l1,
        "l2": l2,
        "psnr": 10 * math.log10(1.0 / max(l2, 1e-12)),
        "ssim": float(ssim_map.mean(axis=2)[hole.numpy()].mean()),
        "grad_ratio": energy(result) / max(energy(truth), 1e-12),
    }


def opencv_fill(image: torch.Tensor, hole: torch.Tensor, method: str) -> torch.Tensor:
    import cv2

    bgr = (image.permute(1, 2, 0).numpy()[..., ::-1] * 255 + 0.5).astype(np.uint8)
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    out = cv2.inpaint(np.ascontiguousarray(bgr), hole.numpy().astype(np.uint8) * 255, 5, flag)
    filled = torch.from_numpy(out[..., ::-1].copy()).permute(2, 0, 1).float() / 255
    return torch.where(hole[None], filled, image)


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text in ("None", "none"):
        return None
    if "," in text or "/" in text:  # a tuple: a,b in --set, a/b inside --methods
        return tuple(_parse_value(t) for t in text.replace("/", ",").split(",") if t)
    return text


def make_methods(names: list[str], device: str, overrides: dict, patchmatch_radius: int):
    """name -> fill(image, hole) for each requested method."""
    from neuralpatch.models import load_vgg
    from neuralpatch.models.content import load_content_net
    from neuralpatch.synthesis import PRESETS, inpaint, patchmatch_fill

    content_net = load_content_net(device=device)
    feature_nets = {}
    methods = {}
    for name in names:
        if name.startswith("ours-"):
            # ours-<preset>[+key=value...]: per-method InpaintConfig overrides on top of --set
            preset, *extra = name[len("ours-") :].split("+")
            if preset not in PRESETS:
                raise SystemExit(f"--methods: {name}: unknown preset {preset!r}")
            options = dict(overrides)
            for item in extra:
                key, _, value = item.partition("=")
                options[key] = _parse_value(value)
            for key in ("layers", "layer_weights"):
                if key in options and not isinstance(options[key], tuple):
                    options[key] = (options[key],)
            weights = options.get("texture_weights", PRESETS[preset].texture_weights)
            layers = options.get("layers", PRESETS[preset].layers)
            key = (weights, tuple(layers))
            if key not in feature_nets:
                feature_nets[key] = load_vgg(weights, layers=layers, device=device)

            def ours(image, hole, preset=preset, vgg=feature_nets[key], options=options):
                return inpaint(
                    image, hole, preset=preset, device=device, feature_net=vgg, content_net=content_net, progress=False, **options
                )

            methods[name] = ours
        elif name == "content-net":
            methods[name] = lambda image, hole: content_net.predict(image.to(device), hole.to(device)).cpu()
        elif name in ("telea", "ns"):
            methods[name] = lambda image, hole, m=name: opencv_fill(image, hole, m)
        elif name == "patchmatch":
            methods[name] = lambda image, hole: patchmatch_fill(image, hole, radius=patchmatch_radius)
        else:
            raise SystemExit(f"--methods: unknown method {name!r}")
    return methods


def summary(rows: list[dict], methods: list[str], mask_names) -> list[dict]:
    table = []
    for mask_name in mask_names:
        for method in methods:
            sel = [r for r in rows if r["method"] == method and r["mask"] == mask_name]
            if sel:
                table.append(
                    {"method": method, "mask": mask_name, "holes": len(sel), **{k: sum(r[k] for r in sel) / len(sel) for k in METRICS}}
                )
    return table


def hole_l1_by_hole(csv_path: Path) -> dict[tuple, float]:
    """(photo, kind, mask index, method) -> hole L1, from a ``--csv`` (older CSVs have no
    mask index: their one free-form mask is index 0)."""
    with open(csv_path, newline="") as handle:
        return {(r["photo"], r["mask"], int(r.get("mask_index") or 0), r["method"]): float(r["l1"]) for r in csv.DictReader(handle)}


def paired_comparison(new: dict[tuple, float], baseline: dict[tuple, float]) -> list[dict]:
    """Per method and kind of hole, the new hole L1 against the baseline's on the holes both
    have: both means, the mean of the per-hole relative differences with its standard error,
    and on how many holes the new one is lower."""
    table = []
    for method, kind in dict.fromkeys((key[3], key[1]) for key in new):
        pairs = [(l1, baseline[key]) for key, l1 in new.items() if (key[3], key[1]) == (method, kind) and key in baseline]
        if not pairs:
            continue
        relative = [ours / base - 1 for ours, base in pairs]
        mean = sum(relative) / len(relative)
        spread = math.sqrt(sum((x - mean) ** 2 for x in relative) / (len(relative) - 1)) if len(relative) > 1 else float("nan")
        table.append(
            {
                "method": method,
                "mask": kind,
                "holes": len(pairs),
                "l1": sum(p[0] for p in pairs) / len(pairs),
                "baseline_l1": sum(p[1] for p in pairs) / len(pairs),
                "relative": mean,
                "standard_error": spread / math.sqrt(len(relative)),
                "lower": sum(x < 0 for x in relative),
            }
        )
    return table


def print_paired(new_csv: Path, baseline_csv: Path) -> None:
    table = paired_comparison(hole_l1_by_hole(new_csv), hole_l1_by_hole(baseline_csv))
    print(f"Hole L1 of {new_csv} against {baseline_csv}, on the holes both have\n")
    print("| method | mask | holes | L1 | baseline L1 | mean difference per hole | lower on |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['method']} | {r['mask']} | {r['holes']} | {r['l1']:.5f} | {r['baseline_l1']:.5f} | "
            f"{100 * r['relative']:+.2f} % ± {100 * r['standard_error']:.2f} | {r['lower']} of {r['holes']} |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["ours-fast", "patchmatch", "content-net", "telea", "ns"])
    parser.add_argument("--photos", type=lambda s: s.split(","), default=None, help="default: all of PHOTOS, or of the --held-out set")
    parser.add_argument(
        "--held-out",
        nargs="?",
        const="mate",
        choices=sorted(HELD_OUT_SETS),
        help="a held-out set's photos instead (a final check, never for tuning): mate (the default), plasma",
    )
    parser.add_argument("--masks", type=lambda s: s.split(","), default=["centre", "free-form"])
    parser.add_argument(
        "--stroke-masks",
        type=lambda s: tuple(int(i) for i in s.split(",")),
        default=(0,),
        metavar="K,K,...",
        help="indices of the free-form masks per photo (default: 0, the one of the README's table)",
    )
    parser.add_argument(
        "--square-masks",
        type=lambda s: tuple(int(i) for i in s.split(",")),
        default=(0,),
        metavar="K,K,...",
        help="indices of the square holes per photo, selected by --masks centre (default: 0, the centred one of the "
        "README's table; k > 0 places one at a seeded position)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="InpaintConfig override for the ours-* methods")
    parser.add_argument(
        "--patchmatch-radius", type=int, default=3, help="pypatchmatch patch_size (radius; 3 as in its examples and IOPaint)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", type=Path, default=None, help="per-photo rows")
    parser.add_argument("--sheet", type=Path, default=None, help="side-by-side PNG sheet")
    parser.add_argument("--sheet-scale", type=float, default=0.5, help="downscale of the sheet's tiles")
    parser.add_argument("--save-dir", type=Path, default=None, help="write every result as PNG here")
    parser.add_argument(
        "--paired",
        nargs=2,
        type=Path,
        metavar=("NEW_CSV", "BASELINE_CSV"),
        help="run nothing: print the paired hole-L1 differences of two --csv files, hole by hole",
    )
    parser.add_argument(
        "--content-val",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="run nothing else: evaluate the shipped content network at 128² on these validation photos (1 centre + 8 stroke masks each)",
    )
    parser.add_argument("--content-compare", metavar="WEIGHTS", help="with --content-val: other content weights to compare with")
    args = parser.parse_args(argv)
    if args.content_compare and not args.content_val:
        parser.error("--content-compare: needs --content-val")
    if args.content_val:
        from neuralpatch import train_content
        from neuralpatch.models.content import SHIPPED_WEIGHTS

        options = ["--evaluate", str(SHIPPED_WEIGHTS), "--val-images", *map(str, args.content_val), "--val-masks", "9", "--size", "128",
                   "--device", args.device]  # fmt: skip
        return train_content.main(options + (["--compare", args.content_compare] if args.content_compare else []))
    if args.paired:
        missing = [str(path) for path in args.paired if not path.is_file()]
        if missing:
            parser.error(f"--paired: no such file: {', '.join(missing)}")
        try:
            print_paired(*args.paired)
        except (KeyError, ValueError) as error:
            parser.error(f"--paired: not a CSV written by --csv ({error!r})")
        return 0
    known_photos = list(PHOTOS)
    if args.held_out:
        held_out = HELD_OUT_SETS[args.held_out]
        known_photos = held_out.photos()
        if not known_photos:
            parser.error(
                f"--held-out {args.held_out}: no photos in {held_out.directory}; install them with: apt-get install {held_out.package}"
            )
    if args.photos is None:
        args.photos = known_photos
    unknown = sorted(set(args.photos) - set(known_photos))
    if unknown:
        parser.error(f"--photos: unknown {unknown}; known: {known_photos}")
    unknown_kinds = sorted(set(args.masks) - {"centre", "free-form"})
    if unknown_kinds:
        parser.error(f"--masks: unknown {unknown_kinds}; known: centre (the square holes of --square-masks), free-form")
    for option, indices in (("--stroke-masks", args.stroke_masks), ("--square-masks", args.square_masks)):
        if any(index < 0 for index in indices):
            parser.error(f"{option}: indices are >= 0")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)

    from neuralpatch.demo import show_hole
    from neuralpatch.io import save_image_atomic

    methods = make_methods(args.methods, args.device, overrides, args.patchmatch_radius)
    rows, sheet_rows = [], []
    for name in args.photos:
        truth = load(name, args.size)
        for mask_name, mask_index, hole in masks(name, args.size, args.stroke_masks, args.square_masks):
            if ("centre" if mask_name == "square" else mask_name) not in args.masks:
                continue
            results = {}
            for method, fill in methods.items():
                start = time.perf_counter()
                results[method] = fill(truth, hole).clamp(0, 1)
                seconds = time.perf_counter() - start
                row = {"photo": name, "mask": mask_name, "mask_index": mask_index, "method": method,
                       **metrics(results[method], truth, hole), "seconds": seconds}  # fmt: skip
                rows.append(row)
                print(f"{name:10s} {mask_name:9s} {mask_index:2d} {method:16s} L1 {row['l1']:.4f} PSNR {row['psnr']:5.2f} SSIM {row['ssim']:.3f} "
                      f"grad {row['grad_ratio']:.2f} {seconds:6.1f} s", file=sys.stderr, flush=True)  # fmt: skip
                if args.save_dir:
                    suffix = f"-{mask_index}" if mask_index else ""
                    save_image_atomic(results[method], args.save_dir / f"{name.replace(':', '_')}_{mask_name}{suffix}_{method}.png")
            tiles = [show_hole(truth, hole)] + [results[m] for m in methods] + [truth]
            if args.sheet_scale != 1:
                side = round(args.size * args.sheet_scale)
                tiles = [F.interpolate(t[None], size=(side, side), mode="area")[0] for t in tiles]
            sheet_rows.append(torch.cat(tiles, dim=2))

    table = summary(rows, list(methods), dict.fromkeys(r["mask"] for r in rows))
    print(f"\nIn the hole, {len(args.photos)} photos at {args.size}x{args.size}" + (f", ours with {overrides}" if overrides else "") + "\n")
    print("| method | mask | L1 | L2 | PSNR (dB) | SSIM | gradient-energy ratio | s / image |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['method']} | {r['mask']} | {r['l1']:.4f} | {r['l2']:.4f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['grad_ratio']:.2f} | {r['seconds']:.1f} |"
        )
    if args.csv:
        from neuralpatch.io import atomic_path

        with atomic_path(args.csv) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["photo", "mask", "mask_index", "method", *METRICS, "content_net_trained_on_it"])
            writer.writeheader()
            for r in rows:
                writer.writerow(
                    {
                        **{k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in r.items()},
                        "content_net_trained_on_it": r["photo"] in CONTENT_TRAINING_PHOTOS,
                    }
                )
        print(f"\nwrote {args.csv}")
    if args.sheet:
        save_image_atomic(torch.cat(sheet_rows, dim=1), args.sheet)
        print(f"wrote {args.sheet}: columns input, {', '.join(methods)}, ground truth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
