"""The GPU suite: fused ops compiled (not interpreted) at ViT-B/L/H shapes, the compiled bf16 model against the fp32
reference, attention, a short CUDA pretraining run, DALI mixed decode, and the benchmark suite on CUDA.

Every test here carries the ``gpu`` marker: without CUDA they are skipped with the reason (conftest.py), and
``pytest -m gpu`` runs only them (the first call of a GPU session, ../shared/GPU.md).
"""

import json

import pytest
import torch

import fastmae
from fastmae.cli import main

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
# (batch, patches, encoder width, decoder width, patch, image) of ViT-B/16, ViT-L/16, ViT-H/14 at 224 px, batch 64
OFFICIAL = {"B": (64, 196, 768, 512, 16, 224), "L": (64, 196, 1024, 512, 16, 224), "H": (64, 256, 1280, 512, 14, 224)}
DTYPES = [torch.float32, torch.bfloat16]


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _compiled_not_interpreted():
    from fastmae.kernels import _common

    assert not _common.INTERPRETED, "TRITON_INTERPRET=1 is set: the GPU suite must run the compiled kernels"


@pytest.mark.parametrize("model", OFFICIAL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masking_and_unshuffle_at_official_shapes(model, dtype):
    from fastmae.kernels.masking import random_masking, random_masking_reference
    from fastmae.kernels.unshuffle import unshuffle, unshuffle_reference

    _compiled_not_interpreted()
    N, L, D, Dd, _, _ = OFFICIAL[model]
    g = torch.Generator(device=CUDA).manual_seed(L + D)
    K = int(L * 0.25)
    x = torch.randn(N, D, L, device=CUDA, generator=g).to(dtype).transpose(1, 2).requires_grad_(True)
    noise = torch.rand(N, L, device=CUDA, generator=g)
    pos = torch.randn(1, L + 1, D, device=CUDA, generator=g)
    out, ref = random_masking(x, noise, K, pos), random_masking_reference(x, noise, K, pos)
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == r.dtype and torch.equal(o, r)  # a gather and an add: bit-identical
    grad = torch.randn_like(out[0])
    assert torch.equal(torch.autograd.grad(out[0], x, grad)[0], torch.autograd.grad(ref[0], x, grad)[0])
    xd = torch.randn(N, 1 + K, Dd, device=CUDA, generator=g).to(dtype).requires_grad_(True)
    tok = (0.02 * torch.randn(1, 1, Dd, device=CUDA, generator=g)).requires_grad_(True)
    dpos = torch.randn(1, L + 1, Dd, device=CUDA, generator=g)
    ids = out[2]
    o, r = unshuffle(xd, tok, ids, dpos), unshuffle_reference(xd, tok, ids, dpos)
    assert o.dtype == r.dtype and torch.equal(o, r)
    grad = torch.randn_like(o)
    gx, gt = torch.autograd.grad(o, (xd, tok), grad)
    rx, rt = torch.autograd.grad(r, (xd, tok), grad)
    assert torch.equal(gx, rx) and _rel(gt, rt) < 1e-5  # the token's gradient: another summation order


@pytest.mark.parametrize("model", OFFICIAL)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_at_official_shapes(model, dtype, norm_pix):
    from fastmae.kernels.masked_mse import masked_mse, masked_mse_reference

    _compiled_not_interpreted()
    N, L, _, _, p, size = OFFICIAL[model]
    g = torch.Generator(device=CUDA).manual_seed(p + norm_pix)
    imgs = torch.randn(N, 3, size, size, device=CUDA, generator=g)
    pred = torch.randn(N, L, p * p * 3, device=CUDA, generator=g).to(dtype).requires_grad_(True)
    mask = (torch.rand(N, L, device=CUDA, generator=g) < 0.75).float()
    loss, ref = masked_mse(pred, imgs, mask, p, norm_pix), masked_mse_reference(pred, imgs, mask, p, norm_pix)
    exact = masked_mse_reference(pred.double(), imgs.double(), mask.double(), p, norm_pix)
    # at most ~2x the error of the same-dtype PyTorch computation, plus a small atol
    assert abs(loss.double() - exact) <= 2 * abs(ref.double() - exact) + 1e-6 * abs(exact) + 1e-7
    (gp,) = torch.autograd.grad(loss, pred)
    (rp,) = torch.autograd.grad(ref, pred)
    assert _rel(gp, rp) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.slow
def test_compiled_bf16_model_matches_fp32_reference():
    """kernels="triton", torch.compile, bf16 autocast against the eager fp32 reference model: the same masks; loss,
    prediction and gradients within bf16 arithmetic."""
    _compiled_not_interpreted()
    torch.manual_seed(0)
    ref = fastmae.create_model("mae_vit_base_patch16", kernels="reference", attn_backend="math").to(CUDA)
    fast = fastmae.create_model("mae_vit_base_patch16", kernels="triton").to(CUDA)
    fast.load_state_dict(ref.state_dict())
    g = torch.Generator(device=CUDA).manual_seed(1)
    imgs = torch.randn(8, 3, 224, 224, device=CUDA, generator=g)
    noise = torch.rand(8, 196, device=CUDA, generator=g)
    rloss, rpred, rmask = ref(imgs, mask_ratio=0.75, noise=noise)
    rloss.backward()
    step = torch.compile(fast, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, pred, mask = step(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    assert torch.equal(mask, rmask) and fast.kernels_used(CUDA) == {k: "triton" for k in fast.kernels_used(CUDA)}
    assert abs(loss.item() - rloss.item()) <= 2e-2 * abs(rloss.item())
    assert _rel(pred.float(), rpred) < 3e-2
    grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        if p.requires_grad:
            assert _rel(p.grad, grads[name].grad) < 5e-2, name


def test_attention_auto_picks_a_fused_kernel_and_math_agrees():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastmae import attention

    q, k, v = (torch.randn(4, 12, 50, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(3))
    chosen = attention.resolve("auto", q, k, v).name
    assert chosen in ("xformers", "sdpa"), chosen
    fused_only = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused_only):  # raises if SDPA would fall back to its unfused math kernel
        fused = attention.attention(q, k, v, backend="auto")
    exact = attention.attention(q.float(), k.float(), v.float(), backend="math")
    assert _rel(fused.float(), exact) < 1e-2


@pytest.mark.slow
def test_short_pretraining_on_cuda_with_compile_and_bf16(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--model", "mae_vit_base_patch16", "--img-size", "224", "--loader", "synthetic",
                 "--batch-size", "32", "--synthetic-images", "640", "--epochs", "1", "--warmup-epochs", "0",
                 "--lr", "1e-4", "--no-progress", "--log-every", "1", "--device", "cuda",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["device"] == "cuda" and summary["precision"] == "bf16"
    assert summary["compile"] is True and summary["kernels"] == {"masking": "triton", "unshuffle": "triton",
                                                                  "masked_mse": "triton"}  # fmt: skip
    assert summary["attn_backend"] in ("xformers", "sdpa") and summary["gpu"]
    assert summary["final_loss"] < summary["first_logged_loss"]


@pytest.mark.slow
def test_dali_mixed_decode_pretraining(tmp_path):
    from fastmae.train.data.dali import dali_unavailable_reason

    if (reason := dali_unavailable_reason()) is not None:
        pytest.skip(reason)
    import numpy as np
    from PIL import Image

    root = tmp_path / "jpegs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (300 + i, 400, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
    out = tmp_path / "run"
    assert main(["pretrain", "--loader", "dali", "--data", str(root), "--img-size", "64", "--batch-size", "8",
                 "--epochs", "2", "--warmup-epochs", "0", "--no-progress", "--device", "cuda",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loader"] == "dali" and summary["device"] == "cuda" and summary["skipped_files"] == 0


@pytest.mark.slow
def test_bench_quick_on_cuda(tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--suite", "pretrain", "--device", "cuda", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["env"]["gpu"] != "cpu" and data["env"]["cuda"]
    fast = [r for r in data["rows"] if r["config"] == "fastmae"]
    assert fast and all(r["compile"] and set(r["kernels"].values()) == {"triton"} for r in fast)
    assert all(r["peak_mem_gb"] > 0 for r in data["rows"])


@pytest.mark.parametrize("model", OFFICIAL)
def test_visible_embedding_at_official_shapes(model):
    from fastmae.kernels.visible_embed import visible_embed, visible_embed_reference

    N, L, D, _, p, size = OFFICIAL[model]
    g = torch.Generator(device=CUDA).manual_seed(D)
    imgs = torch.randn(N, 3, size, size, device=CUDA, generator=g)
    w = (0.02 * torch.randn(D, 3, p, p, device=CUDA, generator=g)).requires_grad_(True)
    b = torch.zeros(D, device=CUDA, requires_grad=True)
    noise = torch.rand(N, L, device=CUDA, generator=g)
    pos = torch.randn(1, L + 1, D, device=CUDA, generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, mask, ids = visible_embed(imgs, w, b, noise, L // 4, pos)
        ref, rmask, rids = visible_embed_reference(imgs, w, b, noise, L // 4, pos)
    assert torch.equal(mask, rmask) and torch.equal(ids, rids) and out.dtype == ref.dtype
    assert _rel(out, ref) < 1e-2
    grad = torch.randn_like(out)
    assert _rel(torch.autograd.grad(out, w, grad)[0], torch.autograd.grad(ref, w, grad)[0]) < 2e-2
