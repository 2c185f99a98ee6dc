"""The model names and their architectures, and the checks that need no torch: what the CLI needs to parse its flags
(``fastmae --help`` imports no torch)."""

from __future__ import annotations

from .errors import FastMAEError


def check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise FastMAEError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


_MODELS: dict[str, dict] = {
    # Small models for CPU work and tests (decoders scaled down with the encoder).
    "mae_vit_tiny_patch16": dict(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128, decoder_depth=2,
        decoder_num_heads=4,
    ),
    "mae_vit_small_patch16": dict(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=4,
        decoder_num_heads=8,
    ),
    # Small images (32 px: CIFAR, digits): patch 4 gives an 8 x 8 grid. Decoders scaled down as above; "mini" is tiny
    # at half the depth, the digits preset's model (1.4k training images do not need 12 blocks).
    "mae_vit_mini_patch4": dict(
        patch_size=4, embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=128, decoder_depth=2,
        decoder_num_heads=4,
    ),
    "mae_vit_tiny_patch4": dict(
        patch_size=4, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128, decoder_depth=2,
        decoder_num_heads=4,
    ),
    "mae_vit_small_patch4": dict(
        patch_size=4, embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=4,
        decoder_num_heads=8,
    ),
    # The official models (facebookresearch/mae models_mae.py): decoder 512 wide, 8 blocks, 16 heads.
    "mae_vit_base_patch16": dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
        decoder_num_heads=16,
    ),
    "mae_vit_large_patch16": dict(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
        decoder_num_heads=16,
    ),
    "mae_vit_huge_patch14": dict(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
        decoder_num_heads=16,
    ),
}  # fmt: skip


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(_MODELS)


def model_args(name: str) -> dict:
    """The constructor arguments of a named model (before overrides)."""
    if name not in _MODELS:
        raise FastMAEError(f"unknown model {name!r}; known models: {', '.join(_MODELS)}")
    return dict(_MODELS[name], mlp_ratio=4.0)
