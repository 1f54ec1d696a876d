"""Image files: atomic writes through Pillow."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

WRITABLE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, H, W) float tensor in [0, 1] -> 8-bit Pillow image."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image: expected shape (3, H, W) or (1, H, W), got {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[2] == 1 else array))


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is renamed
    onto ``path``, so a reader never sees a half-written file. On failure the
    temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image_atomic(image: torch.Tensor, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write ``image`` ((3, H, W) in [0, 1]) to ``path`` atomically (see :func:`atomic_path`)."""
    path = Path(path)
    fmt = WRITABLE_EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"output: unsupported extension {path.suffix!r}; use one of {sorted(WRITABLE_EXTENSIONS)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output: {path} exists (pass overwrite=True to replace it)")
    pil = to_pil(image)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            pil.save(handle, format=fmt)
            handle.flush()
            os.fsync(handle.fileno())
    return path
