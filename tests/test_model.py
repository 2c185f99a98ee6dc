"""The fastmae model against an independent float64 reference, official names and init, and its error messages."""

import math

import numpy as np
import pytest
import torch

import fastmae
from fastmae import FastMAEError, MaskedAutoencoderViT
from fastmae.pos_embed import sincos_2d

from .conftest import AWKWARD, PATCH4, SQUARE
from .reference_mae import RefMAE, official_sincos_pos_embed


def _pair(cfg, norm_pix, encoder_mode="visible", **extra):
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**cfg, norm_pix_loss=norm_pix, encoder_mode=encoder_mode, **extra)
    ref = RefMAE(**cfg, norm_pix_loss=norm_pix, encoder_mode=encoder_mode)
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref.double()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("cfg", [AWKWARD, SQUARE, PATCH4], ids=["L49-hd15", "L16", "p4-L64"])
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "normpix"])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.6])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("encoder_mode", ["visible", "mask_token"])
def test_matches_reference(cfg, norm_pix, mask_ratio, batch, encoder_mode):
    model, ref = _pair(cfg, norm_pix, encoder_mode, kernels="reference")
    L = model.patch_embed.num_patches
    g = torch.Generator().manual_seed(batch)
    imgs = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], generator=g)
    noise = torch.rand(batch, L, generator=g)

    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    loss.backward()
    rloss, rpred, rmask = ref(imgs.double(), mask_ratio, noise.double())
    rloss.backward()

    assert mask.shape == (batch, L) and pred.shape == (batch, L, cfg["patch_size"] ** 2 * 3)
    assert torch.equal(mask, rmask.float())
    assert mask.sum(1).eq(L - int(L * (1 - mask_ratio))).all()
    assert _rel(pred, rpred) < 1e-5
    assert abs(loss.item() - rloss.item()) <= 1e-5 * abs(rloss.item())
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rg = ref_params[name].grad
        if name == "mask_token" and encoder_mode == "mask_token":
            assert p.grad is None and rg is None  # the decoder's mask token is unused in that mode
            continue
        assert p.grad is not None, name
        assert _rel(p.grad, rg) < 1e-4, name
        checked += 1
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert checked == trainable - (encoder_mode == "mask_token")


@pytest.mark.parametrize("C, norm_pix, encoder_mode", [(1, False, "visible"), (1, True, "mask_token"),
                                                       (2, True, "visible"), (4, False, "visible"),
                                                       (4, True, "mask_token"), (13, True, "visible"),
                                                       (13, False, "mask_token")])  # fmt: skip
def test_matches_reference_at_any_band_count(C, norm_pix, encoder_mode):
    """``in_chans`` C: the patch embedding, the decoder's p*p*C outputs and the loss against the float64 reference
    (which patchifies with F.unfold), batch 1 and 3, 49 patches."""
    cfg = {**AWKWARD, "in_chans": C, "depth": 1, "decoder_depth": 1}
    model, ref = _pair(cfg, norm_pix, encoder_mode, kernels="reference")
    for batch in (1, 3):
        g = torch.Generator().manual_seed(C + batch)
        imgs, noise = torch.randn(batch, C, 56, 56, generator=g), torch.rand(batch, 49, generator=g)
        model.zero_grad()
        ref.zero_grad()
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
        loss.backward()
        rloss, rpred, rmask = ref(imgs.double(), 0.75, noise.double())
        rloss.backward()
        assert pred.shape == (batch, 49, 64 * C) and torch.equal(mask, rmask.float())
        assert _rel(pred, rpred) < 1e-5 and abs(loss.item() - rloss.item()) <= 1e-5 * abs(rloss.item())
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert _rel(p.grad, ref_params[name].grad) < 1e-4, name
        assert model.patch_embed.proj.weight.grad.shape == (60, C, 8, 8)
        torch.testing.assert_close(model.unpatchify(model.patchify(imgs)), imgs, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_backends_agree_in_model(backend):
    torch.manual_seed(0)
    a = MaskedAutoencoderViT(**AWKWARD, attn_backend="math", kernels="reference")
    b = MaskedAutoencoderViT(**AWKWARD, attn_backend=backend, kernels="reference")
    b.load_state_dict(a.state_dict())
    imgs, noise = torch.randn(2, 3, 56, 56), torch.rand(2, 49)
    la, pa, _ = a(imgs, noise=noise)
    lb, pb, _ = b(imgs, noise=noise)
    assert _rel(pb, pa) < 1e-5 and abs(la.item() - lb.item()) < 1e-5
    assert b.attn_backend_used == backend


def test_same_noise_is_bit_identical():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**AWKWARD)
    imgs, noise = torch.randn(3, 3, 56, 56), torch.rand(3, 49)
    out1, out2 = model(imgs, noise=noise), model(imgs, noise=noise)
    for x, y in zip(out1, out2, strict=True):
        assert torch.equal(x, y)


def test_noise_none_draws_fresh_masks():
    model = MaskedAutoencoderViT(**SQUARE)
    imgs = torch.randn(2, 3, 32, 32)
    _, _, m1 = model(imgs)
    _, _, m2 = model(imgs)
    assert m1.sum() == m2.sum() and not torch.equal(m1, m2)


def _official_keys(depth, decoder_depth):
    blk = [
        f"{m}.{w}"
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for w in ("weight", "bias")
    ]
    keys = ["cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed.proj.weight",
            "patch_embed.proj.bias", "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias",
            "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]  # fmt: skip
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in blk]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in blk]
    return set(keys)


def test_vit_base_state_dict_is_official():
    model = fastmae.create_model("mae_vit_base_patch16")
    sd = model.state_dict()
    assert set(sd) == _official_keys(12, 8)
    shapes = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "mask_token": (1, 1, 512),
              "decoder_pos_embed": (1, 197, 512), "patch_embed.proj.weight": (768, 3, 16, 16),
              "blocks.0.attn.qkv.weight": (2304, 768), "blocks.11.mlp.fc1.weight": (3072, 768),
              "decoder_embed.weight": (512, 768), "decoder_blocks.7.attn.qkv.weight": (1536, 512),
              "decoder_pred.weight": (768, 512), "decoder_pred.bias": (768,)}  # fmt: skip
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert model.blocks[0].norm1.eps == 1e-6 and model.decoder_norm.eps == 1e-6
    # A checkpoint in the official layout (here: written by the reference model with official names) loads strictly.
    ref = RefMAE(224, 16, 3, 768, 12, 12, 512, 8, 16)
    missing = model.load_state_dict(ref.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys


def test_state_dict_round_trip_and_mask_token_mode_extra_key(tmp_path):
    a = MaskedAutoencoderViT(**AWKWARD)
    torch.save({"model": a.state_dict()}, tmp_path / "c.pth")
    b = MaskedAutoencoderViT(**AWKWARD)
    b.load_state_dict(torch.load(tmp_path / "c.pth", weights_only=True)["model"], strict=True)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert set(a.state_dict()) == _official_keys(2, 2)
    m = MaskedAutoencoderViT(**AWKWARD, encoder_mode="mask_token")
    assert set(m.state_dict()) - set(a.state_dict()) == {"encoder_mask_token"}


def test_official_initialisation():
    torch.manual_seed(0)
    model = fastmae.create_model("mae_vit_small_patch16")
    for name, grid in (("pos_embed", 14), ("decoder_pos_embed", 14)):
        p = getattr(model, name)
        assert not p.requires_grad
        expected = torch.from_numpy(official_sincos_pos_embed(p.shape[-1], grid)).float()
        torch.testing.assert_close(p[0], expected, atol=2e-6, rtol=0)
    # first half of channels: the patch column; second half: the patch row (official layout)
    pe = sincos_2d(8, 3)
    assert torch.equal(pe[1, :4], pe[3 + 1, :4]) and not torch.equal(pe[1, 4:], pe[4, 4:])
    for tok in (model.cls_token, model.mask_token):
        assert abs(tok.std().item() - 0.02) < 0.01
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            bound = math.sqrt(6 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
            assert torch.count_nonzero(m.bias) == 0, name
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))  # xavier of the weight viewed as [D, C*p*p]
    assert 0.9 * bound < w.abs().max() <= bound


def test_factories():
    names = fastmae.list_models()
    for n in ("mae_vit_tiny_patch16", "mae_vit_small_patch16", "mae_vit_base_patch16", "mae_vit_large_patch16",
              "mae_vit_huge_patch14"):  # fmt: skip
        assert n in names
    with pytest.raises(FastMAEError, match="known models: .*mae_vit_base_patch16"):
        fastmae.create_model("mae_vit_gigantic")
    m = fastmae.create_model("mae_vit_tiny_patch16", img_size=64, decoder_depth=1)
    assert len(m.decoder_blocks) == 1 and m.patch_embed.num_patches == 16
    small = fastmae.create_model("mae_vit_mini_patch4", img_size=32)  # small images: an 8 x 8 grid of 4-px patches
    assert small.patch_embed.num_patches == 64 and small.decoder_pred.out_features == 48 and len(small.blocks) == 6
    assert fastmae.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=4).patch_embed.num_patches == 64


def test_official_flop_counts_match_reference_facts():
    # Reference: ViT-B enc 8.6 G + dec 10.7 G forward FLOPs; we count the patch embed on all patches (+0.17 G).
    with torch.device("meta"):
        model = fastmae.create_model("mae_vit_base_patch16")
    f = fastmae.flops_per_image(model)
    assert abs(f["encoder"] / 1e9 - 8.6) < 0.3 and abs(f["decoder"] / 1e9 - 10.7) < 0.2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(img_size=60, patch_size=8), "img_size 60 is not divisible by patch_size 8"),
        (dict(num_heads=7), "encoder num_heads 7 does not divide its width 60"),
        (dict(decoder_num_heads=5), "decoder num_heads 5 does not divide its width 36"),
        (dict(encoder_mode="everything"), "unknown encoder_mode"),
        (dict(attn_backend="flash3"), "unknown attention backend 'flash3'"),
        (dict(kernels="fast"), "unknown kernels choice 'fast'"),
        (dict(kernels={"masking": "triton", "softmax": "triton"}), "unknown kernel op"),
    ],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises(FastMAEError, match=message):
        MaskedAutoencoderViT(**{**AWKWARD, **kwargs})


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_mask_ratio_out_of_range(ratio):
    model = MaskedAutoencoderViT(**SQUARE)
    with pytest.raises(FastMAEError, match=r"mask_ratio must be in \[0, 1\)"):
        model(torch.randn(1, 3, 32, 32), mask_ratio=ratio)


def test_noise_shape_checked():
    model = MaskedAutoencoderViT(**SQUARE)
    with pytest.raises(FastMAEError, match=r"noise must have shape \(2, 16\)"):
        model(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 15))


def test_official_helpers():
    model = MaskedAutoencoderViT(**AWKWARD)
    imgs = torch.randn(2, 3, 56, 56)
    x = model.patchify(imgs)
    assert x.shape == (2, 49, 192)
    # patch (row 1, col 2), pixel (3, 5), channel 2 sits at index (3 * 8 + 5) * 3 + 2
    assert x[0, 1 * 7 + 2, (3 * 8 + 5) * 3 + 2] == imgs[0, 2, 8 + 3, 16 + 5]
    assert torch.equal(model.unpatchify(x), imgs)
    tokens = torch.randn(2, 49, 60)
    noise = torch.rand(2, 49)
    vis, mask, ids_restore = model.random_masking(tokens, 0.75, noise=noise)
    keep = noise.argsort(dim=1)[:, :12]
    assert torch.equal(vis, torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, 60)))
    assert torch.equal(torch.gather(noise.argsort(1), 1, ids_restore), torch.arange(49).expand(2, 49))
    latent, mask2, ids = model.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 13, 60) and torch.equal(mask, mask2)
    assert model.forward_decoder(latent, ids).shape == (2, 49, 192)


def test_pos_embed_matches_numpy_for_non_square_dims():
    for dim, grid in ((60, 7), (1024, 14), (1280, 16)):
        ours = sincos_2d(dim, grid, cls_token=True).numpy()
        np.testing.assert_allclose(ours, official_sincos_pos_embed(dim, grid), atol=3e-6, rtol=0)
