"""fastmae.kernels: the memory-bound glue around the transformer blocks, each op with its pure-PyTorch reference.

Each module holds one op: the reference (same signature as the fused op), and, where written, its Triton kernels.
The model reaches these through :mod:`fastmae.ops`, which picks an implementation per op.
"""

if __name__ != "fastmae.kernels":
    # This folder was found as a top-level package `kernels`: the repository root is on sys.path (pytest, `python -m`
    # or a script run from the checkout) and something imported `kernels`, e.g. transformers, which imports Hugging
    # Face's `kernels` project whenever that distribution is installed. The name belongs to that project: where another
    # `kernels` is importable from the rest of sys.path, the import gets it. Where none is, hand out the installed
    # fastmae.kernels (it has no __version__, so transformers sees no usable `kernels`). Never load this folder's ops
    # a second time: that would register fastmae's custom ops again and leave the first registration's handles
    # dangling.
    import importlib
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _other_kernels():
        """The spec of a `kernels` package found on sys.path outside this checkout, or None."""
        root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
        spec = importlib.machinery.PathFinder.find_spec(__name__, path)
        if spec is None or spec.origin is None:
            return None
        return None if os.path.realpath(spec.origin) == os.path.realpath(__file__) else spec

    _spec = _other_kernels()
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module  # the import statement returns what sys.modules holds when this file ends
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del sys.modules[__name__]
            raise
    else:
        sys.modules[__name__] = importlib.import_module("fastmae.kernels")
else:
    from .masked_mse import masked_mse_reference, patchify, unpatchify
    from .masking import random_masking_reference
    from .unshuffle import unshuffle_reference

    __all__ = ["masked_mse_reference", "patchify", "random_masking_reference", "unpatchify", "unshuffle_reference"]
