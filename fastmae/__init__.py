"""fastmae: fast, verified Masked Autoencoder (MAE) pretraining.

Public API:
    MaskedAutoencoderViT  the official-compatible MAE model (switchable op layer and attention dispatch)
    create_model(name, **overrides), list_models()
    from_pretrained(path, **overrides)  an MAE from any checkpoint (fastmae, official .pth, transformers folder)
    FastMAEError          bad user input, reported as one line by the CLI
"""

from .errors import FastMAEError
from .interop import from_pretrained
from .models import MaskedAutoencoderViT, create_model, flops_per_image, list_models

__version__ = "0.1.0"
__all__ = [
    "FastMAEError",
    "MaskedAutoencoderViT",
    "__version__",
    "create_model",
    "flops_per_image",
    "from_pretrained",
    "list_models",
]
