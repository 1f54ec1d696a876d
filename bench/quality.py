"""Inpainting quality on real photos: ours, the content network alone, OpenCV Telea and NS.

    python bench/quality.py --size 256 --preset default --sheet docs/quality_sheet.png

Photos: scikit-image's colour photos, resized to ``--size``². Masks: a centre square
of half the side, and a seeded free-form stroke mask. Metrics, in the hole only:
mean L1 and L2 (pixel values in [0, 1]), PSNR, and the gradient-energy ratio
(sum of squared finite differences of the result over that of the ground truth;
1 = as much detail as the photo, < 1 = too smooth). OpenCV needs
``pip install opencv-python-headless`` (a bench-only dependency).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field")
# photos the shipped content network was trained on (see README); chelsea and coffee were held out
CONTENT_TRAINING_PHOTOS = {"astronaut", "rocket", "motorcycle_left", "hubble_deep_field"}


def _photo_array(data, name: str):
    # the motorcycle pair comes as skimage.data.stereo_motorcycle() -> (left, right, disparity)
    return data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()


def load(name: str, size: int) -> torch.Tensor:
    from skimage import data

    array = np.ascontiguousarray(_photo_array(data, name)[..., :3])
    image = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    side = min(image.shape[1:])
    top, left = (image.shape[1] - side) // 2, (image.shape[2] - side) // 2
    square = image[:, top : top + side, left : left + side]
    return F.interpolate(square[None], size=(size, size), mode="area")[0].clamp(0, 1)


def masks(size: int) -> dict[str, torch.Tensor]:
    from neuralpatch.masks import centre_square, free_form_strokes

    gen = torch.Generator().manual_seed(1234)
    return {"centre": centre_square(size, size, 0.5), "free-form": free_form_strokes(size, size, gen)}


def metrics(result: torch.Tensor, truth: torch.Tensor, hole: torch.Tensor) -> dict[str, float]:
    diff = (result - truth)[:, hole]
    l1 = diff.abs().mean().item()
    l2 = diff.square().mean().item()
    psnr = 10 * math.log10(1.0 / max(l2, 1e-12))

    def energy(x):
        gy = (x[:, 1:] - x[:, :-1]).square()[:, hole[1:] & hole[:-1]].sum()
        gx = (x[:, :, 1:] - x[:, :, :-1]).square()[:, hole[:, 1:] & hole[:, :-1]].sum()
        return (gy + gx).item()

    return {"l1": l1, "l2": l2, "psnr": psnr, "grad_ratio": energy(result) / max(energy(truth), 1e-12)}


def opencv_fill(image: torch.Tensor, hole: torch.Tensor, method: str) -> torch.Tensor:
    import cv2

    bgr = (image.permute(1, 2, 0).numpy()[..., ::-1] * 255 + 0.5).astype(np.uint8)
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    out = cv2.inpaint(np.ascontiguousarray(bgr), hole.numpy().astype(np.uint8) * 255, 5, flag)
    filled = torch.from_numpy(out[..., ::-1].copy()).permute(2, 0, 1).float() / 255
    return torch.where(hole[None], filled, image)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--photos", type=lambda s: s.split(","), default=list(PHOTOS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sheet", type=Path, default=None, help="write a side-by-side PNG sheet here")
    args = parser.parse_args(argv)

    from neuralpatch.demo import show_hole
    from neuralpatch.inpaint import inpaint
    from neuralpatch.models import load_vgg
    from neuralpatch.models.content import load_content_net

    vgg = load_vgg("auto", device=args.device)
    content_net = load_content_net(device=args.device)
    methods = ["ours", "content net", "telea", "ns"]
    rows, sheet_rows = [], []
    for name in args.photos:
        truth = load(name, args.size)
        for mask_name, hole in masks(args.size).items():
            start = time.perf_counter()
            ours = inpaint(truth, hole, preset=args.preset, device=args.device, feature_net=vgg, content_net=content_net, progress=False)
            seconds = time.perf_counter() - start
            results = {
                "ours": ours,
                "content net": content_net.predict(truth.to(args.device), hole.to(args.device)).cpu(),
                "telea": opencv_fill(truth, hole, "telea"),
                "ns": opencv_fill(truth, hole, "ns"),
            }
            for method in methods:
                rows.append({"photo": name, "mask": mask_name, "method": method, **metrics(results[method], truth, hole)})
            print(f"{name:18s} {mask_name:9s} ours in {seconds:.1f} s", file=sys.stderr, flush=True)
            sheet_rows.append(torch.cat([show_hole(truth, hole)] + [results[m] for m in methods] + [truth], dim=2))

    print(f"\nQuality in the hole, {args.size}x{args.size}, preset {args.preset!r} "
          f"(* = photo seen by the content network in training)\n")  # fmt: skip
    print("| method | mask | L1 | L2 | PSNR (dB) | gradient-energy ratio |")
    print("|---|---|---|---|---|---|")
    for mask_name in masks(8):
        for method in methods:
            sel = [r for r in rows if r["method"] == method and r["mask"] == mask_name]
            mean = {k: sum(r[k] for r in sel) / len(sel) for k in ("l1", "l2", "psnr", "grad_ratio")}
            print(f"| {method} | {mask_name} | {mean['l1']:.4f} | {mean['l2']:.4f} | {mean['psnr']:.2f} | {mean['grad_ratio']:.2f} |")
    print("\nper photo (L1 / PSNR / gradient ratio):")
    for r in rows:
        star = "*" if r["photo"] in CONTENT_TRAINING_PHOTOS else " "
        print(f"  {r['photo']:18s}{star} {r['mask']:9s} {r['method']:12s} {r['l1']:.4f} / {r['psnr']:6.2f} / {r['grad_ratio']:.2f}")
    if args.sheet:
        from neuralpatch.io import save_image_atomic

        save_image_atomic(torch.cat(sheet_rows, dim=1), args.sheet)
        print(f"\nwrote {args.sheet}: columns input, {', '.join(methods)}, ground truth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
