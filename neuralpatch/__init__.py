"""neuralpatch: high-resolution inpainting by multi-scale neural patch synthesis.

The core is one op, a nearest-neighbour search over feature patches by normalised
cross-correlation, and the patch loss built on it (see :mod:`neuralpatch.ops`).
"""

from neuralpatch.loss import NeuralPatchLoss
from neuralpatch.ops import BackendUnavailableError, available_backends, patch_loss, patch_nn
from neuralpatch.synthesis import PRESETS, InpaintConfig, Progress, inpaint

__version__ = "0.1.0"
__all__ = [
    "PRESETS", "BackendUnavailableError", "InpaintConfig", "NeuralPatchLoss", "Progress",
    "available_backends", "inpaint", "patch_loss", "patch_nn", "__version__",
]  # fmt: skip
