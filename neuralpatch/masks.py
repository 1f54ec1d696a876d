"""Hole masks for training, validation and benchmarks: centre squares, random rectangles and
free-form strokes.

Every generator returns a bool ``(H, W)`` CPU tensor, True = hole, and draws all its randomness
from the ``torch.Generator`` it is given, so a seed gives the same masks on every machine. Sizes
are fractions of the image, so the same settings make comparable masks at 64² and at 4096².
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MASK_KINDS", "MASK_MIX", "centre_square", "check_mask_mix", "free_form_strokes", "random_mask", "random_rectangles"]


def _check_size(h: int, w: int) -> None:
    for name, value in (("h", h), ("w", w)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name}: expected a positive size, got {value}")


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")


def _check_range(name: str, value, low: float, high: float, integer: bool = False) -> tuple:
    """A (min, max) pair with low <= min <= max <= high."""
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a (min, max) pair, got {value!r}") from None
    if integer and not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
        raise TypeError(f"{name}: expected two ints, got {value!r}")
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name}: expected {low} <= min <= max <= {high}, got {value!r}")
    return lo, hi


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def centre_square(h: int, w: int, frac: float = 0.5) -> Tensor:
    """A centred square hole whose side is ``frac`` of the shorter image side (at least 1 pixel).

    ``frac=0.5`` is the Context Encoder / paper setting (a 64² hole in 128², 256² in 512²).

    Returns:
        bool (h, w) mask, True inside the square.
    """
    _check_size(h, w)
    if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0.0 < frac <= 1.0:
        raise ValueError(f"frac: expected a number in (0, 1], got {frac!r}")
    side = max(1, round(frac * min(h, w)))
    top, left = (h - side) // 2, (w - side) // 2
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


def random_rectangles(
    h: int,
    w: int,
    generator: torch.Generator,
    count: tuple[int, int] = (1, 3),
    size_frac: tuple[float, float] = (0.1, 0.5),
) -> Tensor:
    """The union of ``count`` axis-aligned rectangles placed uniformly inside the frame (they may
    touch the border and overlap).

    Args:
        count: (min, max) number of rectangles, drawn uniformly.
        size_frac: (min, max) rectangle height as a fraction of ``h`` and width as a fraction of
            ``w``, drawn independently, so rectangles are not square.

    Returns:
        bool (h, w) mask, never empty.
    """
    _check_size(h, w)
    _check_generator(generator)
    n_lo, n_hi = _check_range("count", count, 1, math.inf, integer=True)
    f_lo, f_hi = _check_range("size_frac", size_frac, 0.0, 1.0)
    mask = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(_randint(generator, n_lo, n_hi)):
        rh = min(h, max(1, round(_uniform(generator, f_lo, f_hi) * h)))
        rw = min(w, max(1, round(_uniform(generator, f_lo, f_hi) * w)))
        top, left = _randint(generator, 0, h - rh), _randint(generator, 0, w - rw)
        mask[top : top + rh, left : left + rw] = True
    return mask


def _draw_capsule(mask: Tensor, y0: float, x0: float, y1: float, x1: float, radius: float) -> None:
    """Set every pixel whose centre lies within ``radius`` of the segment (y0, x0)-(y1, x1):
    a thick line with round caps. Only the segment's bounding box is touched."""
    h, w = mask.shape
    top, bottom = max(0, math.floor(min(y0, y1) - radius)), min(h, math.ceil(max(y0, y1) + radius) + 1)
    left, right = max(0, math.floor(min(x0, x1) - radius)), min(w, math.ceil(max(x0, x1) + radius) + 1)
    if top >= bottom or left >= right:
        return
    ys = torch.arange(top, bottom, dtype=torch.float32)[:, None]
    xs = torch.arange(left, right, dtype=torch.float32)[None, :]
    dy, dx = y1 - y0, x1 - x0
    length2 = dy * dy + dx * dx
    if length2 > 0:
        t = (((ys - y0) * dy + (xs - x0) * dx) / length2).clamp(0.0, 1.0)
    else:
        t = torch.zeros(())
    dist2 = (ys - (y0 + t * dy)) ** 2 + (xs - (x0 + t * dx)) ** 2
    mask[top:bottom, left:right] |= dist2 <= radius * radius


def free_form_strokes(
    h: int,
    w: int,
    generator: torch.Generator,
    strokes: tuple[int, int] = (1, 4),
    vertices: tuple[int, int] = (4, 12),
    length_frac: tuple[float, float] = (0.05, 0.25),
    width_frac: tuple[float, float] = (0.03, 0.1),
    max_turn: float = 2 * math.pi / 5,
) -> Tensor:
    """Thick random polylines, after the free-form masks of DeepFill v2 (Yu et al., ICCV 2019).

    Each stroke starts at a uniform random pixel, heads in a random direction, and for each
    vertex turns by up to ``max_turn`` radians (alternating left and right, so strokes wander
    instead of curling up), walks a random length and draws a segment of random width with round
    joints. Vertices are clamped to the frame.

    Args:
        strokes: (min, max) number of strokes.
        vertices: (min, max) segments per stroke.
        length_frac: (min, max) segment length as a fraction of the shorter side.
        width_frac: (min, max) brush width as a fraction of the shorter side (at least 1 pixel).
        max_turn: largest turn between segments, radians.

    Returns:
        bool (h, w) mask, never empty (a stroke always covers its start pixel).
    """
    _check_size(h, w)
    _check_generator(generator)
    s_lo, s_hi = _check_range("strokes", strokes, 1, math.inf, integer=True)
    v_lo, v_hi = _check_range("vertices", vertices, 1, math.inf, integer=True)
    l_lo, l_hi = _check_range("length_frac", length_frac, 0.0, math.inf)
    w_lo, w_hi = _check_range("width_frac", width_frac, 0.0, 1.0)
    short = min(h, w)
    mask = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(_randint(generator, s_lo, s_hi)):
        y, x = float(_randint(generator, 0, h - 1)), float(_randint(generator, 0, w - 1))
        heading = _uniform(generator, 0.0, 2 * math.pi)
        for vertex in range(_randint(generator, v_lo, v_hi)):
            turn = _uniform(generator, 0.0, max_turn)
            heading += turn if vertex % 2 == 0 else -turn
            length = _uniform(generator, l_lo, l_hi) * short
            radius = max(0.5, _uniform(generator, w_lo, w_hi) * short / 2)
            ny = min(max(y + length * math.sin(heading), 0.0), h - 1.0)
            nx = min(max(x + length * math.cos(heading), 0.0), w - 1.0)
            _draw_capsule(mask, y, x, ny, nx, radius)
            y, x = ny, nx
    return mask


# Mixture used by random_mask: (kind, probability). Rectangles and strokes dominate because the
# pipeline's holes are arbitrary; centre squares keep the Context Encoder's setting in the mix.
MASK_MIX = (("centre", 0.2), ("rectangles", 0.4), ("strokes", 0.4))
# Centre-square side range for random_mask, as a fraction of the shorter side (0.5 is the paper's).
CENTRE_FRAC = (0.25, 0.5)


MASK_KINDS = ("centre", "rectangles", "strokes")


def check_mask_mix(mix) -> tuple[tuple[str, float], ...]:
    """``mix`` as (kind, probability) pairs of :data:`MASK_KINDS`, the probabilities scaled to
    sum to 1; ValueError for an unknown or repeated kind, a negative or non-finite weight, or
    weights that sum to 0."""
    pairs = tuple((str(kind), float(weight)) for kind, weight in mix)
    kinds = [kind for kind, _ in pairs]
    if not pairs or any(kind not in MASK_KINDS for kind in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"mix: expected distinct kinds among {MASK_KINDS}, got {kinds}")
    weights = [weight for _, weight in pairs]
    if any(not math.isfinite(weight) or weight < 0 for weight in weights) or sum(weights) <= 0:
        raise ValueError(f"mix: expected weights >= 0 with a positive sum, got {weights}")
    total = sum(weights)
    return tuple((kind, weight / total) for kind, weight in pairs)


def random_mask(h: int, w: int, generator: torch.Generator, mix: tuple[tuple[str, float], ...] = MASK_MIX) -> Tensor:
    """One mask from the mixture ``mix`` (:data:`MASK_MIX` by default; see
    :func:`check_mask_mix`): a centre square (side drawn from :data:`CENTRE_FRAC`), random
    rectangles, or free-form strokes, with their default settings.

    Returns:
        bool (h, w) mask, never empty.
    """
    _check_size(h, w)
    _check_generator(generator)
    mix = check_mask_mix(mix)
    u, total = _uniform(generator, 0.0, 1.0), 0.0
    kind = mix[-1][0]
    for name, p in mix:
        total += p
        if u < total:
            kind = name
            break
    if kind == "centre":
        return centre_square(h, w, _uniform(generator, *CENTRE_FRAC))
    if kind == "rectangles":
        return random_rectangles(h, w, generator)
    return free_form_strokes(h, w, generator)
