"""NeuralPatchLoss: the drop-in texture loss of neural patch synthesis.

Every VGG feature patch of the image (in the hole, or everywhere) is pulled
towards its nearest neighbour by normalised cross-correlation among the patches
of a source: the known region of the same image (inpainting) or exemplar images
(texture synthesis, style). The search is :func:`neuralpatch.ops.patch_nn`, the
distance :func:`neuralpatch.ops.patch_loss` (its op). The inpainting pipeline
(:mod:`neuralpatch.synthesis`) runs this same module as its texture term.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuralpatch.geometry import dilate, feature_cells, interior, thin_keys
from neuralpatch.ops import patch_nn

DEFAULT_LAYERS = ("relu3_1", "relu4_1")
SEARCHES = ("auto", "exact", "patchmatch")
# search="auto" runs PatchMatch from this many query x key pairs per layer and item on: below it
# the exact search is fast enough (see the README's PatchMatch table for the measurement).
PATCHMATCH_MIN_PAIRS = 2**26


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


def mask_to_layer(mask: Tensor, height: int, width: int, stride: int | None = None) -> Tensor:
    """(B, H, W) bool pixel mask -> (B, h, w) bool at a layer's resolution; a cell is masked when
    any pixel it covers is (so hole features never leak into keys). With the layer's ``stride``
    a cell covers its stride block (:func:`neuralpatch.geometry.feature_cells`); without it
    (a feature net of unknown geometry), the bins of an adaptive max pool."""
    if mask.shape[-2:] == (height, width):
        return mask
    if stride is not None:
        return feature_cells(mask, stride, (height, width))
    return F.adaptive_max_pool2d(mask[:, None].float(), (height, width))[:, 0] > 0


def grow(mask: Tensor, patch_size: int) -> Tensor:
    """Positions whose patch_size x patch_size patch touches ``mask``."""
    return dilate(mask, patch_size // 2)


class LayerMatch(NamedTuple):
    """The neighbours one layer's term uses: ``index`` (Nq,) flat key positions in a key map of
    ``key_width`` columns, for the queries of ``query_mask`` (B, h, w), among ``key_mask``."""

    index: Tensor
    query_mask: Tensor
    key_mask: Tensor
    key_width: int


class _Remembered:
    """An input tensor remembered by identity and version, with a copy to compare another object
    against (so that an unchanged input costs no device-to-host sync)."""

    def __init__(self, tensor: Tensor):
        self.tensor, self.version, self.copy = tensor, tensor._version, tensor.detach().clone()

    def same(self, tensor: Tensor) -> bool:
        if tensor is self.tensor and tensor._version == self.version:
            return True
        if (tensor.shape, tensor.dtype, tensor.device) == (self.copy.shape, self.copy.dtype, self.copy.device) and torch.equal(
            tensor, self.copy
        ):
            self.tensor, self.version = tensor, tensor._version
            return True
        return False


def _all_same(memos: Sequence[_Remembered | None], tensors: Sequence[Tensor | None]) -> bool:
    return len(memos) == len(tensors) and all(
        (m is None and t is None) or (m is not None and t is not None and m.same(t)) for m, t in zip(memos, tensors)
    )


class NeuralPatchLoss(nn.Module):
    """Nearest-neighbour patch loss on VGG features.

    Each layer's term is :func:`neuralpatch.ops.patch_loss` (the mean over query patches of the
    squared distance to the matched key patch), divided by ``C * k * k`` times the mean square
    of the layer's key features: a per-element distance relative to the texture's own energy,
    so that the weights mean the same with any VGG weights (``normalize=False``: the raw op).

    Args:
        layers: feature taps used, e.g. ("relu3_1", "relu4_1") as in the paper.
        layer_weights: weight per layer (default 1 each); a mapping or a sequence.
        patch_size: side of the feature patches (3 in the paper).
        nn_every: recompute the nearest neighbours every this many calls and reuse them in
            between (1 = every call, as in the paper); None = only on the first call, after
            :meth:`reset`, or when an input they depend on changes.
        backend, precision: passed to :func:`neuralpatch.ops.patch_nn` / ``patch_loss``.
        feature_net: a module mapping (B, 3, H, W) RGB in [0, 1] to a dict of taps;
            default: :func:`neuralpatch.models.load_vgg` with ``weights``. A ``receptive_field(name)``
            method giving each tap's ``stride`` (as the VGG modules have) places hole cells
            exactly; without one, cells are adaptive-pool bins.
        weights: the VGG weight source when ``feature_net`` is None ("auto", "vgg19",
            "vgg16-imagenet", "vgg16-hed", "random").
        normalize: divide each layer's term by its key features' energy (see above).
        max_keys: most key patches per layer and item; past it the keys are taken on a regular
            grid (every 2nd, 3rd, ... row and column). None = all.
        search: how the neighbours are found: "exact" (every key), "patchmatch" (approximate,
            :func:`neuralpatch.patch_nn` with ``method="patchmatch"``, warm-started from the
            previous search of the layer while its masks stay the same), or "auto" (PatchMatch
            from :data:`PATCHMATCH_MIN_PAIRS` query x key pairs on).
        search_iterations: PatchMatch sweeps per search (None: the op's default).
        seed: seeds the PatchMatch searches (each search draws from ``seed`` and its count).

    Call it as ``loss(image, mask)`` for inpainting (hole patches matched against
    the patches lying wholly outside the hole of the same image), or
    ``loss(image, mask=None, exemplars=[...])`` for synthesis (every patch of ``image``, or of
    its ``mask`` region, matched against the exemplars' patches, restricted to
    ``exemplar_masks`` if given, True marking where copying is allowed). ``image`` is
    (B, 3, H, W) or (3, H, W) in [0, 1]. Exemplar features are computed once and reused while the
    exemplars stay the same. A layer with no key patch at all is skipped with a warning.

    After a call, :attr:`matches` holds each layer's :class:`LayerMatch` and :attr:`searches`
    counts the neighbour searches so far (one per call that searched).
    """

    def __init__(
        self,
        layers: Sequence[str] = DEFAULT_LAYERS,
        layer_weights: Mapping[str, float] | Sequence[float] | None = None,
        patch_size: int = 3,
        nn_every: int | None = 1,
        backend: str = "auto",
        precision: str = "tf32",
        feature_net: nn.Module | None = None,
        weights: str = "auto",
        normalize: bool = True,
        max_keys: int | None = None,
        search: str = "exact",
        search_iterations: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if not layers:
            raise ValueError("layers: expected at least one layer name")
        if nn_every is not None and (isinstance(nn_every, bool) or not isinstance(nn_every, int) or nn_every < 1):
            raise ValueError(f"nn_every: expected None or a positive int, got {nn_every!r}")
        if max_keys is not None and (isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1):
            raise ValueError(f"max_keys: expected None or a positive int, got {max_keys!r}")
        if search not in SEARCHES:
            raise ValueError(f"search: expected one of {SEARCHES}, got {search!r}")
        if search_iterations is not None and (
            isinstance(search_iterations, bool) or not isinstance(search_iterations, int) or search_iterations < 0
        ):
            raise ValueError(f"search_iterations: expected None or an int >= 0, got {search_iterations!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed: expected an int in [0, 2**32), got {seed!r}")
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
        self.normalize = normalize
        self.max_keys = max_keys
        self.search = search
        self.search_iterations = search_iterations
        self.seed = seed
        if feature_net is None:
            from neuralpatch.models import load_vgg

            feature_net = load_vgg(weights, layers=self.layers)
        self.feature_net = feature_net
        self.matches: dict[str, LayerMatch] = {}
        self.searches = 0
        self._calls = 0
        self._search_due = True
        self._cache: dict[str, tuple] = {}
        self._mask_cache: tuple | None = None
        self._exemplar_cache: tuple | None = None

    def reset(self) -> None:
        """Forget the cached nearest neighbours (the next call searches again)."""
        self._calls = 0
        self._search_due = True
        self._cache.clear()

    def _stride(self, name: str) -> int | None:
        receptive_field = getattr(self.feature_net, "receptive_field", None)
        return receptive_field(name).stride if callable(receptive_field) else None

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
        if self.nn_every is None:
            search, self._search_due = self._search_due, False
        else:
            search = self._calls % self.nn_every == 0
        self._calls += 1
        feats = self.feature_net(image)
        query_masks = self._query_masks(mask, pixel_mask, feats, batch, image.device)
        if exemplars is not None:
            keys = self.exemplar_keys(exemplars, exemplar_masks, batch, image.device)
            if not keys:
                raise ValueError(f"exemplar_masks: leave no {self.patch_size}x{self.patch_size} patch of any exemplar to copy from")
        else:
            keys = self._own_keys(feats, query_masks)
        searched = False
        total = image.new_zeros((), dtype=torch.float32)
        for name in self.layers:
            if name not in keys:
                continue
            key_feat, key_mask, key_energy, key_count = keys[name]
            feat, (query_mask, query_count) = feats[name], query_masks[name]
            if query_count == 0:
                continue
            pairs = (query_count / batch) * (key_count / batch)
            index, layer_searched = self._nearest(name, search, feat, key_feat, query_mask, key_mask, exemplars is not None, pairs)
            searched |= layer_searched
            # the op itself: the features come from the caller's image, so the public function's
            # finiteness check (a host sync per call) is left out of the training loop
            layer_loss = torch.ops.neuralpatch.patch_loss(feat, key_feat, query_mask, index, self.patch_size, self.backend).float()
            if self.normalize:
                layer_loss = layer_loss / (feat.shape[1] * self.patch_size**2 * key_energy)
            total = total + self.layer_weights[name] * layer_loss
        self.searches += searched
        return total

    def _query_masks(self, mask, pixel_mask, feats, batch, device) -> dict[str, tuple[Tensor, int]]:
        """Each layer's query mask and its number of queries, kept while the caller's ``mask``
        stays the same (``pixel_mask`` is it, checked and batched)."""
        shapes = tuple(tuple(feats[name].shape[-2:]) for name in self.layers)
        if self._mask_cache is not None:
            memo, cached_shapes, cached_batch, masks = self._mask_cache
            if cached_shapes == shapes and cached_batch == batch and _all_same([memo], [mask]):
                return masks
        masks = {}
        for name, (h, w) in zip(self.layers, shapes):
            if pixel_mask is None:
                layer_mask = torch.ones(batch, h, w, dtype=torch.bool, device=device)
            else:
                layer_mask = mask_to_layer(pixel_mask, h, w, self._stride(name))
            masks[name] = (layer_mask, int(layer_mask.sum()))
        self._mask_cache = (None if mask is None else _Remembered(mask), shapes, batch, masks)
        return masks

    def _own_keys(self, feats, query_masks) -> dict[str, tuple[Tensor, Tensor, Tensor, int]]:
        """Inpainting: the image's own features, detached, at the patches lying wholly outside the hole."""
        keys = {}
        for name in self.layers:
            feat = feats[name].detach()
            hole, _ = query_masks[name]
            cached = self._cache.get(("own keys", name))
            if cached is not None and cached[0] is hole:
                key_mask, key_count = cached[1], cached[2]
            else:
                key_mask = ~grow(hole, self.patch_size) & interior(*feat.shape[-2:], self.patch_size, feat.device)
                key_mask, key_count = self._usable_keys(name, key_mask)
                self._cache[("own keys", name)] = (hole, key_mask, key_count)
            if key_count > 0:
                keys[name] = (feat, key_mask, _energy(feat, key_mask), key_count)
        return keys

    def exemplar_keys(self, exemplars, exemplar_masks=None, batch: int = 1, device=None) -> dict[str, tuple[Tensor, Tensor, Tensor, int]]:
        """Each layer's (key features (B, C, h, w), key mask (B, h, w), key energy, key count) over all the
        exemplars side by side, for the layers that have at least one key patch. Computed once
        and reused while the exemplars, their masks and ``batch`` stay the same."""
        if isinstance(exemplars, Tensor):
            exemplars = [exemplars] if exemplars.dim() == 3 else list(exemplars)
        exemplars = list(exemplars)
        if len(exemplars) == 0:
            raise ValueError("exemplars: expected at least one exemplar image")
        exemplar_masks = [None] * len(exemplars) if exemplar_masks is None else list(exemplar_masks)
        if len(exemplar_masks) != len(exemplars):
            raise ValueError(f"exemplar_masks: expected {len(exemplars)} masks, got {len(exemplar_masks)}")
        device = exemplars[0].device if device is None else torch.device(device)
        if self._exemplar_cache is not None:
            memos, mask_memos, cached_batch, cached_device, keys = self._exemplar_cache
            if cached_batch == batch and cached_device == device and _all_same(memos, exemplars) and _all_same(mask_memos, exemplar_masks):
                return keys
        keys = self._compute_exemplar_keys(exemplars, exemplar_masks, batch, device)
        self._exemplar_cache = (
            [_Remembered(e) for e in exemplars],
            [None if m is None else _Remembered(m) for m in exemplar_masks],
            batch, device, keys,
        )  # fmt: skip
        return keys

    def _compute_exemplar_keys(self, exemplars, exemplar_masks, batch, device):
        """All exemplars' features side by side in one key map per layer, with a masked
        gap between them so that no key patch straddles two exemplars."""
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
                    allowed = interior(*f.shape[-2:], self.patch_size, device)
                    if ex_mask is not None:
                        # ... and in the usable region: a cell is unusable if any pixel under it is
                        unusable = mask_to_layer(~ex_mask.to(device), *f.shape[-2:], self._stride(name))
                        allowed &= ~grow(unusable, self.patch_size)[0]
                    per_layer[name].append((f, allowed))
        keys = {}
        gap = self.patch_size
        for name, items in per_layer.items():
            height = max(f.shape[-2] for f, _ in items)
            feats, masks = [], []
            for f, allowed in items:
                pad_h = height - f.shape[-2]
                feats.append(F.pad(f, (0, gap, 0, pad_h)))
                masks.append(F.pad(allowed, (0, gap, 0, pad_h), value=False))
            key_feat = torch.cat(feats, dim=-1)
            key_mask, key_count = self._usable_keys(name, torch.cat(masks, dim=-1))
            if key_count == 0:
                continue
            key_feat, key_mask = key_feat.expand(batch, *key_feat.shape), key_mask.expand(batch, *key_mask.shape)
            keys[name] = (key_feat, key_mask, _energy(key_feat, key_mask), key_count * batch)
        return keys

    def _usable_keys(self, name: str, key_mask: Tensor) -> tuple[Tensor, int]:
        """``key_mask`` thinned to ``max_keys`` and its key count; warns when the layer has no key
        (it is then skipped)."""
        if self.max_keys is not None:
            key_mask = thin_keys(key_mask, self.max_keys)
        key_count = int(key_mask.sum())
        if key_count == 0:
            k = self.patch_size
            warnings.warn(f"{name}: no {k}x{k} patch to copy from at {tuple(key_mask.shape[-2:])}; skipping this layer", stacklevel=5)
        return key_mask, key_count

    def _method(self, pairs: float) -> str:
        if self.search != "auto":
            return self.search
        return "patchmatch" if pairs >= PATCHMATCH_MIN_PAIRS else "exact"

    def _nearest(self, name, search, feat, key_feat, query_mask, key_mask, fixed_keys: bool, pairs: float) -> tuple[Tensor, bool]:
        """The cached neighbours of ``name`` and whether they were searched now: again on schedule
        or when anything they depend on changed: shapes, the query mask, the key mask, and (for
        exemplars, whose features are fixed inputs) the key features themselves. In inpainting
        the keys are the image's own drifting features, which ``nn_every`` reuse is meant to
        tolerate. Masks and exemplar keys come from caches, so an unchanged one is the same object.
        ``pairs``: query x key pairs per item, for ``search="auto"``."""
        cached = self._cache.get(name)
        stale = (
            search
            or cached is None
            or cached[0] != (tuple(feat.shape), tuple(key_feat.shape))
            or cached[1] is not query_mask
            or cached[2] is not key_mask
            or (fixed_keys and cached[3] is not key_feat)
        )
        if stale:
            method = self._method(pairs)
            if method == "exact":
                index, _ = patch_nn(feat.detach(), key_feat, query_mask, key_mask, self.patch_size, self.precision, self.backend)
            else:
                # warm start: the layer's last field, while its queries and keys are the same ones
                same_problem = (
                    cached is not None
                    and cached[0] == (tuple(feat.shape), tuple(key_feat.shape))
                    and cached[1] is query_mask
                    and cached[2] is key_mask
                )
                index, _ = patch_nn(
                    feat.detach(), key_feat, query_mask, key_mask, self.patch_size, self.precision, self.backend,
                    method="patchmatch", init=cached[4] if same_problem else None,
                    iterations=self.search_iterations, seed=(self.seed + self.searches) % 2**32,
                )  # fmt: skip
            self._cache[name] = ((tuple(feat.shape), tuple(key_feat.shape)), query_mask, key_mask, key_feat if fixed_keys else None, index)
            self.matches[name] = LayerMatch(index, query_mask, key_mask, key_feat.shape[-1])
        return self._cache[name][4], stale


def _energy(key_feat: Tensor, key_mask: Tensor) -> Tensor:
    """Mean square of the key features at the key positions (over channels, positions and items)."""
    weights = key_mask[:, None].to(torch.float32)
    total = key_feat.detach().float().square().mul(weights).sum()
    return (total / (weights.sum() * key_feat.shape[1]).clamp_min(1)).clamp_min(1e-12)
