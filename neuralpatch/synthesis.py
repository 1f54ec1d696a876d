"""Multi-scale neural patch synthesis (Yang et al., CVPR 2017): :func:`inpaint`.

A content network predicts the hole at the coarsest scale; then, from coarse to
fine, the hole pixels are optimised with L-BFGS against

    E = E_content + alpha * E_texture + beta * TV + beta_chroma * TV_colour + gamma * E_vote

- E_content: mean squared difference to the scale's reference in the hole (the
  content prediction at the coarsest scale, the upsampled previous result after),
  optionally of the low frequencies only (``content_blur``), which leaves the detail to
  the texture term;
- E_texture: for each VGG tap, the mean over hole feature patches of the squared
  distance to the NCC-nearest patch lying wholly outside the hole, per element and
  relative to the mean squared known feature of that tap;
- TV: mean squared difference between neighbouring pixels, over pairs that touch
  the optimised region; TV_colour the same of each pixel minus its grey;
- E_vote (off by default): mean squared difference, in the hole, to the patch vote: the average of the
  known pixels that the matched patches of one tap (relu3_1) lay over each hole pixel.
  It ties the colours to the source the features were matched to, which VGG features
  alone barely constrain.

After the finest scale, the known pixels' fine band is laid into the hole along the last
matches (``detail``, :meth:`_Scale.add_detail`), the hole's fine band is capped at a multiple
of its surroundings' (``detail_cap``, :meth:`_Scale.cap_detail`), and the hole's first rings are
mixed with the known pixels carried inward (``edge_blend``, :meth:`_Scale.blend_edge`).

High resolution: VGG runs on the hole's bounding box plus its receptive-field
margin (stride-aligned), keys come from a context window around the hole and are
computed once per scale, and the nearest-neighbour search is the chunked op, so
nothing grows with the image area squared.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from neuralpatch.geometry import bbox, dilate, edge_distance, resize_image, shrink_mask, window
from neuralpatch.loss import SEARCHES, NeuralPatchLoss
from neuralpatch.models.content import onion_mix
from neuralpatch.ops import nvtx_range

__all__ = ["CONTENT_INITS", "InpaintConfig", "PRESETS", "Progress", "inpaint", "patch_vote", "patchmatch_fill", "pyramid_sizes"]

CONTENT_INITS = ("blend", "network", "patchmatch", "mean")
# init_blur and content_blur are in pixels of an image with this long side, and scale with the image
BLUR_SIDE = 512
# how far from the hole the known pixels that set InpaintConfig.detail_cap's reference lie, in
# pixels at a long side of BLUR_SIDE
DETAIL_RING = 16.0
# the share of known pixels that may lie off a monochrome photo's colour line (a logo, a few
# hot pixels) without making it a colour photo
MONOCHROME_OUTLIERS = 0.001
# about how many known pixels, on a regular grid, decide whether a photo is monochrome
MONOCHROME_SAMPLES = 2**20


@dataclass(frozen=True)
class InpaintConfig:
    """Every setting of the pipeline. The schedule (scales, iterations, neighbour refresh) is the
    paper's; the start (a blurred PatchMatch fill), the low-pass content term and its reference
    were chosen on bench/quality.py (see the README's quality table).

    Attributes:
        coarsest_side: long side of the coarsest scale (128 in the paper: 3 scales for 512²).
        max_scales: cap on the number of scales (None: double up to full resolution).
        iterations: L-BFGS iterations per scale (100 in the paper).
        nn_every: recompute the nearest neighbours every this many L-BFGS iterations (1 = paper).
        line_search: None for the fixed unit step of the Torch7 ``optim.lbfgs`` the paper used
            (one evaluation per iteration), or "strong_wolfe" (about two per iteration on this
            problem, for a similar result on bench/quality.py).
        alpha: weight of the texture term. Each layer's term is relative to the mean squared
            value of its known features, so a value means the same with any VGG weights. 0.03 was
            chosen on bench/quality.py (12 photos at 512², PatchMatch start, blurred content): it
            has a lower hole L1 than 0.1 on both hole kinds (0.1447 / 0.0692 against 0.1485 /
            0.0739) and stops the copies of whole structures (an eye into a cat's cheek) that
            0.1 made, for less fine detail (gradient-energy ratio 0.30 / 0.43 against 0.43 /
            0.65); 0.3 and 1 give more detail for a higher hole L1.
        beta: weight of the TV term.
        beta_chroma: weight of a second TV term on the colour alone (each pixel minus its
            mean over R, G, B; 0 = off). The texture term leaves thin colour fringes where the
            hole crosses a strong edge (a yellow-to-purple line along the coffee cup's rim, both
            presets); 10 removes them. On bench/quality.py's 12 photos (``fast``) it lowers the
            hole L1 (0.1445 -> 0.1437 centre, 0.0720 -> 0.0701 free-form) for less fine detail
            (free-form gradient-energy ratio 0.82 -> 0.73), which ``detail_edge`` 0.9 gives back.
        gamma: weight of the patch-vote term (0 = off, as in the paper).
        content_blur: 0 for the paper's per-pixel content term, or the standard deviation of a
            Gaussian applied to the difference to the reference first, so that the content term
            holds only its low frequencies. In pixels at a long side of 512, scaled with each
            scale's size.
        init_blur: standard deviation of a Gaussian applied to a full-resolution initial fill
            (``init=`` or PatchMatch) in the hole, keeping its layout and dropping its detail (and
            its patch seams), which the texture term then synthesises; in pixels at a long side
            of 512, scaled with the image (0 = none).
        reference: the content reference of each finer scale: "previous" (the upsampled result of
            the scale before, as in the paper) or "initial" (the initial fill, resized: the
            low frequencies of a given fill then hold at every scale).
        detail: gain of the fine detail laid into the hole after the finest scale (0 = none, as
            in the paper): the band of the known pixels above a Gaussian of ``detail_sigma``,
            carried into each hole patch by the last neighbour search's matches of
            ``vote_layer`` and averaged over the overlapping patches (:func:`patch_vote`). The
            texture term works on VGG cells of 4 pixels and more, and the TV term damps what is
            finer, so without it the fill lacks the photo's pixel-level grain. Only hole pixels
            get it (not the feather band, which holds the input's own grain); without
            ``vote_layer`` among ``layers`` there are no matches to carry it, and the step is
            skipped. The gain is ``detail`` deep in the hole and ``detail_edge`` times it near
            the edge (see ``detail_depth``). 3 at a band of ``detail_sigma`` 0.7, 0.9 of it at the
            edge and full from 48 px deep (``default``: 2, since its longer schedule synthesises
            more fine texture itself) were chosen on bench/quality.py (12 photos at 512²,
            ``fast``, "blend" start, ``beta_chroma`` 10; ``default`` on 4 of them, its gains
            compared offline on each hole's saved last-scale matches, the same arithmetic):
            hole L1 / gradient-energy ratio 0.1442 / 0.89 (centre) and 0.0708 / 0.86
            (free-form) with ``fast``, against PatchMatch's 0.1480 / 0.53 and 0.0723 / 0.78;
            ``default`` at gain 3 had ratios of 1.20 / 1.15 and a free-form L1 above
            PatchMatch's, at 2 0.81 / 0.88 and below it.
            One gain for the whole hole cannot do both kinds of hole: the wide holes need more
            gain than the strokes for the same share of the photo's detail.
        detail_sigma: the detail band's Gaussian, in pixels of the output (0 = no step).
        detail_edge: the share of ``detail`` laid in up to ``detail_edge * detail_depth`` pixels
            from the hole's edge, rising linearly to the full gain at ``detail_depth`` (1 = one
            gain everywhere).
        detail_depth: the depth of the full gain, in pixels at a long side of 512, scaled
            with the image.
        detail_cap: the most fine detail the hole may end with (0 = no cap): the result's band
            above a Gaussian of ``detail_sigma`` is scaled down in the hole, never up, until its
            mean square is at most ``detail_cap`` times that of the band of the known pixels up
            to :data:`DETAIL_RING` pixels (at a long side of 512) from the hole; one factor for
            the whole mask, and the reference ring ends at the crop the last scale works on
            (about 40 px around the hole's bounding box). One gain cannot follow how much detail
            each hole's surroundings hold: bench/quality.py's 24 fresh off-centre squares end
            with 1.45 times the photo's gradient energy on average (3.2-3.7 on the astronaut's
            smooth backdrop). On the saved fills of its four sets of holes (the table's centre
            and stroke holes, the fresh squares and strokes), 1.5 took the squares' ratio to
            1.21 and lowered or kept every set's hole L1, with the others in the band.
        edge_blend: width in pixels (of the output) of the hole's rim that is mixed, after the
            detail steps, with a continuation of the known pixels inward (onion peeling: each
            ring takes the mean of its known or already reached 3x3 neighbours), with weight 1
            on the first ring falling by ``1 / edge_blend`` per ring (0 = off). A hole's first
            pixels are predicted best by their neighbours: on bench/quality.py's fresh strokes
            the texture stage's fill had a higher L1 than PatchMatch's 1-4 px from the edge
            (0.0498 against 0.0436 at 1-2 px, OpenCV Telea 0.0393) and a lower one deeper in.
            3 was chosen on the saved fills of its four sets of holes (with ``detail_cap`` 1.5):
            it lowered every set's hole L1 and kept every gradient-energy ratio in the band,
            where 4 and 5 took the table's strokes below 0.8. Unlike ``feather``'s, the first
            ring is wholly the continuation. Skipped with a ``feather`` band, which treats the
            seam its own way (the ``best`` preset; not screened together).
        monochrome_tolerance: a photo whose known colours lie on one line through RGB (a
            greyscale, sepia or other one-hue photo; all but :data:`MONOCHROME_OUTLIERS` of them
            within this distance of it, in [0, 1] units) gets its fill projected onto that line
            after every scale (0 = never). The texture term's gradients through VGG have colour
            in them, and a grey photo's hole came back with a lilac cast. The default, 3 levels
            of 255, passes the chroma noise of a colour JPEG of a black-and-white scene.
        vote_layer: the tap whose matches vote and carry the detail (one of ``layers``).
        layers: VGG taps of the texture term (relu3_1 and relu4_1 in the paper).
        layer_weights: weight of each tap.
        patch_size: feature patch side (3 in the paper).
        texture_weights: VGG weight source: "auto", "vgg19", "vgg16-imagenet", "vgg16-hed" or "random".
        content_init: the coarsest scale's start and content reference: "patchmatch" (a PatchMatch
            fill by the ``pypatchmatch`` package, blurred by ``init_blur`` and refined here),
            "blend" (that fill near the hole's edge, mixed deeper in with the content network's
            prediction; see ``blend_weight``), "network" (the content network's prediction alone,
            as in the paper), or "mean" (known-pixel mean colour). An ``init=`` fill passed to
            :func:`inpaint` takes precedence over all of them.
        blend_weight: the content network's share of the "blend" start deep in the hole.
        blend_ramp: (start, length) of the ramp of that share: 0 up to ``start`` pixels from the
            hole's edge, rising linearly to ``blend_weight`` over ``length`` more (pixels at a
            long side of 512, scaled with the image). Near the edge PatchMatch continues the
            known texture; deep in a large hole its copy is one guess among many, and averaging
            it with the network's smooth prediction lowers the error of the layout the texture
            stage keeps. 0.5 from 16 to 32 px was chosen on bench/quality.py's 12 photos (the
            start alone, hole L1): 0.1362 / 0.0679 (centre / free-form) against 0.1408 / 0.0679
            for the blurred PatchMatch fill and 0.1372 / 0.0817 for the network alone; the
            strokes, at most 23 px deep, keep PatchMatch's fill.
        content_weights: path of content-network weights (None: the shipped ones).
        context: key window around the hole, in multiples of the hole's bounding-box side
            on each side (clipped to the image).
        max_keys: most key patches per layer and scale; past it the keys are taken on a
            regular grid of cells (every 2nd, 3rd, ... row and column). This bounds each search
            at Nq x max_keys: the paper's 512² schedule never reaches it (16 384 relu3_1 keys at
            most), a 4096² image with a 2048² hole would otherwise search ~1 M keys per query.
        feather: width in pixels of a band outside the hole that is re-synthesised and blended
            into the input (0 = none, as in the paper).
        precision, backend: of the nearest-neighbour search (see :func:`neuralpatch.patch_nn`).
        search: "exact", "patchmatch" (approximate, warm-started from the previous round's field
            within a scale) or "auto" (PatchMatch from
            :data:`neuralpatch.loss.PATCHMATCH_MIN_PAIRS` query x key pairs on); see
            :class:`neuralpatch.NeuralPatchLoss`.
        search_iterations: PatchMatch sweeps per neighbour search (None: the op's default).
        max_pixels: largest image accepted (width * height), to fail early instead of
            running out of memory; raise it for larger images.
    """

    coarsest_side: int = 128
    max_scales: int | None = None
    iterations: int = 100
    nn_every: int = 1
    line_search: str | None = None
    alpha: float = 0.03
    beta: float = 1.0
    beta_chroma: float = 10.0
    gamma: float = 0.0
    detail: float = 3.0
    detail_sigma: float = 0.7
    detail_edge: float = 0.9
    detail_depth: float = 48.0
    detail_cap: float = 1.5
    edge_blend: int = 3
    monochrome_tolerance: float = 3 / 255
    vote_layer: str = "relu3_1"
    content_blur: float = 2.0
    reference: str = "initial"
    init_blur: float = 4.0
    layers: tuple[str, ...] = ("relu3_1", "relu4_1")
    layer_weights: tuple[float, ...] = (1.0, 1.0)
    patch_size: int = 3
    texture_weights: str = "auto"
    content_init: str = "blend"
    blend_weight: float = 0.5
    blend_ramp: tuple[float, float] = (16.0, 16.0)
    content_weights: str | None = None
    context: float = 1.0
    max_keys: int = 262_144
    feather: int = 0
    precision: str = "tf32"
    backend: str = "auto"
    search: str = "exact"
    search_iterations: int | None = None
    max_pixels: int = 64_000_000

    def __post_init__(self):
        positive_ints = ("coarsest_side", "iterations", "nn_every", "patch_size", "max_pixels", "max_keys")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.max_scales is not None and (not isinstance(self.max_scales, int) or self.max_scales < 1):
            raise ValueError(f"max_scales: expected None or a positive int, got {self.max_scales!r}")
        if len(self.layers) == 0 or len(self.layer_weights) != len(self.layers):
            raise ValueError(f"layer_weights: expected one weight per layer {self.layers}, got {self.layer_weights}")
        if self.gamma > 0 and self.vote_layer not in self.layers:
            raise ValueError(f"vote_layer: {self.vote_layer!r} is not one of layers {self.layers}")
        try:
            ramp = tuple(float(v) for v in self.blend_ramp)
        except (TypeError, ValueError):
            ramp = ()
        if len(ramp) != 2 or not all(math.isfinite(v) and v >= 0 for v in ramp) or ramp[1] <= 0:
            raise ValueError(f"blend_ramp: expected (start >= 0, length > 0) in pixels, got {self.blend_ramp!r}")
        object.__setattr__(self, "blend_ramp", ramp)
        if not 0 <= self.detail_edge <= 1:
            raise ValueError(f"detail_edge: expected a share of the gain in [0, 1], got {self.detail_edge!r}")
        if not self.detail_depth > 0:
            raise ValueError(f"detail_depth: expected a depth > 0 in pixels, got {self.detail_depth!r}")
        if not 0 <= self.blend_weight <= 1:
            raise ValueError(f"blend_weight: expected a share in [0, 1], got {self.blend_weight!r}")
        for name in (
            "alpha",
            "beta",
            "beta_chroma",
            "gamma",
            "detail",
            "detail_sigma",
            "detail_cap",
            "monochrome_tolerance",
            "context",
            "content_blur",
            "init_blur",
        ):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: expected a finite number, got {getattr(self, name)}")
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a value >= 0, got {getattr(self, name)}")
        if self.reference not in ("previous", "initial"):
            raise ValueError(f"reference: expected 'previous' or 'initial', got {self.reference!r}")
        if self.line_search not in (None, "strong_wolfe"):
            raise ValueError(f"line_search: expected None or 'strong_wolfe', got {self.line_search!r}")
        if self.content_init not in CONTENT_INITS:
            raise ValueError(f"content_init: expected one of {CONTENT_INITS}, got {self.content_init!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search: expected one of {SEARCHES}, got {self.search!r}")
        if self.search_iterations is not None and (
            isinstance(self.search_iterations, bool) or not isinstance(self.search_iterations, int) or self.search_iterations < 0
        ):
            raise ValueError(f"search_iterations: expected None or an int >= 0, got {self.search_iterations!r}")
        for name in ("feather", "edge_blend"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")


@dataclass(frozen=True)
class Progress:
    """What :func:`inpaint` tells its ``callback``: after each round of L-BFGS iterations
    (``result`` None), and once more when a scale is done (``result`` set).

    Attributes:
        scale: index of the scale, 0 = coarsest.
        scales: number of scales.
        size: (height, width) of this scale.
        iteration: L-BFGS iterations done at this scale.
        iterations: L-BFGS iterations per scale.
        result: when the scale is done, its image: (3, height, width) float32 in [0, 1] on the CPU.
    """

    scale: int
    scales: int
    size: tuple[int, int]
    iteration: int
    iterations: int
    result: Tensor | None = None


# The paper's schedule synthesises more fine texture itself than `fast`'s, so it takes less
# added grain (see ``InpaintConfig.detail``).
_PAPER_SCHEDULE = InpaintConfig(detail=2.0)

PRESETS: dict[str, InpaintConfig] = {
    # a quick look: fewer iterations, neighbours refreshed every 5 evaluations
    "fast": InpaintConfig(iterations=30, nn_every=5),
    # the paper's schedule: 100 L-BFGS iterations per scale, neighbours every iteration
    "default": _PAPER_SCHEDULE,
    # more iterations and a feathered seam
    "best": replace(_PAPER_SCHEDULE, iterations=200, feather=4),
}


def pyramid_sizes(height: int, width: int, coarsest_side: int = 128, max_scales: int | None = None) -> list[tuple[int, int]]:
    """Scale sizes from coarse to fine, doubling up to (height, width).

    The number of scales is the one that brings the long side to about ``coarsest_side``
    (3 scales for 512² with 128), capped by ``max_scales``.
    """
    long_side = max(height, width)
    count = max(1, round(math.log2(max(long_side / coarsest_side, 1.0))) + 1)
    if max_scales is not None:
        count = min(count, max_scales)
    sizes = []
    for level in range(count):
        factor = 2 ** (count - 1 - level)
        sizes.append((max(1, round(height / factor)), max(1, round(width / factor))))
    return sizes


# --------------------------------------------------------------------------- #
# inputs
# --------------------------------------------------------------------------- #


def _as_image_and_mask(image, mask) -> tuple[Tensor, Tensor]:
    """(3, H, W) float32 in [0, 1] and (H, W) bool hole from tensors, arrays, PIL images or paths."""
    from neuralpatch.io import read_mask

    image, alpha = _as_rgb(image)
    if mask is None:
        if alpha is None:
            raise ValueError("mask: none given and the image has no alpha channel to take it from")
        mask = alpha
    elif isinstance(mask, (str, os.PathLike)) or _is_pil(mask):
        mask = read_mask(mask)
    elif not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask)
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2:
        raise ValueError(f"mask: expected (H, W), got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        mask = mask > (0.5 if mask.is_floating_point() else 127 if mask.max() > 1 else 0)
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"mask: size {mask.shape[1]}x{mask.shape[0]} does not match the image's {image.shape[2]}x{image.shape[1]}")
    return image, mask.to(image.device)


def _as_rgb(image, what: str = "image") -> tuple[Tensor, Tensor | None]:
    """(3, H, W) float32 in [0, 1], and the (H, W) transparent-pixel mask of an alpha channel or None."""
    from neuralpatch.io import read_image

    alpha = None
    if isinstance(image, (str, os.PathLike)) or _is_pil(image):
        image, alpha = read_image(image)
    elif not isinstance(image, Tensor):
        image = torch.as_tensor(np.array(image))  # a copy: the caller's array may be read-only
        if image.dim() == 3 and image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3, 4):
            image = image.permute(2, 0, 1)
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"{what}: expected (3, H, W) RGB, got shape {tuple(getattr(image, 'shape', ()))}")
    if not image.is_floating_point():
        image = image.float() / (65535.0 if image.dtype in (torch.int32, torch.int64) and image.max() > 255 else 255.0)
    if image.shape[0] == 4:
        image, alpha = image[:3], image[3] < 0.5
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.is_floating_point() and not bool(torch.isfinite(image).all()):
        raise ValueError(f"{what}: contains NaN or Inf pixels")
    return image.float().clamp(0, 1).contiguous(), alpha


def resolve_device(device) -> torch.device:
    """``device`` checked (default: CUDA if available, else the CPU); ValueError names it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a device (use cpu, cuda or cuda:N)") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {str(device)!r} is not supported (use cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {str(device)!r} asked for, but this torch sees no CUDA GPU (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device: {str(device)!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def _is_pil(value) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(value, Image.Image)


# --------------------------------------------------------------------------- #
# one scale
# --------------------------------------------------------------------------- #


class _Scale:
    """The optimisation problem of one pyramid level."""

    def __init__(
        self, x_init: Tensor, hole: Tensor, free: Tensor, reference: Tensor, vgg, config: InpaintConfig, blur: float = 0.0, seed: int = 0
    ):
        self.config = config
        # below a third of a pixel the Gaussian is all but the identity: the plain per-pixel term
        self.blur = _gaussian_taps(blur, x_init.device) if blur >= 0.3 else None
        self.vgg = vgg
        _, height, width = x_init.shape
        self.long_side = max(height, width)
        stride = vgg.alignment
        k = config.patch_size
        box = bbox(free)
        # VGG runs on the bounding box plus the receptive field of a whole query patch
        margin = vgg.margin + (k // 2 + 1) * stride
        self.crop = window(box, margin, stride, height, width)
        side = max(box[1] - box[0], box[3] - box[2])
        self.context = window(box, margin + math.ceil(config.context * side), stride, height, width)
        cy0, cy1, cx0, cx1 = self.crop
        self.known = x_init[:, cy0:cy1, cx0:cx1].clone()
        ky0, ky1, kx0, kx1 = self.context
        self.key_pixels = x_init[:, ky0:ky1, kx0:kx1]
        self.vote_target: Tensor | None = None
        self.free = free[cy0:cy1, cx0:cx1]
        self.hole = hole[cy0:cy1, cx0:cx1]
        self.reference = reference[:, cy0:cy1, cx0:cx1]
        self.n_free = max(int(self.free.sum()), 1)
        # the neighbour pairs the smoothness terms count: those touching the free region
        free = self.free.float()
        self.pairs_y = torch.maximum(free[1:], free[:-1])
        self.pairs_x = torch.maximum(free[:, 1:], free[:, :-1])
        # the texture term is the drop-in loss: the crop's hole patches matched against the
        # context window's known patches, whose features are computed once per scale; the
        # neighbours are searched again at the start of each round (see _optimise)
        self.texture = NeuralPatchLoss(
            config.layers, config.layer_weights, k, nn_every=None, backend=config.backend,
            precision=config.precision, feature_net=vgg, max_keys=config.max_keys,
            search=config.search, search_iterations=config.search_iterations, seed=seed,
        )  # fmt: skip
        self.exemplars, self.exemplar_masks = [self.key_pixels], [~hole[ky0:ky1, kx0:kx1]]
        if not self.texture.exemplar_keys(self.exemplars, self.exemplar_masks, device=x_init.device):
            raise ValueError(
                f"mask: the hole leaves no {k}x{k} patch of known features at {height}x{width} in any layer; "
                "use a smaller hole, a larger context, or fewer scales"
            )
        self.searches_seen = 0

    def compose(self, variables: Tensor) -> Tensor:
        return torch.where(self.free[None], variables, self.known)

    def energy(self, variables: Tensor) -> Tensor:
        config = self.config
        x = self.compose(variables)
        difference = x - self.reference
        if self.blur is not None:
            difference = _separable_blur(difference, self.blur)
        content = self._mean_square_in_hole(difference)
        texture = self.texture(x[None], self.free, exemplars=self.exemplars, exemplar_masks=self.exemplar_masks)
        if config.gamma > 0 and self.texture.searches != self.searches_seen and config.vote_layer in self.texture.matches:
            self.vote_target = self._vote(self.key_pixels, self.texture.matches[config.vote_layer], self.known)
        self.searches_seen = self.texture.searches
        tv = self._smoothness(x)
        energy = content + config.alpha * texture + config.beta * tv
        if config.beta_chroma > 0:
            energy = energy + config.beta_chroma * self._smoothness(x - x.mean(dim=0, keepdim=True))
        if self.vote_target is not None:
            energy = energy + config.gamma * self._mean_square_in_hole(x - self.vote_target)
        return energy

    def add_detail(self, crop: Tensor) -> Tensor:
        """``crop`` (this scale's result in the crop) with ``config.detail`` times the fine
        detail of the matched known patches added in the hole (see
        :attr:`InpaintConfig.detail`); unchanged without matches, ``detail=0`` or
        ``detail_sigma=0``."""
        config = self.config
        match = self.texture.matches.get(config.vote_layer)
        if config.detail <= 0 or config.detail_sigma <= 0 or match is None:
            return crop
        # the band of the known pixels alone (a blur normalised over them), so that no edge
        # between the known pixels and the hole's current fill enters the detail
        known = self.exemplar_masks[0][None].to(self.key_pixels.dtype)
        weight = gaussian_blur(known, config.detail_sigma).clamp_min(1e-6)
        band = (self.key_pixels - gaussian_blur(self.key_pixels * known, config.detail_sigma) / weight) * known
        voted = self._vote(band, match, torch.zeros_like(crop))
        gain = config.detail
        if config.detail_edge < 1:
            depth = hole_depth(self.hole, self.long_side, config.detail_depth)
            gain = config.detail * (depth / config.detail_depth).clamp(config.detail_edge, 1)[None]
        return torch.where(self.hole[None], (crop + gain * voted).clamp(0, 1), crop)

    def cap_detail(self, crop: Tensor) -> Tensor:
        """``crop`` with the hole's fine detail scaled down to ``config.detail_cap`` times its
        surroundings' (see :attr:`InpaintConfig.detail_cap`); unchanged with ``detail_cap=0``,
        ``detail_sigma=0`` or no known pixels around the hole."""
        config = self.config
        if config.detail_cap <= 0 or config.detail_sigma <= 0:
            return crop
        # the known pixels only: not the hole, nor a feather band that is re-synthesised
        ring = dilate(self.hole, max(1, round(DETAIL_RING * self.long_side / BLUR_SIDE))) & ~self.free
        if not bool(ring.any()):
            return crop
        band = crop - gaussian_blur(crop, config.detail_sigma)
        hole_energy = band[:, self.hole].square().mean()
        ring_energy = band[:, ring].square().mean()
        keep = (config.detail_cap * ring_energy / hole_energy.clamp_min(1e-12)).sqrt().clamp(max=1.0)
        return torch.where(self.hole[None], (crop - (1 - keep) * band).clamp(0, 1), crop)

    def blend_edge(self, crop: Tensor) -> Tensor:
        """``crop`` with the hole's rim of ``config.edge_blend`` pixels mixed with the known
        pixels' continuation inward (see :attr:`InpaintConfig.edge_blend`); unchanged with
        ``edge_blend=0`` or a feather band."""
        width = self.config.edge_blend
        if width <= 0 or self.config.feather > 0:
            return crop
        # outside the hole the crop is the input (no feather band), which the rings continue
        return onion_mix(self.known[None], self.hole[None], crop[None], width)[0]

    def _vote(self, source: Tensor, match, fallback: Tensor) -> Tensor:
        """:func:`patch_vote` of ``source`` (the key window's pixels or a band of them) over the
        crop along ``match``, the vote layer's :class:`~neuralpatch.loss.LayerMatch`."""
        stride = self.vgg.receptive_field(self.config.vote_layer).stride
        return patch_vote(source, match.index, match.query_mask[0], match.key_width, stride, self.config.patch_size, fallback)

    def _smoothness(self, x: Tensor) -> Tensor:
        """Mean squared difference of neighbouring pixels of ``x`` (C, h, w), over the pairs
        that touch the free region."""
        dy = (x[:, 1:] - x[:, :-1]).square() * self.pairs_y
        dx = (x[:, :, 1:] - x[:, :, :-1]).square() * self.pairs_x
        return (dy.sum() + dx.sum()) / (3 * self.n_free)

    def _mean_square_in_hole(self, difference: Tensor) -> Tensor:
        return difference.square().mul(self.free[None]).sum() / (3 * self.n_free)


def _gaussian_taps(sigma: float, device) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-torch.arange(-radius, radius + 1, device=device, dtype=torch.float32).square() / (2 * sigma * sigma))
    return taps / taps.sum()


def _separable_blur(x: Tensor, taps: Tensor, edge: str = "zeros") -> Tensor:
    """(C, H, W) blurred by ``taps`` along both axes; outside the map it is taken as zero
    (``edge="zeros"``: right for a difference that is zero on known pixels anyway) or as the
    nearest edge pixel (``edge="replicate"``: right for an image)."""
    c, r = x.shape[0], taps.numel() // 2
    x = x[None] if edge == "zeros" else F.pad(x[None], (r, r, r, r), mode=edge)
    pad = r if edge == "zeros" else 0
    out = F.conv2d(x, taps.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, pad), groups=c)
    return F.conv2d(out, taps.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(pad, 0), groups=c)[0]


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """(..., H, W) images blurred by a Gaussian of standard deviation ``sigma`` pixels, edges
    replicated; ``sigma`` <= 0 returns them as they are."""
    if sigma <= 0:
        return images
    flat = images.reshape(-1, *images.shape[-2:])
    return _separable_blur(flat, _gaussian_taps(sigma, images.device).to(images.dtype), edge="replicate").view(images.shape)


def patch_vote(source: Tensor, index: Tensor, query_mask: Tensor, key_width: int, stride: int, patch_size: int, fallback: Tensor) -> Tensor:
    """Pixels that the matched feature patches vote for: each query cell's patch of
    ``patch_size`` cells spans ``patch_size * stride`` pixels a side, and lays the pixels under
    its matched key patch (in ``source``) over its own; every pixel gets the mean of the votes
    it received, or ``fallback``'s value where it received none.

    Args:
        source: (3, Hk, Wk) pixels of the key window (the key features' input).
        index: (Nq,) flat key cell per query, row-major in a key map ``key_width`` cells wide.
        query_mask: (h, w) query cells, in the order of ``index``.
        stride: pixels per feature cell. fallback: (3, H, W) pixels of the query window.
    """
    r = patch_size // 2
    _, height, width = fallback.shape
    query = query_mask.nonzero()
    span = torch.arange(-r * stride, (r + 1) * stride, device=index.device)
    qy = query[:, :1] * stride + span  # (Nq, k*stride) pixel rows in the query window
    qx = query[:, 1:] * stride + span
    sy = (index // key_width)[:, None] * stride + span  # the same rows in the key window
    sx = (index % key_width)[:, None] * stride + span
    inside = ((qy >= 0) & (qy < height) & (sy >= 0) & (sy < source.shape[1]))[:, :, None] & (
        (qx >= 0) & (qx < width) & (sx >= 0) & (sx < source.shape[2])
    )[:, None, :]
    target_flat = (qy[:, :, None] * width + qx[:, None, :])[inside]
    source_flat = (sy[:, :, None] * source.shape[2] + sx[:, None, :])[inside]
    votes = torch.zeros(3, height * width, device=source.device, dtype=source.dtype)
    votes.index_add_(1, target_flat, source.reshape(3, -1)[:, source_flat])
    counts = torch.zeros(height * width, device=source.device, dtype=source.dtype)
    counts.index_add_(0, target_flat, torch.ones_like(target_flat, dtype=source.dtype))
    voted = (votes / counts.clamp_min(1)).view(3, height, width)
    return torch.where(counts.view(1, height, width) > 0, voted, fallback)


def _optimise(
    problem: _Scale, start: Tensor, iterations: int, nn_every: int, line_search: str | None, on_round: Callable[[int], None]
) -> Tensor:
    """L-BFGS in rounds of ``nn_every`` iterations: the nearest neighbours are searched at the
    start of each round and held fixed through it, so every evaluation of a round sees one objective. The
    curvature history carries over from round to round."""
    variables = start.clone(memory_format=torch.contiguous_format).requires_grad_()
    optimizer = torch.optim.LBFGS(
        [variables], lr=1.0, max_iter=nn_every, max_eval=nn_every * 5 // 4 + 1,
        tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20, line_search_fn=line_search,
    )  # fmt: skip

    def closure():
        optimizer.zero_grad()
        energy = problem.energy(variables)
        energy.backward()
        return energy

    for done in range(0, iterations, nn_every):
        round_iterations = min(nn_every, iterations - done)
        optimizer.param_groups[0]["max_iter"] = round_iterations
        problem.texture.reset()
        optimizer.step(closure)
        on_round(round_iterations)
    return problem.compose(variables.detach()).clamp(0, 1)


# --------------------------------------------------------------------------- #
# the pipeline
# --------------------------------------------------------------------------- #


def inpaint(
    image,
    mask=None,
    *,
    preset: str = "default",
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    save_pyramid: str | os.PathLike | None = None,
    feature_net=None,
    content_net=None,
    init=None,
    callback: Callable[[Progress], None] | None = None,
    **options,
) -> Tensor:
    """Fill the hole of ``image`` by multi-scale neural patch synthesis.

    Args:
        image: (3, H, W) float tensor in [0, 1] (or uint8), an (H, W, 3) array, a PIL image or a
            path. An alpha channel is used as the mask when ``mask`` is None (transparent = hole).
        mask: (H, W) bool tensor, array, PIL image or path; True / white = hole. Any shape of
            hole, several holes, holes touching the border.
        preset: "fast", "default" (the paper's schedule) or "best"; see :data:`PRESETS`.
        device: where to run (default: CUDA if available, else CPU).
        seed: seeds the approximate neighbour search (``search="patchmatch"``, or "auto" where it
            picks PatchMatch), the pipeline's only random draws: the same seed gives the same
            result on the same machine and backend. With the exact search the result does not
            depend on it. The caller's global torch RNG is left alone.
        progress: show tqdm bars per scale.
        save_pyramid: folder to write each scale's result to, as PNG.
        feature_net, content_net: modules to use instead of loading the configured weights.
        init: an existing fill of the hole to refine (from LaMa, PatchMatch, an editor ...): a
            tensor, array, PIL image or path of the image's size, whose hole pixels replace the
            content prediction as the initial fill (the coarsest scale's start, and the content
            reference of every scale with ``reference="initial"``).
        callback: called with a :class:`Progress` after each round of iterations and when each
            scale is done; an exception it raises stops the run and propagates.
        **options: any :class:`InpaintConfig` field, overriding the preset.

    Returns:
        (3, H, W) float32 tensor in [0, 1] on the CPU: the input's pixels outside the hole,
        synthesised ones inside.

    Raises:
        ValueError: a mask that does not match the image, an all-hole mask, an image over
            ``max_pixels``, or an unknown preset or option.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    known_options = {f.name for f in fields(InpaintConfig)}
    unknown = sorted(set(options) - known_options)
    if unknown:
        raise ValueError(f"options: unknown {unknown}; valid ones are {sorted(known_options)}")
    config = replace(PRESETS[preset], **options)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an int in [0, 2**32), got {seed!r}")
    image, hole = _as_image_and_mask(image, mask)
    height, width = hole.shape
    if height * width > config.max_pixels:
        raise ValueError(
            f"image: {width}x{height} = {height * width} pixels is over the limit of {config.max_pixels}; "
            f"pass max_pixels={height * width} (CLI: --max-pixels {height * width}) if the memory is there"
        )
    if not bool(hole.any()):
        warnings.warn("mask: the hole is empty; returning the input unchanged", stacklevel=2)
        return image.cpu().clone()
    if bool(hole.all()):
        raise ValueError("mask: covers the whole image, so there is no known texture to copy from")

    device = resolve_device(device)
    image, hole = image.to(device), hole.to(device)
    if feature_net is None:
        from neuralpatch.models import load_vgg

        feature_net = load_vgg(config.texture_weights, layers=config.layers, device=device)
    feature_net = feature_net.to(device).eval()

    # variables: the hole, plus the feather band that is re-synthesised and blended back
    band = dilate(hole, config.feather) & ~hole
    free_full = hole | band
    sizes = pyramid_sizes(height, width, config.coarsest_side, config.max_scales)
    if init is not None:
        init = _as_init(init, image)
    initial = _initial_fill(image, hole, sizes[0], config, content_net, device, init)
    line = monochrome_line(image, ~hole, config.monochrome_tolerance)
    x = initial
    pyramid_dir = Path(save_pyramid) if save_pyramid is not None else None

    from tqdm.auto import tqdm

    for level, size in enumerate(sizes):
        target = resize_image(image, size)
        hole_s = shrink_mask(hole, size)
        free_s = shrink_mask(free_full, size)
        start = torch.where(hole_s[None], resize_image(x, size), target)
        # content reference in the hole: the upsampled previous result (the paper), or the initial
        # fill at every scale; the input in the feather band
        reference = (
            start if config.reference == "previous" or level == 0 else torch.where(hole_s[None], resize_image(initial, size), target)
        )
        blur = config.content_blur * max(size) / BLUR_SIDE
        problem = _Scale(start, hole_s, free_s, reference, feature_net, config, blur, seed=(seed + 1000 * level) % 2**32)
        cy0, cy1, cx0, cx1 = problem.crop
        bar = tqdm(
            total=config.iterations, desc=f"scale {level + 1}/{len(sizes)} {size[1]}x{size[0]}",
            disable=not progress, leave=False, unit="it",
        )  # fmt: skip
        done = 0

        def on_round(round_iterations: int) -> None:
            nonlocal done
            done += round_iterations
            bar.update(round_iterations)
            if callback is not None:
                callback(Progress(level, len(sizes), size, done, config.iterations))

        with bar, nvtx_range(f"neuralpatch.inpaint scale {level + 1}/{len(sizes)} {size[1]}x{size[0]}"):
            result_crop = _optimise(problem, start[:, cy0:cy1, cx0:cx1], config.iterations, config.nn_every, config.line_search, on_round)
            if level == len(sizes) - 1:
                result_crop = problem.blend_edge(problem.cap_detail(problem.add_detail(result_crop)))
        x = start.clone()
        x[:, cy0:cy1, cx0:cx1] = result_crop if line is None else onto_line(result_crop, line)
        if callback is not None:
            callback(Progress(level, len(sizes), size, done, config.iterations, x.detach().cpu().clone()))
        if pyramid_dir is not None:
            from neuralpatch.io import save_image_atomic

            save_image_atomic(x, pyramid_dir / f"scale{level}_{size[1]}x{size[0]}.png")

    return _composite(image, x, hole, band, config.feather).cpu()


def _initial_fill(image: Tensor, hole: Tensor, size: tuple[int, int], config: InpaintConfig, content_net, device, init=None) -> Tensor:
    """The initial fill, pasted into the hole: ``init`` or a PatchMatch fill (mixed with the
    content network's prediction for "blend") at full resolution, or the content network's
    prediction or the known-pixel mean colour at the coarsest ``size``. It is the coarsest
    scale's start and content reference (and every scale's reference with
    ``reference="initial"``)."""
    blend = init is None and config.content_init == "blend" and config.blend_weight > 0
    if init is None and config.content_init in ("patchmatch", "blend"):
        init = patchmatch_fill(image, hole).to(device)
    if init is not None:
        fill = torch.where(hole[None], init, image)
        if config.init_blur > 0:
            fill = torch.where(hole[None], gaussian_blur(fill, config.init_blur * max(hole.shape) / BLUR_SIDE), image)
        share = network_share(hole, config.blend_weight, config.blend_ramp) if blend else None
        if share is not None and bool(share.any()):  # thin holes never reach the ramp: no network run
            prediction = _content_net(content_net, config, device).predict(image, hole)
            fill = torch.lerp(fill, prediction, share[None])
        return fill  # at full resolution: every scale resizes it
    small = resize_image(image, size)
    small_hole = shrink_mask(hole, size)
    if config.content_init == "mean":
        mean = (small * ~small_hole).sum((1, 2), keepdim=True) / (~small_hole).sum().clamp_min(1)
        return torch.where(small_hole[None], mean.expand_as(small), small)
    return _content_net(content_net, config, device).predict(small, small_hole)


def _content_net(content_net, config: InpaintConfig, device):
    if content_net is None:
        from neuralpatch.models.content import load_content_net

        content_net = load_content_net(config.content_weights, device=device)
    return content_net.to(device)


def hole_depth(hole: Tensor, long_side: int, limit: float) -> Tensor:
    """(H, W) float: each hole pixel's distance to the nearest known pixel, in pixels at a long
    side of 512 (the image's long side being ``long_side``), up to ``limit``; 0 on known pixels.
    It is measured at that size (a coarse pixel is hole if any pixel under it is), so a 4K mask
    costs what a 512 one does."""
    factor = min(1.0, BLUR_SIDE / long_side)
    small = shrink_mask(hole, (max(1, round(hole.shape[0] * factor)), max(1, round(hole.shape[1] * factor))))
    to_512 = BLUR_SIDE / (long_side * factor)  # pixels at the measuring size -> pixels at a long side of 512
    depth = (edge_distance(small, math.ceil(limit / to_512) + 1) * to_512).clamp(max=limit)
    if tuple(small.shape) != tuple(hole.shape):
        depth = F.interpolate(depth[None, None], size=hole.shape, mode="bilinear", align_corners=False)[0, 0]
    return depth * hole


def network_share(hole: Tensor, weight: float, ramp: tuple[float, float]) -> Tensor:
    """(H, W) float: the content network's share of the "blend" start (see
    :attr:`InpaintConfig.blend_ramp`): ``weight`` times a ramp from 0 at ``ramp[0]`` pixels
    from the hole's edge to 1 at ``ramp[0] + ramp[1]`` (pixels at a long side of 512, see
    :func:`hole_depth`); 0 on known pixels."""
    start, length = ramp
    depth = hole_depth(hole, max(hole.shape), start + length)
    return weight * ((depth - start) / length).clamp(0, 1) * hole


def _as_init(init, image: Tensor) -> Tensor:
    """An ``init=`` fill as a (3, H, W) float tensor on ``image``'s device, checked against it."""
    fill, _ = _as_rgb(init, "init")
    if tuple(fill.shape[-2:]) != tuple(image.shape[-2:]):
        raise ValueError(f"init: size {fill.shape[2]}x{fill.shape[1]} does not match the image's {image.shape[2]}x{image.shape[1]}")
    return fill.to(image.device)


def patchmatch_fill(image: Tensor, hole: Tensor, radius: int = 3) -> Tensor:
    """PatchMatch inpainting (Barnes et al. 2009) by the ``pypatchmatch`` package:
    (3, H, W) float in [0, 1] and an (H, W) bool hole -> (3, H, W) float, known pixels unchanged.

    ``radius`` is pypatchmatch's ``patch_size`` (patches of (2 radius + 1)² pixels; 3 as in its
    examples). Raises ImportError saying how to install it when it is missing.
    """
    try:
        from patchmatch import patch_match
    except ImportError as err:
        raise ImportError("content_init='patchmatch' needs pypatchmatch (a dependency of neuralpatch): pip install pypatchmatch") from err
    rgb = (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    mask = hole.cpu().numpy().astype(np.uint8) * 255
    filled = patch_match.inpaint(np.ascontiguousarray(rgb), mask, patch_size=radius)
    out = torch.from_numpy(np.ascontiguousarray(filled)).permute(2, 0, 1).float().div(255).to(image.device)
    return torch.where(hole.to(image.device)[None], out, image)


def monochrome_line(image: Tensor, known: Tensor, tolerance: float) -> tuple[Tensor, Tensor] | None:
    """(point, unit direction) of the line through RGB that the colours of ``image`` at ``known``
    lie on, all but :data:`MONOCHROME_OUTLIERS` of them within ``tolerance``: a greyscale, sepia
    or other one-hue photo. The direction is zero when they are all one colour. None for a photo
    in colour, or when ``tolerance`` is 0."""
    if tolerance <= 0:
        return None
    # a regular grid of about MONOCHROME_SAMPLES pixels decides for a photo of any size
    step = max(1, math.ceil(math.sqrt(known.numel() / MONOCHROME_SAMPLES)))
    colours = image[:, ::step, ::step][:, known[::step, ::step]].T.float()
    if len(colours) < min(int(known.sum()), 4096):  # a thin known region that the grid misses
        colours = image[:, known].T.float()
    point = colours.mean(0)
    centred = colours - point
    spread, axes = torch.linalg.eigh((centred.T @ centred).double())
    direction = axes[:, -1].float() if spread[-1] > 1e-12 * len(colours) else torch.zeros_like(point)
    off_line = (centred - (centred @ direction)[:, None] * direction).norm(dim=1)
    if (off_line > tolerance).float().mean() > MONOCHROME_OUTLIERS:
        return None
    return point, direction


def onto_line(image: Tensor, line: tuple[Tensor, Tensor]) -> Tensor:
    """Each pixel of (3, H, W) ``image`` moved to the nearest point of a :func:`monochrome_line`."""
    point, direction = (v[:, None, None] for v in line)
    along = ((image - point) * direction).sum(0, keepdim=True)
    return (point + along * direction).clamp(0, 1)


def _composite(image: Tensor, result: Tensor, hole: Tensor, band: Tensor, feather: int) -> Tensor:
    """Known pixels from the input, hole pixels from the result, and in the feather band a
    blend that goes from the result at the hole's edge to the input ``feather`` pixels out."""
    out = torch.where(hole[None], result, image)
    if feather > 0 and bool(band.any()):
        # distance (in rings) from the hole, by repeated dilation: 1 at the edge, feather at the outside
        weight = torch.zeros_like(hole, dtype=torch.float32)
        grown = hole
        for ring in range(1, feather + 1):
            wider = dilate(grown, 1)
            weight[wider & ~grown] = 1.0 - ring / (feather + 1)
            grown = wider
        out = torch.where(band[None], weight[None] * result + (1 - weight[None]) * image, out)
    return out.clamp(0, 1)
