"""Real-photo feature maps for tests: a scikit-image photo through fixed conv layers."""

import numpy as np
import pytest
import torch

from neuralpatch.demo import photo_features


def chelsea_features(size=(48, 64), channels=16):
    data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(np.ascontiguousarray(data.chelsea())).permute(2, 0, 1).float() / 255.0
    image = torch.nn.functional.interpolate(image[None], size=(size[0] * 2, size[1] * 2), mode="area")[0]
    return photo_features(image, channels=channels)
