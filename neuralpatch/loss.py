"""NeuralPatchLoss: the drop-in texture loss of neural patch synthesis.

Every VGG feature patch of the image (in the hole, or everywhere) is pulled
towards its nearest neighbour by normalised cross-correlation among the patches
of a source: the known region of the same image (inpainting) or exemplar images
(texture synthesis, style). The search is :func:`neuralpatch.ops.patch_nn`, the
distance :func:`neuralpatch.ops.patch_loss`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuralpatch.masks import dilate
from neuralpatch.ops import patch_loss, patch_nn

DEFAULT_LAYERS = ("relu3_1", "relu4_1")


def _as_batched_mask(mask: Tensor | None, batch: int, height: int, width: int, name: str) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if tuple(mask.shape) == (height, width):
        mask = mask.expand(batch, height, width)
    if tuple(mask.shape) != (batch, height, width):
        raise ValueError(f"{name}: expected shape ({height}, {width}) or ({batch}, {height}, {width}), got {tuple(mask.shape)}")
    return mask > 0.5 if mask.is_floating_point() else mask.to(torch.bool)


def mask_to_layer(mask: Tensor, height: int, width: int) -> Tensor:
    """(B, H, W) bool pixel mask -> (B, h, w) bool at a layer's resolution; a cell is
    masked when any pixel it covers is (so hole features never leak into keys)."""
    cells = F.adaptive_max_pool2d(mask[:, None].float(), (height, width)) if mask.shape[-2:] != (height, width) else mask[:, None].float()
    return cells[:, 0] > 0


def grow(mask: Tensor, patch_size: int) -> Tensor:
    """Positions whose patch_size x patch_size patch touches ``mask``."""
    return dilate(mask, patch_size // 2)


class NeuralPatchLoss(nn.Module):
    """Nearest-neighbour patch loss on VGG features.

    Args:
        layers: feature taps used, e.g. ("relu3_1", "relu4_1") as in the paper.
        layer_weights: weight per layer (default 1 each); a mapping or a sequence.
        patch_size: side of the feature patches (3 in the paper).
        nn_every: recompute the nearest neighbours every this many calls and reuse
            them in between (1 = every call, as in the paper).
        backend, precision: passed to :func:`neuralpatch.ops.patch_nn` / ``patch_loss``.
        feature_net: a module mapping (B, 3, H, W) RGB in [0, 1] to a dict of taps;
            default: :func:`neuralpatch.models.load_vgg` with ``weights``.
        weights: the VGG weight source when ``feature_net`` is None ("auto", "vgg19",
            "vgg16-hed", "random").

    Call it as ``loss(image, mask)`` for inpainting (hole patches matched against
    the patches lying wholly outside the hole of the same image), or
    ``loss(image, exemplars=[...])`` for synthesis (every patch of ``image``, or of
    its ``mask`` region, matched against the exemplars' patches, restricted to
    ``exemplar_masks`` if given, True marking where copying is allowed). ``image`` is
    (B, 3, H, W) or (3, H, W) in [0, 1].
    """

    def __init__(
        self,
        layers: Sequence[str] = DEFAULT_LAYERS,
        layer_weights: Mapping[str, float] | Sequence[float] | None = None,
        patch_size: int = 3,
        nn_every: int = 1,
        backend: str = "auto",
        precision: str = "tf32",
        feature_net: nn.Module | None = None,
        weights: str = "auto",
    ):
        super().__init__()
        if not layers:
            raise ValueError("layers: expected at least one layer name")
        if isinstance(nn_every, bool) or not isinstance(nn_every, int) or nn_every < 1:
            raise ValueError(f"nn_every: expected a positive int, got {nn_every!r}")
        self.layers = tuple(layers)
        if layer_weights is None:
            layer_weights = {name: 1.0 for name in self.layers}
        elif not isinstance(layer_weights, Mapping):
            if len(layer_weights) != len(self.layers):
                raise ValueError(f"layer_weights: expected {len(self.layers)} weights, got {len(layer_weights)}")
            layer_weights = dict(zip(self.layers, layer_weights))
        missing = set(self.layers) - set(layer_weights)
        if missing:
            raise ValueError(f"layer_weights: no weight for {sorted(missing)}")
        self.layer_weights = {name: float(layer_weights[name]) for name in self.layers}
        self.patch_size = patch_size
        self.nn_every = nn_every
        self.backend = backend
        self.precision = precision
        if feature_net is None:
            from neuralpatch.models import load_vgg

            feature_net = load_vgg(weights, layers=self.layers)
        self.feature_net = feature_net
        self._calls = 0
        self._cache: dict[str, tuple] = {}

    def reset(self) -> None:
        """Forget the cached nearest neighbours (the next call searches again)."""
        self._calls = 0
        self._cache.clear()

    def forward(
        self,
        image: Tensor,
        mask: Tensor | None = None,
        exemplars: Sequence[Tensor] | Tensor | None = None,
        exemplar_masks: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image: expected shape (B, 3, H, W) or (3, H, W), got {tuple(image.shape)}")
        batch, _, height, width = image.shape
        pixel_mask = _as_batched_mask(mask, batch, height, width, "mask")
        if exemplars is None and pixel_mask is None:
            raise ValueError("mask: inpainting needs a hole mask (or pass exemplars= for synthesis)")
        search = self._calls % self.nn_every == 0
        self._calls += 1
        feats = self.feature_net(image)
        if exemplars is not None:
            key_feats, key_masks = self._exemplar_keys(exemplars, exemplar_masks, batch, image.device)
        total = image.new_zeros((), dtype=torch.float32)
        for name in self.layers:
            feat = feats[name]
            h, w = feat.shape[-2:]
            if exemplars is None:
                hole = mask_to_layer(pixel_mask, h, w)
                query_mask = hole
                key_feat, key_mask = feat.detach(), ~grow(hole, self.patch_size)
            else:
                query_mask = mask_to_layer(pixel_mask, h, w) if pixel_mask is not None else torch.ones(batch, h, w, dtype=torch.bool, device=feat.device)
                key_feat, key_mask = key_feats[name], key_masks[name]
            index = self._nearest(name, search, feat, key_feat, query_mask, key_mask, exemplars is not None)
            layer_loss = patch_loss(feat, key_feat, query_mask, index, self.patch_size, self.backend)
            total = total + self.layer_weights[name] * layer_loss.float()
        return total

    def _nearest(self, name, search, feat, key_feat, query_mask, key_mask, fixed_keys: bool) -> Tensor:
        """The cached neighbours of ``name``, searched again on schedule or when anything they
        depend on changed: shapes, the query mask, the key mask, and (for exemplars, whose
        features are fixed inputs) the key features themselves. In inpainting the keys are the
        image's own drifting features, which ``nn_every`` reuse is meant to tolerate."""
        cached = self._cache.get(name)
        stale = (
            search
            or cached is None
            or cached[0] != (tuple(feat.shape), tuple(key_feat.shape))
            or not torch.equal(cached[1], query_mask)
            or not torch.equal(cached[2], key_mask)
            or (fixed_keys and not torch.equal(cached[3], key_feat))
        )
        if stale:
            index, _ = patch_nn(feat.detach(), key_feat, query_mask, key_mask, self.patch_size, self.precision, self.backend)
            kept_keys = key_feat.clone() if fixed_keys else None
            self._cache[name] = ((tuple(feat.shape), tuple(key_feat.shape)), query_mask.clone(), key_mask.clone(), kept_keys, index)
        return self._cache[name][4]

    def _exemplar_keys(self, exemplars, exemplar_masks, batch, device):
        """All exemplars' features side by side in one key map per layer, with a masked
        gap between them so that no key patch straddles two exemplars."""
        if isinstance(exemplars, Tensor):
            exemplars = [exemplars] if exemplars.dim() == 3 else list(exemplars)
        if len(exemplars) == 0:
            raise ValueError("exemplars: expected at least one exemplar image")
        if exemplar_masks is None:
            exemplar_masks = [None] * len(exemplars)
        if len(exemplar_masks) != len(exemplars):
            raise ValueError(f"exemplar_masks: expected {len(exemplars)} masks, got {len(exemplar_masks)}")
        per_layer = {name: [] for name in self.layers}
        with torch.no_grad():
            for i, (exemplar, ex_mask) in enumerate(zip(exemplars, exemplar_masks)):
                if exemplar.dim() != 3 or exemplar.shape[0] != 3:
                    raise ValueError(f"exemplars[{i}]: expected shape (3, H, W), got {tuple(exemplar.shape)}")
                ex_feats = self.feature_net(exemplar[None].to(device))
                ex_mask = _as_batched_mask(ex_mask, 1, *exemplar.shape[-2:], f"exemplar_masks[{i}]")
                for name in self.layers:
                    f = ex_feats[name][0]
                    # keys only where the whole patch lies inside this exemplar ...
                    r = self.patch_size // 2
                    allowed = torch.zeros(f.shape[-2:], dtype=torch.bool, device=device)
                    allowed[r : f.shape[-2] - r, r : f.shape[-1] - r] = True
                    if ex_mask is not None:
                        # ... and in the usable region: a cell is unusable if any pixel under it is
                        unusable = mask_to_layer(~ex_mask.to(device), *f.shape[-2:])
                        allowed &= ~grow(unusable, self.patch_size)[0]
                    per_layer[name].append((f, allowed))
        key_feats, key_masks = {}, {}
        gap = self.patch_size
        for name, items in per_layer.items():
            height = max(f.shape[-2] for f, _ in items)
            feats, masks = [], []
            for f, allowed in items:
                pad_h = height - f.shape[-2]
                feats.append(F.pad(f, (0, gap, 0, pad_h)))
                masks.append(F.pad(allowed, (0, gap, 0, pad_h), value=False))
            key_feat = torch.cat(feats, dim=-1)
            key_mask = torch.cat(masks, dim=-1)
            if not bool(key_mask.any()):
                raise ValueError("exemplar_masks: leave no patch of any exemplar to copy from")
            key_feats[name] = key_feat.expand(batch, *key_feat.shape)
            key_masks[name] = key_mask.expand(batch, *key_mask.shape)
        return key_feats, key_masks
