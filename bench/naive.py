"""A paper-faithful naive implementation, kept only as the end-to-end baseline.

It does what the original Torch code of Yang et al. (and CNNMRF before it) does:
VGG on the whole image at every iteration, the nearest neighbours by a convolution
of the feature map with every normalised key patch (an Nk x H x W score volume),
and torch.optim.LBFGS over the whole image with the known pixels reset after each
step. Same energy and schedule as :func:`neuralpatch.inpaint`, none of its savings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neuralpatch.geometry import dilate, feature_cells, interior, resize_image, shrink_mask
from neuralpatch.synthesis import InpaintConfig, pyramid_sizes


def _conv_nn(feat, key_feat, key_mask, patch_size):
    """Best key per position of ``feat`` by NCC, via conv2d with the normalised key patches."""
    keys = F.unfold(key_feat[None], patch_size, padding=patch_size // 2).squeeze(0).T  # (H*W, C*k*k)
    keys = keys[key_mask.reshape(-1)]
    keys = keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-12)
    weight = keys.view(-1, feat.shape[0], patch_size, patch_size)
    scores = F.conv2d(feat[None], weight, padding=patch_size // 2)[0]  # (Nk, H, W): the whole volume
    return scores.argmax(0), keys.shape[0]


def naive_inpaint(image, hole, feature_net, config: InpaintConfig, start=None):
    """image (3, H, W) in [0, 1], hole (H, W) bool -> (3, H, W)."""
    sizes = pyramid_sizes(*hole.shape, config.coarsest_side, config.max_scales)
    k = config.patch_size
    x = start if start is not None else resize_image(image, sizes[0])
    for size in sizes:
        target = resize_image(image, size)
        hole_s = shrink_mask(hole, size)
        x = torch.where(hole_s[None], resize_image(x, size), target)
        reference = x.clone()
        keys = {}
        with torch.no_grad():
            feats = feature_net(x[None])
        for name in config.layers:
            f = feats[name][0]
            cells = feature_cells(hole_s, feature_net.receptive_field(name).stride, f.shape[-2:])
            valid = ~dilate(cells, k // 2) & interior(*f.shape[-2:], k)
            if not bool(valid.any()):
                continue  # the hole swallows this layer's map; the pipeline skips it too
            keys[name] = (cells, valid, f[:, valid].square().mean().clamp_min(1e-12))
        variables = x.clone().requires_grad_()
        optimizer = torch.optim.LBFGS([variables], max_iter=config.iterations, line_search_fn=config.line_search)
        n_hole = max(int(hole_s.sum()), 1)

        def closure():
            optimizer.zero_grad()
            img = torch.where(hole_s[None], variables, target)
            feats = feature_net(img[None])
            texture = img.new_zeros(())
            for name, weight in zip(config.layers, config.layer_weights):
                if name not in keys:
                    continue
                f = feats[name][0]
                cells, valid, key_energy = keys[name]
                with torch.no_grad():
                    best, _ = _conv_nn(f.detach(), f.detach(), valid, k)
                    flat_valid = valid.reshape(-1).nonzero().squeeze(1)
                    source = flat_valid[best[cells]]
                patches = F.unfold(f[None], k, padding=k // 2)[0]  # (C*k*k, H*W)
                q = patches[:, cells.reshape(-1)]
                t = patches.detach()[:, source]
                texture = texture + weight * (q - t).square().sum() / max(q.shape[1], 1) / (f.shape[0] * k * k * key_energy)
            content = ((img - reference).square() * hole_s).sum() / (3 * n_hole)
            tv = ((img[:, 1:] - img[:, :-1]).square().sum() + (img[:, :, 1:] - img[:, :, :-1]).square().sum()) / (3 * n_hole)
            energy = content + config.alpha * texture + config.beta * tv
            energy.backward()
            return energy

        optimizer.step(closure)
        x = torch.where(hole_s[None], variables.detach(), target).clamp(0, 1)
    return torch.where(hole[None], x, image)
