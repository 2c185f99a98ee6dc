"""Visible-only patch embedding against the official conv-then-gather order: the op on awkward shapes (fp32, bf16,
gradients of the patch-embed weight and bias) and the whole model."""

import pytest
import torch
from fastmae.kernels.visible_embed import visible_embed, visible_embed_reference

from fastmae import FastMAEError, MaskedAutoencoderViT

from .conftest import AWKWARD, PATCH4

# (batch, channels, image, patch, width): 49, 64 and 25 patches, widths 60, 123, 48 and 36, batch 1 to 3, and any
# band count (1, 2, 4, 13)
SHAPES = [(1, 3, 56, 8, 60), (3, 3, 32, 4, 123), (2, 1, 28, 7, 48), (1, 2, 20, 4, 36), (3, 4, 20, 4, 36),
          (1, 13, 20, 4, 36)]  # fmt: skip


def _err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("N, C, S, p, D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_visible_embed_matches_the_official_order(N, C, S, p, D, dtype):
    g = torch.Generator().manual_seed(S + D)
    L = (S // p) ** 2
    imgs = torch.randn(N, C, S, S, generator=g).to(dtype)
    w = (0.05 * torch.randn(D, C, p, p, generator=g)).to(dtype).requires_grad_(True)
    b = (0.05 * torch.randn(D, generator=g)).to(dtype).requires_grad_(True)
    noise = torch.rand(N, L, generator=g)
    noise[:, L // 2] = noise[:, 1]  # a tie: broken by index in both
    pos = torch.randn(1, L + 1, D, generator=g)
    K = int(L * 0.25)
    out, mask, ids = visible_embed(imgs, w, b, noise, K, pos)
    ref, rmask, rids = visible_embed_reference(imgs, w, b, noise, K, pos)
    exact, _, _ = visible_embed_reference(imgs.double(), w.double(), b.double(), noise, K, pos.double())
    assert torch.equal(mask, rmask) and torch.equal(ids, rids) and out.shape == (N, K, D) and out.dtype == ref.dtype
    floor = 1e-6 if dtype == torch.float32 else 4e-3
    assert _err(out, exact) <= 2 * _err(ref, exact) + floor  # a matmul instead of a convolution: summation order
    grad = torch.randn(out.shape, generator=g).to(out.dtype)
    gw, gb = torch.autograd.grad(out, (w, b), grad)
    rw, rb = torch.autograd.grad(ref, (w, b), grad)
    ew, eb = torch.autograd.grad(exact, (w, b), grad.double())  # the float64 graph reaches w and b
    assert _err(gw, ew) <= 2 * _err(rw, ew) + floor and _err(gb, eb) <= 2 * _err(rb, eb) + floor
    again, _, _ = visible_embed(imgs, w, b, noise, K, pos)
    assert torch.equal(again, out)  # deterministic


@pytest.mark.parametrize("cfg", [AWKWARD, PATCH4], ids=["L49", "p4-L64"])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_model_with_visible_embedding_matches_the_full_one(cfg, norm_pix):
    torch.manual_seed(0)
    full = MaskedAutoencoderViT(**cfg, norm_pix_loss=norm_pix, kernels="reference", embed="full")
    vis = MaskedAutoencoderViT(**cfg, norm_pix_loss=norm_pix, kernels="reference", embed="visible")
    vis.load_state_dict(full.state_dict())
    assert vis.embed_used("cpu") == "visible" and full.embed_used("cuda") == "full"
    g = torch.Generator().manual_seed(2)
    S, L = cfg["img_size"], (cfg["img_size"] // cfg["patch_size"]) ** 2
    imgs, noise = torch.randn(3, 3, S, S, generator=g), torch.rand(3, L, generator=g)
    lf, pf, mf = full(imgs, mask_ratio=0.75, noise=noise)
    lv, pv, mv = vis(imgs, mask_ratio=0.75, noise=noise)
    lf.backward()
    lv.backward()
    assert torch.equal(mv, mf) and _err(pv, pf) < 1e-5 and abs(lv.item() - lf.item()) <= 1e-5 * lf.item()
    for (name, p), q in zip(vis.named_parameters(), full.parameters(), strict=True):
        if p.requires_grad:
            assert _err(p.grad, q.grad) < 1e-4, name
    compiled = torch.compile(vis, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(imgs, mask_ratio=0.75, noise=noise)[2], mf)


@pytest.mark.parametrize("C", [1, 2, 4, 13])
def test_model_with_visible_embedding_at_any_band_count(C):
    torch.manual_seed(C)
    cfg = {**PATCH4, "in_chans": C, "img_size": 20, "depth": 1}  # 25 patches
    full = MaskedAutoencoderViT(**cfg, norm_pix_loss=True, kernels="reference", embed="full")
    vis = MaskedAutoencoderViT(**cfg, norm_pix_loss=True, kernels="reference", embed="visible")
    vis.load_state_dict(full.state_dict())
    g = torch.Generator().manual_seed(C)
    imgs, noise = torch.randn(1, C, 20, 20, generator=g), torch.rand(1, 25, generator=g)
    lf, pf, mf = full(imgs, mask_ratio=0.75, noise=noise)
    lv, pv, mv = vis(imgs, mask_ratio=0.75, noise=noise)
    lf.backward()
    lv.backward()
    assert torch.equal(mv, mf) and pv.shape == (1, 25, 16 * C) and _err(pv, pf) < 1e-5
    assert _err(vis.patch_embed.proj.weight.grad, full.patch_embed.proj.weight.grad) < 1e-4


def test_embed_choice():
    model = MaskedAutoencoderViT(**AWKWARD)  # auto
    assert model.embed_used("cpu") == "full" and model.embed_used("cuda") == "visible"
    assert MaskedAutoencoderViT(**AWKWARD, kernels="reference").embed_used("cuda") == "full"  # the official order
    assert MaskedAutoencoderViT(**AWKWARD, encoder_mode="mask_token", embed="visible").embed_used("cpu") == "full"
    with pytest.raises(FastMAEError, match="unknown embed 'fast'; choose one of auto, full, visible"):
        MaskedAutoencoderViT(**AWKWARD, embed="fast")
    vis = MaskedAutoencoderViT(**AWKWARD, embed="visible")
    with pytest.raises(FastMAEError, match=r"images are \(48, 48\) pixels, the model takes \(56, 56\)"):
        vis(torch.randn(1, 3, 48, 48))
