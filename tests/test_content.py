"""The content network, its masks, its training command and its weight loading."""

import json

import pytest
import torch
from PIL import Image

from neuralpatch import masks as M
from neuralpatch import synthesis as S
from neuralpatch import train_content as T
from neuralpatch.models import content as C
from neuralpatch.models.weights import CheckpointError, CheckpointMismatchError


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return C.ContentNet().eval()


# ---------------------------------------------------------------------------------------------
# The network


@pytest.mark.parametrize("size", [(128, 128), (256, 256), (64, 96)])
def test_forward_shapes(net, size):
    x = torch.rand(2, 4, *size)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, *size)
    assert y.min() >= 0 and y.max() <= 1


def test_parameters_fit_the_budget(net):
    params = sum(p.numel() for p in net.parameters())
    assert params * 4 <= 20e6  # float32 file under 20 MB
    assert net.stride == 16


@pytest.mark.parametrize("shape", [(1, 4, 120, 128), (1, 4, 128, 8), (1, 3, 128, 128), (4, 128, 128)])
def test_bad_input_shape_names_the_argument(net, shape):
    with pytest.raises(ValueError, match=r"^x: "):
        net(torch.rand(shape))


def test_bad_config():
    with pytest.raises(ValueError, match="groups"):
        C.ContentNetConfig(widths=(30, 64), groups=8)
    with pytest.raises(ValueError, match="widths"):
        C.ContentNetConfig(widths=(32,))


def test_resize_upsampling_has_no_checkerboard_on_a_constant_input():
    torch.manual_seed(0)
    x = torch.full((1, 16, 8, 8), 0.7)
    with torch.no_grad():
        resized = C._ResizeUp(16, 8, 4)(x)[..., 1:-1, 1:-1]  # the zero-padded border aside
        transposed = C._Up(16, 8, 4)(x)[..., 2:-2, 2:-2]
    assert resized.shape[-1] == 14 and resized.abs().sum() > 0
    assert torch.allclose(resized, resized[..., :1, :1].expand_as(resized), atol=1e-5)
    # the transposed conv's uneven kernel overlap: a 2-pixel pattern from a constant input
    assert (transposed[..., ::2, ::2] - transposed[..., 1::2, 1::2]).abs().max() > 1e-2


def test_trained_like_network_is_smooth_on_a_smooth_input():
    """A network with random (non-zero) output weights on a smooth ramp: its prediction has no
    more energy at the 8- and 16-pixel block periods than at the neighbouring frequencies."""
    torch.manual_seed(0)
    net = C.ContentNet(C.ContentNetConfig(widths=(16, 32, 32, 64), stem=8)).eval()
    torch.nn.init.normal_(net.out.weight, std=0.3)
    ramp = torch.linspace(0, 1, 128)
    image = (0.3 + 0.4 * ramp[None, :] * ramp[:, None]).expand(1, 3, 128, 128).clone()
    mask = torch.zeros(1, 128, 128, dtype=torch.bool)
    with torch.no_grad():
        pred = net(C.content_input(image, mask))[0].mean(0)
    rows = torch.fft.rfft(pred[16:-16, 16:-16] - pred[16:-16, 16:-16].mean(dim=1, keepdim=True), dim=1).abs().mean(0)
    n = 96  # period 8 -> frequency 12, period 16 -> 6
    assert rows[n // 8] < 2 * rows[n // 8 - 2 : n // 8 + 3].median() + 1e-6
    assert rows[n // 16] < 2 * rows[n // 16 - 2 : n // 16 + 3].median() + 1e-6


def test_files_without_an_upsampling_entry_hold_the_first_network():
    cfg = C.ContentNetConfig.from_json(json.dumps({"widths": [32, 64], "dilations": [1], "groups": 8, "prior": "blend"}))
    assert cfg.upsample == "transposed" and cfg.stem == 0
    assert isinstance(C.ContentNet(cfg).head, torch.nn.ConvTranspose2d)
    with pytest.raises(ValueError, match="upsample"):
        C.ContentNetConfig(upsample="pixelshuffle")


def test_content_input_fills_the_hole_with_the_known_mean():
    image = torch.rand(1, 3, 16, 16)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 4:9, 2:12] = True
    x = C.content_input(image, mask)
    mean = image[0][:, ~mask[0]].mean(dim=1)
    assert torch.allclose(x[0, :3, 5, 5], mean, atol=1e-6)
    assert torch.equal(x[0, :3][:, ~mask[0]], image[0][:, ~mask[0]])
    assert torch.equal(x[0, 3], mask[0].float())
    # all hole: grey
    assert torch.allclose(C.content_input(image, torch.ones_like(mask))[:, :3], torch.full((1, 3, 16, 16), 0.5))


# ---------------------------------------------------------------------------------------------
# predict()


@pytest.mark.parametrize("hw", [(37, 53), (128, 128), (300, 451), (20, 30)])
def test_predict_keeps_known_pixels_bit_for_bit(net, hw):
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(3, *hw, generator=gen)
    mask = M.random_rectangles(*hw, gen)
    out = net.predict(image, mask)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.equal(out[:, ~mask], image[:, ~mask])
    assert not torch.equal(out[:, mask], image[:, mask])
    assert out.isfinite().all() and out.min() >= 0 and out.max() <= 1


def test_predict_batched_matches_single(net):
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 45, 61, generator=gen)
    masks = torch.stack([M.free_form_strokes(45, 61, gen), M.centre_square(45, 61, 0.4)])
    batched = net.predict(images, masks)
    for i in range(2):
        single = net.predict(images[i], masks[i])
        assert torch.allclose(batched[i], single, atol=1e-5)
        assert torch.equal(batched[i][:, ~masks[i]], images[i][:, ~masks[i]])
    shared = net.predict(images, masks[1])  # one (H, W) mask for the whole batch
    assert torch.allclose(shared[1], batched[1], atol=1e-5)


def test_predict_float64_and_module_function(net):
    image = torch.rand(3, 40, 40, dtype=torch.float64)
    mask = M.centre_square(40, 40)
    out = C.predict(image, mask, net=net)
    assert out.dtype == torch.float64
    assert torch.equal(out[:, ~mask], image[:, ~mask])


@pytest.mark.parametrize(
    "image,mask,error,argument",
    [
        (torch.rand(3, 32, 32), torch.ones(32, 32), TypeError, "mask"),
        (torch.rand(3, 32, 32), torch.ones(32, 31, dtype=torch.bool), ValueError, "mask"),
        (torch.rand(3, 32, 32), torch.ones(1, 32, 32, dtype=torch.bool), ValueError, "mask"),
        (torch.rand(4, 32, 32), torch.ones(32, 32, dtype=torch.bool), ValueError, "image"),
        (torch.ones(3, 32, 32, dtype=torch.uint8), torch.ones(32, 32, dtype=torch.bool), TypeError, "image"),
    ],
)
def test_predict_bad_input(net, image, mask, error, argument):
    with pytest.raises(error, match=rf"^{argument}: "):
        net.predict(image, mask)


def test_predict_bad_size(net):
    with pytest.raises(ValueError, match=r"^size: "):
        net.predict(torch.rand(3, 32, 32), M.centre_square(32, 32), size=100)


# ---------------------------------------------------------------------------------------------
# Masks


def _draw(kind, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "centre":
        return M.centre_square(h, w, 0.4)
    return {"rectangles": M.random_rectangles, "strokes": M.free_form_strokes, "random": M.random_mask}[kind](h, w, gen)


@pytest.mark.parametrize("kind", ["centre", "rectangles", "strokes", "random"])
@pytest.mark.parametrize("hw", [(128, 128), (37, 53), (8, 8), (300, 451)])
def test_masks_are_bool_nonempty_and_seeded(kind, hw):
    for seed in range(5):
        mask = _draw(kind, *hw, seed)
        assert mask.dtype == torch.bool and mask.shape == hw
        assert mask.any()
        assert torch.equal(mask, _draw(kind, *hw, seed))
    if kind != "centre":
        assert len({_draw(kind, *hw, seed).numpy().tobytes() for seed in range(5)}) > 1


def test_centre_square_geometry():
    mask = M.centre_square(128, 128, 0.5)
    assert mask.sum() == 64 * 64 and mask[32:96, 32:96].all()


def test_random_mask_mixes_all_kinds():
    gen = torch.Generator().manual_seed(0)
    draws = [M.random_mask(64, 64, gen) for _ in range(40)]
    centred = sum(bool(d[16:48, 16:48].all() and d.sum() == d[16:48, 16:48].sum()) or _is_centre(d) for d in draws)
    assert 0 < centred < 40


def test_random_mask_draws_from_the_given_mix():
    gen = torch.Generator().manual_seed(1)
    assert all(_is_centre(M.random_mask(64, 64, gen, (("centre", 1.0),))) for _ in range(10))
    assert not any(_is_centre(M.random_mask(64, 64, gen, (("strokes", 3.0), ("centre", 0.0)))) for _ in range(10))
    assert M.check_mask_mix((("centre", 2), ("strokes", 6))) == (("centre", 0.25), ("strokes", 0.75))


@pytest.mark.parametrize(
    "mix",
    [
        (),
        (("circles", 1.0),),
        (("centre", 1.0), ("centre", 1.0)),
        (("centre", -1.0), ("strokes", 2.0)),
        (("centre", float("nan")),),
        (("centre", 0.0),),
    ],
)
def test_bad_mask_mix_is_refused(mix):
    with pytest.raises(ValueError, match=r"^mix: "):
        M.random_mask(8, 8, torch.Generator().manual_seed(0), mix)


def _is_centre(mask):
    ys, xs = mask.nonzero(as_tuple=True)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    centre = abs((ys.min() + ys.max()) / 2 - 31.5) <= 1 and abs((xs.min() + xs.max()) / 2 - 31.5) <= 1
    return bool(box == mask.sum() and centre)


@pytest.mark.parametrize(
    "call,error,argument",
    [
        (lambda g: M.centre_square(0, 8), ValueError, "h"),
        (lambda g: M.centre_square(8, 8, 0.0), ValueError, "frac"),
        (lambda g: M.random_rectangles(8, -1, g), ValueError, "w"),
        (lambda g: M.random_rectangles(8, 8, 0), TypeError, "generator"),
        (lambda g: M.random_rectangles(8, 8, g, size_frac=(0.5, 0.1)), ValueError, "size_frac"),
        (lambda g: M.free_form_strokes(8, 8, g, strokes=(0, 2)), ValueError, "strokes"),
        (lambda g: M.random_mask(8.0, 8, g), TypeError, "h"),
    ],
)
def test_mask_bad_arguments(call, error, argument):
    with pytest.raises(error, match=rf"^{argument}: "):
        call(torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def photo_dirs(tmp_path_factory):
    data = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("photos")
    train, val = root / "train", root / "val"
    train.mkdir()
    (val / "nested").mkdir(parents=True)
    for name, folder in (("astronaut", train), ("rocket", train), ("hubble_deep_field", train), ("coffee", val / "nested")):
        im = Image.fromarray(getattr(data, name)())
        im.thumbnail((96, 96))
        im.save(folder / f"{name}.png")
    Image.fromarray(data.camera()).resize((80, 64)).save(train / "camera_grey.jpg")  # converted to RGB
    (train / "broken.png").write_bytes(b"this is not a png")
    (train / "notes.txt").write_text("not an image, ignored")
    return train, val


def _train(tmp_path, photo_dirs, *extra, out="w.safetensors"):
    train, val = photo_dirs
    argv = ["--images", str(train), "--val-images", str(val), "--out", str(tmp_path / out), "--size", "32"]
    argv += ["--batch-size", "2", "--steps-per-epoch", "2", "--val-masks", "2", "--seed", "3", *extra]
    with pytest.warns(UserWarning, match="broken.png"):
        return T.main(argv)


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_train_resume_and_determinism(tmp_path, photo_dirs, capsys):
    assert _train(tmp_path, photo_dirs, "--epochs", "1", "--adv-weight", "0.001") == 0
    printed = capsys.readouterr().out
    assert "mean fill L1" in printed and "content net L1" in printed
    assert "| fill | centre L1 | centre PSNR | free-form L1 | free-form PSNR |" in printed  # the final table
    ckpt = tmp_path / "w.ckpt.safetensors"
    meta, tensors = _meta(ckpt)
    assert (meta["epoch"], meta["step"]) == ("1", "2")
    assert any(k.startswith("opt_g.state.") for k in tensors) and any(k.startswith("discriminator.") for k in tensors)
    assert isinstance(C.load_content_net(tmp_path / "w.safetensors"), C.ContentNet)
    assert isinstance(C.load_content_net(ckpt), C.ContentNet)  # checkpoints load too

    assert _train(tmp_path, photo_dirs, "--epochs", "2", "--adv-weight", "0.001", "--resume", str(ckpt)) == 0
    meta, _ = _meta(ckpt)
    assert (meta["epoch"], meta["step"]) == ("2", "4")
    out_meta, resumed = _meta(tmp_path / "w.safetensors")
    assert out_meta["step"] == "4" and "val_mean_fill_l1" in out_meta and "val_content_net_free_form_l1" in out_meta
    assert not any(k.startswith(("opt_", "discriminator.")) for k in resumed)

    # the same two epochs in one go: bit-identical weights (determinism, exact resume)
    assert _train(tmp_path, photo_dirs, "--epochs", "2", "--adv-weight", "0.001", out="straight.safetensors") == 0
    _, straight = _meta(tmp_path / "straight.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_train_without_adversarial_or_validation(tmp_path, photo_dirs):
    train, _ = photo_dirs
    argv = ["--images", str(train), "--out", str(tmp_path / "w.safetensors"), "--size", "16", "--batch-size", "2"]
    argv += ["--steps-per-epoch", "1", "--epochs", "1", "--adv-weight", "0"]
    with pytest.warns(UserWarning):
        assert T.main(argv) == 0
    _, tensors = _meta(tmp_path / "w.ckpt.safetensors")
    assert not any(k.startswith("discriminator.") for k in tensors)


def test_train_ema_writes_and_resumes_the_moving_average(tmp_path, photo_dirs):
    one_step = ("--steps-per-epoch", "1", "--ema", "0.25")
    assert _train(tmp_path, photo_dirs, "--epochs", "1", *one_step) == 0
    ckpt = tmp_path / "w.ckpt.safetensors"

    def split(tensors):
        raw = {k.removeprefix("generator."): v for k, v in tensors.items() if k.startswith("generator.")}
        ema = {k.removeprefix("ema.module."): v for k, v in tensors.items() if k.startswith("ema.module.")}
        return raw, ema

    raw1, ema1 = split(_meta(ckpt)[1])
    assert raw1 and raw1.keys() == ema1.keys()
    assert all(torch.equal(raw1[k], ema1[k]) for k in raw1)  # the first update copies the weights

    assert _train(tmp_path, photo_dirs, "--epochs", "2", *one_step, "--resume", str(ckpt)) == 0
    raw2, ema2 = split(_meta(ckpt)[1])
    meta, written = _meta(tmp_path / "w.safetensors")
    assert written.keys() == raw2.keys() and '"ema": 0.25' in meta["settings"]
    # decay 0.25: the written weights are 0.25 x step 1's + 0.75 x step 2's, not the raw step-2 weights
    for key in raw2:
        assert torch.allclose(written[key], 0.25 * raw1[key] + 0.75 * raw2[key], atol=1e-6), key
        assert torch.equal(written[key], ema2[key])
    assert any(not torch.equal(written[k], raw2[k]) for k in raw2)


def _args(*argv):
    import argparse

    return T.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_train_bad_input(tmp_path, photo_dirs, capsys):
    out = str(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="--images: .*does not exist"):
        T.run(_args("--images", str(tmp_path / "nowhere"), "--out", out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--images: no image files"):
        T.run(_args("--images", str(tmp_path / "empty"), "--out", out))
    with pytest.raises(ValueError, match="--images"):
        T.run(_args("--out", out))
    train, _ = photo_dirs
    with pytest.raises(ValueError, match="--size"):
        T.run(_args("--images", str(train), "--out", out, "--size", "40"))
    with pytest.raises(ValueError, match="--amp"):
        T.run(_args("--images", str(train), "--out", out, "--device", "cpu", "--amp", "bf16"))
    weights = tmp_path / "plain.safetensors"
    C.save_content_net(C.ContentNet(), weights)
    with pytest.raises(ValueError, match="--resume: .*not a train-content checkpoint"):
        T.run(_args("--images", str(train), "--out", out, "--resume", str(weights)))
    assert T.main(["--images", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    for decay in ("1", "-0.5"):
        with pytest.raises(ValueError, match="--ema"):
            T.run(_args("--images", str(train), "--out", out, "--ema", decay))
    for mix in ("centre", "centre=1,ovals=1", "centre=-1"):
        with pytest.raises(ValueError, match="--mask-mix"):
            T.run(_args("--images", str(train), "--out", out, "--mask-mix", mix))


def test_evaluate_mode(tmp_path, photo_dirs, capsys):
    _, val = photo_dirs
    weights = C.save_content_net(C.ContentNet(), tmp_path / "w.safetensors")
    sheet = tmp_path / "sheet.png"
    argv = ["--evaluate", str(weights), "--val-images", str(val), "--size", "32", "--val-masks", "3", "--sheet", str(sheet)]
    assert T.main([*argv, "--compare", str(weights)]) == 0
    printed = capsys.readouterr().out
    assert "content net" in printed and "mean fill" in printed and "compared [centre]" in printed
    # one photo: centre and free-form, each input + prior, telea?, compared, network; then the photo
    columns = 2 * (2 + 1 + ("telea [centre]" in printed) + 1) + 1
    assert Image.open(sheet).size == (32 * columns, 14 + 32)


def test_validation_set_is_fixed():
    photos = [torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    a, b = T.validation_set(photos, 32, 3), T.validation_set(photos, 32, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (6, 3, 32, 32) and a[1].shape == (6, 32, 32)
    assert a[2] == ["centre", "free-form", "free-form"] * 2
    assert torch.equal(a[1][0], M.centre_square(32, 32, 0.5))
    l1, psnr = T.hole_metrics(a[0], a[0], a[1])
    assert l1 == 0 and psnr == pytest.approx(100.0)


COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: someone
License: GPL-2+

Files: pics/*
Copyright: a photographer
License: CC-BY-4.0

Files: pics/sa_*
Copyright: another one
License: CC-BY-SA-4.0
"""


@pytest.fixture
def fake_debian(tmp_path):
    """A dpkg info folder and doc folder for one fake package "photos-pkg" with four photos in
    /<tmp>/share/pics: a, its near-duplicate a_small, b, and one under CC-BY-SA."""
    data = pytest.importorskip("skimage.data")
    share, info, doc = tmp_path / "share" / "pics", tmp_path / "info", tmp_path / "doc"
    for d in (share, info, doc / "photos-pkg"):
        d.mkdir(parents=True)
    astronaut = Image.fromarray(data.astronaut())
    astronaut.save(share / "a.jpg")
    astronaut.resize((100, 100)).save(share / "a_small.png")
    Image.fromarray(data.rocket()).save(share / "b.jpg")
    Image.fromarray(data.coffee()).save(share / "sa_c.jpg")
    (info / "photos-pkg.list").write_text("\n".join(str(p) for p in [share, *sorted(share.iterdir())]) + "\n")
    (doc / "photos-pkg" / "copyright").write_text(COPYRIGHT)
    return share, info, doc


def test_prepare_data_manifest_licences_and_whole_photo_split(tmp_path, fake_debian, monkeypatch):
    share, info, doc = fake_debian
    from neuralpatch import content_data as D

    source = D.DebianSource("photos-pkg", str(share), "pics")
    # a hash split sends a's group to val and b to train, whatever VAL_FRACTION would pick
    monkeypatch.setattr(D, "VAL_FRACTION", 0.0)
    train, val = D.prepare_training_photos(tmp_path / "data", sources=(source,), skimage_photos=(), info_dir=info, doc_dir=doc)
    rows = [line.split("\t") for line in (tmp_path / "data" / "MANIFEST.txt").read_text().splitlines()[1:]]
    assert sorted(r[1] for r in rows) == ["train/photos-pkg_a.jpg", "train/photos-pkg_a_small.png", "train/photos-pkg_b.jpg"]
    assert all(r[2] == "photos-pkg" and r[4] == "CC-BY-4.0" for r in rows)  # the last matching stanza wins
    excluded = (tmp_path / "data" / "EXCLUDED.txt").read_text()
    assert "sa_c.jpg" in excluded and "CC-BY-SA-4.0" in excluded
    group = {r[1]: r[5] for r in rows}
    assert group["train/photos-pkg_a.jpg"] == group["train/photos-pkg_a_small.png"] != group["train/photos-pkg_b.jpg"]

    # forcing one member of a duplicate group into val moves the whole photo, never a copy of it
    monkeypatch.setattr(D, "FORCED_VAL", frozenset({"photos-pkg_a_small.png"}))
    splits = D.assign_splits(["photos-pkg_a.jpg", "photos-pkg_a_small.png", "photos-pkg_b.jpg"], [0, 0, 1], frozenset(), D.FORCED_VAL)
    assert splits == ["val", "val", "train"]
    # a training photo of the previous weights keeps its group in train (fair comparison)
    assert D.assign_splits(["x", "y"], [3, 3], frozenset({"x"}), frozenset({"y"})) == ["train", "train"]


def test_prepare_data_refuses_held_out_and_missing_packages(tmp_path, fake_debian):
    share, info, doc = fake_debian
    from neuralpatch import content_data as D

    assert D.HELD_OUT_PACKAGES == {"mate-backgrounds", "plasma-workspace-wallpapers"}
    assert not any(s.package in D.HELD_OUT_PACKAGES for s in D.DEBIAN_SOURCES)
    for package in sorted(D.HELD_OUT_PACKAGES):
        (info / f"{package}.list").write_text(str(share / "a.jpg") + "\n")  # even when installed
        with pytest.raises(ValueError, match="held out"):
            D.prepare_training_photos(
                tmp_path / "x", sources=(D.DebianSource(package, str(share), "pics"),), skimage_photos=(), info_dir=info, doc_dir=doc
            )
        with pytest.raises(ValueError, match="held out"):
            D.package_files(package, info)
    with pytest.raises(FileNotFoundError, match="apt-get install not-installed"):
        D.prepare_training_photos(
            tmp_path / "y", sources=(D.DebianSource("not-installed", str(share), "pics"),), skimage_photos=(), info_dir=info, doc_dir=doc
        )


def test_licences_and_duplicates():
    from neuralpatch import content_data as D

    assert D.is_permissive("Apache-2.0 AND BSD-3-Clause") and D.is_permissive("CC0-1.0")
    assert not D.is_permissive("CC-BY-SA-3.0") and not D.is_permissive("GPL-2+") and not D.is_permissive(None)
    gen = torch.Generator().manual_seed(0)
    base = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
    other = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
    brighter = (base.astype(int) * 0.8 + 20).astype("uint8")
    assert D.group_duplicates([D.thumbnail(base), D.thumbnail(brighter), D.thumbnail(other)]) == [1, 1, 2]


# ---------------------------------------------------------------------------------------------
# Loading weights


def test_missing_shipped_weights_say_how_to_create_them(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "SHIPPED_WEIGHTS", tmp_path / "weights" / "content_net.safetensors")
    with pytest.raises(C.ContentWeightsNotFoundError, match="neuralpatch train-content --images") as info:
        C.load_content_net()
    assert isinstance(info.value, FileNotFoundError)
    assert "--prepare-data" in str(info.value)
    with pytest.raises(FileNotFoundError, match="train-content"):
        C.load_content_net(tmp_path / "nope.safetensors")


def test_roundtrip_float32_and_float16(tmp_path, net):
    for dtype, atol in ((torch.float32, 0), (torch.float16, 1e-3)):
        path = C.save_content_net(net, tmp_path / f"{dtype}.safetensors", {"note": "test"}, dtype=dtype)
        loaded = C.load_content_net(path)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
            assert b.dtype == torch.float32 and torch.allclose(a, b, atol=atol, rtol=1e-3), k


def test_config_travels_with_the_file(tmp_path):
    small = C.ContentNet(C.ContentNetConfig(widths=(8, 16, 16), dilations=(1,), groups=4))
    loaded = C.load_content_net(C.save_content_net(small, tmp_path / "small.safetensors"))
    assert loaded.config == small.config and loaded.stride == 8


def test_mismatched_keys_are_listed(tmp_path, net):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["extra.weight"] = state.pop("out.weight")
    state["out.bias"] = torch.zeros(5)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        C.load_content_net(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "missing keys (1): out.weight" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "shape mismatch for out.bias" in message


def test_not_a_safetensors_file(tmp_path, net):
    path = tmp_path / "weights.pth"
    torch.save(net.state_dict(), path)  # a pickle: refused, never unpickled
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        C.load_content_net(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="safetensors"):
        C.load_content_net(tmp_path / "junk.safetensors")
    bad_config = tmp_path / "config.safetensors"
    C.save_content_net(net, bad_config)
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(bad_config)), str(bad_config), metadata={"config": json.dumps({"widths": [3]})})
    with pytest.raises(CheckpointError, match="invalid content network config"):
        C.load_content_net(bad_config)


# ---------------------------------------------------------------------------------------------
# The prior fills


def _holed(seed=0, hw=(48, 40)):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, *hw, generator=gen)
    masks = torch.stack([M.random_rectangles(*hw, gen), M.free_form_strokes(*hw, gen)])
    return image, masks


@pytest.mark.parametrize("fill", ["push_pull", "blend"])
def test_prior_fill_keeps_known_pixels_and_stays_in_range(fill):
    image, masks = _holed()
    out = C.prior_fill(image, masks, fill)
    known = ~masks[:, None].expand_as(image)
    assert torch.equal(out[known], image[known])
    assert out.min() >= image.min() - 1e-6 and out.max() <= image.max() + 1e-6  # convex combinations


def test_prior_fill_of_a_constant_image_is_exact():
    image = torch.full((1, 3, 32, 32), 0.25)
    mask = M.centre_square(32, 32, 0.75)[None]
    assert torch.allclose(C.prior_fill(image, mask), image, atol=1e-6)
    assert torch.allclose(C.push_pull_fill(image, torch.ones_like(mask)), torch.full_like(image, 0.5))


def test_onion_peel_fills_one_layer_per_iteration():
    mask = M.centre_square(33, 33, 21 / 33)[None]  # 21x21 hole, 11 layers to its centre
    fill, depth = C.onion_peel_fill(torch.rand(1, 3, 33, 33), mask, iterations=3)
    assert (depth[0, 0] == 0).equal(~mask[0])
    for layer, side in ((1, 21), (2, 19), (3, 17)):
        assert (depth[0, 0] == layer).sum() == side * side - (side - 2) ** 2
    assert (depth[0, 0] == 4).sum() == 15 * 15
    assert (fill[:, :, depth[0, 0] == 4] == 0).all()


def test_untrained_network_returns_its_prior():
    image, masks = _holed(1, (32, 48))
    for prior in ("blend", "push_pull"):
        untrained = C.ContentNet(C.ContentNetConfig(prior=prior))
        with torch.no_grad():
            out = untrained(C.content_input(image, masks))
        assert torch.allclose(out, C.prior_fill(image, masks, prior).clamp(C.PRIOR_EPS, 1 - C.PRIOR_EPS), atol=1e-5)
    plain = C.ContentNet(C.ContentNetConfig(prior="none"))
    assert plain.encoder[0][0].in_channels == 4 and plain.out.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="prior"):
        C.ContentNetConfig(prior="telea")


# ---------------------------------------------------------------------------------------------
# The onion-peel fill as a second base (ContentNetConfig.peel)


def test_peel_fill_keeps_known_pixels_and_falls_back_to_push_pull():
    image, masks = _holed(2)
    out = C.peel_fill(image, masks, 2)
    known = ~masks[:, None].expand_as(image)
    assert torch.equal(out[known], image[known])
    assert out.min() >= image.min() - 1e-6 and out.max() <= image.max() + 1e-6
    _, depth = C.onion_peel_fill(image, masks, 2)
    far = (depth > 2).expand_as(image)
    assert far.any() and torch.equal(out[far], C.push_pull_fill(image, masks)[far])
    constant = torch.full((1, 3, 32, 32), 0.6)
    assert torch.allclose(C.peel_fill(constant, M.centre_square(32, 32, 0.5)[None], 32), constant, atol=1e-6)


def test_untrained_peel_network_returns_half_prior_half_peel():
    image, masks = _holed(3, (32, 48))
    net = C.ContentNet(C.ContentNetConfig(widths=(16, 32), dilations=(1,), stem=8, peel=6))
    assert net.encoder[0][0].in_channels == 10 and net.out.out_channels == 4
    with torch.no_grad():
        out = net(C.content_input(image, masks))
    base = 0.5 * (C.prior_fill(image, masks) + C.peel_fill(image, masks, 6))
    assert torch.allclose(out, base.clamp(C.PRIOR_EPS, 1 - C.PRIOR_EPS), atol=1e-5)
    with pytest.raises(ValueError, match="peel"):
        C.ContentNetConfig(prior="none", peel=4)
    with pytest.raises(ValueError, match="peel"):
        C.ContentNetConfig(peel=-1)
    assert C.ContentNetConfig.from_json(json.dumps({"widths": [32, 64]})).peel == 0  # files before peel: none


def test_init_widens_weights_to_a_peel_network(tmp_path):
    """--init: the old weights in their old channels, zeros in the new ones; with the mix weight
    pushed to 0 the widened network is the old one exactly."""
    torch.manual_seed(0)
    small = dict(widths=(16, 32), dilations=(1,), stem=8)
    old = C.ContentNet(C.ContentNetConfig(**small)).eval()
    torch.nn.init.normal_(old.out.weight, std=0.1)
    path = C.save_content_net(old, tmp_path / "old.safetensors")
    new = C.ContentNet(C.ContentNetConfig(**small, peel=4)).eval()
    T.init_generator(new, path)
    assert torch.equal(new.encoder[0][0].weight[:, :7], old.encoder[0][0].weight)
    assert (new.encoder[0][0].weight[:, 7:] == 0).all() and (new.out.weight[3:] == 0).all()
    with torch.no_grad():
        new.out.bias[3] = -40.0
        image, masks = _holed(4, (32, 32))
        x = C.content_input(image, masks)
        assert torch.allclose(new(x), old(x), atol=1e-6)
    other = C.save_content_net(C.ContentNet(C.ContentNetConfig(widths=(8, 16), dilations=(1,), groups=4)), tmp_path / "o.safetensors")
    with pytest.raises(CheckpointMismatchError):
        T.init_generator(new, other)


def test_train_peel_from_init(tmp_path, photo_dirs, capsys):
    init = C.save_content_net(C.ContentNet(C.ContentNetConfig(widths=(16, 32), stem=8)), tmp_path / "init.safetensors")
    extra = ("--epochs", "1", "--widths", "16,32", "--stem", "8", "--peel", "4", "--init", str(init))
    assert _train(tmp_path, photo_dirs, *extra) == 0
    assert "| prior + peel mix |" in capsys.readouterr().out
    loaded = C.load_content_net(tmp_path / "w.safetensors")
    assert loaded.config.peel == 4 and json.loads(_meta(tmp_path / "w.safetensors")[0]["settings"])["peel"] == 4


# ---------------------------------------------------------------------------------------------
# The PatchMatch fill as a third base (ContentNetConfig.patchmatch)


def test_patchmatch_base_copies_known_texture_into_the_hole():
    """A two-colour image: PatchMatch fills the hole from the colours around it; the base keeps
    the known pixels bit for bit and stays within the image's range."""
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, :, :16] = torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1)
    image[:, :, :, 16:] = torch.tensor([0.1, 0.3, 0.8]).view(3, 1, 1)
    masks = M.centre_square(32, 32, 0.25)[None]
    out = C.patchmatch_base(image, masks, 1)
    known = ~masks[:, None].expand_as(image)
    assert torch.equal(out[known], image[known])
    assert out.min() >= -1e-6 and out.max() <= 0.9 + 1e-6
    unblurred = C.patchmatch_base(image, masks, 1, blur=0)
    assert torch.equal(unblurred[known], image[known])
    # copied, not interpolated: each side's colour continued (up to the 8-bit round trip)
    assert (unblurred[0][:, masks[0]] - image[0][:, masks[0]]).abs().max() < 0.01
    blurred = torch.where(masks[:, None], S.gaussian_blur(unblurred, C.PATCHMATCH_BLUR), image)
    assert torch.allclose(out, blurred, atol=1e-6)


def test_untrained_patchmatch_network_returns_equal_thirds():
    image, masks = _holed(2, (32, 32))
    net = C.ContentNet(C.ContentNetConfig(widths=(16, 32), dilations=(1,), stem=8, peel=6, patchmatch=1))
    assert net.encoder[0][0].in_channels == 13 and net.out.out_channels == 5
    with torch.no_grad():
        out = net(C.content_input(image, masks))
    base = (C.prior_fill(image, masks) + C.peel_fill(image, masks, 6) + C.patchmatch_base(image, masks, 1)) / 3
    hole = masks[:, None].expand_as(image)
    assert torch.allclose(out[hole], base.clamp(C.PRIOR_EPS, 1 - C.PRIOR_EPS)[hole], atol=1e-5)
    with pytest.raises(ValueError, match="patchmatch"):
        C.ContentNetConfig(prior="none", patchmatch=1)
    with pytest.raises(ValueError, match="patchmatch"):
        C.ContentNetConfig(patchmatch=-1)
    with pytest.raises(ValueError, match="patchmatch"):
        C.ContentNetConfig(patchmatch=(1, 1))
    assert C.ContentNetConfig(patchmatch=1).patchmatch == (1,) and C.ContentNetConfig(patchmatch=0).patchmatch == ()
    assert C.ContentNetConfig.from_json(json.dumps({"widths": [32, 64]})).patchmatch == ()  # older files: none
    assert C.ContentNetConfig.from_json(json.dumps({"widths": [32, 64], "upsample": "resize", "patchmatch": 1})).patchmatch == (1,)


def test_untrained_network_with_two_patchmatch_radii_returns_equal_quarters():
    image, masks = _holed(2, (32, 32))
    config = C.ContentNetConfig(widths=(16, 32), dilations=(1,), stem=8, peel=6, patchmatch=(1, 3))
    assert config.base_names == ("peel", "patchmatch1", "patchmatch3")
    assert C.ContentNetConfig.from_json(config.to_json()) == config
    net = C.ContentNet(config)
    assert net.encoder[0][0].in_channels == 16 and net.out.out_channels == 6
    with torch.no_grad():
        out = net(C.content_input(image, masks))
    bases = [
        C.prior_fill(image, masks),
        C.peel_fill(image, masks, 6),
        C.patchmatch_base(image, masks, 1),
        C.patchmatch_base(image, masks, 3),
    ]
    hole = masks[:, None].expand_as(image)
    assert torch.allclose(out[hole], (sum(bases) / 4).clamp(C.PRIOR_EPS, 1 - C.PRIOR_EPS)[hole], atol=1e-5)


def test_mix_weight_selects_a_base():
    """A large logit for one base makes the residual base that base alone."""
    image, masks = _holed(1, (32, 32))
    net = C.ContentNet(C.ContentNetConfig(widths=(16, 32), dilations=(1,), stem=8, peel=6, patchmatch=1)).eval()
    with torch.no_grad():
        net.out.bias[4] = 40.0
        out = net(C.content_input(image, masks))
    hole = masks[:, None].expand_as(image)
    expected = C.patchmatch_base(image, masks, 1).clamp(C.PRIOR_EPS, 1 - C.PRIOR_EPS)
    assert torch.allclose(out[hole], expected[hole], atol=1e-5)


def test_patchmatch_reach_keeps_a_base_out_of_the_deep_hole():
    """With a huge logit the PatchMatch base alone is the residual base within its reach; deeper
    into the hole its weight is zero, so there the network returns the prior + peel mix; a reach
    of 0 leaves the other radius unlimited."""
    image, masks = _holed(1, (32, 32))
    config = C.ContentNetConfig(widths=(16, 32), dilations=(1,), stem=8, peel=6, patchmatch=(1, 3), patchmatch_reach=(0, 2))
    assert C.ContentNetConfig.from_json(config.to_json()) == config
    net = C.ContentNet(config).eval()
    with torch.no_grad():
        net.out.bias[5] = 40.0  # the logit of patchmatch3
        out = net(C.content_input(image, masks))
    _, depth = C.onion_peel_fill(image, masks, 2)
    near = masks[:, None] & (depth <= 2)
    deep = masks[:, None] & (depth > 2)
    assert near.any() and deep.any()
    pm3 = C.patchmatch_base(image, masks, 3).clamp(C.PRIOR_EPS, 1 - C.PRIOR_EPS)
    assert torch.allclose(out[near.expand_as(image)], pm3[near.expand_as(image)], atol=1e-5)
    untrained_rest = (C.prior_fill(image, masks) + C.peel_fill(image, masks, 6) + C.patchmatch_base(image, masks, 1)) / 3
    assert torch.allclose(out[deep.expand_as(image)], untrained_rest.clamp(C.PRIOR_EPS, 1 - C.PRIOR_EPS)[deep.expand_as(image)], atol=1e-5)
    # gradients stay finite through the masked logits
    net.train()
    net(C.content_input(image, masks)).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    for bad in ((2,), (0, -1)):
        with pytest.raises(ValueError, match="patchmatch_reach"):
            C.ContentNetConfig(patchmatch=(1, 3), patchmatch_reach=bad)
    assert C.ContentNetConfig.from_json(json.dumps({"widths": [32, 64], "upsample": "resize", "patchmatch": 1})).patchmatch_reach == ()


def test_train_with_patchmatch_base_reports_the_untrained_mix(tmp_path, photo_dirs, capsys):
    extra = ("--epochs", "1", "--widths", "16,32", "--stem", "8", "--peel", "4", "--patchmatch", "1,2", "--patchmatch-reach", "0,3")
    extra += ("--mask-mix", "centre=1,strokes=3")
    assert _train(tmp_path, photo_dirs, *extra) == 0
    assert "| prior + peel + patchmatch1 + patchmatch2 mix |" in capsys.readouterr().out
    loaded = C.load_content_net(tmp_path / "w.safetensors")
    settings = json.loads(_meta(tmp_path / "w.safetensors")[0]["settings"])
    assert loaded.config.patchmatch == (1, 2) and settings["patchmatch"] == [1, 2] and settings["mask_mix"] == "centre=0.25,strokes=0.75"
    assert loaded.config.patchmatch_reach == (0, 3) and settings["patchmatch_reach"] == [0, 3]


def test_one_base_mix_is_the_sigmoid_mix_and_logits_follow_the_base_order():
    """A peel-only network is exactly the earlier sigmoid mix (files trained before the
    softmax mix give the same output), and the mix logits follow ``base_names``."""
    torch.manual_seed(0)
    image, masks = _holed(3, (32, 32))
    x = C.content_input(image, masks)
    peel_net = C.ContentNet(C.ContentNetConfig(widths=(16, 32), dilations=(1,), stem=8, peel=6)).eval()
    torch.nn.init.normal_(peel_net.out.weight, std=0.3)
    raw = {}
    peel_net.out.register_forward_hook(lambda module, args, output: raw.setdefault("out", output))
    with torch.no_grad():
        out = peel_net(x)
    prior, peel = C.prior_fill(image, masks), C.peel_fill(image, masks, 6)
    head = raw["out"]
    base = prior + torch.sigmoid(head[:, 3:]) * (peel - prior)
    assert torch.equal(out, torch.sigmoid(head[:, :3] + torch.logit(base, eps=C.PRIOR_EPS)))
    both = C.ContentNet(C.ContentNetConfig(widths=(16, 32), dilations=(1,), stem=8, peel=6, patchmatch=1)).eval()
    assert both.config.base_names == ("peel", "patchmatch1")
    with torch.no_grad():
        both.out.bias[3] = 40.0  # the first mix logit is the peel fill's
        selected = both(x)
    hole = masks[:, None].expand_as(image)
    assert torch.allclose(selected[hole], peel.clamp(C.PRIOR_EPS, 1 - C.PRIOR_EPS)[hole], atol=1e-5)


def test_init_refuses_bases_in_another_order(tmp_path):
    small = dict(widths=(16, 32), dilations=(1,), stem=8)
    path = C.save_content_net(C.ContentNet(C.ContentNetConfig(**small, patchmatch=1)), tmp_path / "pm.safetensors")
    for target in (dict(peel=4, patchmatch=1), dict(peel=4)):
        with pytest.raises(CheckpointError, match="bases"):
            T.init_generator(C.ContentNet(C.ContentNetConfig(**small, **target)), path)
    T.init_generator(C.ContentNet(C.ContentNetConfig(**small, patchmatch=1)), path)  # the same bases: fine


# ---------------------------------------------------------------------------------------------
# ImageNet VGG-16 features of the residual base in the encoder (ContentNetConfig.features)


def test_vgg_features_config_checks_and_older_files_have_none():
    config = C.ContentNetConfig(widths=(16, 32, 32), features="relu3_1")
    assert config.features == ("relu3_1",) and C.ContentNetConfig.from_json(config.to_json()) == config
    assert C.ContentNetConfig.from_json(json.dumps({"widths": [32, 64]})).features == ()
    with pytest.raises(ValueError, match="features: expected VGG-16 taps"):
        C.ContentNetConfig(features=("relu5_1",))
    with pytest.raises(ValueError, match="deeper than the encoder"):
        C.ContentNetConfig(widths=(16, 32), features=("relu4_1",))
    with pytest.raises(ValueError, match="distinct"):
        C.ContentNetConfig(features=("relu3_1", "relu3_1"))
    with pytest.raises(ValueError, match="features"):
        C.ContentNetConfig(prior="none", features=("relu3_1",))


def test_vgg_features_start_at_zero_then_learn_and_stay_out_of_the_weights_file(tmp_path):
    """A network widened with VGG taps by --init returns exactly what the file's network did; the
    projections get gradients, move the output once trained, and the trunk is not saved."""
    torch.manual_seed(0)
    small = dict(widths=(16, 32, 32), dilations=(1,), stem=8)
    old = C.ContentNet(C.ContentNetConfig(**small)).eval()
    torch.nn.init.normal_(old.out.weight, std=0.1)
    path = C.save_content_net(old, tmp_path / "old.safetensors")
    new = C.ContentNet(C.ContentNetConfig(**small, features=("relu2_1", "relu3_1")))
    T.init_generator(new, path)
    image, masks = _holed(5, (32, 32))
    x = C.content_input(image, masks)
    with torch.no_grad():
        assert torch.equal(new.eval()(x), old(x))
    new.train()(x).mean().backward()
    grads = {tap: proj[1].weight.grad for tap, proj in new.feature_proj.items()}
    assert set(grads) == {"relu2_1", "relu3_1"} and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    with torch.no_grad():
        torch.nn.init.normal_(new.feature_proj["relu3_1"][1].weight, std=0.1)
        assert not torch.allclose(new.eval()(x), old(x), atol=1e-4)
    saved = C.save_content_net(new, tmp_path / "new.safetensors")
    _, tensors = _meta(saved)
    assert not any(key.startswith("_vgg") or key.startswith("features.") for key in tensors)
    assert {k for k in tensors if k.startswith("feature_proj.")} == {"feature_proj.relu2_1.1.weight", "feature_proj.relu3_1.1.weight"}
    loaded = C.load_content_net(saved)
    with torch.no_grad():
        assert torch.allclose(loaded(x), new(x), atol=1e-6)
    # the file's network must read no tap this one does not
    with pytest.raises(CheckpointError, match="VGG taps"):
        T.init_generator(C.ContentNet(C.ContentNetConfig(**small, features=("relu2_1",))), saved)


def test_train_vgg_features_from_init(tmp_path, photo_dirs, capsys):
    init = C.save_content_net(C.ContentNet(C.ContentNetConfig(widths=(16, 32, 32), stem=8)), tmp_path / "init.safetensors")
    extra = ("--epochs", "1", "--widths", "16,32,32", "--stem", "8", "--features", "relu3_1", "--init", str(init))
    assert _train(tmp_path, photo_dirs, *extra) == 0
    loaded = C.load_content_net(tmp_path / "w.safetensors")
    assert loaded.config.features == ("relu3_1",)
    assert loaded.feature_proj["relu3_1"][1].weight.abs().sum() > 0  # trained away from its zero start
    train, _ = photo_dirs
    assert T.main(["--images", str(train), "--out", str(tmp_path / "bad.safetensors"), "--features", "relu9_9"]) == 2
    assert "--features" in capsys.readouterr().err and not (tmp_path / "bad.safetensors").exists()
