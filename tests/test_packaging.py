"""Packaging: one version, the licence file pyproject names."""

import importlib.metadata
from pathlib import Path

import tomllib

import neuralpatch

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_written_once():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("neuralpatch") == neuralpatch.__version__


def test_the_licence_file_is_the_one_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
