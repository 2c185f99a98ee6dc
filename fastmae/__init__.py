"""fastmae: fast, verified Masked Autoencoder (MAE) pretraining.

Public API:
    MaskedAutoencoderViT  the official-compatible MAE model (switchable op layer and attention dispatch)
    create_model(name, **overrides), list_models()
    from_pretrained(path, **overrides)  an MAE from any checkpoint (fastmae, official .pth, transformers folder);
                          its ``bands`` attribute is the checkpoint's BandSpec
    BandSpec, IMAGENET    the bands of the data (names, per-band statistics, dtype), see fastmae.bands
    FastMAEError          bad user input, reported as one line by the CLI
"""

from .bands import IMAGENET, BandSpec
from .errors import FastMAEError
from .registry import list_models

__version__ = "0.1.0"
_LAZY = {"MaskedAutoencoderViT": "models", "create_model": "models", "flops_per_image": "models",
         "from_pretrained": "interop"}  # fmt: skip


def __getattr__(name: str):
    """The model API is imported on first use: ``import fastmae`` (and the CLI's ``--help``) loads no torch."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
__all__ = [
    "IMAGENET",
    "BandSpec",
    "FastMAEError",
    "MaskedAutoencoderViT",
    "__version__",
    "create_model",
    "flops_per_image",
    "from_pretrained",
    "list_models",
]
