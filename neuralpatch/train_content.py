"""``neuralpatch train-content``: train the content network.

Data: every image under ``--images`` (read with Pillow, converted to RGB; unreadable files are
skipped with a warning). Each sample is a random square-ish crop (side a log-uniform fraction of
the shorter side, aspect ratio jittered, at most 2x upsampling), resized to ``--size``², flipped
left-right half of the time, with a mask from :func:`neuralpatch.masks.random_mask` (centre
squares, random rectangles, free-form strokes). Sample ``i`` of epoch ``e`` is drawn from its own
generator seeded by (``--seed``, e, i), so a run is reproducible whatever ``--workers`` is, and a
run resumed from a checkpoint continues exactly as if it had not stopped.

Loss (Context Encoder / Yang et al.): ``(1 - w) * L_rec + w * L_adv`` with ``w = --adv-weight``
(0 by default; 0.001 is the paper's, i.e. 0.999 L2 + 0.001 adversarial). ``L_rec`` is the mean
error (``--loss``: L1 by default, the measure the evaluation reports; L2 the paper's) over the
hole plus ``--known-weight`` (0.1) times the mean error over the known pixels: the caller only
pastes the hole, but the prediction just outside it is what bilinear upsampling blends into the
hole's edge. ``L_adv`` is the
non-saturating GAN loss against a small patch discriminator that sees the composite (prediction
pasted into the hole) and the mask.

Validation (``--val-images``, every epoch): each held-out photo is resized to ``--size``² (the
whole photo, aspect not kept, as :meth:`ContentNet.predict` does) and gets ``--val-masks`` fixed
seeded masks (a centre square, then free-form strokes), so numbers are comparable across epochs
and runs. L1 and PSNR are measured in the hole only, for the network (every epoch), and at the
last epoch also for its parameter-free prior alone (what training improves on), for mean-colour
fill, for OpenCV's Telea inpainting when ``opencv-python-headless`` is installed (a dev-only
comparison, never a dependency) and for the ``--compare`` weights, per mask kind, as a table.

Checkpoints (every epoch, written atomically) are safetensors: the generator, the discriminator
and both Adam states as tensors, the epoch, step, config and settings in the metadata.
``--resume`` continues from one; ``--out`` receives only the generator weights, which is what
:func:`neuralpatch.models.content.load_content_net` reads (it also reads checkpoints).

``python -m neuralpatch.train_content --prepare-data DIR`` gathers the training and validation
photos with their manifest (:mod:`neuralpatch.content_data`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from neuralpatch.masks import MASK_MIX, centre_square, check_mask_mix, free_form_strokes, random_mask
from neuralpatch.models.content import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_GENERATOR_PREFIX,
    PRIORS,
    ContentNet,
    ContentNetConfig,
    check_state_dict,
    content_input,
    content_state_from_file,
    mean_fill,
    prior_fill,
    read_content_weights,
    residual_bases,
    save_content_net,
)
from neuralpatch.models.weights import CheckpointError, write_safetensors_atomic

# Seed of the validation masks: fixed, so that numbers compare across epochs and runs.
VAL_SEED = 20170721
# Crop side as a fraction of the photo's shorter side (log-uniform), and the largest upsampling
# allowed: below half the training size a crop is mostly interpolation blur.
CROP_SCALE = (0.3, 1.0)
MAX_UPSCALE = 2.0
# Crop aspect ratio (width / height, log-uniform) before the resize to a square: the pipeline
# squashes whole photos to 128², so the network should see squashed content.
CROP_ASPECT = (2 / 3, 3 / 2)
# Photos are reduced on load so that their long side is at most this (memory only).
MAX_PHOTO_SIDE = 4096
# Linear warm-up steps, then cosine decay to LR_FLOOR * lr at the last step.
WARMUP_STEPS = 100
LR_FLOOR = 0.1
# Prefix of the --ema weights (an AveragedModel's state) inside a training checkpoint, beside the
# generator's CHECKPOINT_GENERATOR_PREFIX.
CHECKPOINT_EMA_PREFIX = "ema."


# ---------------------------------------------------------------------------------------------
# Photos


def find_image_files(dirs, what: str = "--images") -> list[Path]:
    """Files under ``dirs`` (recursively, hidden ones skipped) whose extension Pillow can read,
    sorted. A missing directory or one with no such file is an error naming ``what``."""
    from PIL import Image

    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    files: list[Path] = []
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise FileNotFoundError(f"{what}: {d} does not exist")
        if not d.is_dir():
            raise ValueError(f"{what}: {d} is not a directory")
        found = sorted(
            p
            for p in d.rglob("*")
            if p.is_file() and p.suffix.lower() in extensions and not any(part.startswith(".") for part in p.relative_to(d).parts)
        )
        if not found:
            raise ValueError(f"{what}: no image files under {d}")
        files.extend(found)
    return files


def load_photos(files, max_side: int = MAX_PHOTO_SIDE, max_short: int | None = None) -> list[tuple[str, Tensor]]:
    """(name, uint8 (3, H, W)) for each readable file, converted to RGB. Photos are reduced
    (Lanczos) so that the long side is at most ``max_side`` and, if given, the short side at
    most ``max_short``. Unreadable files are skipped with a warning."""
    from PIL import Image

    photos = []
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = min(1.0, max_side / max(w, h), (max_short or math.inf) / min(w, h))
                if scale < 1.0:
                    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            warnings.warn(f"{path}: skipped, not a readable image ({err})", stacklevel=2)
            continue
        photos.append((str(path), data.permute(2, 0, 1).contiguous()))
    return photos


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=gen, dtype=torch.float64).item()


def _log_uniform(gen: torch.Generator, low: float, high: float) -> float:
    return math.exp(_uniform(gen, math.log(low), math.log(high)))


def random_crop(photo: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """A random crop of a uint8 (3, H, W) photo, resized to float (3, size, size) in [0, 1] and
    flipped left-right with probability 1/2 (see :data:`CROP_SCALE`, :data:`CROP_ASPECT`)."""
    _, h, w = photo.shape
    short = min(h, w)
    low = min(short, max(CROP_SCALE[0] * short, size / MAX_UPSCALE))
    side = _log_uniform(gen, low, max(low, CROP_SCALE[1] * short))
    aspect = _log_uniform(gen, *CROP_ASPECT)
    ch = max(1, min(h, round(side / math.sqrt(aspect))))
    cw = max(1, min(w, round(side * math.sqrt(aspect))))
    top = int(torch.randint(0, h - ch + 1, (), generator=gen))
    left = int(torch.randint(0, w - cw + 1, (), generator=gen))
    crop = photo[:, top : top + ch, left : left + cw].float().div_(255.0)
    crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0].clamp_(0, 1)
    if torch.rand((), generator=gen).item() < 0.5:
        crop = crop.flip(-1)
    return crop


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The generator seed of sample ``index`` of ``epoch``."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63)


class CropSamples:
    """Map-style dataset for ``torch.utils.data.DataLoader``: ``len`` samples per epoch, sample
    ``i`` being (float (3, size, size) image, bool (size, size) mask) drawn from its own seeded
    generator. Call :meth:`set_epoch` before building each epoch's loader."""

    def __init__(self, photos: list[Tensor], size: int, length: int, seed: int, mask_mix=MASK_MIX):
        self.photos, self.size, self.length, self.seed, self.epoch = photos, size, length, seed, 0
        self.mask_mix = check_mask_mix(mask_mix)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        photo = self.photos[int(torch.randint(0, len(self.photos), (), generator=gen))]
        return random_crop(photo, self.size, gen), random_mask(self.size, self.size, gen, self.mask_mix)


# ---------------------------------------------------------------------------------------------
# Validation


def validation_set(photos: list[Tensor], size: int, masks_per_photo: int = 8, seed: int = VAL_SEED) -> tuple[Tensor, Tensor, list[str]]:
    """(N, 3, size, size) images, (N, size, size) masks and N mask kinds: each photo resized
    whole to size², with a centre square (half the side, kind "centre") and
    ``masks_per_photo - 1`` seeded free-form stroke masks (kind "free-form", the strokes of
    bench/quality.py). Depends only on the photos, ``size`` and ``seed``."""
    images, masks, kinds = [], [], []
    for index, photo in enumerate(photos):
        image = photo.float().div(255.0)[None]
        if min(image.shape[-2:]) >= size:
            image = F.interpolate(image, size=(size, size), mode="area")
        else:
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        image = image[0].clamp(0, 1)
        gen = torch.Generator().manual_seed(seed + index)
        for k in range(masks_per_photo):
            images.append(image)
            masks.append(
                centre_square(size, size, 0.5) if k == 0 else free_form_strokes(size, size, gen, strokes=(2, 4), width_frac=(0.04, 0.09))
            )
            kinds.append("centre" if k == 0 else "free-form")
    return torch.stack(images), torch.stack(masks), kinds


def hole_metrics(filled: Tensor, target: Tensor, masks: Tensor) -> tuple[float, float]:
    """Mean over images of the L1 error and of the PSNR (dB, peak 1), both over hole pixels only.

    Args:
        filled, target: (N, 3, H, W) in [0, 1].
        masks: bool (N, H, W).
    """
    hole = masks[:, None].to(filled.dtype)
    count = hole.sum(dim=(1, 2, 3)).clamp_min(1) * 3
    err = (filled.float() - target.float()).abs() * hole
    l1 = err.sum(dim=(1, 2, 3)) / count
    mse = err.pow(2).sum(dim=(1, 2, 3)) / count
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return l1.mean().item(), psnr.mean().item()


def telea_fill(images: Tensor, masks: Tensor, radius: int = 3) -> Tensor | None:
    """OpenCV's Telea inpainting of each image (8-bit round trip), or None when cv2 is not
    installed. A dev-only baseline: ``pip install opencv-python-headless``."""
    try:
        import cv2
    except ImportError:
        return None
    import numpy as np

    out = []
    for image, mask in zip(images, masks):
        bgr = np.ascontiguousarray((image.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)[..., ::-1])
        filled = cv2.inpaint(bgr, mask.cpu().numpy().astype(np.uint8) * 255, radius, cv2.INPAINT_TELEA)
        out.append(torch.from_numpy(np.ascontiguousarray(filled[..., ::-1])).permute(2, 0, 1).float() / 255.0)
    return torch.where(masks[:, None], torch.stack(out), images)


@torch.no_grad()
def predict_batch(net: ContentNet, images: Tensor, masks: Tensor, device: torch.device, batch_size: int = 16) -> Tensor:
    """Composites (prediction pasted into the hole) for images already at a valid size."""
    out = []
    for i in range(0, len(images), batch_size):
        x, m = images[i : i + batch_size].to(device), masks[i : i + batch_size].to(device)
        pred = net(content_input(x, m)).float()
        out.append(torch.where(m[:, None], pred, x).cpu())
    return torch.cat(out)


def evaluate(
    net: ContentNet,
    images: Tensor,
    masks: Tensor,
    device: torch.device,
    baselines: bool = True,
    kinds: list[str] | None = None,
    others: dict[str, ContentNet] | None = None,
) -> dict[str, tuple[float, float]]:
    """{"content net": (L1, PSNR), "prior only": ..., "mean fill": ..., "telea": ...} in the
    hole. "prior only" is the network's parameter-free prior (what the untrained network
    returns; absent for ``prior="none"``), "telea" needs cv2. ``baselines=False`` measures only
    the network. ``others``: more networks, measured under their names. With ``kinds`` (one
    mask kind per image) each entry is measured per kind too, as "<name> [<kind>]"."""
    fills = {}
    was_training = net.training
    net.eval()
    try:
        fills["content net"] = predict_batch(net, images, masks, device)
    finally:
        net.train(was_training)
    for name, other in (others or {}).items():
        fills[name] = predict_batch(other, images, masks, device)
    if baselines:
        if net.config.prior != "none":
            fills["prior only"] = prior_fill(images, masks, net.config.prior)
            bases = {"prior": fills["prior only"], **residual_bases(images, masks, net.config)}
            if len(bases) > 1:
                # what the untrained network returns: equal parts of its bases
                fills[" + ".join(bases) + " mix"] = sum(bases.values()) / len(bases)
        fills["mean fill"] = mean_fill(images, masks)
        telea = telea_fill(images, masks)
        if telea is not None:
            fills["telea"] = telea
    results = {name: hole_metrics(fill, images, masks) for name, fill in fills.items()}
    for kind in sorted(set(kinds or [])):
        pick = torch.tensor([k == kind for k in kinds])
        for name, fill in fills.items():
            results[f"{name} [{kind}]"] = hole_metrics(fill[pick], images[pick], masks[pick])
    return results


def format_table(results: dict[str, tuple[float, float]], kinds: list[str]) -> str:
    """A Markdown table: one row per method, hole L1 and PSNR per mask kind."""
    kinds = sorted(set(kinds))
    names = [n for n in results if "[" not in n]
    head = "| fill | " + " | ".join(f"{k} L1 | {k} PSNR" for k in kinds) + " |"
    rows = [head, "|---|" + "---|---|" * len(kinds)]
    for name in names:
        cells = [f"{results[f'{name} [{k}]'][0]:.4f} | {results[f'{name} [{k}]'][1]:.2f} dB" for k in kinds]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_sheet(path, images: Tensor, masks: Tensor, kinds: list[str], fills: dict[str, Tensor], per_kind: int = 1) -> None:
    """A PNG at the working size, pixel for pixel: one row per photo; for each mask kind the
    input (hole in magenta) and each fill, then the photo itself; a header names the columns.

    Args:
        images: (N, 3, S, S); masks: bool (N, S, S); kinds: N mask kinds (photo after photo).
        fills: name -> (N, 3, S, S) composites.
        per_kind: masks of each kind shown per photo.
    """
    from PIL import Image, ImageDraw

    order = sorted(set(kinds))
    n, size = len(kinds), images.shape[-1]
    starts = [i for i in range(n) if i == 0 or (kinds[i] == kinds[0] and kinds[i - 1] != kinds[0])]
    columns, labels = [], []
    for kind in order:
        for _ in range(per_kind):
            labels += [f"{kind}: input", *(f"{kind}: {name}" for name in fills)]
    labels.append("photo")
    header = 14
    sheet = Image.new("RGB", (size * len(labels), header + size * len(starts)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(labels):
        draw.text((c * size + 2, 1), label[:22], fill=(0, 0, 0))

    def tile(x: Tensor) -> Image.Image:
        return Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).mul(255).round().to(torch.uint8)).numpy())

    magenta = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    for r, start in enumerate(starts):
        end = starts[r + 1] if r + 1 < len(starts) else n
        c = 0
        for kind in order:
            picks = [i for i in range(start, end) if kinds[i] == kind][:per_kind]
            for i in picks:
                columns = [torch.where(masks[i][None], magenta, images[i])] + [fill[i] for fill in fills.values()]
                for x in columns:
                    sheet.paste(tile(x), (c * size, header + r * size))
                    c += 1
        sheet.paste(tile(images[start]), ((len(labels) - 1) * size, header + r * size))
    sheet.save(path)


def format_metrics(results: dict[str, tuple[float, float]]) -> str:
    return " | ".join(f"{name} L1 {l1:.4f} PSNR {psnr:.2f} dB" for name, (l1, psnr) in results.items())


# ---------------------------------------------------------------------------------------------
# Model pieces only training needs


class PatchDiscriminator(nn.Module):
    """Small patch discriminator: RGB + mask (B, 4, H, W) -> (B, 1, H/8, W/8) real/fake logits,
    one per overlapping patch (38 px receptive field). Kept narrow: with the paper's 0.001 weight
    it only nudges the generator, and a wider one costs as much as the generator on a CPU."""

    def __init__(self, width: int = 16, groups: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(4, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False),
            nn.GroupNorm(groups, 2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 4 * width, 4, stride=2, padding=1, bias=False),
            nn.GroupNorm(groups, 4 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * width, 1, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def reconstruction_loss(pred: Tensor, target: Tensor, masks: Tensor, known_weight: float, kind: str = "l2") -> Tensor:
    """Per image, the mean error over the hole + ``known_weight`` * the mean error over the known
    pixels; batch mean. ``kind``: "l1" (absolute) or "l2" (squared) error."""
    diff = pred.float() - target.float()
    err = (diff.abs() if kind == "l1" else diff.pow(2)).mean(dim=1)
    hole = masks.to(err.dtype)
    hole_mse = (err * hole).sum(dim=(1, 2)) / hole.sum(dim=(1, 2)).clamp_min(1)
    known_mse = (err * (1 - hole)).sum(dim=(1, 2)) / (1 - hole).sum(dim=(1, 2)).clamp_min(1)
    return (hole_mse + known_weight * known_mse).mean()


def learning_rate(step: int, total: int, base: float) -> float:
    """Linear warm-up over :data:`WARMUP_STEPS`, then cosine decay to ``LR_FLOOR * base``."""
    if step < WARMUP_STEPS:
        return base * (step + 1) / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
    return base * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _flatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict, metadata: dict) -> None:
    state = optimizer.state_dict()
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"{prefix}.state.{pid}.{key}"] = (
                (value if isinstance(value, Tensor) else torch.tensor(value)).detach().cpu().contiguous()
            )
    metadata[f"{prefix}.param_groups"] = json.dumps(state["param_groups"])


def _unflatten_optimizer(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict, metadata: dict, what: str) -> None:
    if f"{prefix}.param_groups" not in metadata:
        raise ValueError(f"{what}: the checkpoint has no {prefix} optimizer state")
    state: dict[int, dict[str, Tensor]] = {}
    head = f"{prefix}.state."
    for key, value in tensors.items():
        if key.startswith(head):
            pid, name = key[len(head) :].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata[f"{prefix}.param_groups"])})
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"{what}: the {prefix} optimizer state does not match ({err})") from err


def save_checkpoint(
    path: Path, generator: ContentNet, discriminator, opt_g, opt_d, scaler, epoch: int, step: int, settings: dict, ema=None
) -> None:
    """Everything needed to resume, as one safetensors file written atomically; ``ema`` is the
    :class:`torch.optim.swa_utils.AveragedModel` of ``--ema``, if any."""
    tensors = {CHECKPOINT_GENERATOR_PREFIX + k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    if ema is not None:
        tensors.update({CHECKPOINT_EMA_PREFIX + k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "config": generator.config.to_json(),
        "epoch": str(epoch),
        "step": str(step),
        "settings": json.dumps(settings, sort_keys=True),
        "scaler": json.dumps(scaler.state_dict()),
    }
    _flatten_optimizer("opt_g", opt_g, tensors, metadata)
    if discriminator is not None:
        tensors.update({"discriminator." + k: v.detach().cpu().contiguous() for k, v in discriminator.state_dict().items()})
        _flatten_optimizer("opt_d", opt_d, tensors, metadata)
    write_safetensors_atomic(Path(path), tensors, metadata)


def read_checkpoint(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a train-content checkpoint (safetensors only)."""
    tensors, metadata = read_content_weights(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"--resume: {path} is not a train-content checkpoint (format {metadata.get('format')!r}; "
            f"expected {CHECKPOINT_FORMAT!r}); the --out file holds weights only and cannot be resumed"
        )
    return tensors, metadata


def init_generator(generator: ContentNet, path) -> None:
    """Start ``generator`` from the weights in ``path`` (a weights file or a checkpoint) of a
    network of the same shape except for more bases (``peel``, ``patchmatch``: more input
    channels and mix logits, appended after the file's own bases) or more VGG taps
    (``features``): the weights of the new channels and projections start at zero, so the
    widened network returns what the file's did."""
    tensors, metadata = read_content_weights(path)
    source, state = content_state_from_file(tensors, metadata, str(path))
    source_taps = source.features
    target = generator.config.base_names
    if source.base_names != target[: len(source.base_names)]:
        # the new channels are appended: the file's bases must come first, in the same order
        raise CheckpointError(
            f"--init {path}: its network mixes the bases {list(source.base_names)}, which are not the first of "
            f"this network's {list(target)}; train from scratch or from a file with the same first bases"
        )
    if not set(source_taps) <= set(generator.config.features):
        raise CheckpointError(
            f"--init {path}: its network reads the VGG taps {list(source_taps)}, "
            f"not all of which this network's {list(generator.config.features)} read"
        )
    own = generator.state_dict()
    widened = {}
    for key, target in own.items():
        source = state.get(key)
        if source is None and key.startswith("feature_proj.") and key.split(".")[1] not in source_taps:
            widened[key] = target  # a tap the file's network did not read: its projection starts at zero
            continue
        if source is not None and source.dim() == target.dim() and all(a <= b for a, b in zip(source.shape, target.shape)):
            grown = torch.zeros_like(target)
            grown[tuple(slice(0, n) for n in source.shape)] = source.to(target.dtype)
            widened[key] = grown
        elif source is not None:
            widened[key] = source  # a shape that cannot grow: check_state_dict reports it
    check_state_dict(generator, widened, f"--init {path}")
    generator.load_state_dict(widened)


def _load_prefixed(module: nn.Module, tensors: dict, prefix: str, what: str) -> None:
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    check_state_dict(module, state, what)
    module.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Command line


def mask_mix_text(mix) -> str:
    """A mask mix as ``--mask-mix`` writes it: "centre=0.2,rectangles=0.4,strokes=0.4"."""
    return ",".join(f"{kind}={weight:g}" for kind, weight in mix)


def parse_mask_mix(text: str) -> tuple[tuple[str, float], ...]:
    """The mix of a ``--mask-mix`` text (:func:`mask_mix_text`'s form), checked and normalised by
    :func:`neuralpatch.masks.check_mask_mix`; ValueError when malformed."""
    return check_mask_mix(tuple((kind, float(weight)) for kind, _, weight in (item.partition("=") for item in text.split(","))))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``neuralpatch train-content`` (also ``python -m neuralpatch.train_content``)."""
    data = parser.add_argument_group("data")
    data.add_argument("--images", nargs="+", metavar="DIR", help="folders of training photos (searched recursively)")
    data.add_argument("--val-images", nargs="+", metavar="DIR", help="folders of held-out photos for validation every epoch")
    data.add_argument("--val-masks", type=int, default=16, metavar="N", help="fixed masks per validation photo (default: 16)")
    data.add_argument("--size", type=int, default=128, help="training resolution, a multiple of 16 (default: 128)")
    data.add_argument("--workers", type=int, default=0, help="data loader processes (default: 0, in the training process)")
    train = parser.add_argument_group("training")
    train.add_argument("--out", metavar="PATH", help="where to write the final generator weights (.safetensors)")
    train.add_argument("--epochs", type=int, default=16, help="total epochs, counting those of a resumed checkpoint (default: 16)")
    train.add_argument("--steps-per-epoch", type=int, default=200, metavar="N", help="optimiser steps per epoch (default: 200)")
    train.add_argument("--batch-size", type=int, default=16, help="(default: 16)")
    train.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate, warm-up then cosine decay (default: 1e-3)")
    train.add_argument(
        "--adv-weight",
        type=float,
        default=0.0,
        help="adversarial weight w: loss = (1-w) reconstruction + w adversarial; 0.001 is the paper's, 0 disables (default: 0)",
    )
    train.add_argument(
        "--known-weight", type=float, default=0.1, help="weight of the known-pixel error next to the hole error (default: 0.1)"
    )
    train.add_argument(
        "--loss", default="l1", choices=("l1", "l2"), help="reconstruction error: l1 (what the evaluation measures) or l2 (default: l1)"
    )
    train.add_argument(
        "--mask-mix",
        default=mask_mix_text(MASK_MIX),
        metavar="KIND=W[,...]",
        help="training masks: weights of centre squares, rectangles and strokes (default: %(default)s)",
    )
    train.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="validate and write an exponential moving average of the weights with this decay per step, e.g. 0.995; 0: off (default: 0)",
    )
    train.add_argument("--widths", default="32,64,128,256", help="encoder channels per stride-2 stage (default: 32,64,128,256)")
    train.add_argument(
        "--stem", type=int, default=16, help="full-resolution feature channels before the output conv; 0: none (default: 16)"
    )
    train.add_argument(
        "--upsample", default="resize", choices=("resize", "transposed"), help="decoder upsampling (default: resize, no checkerboard)"
    )
    train.add_argument("--compare", metavar="WEIGHTS", help="content weights to compare with in the final evaluation (read at the start)")
    train.add_argument(
        "--prior",
        default="blend",
        choices=PRIORS,
        help="parameter-free fill the network refines; none: plain encoder-decoder (default: blend)",
    )
    train.add_argument(
        "--peel",
        type=int,
        default=0,
        metavar="N",
        help="onion-peel layers of a second fill, an input and half of a learned per-pixel residual base; 0: off (default: 0)",
    )
    train.add_argument(
        "--patchmatch",
        default="0",
        metavar="R[,R...]",
        help="patch radii of PatchMatch fills (pypatchmatch), each an input and one more base of the learned mix; 0: none (default: 0)",
    )
    train.add_argument(
        "--patchmatch-reach",
        default="",
        metavar="D[,D...]",
        help="per --patchmatch radius, how many pixels into the hole that base may enter the mix; 0: no limit (default: none)",
    )
    train.add_argument(
        "--features",
        default="",
        metavar="TAP[,TAP...]",
        help="frozen ImageNet VGG-16 taps (relu2_1, relu3_1, relu4_1) of the residual base, added to the encoder; none by default",
    )
    train.add_argument(
        "--init",
        metavar="WEIGHTS",
        help="start the generator from these weights (a weights file or checkpoint; new input/output channels start at zero)",
    )
    train.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint written by this command")
    train.add_argument("--checkpoint", metavar="PATH", help="checkpoint written every epoch (default: OUT with .ckpt.safetensors)")
    train.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... (default: auto)")
    train.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "fp16", "off"),
        help="mixed precision on CUDA (auto: bf16 if supported, else fp16); never on CPU",
    )
    train.add_argument("--seed", type=int, default=0, help="seeds initialisation and data (default: 0)")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    other = parser.add_argument_group("other modes")
    other.add_argument(
        "--prepare-data", metavar="DIR", help="gather the photos into DIR/train and DIR/val with DIR/MANIFEST.txt, then exit"
    )
    other.add_argument("--evaluate", metavar="WEIGHTS", help="print validation metrics of WEIGHTS on --val-images, then exit")
    other.add_argument("--sheet", metavar="PNG", help="with --evaluate: write a sheet of the fills of each validation photo")
    return parser


def _positive(name: str, value, minimum: int = 1) -> None:
    if value is None or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"--device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: CUDA is not available here")
    return device


def _amp_dtype(spec: str, device: torch.device):
    """The autocast dtype, or None for full precision."""
    if device.type != "cuda":
        if spec in ("bf16", "fp16"):
            raise ValueError(f"--amp: {spec} is only used on CUDA (device {device})")
        return None
    if spec == "off":
        return None
    if spec == "bf16" or (spec == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _load_validation(args, size: int):
    if not args.val_images:
        return None
    _positive("--val-masks", args.val_masks)
    photos = [p for _, p in load_photos(find_image_files(args.val_images, "--val-images"))]
    if not photos:
        raise ValueError(f"--val-images: no readable images under {' '.join(args.val_images)}")
    return validation_set(photos, size, args.val_masks)


def _epoch_metrics(results: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    return {k: v for k, v in results.items() if "[" not in k}


def _run_evaluate(args) -> int:
    from neuralpatch.models.content import load_content_net

    if not args.val_images:
        raise ValueError("--evaluate: needs --val-images")
    device = _device(args.device)
    net = load_content_net(args.evaluate, device=device)
    if args.size % net.stride:
        raise ValueError(f"--size: expected a multiple of {net.stride}, got {args.size}")
    images, masks, kinds = _load_validation(args, args.size)
    others = {"compared": load_content_net(args.compare, device=device)} if args.compare else None
    print(f"{args.evaluate}: {len(images)} validation images at {args.size}x{args.size}, L1 and PSNR in the hole")
    results = evaluate(net, images, masks, device, kinds=kinds, others=others)
    for name, (l1, psnr) in results.items():
        print(f"  {name:24s} L1 {l1:.4f}  PSNR {psnr:.2f} dB")
    print(format_table(results, kinds))
    if args.sheet:
        fills = {"prior": prior_fill(images, masks, net.config.prior) if net.config.prior != "none" else mean_fill(images, masks)}
        telea = telea_fill(images, masks)
        if telea is not None:
            fills["telea"] = telea
        if others:
            fills["compared"] = predict_batch(others["compared"], images, masks, device)
        fills["network"] = predict_batch(net, images, masks, device)
        write_sheet(args.sheet, images, masks, kinds, fills)
        print(f"wrote {args.sheet}")
    if "telea" not in results:
        print("  (telea: pip install opencv-python-headless to compare)")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``train-content`` with parsed ``args``. Returns 0.

    Raises:
        FileNotFoundError: a missing image folder, checkpoint or opencv-doc.
        ValueError: bad options, folders without images, a checkpoint that does not match.
    """
    if args.threads is not None:
        _positive("--threads", args.threads)
        torch.set_num_threads(args.threads)
    if args.prepare_data:
        from neuralpatch.content_data import prepare_training_photos

        train_dir, val_dir = prepare_training_photos(args.prepare_data)
        print(f"training photos: {len(find_image_files(train_dir))} in {train_dir}")
        print(f"held-out photos: {len(find_image_files(val_dir, '--val-images'))} in {val_dir}")
        print(f"list with sources and licences: {Path(args.prepare_data) / 'MANIFEST.txt'}")
        return 0
    if args.evaluate:
        return _run_evaluate(args)
    return train(args)


def train(args: argparse.Namespace) -> int:
    """The training loop behind :func:`run`."""
    from tqdm import tqdm

    if not args.images:
        raise ValueError("--images: at least one folder of training photos is required")
    if not args.out:
        raise ValueError("--out: the path of the weights file to write is required")
    for name in ("epochs", "steps_per_epoch", "batch_size"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--workers", args.workers, minimum=0)
    if not 0.0 <= args.adv_weight < 1.0:
        raise ValueError(f"--adv-weight: expected a value in [0, 1), got {args.adv_weight}")
    if args.known_weight < 0:
        raise ValueError(f"--known-weight: expected a value >= 0, got {args.known_weight}")
    if not args.lr > 0:
        raise ValueError(f"--lr: expected a positive value, got {args.lr}")
    if not 0.0 <= args.ema < 1.0:
        raise ValueError(f"--ema: expected a decay in [0, 1), got {args.ema}")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: expected a .safetensors path, got {out}")
    checkpoint = Path(args.checkpoint) if args.checkpoint else out.with_suffix(".ckpt.safetensors")
    device = _device(args.device)
    amp_dtype = _amp_dtype(args.amp, device)

    resume = read_checkpoint(args.resume) if args.resume else None
    try:
        widths = tuple(int(v) for v in str(args.widths).split(","))
        radii = tuple(int(v) for v in str(args.patchmatch).split(",") if int(v))
        reach = tuple(int(v) for v in str(args.patchmatch_reach).split(",")) if args.patchmatch_reach else ()
        mask_mix = parse_mask_mix(args.mask_mix)
        fresh = ContentNetConfig(
            widths=widths,
            prior=args.prior,
            upsample=args.upsample,
            stem=args.stem,
            peel=args.peel,
            patchmatch=radii,
            patchmatch_reach=reach,
            features=tuple(tap for tap in str(args.features).split(",") if tap),
        )
    except ValueError as err:
        raise ValueError(f"--widths/--stem/--upsample/--patchmatch/--patchmatch-reach/--features/--mask-mix: {err}") from err
    config = ContentNetConfig.from_json(resume[1]["config"]) if resume else fresh
    if resume and config.prior != args.prior:
        print(f"train-content: --prior {args.prior} ignored, the checkpoint's network uses prior {config.prior!r}")
    stride = config.stride
    if args.size < stride or args.size % stride:
        raise ValueError(f"--size: expected a positive multiple of {stride}, got {args.size}")

    files = find_image_files(args.images)
    # no crop needs more pixels than this: the smallest (CROP_SCALE[0] of the short side) is
    # then still size pixels wide
    named = load_photos(files, max_short=math.ceil(args.size / CROP_SCALE[0]))
    if not named:
        raise ValueError(f"--images: none of the {len(files)} image files could be read")
    photos = [p for _, p in named]
    validation = _load_validation(args, args.size)
    compared = None
    if args.compare:
        from neuralpatch.models.content import load_content_net

        # read now: --out may be the same file
        compared = {"previous weights": load_content_net(args.compare, device=device)}

    torch.manual_seed(args.seed)
    generator = ContentNet(config).to(device)
    if args.init and not resume:
        init_generator(generator, args.init)
    discriminator = PatchDiscriminator().to(device) if args.adv_weight > 0 else None
    # the averaged weights are what is validated and written; the raw ones keep training
    ema = AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    # beta1 0.9 for the generator, whose loss is almost all L2; 0.5 for the discriminator, as in
    # Context Encoder / DCGAN
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr, betas=(0.9, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=args.lr, betas=(0.5, 0.999)) if discriminator else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, step = 0, 0
    if resume:
        tensors, meta = resume
        _load_prefixed(generator, tensors, CHECKPOINT_GENERATOR_PREFIX, f"{args.resume} (generator)")
        _unflatten_optimizer("opt_g", opt_g, tensors, meta, args.resume)
        if discriminator is not None:
            if "opt_d.param_groups" in meta:
                _load_prefixed(discriminator, tensors, "discriminator.", f"{args.resume} (discriminator)")
                _unflatten_optimizer("opt_d", opt_d, tensors, meta, args.resume)
            else:
                warnings.warn(f"{args.resume}: no discriminator in the checkpoint; starting a new one", stacklevel=2)
        if meta.get("scaler") and scaler.is_enabled():
            saved = json.loads(meta["scaler"])
            if saved:
                scaler.load_state_dict(saved)
        if ema is not None:
            if any(k.startswith(CHECKPOINT_EMA_PREFIX) for k in tensors):
                _load_prefixed(ema, tensors, CHECKPOINT_EMA_PREFIX, f"{args.resume} (--ema weights)")
            else:
                warnings.warn(f"{args.resume}: no --ema weights in the checkpoint; averaging from its generator on", stacklevel=2)
        start_epoch, step = int(meta["epoch"]), int(meta["step"])

    total_steps = args.epochs * args.steps_per_epoch
    settings = {
        "size": args.size,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "adv_weight": args.adv_weight,
        "known_weight": args.known_weight,
        "loss": args.loss,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "seed": args.seed,
        "ema": args.ema,
        "prior": config.prior,
        "peel": config.peel,
        "patchmatch": list(config.patchmatch),
        "patchmatch_reach": list(config.patchmatch_reach),
        "features": list(config.features),
        "mask_mix": mask_mix_text(mask_mix),
        "init": str(args.init or ""),
        "photos": len(photos),
        "images": [str(d) for d in args.images],
        "val_images": [str(d) for d in args.val_images or []],
    }
    dataset = CropSamples(photos, args.size, args.steps_per_epoch * args.batch_size, args.seed, mask_mix)
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    bce = nn.BCEWithLogitsLoss()
    w = args.adv_weight
    print(
        f"train-content: {len(photos)} photos, {args.size}x{args.size}, batch {args.batch_size}, "
        f"{args.epochs} epochs x {args.steps_per_epoch} steps, device {device}"
        + (f", autocast {str(amp_dtype).removeprefix('torch.')}" if amp_dtype else "")
        + (f", resuming at epoch {start_epoch + 1} (step {step})" if resume else "")
    )
    shipped = ema.module if ema is not None else generator
    if validation is not None and start_epoch == 0:
        print(f"epoch 0: {format_metrics(_epoch_metrics(evaluate(shipped, validation[0], validation[1], device)))}")
    last = {}
    for epoch in range(start_epoch, args.epochs):
        generator.train()
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=device.type == "cuda"
        )
        running, started = None, time.perf_counter()
        bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", dynamic_ncols=True, leave=False)
        for image, mask in bar:
            lr = learning_rate(step, total_steps, args.lr)
            for opt in (opt_g, opt_d):
                if opt is not None:
                    for group in opt.param_groups:
                        group["lr"] = lr
            image = image.to(device, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            hole = mask[:, None].to(image.dtype)
            with autocast:
                pred = generator(content_input(image, mask))
            rec = reconstruction_loss(pred, image, mask, args.known_weight, args.loss)
            loss_g = rec
            if discriminator is not None:
                composite = torch.where(mask[:, None], pred.float(), image)
                discriminator.requires_grad_(True)
                with autocast:
                    real = discriminator(torch.cat([image, hole], 1))
                    fake = discriminator(torch.cat([composite.detach(), hole], 1))
                real, fake = real.float(), fake.float()
                loss_d = 0.5 * (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))
                opt_d.zero_grad(set_to_none=True)
                scaler.scale(loss_d).backward()
                scaler.step(opt_d)
                discriminator.requires_grad_(False)
                with autocast:
                    judged = discriminator(torch.cat([composite, hole], 1))
                judged = judged.float()
                loss_g = (1 - w) * rec + w * bce(judged, torch.ones_like(judged))
            opt_g.zero_grad(set_to_none=True)
            scaler.scale(loss_g).backward()
            scaler.step(opt_g)
            scaler.update()
            if ema is not None:
                ema.update_parameters(generator)
            step += 1
            running = rec.detach() if running is None else 0.95 * running + 0.05 * rec.detach()
            if step % 10 == 0 or step == total_steps:
                bar.set_postfix(loss=f"{running.item():.4f}", lr=f"{lr:.2e}")
        bar.close()
        rate = args.steps_per_epoch / (time.perf_counter() - started)
        line = f"epoch {epoch + 1}/{args.epochs} (step {step}, {rate:.2f} steps/s): train {args.loss.upper()} {running.item():.4f}"
        final = epoch + 1 == args.epochs
        if validation is not None:
            last = evaluate(
                shipped, validation[0], validation[1], device, baselines=final, kinds=validation[2], others=compared if final else None
            )
            line += f" | val {format_metrics(_epoch_metrics(last))}"
        tqdm.write(line)
        save_checkpoint(checkpoint, generator, discriminator, opt_g, opt_d, scaler, epoch + 1, step, settings, ema)
    if validation is not None and "telea [centre]" not in last and "mean fill" not in last:
        last = evaluate(shipped, validation[0], validation[1], device, kinds=validation[2], others=compared)
    if validation is not None:
        photos_val = len(validation[2]) // max(1, args.val_masks)
        print(f"validation: {photos_val} photos x {args.val_masks} masks at {args.size}x{args.size}, hole L1 / PSNR")
        print(format_table(last, validation[2]))
    metadata = {"epoch": str(max(start_epoch, args.epochs)), "step": str(step), "settings": json.dumps(settings, sort_keys=True)}
    for name, (l1, psnr) in last.items():
        key = name.replace(" [", "_").replace("]", "").replace(" ", "_").replace("-", "_")
        metadata[f"val_{key}_l1"], metadata[f"val_{key}_psnr"] = f"{l1:.5f}", f"{psnr:.3f}"
    save_content_net(shipped, out, metadata)
    print(f"wrote {out} (generator weights), checkpoint {checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m neuralpatch.train_content``; exit code 2 for bad input, as the CLI."""
    parser = argparse.ArgumentParser(prog="python -m neuralpatch.train_content", description="Train the content network.")
    args = add_arguments(parser).parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        print(f"train-content: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
