"""Triton kernels for neuralpatch (installed as ``neuralpatch.kernels``).

Launchers only: they validate, allocate and launch, and know nothing about images,
VGG or autograd; ``neuralpatch.ops`` builds the public ops on top of them.
"""

from .patch_loss import patch_loss_bwd, patch_loss_fwd
from .patch_nn import patch_nn_fwd
from .patchmatch import patchmatch_fwd

__all__ = ["patch_nn_fwd", "patch_loss_fwd", "patch_loss_bwd", "patchmatch_fwd"]
