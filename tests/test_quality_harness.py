"""bench/quality.py's held-out sets, on stand-in directories: the reserved packages themselves are
never read by tests."""

import numpy as np
import pytest
from PIL import Image

from bench import quality


@pytest.fixture
def stand_in_sets(tmp_path, monkeypatch):
    """Both held-out sets pointed at empty directories under tmp_path."""
    sets = {
        "flat": quality.HeldOutSet("flat-package", "flat", tmp_path / "flat"),
        "nested": quality.HeldOutSet("nested-package", "nested", tmp_path / "nested", stems=("One", "Two"), file="{stem}/images/big.jpg"),
    }
    monkeypatch.setattr(quality, "HELD_OUT_SETS", sets)
    return sets


def _write_photo(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(path)


def test_held_out_sets_list_and_read_their_photos(stand_in_sets):
    flat, nested = stand_in_sets["flat"], stand_in_sets["nested"]
    assert flat.photos() == [] and nested.photos() == []
    _write_photo(flat.directory / "b.jpg", 10)
    _write_photo(flat.directory / "a.jpg", 200)
    _write_photo(nested.path("Two"), 90)  # "One" is listed but not installed: left out
    (nested.directory / "Three.jpg").write_bytes(b"")  # not a listed stem: ignored

    assert flat.photos() == ["flat:a", "flat:b"]
    assert nested.photos() == ["nested:Two"]
    assert abs(int(quality.photo_array("flat:a").mean()) - 200) <= 2
    assert abs(int(quality.photo_array("nested:Two").mean()) - 90) <= 2
    assert quality.photo_array("nested:Two").shape == (6, 8, 3)


def test_a_missing_held_out_photo_names_its_package(stand_in_sets):
    with pytest.raises(FileNotFoundError, match="apt-get install nested-package"):
        quality.photo_array("nested:One")


def test_held_out_without_the_package_is_a_usage_error(stand_in_sets, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--held-out", "nested"])
    assert exit_info.value.code == 2
    assert "apt-get install nested-package" in capsys.readouterr().err


def test_held_out_rejects_an_unknown_set_and_photos_from_outside_it(stand_in_sets, capsys):
    _write_photo(stand_in_sets["flat"].directory / "a.jpg", 200)
    for argv, message in (
        (["--held-out", "other"], "invalid choice"),
        (["--held-out", "flat", "--photos", "chelsea"], "--photos: unknown ['chelsea']; known: ['flat:a']"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            quality.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_the_shipped_sets_are_the_reserved_packages():
    from neuralpatch.content_data import HELD_OUT_PACKAGES

    assert {held.package for held in quality.HELD_OUT_SETS.values()} == HELD_OUT_PACKAGES
