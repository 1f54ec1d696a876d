"""The multi-scale pipeline: geometry, composite, bad input, determinism, CLI."""

import importlib
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from neuralpatch.cli import main
from neuralpatch.models import load_vgg
from neuralpatch.synthesis import inpaint, monochrome_line, onto_line, pyramid_sizes

FAST = dict(iterations=3, content_init="mean", texture_weights="random", backend="torch", precision="fp32", progress=False, device="cpu")
# the steps that finish each scale's fill off: the cap, the edge blend and the projection of a
# one-hue photo's colours (most of these tests' photos are flat or grey)
FINISHING_OFF = {"detail_cap": 0.0, "edge_blend": 0, "monochrome_tolerance": 0.0}
# one short scale, the hole as the optimisation leaves it (plus the grain)
GRAIN_ALONE = {"max_scales": 1, "iterations": 2, **FINISHING_OFF}


@pytest.fixture(scope="module")
def vgg():
    return load_vgg("random", layers=("relu3_1", "relu4_1"))


def photo(h=48, w=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(3, h // 8, w // 8, generator=gen)
    return torch.nn.functional.interpolate(base[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)


def test_public_inpaint_is_the_function():
    import neuralpatch

    assert neuralpatch.inpaint is inpaint and callable(neuralpatch.inpaint)
    assert neuralpatch.InpaintConfig().iterations == 100


def test_show_hole_paints_only_the_hole():
    from neuralpatch.demo import show_hole

    image, hole = photo(), torch.zeros(48, 64, dtype=torch.bool)
    hole[5:9, 10:20] = True
    shown = show_hole(image, hole)
    assert torch.equal(shown[:, ~hole], image[:, ~hole])
    assert torch.equal(shown[:, hole], torch.tensor([1.0, 0.0, 1.0])[:, None].expand(3, int(hole.sum())))


def test_pyramid_follows_the_paper():
    assert pyramid_sizes(512, 512) == [(128, 128), (256, 256), (512, 512)]
    assert pyramid_sizes(4096, 4096)[0] == (128, 128) and len(pyramid_sizes(4096, 4096)) == 6
    assert pyramid_sizes(300, 451) == [(75, 113), (150, 226), (300, 451)]
    assert pyramid_sizes(100, 60) == [(100, 60)]
    assert pyramid_sizes(512, 512, max_scales=2) == [(256, 256), (512, 512)]


@pytest.mark.parametrize(
    "hole",
    [
        [(16, 32, 20, 40)],  # one rectangle
        [(0, 12, 0, 20)],  # touching the top-left border
        [(4, 12, 4, 12), (30, 44, 40, 60)],  # two disjoint holes, one touching the right border
    ],
)
def test_known_pixels_are_kept_and_the_energy_falls_at_every_scale(vgg, hole, monkeypatch):
    pipeline = importlib.import_module("neuralpatch.synthesis")
    energies = []
    real_energy = pipeline._Scale.energy

    def recording_energy(self, variables):
        value = real_energy(self, variables)
        energies.append((id(self), value.item()))
        return value

    monkeypatch.setattr(pipeline._Scale, "energy", recording_energy)
    image = photo(96, 128)
    mask = torch.zeros(96, 128, dtype=torch.bool)
    for y0, y1, x0, x1 in hole:
        mask[2 * y0 : 2 * y1, 2 * x0 : 2 * x1] = True
    noisy = image.clone()
    noisy[:, mask] = torch.rand(3, int(mask.sum()), generator=torch.Generator().manual_seed(0))
    out = inpaint(noisy, mask, feature_net=vgg, coarsest_side=64, **dict(FAST, iterations=8))
    assert out.shape == image.shape and out.dtype == torch.float32
    assert torch.equal(out[:, ~mask], noisy[:, ~mask])
    assert 0 <= out.min() and out.max() <= 1
    scales = list(dict.fromkeys(key for key, _ in energies))
    assert len(scales) == 2
    for scale in scales:
        values = [value for key, value in energies if key == scale]
        assert values[-1] < 0.98 * values[0], f"energy did not fall over a scale: {values}"
    # and the fill is nearer the photo than the noise the hole held
    assert (out - image)[:, mask].abs().mean() < 0.75 * (noisy - image)[:, mask].abs().mean()


def test_the_seed_drives_the_approximate_search_only(vgg):
    image, mask = photo(), torch.zeros(48, 64, dtype=torch.bool)
    mask[10:30, 20:44] = True
    approximate = dict(FAST, search="patchmatch", search_iterations=1)
    rng_before = torch.random.get_rng_state()
    first = inpaint(image, mask, feature_net=vgg, seed=3, **approximate)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "inpaint must not touch the global RNG"
    assert torch.equal(first, inpaint(image, mask, feature_net=vgg, seed=3, **approximate))
    assert not torch.equal(first, inpaint(image, mask, feature_net=vgg, seed=4, **approximate))
    # the exact search draws nothing: the seed does not matter
    assert torch.equal(inpaint(image, mask, feature_net=vgg, seed=3, **FAST), inpaint(image, mask, feature_net=vgg, seed=4, **FAST))
    with pytest.raises(ValueError, match="seed"):
        inpaint(image, mask, feature_net=vgg, seed=-1, **FAST)


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
@pytest.mark.parametrize("iterations, nn_every, rounds", [(6, 1, 6), (6, 3, 2), (7, 3, 3), (2, 5, 1)])
def test_neighbours_are_searched_once_per_round(vgg, monkeypatch, iterations, nn_every, rounds, line_search):
    """One search per layer per round of nn_every L-BFGS iterations; every evaluation of a
    round reuses that round's neighbours. Without a line search that is one evaluation per
    iteration."""
    pipeline = importlib.import_module("neuralpatch.synthesis")
    loss_module = importlib.import_module("neuralpatch.loss")

    searches, evaluations = [], []
    real_patch_nn, real_energy = loss_module.patch_nn, pipeline._Scale.energy

    def counting_patch_nn(*args, **kwargs):
        searches.append(1)
        return real_patch_nn(*args, **kwargs)

    def counting_energy(self, variables):
        evaluations.append(1)
        return real_energy(self, variables)

    monkeypatch.setattr(loss_module, "patch_nn", counting_patch_nn)
    monkeypatch.setattr(pipeline._Scale, "energy", counting_energy)
    image, mask = photo(), torch.zeros(48, 64, dtype=torch.bool)
    mask[12:36, 16:48] = True
    options = {**FAST, "iterations": iterations, "nn_every": nn_every, "line_search": line_search}
    inpaint(image, mask, feature_net=vgg, max_scales=1, layers=("relu3_1",), layer_weights=(1.0,), **options)
    assert len(searches) == rounds
    if line_search is None:
        assert len(evaluations) == iterations
    else:
        assert len(evaluations) > rounds  # line searches evaluated more often than the neighbours moved


def test_line_search_is_validated():
    from neuralpatch.synthesis import InpaintConfig

    assert InpaintConfig(line_search="strong_wolfe").line_search == "strong_wolfe"
    with pytest.raises(ValueError, match="line_search"):
        InpaintConfig(line_search="backtracking")


def test_thin_keys_bounds_the_key_count():
    from neuralpatch.geometry import thin_keys as _thin_keys

    known = torch.ones(40, 50, dtype=torch.bool)
    known[10:30, 15:35] = False
    assert torch.equal(_thin_keys(known, 10_000), known)
    thinned = _thin_keys(known, 500)
    assert 0 < int(thinned.sum()) <= 500 and not bool((thinned & ~known).any())
    stride = 2  # 1600 known cells -> every 2nd row and column leaves 400
    assert torch.equal(thinned, known & (torch.arange(40)[:, None] % stride == 0) & (torch.arange(50) % stride == 0))
    lone = torch.zeros(9, 9, dtype=torch.bool)
    lone[1, 1] = lone[4, 7] = True  # no grid past stride 1 keeps both: never thinned to nothing
    assert int(_thin_keys(lone, 1).sum()) >= 1


def test_max_keys_caps_every_search(vgg, monkeypatch):
    loss_module = importlib.import_module("neuralpatch.loss")

    key_counts = []
    real_patch_nn = loss_module.patch_nn

    def recording_patch_nn(query, keys, query_mask, key_mask, *args, **kwargs):
        key_counts.append(int(key_mask.sum()))
        return real_patch_nn(query, keys, query_mask, key_mask, *args, **kwargs)

    monkeypatch.setattr(loss_module, "patch_nn", recording_patch_nn)
    image, mask = photo(96, 96), torch.zeros(96, 96, dtype=torch.bool)
    mask[40:56, 40:56] = True
    out = inpaint(image, mask, feature_net=vgg, max_scales=1, max_keys=30, **FAST)
    assert key_counts and max(key_counts) <= 30
    assert torch.equal(out[:, ~mask], image[:, ~mask])


def test_feather_blends_a_band_outside_the_hole(vgg):
    from neuralpatch.geometry import dilate

    image, mask = photo(), torch.zeros(48, 64, dtype=torch.bool)
    mask[16:32, 24:40] = True
    finished = []
    out = inpaint(image, mask, feature_net=vgg, feather=3, callback=lambda p: p.result is not None and finished.append(p.result), **FAST)
    synthesised = finished[-1]  # the last scale, before the blend into the input
    far = ~dilate(mask, 3)
    assert torch.equal(out[:, far], image[:, far])
    assert torch.equal(out[:, mask], synthesised[:, mask])
    inside = mask
    for ring, weight in enumerate((0.75, 0.5, 0.25), start=1):
        band = dilate(mask, ring) & ~inside
        inside = inside | band
        expected = (weight * synthesised + (1 - weight) * image)[:, band]
        torch.testing.assert_close(out[:, band], expected.clamp(0, 1))
    band = dilate(mask, 3) & ~mask
    assert (out - image)[:, band].abs().max() > 1e-3  # the band was re-synthesised, not copied


def test_content_network_start(vgg):
    """With the texture and both TV terms off, the per-pixel content term holds the content network's
    prediction: the fill is that prediction, and not the mean-colour start."""
    from neuralpatch.models.content import ContentNet

    torch.manual_seed(0)
    net = ContentNet()
    image, mask = photo(64, 64), torch.zeros(64, 64, dtype=torch.bool)
    mask[20:40, 20:40] = True
    options = _frozen(content_init="network", content_blur=0.0, coarsest_side=64)
    out = inpaint(image, mask, feature_net=vgg, content_net=net, **options)
    prediction = net.predict(image, mask)
    torch.testing.assert_close(out[:, mask], prediction[:, mask].clamp(0, 1), atol=1e-5, rtol=0)
    mean_fill = inpaint(image, mask, feature_net=vgg, **dict(options, content_init="mean"))
    assert (mean_fill - prediction)[:, mask].abs().mean() > 1e-2
    assert torch.equal(out[:, ~mask], image[:, ~mask])


def test_save_pyramid(vgg, tmp_path):
    image, mask = photo(96, 96), torch.zeros(96, 96, dtype=torch.bool)
    mask[30:60, 30:60] = True
    inpaint(image, mask, feature_net=vgg, save_pyramid=tmp_path / "pyr", coarsest_side=48, **FAST)
    assert sorted(p.name for p in (tmp_path / "pyr").iterdir()) == ["scale0_48x48.png", "scale1_96x96.png"]


def test_callback_reports_every_round_and_each_scale_result(vgg):
    from neuralpatch.synthesis import Progress

    image, mask = photo(96, 96), torch.zeros(96, 96, dtype=torch.bool)
    mask[30:60, 30:60] = True
    events: list[Progress] = []
    out = inpaint(image, mask, feature_net=vgg, callback=events.append, coarsest_side=48, **dict(FAST, iterations=4), nn_every=2)
    rounds = [(e.scale, e.iteration) for e in events if e.result is None]
    assert rounds == [(0, 2), (0, 4), (1, 2), (1, 4)]
    finished = [e for e in events if e.result is not None]
    assert [(e.scale, e.scales, e.size) for e in finished] == [(0, 2, (48, 48)), (1, 2, (96, 96))]
    assert finished[0].result.shape == (3, 48, 48)
    assert torch.equal(finished[1].result, out)  # no feather: the last scale's result is the output


def test_callback_exception_stops_the_run(vgg):
    image, mask = photo(), torch.zeros(48, 64, dtype=torch.bool)
    mask[10:30, 20:44] = True

    class Stop(Exception):
        pass

    def stop(progress):
        raise Stop

    with pytest.raises(Stop):
        inpaint(image, mask, feature_net=vgg, callback=stop, **FAST)


def test_empty_mask_returns_the_input_with_a_warning(vgg):
    image = photo()
    with pytest.warns(UserWarning, match="empty"):
        out = inpaint(image, torch.zeros(48, 64, dtype=torch.bool), feature_net=vgg, **FAST)
    assert torch.equal(out, image)


@pytest.mark.parametrize(
    "mask,options,match",
    [
        (torch.ones(48, 64, dtype=torch.bool), {}, "whole image"),
        (torch.zeros(40, 64, dtype=torch.bool), {}, "does not match"),
        (torch.zeros(48, 64, dtype=torch.bool), {"max_pixels": 1000}, "max_pixels"),
        (torch.zeros(48, 64, dtype=torch.bool), {"no_such_option": 1}, "unknown"),
        (torch.zeros(48, 64, dtype=torch.bool), {"iterations": 0}, "iterations"),
    ],
)
def test_bad_input(vgg, mask, options, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            inpaint(photo(), mask, feature_net=vgg, **{**FAST, **options})
    with pytest.raises(ValueError, match="preset"):
        inpaint(photo(), mask, preset="slow")


def _save(array, path, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("kind", ["rgba", "gray", "gray16", "palette", "rgb"])
def test_image_kinds_are_read(kind, tmp_path):
    from neuralpatch.io import read_image

    rgb = (photo().permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    if kind == "rgba":
        alpha = np.full(rgb.shape[:2], 255, np.uint8)
        alpha[10:20, 10:20] = 0
        path = _save(np.dstack([rgb, alpha]), tmp_path / "a.png")
    elif kind == "gray":
        path = _save(rgb[..., 0], tmp_path / "a.png")
    elif kind == "gray16":
        path = tmp_path / "a.png"
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(path)
    elif kind == "palette":
        path = tmp_path / "a.png"
        Image.fromarray(rgb).convert("P").save(path)
    else:
        path = _save(rgb, tmp_path / "a.jpg")
    image, alpha = read_image(path)
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    if kind == "rgba":
        assert alpha is not None and int(alpha.sum()) == 100
    else:
        assert alpha is None
    if kind in ("gray", "gray16"):
        assert torch.allclose(image[0], torch.from_numpy(rgb[..., 0]).float() / 255, atol=1e-6)


def test_corrupt_truncated_and_unsupported_files(tmp_path):
    from neuralpatch.io import read_image

    rgb = (photo().permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    good = _save(rgb, tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read"):
        read_image(truncated)
    with pytest.raises(ValueError, match="cannot read"):
        read_image(corrupt)
    with pytest.raises(ValueError, match="unsupported extension"):
        read_image(tmp_path / "image.xyz")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")


@pytest.fixture
def files(tmp_path):
    rgb = (photo().permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[16:32, 20:44] = 255
    return _save(rgb, tmp_path / "photo.png"), _save(mask, tmp_path / "mask.png"), tmp_path


CLI_FAST = ["--iterations", "2", "--weights", "random", "--content-init", "mean", "--backend", "torch", "--device", "cpu", "-q"]


def test_cli_inpaint_writes_the_output(files):
    image, mask, tmp = files
    out = tmp / "out.png"
    assert main(["inpaint", str(image), str(mask), "-o", str(out), *CLI_FAST]) == 0
    result = np.asarray(Image.open(out))
    source = np.asarray(Image.open(image))
    known = np.asarray(Image.open(mask)) == 0
    assert result.shape == source.shape
    assert (result[known] == source[known]).all()
    assert sorted(p.name for p in tmp.iterdir()) == ["mask.png", "out.png", "photo.png"]  # no temp files left


@pytest.fixture
def recorded_options(monkeypatch):
    """The keyword arguments the CLI passes to inpaint (which returns zeros instead of running)."""
    pipeline = importlib.import_module("neuralpatch.synthesis")
    seen = {}

    def recording_inpaint(image, mask, **options):
        seen.update(options)
        return torch.zeros(3, 48, 64)

    monkeypatch.setattr(pipeline, "inpaint", recording_inpaint)
    return seen


@pytest.mark.parametrize("flag, expected", [("none", None), ("strong_wolfe", "strong_wolfe")])
def test_cli_passes_the_line_search(files, recorded_options, flag, expected):
    seen = recorded_options
    image, mask, tmp = files
    assert main(["inpaint", str(image), str(mask), "-o", str(tmp / "o.png"), "--line-search", flag, *CLI_FAST]) == 0
    assert seen["line_search"] == expected


def test_cli_passes_the_search_and_its_seed(files, recorded_options):
    seen = recorded_options
    image, mask, tmp = files
    argv = ["inpaint", str(image), str(mask), "-o", str(tmp / "o.png"), "--search", "patchmatch", "--search-iterations", "3", "--seed", "9"]
    assert main(argv + CLI_FAST) == 0
    assert (seen["search"], seen["search_iterations"], seen["seed"]) == ("patchmatch", 3, 9)


def test_cli_passes_the_detail_gain(files, recorded_options):
    image, mask, tmp = files
    assert main(["inpaint", str(image), str(mask), "-o", str(tmp / "o.png"), "--detail", "0", *CLI_FAST]) == 0
    assert recorded_options["detail"] == 0.0


def test_cli_passes_the_detail_cap_and_the_edge_blend(files, recorded_options):
    image, mask, tmp = files
    assert main(["inpaint", str(image), str(mask), "-o", str(tmp / "o.png"), "--detail-cap", "0", "--edge-blend", "5", *CLI_FAST]) == 0
    assert (recorded_options["detail_cap"], recorded_options["edge_blend"]) == (0.0, 5)


def test_cli_passes_the_monochrome_tolerance(files, recorded_options):
    image, mask, tmp = files
    assert main(["inpaint", str(image), str(mask), "-o", str(tmp / "o.png"), "--monochrome-tolerance", "0", *CLI_FAST]) == 0
    assert recorded_options["monochrome_tolerance"] == 0.0


def test_cli_passes_the_colour_smoothness(files, recorded_options):
    image, mask, tmp = files
    assert main(["inpaint", str(image), str(mask), "-o", str(tmp / "o.png"), "--beta-chroma", "0", *CLI_FAST]) == 0
    assert recorded_options["beta_chroma"] == 0.0


def test_cli_refuses_to_overwrite(files):
    image, mask, tmp = files
    before = image.read_bytes()
    assert main(["inpaint", str(image), str(mask), "-o", str(image), "--overwrite", *CLI_FAST]) == 2
    assert image.read_bytes() == before
    out = tmp / "out.png"
    out.write_bytes(b"keep me")
    assert main(["inpaint", str(image), str(mask), "-o", str(out), *CLI_FAST]) == 2
    assert out.read_bytes() == b"keep me"
    assert main(["inpaint", str(image), str(mask), "-o", str(out), "--overwrite", *CLI_FAST]) == 0
    assert out.read_bytes() != b"keep me"


def test_cli_bad_input_exit_codes(files, capsys):
    image, mask, tmp = files
    small = _save(np.zeros((10, 10), np.uint8), tmp / "small.png")
    assert main(["inpaint", str(image), str(small), "-o", str(tmp / "o.png"), *CLI_FAST]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["inpaint", str(tmp / "nope.png"), str(mask), "-o", str(tmp / "o.png"), *CLI_FAST]) == 2
    assert main(["inpaint", str(image), str(mask), "-o", str(tmp / "o.xyz"), *CLI_FAST]) == 2
    assert main(["inpaint", str(image), str(mask), "-o", str(tmp / "o.png"), "--max-pixels", "100", *CLI_FAST]) == 2
    assert "--max-pixels" in capsys.readouterr().err
    assert not (tmp / "o.png").exists() and not (tmp / "o.xyz").exists()


def test_cli_folder_mode(files):
    image, mask, tmp = files
    (tmp / "images").mkdir()
    (tmp / "masks").mkdir()
    for name in ("a", "b"):
        (tmp / "images" / f"{name}.png").write_bytes(image.read_bytes())
        (tmp / "masks" / f"{name}.png").write_bytes(mask.read_bytes())
    assert main(["inpaint", str(tmp / "images"), str(tmp / "masks"), "-o", str(tmp / "out"), *CLI_FAST]) == 0
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["a.png", "b.png"]
    (tmp / "images" / "c.png").write_bytes(image.read_bytes())
    assert main(["inpaint", str(tmp / "images"), str(tmp / "masks"), "-o", str(tmp / "out2"), *CLI_FAST]) == 2


def test_cli_weights_list(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: no vgg19 there
    monkeypatch.delenv("NEURALPATCH_VGG19", raising=False)
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "vgg19" in out and "neuralpatch weights download vgg19" in out and "auto" in out
    assert main(["weights", "download", "vgg16-hed"]) == 2


# --------------------------------------------------------------------------------------------- init


def _frozen(**extra):
    """One scale, content term only, no cap, edge blend or colour projection: L-BFGS starts at the
    minimum, so the hole keeps its start."""
    terms_off = dict(alpha=0.0, beta=0.0, beta_chroma=0.0, detail=0.0, init_blur=0.0)
    return {**FAST, "max_scales": 1, **terms_off, **FINISHING_OFF, **extra}


def test_init_fill_is_the_start_and_reference(vgg, tmp_path):
    image, mask = photo(), torch.zeros(48, 64, dtype=torch.bool)
    mask[12:36, 20:44] = True
    fill = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(3))
    out = inpaint(image, mask, feature_net=vgg, init=fill, **_frozen())
    assert torch.allclose(out[:, mask], fill[:, mask], atol=1e-5)
    assert torch.equal(out[:, ~mask], image[:, ~mask])
    mean_start = inpaint(image, mask, feature_net=vgg, **_frozen())
    assert (mean_start[:, mask] - fill[:, mask]).abs().mean() > 0.1
    # the same fill as a file and as an (H, W, 3) uint8 array
    path = _save((fill.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), tmp_path / "fill.png")
    for given in (path, np.asarray(Image.open(path))):
        from_file = inpaint(image, mask, feature_net=vgg, init=given, **_frozen())
        assert torch.allclose(from_file[:, mask], fill[:, mask], atol=1 / 255)


def test_init_is_checked(vgg):
    image, mask = photo(), torch.zeros(48, 64, dtype=torch.bool)
    mask[12:36, 20:44] = True
    with pytest.raises(ValueError, match="init: size 32x48"):
        inpaint(image, mask, feature_net=vgg, init=torch.rand(3, 48, 32), **FAST)
    with pytest.raises(ValueError, match="init: expected"):
        inpaint(image, mask, feature_net=vgg, init=torch.rand(5, 48, 64), **FAST)
    with pytest.raises(ValueError, match="content_init"):
        inpaint(image, mask, feature_net=vgg, **{**FAST, "content_init": "lama"})


def test_patchmatch_start(vgg):
    pytest.importorskip("patchmatch.patch_match")
    from neuralpatch.synthesis import patchmatch_fill

    image, mask = photo(64, 64), torch.zeros(64, 64, dtype=torch.bool)
    mask[20:40, 24:44] = True
    fill = patchmatch_fill(image, mask)
    assert torch.equal(fill[:, ~mask], image[:, ~mask]) and (fill[:, mask] - image[:, mask]).abs().mean() < 0.2
    assert torch.equal(patchmatch_fill(image, mask), fill)  # the default start is deterministic
    out = inpaint(image, mask, feature_net=vgg, **_frozen(content_init="patchmatch"))
    assert torch.allclose(out[:, mask], fill[:, mask], atol=1e-5)


def test_edge_distance_matches_the_euclidean_distance():
    from neuralpatch.geometry import edge_distance

    gen = torch.Generator().manual_seed(5)
    mask = torch.ones(60, 70, dtype=torch.bool)
    known = torch.randint(0, 60 * 70, (12,), generator=gen)
    mask.view(-1)[known] = False
    ys, xs = torch.meshgrid(torch.arange(60.0), torch.arange(70.0), indexing="ij")
    points = torch.stack([ys.flatten(), xs.flatten()], 1)
    euclid = torch.cdist(points, points[known]).min(1).values.view(60, 70)  # brute force
    distance = edge_distance(mask, 25)
    assert torch.equal(distance[~mask], torch.zeros(12))
    close, far = (euclid < 25) & (euclid >= 8), euclid >= 26
    assert ((distance[close] - euclid[close]) / euclid[close]).abs().max() <= 0.11
    assert torch.equal(distance[far], torch.full_like(distance[far], 25.0))
    square = torch.zeros(20, 20, dtype=torch.bool)
    square[4:16, 4:16] = True  # along rows and columns it is exact: 1 at the edge, 6 at the middle
    assert edge_distance(square, 30)[4:16, 9].tolist() == [1, 2, 3, 4, 5, 6, 6, 5, 4, 3, 2, 1]
    with pytest.raises(ValueError, match="mask"):
        edge_distance(square[None], 3)


def test_network_share_ramps_with_the_depth_in_the_hole():
    from neuralpatch.synthesis import network_share

    hole = torch.zeros(512, 512, dtype=torch.bool)
    hole[128:384, 128:384] = True
    share = network_share(hole, 0.5, (8.0, 48.0))
    assert share[~hole].abs().max() == 0 and share.max() == 0.5
    row = share[256, 128:256]  # from the edge to the middle
    assert row[:8].max() == 0 and 0 < row[20] < 0.5 and row[60:].min() == 0.5
    assert bool((row[1:] >= row[:-1]).all())
    # pixels at a long side of 512: the same mask at 1024 gets the same ramp, twice as long
    big = network_share(hole.repeat_interleave(2, 0).repeat_interleave(2, 1), 0.5, (8.0, 48.0))
    assert (big[512, 256:512:2] - row).abs().max() < 0.05
    assert network_share(hole, 0.0, (8.0, 48.0)).max() == 0


def test_blend_start_mixes_the_network_in_deep_in_the_hole(vgg):
    pytest.importorskip("patchmatch.patch_match")
    from neuralpatch.synthesis import network_share, patchmatch_fill

    class ConstantNet(torch.nn.Module):
        def predict(self, image, mask):
            return torch.where(mask[None], torch.full_like(image, 0.25), image)

    image, mask = photo(128, 128), torch.zeros(128, 128, dtype=torch.bool)
    mask[24:104, 24:104] = True
    options = _frozen(content_init="blend", blend_weight=0.6, blend_ramp=(4.0, 32.0))
    out = inpaint(image, mask, feature_net=vgg, content_net=ConstantNet(), **options)
    share = network_share(mask, 0.6, (4.0, 32.0))
    expected = torch.lerp(patchmatch_fill(image, mask), torch.full_like(image, 0.25), share[None])
    assert torch.allclose(out[:, mask], expected[:, mask], atol=1e-4)
    assert share[64, 64] == 0.6 and share[64, 24] == 0  # the network deep in, PatchMatch at the edge
    assert torch.equal(out[:, ~mask], image[:, ~mask])

    class UnusedNet(torch.nn.Module):
        def predict(self, image, mask):
            raise AssertionError("a hole 3 px (12 px at 512) deep never reaches a ramp starting at 16 px")

    stroke = torch.zeros(128, 128, dtype=torch.bool)
    stroke[60:66, 10:118] = True
    thin = inpaint(image, stroke, feature_net=vgg, content_net=UnusedNet(), **{**options, "blend_ramp": (16.0, 16.0)})
    assert torch.allclose(thin[:, stroke], patchmatch_fill(image, stroke)[:, stroke], atol=1e-4)
    bad_values = ({"blend_weight": 1.5}, {"blend_ramp": (8.0, 0.0)}, {"blend_ramp": (8.0,)}, {"blend_ramp": (-1.0, 4.0)}, {"blend_ramp": "wide"},
                  {"detail_edge": 1.5}, {"detail_depth": 0.0}, {"detail_cap": -1.0}, {"detail_cap": float("nan")},
                  {"edge_blend": -1}, {"edge_blend": 1.5})  # fmt: skip
    for bad in bad_values:
        with pytest.raises(ValueError, match=next(iter(bad))):
            inpaint(image, mask, feature_net=vgg, **{**FAST, **bad})


def test_patchmatch_start_without_the_package_says_how_to_install(vgg, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "patchmatch", None)
    image, mask = photo(), torch.zeros(48, 64, dtype=torch.bool)
    mask[12:36, 20:44] = True
    with pytest.raises(ImportError, match="pip install pypatchmatch"):
        inpaint(image, mask, feature_net=vgg, **{**FAST, "content_init": "patchmatch"})


def test_cli_init_refines_the_given_fill(files, monkeypatch):
    pipeline = importlib.import_module("neuralpatch.synthesis")
    seen = {}

    def recording_inpaint(image, mask, **options):
        seen.update(options)
        return torch.zeros(3, 48, 64)

    image, mask, tmp = files
    monkeypatch.setattr(pipeline, "inpaint", recording_inpaint)
    assert main(["inpaint", str(image), str(mask), "-o", str(tmp / "o.png"), "--init", str(image), *CLI_FAST]) == 0
    assert seen["init"] == image and seen["content_init"] == "mean"
    assert main(["inpaint", str(image), str(mask), "-o", str(tmp / "o2.png"), "--init", str(tmp / "missing.png"), *CLI_FAST]) == 2
    assert main(["inpaint", str(image), str(mask), "-o", str(image), "--init", str(image), "--overwrite", *CLI_FAST]) == 2
    assert main(["inpaint", "--demo", "-o", str(tmp / "d.png"), "--init", str(image), *CLI_FAST]) == 2
    assert not (tmp / "o2.png").exists() and not (tmp / "d.png").exists()


def test_demo_removes_the_mast_of_the_bundled_photo():
    from neuralpatch.demo import demo_inputs

    image, mask = demo_inputs()
    assert image.shape == (3, 427, 640) and mask.shape == (427, 640)
    assert 10_000 < int(mask.sum()) < 20_000 and bool(mask[-1].any())  # down to the bottom edge
    # the hole covers the dark lattice against the lighter sky: its pixels are darker than the sky beside it
    rows = slice(200, 340)
    assert image[:, rows][:, :, mask[rows].any(0)].mean() < image[:, rows, 220:260].mean() + 0.05


# --------------------------------------------------------------------------------------------- patch vote


def test_patch_vote_copies_the_matched_pixels():
    from neuralpatch.synthesis import patch_vote

    gen = torch.Generator().manual_seed(0)
    source = torch.rand(3, 40, 48, generator=gen)
    query_mask = torch.zeros(10, 12, dtype=torch.bool)
    query_mask[3:6, 4:9] = True
    fallback = torch.full((3, 40, 48), -1.0)
    # every query matched to the key at its own place: the vote is the source itself
    same = patch_vote(source, query_mask.flatten().nonzero().squeeze(1), query_mask, 12, 4, 3, fallback)
    covered = torch.zeros(40, 48, dtype=torch.bool)
    covered[2 * 4 : 7 * 4, 3 * 4 : 10 * 4] = True  # query cells 3..5 x 4..8, grown by one cell
    assert torch.allclose(same[:, covered], source[:, covered]) and torch.equal(same[:, ~covered], fallback[:, ~covered])
    # every query matched to one key: each covered pixel is the mean of what the key's patch
    # puts there; the centre of a lone query is that key's centre pixel block
    lone = torch.zeros_like(query_mask)
    lone[5, 6] = True
    key = torch.tensor([2 * 12 + 3])
    one = patch_vote(source, key, lone, 12, 4, 3, fallback)
    assert torch.allclose(one[:, 16:28, 20:32], source[:, 4:16, 8:20])
    assert int((one[0] != -1).sum()) == 144


def test_vote_term_pulls_colours_to_the_matched_source(vgg):
    # known pixels of one colour, a start of the opposite colour: only the vote knows the source
    colour = torch.tensor([0.8, 0.3, 0.1])[:, None, None]
    image, mask = colour.expand(3, 64, 64).clone(), torch.zeros(64, 64, dtype=torch.bool)
    mask[20:44, 20:44] = True
    start = (1 - colour).expand(3, 64, 64)
    options = {**FAST, **GRAIN_ALONE, "iterations": 10, "alpha": 0.0, "beta": 0.0, "detail": 0.0}
    plain = inpaint(image, mask, feature_net=vgg, init=start, **options)
    voted = inpaint(image, mask, feature_net=vgg, init=start, **{**options, "gamma": 10.0})
    error = lambda out: (out - image)[:, mask].abs().mean().item()  # noqa: E731
    assert error(plain) > 0.3
    assert error(voted) < 0.2 * error(plain)
    with pytest.raises(ValueError, match="vote_layer"):
        inpaint(image, mask, feature_net=vgg, **{**FAST, "gamma": 1.0, "vote_layer": "relu2_1"})


def _grain(seed=0, size=64):
    """Mid-grey pixel noise (fine grain only) with a square hole holding a smooth start."""
    gen = torch.Generator().manual_seed(seed)
    image = 0.5 + 0.15 * (torch.rand(3, size, size, generator=gen) - 0.5)
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[20:44, 20:44] = True
    return image, mask, torch.full((3, size, size), 0.5)


def _hole_gradient_energy(out, mask):
    inner = mask[1:, :] & mask[:-1, :]
    return (out[:, 1:] - out[:, :-1]).square()[:, inner].mean().item()


def test_detail_lays_the_known_grain_into_the_hole(vgg):
    image, mask, start = _grain()
    options = {**FAST, **GRAIN_ALONE}
    plain, grained = (inpaint(image, mask, feature_net=vgg, init=start, **{**options, "detail": d}) for d in (0.0, 1.0))
    assert torch.equal(plain[:, ~mask], image[:, ~mask]) and torch.equal(grained[:, ~mask], image[:, ~mask])
    known = _hole_gradient_energy(image, ~mask)
    assert _hole_gradient_energy(plain, mask) < 0.05 * known
    assert _hole_gradient_energy(grained, mask) > 0.1 * known  # votes of unrelated patches average out in part
    # the detail is added, times the gain (nothing here is clamped)
    double = inpaint(image, mask, feature_net=vgg, init=start, **{**options, "detail": 2.0})
    assert torch.allclose(double - plain, 2 * (grained - plain), atol=1e-5)


def test_detail_gain_ramps_from_the_edge_to_the_depth(vgg):
    from neuralpatch.synthesis import hole_depth

    image, mask, start = _grain()
    options = {**FAST, **GRAIN_ALONE, "detail_depth": 64.0}
    plain, flat, ramped = (
        inpaint(image, mask, feature_net=vgg, init=start, **{**options, "detail": d, "detail_edge": e})
        for d, e in ((0, 1), (1, 1), (1, 0.5))
    )
    # 64 px at a long side of 512 is 8 px of this 64-px image: half the gain up to 4 px in, full from 8
    gain = (hole_depth(mask, 64, 64.0) / 64.0).clamp(0.5, 1)
    assert gain[20, 32] == 0.5 and gain[27, 32] == 1.0 and gain[32, 32] == 1.0
    assert torch.allclose(ramped - plain, gain * (flat - plain), atol=1e-5)


def test_detail_skips_the_feather_band_and_a_missing_vote_layer(vgg):
    image, mask, start = _grain(1)
    options = {**FAST, **GRAIN_ALONE, "init": start, "feather": 3}
    plain, grained = (inpaint(image, mask, feature_net=vgg, **{**options, "detail": d}) for d in (0.0, 1.0))
    band = ~mask & (plain != image).any(0)
    assert band.any() and torch.equal(plain[:, band], grained[:, band])
    assert not torch.equal(plain[:, mask], grained[:, mask])
    # no matches of the vote layer: no grain, and no error about a setting the caller never set
    off = inpaint(image, mask, feature_net=vgg, **{**options, "detail": 1.0, "vote_layer": "relu2_1"})
    assert torch.equal(off, plain)


def test_detail_cap_scales_the_hole_s_fine_detail_down_to_its_surroundings(vgg):
    from neuralpatch.geometry import dilate
    from neuralpatch.synthesis import gaussian_blur

    image, mask, start = _grain(2)
    options = {**FAST, **GRAIN_ALONE, "init": start, "detail": 4.0}
    free, capped, loose = (inpaint(image, mask, feature_net=vgg, **{**options, "detail_cap": c}) for c in (0.0, 1.0, 1e6))

    band = free - gaussian_blur(free, 0.7)
    ring = dilate(mask, 2) & ~mask  # 16 px at a long side of 512 is 2 px of this 64-px image
    hole_energy, ring_energy = band[:, mask].square().mean(), band[:, ring].square().mean()
    assert hole_energy > 1.5 * ring_energy  # gain 4 overshoots the photo's grain
    keep = (ring_energy / hole_energy).sqrt()
    assert torch.allclose(capped[:, mask], (free - (1 - keep) * band)[:, mask].clamp(0, 1), atol=1e-5)
    assert torch.equal(capped[:, ~mask], image[:, ~mask])
    assert torch.equal(loose, free)  # a cap above the hole's detail changes nothing


def test_edge_blend_mixes_the_hole_s_rim_with_the_surrounding_colours(vgg):
    """Known pixels of one colour on the left and another on the right, around a hole held at a
    third: the first ring takes its own side's colour, the next two 2/3 and 1/3 of the way to it,
    deeper pixels keep the fill. A feather band, which treats the seam itself, turns it off."""
    image, mask = torch.full((3, 64, 64), 0.2), torch.zeros(64, 64, dtype=torch.bool)
    image[:, :, 32:] = 0.6
    mask[20:44, 8:56] = True
    start = torch.full((3, 64, 64), 0.9)
    plain, blended = (inpaint(image, mask, feature_net=vgg, init=start, **_frozen(edge_blend=w)) for w in (0, 3))
    assert torch.allclose(plain[:, mask], start[:, mask], atol=1e-5)
    assert torch.equal(blended[:, ~mask], image[:, ~mask])
    for side, colour, columns in (("left", 0.2, slice(8, 28)), ("right", 0.6, slice(36, 56))):
        for ring, weight in enumerate((1.0, 2 / 3, 1 / 3, 0.0), start=1):
            depth = ring - 1  # pixels between this ring and the known ones
            top_row = blended[:, 20 + depth, columns][:, depth + 1 : -(depth + 1)]  # clear of the side rings
            torch.testing.assert_close(top_row, torch.full_like(top_row, 0.9 + weight * (colour - 0.9)), msg=f"{side} ring {ring}")
    feathered = inpaint(image, mask, feature_net=vgg, init=start, **_frozen(edge_blend=3, feather=2))
    assert torch.allclose(feathered[:, mask], start[:, mask], atol=1e-5)


def test_detail_of_a_smooth_photo_is_nothing(vgg):
    image, mask = torch.full((3, 64, 64), 0.4), torch.zeros(64, 64, dtype=torch.bool)
    mask[20:44, 20:44] = True
    options = {**FAST, **GRAIN_ALONE, "init": torch.full((3, 64, 64), 0.6)}
    plain, grained = (inpaint(image, mask, feature_net=vgg, **{**options, "detail": d}) for d in (0.0, 1.0))
    assert torch.allclose(plain, grained, atol=1e-6)
    for name in ("detail", "detail_sigma"):
        with pytest.raises(ValueError, match=f"{name}: expected a value >= 0"):
            inpaint(image, mask, feature_net=vgg, **{**FAST, name: -1.0})


def test_cli_demo_runs_the_fast_preset_at_full_resolution(tmp_path, monkeypatch):
    pipeline = importlib.import_module("neuralpatch.synthesis")
    seen = {}

    def recording_inpaint(image, mask, **options):
        seen.update(options)
        return torch.zeros(3, *mask.shape)

    monkeypatch.setattr(pipeline, "inpaint", recording_inpaint)
    assert main(["inpaint", "--demo", "-o", str(tmp_path / "d.png"), "-q"]) == 0
    assert seen["preset"] == "fast" and seen["max_scales"] == 1
    assert main(["inpaint", "--demo", "-o", str(tmp_path / "e.png"), "--preset", "default", "-q"]) == 0
    assert seen["preset"] == "default"


def test_cli_demo_never_overwrites_without_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / "neuralpatch_demo.png"
    existing.write_bytes(b"keep me")
    assert main(["inpaint", "--demo", "-q"]) == 2
    assert existing.read_bytes() == b"keep me"


# --------------------------------------------------------------------------------------------- entry checks


def _png_header_only(path, width, height):
    """A PNG that declares width x height pixels and holds no image data."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_bad_values_are_named_at_the_entry(vgg):
    image, mask = photo(), torch.zeros(48, 64, dtype=torch.bool)
    mask[12:36, 20:44] = True
    broken = image.clone()
    broken[0, 20, 30] = float("nan")
    with pytest.raises(ValueError, match="image: contains NaN"):
        inpaint(broken, mask, feature_net=vgg, **FAST)
    for name in ("alpha", "beta", "gamma", "detail", "detail_sigma", "content_blur"):
        with pytest.raises(ValueError, match=f"{name}: expected a finite"):
            inpaint(image, mask, feature_net=vgg, **{**FAST, name: float("nan")})
    with pytest.raises(ValueError, match="device: 'tpu:7'"):
        inpaint(image, mask, feature_net=vgg, **{**FAST, "device": "tpu:7"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            inpaint(image, mask, feature_net=vgg, **{**FAST, "device": "cuda"})


def test_cli_exit_codes_for_a_bomb_and_bad_devices(files, capsys):
    image, mask, tmp = files
    bomb = _png_header_only(tmp / "bomb.png", 60000, 60000)
    base = [a for a in CLI_FAST if a not in ("--device", "cpu")]
    assert main(["inpaint", str(bomb), str(mask), "-o", str(tmp / "o.png"), *base]) == 2
    assert "more pixels than Pillow" in capsys.readouterr().err
    assert main(["inpaint", str(image), str(mask), "-o", str(tmp / "o.png"), "--device", "tpu:7", *base]) == 2
    if not torch.cuda.is_available():
        assert main(["inpaint", str(image), str(mask), "-o", str(tmp / "o.png"), "--device", "cuda", *base]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp / "o.png").exists()


def test_search_demo_reports_the_keys_the_search_can_return(monkeypatch):
    """`neuralpatch demo` prints its key count: it must be the number of keys patch_nn searches
    (wholly outside the hole and wholly inside the map), not the mask's raw count."""
    import neuralpatch.demo as demo
    from neuralpatch.geometry import dilate, interior, shrink_mask
    from neuralpatch.masks import centre_square

    seen = {}
    real = demo.patch_nn

    def spy(query, key, query_mask, key_mask, *args):
        seen["usable"] = int((key_mask & interior(*key_mask.shape, 3)).sum())
        return real(query, key, query_mask, key_mask, *args)

    monkeypatch.setattr(demo, "patch_nn", spy)
    report = demo.run("chelsea", output=None, backend="torch", precision="fp32")
    assert report["keys"] == seen["usable"]
    hole = shrink_mask(centre_square(300, 451, 0.3), (150, 225))
    assert report["keys"] == int((~dilate(hole, 1) & interior(150, 225, 3)).sum()) == 30700


def test_chroma_smoothness_removes_colour_fringes_and_keeps_the_luminance(vgg):
    # a grey photo whose start holds both luminance and colour noise in the hole
    gen = torch.Generator().manual_seed(3)
    image, mask = torch.full((3, 64, 64), 0.5), torch.zeros(64, 64, dtype=torch.bool)
    mask[20:44, 20:44] = True
    luma = 0.1 * (torch.rand(1, 64, 64, generator=gen) - 0.5)
    colour = 0.1 * (torch.rand(3, 64, 64, generator=gen) - 0.5)
    start = image + luma + (colour - colour.mean(0, keepdim=True))
    options = {**FAST, **GRAIN_ALONE, "iterations": 20, "init": start, "alpha": 0.0, "beta": 0.0, "detail": 0.0, "content_blur": 0.0}
    plain, smooth = (inpaint(image, mask, feature_net=vgg, **{**options, "beta_chroma": b}) for b in (0.0, 10.0))
    grey = lambda out: out.mean(0, keepdim=True)  # noqa: E731
    assert _hole_gradient_energy(smooth - grey(smooth), mask) < 0.2 * _hole_gradient_energy(plain - grey(plain), mask)
    assert torch.allclose(grey(smooth)[:, mask], grey(plain)[:, mask], atol=1e-3)
    with pytest.raises(ValueError, match="beta_chroma: expected a value >= 0"):
        inpaint(image, mask, feature_net=vgg, **{**FAST, "beta_chroma": -1.0})


def _camera(height=48, width=64):
    data = pytest.importorskip("skimage.data")
    grey = torch.tensor(data.camera()).float()[None, None] / 255
    return torch.nn.functional.interpolate(grey, size=(height, width), mode="area")[0, 0]


SEPIA_BASE, SEPIA_TONE = torch.tensor([0.1, 0.06, 0.02]), torch.tensor([0.8, 0.6, 0.4])


def _sepia(grey):
    """A grey (H, W) photo toned sepia: its colours lie on the line SEPIA_BASE + t * SEPIA_TONE."""
    return SEPIA_BASE[:, None, None] + grey * SEPIA_TONE[:, None, None]


def test_monochrome_line_finds_one_hue_photos_only():
    grey = _camera()
    known = torch.ones(grey.shape, dtype=torch.bool)
    known[12:36, 20:44] = False
    for image, axis in ((grey.expand(3, -1, -1), torch.ones(3)), (_sepia(grey), SEPIA_TONE)):
        point, direction = monochrome_line(image, known, 3 / 255)
        assert torch.allclose(direction.abs(), axis / axis.norm(), atol=1e-4)
        assert torch.allclose(onto_line(image, (point, direction)), image, atol=1e-5)
    data = pytest.importorskip("skimage.data")
    chelsea = torch.tensor(data.chelsea()[::6, ::6][:48, :64]).permute(2, 0, 1).float() / 255
    assert monochrome_line(chelsea, known, 3 / 255) is None
    assert monochrome_line(grey.expand(3, -1, -1), known, 0.0) is None

    # a red pixel or two (under MONOCHROME_OUTLIERS of the known ones) leave a grey photo grey; a red patch does not
    red = grey.expand(3, -1, -1).clone()
    red[:, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    assert monochrome_line(red, known, 3 / 255) is not None
    red[:, :4, :8] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    assert monochrome_line(red, known, 3 / 255) is None
    # a known strip that the grid of samples misses uses every pixel
    pipeline = importlib.import_module("neuralpatch.synthesis")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "MONOCHROME_SAMPLES", 64)
        assert monochrome_line(red, known, 3 / 255) is None
        assert monochrome_line(grey.expand(3, -1, -1), known, 3 / 255) is not None
        strip = torch.zeros_like(known)
        strip[:, 1] = True
        assert monochrome_line(chelsea, strip, 3 / 255) is None
        chelsea_strip = chelsea.clone()
        chelsea_strip[:, :, 1] = grey[:, 1]
        assert monochrome_line(chelsea_strip, strip, 3 / 255) is not None
    # a large photo decides on a regular grid of about MONOCHROME_SAMPLES pixels: red off the
    # grid's rows and columns goes unseen (every 3rd row and column here)
    big_grey = _camera(256, 256).expand(3, -1, -1).clone()
    big_known = torch.ones(256, 256, dtype=torch.bool)
    big_known[64:128, 64:128] = False
    off_grid = torch.zeros(256, 256, dtype=torch.bool)
    off_grid[:60, :60] = True
    off_grid[::3, ::3] = False
    big_grey[:, off_grid] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    assert monochrome_line(big_grey, big_known, 3 / 255) is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "MONOCHROME_SAMPLES", 8192)
        assert monochrome_line(big_grey, big_known, 3 / 255) is not None
    flat = torch.full((3, 48, 64), 0.3)
    point, direction = monochrome_line(flat, known, 3 / 255)
    assert torch.equal(direction, torch.zeros(3))
    assert torch.allclose(onto_line(chelsea, (point, direction)), flat)


def test_a_monochrome_photo_s_fill_stays_on_its_colour_line(vgg):
    # the random VGG's texture gradients put colour into the hole of a sepia photo
    image = _sepia(_camera(96, 128))
    mask = torch.zeros(96, 128, dtype=torch.bool)
    mask[24:72, 40:88] = True

    def off_line(out):
        centred = out - SEPIA_BASE[:, None, None]
        unit = SEPIA_TONE / SEPIA_TONE.norm()
        return (centred - (centred * unit[:, None, None]).sum(0) * unit[:, None, None]).norm(dim=0)[mask]

    options = {**FAST, "max_scales": 1, "iterations": 4}
    free, kept = (inpaint(image, mask, feature_net=vgg, **options, monochrome_tolerance=t) for t in (0.0, 3 / 255))
    assert off_line(free).max() > 0.005  # 1.3 levels of 255
    assert off_line(kept).max() < 1e-4
    assert torch.equal(kept[:, ~mask], image[:, ~mask])
    with pytest.raises(ValueError, match="monochrome_tolerance: expected a value >= 0"):
        inpaint(image, mask, feature_net=vgg, **{**FAST, "monochrome_tolerance": -1.0})
