"""Shared fixtures. Triton runs under its interpreter wherever torch sees no CUDA GPU (a
CPU-only torch on a GPU host included); that has to be decided before triton is first
imported, hence here. Importing torch and asking it about CUDA does not import triton."""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from neuralpatch.ops import available_backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") and not HAS_CUDA:
            item.add_marker(skip)


def device_params():
    """cpu always; cuda as a `cuda`-marked parameter."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def require_backend(backend: str, device: str) -> None:
    ok, reason = available_backends(device)[backend]
    if not ok:
        pytest.skip(reason)
