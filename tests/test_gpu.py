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
    assert summary["compile"] == "full" and summary["kernels"] == {"masking": "triton", "unshuffle": "triton",
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
    steps = [r for r in data["rows"] if r["name"] == "pretrain_step"]
    fast = [r for r in steps if r["config"] == "fastmae"]
    assert fast and all(r["compile"] == "full" and set(r["kernels"].values()) == {"triton"} for r in fast)
    assert all(r["peak_mem_gb"] > 0 and not r.get("error") for r in steps)
    assert all(r["ok"] for r in data["rows"] if r["name"] == "equivalence")


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


def _cuda_trainer(graphs: bool, compile_model: bool = False):
    """The pretraining step as the loop builds it (``build_step`` over ``mae_loss`` in a one-process run spec: bf16
    autocast); ``.model``: the MAE."""
    from fastmae.train.pretrain import mae_loss
    from fastmae.train.schedule import build_optimizer
    from fastmae.train.spec import local_spec
    from fastmae.train.step import StepParts, build_step

    torch.manual_seed(0)
    model = fastmae.create_model("mae_vit_tiny_patch16", img_size=64, kernels="triton", norm_pix_loss=True).to(CUDA)
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), fused=True)
    spec = local_spec(CUDA, compile="full" if compile_model else "off", graphs=graphs)
    loss = mae_loss(model, spec.compiled(model), CUDA, seed=3, mask_ratio=0.75)
    step = build_step(StepParts(loss, opt, model.parameters()), spec, warmup=2)
    step.model = model
    return step


def _cuda_batches(n: int, batch: int = 16):
    """(batch, lr) pairs on the host (pinned), brought to the GPU ahead of the step as the loop does."""
    from fastmae.train.data import Batch, on_device

    g = torch.Generator().manual_seed(1)
    host, lrs = [], []
    for b in range(n):
        imgs = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8, generator=g).pin_memory()
        ids = torch.arange(b * batch, (b + 1) * batch) * 7 + 3
        host.append(Batch(imgs, torch.zeros(batch, dtype=torch.long), ids, b // 3, (b // 3, b % 3 + 1)))
        lrs.append(1e-3 * (b + 1) / n)
    return zip(on_device(iter(host), CUDA), lrs, strict=True)


@pytest.mark.parametrize("compile_model", [False, True])
def test_whole_step_as_one_cuda_graph_matches_the_ordinary_step(compile_model):
    """A real CUDA graph of forward, backward, NaN guard and fused AdamW: 8 steps (lr every step, epoch every 3) give
    the ordinary step's losses and weights (the graphed lr is float32 on the device: last-bit differences only), so
    the masks are drawn from each step's ids and epoch inside the graph, not frozen at capture."""
    eager, graphed = _cuda_trainer(False, compile_model), _cuda_trainer(True, compile_model)
    losses = []
    for batch, lr in _cuda_batches(8):
        a = eager(batch, lr).clone()
        b = graphed(batch, lr).clone()
        losses.append((a.item(), b.item()))
    assert graphed.captured
    for a, b in losses:
        assert abs(a - b) <= 1e-3 * abs(a), losses
    assert len({round(b, 6) for _, b in losses[3:]}) == 5  # replays see new batches and masks
    for p, q in zip(eager.model.parameters(), graphed.model.parameters(), strict=True):
        assert _rel(q, p) < 1e-3


def test_graphed_steps_make_no_host_sync():
    """Between logging steps the loop never waits for the GPU: batches brought ahead and replays under torch's sync
    debug mode 'error'."""
    graphed = _cuda_trainer(True)
    batches = _cuda_batches(6)
    warm = [next(batches) for _ in range(3)]
    for batch, lr in warm:
        graphed(batch, lr)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch, lr in batches:
            graphed(batch, lr)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert graphed.captured and torch.isfinite(graphed(*warm[0]))


def test_crop_resize_kernel_compiled_at_imagenet_sizes():
    """The --loader gpu kernel compiled for this GPU: 16 images of ImageNet-like sizes, random boxes and flips, 224
    px: against its float64 reference (< 0.01 level) and the CPU pipeline on the same boxes (<= 3 levels)."""
    from fastmae.kernels.crop_resize import crop_resize_normalize, crop_resize_normalize_reference
    from fastmae.train.data.decode import IMAGENET_STD, crop_resize_flip, normalize

    _compiled_not_interpreted()
    g = torch.Generator().manual_seed(0)
    imgs, boxes, flips = [], [], []
    for k in range(16):
        h, w = 300 + 13 * k, 500 - 7 * k
        small = torch.rand(1, 3, h // 8, w // 8, generator=g) * 255
        imgs.append(torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear")[0].round().to(torch.uint8))
        cw, ch = int(w * (0.3 + 0.04 * k)), int(h * (0.25 + 0.045 * k))
        boxes.append((k * 3 % (w - cw + 1), k * 5 % (h - ch + 1), cw, ch))
        flips.append(k % 2)
    out = crop_resize_normalize([i.to(CUDA) for i in imgs], boxes, flips, 224).cpu()
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ref = crop_resize_normalize_reference(imgs, boxes, flips, 224)
    cpu = torch.stack([normalize(crop_resize_flip(i, b, bool(f), 224)) for i, b, f in zip(imgs, boxes, flips,
                                                                                           strict=True)])  # fmt: skip
    assert ((out - ref) * std * 255).abs().max() < 1e-2
    assert ((out - cpu) * std * 255).abs().max() <= 3


def _smoke(check: str, tmp_path) -> dict:
    """One check of ``benchmarks/gpu_smoke.py``, run as the GPU sitting runs it (a process of its own): its details,
    or the test fails with the check's one-line error."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
    out = tmp_path / f"{check}.jsonl"
    subprocess.run([sys.executable, str(script), "--check", check, "--device", "cuda", "--out", str(out)], check=True,
                   timeout=300)  # fmt: skip
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["ok"], record["error"]
    return record["details"]


DECODE_MEAN = 2.0  # nvJPEG against libjpeg, mean difference in 8-bit levels (gpu_smoke's bound; torchvision's own test)
LOADER_BOUNDS = {"mean": 1.0, "p999": 12.0, "max": 48.0}  # the GPU loader against the torchvision loader (gpu_smoke's)


def _levels(a, b) -> dict:
    """|a - b| in 8-bit levels: mean, 99.9th percentile, largest."""
    d = (a.float() - b.float()).abs().flatten()
    return {"mean": d.mean().item(), "p999": torch.quantile(d[:: max(1, d.numel() // 1_000_000)], 0.999).item(),
            "max": d.max().item()}  # fmt: skip


def test_crop_kernel_alone_matches_the_cpu_pipeline_on_nvjpeg_pixels(tmp_path):
    """nvJPEG and libjpeg decode the same JPEGs to different pixels (IDCT rounding, chroma upsampling), so they are
    compared by the mean, the 99.9th percentile and the largest difference (torchvision's own test bounds the mean);
    the crop kernel is compared alone, against the CPU pipeline on the very pixels nvJPEG decoded: within 3 levels."""
    details = _smoke("nvjpeg-crop", tmp_path)  # fails with the numbers when a bound is passed
    assert details["decode_levels"]["mean"] < DECODE_MEAN
    assert details["crop_levels"]["max"] <= 3


@pytest.mark.parametrize("head_dim", [64, 32])
def test_xformers_matches_math_at_the_encoder_and_decoder_shapes(head_dim, tmp_path):
    """xformers forward + backward in bf16 at 50 tokens x head dim 64 (the encoder) and 197 x 32 (the decoder)
    against float64 math, naming the operators that ran."""
    details = _smoke(f"attn-xformers-h{head_dim}", tmp_path)  # fails with the numbers
    assert details["xformers_ops"]["forward"].startswith(("fa2F", "fa3F", "cutlassF")), details


def test_torchcodec_batch_decode_on_the_gpu_is_within_the_nvjpeg_bounds(tmp_path):
    details = _smoke("torchcodec-cuda", tmp_path)
    assert details["levels"]["mean"] < DECODE_MEAN


def test_gpu_loader_with_nvjpeg_gives_the_torchvision_loaders_batches(tmp_path):
    """--loader gpu for real (nvJPEG, the compiled kernel, the side stream): two epochs of generated ImageNet-like
    JPEGs, the torchvision loader's samples and boxes; pixels bounded by mean, 99.9th percentile and maximum (the
    decoders differ, see above)."""
    from fastmae.train.data import index_data
    from fastmae.train.data.decode import IMAGENET_STD, normalize
    from fastmae.train.data.gpu_loader import GPULoader, gpu_loader_unavailable_reason
    from fastmae.train.data.loaders import TorchvisionLoader
    from fastmae.train.samples import make_jpegs

    assert gpu_loader_unavailable_reason(CUDA) is None
    index = index_data(make_jpegs(tmp_path / "jpegs", 64, processes=1))
    ref = TorchvisionLoader(index, 224, 16, seed=2, num_workers=2)
    gpu = GPULoader(index, 224, 16, seed=2, device=CUDA, num_workers=2)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for epoch in (0, 1):
        for a, b in zip(ref.epoch(epoch), gpu.epoch(epoch), strict=True):
            assert b.images.device.type == "cuda" and torch.equal(a.ids, b.ids.cpu())
            stats = _levels(b.images.cpu() * std * 255, normalize(a.images) * std * 255)
            assert all(stats[k] <= bound for k, bound in LOADER_BOUNDS.items()), stats
    assert gpu.routes["gpu"] == 128 and gpu.routes["cpu"] == 0


def test_batches_ahead_on_the_device_keep_order_and_positions(tmp_path):
    assert _smoke("ahead-on-device", tmp_path)["batches"] > 0  # fails naming what differs
