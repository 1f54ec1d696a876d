"""Image files: atomic writes through Pillow."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

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


READABLE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm"}


def _open(source, name: str) -> Image.Image:
    """A fully decoded Pillow image; corrupt, truncated or unsupported files raise ValueError."""
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    if path.suffix.lower() not in READABLE_EXTENSIONS:
        raise ValueError(f"{name}: unsupported extension {path.suffix!r} of {path}; use one of {sorted(READABLE_EXTENSIONS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file: {path}")
    try:
        img = Image.open(path)
        img.load()  # decode now, so a truncated file fails here and not later
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{name}: {path} declares more pixels than Pillow decodes safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{name}: cannot read {path}: {exc}") from exc
    return img


def _to_float(img: Image.Image) -> torch.Tensor:
    """Any Pillow mode -> (C, H, W) float32 in [0, 1], 16-bit modes kept at full precision."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img, dtype=np.float32) / (65535.0 if img.mode != "I" or np.asarray(img).max() > 255 else 255.0)
        return torch.from_numpy(np.ascontiguousarray(array))[None].clamp(0, 1)
    if img.mode == "F":
        return torch.from_numpy(np.asarray(img, dtype=np.float32).copy())[None].clamp(0, 1)
    array = np.asarray(img)
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float() / 255.0


def read_image(source) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read an image file (or Pillow image) as (3, H, W) float32 RGB in [0, 1], plus the hole
    given by its alpha channel ((H, W) bool, transparent = hole) or None when it has none.

    RGBA, LA, grayscale, 16-bit, palette (with or without transparency) and CMYK are handled.
    """
    img = _open(source, "image")
    alpha = None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        alpha = torch.from_numpy(np.asarray(img.getchannel("A")).copy()) < 128
        img = img.convert("RGB")
    elif img.mode not in ("RGB", "L", "I;16", "I;16B", "I;16L", "I", "F"):
        img = img.convert("RGB")
    image = _to_float(img)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1).contiguous()
    if alpha is not None and not bool(alpha.any()):
        alpha = None  # fully opaque: no hole information
    return image, alpha


def read_mask(source) -> torch.Tensor:
    """Read a mask file (or Pillow image) as (H, W) bool: white (above half) = hole."""
    img = _open(source, "mask")
    if img.mode == "1":
        img = img.convert("L")
    if img.mode in ("RGBA", "LA", "PA", "P"):
        img = img.convert("RGBA").convert("L") if img.mode != "LA" else img.convert("L")
    values = _to_float(img if img.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F", "1") else img.convert("L"))
    return values.mean(0) > 0.5
