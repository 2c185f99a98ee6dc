"""fastmae.kernels: the memory-bound glue around the transformer blocks, each op with its pure-PyTorch reference.

Each module holds one op: the reference (same signature as the fused op), and, where written, its Triton kernels.
The model reaches these through :mod:`fastmae.ops`, which picks an implementation per op.
"""

from .masked_mse import masked_mse_reference, patchify, unpatchify
from .masking import random_masking_reference
from .unshuffle import unshuffle_reference

__all__ = ["masked_mse_reference", "patchify", "random_masking_reference", "unpatchify", "unshuffle_reference"]
