"""The content network: a Context-Encoder-style encoder-decoder (Pathak et al., CVPR 2016) that
predicts the hole at 128², the coarsest scale's initialisation and content reference (docs/architecture.md,
"From an image to its fill").

Input: 4 channels, RGB in [0, 1] with the hole filled by the image's known-pixel mean colour,
and the mask (1 = hole); see :func:`content_input`. Output: RGB in [0, 1] for the whole frame;
the caller pastes it into the hole (:meth:`ContentNet.predict` does all of it at any image size).

Architecture (the defaults of :class:`ContentNetConfig`; sizes for a 128² input):

- prior: a parameter-free fill of the hole (:func:`prior_fill`, "blend": smoothed push-pull
  interpolation, with onion peeling mixed in along the boundary) -> 3 x 128².
- encoder, on input + prior (7 channels): 4 x [conv 4x4 stride 2 -> GroupNorm ->
  LeakyReLU(0.2)], 32, 64, 128, 256 channels (no norm on the first) -> 256 x 8².
- bottleneck: 3 x residual [dilated conv 3x3 -> GroupNorm -> LeakyReLU], dilations 1, 2, 4;
  then a global-context vector (spatial mean -> linear -> LeakyReLU) added at every
  position -> 256 x 8².
- decoder (``upsample="resize"``): 3 x [conv 1x1 -> bilinear x2 -> conv 3x3 -> GroupNorm ->
  ReLU], each concatenated with the encoder map of the same size -> 64 x 64².
- head: conv 1x1 -> LeakyReLU -> bilinear x2 -> 16 x 128²; concatenated with a full-resolution
  stem (conv 3x3 -> LeakyReLU on input + prior, ``stem`` = 16 channels); conv 3x3 -> 3 x 128²,
  added to logit(prior), sigmoid.
- ``peel`` > 0 (:func:`peel_fill`): a second parameter-free fill, onion peeling over ``peel``
  layers (Telea-like: it continues the boundary colours inward where push-pull blurs them), is
  a 3-channel input next to the prior (10 channels in all), and the output conv gives a 4th
  channel, the logit of a per-pixel weight ``w``: the residual base becomes
  ``prior + w * (peel - prior)`` (half and half untrained). No OpenCV at inference.
- ``patchmatch`` (radii, :func:`patchmatch_base`): more bases, PatchMatch fills (the
  ``pypatchmatch`` package, one per patch radius) slightly blurred, each 3 more input
  channels and one more logit of the output conv: the residual base becomes the per-pixel
  softmax mix of the prior, the peel fill (when ``peel`` > 0) and these fills (equal parts
  untrained). PatchMatch copies real texture and structure where the smooth fills can only
  interpolate; the network learns where to trust it, and which radius. ``patchmatch_reach``
  sets a base's weight to zero deeper into the hole than a given number of pixels.
- ``features`` (VGG-16 taps, e.g. relu3_1 and relu4_1): the frozen ImageNet VGG-16 trunk that
  ships with the package (:func:`neuralpatch.models.load_vgg`, "vgg16-imagenet") reads the
  untrained residual base (the equal mix of the prior and the bases); each tap's map, normalised
  per image (GroupNorm without affine), goes through a 1x1 conv into the encoder stage of the
  same stride, where it is added. The projections start at zero, so a network widened this way
  (``train-content --init``) starts as the network it was, and learns what an ImageNet-trained
  encoder knows about photos that a few dozen training photos cannot teach. The trunk's weights are not
  part of the content network's file.
- ``upsample="transposed"`` (with ``stem=0``) is the first shipped network: 4x4 stride-2
  transposed convs in the decoder and as the head. Their uneven kernel overlap printed an
  8-pixel block pattern into its predictions; weights files without an ``upsample`` entry
  hold that network.

Why:

- The network learns a residual over the prior. The head starts at zero, so an untrained
  network returns the prior, which is already a little better than OpenCV's Telea in the hole
  (table at :data:`ONION_ITERATIONS`); a short CPU training run then spends its steps on
  corrections rather than on relearning colour propagation from scratch. ``prior="none"``
  gives the plain Context Encoder arrangement.
- Total stride 16: any input whose sides are multiples of 16 works. At 128² the dilated
  bottleneck reaches 7 cells either side, so every cell of the 8x8 map sees the whole image and
  the centre of a 64² hole is predicted from its surroundings; the global-context vector does the
  same at any input size. This replaces Context Encoder's channel-wise fully connected layer,
  which ties the network to one input size.
- Skip connections (U-Net style; Context Encoder has none) let the decoder continue the known
  pixels across the hole boundary, which matters most when training is short. The
  full-resolution path is kept narrow (16 + 16 channels into one 3x3 conv to RGB): a wide conv
  at 128² costs more on a CPU than the whole encoder.
- Resize-then-convolve upsampling (Odena et al., Distill 2016): every output pixel sees the
  same kernel footprint, so a constant input gives a constant output. The 1x1 conv before each
  resize keeps the 3x3 conv at the higher resolution narrow: a training step costs about 1.4x
  the transposed-conv network's at the same widths.
- GroupNorm rather than BatchNorm: training batches on a CPU are small (8 to 16) and inference
  runs one image at a time; GroupNorm behaves identically in both and keeps no running
  statistics that could drift.
- Default widths: 2.78 M parameters, 11 MB as float32 safetensors (stored in float32; the
  loader also accepts float16 or bfloat16 files and converts them). The prior costs ~10 ms per
  128² image on one CPU core, about a fifth of a training step.

Weights are read only with safetensors. The shipped file is package data at
``neuralpatch/weights/content_net.safetensors``, made by ``neuralpatch train-content``
(:data:`HOW_TO_CREATE`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuralpatch.geometry import resize_image, shrink_mask
from neuralpatch.models.weights import (
    CheckpointError,
    CheckpointMismatchError,
    WeightsNotFoundError,
    write_safetensors_atomic,
)

__all__ = [
    "CONTENT_SIZE",
    "HOW_TO_CREATE",
    "SHIPPED_WEIGHTS",
    "ContentNet",
    "ContentNetConfig",
    "ContentWeightsNotFoundError",
    "content_input",
    "load_content_net",
    "mean_fill",
    "onion_mix",
    "onion_peel_fill",
    "patchmatch_base",
    "peel_fill",
    "predict",
    "prior_fill",
    "push_pull_fill",
    "residual_bases",
    "save_content_net",
]

# The resolution the content network runs at (docs/architecture.md, "From an image to its fill").
CONTENT_SIZE = 128
SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "content_net.safetensors"
# The prior is clamped to [eps, 1 - eps] before its logit, so that the head can still move
# black or white pixels (logit(1e-3) = -6.9).
PRIOR_EPS = 1e-3
# Push-pull: a pyramid cell whose known fraction is w keeps its own colour with weight
# min(1, PUSH_PULL_SHARPNESS * w) over the coarser level's; 1 is the plain push-pull, 4 follows
# the boundary colours more closely. PULL_SMOOTHING Jacobi sweeps per level remove the block
# edges of plain push-pull.
PUSH_PULL_SHARPNESS = 4.0
PULL_SMOOTHING = 4
# The "blend" prior mixes onion peeling into push-pull over ONION_ITERATIONS pixels (at the
# network's resolution) along the hole boundary, with weight ONION_WEIGHT on the first layer.
# Hole L1 / PSNR at 128² with train-content's validation masks (16 per photo):
#                                33 training photos    3 held-out photos
#   push-pull (sharpness 1, 0)   0.1148  17.41 dB      0.1043  17.89 dB
#   push-pull (4, 0 sweeps)      0.1018  18.26 dB      0.0934  18.54 dB
#   push-pull (4, 4 sweeps)      0.0955  18.86 dB      0.0896  18.88 dB
#   blend (8 layers, 0.75)       0.0920  18.90 dB      0.0866  18.96 dB
#   OpenCV Telea (radius 3)      0.0940  18.39 dB      0.0924  18.13 dB
# Settings chosen on the training photos. The whole blend prior costs ~9 ms per 128² image on
# one CPU core.
ONION_ITERATIONS = 8
ONION_WEIGHT = 0.75
# Blur of the PatchMatch base (ContentNetConfig.patchmatch), in pixels at the network's
# resolution. Hole L1 of the plain and the blurred fill (radius 1, alone and as a third of a mix
# with the prior and the peel fill) on train-content's 11 validation photos at 128², centre /
# free-form: 0.1156 / 0.0530 plain, 0.1102 / 0.0492 at 1.5, 0.1094 / 0.0542 at 3.
PATCHMATCH_BLUR = 1.5
PRIORS = ("none", "push_pull", "blend")
# VGG-16 taps a network can read (ContentNetConfig.features), by their stride: the shipped
# ImageNet trunk goes to relu4_2, and the encoder stage of stride s receives the tap of stride s.
FEATURE_STRIDES = {"relu2_1": 2, "relu3_1": 4, "relu4_1": 8}
FEATURE_CHANNELS = {"relu2_1": 128, "relu3_1": 256, "relu4_1": 512}
# Decoder upsampling: "resize" (bilinear x2, then a 3x3 conv: no checkerboard) or "transposed"
# (4x4 stride-2 transposed convs, the first shipped network's, whose uneven kernel overlap left an
# 8-pixel block pattern in its predictions).
UPSAMPLES = ("resize", "transposed")
# safetensors metadata "format" of a weights file and of a training checkpoint.
WEIGHTS_FORMAT = "neuralpatch.content_net"
CHECKPOINT_FORMAT = "neuralpatch.content_net.checkpoint"
# Prefix of the generator's tensors inside a training checkpoint.
CHECKPOINT_GENERATOR_PREFIX = "generator."

HOW_TO_CREATE = (
    "Create the content network weights with:\n"
    "  python -m neuralpatch.train_content --prepare-data content_data\n"
    "  neuralpatch train-content --images content_data/train --val-images content_data/val "
    f"--checkpoint content_data/content_net.ckpt.safetensors --out {SHIPPED_WEIGHTS}\n"
    "or pass the path of an existing .safetensors file written by train-content."
)


class ContentWeightsNotFoundError(WeightsNotFoundError):
    """The content network's weights file does not exist; the message says how to create it."""


@dataclass(frozen=True)
class ContentNetConfig:
    """Shape of a :class:`ContentNet`. Stored as JSON in the metadata of every weights file, so
    that a file rebuilds the network it was trained as.

    Attributes:
        widths: encoder channels per stride-2 stage; the total stride is ``2 ** len(widths)``.
            The decoder mirrors them.
        dilations: one residual dilated 3x3 conv per entry, in the bottleneck.
        groups: GroupNorm groups (must divide every width).
        prior: the parameter-free fill the network refines (:func:`prior_fill`): "blend",
            "push_pull", or "none" for a plain encoder-decoder (output = sigmoid(head)).
        upsample: decoder upsampling, "resize" or "transposed" (:data:`UPSAMPLES`).
        stem: channels of the full-resolution features before the output conv (0: none).
        peel: 0, or the layers of a second parameter-free fill, :func:`peel_fill` (onion
            peeling from the boundary, Telea-like propagation). It is a 3-channel input next to
            the prior, and the residual base becomes a learned per-pixel mix
            ``prior + w * (peel - prior)``, ``w = sigmoid(4th output channel)`` (0.5 untrained;
            with ``patchmatch`` too, the softmax mix below).
        patchmatch: the patch radii of more bases, one :func:`patchmatch_base` each (a
            PatchMatch fill, blurred by :data:`PATCHMATCH_BLUR`; empty: none; an int r is
            read as (r,) and 0 as none): a 3-channel input each, and the residual base becomes
            a per-pixel softmax mix of the prior, the peel fill and these (one logit per base
            after the prior's, from the output conv; equal parts untrained). Small radii copy
            structure into large holes; larger ones follow the texture of thin strokes.
        patchmatch_reach: empty (no limit), or one depth per ``patchmatch`` radius: how far
            into the hole, in pixels at the network's resolution (onion-peel layers), that base
            may enter the mix; deeper, its weight is zero (0: no limit). Copied texture deep in a
            large hole costs more L1 than a blur unless its layout is right, which is for small
            radii more than for large ones.
    """

    widths: tuple[int, ...] = (32, 64, 128, 256)
    dilations: tuple[int, ...] = (1, 2, 4)
    groups: int = 8
    prior: str = "blend"
    upsample: str = "resize"
    stem: int = 16
    peel: int = 0
    patchmatch: tuple[int, ...] = ()
    patchmatch_reach: tuple[int, ...] = ()
    features: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(v) for v in self.widths))
        object.__setattr__(self, "dilations", tuple(int(v) for v in self.dilations))
        if len(self.widths) < 2 or any(v < 1 for v in self.widths):
            raise ValueError(f"widths: expected two or more positive channel counts, got {self.widths}")
        if self.groups < 1 or any(v % self.groups for v in self.widths):
            raise ValueError(f"groups: {self.groups} must divide every width {self.widths}")
        if any(d < 1 for d in self.dilations):
            raise ValueError(f"dilations: expected positive ints, got {self.dilations}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior: expected one of {list(PRIORS)}, got {self.prior!r}")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"upsample: expected one of {list(UPSAMPLES)}, got {self.upsample!r}")
        object.__setattr__(self, "stem", int(self.stem))
        if self.stem < 0 or (self.stem and self.stem % self.groups):
            raise ValueError(f"stem: expected 0 or a positive multiple of groups ({self.groups}), got {self.stem}")
        object.__setattr__(self, "peel", int(self.peel))
        if self.peel < 0:
            raise ValueError(f"peel: expected 0 or a positive number of onion-peel layers, got {self.peel}")
        if self.peel and (self.prior == "none" or self.upsample != "resize"):
            raise ValueError("peel: the learned mix of the prior and the onion-peel fill needs a prior and upsample='resize'")
        radii = self.patchmatch if isinstance(self.patchmatch, (tuple, list)) else ((self.patchmatch,) if self.patchmatch else ())
        object.__setattr__(self, "patchmatch", tuple(int(r) for r in radii))
        if any(r < 1 for r in self.patchmatch) or len(set(self.patchmatch)) != len(self.patchmatch):
            raise ValueError(f"patchmatch: expected distinct positive PatchMatch patch radii, got {self.patchmatch}")
        if self.patchmatch and (self.prior == "none" or self.upsample != "resize"):
            raise ValueError("patchmatch: the learned mix of the prior and the PatchMatch fill needs a prior and upsample='resize'")
        object.__setattr__(self, "patchmatch_reach", tuple(int(d) for d in self.patchmatch_reach))
        if self.patchmatch_reach and (len(self.patchmatch_reach) != len(self.patchmatch) or min(self.patchmatch_reach) < 0):
            raise ValueError(
                f"patchmatch_reach: expected one depth >= 0 per PatchMatch radius {self.patchmatch}, got {self.patchmatch_reach}"
            )
        taps = (self.features,) if isinstance(self.features, str) else self.features
        object.__setattr__(self, "features", tuple(str(tap) for tap in taps))
        for tap in self.features:
            stride = FEATURE_STRIDES.get(tap)
            if stride is None:
                raise ValueError(f"features: expected VGG-16 taps among {list(FEATURE_STRIDES)}, got {tap!r}")
            if stride > self.stride:
                raise ValueError(f"features: {tap} (stride {stride}) is deeper than the encoder (stride {self.stride})")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"features: expected distinct taps, got {self.features}")
        if self.features and (self.prior == "none" or self.upsample != "resize"):
            raise ValueError("features: the VGG features of the residual base need a prior and upsample='resize'")

    @property
    def base_names(self) -> tuple[str, ...]:
        """The bases mixed with the prior, in the order of their input channels and mix logits."""
        return ("peel",) * bool(self.peel) + tuple(f"patchmatch{radius}" for radius in self.patchmatch)

    @property
    def mixed_bases(self) -> int:
        """How many bases are mixed with the prior (one mix logit each)."""
        return len(self.base_names)

    @property
    def stride(self) -> int:
        return 2 ** len(self.widths)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ContentNetConfig:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise TypeError(f"expected a JSON object, got {text!r}")
        # files written before the upsampling choice existed hold the transposed-conv network
        fields.setdefault("upsample", "transposed")
        fields.setdefault("stem", 0)
        fields.setdefault("peel", 0)
        fields.setdefault("patchmatch", ())
        fields.setdefault("patchmatch_reach", ())
        fields.setdefault("features", ())
        return cls(**fields)


def _encoder_stage(tap: str) -> int:
    """Index of the encoder stage whose output has the stride of VGG ``tap`` (stage i: 2 ** (i + 1))."""
    return FEATURE_STRIDES[tap].bit_length() - 2


class _Down(nn.Sequential):
    """conv 4x4 stride 2 -> [GroupNorm] -> LeakyReLU(0.2): halves the resolution."""

    def __init__(self, cin: int, cout: int, groups: int, norm: bool = True):
        layers = [nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=not norm)]
        if norm:
            layers.append(nn.GroupNorm(groups, cout))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        super().__init__(*layers)


class _Up(nn.Sequential):
    """up-conv (transposed conv 4x4 stride 2) -> GroupNorm -> ReLU: doubles the resolution."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__(
            nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
            nn.GroupNorm(groups, cout),
            nn.ReLU(inplace=True),
        )


class _ResizeUp(nn.Sequential):
    """conv 1x1 (channels down, at the low resolution) -> bilinear x2 -> conv 3x3 -> GroupNorm ->
    ReLU: doubles the resolution. Every output pixel sees the same kernel footprint, so a constant
    input gives a constant output (no checkerboard); the 1x1 conv first keeps the 3x3 conv at the
    higher resolution at ``cout`` input channels, about a third of the transposed conv's cost."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__(
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.GroupNorm(groups, cout),
            nn.ReLU(inplace=True),
        )


class _DilatedBlock(nn.Module):
    """x + LeakyReLU(GroupNorm(dilated conv 3x3 (x)))."""

    def __init__(self, channels: int, dilation: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm = nn.GroupNorm(groups, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.leaky_relu(self.norm(self.conv(x)), 0.2)


class ContentNet(nn.Module):
    """Context-Encoder-style hole predictor (layers in the module docstring).

    ``forward(x)``: x (B, 4, H, W), RGB in [0, 1] with the hole mean-filled plus the 0/1 mask
    (:func:`content_input`), H and W multiples of :attr:`stride` -> (B, 3, H, W) RGB in [0, 1]
    for the whole frame.
    """

    in_channels = 4

    def __init__(self, config: ContentNetConfig | None = None):
        super().__init__()
        self.config = config or ContentNetConfig()
        widths, groups = self.config.widths, self.config.groups
        has_prior = self.config.prior != "none"
        # the input, the prior fill, and the mixed bases (onion peel, PatchMatch)
        chans = (self.in_channels + 3 * has_prior + 3 * self.config.mixed_bases, *widths)
        self.encoder = nn.ModuleList(_Down(chans[i], chans[i + 1], groups, norm=i > 0) for i in range(len(widths)))
        self.bottleneck = nn.ModuleList(_DilatedBlock(widths[-1], d, groups) for d in self.config.dilations)
        self.context = nn.Linear(widths[-1], widths[-1])
        # up-conv i returns to the resolution of encoder stage i - 1 and is concatenated with its
        # output; the head's up-conv returns to the input resolution as RGB
        up = _ResizeUp if self.config.upsample == "resize" else _Up
        self.decoder = nn.ModuleList(
            up(widths[i] if i == len(widths) - 1 else 2 * widths[i], widths[i - 1], groups) for i in reversed(range(1, len(widths)))
        )
        stem = self.config.stem
        # optional full-resolution features of the input, concatenated before the head
        self.stem = (
            nn.Sequential(nn.Conv2d(chans[0], stem, 3, padding=1, padding_mode="replicate"), nn.LeakyReLU(0.2, inplace=True))
            if stem
            else None
        )
        if self.config.upsample == "resize":
            head = max(groups, widths[0] // 2)
            self.head = nn.Sequential(
                nn.Conv2d(2 * widths[0], head, 1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            )
            # RGB residual, and a mix logit per base mixed with the prior
            self.out = nn.Conv2d(head + stem, 3 + self.config.mixed_bases, 3, padding=1, padding_mode="replicate")
        else:
            if stem:
                raise ValueError("stem: full-resolution features need upsample='resize'")
            self.head = nn.ConvTranspose2d(2 * widths[0], 3, 4, stride=2, padding=1)
            self.out = None
        # per VGG tap: normalised per image, projected onto the encoder stage of the same stride;
        # zero projections leave the network as it was
        self.feature_proj = nn.ModuleDict(
            {
                tap: nn.Sequential(
                    nn.GroupNorm(groups, FEATURE_CHANNELS[tap], affine=False),
                    nn.Conv2d(FEATURE_CHANNELS[tap], widths[_encoder_stage(tap)], 1, bias=False),
                )
                for tap in self.config.features
            }
        )
        self._stage_taps = {_encoder_stage(tap): tap for tap in self.config.features}
        for proj in self.feature_proj.values():
            nn.init.zeros_(proj[1].weight)
        self._vgg: list[nn.Module] = []  # the frozen trunk, loaded on first use, kept out of the state dict
        if has_prior:
            # zero head: the untrained network returns the prior
            last = self.out if self.out is not None else self.head
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    @property
    def stride(self) -> int:
        """Total stride: input sides must be multiples of it."""
        return self.config.stride

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected shape (B, {self.in_channels}, H, W) (RGB + mask), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"x: height and width must be multiples of {self.stride}, got {h}x{w}")
        prior, bases, features = None, [], {}
        if self.config.prior != "none":
            hole = x[:, 3] > 0.5
            smooth = push_pull_fill(x[:, :3], hole)
            prior = prior_fill(x[:, :3], hole, self.config.prior, smooth=smooth)
            bases = list(residual_bases(x[:, :3], hole, self.config, smooth=smooth).values())
            x = torch.cat([x, prior, *bases], dim=1)
            if self.config.features:
                features = self._vgg_features(sum([prior, *bases]) / (1 + len(bases)))
        full = self.stem(x) if self.stem is not None else None
        skips = []
        for stage, down in enumerate(self.encoder):
            x = down(x)
            if stage in self._stage_taps:
                tap = self._stage_taps[stage]
                x = x + self.feature_proj[tap](features[tap])
            skips.append(x)
        skips.pop()
        for block in self.bottleneck:
            x = block(x)
        x = x + F.leaky_relu(self.context(x.mean(dim=(2, 3))), 0.2)[:, :, None, None]
        for up in self.decoder:
            x = torch.cat([up(x), skips.pop()], dim=1)
        out = self.head(x)
        if self.out is not None:
            out = self.out(out if full is None else torch.cat([out, full], dim=1))
        if any(self.config.patchmatch_reach):
            out = self._limit_patchmatch_reach(out, hole)
        if len(bases) == 1:
            prior = prior + torch.sigmoid(out[:, 3:]) * (bases[0] - prior)
        elif bases:
            # a softmax over (0, logits...); with one base it would be the sigmoid mix above
            weights = torch.softmax(F.pad(out[:, 3:], (0, 0, 0, 0, 1, 0)), dim=1)
            prior = sum(weights[:, i : i + 1] * base for i, base in enumerate([prior, *bases]))
        out = out[:, :3]
        return torch.sigmoid(out if prior is None else out + torch.logit(prior, eps=PRIOR_EPS))

    def _vgg_features(self, image: Tensor) -> dict[str, Tensor]:
        """The frozen ImageNet VGG-16 maps of ``image`` at ``config.features`` (no gradient)."""
        if not self._vgg:
            from neuralpatch.models.weights import load_vgg

            self._vgg.append(load_vgg("vgg16-imagenet", layers=self.config.features))
        vgg = self._vgg[0].to(image.device)
        with torch.no_grad():
            return vgg(image.float())

    def _limit_patchmatch_reach(self, out: Tensor, hole: Tensor) -> Tensor:
        """``out`` with the mix logit of each PatchMatch base set to -inf deeper into the hole than
        its ``patchmatch_reach`` (the prior's fixed logit 0 keeps the softmax finite)."""
        reach = self.config.patchmatch_reach
        # the same layers as the peel base's (not the synthesis' edge_distance), so a reach counts
        # peel layers; only the depth map is used, the colours passed in are ignored
        _, depth = onion_peel_fill(out[:, :3], hole, max(reach))
        first = 3 + bool(self.config.peel)
        logits = [out[:, :first]]
        for i, limit in enumerate(reach):
            logit = out[:, first + i : first + i + 1]
            logits.append(logit.masked_fill(depth > limit, float("-inf")) if limit else logit)
        return torch.cat(logits, dim=1)

    @torch.no_grad()
    def predict(self, image: Tensor, mask: Tensor, size: int = CONTENT_SIZE) -> Tensor:
        """Fill the hole of ``image`` with the network's prediction, at any image size.

        The image is mean-filled, resized to ``size``² (area averaging when shrinking, bilinear
        when a side grows; the aspect ratio is not kept), run through the network, and the
        prediction is resized back bilinearly and pasted into the hole. Known pixels are returned
        bit for bit. A low-resolution pixel counts as hole if any of it is hole.

        Args:
            image: (3, H, W) or (B, 3, H, W) float RGB in [0, 1].
            mask: bool (H, W) or (B, H, W), True = hole; (H, W) applies to every batch item.
            size: working resolution, a multiple of :attr:`stride`.

        Returns:
            a tensor shaped, typed and placed like ``image``.
        """
        if not isinstance(size, int) or isinstance(size, bool) or size < self.stride or size % self.stride:
            raise ValueError(f"size: expected a positive multiple of {self.stride}, got {size!r}")
        batch, masks = _check_image_mask(image, mask)
        param = next(self.parameters())
        x = batch.to(device=param.device, dtype=torch.float32)
        m = masks.to(param.device)
        mean = _known_mean(x, m)
        small = resize_image(torch.where(m[:, None], mean, x), (size, size))
        small_mask = shrink_mask(m, (size, size))
        was_training = self.training
        self.eval()
        try:
            pred = self(content_input(small, small_mask, mean=mean))
        finally:
            self.train(was_training)
        pred = F.interpolate(pred, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out = torch.where(masks[:, None], pred.to(device=image.device, dtype=image.dtype), batch)
        return out[0] if image.dim() == 3 else out


def _check_image_mask(image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 3, H, W) image and (B, H, W) bool mask views of the public shapes."""
    if not isinstance(image, Tensor) or not image.is_floating_point():
        raise TypeError(f"image: expected a float tensor, got {getattr(image, 'dtype', type(image).__name__)}")
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image: expected shape (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor (True = hole), got {getattr(mask, 'dtype', type(mask).__name__)}")
    batch = image if image.dim() == 4 else image[None]
    b, _, h, w = batch.shape
    if mask.dim() == 2 and tuple(mask.shape) == (h, w):
        masks = mask[None].expand(b, h, w)
    elif mask.dim() == 3 and tuple(mask.shape) == (b, h, w) and image.dim() == 4:
        masks = mask
    else:
        want = f"({h}, {w})" + (f" or ({b}, {h}, {w})" if image.dim() == 4 else "")
        raise ValueError(f"mask: expected shape {want} to match image {tuple(image.shape)}, got {tuple(mask.shape)}")
    return batch, masks.to(image.device)


def _known_mean(image: Tensor, mask: Tensor) -> Tensor:
    """(B, 3, 1, 1) mean colour of the known pixels; 0.5 grey where every pixel is hole."""
    known = (~mask)[:, None].to(image.dtype)
    count = known.sum(dim=(2, 3), keepdim=True)
    total = (image * known).sum(dim=(2, 3), keepdim=True)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, 0.5))


def push_pull_fill(image: Tensor, mask: Tensor, sharpness: float = PUSH_PULL_SHARPNESS, smoothing: int = PULL_SMOOTHING) -> Tensor:
    """Smooth interpolation of the known pixels into the hole (push-pull, Gortler et al. 1996).

    Push: mask-weighted 2x2 averages down to 1x1. Pull: from the top, each level's colour is its
    known average blended over the upsampled coarser fill with weight
    ``alpha = min(1, sharpness * known fraction)``, then ``smoothing`` Jacobi sweeps (3x3 means)
    relax the cells with ``alpha < 1``, so that no block edges of the coarser levels remain.
    Known pixels keep their value exactly; with no known pixel the fill is 0.5 grey.

    Args:
        image: (B, 3, H, W) float (hole values ignored).
        mask: bool (B, H, W), True = hole.

    Returns:
        (B, 3, H, W), same dtype.
    """
    known = (~mask)[:, None].to(image.dtype)
    levels = [(image * known, known)]
    while levels[-1][0].shape[-2] > 1 or levels[-1][0].shape[-1] > 1:
        total, weight = levels[-1]
        levels.append((F.avg_pool2d(total, 2, ceil_mode=True), F.avg_pool2d(weight, 2, ceil_mode=True)))
    total, weight = levels.pop()
    fill = torch.where(weight > 0, total / weight.clamp_min(1e-8), torch.full_like(total, 0.5))
    for total, weight in reversed(levels):
        coarse = F.interpolate(fill, size=total.shape[-2:], mode="bilinear", align_corners=False)
        alpha = (weight * sharpness).clamp(max=1.0)
        own = alpha * (total / weight.clamp_min(1e-8))
        fill = own + (1 - alpha) * coarse
        free = alpha < 1
        for _ in range(smoothing):
            mean = F.avg_pool2d(F.pad(fill, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
            fill = torch.where(free, own + (1 - alpha) * mean, fill)
    return fill


def onion_peel_fill(image: Tensor, mask: Tensor, iterations: int = ONION_ITERATIONS) -> tuple[Tensor, Tensor]:
    """Fill ``iterations`` one-pixel layers of the hole from its boundary inward, each newly
    reached pixel taking the mean of its known or already filled 3x3 neighbours.

    A fixed number of layers keeps the cost bounded and the forward pass free of host syncs.

    Args:
        image: (B, 3, H, W) float (hole values ignored).
        mask: bool (B, H, W), True = hole.

    Returns:
        fill: (B, 3, H, W), zero where not reached.
        depth: (B, 1, H, W) float: 0 on known pixels, ``t`` on pixels filled by layer ``t``
        (1 to ``iterations``), ``iterations + 1`` where not reached.
    """
    known = (~mask)[:, None].to(image.dtype)
    fill = image * known
    depth = torch.where(known > 0, 0.0, float(iterations + 1)).to(image.dtype)
    for layer in range(1, iterations + 1):
        # box sums of colour and of knownness (both scaled by 1/9, which cancels)
        sums = F.avg_pool2d(torch.cat([fill, known], dim=1), 3, stride=1, padding=1)
        new = (sums[:, 3:] > 0) & (known == 0)
        fill = torch.where(new, sums[:, :3] / sums[:, 3:].clamp_min(1e-12), fill)
        known = torch.where(new, torch.ones_like(known), known)
        depth = torch.where(new, float(layer), depth)
    return fill, depth


def peel_fill(image: Tensor, mask: Tensor, layers: int, smooth: Tensor | None = None) -> Tensor:
    """Onion peeling (:func:`onion_peel_fill`) over ``layers`` layers, the hole pixels it does not
    reach taken from ``smooth`` (default: :func:`push_pull_fill`). A Telea-like fill in torch: it
    continues the boundary colours inward (as OpenCV's Telea inpainting does) where push-pull
    blurs them. ``ContentNetConfig.peel`` uses it as a second base next to the prior.

    Returns:
        (B, 3, H, W): known pixels unchanged (bit for bit), the hole filled.
    """
    band, depth = onion_peel_fill(image, mask, layers)
    if smooth is None:
        smooth = push_pull_fill(image, mask)
    return torch.where(mask[:, None], torch.where(depth > layers, smooth, band), image)


def residual_bases(image: Tensor, mask: Tensor, config: ContentNetConfig, smooth: Tensor | None = None) -> dict[str, Tensor]:
    """The fills a network of ``config`` mixes with its prior, by name, in the order of
    :attr:`ContentNetConfig.base_names` (that of their input channels and mix logits).

    Args:
        image: (B, 3, H, W) float (hole values ignored). mask: bool (B, H, W), True = hole.
        smooth: :func:`push_pull_fill` of the same image and mask, if already computed.
    """
    bases = {"peel": peel_fill(image, mask, config.peel, smooth=smooth)} if config.peel else {}
    bases.update((f"patchmatch{radius}", patchmatch_base(image, mask, radius)) for radius in config.patchmatch)
    assert tuple(bases) == config.base_names
    return bases


def patchmatch_base(image: Tensor, mask: Tensor, radius: int, blur: float = PATCHMATCH_BLUR) -> Tensor:
    """PatchMatch inpainting (the ``pypatchmatch`` package, patch radius ``radius``) of each
    image, blurred in the hole by a Gaussian of ``blur`` pixels: its copied patches keep their
    layout and lose the seams between them. ``ContentNetConfig.patchmatch`` uses it as a base.

    Args:
        image: (B, 3, H, W) float in [0, 1] (hole values ignored).
        mask: bool (B, H, W), True = hole.

    Returns:
        (B, 3, H, W): known pixels unchanged (bit for bit), the hole filled.
    """
    from neuralpatch.synthesis import gaussian_blur, patchmatch_fill

    filled = torch.stack([patchmatch_fill(item, hole, radius) for item, hole in zip(image, mask)]).to(image.dtype)
    if blur > 0:
        filled = gaussian_blur(filled, blur)
    return torch.where(mask[:, None], filled, image)


def prior_fill(image: Tensor, mask: Tensor, prior: str = "blend", smooth: Tensor | None = None) -> Tensor:
    """The parameter-free fill a :class:`ContentNet` refines (``ContentNetConfig.prior``).

    - ``"push_pull"``: :func:`push_pull_fill`.
    - ``"blend"``: :func:`push_pull_fill` with :func:`onion_peel_fill` mixed in along the
      hole's boundary, with weight :data:`ONION_WEIGHT` on the first layer falling linearly to
      0 past the last. Push-pull is smooth but smears the colours at the boundary; onion peeling
      continues them but streaks further in.

    Args:
        image: (B, 3, H, W) float (hole values ignored).
        mask: bool (B, H, W), True = hole.

        smooth: :func:`push_pull_fill` of the same image and mask, if already computed.

    Returns:
        (B, 3, H, W): known pixels unchanged (bit for bit), the hole filled.
    """
    if prior not in PRIORS or prior == "none":
        raise ValueError(f"prior: expected one of {[p for p in PRIORS if p != 'none']}, got {prior!r}")
    if smooth is None:
        smooth = push_pull_fill(image, mask)
    if prior == "push_pull":
        return smooth
    return onion_mix(image, mask, smooth, ONION_ITERATIONS, ONION_WEIGHT)


def onion_mix(image: Tensor, mask: Tensor, fill: Tensor, layers: int, weight: float = 1.0) -> Tensor:
    """``fill`` with onion peeling (:func:`onion_peel_fill`) mixed in along the hole's boundary:
    weight ``weight`` on the first layer, falling linearly to 0 past the last of ``layers``.
    The "blend" prior mixes it into push-pull; :attr:`neuralpatch.InpaintConfig.edge_blend`
    into the texture stage's result.

    Args:
        image: (B, 3, H, W) float (hole values ignored). mask: bool (B, H, W), True = hole.
        fill: (B, 3, H, W), the fill in the hole.

    Returns:
        (B, 3, H, W): known pixels from ``image``, the hole from the mix.
    """
    band, depth = onion_peel_fill(image, mask, layers)
    share = weight * ((layers + 1 - depth) / layers).clamp(0.0, 1.0)
    return torch.where(mask[:, None], share * band + (1 - share) * fill, image)


def mean_fill(image: Tensor, mask: Tensor) -> Tensor:
    """The mean-colour baseline: every hole pixel set to the image's known-pixel mean colour.

    Args:
        image: (B, 3, H, W) float.
        mask: bool (B, H, W), True = hole.
    """
    return torch.where(mask[:, None], _known_mean(image, mask), image)


def content_input(image: Tensor, mask: Tensor, mean: Tensor | None = None) -> Tensor:
    """The network's 4-channel input.

    Args:
        image: (B, 3, H, W) float RGB in [0, 1] (what lies in the hole is ignored).
        mask: bool (B, H, W), True = hole.
        mean: optional (B, 3, 1, 1) fill colour; default: the known-pixel mean of ``image``.

    Returns:
        (B, 4, H, W): RGB with the hole filled by ``mean``, then the mask as 0/1.
    """
    fill = _known_mean(image, mask) if mean is None else mean.to(image.dtype)
    rgb = torch.where(mask[:, None], fill, image)
    return torch.cat([rgb, mask[:, None].to(image.dtype)], dim=1)


def predict(image: Tensor, mask: Tensor, net: ContentNet | None = None, size: int = CONTENT_SIZE) -> Tensor:
    """:meth:`ContentNet.predict` with ``net``, or with the shipped weights (read on every call
    when ``net`` is None; keep a :func:`load_content_net` result to fill many images)."""
    if net is None:
        net = load_content_net(device=image.device if isinstance(image, Tensor) else "cpu")
    return net.predict(image, mask, size=size)


# ---------------------------------------------------------------------------------------------
# Weights files


def save_content_net(
    net: ContentNet,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``net``'s weights as safetensors, atomically, with its config and ``metadata``
    (strings) in the file's metadata. ``dtype=torch.float16`` halves the file; loading converts
    back to float32."""
    path = Path(path)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in net.state_dict().items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=WEIGHTS_FORMAT, config=net.config.to_json())
    write_safetensors_atomic(path, state, meta)
    return path


def read_content_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (never read any other way).

    Raises:
        ContentWeightsNotFoundError: no such file.
        CheckpointError: not a readable safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ContentWeightsNotFoundError(f"content network: {path} is not a file.\n{HOW_TO_CREATE}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({err}); content network weights are read with safetensors only"
        ) from err
    return tensors, metadata


def check_state_dict(net: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has exactly ``net``'s keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, expected[k], tuple(state[k].shape)) for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, missing, unexpected, mismatched)


def content_state_from_file(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], what: str
) -> tuple[ContentNetConfig, dict[str, Tensor]]:
    """The config and generator state dict held by a weights file or a training checkpoint.
    A file without a ``config`` entry in its metadata is taken to hold the default config."""
    if metadata.get("format") == CHECKPOINT_FORMAT:
        n = len(CHECKPOINT_GENERATOR_PREFIX)
        tensors = {k[n:]: v for k, v in tensors.items() if k.startswith(CHECKPOINT_GENERATOR_PREFIX)}
    config = ContentNetConfig()
    if "config" in metadata:
        try:
            config = ContentNetConfig.from_json(metadata["config"])
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{what}: invalid content network config in the metadata ({err})") from err
    return config, dict(tensors)


def load_content_net(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> ContentNet:
    """The content network with trained weights, in eval mode with frozen parameters.

    Args:
        path: a safetensors file written by ``neuralpatch train-content`` (its ``--out`` file or
            one of its checkpoints). Default: the shipped weights, :data:`SHIPPED_WEIGHTS`.
        device: where the module is put.

    Raises:
        ContentWeightsNotFoundError: the file does not exist (a FileNotFoundError; the message
            gives the commands that create it).
        CheckpointError: not a safetensors file, or an invalid config in its metadata.
        CheckpointMismatchError: the tensors do not match the network; the message lists the
            missing and unexpected keys and the shape mismatches.
    """
    if path is None:
        if not SHIPPED_WEIGHTS.is_file():
            raise ContentWeightsNotFoundError(f"content network: the shipped weights {SHIPPED_WEIGHTS} do not exist.\n{HOW_TO_CREATE}")
        path = SHIPPED_WEIGHTS
    tensors, metadata = read_content_weights(path)
    config, state = content_state_from_file(tensors, metadata, str(path))
    net = ContentNet(config)
    check_state_dict(net, state, str(path))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.requires_grad_(False)
    return net.eval().to(device)
