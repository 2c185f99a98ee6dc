"""fastmae.kernels: the memory-bound glue around the transformer blocks, each op with its pure-PyTorch reference.

Each module holds one op: the reference (same signature as the fused op), and, where written, its Triton kernels.
The model reaches these through :mod:`fastmae.ops`, which picks an implementation per op.
"""

if __name__ != "fastmae.kernels":
    # This folder found as a top-level package `kernels` (the repository root on sys.path: pytest, `python -m` from
    # the checkout), e.g. by transformers probing for Hugging Face's `kernels` project. Loading the ops a second time
    # would register fastmae's custom ops again and leave the first registration's handles dangling: hand out the
    # installed package instead (it has no __version__, so transformers sees no usable `kernels`).
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("fastmae.kernels")
else:
    from .masked_mse import masked_mse_reference, patchify, unpatchify
    from .masking import random_masking_reference
    from .unshuffle import unshuffle_reference

    __all__ = ["masked_mse_reference", "patchify", "random_masking_reference", "unpatchify", "unshuffle_reference"]
