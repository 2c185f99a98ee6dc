"""The GPU sitting's first stage: every GPU-only path once, at tiny shapes, each in its own process with its own
timeout, one JSON line per path (``{"check", "ok", "status", "seconds", "error", "details"}``), so that one crash (an
illegal memory access, a segfault in a driver library, a hang) costs that path alone, and the later stages skip what
failed. ``status`` is ``pass``, ``fail`` (the check found something, or its process crashed), ``timed out`` (slow:
stopped at its timeout) or ``not run`` (the stage's time was spent, or the stage was stopped): only ``fail`` makes the
later stages drop a lever (:func:`failed_checks`); a slow check is not a failed one.

    python benchmarks/gpu_smoke.py --out $OUT/smoke.jsonl            # every check, in parallel, about a minute
    python benchmarks/gpu_smoke.py --check graphs-full --out F       # one check, in this process
    python benchmarks/gpu_smoke.py --list

The checks (``CHECKS``), each against a reference where there is one:

- ``cuda``: the device, a bf16 matmul against float64.
- ``fused-ops``: masking, unshuffle and the fused MSE compiled for this GPU, forward and backward, against their
  PyTorch references at an awkward shape.
- ``attn-<backend>-h<dim>``: each SDPA kernel (flash, cudnn, efficient, sdpa's own choice) and xformers, forward and
  backward in bf16 at the encoder's shape (50 tokens, head dim 64) and the decoder's (197 tokens, head dim 32), against
  float64 math; xformers' details name the operators that ran. ``attn-xformers-noext-h<dim>``: the same in a process
  whose ``PYTHONPATH`` leaves out the folder holding ``nvidia-cuda-runtime-cu12`` (``libcudart.so.12``), so that
  xformers' C++ extension does not load and fastmae runs its ``-pt`` operators itself.
- ``torchcodec-cuda``: TorchCodec's batched nvJPEG decode (one call; baseline and progressive files) against libjpeg
  on the same files (mean, 99.9th percentile and largest difference).
- ``graphs-full`` / ``graphs-regional``: the whole step as one CUDA graph over the model compiled whole or per block:
  capture and replays against the ordinary step, and no compilation after the first step.
- ``nan-guard``: a non-finite step inside a replayed graph is skipped on the device and counted; weights untouched.
- ``host-sync``: ordinary steps and graph replays under ``torch.cuda.set_sync_debug_mode("error")``.
- ``nvjpeg-crop``: nvJPEG against libjpeg on the same files (mean, 99.9th percentile and largest difference), and the
  crop kernel alone against the CPU pipeline on the same decoded pixels.
- ``gpu-loader``: ``--loader gpu`` for two batches against the torchvision loader.
- ``ahead-on-device``: the loop's device prefetch keeps order and positions.
- ``pretrain-loop``: the real loop's fast path, ``fastmae pretrain --loader gpu --cuda-graphs --compile regional
  --stop-after-steps 8`` on 48 of the check's JPEGs (the producer thread, the thread-local graph capture beside it,
  the compiled blocks, the eval pictures): 8 steps, the step captured, a finite loss, no file skipped, no
  recompile-limit hit. Its CPU form runs the loop's CPU path (``--loader torchvision``, no graphs, no compile).
- ``attn-xformers-compiled``: a ViT-B-sized block with ``--attn-backend xformers`` compiled with ``fullgraph=True``
  (one graph: xformers' operators are opaque custom ops), forward and backward against the same block eager.

Without CUDA every check fails at once, saying so. ``--device cpu`` runs the checks that have a CPU form (the tests
use it to check the checks).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ATTENTION = [(b, d) for b in ("flash", "cudnn", "efficient", "sdpa", "xformers", "xformers-noext") for d in (64, 32)]
TOKENS = {64: 50, 32: 197}  # head dim -> tokens: the encoder's (visible 25% + cls at 224 px) and the decoder's
# The two that compile first: they take longest, and the checks run in this order, a few at a time.
CHECKS = ("pretrain-loop", "graphs-full", "graphs-regional", "attn-xformers-compiled", "cuda", "fused-ops",
          *(f"attn-{b}-h{d}" for b, d in ATTENTION), "nan-guard", "host-sync", "nvjpeg-crop", "torchcodec-cuda",
          "gpu-loader", "ahead-on-device")  # fmt: skip
# seconds; the rest: --timeout
TIMEOUT = {"pretrain-loop": 95, "graphs-full": 80, "graphs-regional": 80, "attn-xformers-compiled": 70}
STATUSES = ("pass", "fail", "timed out", "not run")


class CheckFailed(Exception):
    """A check's finding (not a crash): its message is the JSON line's ``error``."""


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _device(name: str):
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CheckFailed("no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


def check_cuda(device) -> dict:
    import torch

    if device.type != "cuda":
        raise CheckFailed(f"needs CUDA (device is {device.type})")
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(512, 512, device=device, generator=g) for _ in range(2))
    rel = _rel((a.bfloat16() @ b.bfloat16()).float(), a.double() @ b.double())
    if not rel < 1e-2:
        raise CheckFailed(f"bf16 matmul off float64 by {rel:.2e}")
    return {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
            "torch": torch.__version__, "cuda": torch.version.cuda, "bf16_matmul_rel": rel}  # fmt: skip


def check_fused_ops(device) -> dict:
    import torch
    from fastmae.kernels.masked_mse import masked_mse, masked_mse_reference
    from fastmae.kernels.masking import random_masking, random_masking_reference
    from fastmae.kernels.unshuffle import unshuffle, unshuffle_reference

    g = torch.Generator(device=device).manual_seed(1)
    N, L, D, K, p = 3, 49, 60, 12, 8  # 49 patches, width 60: no power of two
    x = torch.randn(N, L, D, device=device, generator=g).requires_grad_()
    noise = torch.rand(N, L, device=device, generator=g)
    pos = torch.randn(1, L + 1, D, device=device, generator=g)
    out, ref = random_masking(x, noise, K, pos), random_masking_reference(x, noise, K, pos)
    if not all(torch.equal(o, r) for o, r in zip(out, ref, strict=True)):
        raise CheckFailed("masking differs from its reference")
    grad = torch.randn_like(out[0])
    if not torch.equal(torch.autograd.grad(out[0], x, grad)[0], torch.autograd.grad(ref[0], x, grad)[0]):
        raise CheckFailed("masking's gradient differs from its reference")
    xd = torch.randn(N, 1 + K, 36, device=device, generator=g).requires_grad_()
    tok = torch.randn(1, 1, 36, device=device, generator=g).requires_grad_()
    dpos = torch.randn(1, L + 1, 36, device=device, generator=g)
    o, r = unshuffle(xd, tok, out[2], dpos), unshuffle_reference(xd, tok, out[2], dpos)
    if not torch.equal(o, r):
        raise CheckFailed("unshuffle differs from its reference")
    imgs = torch.randn(N, 3, 56, 56, device=device, generator=g)
    pred = torch.randn(N, L, p * p * 3, device=device, generator=g).requires_grad_()
    mask = (torch.rand(N, L, device=device, generator=g) < 0.75).float()
    got, want = masked_mse(pred, imgs, mask, p, True), masked_mse_reference(pred, imgs, mask, p, True)
    loss_rel = abs(got.item() - want.item()) / abs(want.item())
    grad_rel = _rel(torch.autograd.grad(got, pred)[0], torch.autograd.grad(want, pred)[0])
    if not (loss_rel < 1e-5 and grad_rel < 1e-5):
        raise CheckFailed(f"masked MSE off its reference: loss {loss_rel:.2e}, gradient {grad_rel:.2e}")
    from fastmae.kernels import _common

    return {"interpreted": _common.INTERPRETED, "mse_loss_rel": loss_rel, "mse_grad_rel": grad_rel}


def check_attention(device, backend: str, head_dim: int) -> dict:
    import torch

    from fastmae import attention

    if backend == "xformers-noext":
        import xformers

        if xformers._has_cpp_library:
            raise CheckFailed("xformers' C++ extension loaded in this process (libcudart.so.12 found): this check "
                              "needs a build without it")  # fmt: skip
        backend = "xformers"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(head_dim)
    q, k, v = (torch.randn(4, 4, TOKENS.get(head_dim, 50), head_dim, device=device, generator=g,
                           dtype=dtype).requires_grad_() for _ in range(3))  # fmt: skip
    impl = attention.get_backend(backend)
    if reasons := impl.unsupported(q, k, v):
        if backend == "xformers" and attention._xformers_fmha()[0] is not None:
            reasons.append(f"its C++ extension {'loaded' if attention._xformers_has_extension() else 'did not load'}")
        raise CheckFailed(f"{backend} cannot run: {'; '.join(reasons)}")
    out = impl(q, k, v)
    grad = torch.randn(out.shape, device=device, generator=g, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention.get_backend("math")(qd, kd, vd)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad.double())
    rel = _rel(out, ref)
    grad_rel = max(_rel(a, b) for a, b in zip(grads, ref_grads, strict=True))
    if not (rel < 2e-2 and grad_rel < 2e-2):
        raise CheckFailed(f"{backend} at head dim {head_dim}: output {rel:.2e}, gradients {grad_rel:.2e} off math")
    out = {"dtype": str(dtype), "shape": list(q.shape), "rel_err": rel, "grad_rel_err": grad_rel}
    if backend == "xformers":
        out["xformers_ops"] = attention.xformers_ops_used()
    return out


def _trainer(device, graphs: bool, variant: str = "off", warmup: int = 2):
    """The pretraining step as the loop builds it (``build_step`` over ``mae_loss`` in a one-process run spec, bf16 on
    CUDA); ``.model`` is its MAE."""
    import torch
    from fastmae.train.pretrain import mae_loss
    from fastmae.train.schedule import build_optimizer
    from fastmae.train.spec import local_spec
    from fastmae.train.step import StepParts, build_step

    import fastmae

    torch.manual_seed(0)
    spec = local_spec(device, compile=variant, graphs=graphs, kernels="triton" if device.type == "cuda" else
                      "reference")  # fmt: skip
    model = fastmae.create_model("mae_vit_tiny_patch16", img_size=64, norm_pix_loss=True, **spec.model_options())
    model.to(device)
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), fused=True)
    loss = mae_loss(model, spec.compiled(model), device, seed=3, mask_ratio=0.75)
    step = build_step(StepParts(loss, opt, model.parameters()), spec, warmup=warmup)
    step.model = model
    return step


def _batches(n: int, batch: int = 8, device=None):
    """(batch, lr) pairs: uint8 images, sample ids that change every step, the epoch every 3 steps."""
    import torch
    from fastmae.train.data import Batch

    g = torch.Generator().manual_seed(1)
    for b in range(n):
        imgs = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8, generator=g)
        ids = torch.arange(b * batch, (b + 1) * batch) * 7 + 3
        moved = [t.to(device) if device is not None else t for t in (imgs, torch.zeros(batch, dtype=torch.long), ids)]
        yield Batch(*moved, epoch=b // 3, position=(b // 3, b % 3 + 1)), 1e-3 * (b + 1) / n


def check_graphs(device, variant: str) -> dict:
    """Capture and replay of the compiled step against the ordinary compiled step: losses within bf16 rounding, every
    replay a new loss (new masks), no compilation after the first step."""
    import torch

    if device.type != "cuda":
        raise CheckFailed(f"CUDA graphs need CUDA (device is {device.type})")
    torch._dynamo.reset()
    t0 = time.perf_counter()
    eager, graphed = _trainer(device, False, variant), _trainer(device, True, variant)
    batches = list(_batches(7, device=device))
    pairs, compiled_after_first = [], None
    for k, args in enumerate(batches):
        a = eager(*args).clone()
        b = graphed(*args).clone()
        if k == 0:
            compiled_after_first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        pairs.append((a.item(), b.item()))
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiled_after_first
    if not graphed.captured:
        raise CheckFailed("the step was never captured")
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
    if not worst < 1e-2:
        raise CheckFailed(f"graphed losses differ from the ordinary step's by up to {worst:.2e}: {pairs}")
    if len({round(b, 6) for _, b in pairs[3:]}) != len(pairs) - 3:
        raise CheckFailed(f"replays repeat a loss (masks or batches frozen at capture?): {pairs}")
    if compiles:
        raise CheckFailed(f"{compiles} graph(s) compiled after the first step (a recompile at the capture)")
    return {"variant": variant, "seconds_incl_compile": time.perf_counter() - t0, "losses": pairs,
            "max_rel_diff": worst}  # fmt: skip


def check_nan_guard(device) -> dict:
    import torch

    graphs = device.type == "cuda"
    step = _trainer(device, graphs)
    batches = list(_batches(6, device=device))
    for args in batches[:4]:
        step(*args)
    if graphs and not step.captured:
        raise CheckFailed("the step was never captured")
    step.model.pos_embed.data[0, 1, 0] = float("nan")
    weights = [p.detach().clone() for p in step.params]
    step(*batches[4])
    skipped, in_a_row = step.nan_skipped.item(), step.nan_in_a_row.item()
    untouched = all(torch.equal(w, p) for w, p in zip(weights, step.params, strict=True))
    step.model.pos_embed.data[0, 1, 0] = 0.0
    step(*batches[5])
    if not (skipped == 1 and in_a_row == 1 and untouched and step.nan_in_a_row.item() == 0):
        raise CheckFailed(f"NaN step: skipped {skipped}, in a row {in_a_row}, weights untouched {untouched}, then in "
                          f"a row {step.nan_in_a_row.item()}")  # fmt: skip
    return {"graphs": graphs, "skipped": skipped}


def check_host_sync(device) -> dict:
    import torch

    if device.type != "cuda":
        raise CheckFailed(f"needs CUDA (device is {device.type})")
    out = {}
    for graphs in (False, True):
        from fastmae.train.data import on_device

        step = _trainer(device, graphs)
        pairs = list(_batches(6))  # on the host, brought to the device ahead of the step as the loop does
        batches = list(on_device((b for b, _ in pairs[:3]), device))
        for batch, (_, lr) in zip(batches, pairs[:3], strict=True):
            step(batch, lr)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch, (_, lr) in zip(on_device((b for b, _ in pairs[3:]), device), pairs[3:], strict=True):
                step(batch, lr)
        except RuntimeError as exc:
            raise CheckFailed(f"{'graphed' if graphs else 'ordinary'} step synchronises with the host: "
                              f"{str(exc).splitlines()[0]}") from exc  # fmt: skip
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out["graphed" if graphs else "ordinary"] = "no host sync"
    return out


def _jpegs(count: int, seed: int = 0, small: bool = False) -> list[bytes]:
    """Baseline 4:2:0 JPEGs of ImageNet-like size (``small``: 40-70 px, for the CPU forms, whose kernel runs
    interpreted) cut from scikit-image's photos (real photo statistics)."""
    import numpy as np
    from fastmae.train.data.index import bundled_images_dir
    from PIL import Image

    photos = [Image.open(p).convert("RGB") for p in sorted(bundled_images_dir().iterdir()) if p.suffix == ".png"]
    photos = [p for p in photos if min(p.size) >= 256]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        src = photos[i % len(photos)]
        w, h = (int(rng.integers(50, 70)), int(rng.integers(40, 60))) if small else (int(rng.integers(300, 520)),
                                                                                      int(rng.integers(240, 400)))
        buf = io.BytesIO()
        src.resize((w, h), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _levels_stats(a, b) -> dict:
    """|a - b| in 8-bit levels: mean, 99.9th percentile, largest."""
    import torch

    d = (a.float() - b.float()).abs().flatten()
    return {"mean": d.mean().item(), "p999": torch.quantile(d[:: max(1, d.numel() // 1_000_000)], 0.999).item(),
            "max": d.max().item()}  # fmt: skip


# Bounds, in 8-bit levels. nvJPEG and libjpeg differ in IDCT rounding and chroma upsampling (torchvision's own test
# bounds only the mean, < 2); the crop kernel against the CPU pipeline on the same pixels is float vs fixed point.
DECODE_BOUNDS = {"mean": 2.0, "p999": 24.0, "max": 64.0}
CROP_BOUNDS = {"mean": 0.5, "p999": 2.0, "max": 3.0}
LOADER_BOUNDS = {"mean": 1.0, "p999": 12.0, "max": 48.0}


def _within(stats: dict, bounds: dict, what: str) -> None:
    over = [f"{k} {stats[k]:.2f} > {bounds[k]:g}" for k in bounds if not stats[k] <= bounds[k]]
    if over:
        raise CheckFailed(f"{what}: {', '.join(over)} levels")


def check_nvjpeg_crop(device) -> dict:
    import torch
    from fastmae.kernels.crop_resize import crop_resize_normalize
    from fastmae.train.data.decode import IMAGENET_STD, crop_resize_flip, normalize
    from torchvision.io import ImageReadMode, decode_jpeg

    small = device.type != "cuda"
    files = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in _jpegs(8, small=small)]
    cpu = [decode_jpeg(f, mode=ImageReadMode.RGB) for f in files]
    dev = decode_jpeg(files, mode=ImageReadMode.RGB, device=device) if device.type == "cuda" else [c.clone() for c
                                                                                                  in cpu]  # fmt: skip
    decode = _levels_stats(torch.cat([d.cpu().flatten() for d in dev]), torch.cat([c.flatten() for c in cpu]))
    _within(decode, DECODE_BOUNDS, "nvJPEG vs libjpeg")
    boxes = [(7 * k % (c.shape[2] // 3), 5 * k % (c.shape[1] // 3), c.shape[2] // 2, c.shape[1] // 2)
             for k, c in enumerate(cpu)]  # fmt: skip
    flips = [k % 2 for k in range(len(cpu))]
    size = 16 if small else 224
    out = crop_resize_normalize([d.to(device) for d in dev], boxes, flips, size).cpu()
    same = torch.stack([normalize(crop_resize_flip(d.cpu(), b, bool(f), size))
                        for d, b, f in zip(dev, boxes, flips, strict=True)])  # fmt: skip
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    crop = _levels_stats(out * std * 255, same * std * 255)
    _within(crop, CROP_BOUNDS, "crop kernel vs the CPU pipeline on the same decoded pixels")
    return {"decode_levels": decode, "crop_levels": crop}


def check_torchcodec_cuda(device) -> dict:
    """TorchCodec's batched decode on ``device`` (one nvJPEG call: the hardware engine for baseline files on an
    H100/H200, CUDA decode for progressive ones) against libjpeg (its CPU decode) on the same files."""
    import torch
    from PIL import Image
    from torchcodec.decoders import decode_jpeg

    if device.type != "cuda":
        raise CheckFailed(f"needs CUDA (device is {device.type})")
    data = _jpegs(8, seed=3)
    buf = io.BytesIO()
    Image.open(io.BytesIO(data[0])).save(buf, format="JPEG", quality=90, progressive=True)
    files = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in [*data, buf.getvalue()]]
    t0 = time.perf_counter()
    dev = decode_jpeg(files, mode="RGB", device=device)
    torch.cuda.synchronize(device)
    first = time.perf_counter() - t0
    cpu = [decode_jpeg(f, mode="RGB") for f in files]
    if [tuple(d.shape) for d in dev] != [tuple(c.shape) for c in cpu] or dev[0].device.type != "cuda":
        raise CheckFailed("TorchCodec's CUDA decode gave other shapes (or no CUDA tensors) than its CPU decode")
    stats = _levels_stats(torch.cat([d.cpu().flatten() for d in dev]), torch.cat([c.flatten() for c in cpu]))
    _within(stats, DECODE_BOUNDS, "TorchCodec nvJPEG vs libjpeg")
    from importlib.metadata import version

    return {"torchcodec": version("torchcodec"), "files": len(files), "levels": stats, "first_call_s": first}


def check_gpu_loader(device) -> dict:
    import tempfile

    import torch
    from fastmae.train.data import index_data
    from fastmae.train.data.decode import IMAGENET_STD, normalize
    from fastmae.train.data.gpu_loader import GPULoader
    from fastmae.train.data.loaders import TorchvisionLoader

    small = device.type != "cuda"  # the CPU form runs the kernel interpreted: small images, small batches
    files, size, batch = (8, 16, 4) if small else (32, 224, 16)
    with tempfile.TemporaryDirectory() as tmp:
        for k, data in enumerate(_jpegs(files, seed=1, small=small)):
            (Path(tmp) / f"{k:03d}.jpg").write_bytes(data)
        index = index_data(Path(tmp))
        ref = TorchvisionLoader(index, size, batch, seed=2, num_workers=2)
        decoder = None
        if device.type != "cuda":  # the CPU form of the check: torchvision's CPU decoder in the GPU loader's place
            from torchvision.io import ImageReadMode, decode_jpeg

            def decoder(data, _device):
                return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]

        kw = {"decoder": decoder} if decoder else {}
        gpu = GPULoader(index, size, batch, seed=2, device=device, num_workers=2, **kw)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        stats = []
        for a, b in zip(ref.epoch(0), gpu.epoch(0), strict=True):
            if b.images.device.type != device.type or not torch.equal(a.ids, b.ids.cpu()):
                raise CheckFailed("the GPU loader's batch is not the torchvision loader's samples on the device")
            stats.append(_levels_stats(b.images.cpu() * std * 255, normalize(a.images) * std * 255))
    worst = {k: max(s[k] for s in stats) for k in ("mean", "p999", "max")}
    _within(worst, LOADER_BOUNDS, "GPU loader vs torchvision loader")
    if gpu.routes["gpu"] != files:
        raise CheckFailed(f"not every baseline JPEG went through the device decode: {gpu.routes}")
    return {"batches": len(stats), "levels": worst, "routes": gpu.routes, "decoders": gpu.decoders}


def check_ahead_on_device(device) -> dict:
    import torch
    from fastmae.train.data import SyntheticLoader, epochs, on_device

    loader = SyntheticLoader(32, 4, 64, seed=0, device=torch.device("cpu"))
    n = loader.steps_per_epoch + 2  # across an epoch's end
    plain = [b for _, b in zip(range(n), epochs(loader, 0, 0, loader.steps_per_epoch), strict=False)]
    moved = [b for _, b in zip(range(n), on_device(epochs(loader, 0, 0, loader.steps_per_epoch), device),
                               strict=False)]  # fmt: skip
    if len(moved) != len(plain):
        raise CheckFailed(f"{len(moved)} batches ahead, {len(plain)} without")
    for x, y in zip(plain, moved, strict=True):
        same = torch.equal(x.images, y.images.cpu()) and torch.equal(x.ids, y.ids.cpu())
        if y.images.device.type != device.type or not same or (x.position, x.epoch_end) != (y.position, y.epoch_end):
            raise CheckFailed("a batch moved ahead differs from the batch, or its position from the loader's")
    return {"batches": len(moved)}


def check_pretrain_loop(device) -> dict:
    """``fastmae pretrain`` on 48 JPEGs for 8 steps with the loop's fast path on CUDA (the GPU loader's producer
    thread beside a step captured as one CUDA graph in the thread-local mode, the blocks compiled regionally, the eval
    pictures through the compiled blocks); on a CPU the loop's CPU path."""
    import tempfile

    cuda = device.type == "cuda"
    fast = (["--loader", "gpu", "--cuda-graphs", "--compile", "regional"] if cuda else
            ["--loader", "torchvision", "--no-cuda-graphs", "--compile", "off", "--img-size", "32"])  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "jpegs"
        data.mkdir()
        for k, jpeg in enumerate(_jpegs(48, seed=5, small=not cuda)):  # 6 batches of 8: 8 steps cross an epoch
            (data / f"{k:03d}.jpg").write_bytes(jpeg)
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fastmae.cli", "pretrain", "--data", str(data), "--device", device.type, *fast,
               "--batch-size", "8", "--stop-after-steps", "8", "--num-workers", "2", "--log-every", "4",
               "--no-progress", "--no-tensorboard", "--output-dir", str(out)]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=TIMEOUT["pretrain-loop"] - 5)  # fmt: skip
        wall = time.perf_counter() - t0
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode != 0:
            raise CheckFailed(f"fastmae pretrain exit {proc.returncode}: {(lines or [''])[-1][:300]}")
        summary = json.loads((out / "summary.json").read_text())
    judge_loop(summary, lines, cuda)
    return {"seconds_incl_start": wall, "final_loss": summary["final_loss"], "img_per_s": summary.get("img_per_s"),
            "attn_backend": summary.get("attn_backend"), "decoders": summary.get("decoders"),
            "kernels": summary.get("kernels")}  # fmt: skip


def judge_loop(summary: dict, lines: list[str], cuda: bool) -> None:
    """The ``pretrain-loop`` check's verdict on a run's ``summary.json`` and log lines: 8 steps with the loader,
    compile and graphs asked for, no file or step skipped, a finite loss, the step captured (CUDA), no recompile-limit
    hit; raises :class:`CheckFailed` naming every miss."""
    import math

    want = {"steps": 8, "loader": "gpu" if cuda else "torchvision", "compile": "regional" if cuda else "off",
            "cuda_graphs": cuda, "skipped_files": 0, "nan_skipped": 0}  # fmt: skip
    found = [f"{k} {summary.get(k)!r} (expected {v!r})" for k, v in want.items() if summary.get(k) != v]
    loss = summary.get("final_loss")
    if not (isinstance(loss, float) and math.isfinite(loss)):
        found.append(f"final loss {loss!r}")
    if cuda and not any("one CUDA graph from here on" in line for line in lines):
        found.append("the step was never captured (no 'one CUDA graph from here on' in its log)")
    if hits := [line for line in lines if "hit config." in line]:
        found.append(f"recompile limit hit: {hits[0][:200]}")
    if found:
        raise CheckFailed("fastmae pretrain: " + "; ".join(found))


def check_attn_xformers_compiled(device) -> dict:
    """A ViT-B-sized block (width 768, 12 heads, 50 tokens) with xformers compiled with ``fullgraph=True`` (a graph
    break raises): forward and every gradient in bf16 autocast against the same block eager."""
    import torch

    from fastmae import attention
    from fastmae.models import Block

    if device.type != "cuda":
        raise CheckFailed(f"needs CUDA (device is {device.type})")
    torch.manual_seed(0)
    block = Block(768, 12, attn_backend="xformers").to(device)
    x = torch.randn(16, 50, 768, device=device, requires_grad=True)
    params = [x, *block.parameters()]

    def run(fn):
        with torch.autocast("cuda", torch.bfloat16):
            out = fn(x)
        return out, torch.autograd.grad(out.float().square().mean(), params)

    want, want_grads = run(block)
    ops = attention.xformers_ops_used()
    t0 = time.perf_counter()
    got, got_grads = run(torch.compile(block, fullgraph=True, dynamic=False))
    compile_s = time.perf_counter() - t0
    rel = _rel(got, want)
    grad_rel = max(_rel(a, b) for a, b in zip(got_grads, want_grads, strict=True))
    if not (rel < 2e-2 and grad_rel < 5e-2):
        raise CheckFailed(f"compiled block with xformers off eager: output {rel:.2e}, gradients {grad_rel:.2e}")
    return {"xformers_ops": ops, "rel_err": rel, "grad_rel_err": grad_rel, "compile_s": compile_s}


def run_check(name: str, device_name: str) -> dict:
    """One check in this process: ``{"check", "ok", "seconds", "error", "details"}``."""
    t0 = time.perf_counter()
    try:
        device = _device(device_name)
        if name == "attn-xformers-compiled":
            details = check_attn_xformers_compiled(device)
        elif name.startswith("attn-"):
            backend, dim = name[len("attn-") :].rsplit("-", 1)
            details = check_attention(device, backend, int(dim[1:]))
        elif name.startswith("graphs-"):
            details = check_graphs(device, name.split("-", 1)[1])
        else:
            fn = globals().get("check_" + name.replace("-", "_"))
            if fn is None:
                raise CheckFailed(f"no check {name!r}; checks: {', '.join(CHECKS)}")
            details = fn(device)
        return {"check": name, "ok": True, "status": "pass", "seconds": time.perf_counter() - t0, "error": None,
                "details": details}  # fmt: skip
    except Exception as exc:
        if isinstance(exc, CheckFailed):
            error = str(exc)
        else:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            where = traceback.extract_tb(exc.__traceback__)[-1]
            error = (f"{type(exc).__name__}: {lines[-1][:300] if lines else ''} "
                     f"({Path(where.filename).name}:{where.lineno})")  # fmt: skip
        return {"check": name, "ok": False, "status": "fail", "seconds": time.perf_counter() - t0, "error": error,
                "details": None}  # fmt: skip


def _append(out: Path, record: dict) -> None:
    """One line, appended with a single write (lines of parallel checks never interleave)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


class Stopped(Exception):
    """The smoke stage got SIGTERM, SIGINT or SIGHUP (the sitting stopped it)."""


def _stop_on_signals() -> None:
    def stop(signum, _frame):
        raise Stopped(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)


def run_all(names: list[str], out: Path, device: str, timeout: float, jobs: int, deadline: float) -> list[dict]:
    """Every check in its own process (and process group), ``jobs`` at a time, each killed with its group at its
    timeout (and all at ``deadline`` seconds from now); a check that crashes is a failed line saying how, one that
    hangs a ``timed out`` line. Stopped by a signal (:class:`Stopped`), the checks running are killed and every check
    without a line gets a ``not run`` one before this raises."""
    end = time.monotonic() + deadline
    lock, running, written, stopped = threading.Lock(), {}, set(), threading.Event()

    def record(name, status, seconds, error=None, details=None) -> dict:
        r = {"check": name, "ok": status == "pass", "status": status, "seconds": seconds, "error": error,
             "details": details}  # fmt: skip
        with lock:
            if name in written:
                return r
            written.add(name)
        _append(out, r)
        print(f"[smoke] {name:22s} {status.upper() if status == 'fail' else status:9s} {seconds:5.1f} s"
              + ("" if status == "pass" else f"  {str(error)[:150]}"), flush=True)  # fmt: skip
        return r

    def one(name: str) -> dict:
        left = end - time.monotonic()
        limit = min(TIMEOUT.get(name, timeout), left)
        if stopped.is_set():
            return record(name, "not run", 0.0, "not run: the smoke stage was stopped")
        if limit <= 1:
            return record(name, "not run", 0.0, "not run: the smoke stage's time is spent")
        part = out.with_name(f".{out.name}.{name}")
        part.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--check", name, "--device", device, "--out", str(part)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, process_group=0,
                                env=_env_for(name))  # fmt: skip
        with lock:
            running[name] = proc
        try:
            text, _ = proc.communicate(timeout=limit)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            text, _ = proc.communicate()
            code = None
        finally:
            with lock:
                running.pop(name, None)
        seconds = time.perf_counter() - t0
        if part.exists() and part.read_text().strip():
            r = json.loads(part.read_text().strip().splitlines()[-1])
            result = record(name, r.get("status") or ("pass" if r["ok"] else "fail"), r["seconds"], r["error"],
                            r["details"])  # fmt: skip
        else:
            tail = [line for line in (text or "").splitlines() if line.strip()][-1:] or [""]
            if stopped.is_set():
                result = record(name, "not run", seconds, "not run: the smoke stage was stopped while it ran")
            elif code is None:
                result = record(name, "timed out", seconds, f"timed out after {limit:.0f} s; last output: "
                                                             f"{tail[0][:300]}")  # fmt: skip
            else:
                result = record(name, "fail", seconds, f"exit {code}; last output: {tail[0][:300]}")
        part.unlink(missing_ok=True)
        return result

    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(one, name) for name in names]
    try:
        return [f.result() for f in futures]
    except Stopped as why:
        stopped.set()
        with lock:
            procs = list(running.values())
        for proc in procs:
            _kill_group(proc)
        pool.shutdown(wait=True, cancel_futures=True)
        for name in names:
            record(name, "not run", 0.0, f"not run: the smoke stage was stopped ({why})")
        raise
    finally:
        pool.shutdown(wait=False)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _env_for(name: str) -> dict:
    """The check's environment: a ``-noext`` check runs without the ``PYTHONPATH`` entries that hold
    ``nvidia/cuda_runtime/lib/libcudart.so.12`` (torch's import preloads the first one it finds on ``sys.path``,
    which is what lets xformers' extension load)."""
    env = dict(os.environ)
    if "-noext" in name and env.get("PYTHONPATH"):
        keep = [p for p in env["PYTHONPATH"].split(os.pathsep)
                if not list(Path(p).glob("nvidia/cuda_runtime/lib/libcudart.so.12*"))]  # fmt: skip
        env["PYTHONPATH"] = os.pathsep.join(keep)
    return env


def status_of(record: dict) -> str:
    """A line's status (lines written before statuses existed: from the error's words)."""
    if record.get("status") in STATUSES:
        return record["status"]
    if record.get("ok"):
        return "pass"
    error = str(record.get("error") or "")
    return "timed out" if error.startswith("timed out") else "not run" if error.startswith("not run") else "fail"


def checks_by_status(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """{status: {check: error}} of a smoke JSONL file, each check at its last line (none when the file is absent)."""
    path = Path(path)
    last: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            last[record["check"]] = record
    out: dict[str, dict[str, str]] = {s: {} for s in STATUSES}
    for name, record in last.items():
        out[status_of(record)][name] = record.get("error") or ""
    return out


def failed_checks(path: str | os.PathLike) -> dict[str, str]:
    """{check: error} of the checks that failed in a smoke JSONL file: found something wrong, or crashed. A check
    that timed out or was not run is not among them (slow is not failed: the later stages keep their levers)."""
    return {name: error or "failed" for name, error in checks_by_status(path)["fail"].items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="smoke.jsonl", help="JSON lines file (appended to)")
    ap.add_argument("--check", default=None, help="run this one check here (default: every check, each in a process)")
    ap.add_argument("--only", default=None, help="comma-separated checks to run (default: all)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per check (graphs checks: their own)")
    ap.add_argument("--jobs", type=int, default=6, help="checks at a time")
    ap.add_argument("--deadline", type=float, default=85.0, help="seconds for all of them")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(CHECKS))
        return 0
    out = Path(args.out)
    if args.check:
        _append(out, run_check(args.check, args.device))
        return 0
    names = [c.strip() for c in args.only.split(",")] if args.only else list(CHECKS)
    if unknown := [c for c in names if c not in CHECKS]:
        ap.error(f"unknown checks {', '.join(unknown)}; --list shows them")
    _stop_on_signals()
    try:
        records = run_all(names, out, args.device, args.timeout, args.jobs, args.deadline)
    except Stopped as why:
        print(f"[smoke] stopped ({why}); {out}", flush=True)
        return 128 + getattr(signal, f"SIG{why}", signal.SIGTERM)
    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    print(f"[smoke] {counts['pass']}/{len(records)} passed, {counts['fail']} failed, {counts['timed out']} timed out "
          f"(slow, not failed), {counts['not run']} not run; {out}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
