"""The op seam: kernels specs, the environment override, and forced-Triton errors."""

import pytest
import torch
from fastmae.kernels import masked_mse_reference, random_masking_reference, unshuffle_reference

from fastmae import FastMAEError, MaskedAutoencoderViT, ops

from .conftest import SQUARE


def test_parse_specs():
    assert ops.parse_kernels("reference") == dict.fromkeys(ops.OPS, "reference")
    assert ops.parse_kernels("masking=triton, masked_mse=reference") == {
        "masking": "triton", "unshuffle": "auto", "masked_mse": "reference"}  # fmt: skip
    assert ops.parse_kernels({"unshuffle": "reference"})["unshuffle"] == "reference"
    with pytest.raises(FastMAEError, match="unknown kernel op"):
        ops.parse_kernels("gelu=triton")


def test_env_override_wins(monkeypatch):
    monkeypatch.setenv("FASTMAE_KERNELS", "masked_mse=reference")
    model = MaskedAutoencoderViT(**SQUARE, kernels="auto")
    assert model.kernels == {"masking": "auto", "unshuffle": "auto", "masked_mse": "reference"}


def test_auto_is_reference_on_cpu():
    model = MaskedAutoencoderViT(**SQUARE)
    assert model.kernels_used("cpu") == dict.fromkeys(ops.OPS, "reference")


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from fastmae.kernels import _common

    monkeypatch.setattr(_common, "INTERPRETED", False)  # as if fastmae was imported without TRITON_INTERPRET=1
    model = MaskedAutoencoderViT(**SQUARE, kernels="triton")
    assert model.kernels_used("cuda") == dict.fromkeys(ops.OPS, "triton")
    with pytest.raises(
        FastMAEError, match="kernels='triton' requested for masking but it cannot run: .*TRITON_INTERPRET=1"
    ):
        model(torch.randn(1, 3, 32, 32))


def test_auto_on_cuda_picks_triton():
    model = MaskedAutoencoderViT(**SQUARE)
    assert model.kernels_used("cuda") == dict.fromkeys(ops.OPS, "triton")


def test_reference_ops_compose_to_the_model_loss():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**SQUARE, kernels="reference")
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss, pred, mask = model(imgs, noise=noise)
    x = model.patch_embed(imgs)
    vis, mask2, ids = random_masking_reference(x, noise, 4, model.pos_embed)
    assert torch.equal(mask, mask2) and vis.shape == (2, 4, 64)
    full = unshuffle_reference(torch.randn(2, 5, 32), model.mask_token, ids, model.decoder_pos_embed)
    assert full.shape == (2, 17, 32)
    assert torch.equal(loss, masked_mse_reference(pred, imgs, mask, 8, False))
