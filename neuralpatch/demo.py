"""Demo of the patch nearest-neighbour op on a real photo.

A scikit-image photo goes through a few fixed (seeded) conv layers; the features
inside a hole are matched against the features outside it with :func:`patch_nn`,
and the hole is filled by copying the pixels each hole position was matched to.
Run it with ``neuralpatch demo``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neuralpatch.geometry import dilate, interior, shrink_mask
from neuralpatch.masks import centre_square
from neuralpatch.ops import patch_nn

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "motorcycle_left")


def photo_features(image: torch.Tensor, channels: int = 32, seed: int = 0) -> torch.Tensor:
    """(3, H, W) image in [0, 1] -> (channels, H/2, W/2) features from fixed random convs.

    Three 3x3 conv + ReLU layers with seeded weights and one 2x average pool: enough
    texture sensitivity to make patch matching meaningful, with no weights to download.
    """
    gen = torch.Generator().manual_seed(seed)
    x = image[None].float()
    widths = (3, channels // 2, channels, channels)
    for i in range(3):
        weight = torch.randn(widths[i + 1], widths[i], 3, 3, generator=gen) / (3.0 * widths[i]) ** 0.5
        x = F.relu(F.conv2d(x, weight.to(x.device), padding=1))
        if i == 0:
            x = F.avg_pool2d(x, 2)
    return x[0]


def _photo_array(data, name: str):
    # the motorcycle pair comes as skimage.data.stereo_motorcycle() -> (left, right, disparity)
    return data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()


def load_photo(name: str) -> torch.Tensor:
    """A scikit-image photo as a (3, H, W) float tensor in [0, 1]."""
    try:
        from skimage import data
    except ImportError as exc:
        raise RuntimeError("the demo needs scikit-image: pip install scikit-image") from exc
    if name not in PHOTOS:
        raise ValueError(f"photo: expected one of {PHOTOS}, got {name!r}")
    array = np.ascontiguousarray(_photo_array(data, name))
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return torch.from_numpy(array[..., :3]).permute(2, 0, 1).float() / 255.0


def show_hole(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """``image`` (3, H, W) with its ``hole`` (H, W) painted magenta, for before/after pictures."""
    magenta = torch.tensor([1.0, 0.0, 1.0], dtype=image.dtype, device=image.device)[:, None, None]
    return torch.where(hole[None], magenta, image)


def nn_copy_fill(image: torch.Tensor, hole: torch.Tensor, index: torch.Tensor, feat_hole: torch.Tensor, feat_width: int) -> torch.Tensor:
    """Fill the hole by copying, for each hole pixel, the pixel its feature position was matched to."""
    _, height, width = image.shape
    scale = height // feat_hole.shape[0]
    # per feature position: where its match lies, as an offset in feature cells
    q = feat_hole.reshape(-1).nonzero().squeeze(1)
    offset = torch.zeros(2, feat_hole.numel(), dtype=torch.long)
    offset[0, q] = index // feat_width - q // feat_width
    offset[1, q] = index % feat_width - q % feat_width
    offset = offset.view(2, *feat_hole.shape).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    offset = F.pad(offset, (0, width - offset.shape[2], 0, height - offset.shape[1]), mode="replicate")
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    src_y = (ys + offset[0] * scale).clamp(0, height - 1)
    src_x = (xs + offset[1] * scale).clamp(0, width - 1)
    copied = image[:, src_y, src_x]
    return torch.where(hole[None], copied, image)


def run(photo: str = "chelsea", output: str | None = None, device: str = "cpu", backend: str = "auto", precision: str = "fp32") -> dict:
    """Match the hole's feature patches to the rest of the photo and report what was found."""
    image = load_photo(photo)
    _, height, width = image.shape
    hole = centre_square(height, width, 0.3)
    feat = photo_features(image.to(device))
    fh, fw = feat.shape[1:]
    feat_hole = shrink_mask(hole, (fh, fw))
    patch_size = 3
    # keys: patches lying wholly outside the hole and wholly inside the map
    keys = ~dilate(feat_hole, patch_size // 2) & interior(fh, fw, patch_size)
    start = time.perf_counter()
    index, score = patch_nn(feat, feat, feat_hole.to(device), keys.to(device), patch_size, precision, backend)
    elapsed = time.perf_counter() - start
    index, score = index.cpu(), score.cpu()
    q = feat_hole.reshape(-1).nonzero().squeeze(1)
    distance = ((index // fw - q // fw).float().hypot((index % fw - q % fw).float())).mean().item()
    report = {
        "photo": photo,
        "image": (height, width),
        "features": tuple(feat.shape),
        "queries": int(q.numel()),
        "keys": int(keys.sum()),
        "seconds": elapsed,
        "mean_ncc": score.mean().item(),
        "min_ncc": score.min().item(),
        "mean_match_distance": distance,
        "distinct_sources": int(index.unique().numel()),
    }
    if output:
        from neuralpatch.io import save_image_atomic

        filled = nn_copy_fill(image, hole, index, feat_hole, fw)
        save_image_atomic(torch.cat([show_hole(image, hole), filled], dim=2), output)
        report["output"] = str(Path(output))
    return report


DEMO_PHOTO = "data/rocket.png"
# The lightning mast left of the rocket in scikit-image's `rocket` (640x427): a polygon (x, y) round
# its pole and lattice, down to the photo's bottom edge. Removing it leaves dusk sky, clouds and
# lamp glare to continue.
DEMO_HOLE_POLYGON = ((190, 114), (214, 114), (214, 190), (212, 427), (153, 427), (181, 190), (190, 190))
DEMO_HOLE_MARGIN = 3
# How `neuralpatch inpaint --demo` runs: the fast preset at full resolution only. The mast is a thin
# hole in a 640-pixel photo; on the coarser scales of the full pyramid its mast-shaped hole, lamps
# at its foot, gets matched to the other masts and a new mast grows back.
DEMO_PRESET = "fast"
DEMO_OPTIONS = {"max_scales": 1}


def demo_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled photo (scikit-image's `rocket`, a SpaceX launch photo in the public domain)
    and the built-in hole mask over its left lightning mast."""
    from importlib.resources import files

    from PIL import Image, ImageDraw

    from neuralpatch.io import read_image

    image, _ = read_image(files("neuralpatch").joinpath(DEMO_PHOTO))
    canvas = Image.new("L", (image.shape[2], image.shape[1]), 0)
    ImageDraw.Draw(canvas).polygon(DEMO_HOLE_POLYGON, fill=255)
    mask = torch.from_numpy(np.asarray(canvas).copy()) > 0
    return image, dilate(mask, DEMO_HOLE_MARGIN)
