"""NeuralPatchLoss: the drop-in module against the op it is built from."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neuralpatch.loss as loss_module
from neuralpatch import NeuralPatchLoss, patch_loss, patch_nn


class TinyFeatures(nn.Module):
    """Two fixed conv taps at strides 2 and 4: a stand-in for VGG that runs in milliseconds."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
                conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, x):
        a = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        b = F.avg_pool2d(F.relu(self.conv2(a)), 2)
        return {"relu3_1": a, "relu4_1": b}


def hole_case(size=32):
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, size, size, generator=gen)
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[size // 4 : size // 2, size // 3 : 2 * size // 3] = True
    return image, mask


def make_loss(**kwargs):
    kwargs.setdefault("backend", "torch")
    kwargs.setdefault("precision", "fp32")
    return NeuralPatchLoss(feature_net=TinyFeatures(), **kwargs)


def test_inpainting_loss_equals_the_op_by_hand():
    image, mask = hole_case()
    criterion = make_loss(layer_weights={"relu3_1": 2.0, "relu4_1": 0.5})
    got = criterion(image, mask)
    feats = criterion.feature_net(image)
    expected = 0.0
    for name, weight in (("relu3_1", 2.0), ("relu4_1", 0.5)):
        f = feats[name]
        hole = F.adaptive_max_pool2d(mask[None, None].float(), f.shape[-2:])[0] > 0
        keys = ~(F.max_pool2d(hole[None].float(), 3, 1, 1)[0] > 0)
        keys[..., :1, :] = keys[..., -1:, :] = keys[..., :, :1] = keys[..., :, -1:] = False
        index, _ = patch_nn(f, f, hole, keys, 3, "fp32", "torch")
        # per element, relative to the mean square of the key features
        energy = f[:, :, keys[0]].square().mean()
        expected = expected + weight * patch_loss(f, f, hole, index, 3, "torch") / (f.shape[1] * 9 * energy)
    torch.testing.assert_close(got, expected)
    raw = make_loss(layer_weights={"relu3_1": 2.0, "relu4_1": 0.5}, normalize=False)(image, mask)
    assert raw.item() > 10 * got.item()  # the normalisation is not the identity on these features


def test_gradient_reaches_the_image():
    image, mask = hole_case(64)
    image.requires_grad_()
    make_loss()(image, mask).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    # known pixels far from the hole feel nothing: the keys are detached
    assert image.grad[..., :2, :2].abs().sum() == 0


def test_nn_every_reuses_indices(monkeypatch):
    calls = []
    real = loss_module.patch_nn
    monkeypatch.setattr(loss_module, "patch_nn", lambda *a, **k: calls.append(1) or real(*a, **k))
    image, mask = hole_case()
    criterion = make_loss(nn_every=3)
    for _ in range(7):
        criterion(image, mask)
    assert len(calls) == 2 * 3  # calls 0, 3 and 6 search, for each of the two layers
    criterion.reset()
    criterion(image, mask)
    assert len(calls) == 2 * 4


def test_nn_every_searches_again_when_the_mask_changes():
    image, mask = hole_case()
    criterion = make_loss(nn_every=100)
    criterion(image, mask)
    other = torch.zeros_like(mask)
    other[2:6, 2:6] = True
    got = criterion(image, other)
    torch.testing.assert_close(got, make_loss()(image, other))


def test_nn_every_searches_again_when_the_exemplars_or_their_masks_change():
    gen = torch.Generator().manual_seed(5)
    image, first, second = (torch.rand(3, 32, 32, generator=gen) for _ in range(3))
    allowed = torch.zeros(32, 32, dtype=torch.bool)
    allowed[:, :16] = True
    criterion = make_loss(nn_every=100)
    criterion(image, exemplars=[first])
    # a new exemplar of the same size: the old indices would point at the old texture
    torch.testing.assert_close(criterion(image, exemplars=[second]), make_loss()(image, exemplars=[second]))
    # a new exemplar mask: the old indices may point at keys that are now forbidden
    torch.testing.assert_close(
        criterion(image, exemplars=[second], exemplar_masks=[allowed]),
        make_loss()(image, exemplars=[second], exemplar_masks=[allowed]),
    )


def test_synthesis_of_the_exemplar_itself_is_free():
    gen = torch.Generator().manual_seed(2)
    exemplar = torch.rand(3, 32, 32, generator=gen)
    # interior queries only: there every patch finds itself (NCC 1)
    inner = torch.zeros(32, 32, dtype=torch.bool)
    inner[8:24, 8:24] = True
    value = make_loss()(exemplar, inner, exemplars=[exemplar])
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert make_loss()(torch.rand(3, 32, 32, generator=gen), inner, exemplars=[exemplar]).item() > 1e-3


def test_exemplar_masks_restrict_the_keys(monkeypatch):
    seen = {}
    real = loss_module.patch_nn

    def spy(query, key, query_mask, key_mask, *args):
        seen.setdefault("key_mask", key_mask)
        seen.setdefault("index", real(query, key, query_mask, key_mask, *args)[0])
        return real(query, key, query_mask, key_mask, *args)

    monkeypatch.setattr(loss_module, "patch_nn", spy)
    gen = torch.Generator().manual_seed(3)
    first, second = torch.rand(3, 32, 24, generator=gen), torch.rand(3, 24, 32, generator=gen)
    usable = torch.zeros(32, 24, dtype=torch.bool)
    usable[:, :12] = True  # only the left half of the first exemplar
    make_loss()(torch.rand(3, 32, 32, generator=gen), exemplars=[first, second], exemplar_masks=[usable, None])
    key_mask = seen["key_mask"][0]  # relu3_1: exemplars side by side at 16x12 and 12x16, 3 columns apart
    assert key_mask.shape == (16, 12 + 3 + 16 + 3)
    assert not key_mask[:, 6:15].any(), "keys in the masked half or in the gap"
    assert key_mask[:, :6].any() and key_mask[:, 15:].any()
    index = seen["index"]
    assert bool(key_mask.reshape(-1)[index].all())


def test_bad_arguments():
    image, mask = hole_case()
    with pytest.raises(ValueError, match="mask"):
        make_loss()(image)
    with pytest.raises(ValueError, match="image"):
        make_loss()(image[:, :2], mask)
    with pytest.raises(ValueError, match="mask"):
        make_loss()(image, mask[:-1])
    with pytest.raises(ValueError, match="exemplar_masks"):
        make_loss()(image, exemplars=[image[0]], exemplar_masks=[None, None])
    with pytest.raises(ValueError, match="exemplars"):
        make_loss()(image, exemplars=[])
    with pytest.raises(ValueError, match="layer_weights"):
        make_loss(layer_weights=[1.0])
    with pytest.raises(ValueError, match="nn_every"):
        make_loss(nn_every=0)


def test_bf16_autocast_on_cpu():
    image, mask = hole_case()
    reference = make_loss()(image, mask)
    x = image.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = make_loss(precision="bf16")(x, mask)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert value.item() == pytest.approx(reference.item(), rel=0.15)  # bf16 convs move the features


def test_torch_compile_matches_eager():
    image, mask = hole_case()
    x_eager = image.clone().requires_grad_()
    eager = make_loss()(x_eager, mask)
    eager.backward()
    compiled = torch.compile(make_loss())
    x_compiled = image.clone().requires_grad_()
    value = compiled(x_compiled, mask)
    value.backward()
    torch.testing.assert_close(value, eager)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def test_default_feature_net_is_vgg():
    criterion = NeuralPatchLoss(weights="random", backend="torch")
    image, mask = hole_case(48)
    value = criterion(image, mask)
    assert value.item() > 0
    assert criterion.feature_net.receptive_field("relu4_1").margin > 0


def test_patchmatch_search_warm_starts_from_the_last_field(monkeypatch):
    calls = []
    real = loss_module.patch_nn

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_module, "patch_nn", spy)
    image, mask = hole_case()
    criterion = make_loss(search="patchmatch", search_iterations=2, seed=7)
    first = criterion(image, mask)
    assert [c["method"] for c in calls] == ["patchmatch"] * 2 and all(c["init"] is None for c in calls)
    second = criterion(image, mask)
    assert all(c["init"] is not None for c in calls[2:]), "the second search starts from the first field"
    assert calls[2]["seed"] != calls[0]["seed"]  # each search draws afresh
    assert second.item() <= first.item() + 1e-6  # a warm start never loses a better match
    # enough sweeps on this small problem come within a hair of the exact search's loss
    approximate = make_loss(search="patchmatch", search_iterations=32)(image, mask)
    assert approximate.item() == pytest.approx(make_loss()(image, mask).item(), rel=0.02)


def test_auto_search_switches_to_patchmatch_past_the_threshold(monkeypatch):
    methods = []
    real = loss_module.patch_nn
    monkeypatch.setattr(loss_module, "patch_nn", lambda *a, **k: methods.append(k.get("method", "exact")) or real(*a, **k))
    image, mask = hole_case()
    make_loss(search="auto")(image, mask)
    assert methods == ["exact", "exact"]  # a small problem stays exact
    methods.clear()
    monkeypatch.setattr(loss_module, "PATCHMATCH_MIN_PAIRS", 1000)
    make_loss(search="auto")(image, mask)
    # relu3_1: 8x11 = 88 queries x ~130 keys passes 1000 pairs; relu4_1 (4x6 queries, few keys) may not
    assert methods[0] == "patchmatch"


def test_search_options_are_checked():
    with pytest.raises(ValueError, match="search"):
        make_loss(search="faiss")
    with pytest.raises(ValueError, match="search_iterations"):
        make_loss(search_iterations=-1)
    with pytest.raises(ValueError, match="seed"):
        make_loss(seed=2**32)


def test_the_loss_geometry_is_built_once_per_search(monkeypatch):
    """Evaluations between two searches, forward and backward, reuse one validated geometry per
    layer: its host syncs happen once per search, not once per evaluation."""
    import neuralpatch.ops as ops

    builds = []
    real = ops._build_loss_geometry
    monkeypatch.setattr(ops, "_build_loss_geometry", lambda *a: builds.append(1) or real(*a))
    image, mask = hole_case()
    criterion = make_loss(nn_every=None)
    for _ in range(4):
        x = image.clone().requires_grad_()
        criterion(x, mask).backward()
    assert len(builds) == 2  # one per layer
    criterion.reset()
    criterion(image, mask)
    assert len(builds) == 4  # a new search, new indices: built again
