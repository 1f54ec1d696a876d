"""VGG-16 and VGG-19 feature extractors (the texture network), defined here without torchvision.

``features`` is an ``nn.Sequential`` indexed exactly as torchvision's ``vgg16().features`` /
``vgg19().features``, so a torchvision state dict (``features.N.weight``) loads as is:

======== ============================ ============================
tap      VGG-16 index                 VGG-19 index
======== ============================ ============================
relu1_1  features[1]                  features[1]
relu2_1  features[6]                  features[6]
relu3_1  features[11]                 features[11]
relu4_1  features[18]                 features[20]
relu5_1  features[25]                 features[29]
======== ============================ ============================

Every conv, relu and pool has a name (``conv3_1``, ``relu3_1``, ``pool3``; see :func:`layer_names`).
:class:`VGGFeatures` takes RGB in [0, 1], applies the input normalisation of its weight source
itself, and runs only the layers up to the deepest requested tap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Conv widths per block; "M" is a 2x2/2 max-pool (torchvision's configs "D" and "E").
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


@dataclass(frozen=True)
class InputNormalization:
    """Maps RGB in [0, 1] to what a set of weights was trained on:
    ``((rgb or bgr) * scale - mean) / std``, with ``mean`` and ``std`` in the channel order used."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0
    bgr: bool = False


# torchvision ImageNet models: RGB in [0, 1], per-channel standardisation.
IMAGENET = InputNormalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# Caffe VGG / HED: BGR in [0, 255] minus the Caffe ImageNet mean (B, G, R) ~ (104.007, 116.669, 122.679).
CAFFE_BGR = InputNormalization(mean=(104.00698793, 116.66876762, 122.67891434), scale=255.0, bgr=True)


def _check_arch(arch: str) -> tuple[int | str, ...]:
    if arch not in VGG_CONFIGS:
        raise ValueError(f"arch: expected one of {sorted(VGG_CONFIGS)}, got {arch!r}")
    return VGG_CONFIGS[arch]


def make_vgg_features(arch: str = "vgg19", ceil_mode: bool = False) -> nn.Sequential:
    """The convolutional part of VGG, with torchvision's module indexing.

    Args:
        arch: "vgg16" or "vgg19".
        ceil_mode: max-pool rounding; True reproduces Caffe (and Keras "same") pooling, which keeps
            the last row/column of an odd-sized map instead of dropping it.
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _check_arch(arch):
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode))
        else:
            layers.append(nn.Conv2d(in_channels, item, kernel_size=3, padding=1))
            layers.append(nn.ReLU(inplace=False))
            in_channels = item
    return nn.Sequential(*layers)


def layer_names(arch: str = "vgg19") -> tuple[str, ...]:
    """Name of each ``features`` index: conv{b}_{i}, relu{b}_{i}, pool{b}."""
    names = []
    block, conv = 1, 0
    for item in _check_arch(arch):
        if item == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            conv += 1
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
    return tuple(names)


def layer_index(arch: str, layer: str) -> int:
    """``features`` index of a named layer, e.g. ``layer_index("vgg16", "relu4_1") == 18``."""
    names = layer_names(arch)
    if layer not in names:
        taps = [n for n in names if n.startswith("relu")]
        raise ValueError(f"layer: {layer!r} is not a layer of {arch}; its relu taps are {taps}")
    return names.index(layer)


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one tap, in input pixels, per spatial axis.

    Feature cell ``i`` (along an axis) sees input pixels ``[i * stride + start, i * stride + start + size)``;
    ``start`` is negative because of the convs' zero padding.

    Attributes:
        size: pixels seen by one feature cell.
        stride: input pixels between neighbouring feature cells (the product of pool strides).
        start: first input pixel seen by cell 0.
    """

    size: int
    stride: int
    start: int

    @property
    def margin(self) -> int:
        """Context pixels a cell sees beyond its own ``stride``-wide block, on each side.

        A feature computed on a crop equals the one computed on the whole image when the crop
        holds the cell's block plus ``margin`` pixels all round (or reaches the image border) and
        the crop's origin is a multiple of ``stride``.
        """
        return -self.start

    def input_span(self, lo: int, hi: int) -> tuple[int, int]:
        """Input pixels ``[a, b)`` seen by feature cells ``[lo, hi)`` (may reach outside the image)."""
        return lo * self.stride + self.start, (hi - 1) * self.stride + self.start + self.size


def _receptive_field_of(modules) -> ReceptiveField:
    size, stride, start = 1, 1, 0
    for module in modules:
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p, d = (_first(getattr(module, a)) for a in ("kernel_size", "stride", "padding", "dilation"))
            size += (d * (k - 1)) * stride
            start -= p * stride
            stride *= s
    return ReceptiveField(size=size, stride=stride, start=start)


def _first(value) -> int:
    # Conv2d keeps tuples, MaxPool2d keeps ints; VGG is isotropic so one axis describes both.
    return value[0] if isinstance(value, tuple) else value


def receptive_field(layer: str, arch: str = "vgg19") -> ReceptiveField:
    """Receptive field of a named layer, computed by walking the architecture.

    E.g. relu3_1: size 24, stride 4, margin 10; relu4_1 (VGG-16): size 60, stride 8, margin 26;
    relu4_1 (VGG-19): size 68, stride 8, margin 30. Pool rounding (ceil_mode) does not change it.
    """
    index = layer_index(arch, layer)
    return _receptive_field_of(make_vgg_features(arch)[: index + 1])


class Normalize(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] -> the input a weight source expects (see :class:`InputNormalization`)."""

    def __init__(self, norm: InputNormalization):
        super().__init__()
        self.norm = norm
        # Not persistent: the module's state dict stays exactly torchvision's ``features.*`` keys.
        self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm.bgr:
            x = x.flip(1)
        if self.norm.scale != 1.0:
            x = x * self.norm.scale
        return (x - self.mean) * self.inv_std

    def extra_repr(self) -> str:
        return repr(self.norm)


class VGGFeatures(nn.Module):
    """Named relu taps of VGG-16/19 for RGB input in [0, 1].

    Args:
        arch: "vgg16" or "vgg19".
        layers: taps to return, e.g. ("relu3_1", "relu4_1"); any layer name of :func:`layer_names`.
        normalization: input normalisation of the weights that will be loaded (see
            :data:`IMAGENET`, :data:`CAFFE_BGR`).
        ceil_mode: max-pool rounding (True for Caffe/HED weights).
        requires_grad: leave the parameters trainable. Default False: frozen. Gradients still
            flow to the input image either way.
        source: name of the weight source, for display (set by :func:`neuralpatch.models.load_vgg`).

    ``forward(x)``: x (B, 3, H, W) float RGB in [0, 1] -> ``{layer: (B, C_l, H_l, W_l)}``. Only
    ``features[: deepest requested index + 1]`` run. The state dict holds exactly the
    torchvision keys ``features.N.weight`` / ``features.N.bias`` of the whole network.
    """

    def __init__(
        self,
        arch: str = "vgg19",
        layers=("relu3_1", "relu4_1"),
        normalization: InputNormalization = IMAGENET,
        ceil_mode: bool = False,
        requires_grad: bool = False,
        source: str = "unloaded",
    ):
        super().__init__()
        if isinstance(layers, str):
            layers = (layers,)
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers: expected at least one layer name")
        self.arch = arch
        self.ceil_mode = ceil_mode
        self.source = source
        self.taps = {name: layer_index(arch, name) for name in layers}
        self.layers = layers
        self.last_index = max(self.taps.values())
        self.normalize = Normalize(normalization)
        self.features = make_vgg_features(arch, ceil_mode)
        self.requires_grad_(requires_grad)
        self.eval()

    @property
    def normalization(self) -> InputNormalization:
        return self.normalize.norm

    def receptive_field(self, layer: str) -> ReceptiveField:
        """Receptive field of ``layer`` (see :class:`ReceptiveField`)."""
        return _receptive_field_of(self.features[: layer_index(self.arch, layer) + 1])

    @property
    def margin(self) -> int:
        """Largest receptive-field margin over the requested taps, in input pixels."""
        return max(self.receptive_field(name).margin for name in self.layers)

    @property
    def alignment(self) -> int:
        """Crop origins must be multiples of this (the largest stride over the taps) for the
        features of a crop to line up with those of the whole image."""
        return max(self.receptive_field(name).stride for name in self.layers)

    def output_size(self, height: int, width: int, layer: str) -> tuple[int, int]:
        """Spatial size of ``layer``'s map for an input of ``height`` x ``width`` (0 if too small)."""
        for module in self.features[: layer_index(self.arch, layer) + 1]:
            if isinstance(module, nn.MaxPool2d):
                height, width = (_pool_out(n, module.ceil_mode) for n in (height, width))
        return height, width

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected RGB of shape (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a float tensor in [0, 1], got {x.dtype}")
        deepest = max(self.taps, key=self.taps.get)
        if min(self.output_size(x.shape[-2], x.shape[-1], deepest)) < 1:
            raise ValueError(
                f"x: {x.shape[-2]}x{x.shape[-1]} is too small for {deepest} "
                f"(each side needs at least {self.receptive_field(deepest).stride} pixels)"
            )
        wanted = {index: name for name, index in self.taps.items()}
        out = {}
        h = self.normalize(x)
        for index in range(self.last_index + 1):
            h = self.features[index](h)
            if index in wanted:
                out[wanted[index]] = h
        return {name: out[name] for name in self.layers}

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, source={self.source!r}, layers={self.layers}, ceil_mode={self.ceil_mode}"


def _pool_out(n: int, ceil_mode: bool) -> int:
    # 2x2/2 max-pool without padding, as torch computes it.
    return -(-n // 2) if ceil_mode else n // 2
