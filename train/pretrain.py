"""MAE pretraining loop: the official recipe, resumable, with metrics, atomic checkpoints and reconstruction pictures.

Output folder (later tools rely on these names): ``config.json``, ``metrics.jsonl``, ``checkpoint-last.pth``,
``summary.json``, ``reconstructions/step*.png``, ``loss.png``, ``tensorboard/`` (when installed).

Under ``torchrun`` every rank runs this same loop on its shard of the data (DDP or FSDP2); rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import fastmae
from fastmae.config import PretrainConfig
from fastmae.errors import FastMAEError

from .checkpoint import LAST, load_checkpoint, resolve_resume, resume_position, save_checkpoint
from .dali import DALILoader, dali_unavailable_reason
from .data import SyntheticLoader, TorchvisionLoader, sample_images
from .distributed import DistContext, full_state, init_distributed, load_full_state, no_sync, params_in_sync, wrap_model
from .noise import mask_noise
from .schedule import build_optimizer, lr_at
from .sources import index_data
from .visualize import plot_loss_curve, reconstruct, write_grid

logger = logging.getLogger("fastmae.pretrain")
EVAL_IMAGES = 32  # fixed images scored for eval_loss_start / eval_loss_end


def _tensorboard(enabled: bool | None, path: Path):
    """A SummaryWriter when TensorBoard is installed (and not turned off); asking for it without it fails loudly."""
    if enabled is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if enabled:
            raise FastMAEError(f"--tensorboard: {exc}; pip install 'fastmae[tensorboard]'") from exc
        return None
    return SummaryWriter(str(path))


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; an explicit ``cuda``/``cuda:N`` without a GPU is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastMAEError(f"--device {name} was requested but no CUDA device is available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 autocast on CUDA and fp32 on CPU; anything else as given."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def resolve_loader(name: str, device: torch.device) -> str:
    """``auto`` is DALI on CUDA when it imports, torchvision otherwise; an explicit ``dali`` that cannot run fails."""
    if name == "auto":
        return "dali" if device.type == "cuda" and dali_unavailable_reason() is None else "torchvision"
    if name == "dali" and (reason := dali_unavailable_reason()):
        raise FastMAEError(f"--loader dali: {reason}")
    return name


def make_loader(name: str, index, kind: str, cfg, device: torch.device):
    """A ``dali`` or ``torchvision`` loader of ``kind`` (pretrain / finetune / eval) over ``index``, with the config's
    img_size, batch_size, seed and num_workers (default min(8, CPU count) processes or threads)."""
    workers = cfg.num_workers if cfg.num_workers is not None else min(8, os.cpu_count() or 1)
    if name == "dali":
        return DALILoader(index, cfg.img_size, cfg.batch_size, cfg.seed, device, num_threads=max(workers, 1),
                          kind=kind)  # fmt: skip
    return TorchvisionLoader(index, cfg.img_size, cfg.batch_size, cfg.seed, workers, pin=device.type == "cuda",
                             kind=kind)  # fmt: skip


def optimizer_steps(batches: int, accum: int) -> int:
    """Optimizer steps per epoch from a loader's ``batches`` with ``accum`` micro-batches per step (a last partial
    accumulation is dropped); a one-line error when the epoch cannot fill one step."""
    if batches < accum:
        raise FastMAEError(f"--accum-iter {accum} needs at least {accum} batches per epoch, the data gives {batches}")
    return batches // accum


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _build_loader(cfg: PretrainConfig, device: torch.device):
    if cfg.loader == "synthetic":
        return SyntheticLoader(cfg.img_size, cfg.batch_size, cfg.synthetic_images, cfg.seed, device), None
    index = index_data(cfg.data)
    return make_loader(cfg.loader, index, "pretrain", cfg, device), index


def rng_state(device: torch.device) -> dict:
    """Every generator a step can touch: Python, NumPy, torch CPU (and CUDA)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {  # plain containers and tensors only, so the checkpoint loads with weights_only=True
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch_cpu": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


class StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask the loop to finish the current step, save and exit cleanly."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, saving a checkpoint, then exiting", self.received)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class MetricsLog:
    """``metrics.jsonl``: one JSON row per call, appended and flushed at once; written by rank 0 only (``enabled``),
    a no-op on the other ranks."""

    def __init__(self, path: Path, enabled: bool = True):
        self.file = open(path, "a") if enabled else None

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def pretrain(cfg: PretrainConfig) -> dict:
    """Run MAE pretraining as ``cfg`` says; returns the summary (also written to ``summary.json``)."""
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    loader_name = resolve_loader(cfg.loader, device)
    cfg.loader = loader_name
    out = Path(cfg.output_dir)
    resume_path = resolve_resume(cfg.resume, out)  # checked before any work
    ctx, device = init_distributed(cfg.parallel, device)
    try:
        return _pretrain(cfg, ctx, device, precision, use_compile, loader_name, out, resume_path)
    finally:
        ctx.close()


def _pretrain(cfg: PretrainConfig, ctx: DistContext, device: torch.device, precision: str, use_compile: bool,
              loader_name: str, out: Path, resume_path: Path | None) -> dict:  # fmt: skip
    world_size, main = ctx.world_size, ctx.is_main
    if precision == "fp16" and ctx.strategy == "fsdp":
        raise FastMAEError("--precision fp16 is not supported with --parallel fsdp; use bf16")

    seed_all(cfg.seed)
    loader, index = _build_loader(cfg, device)
    model = fastmae.create_model(
        cfg.model,
        img_size=cfg.img_size,
        norm_pix_loss=cfg.norm_pix_loss,
        kernels=cfg.kernels,
        attn_backend=cfg.attn_backend,
        encoder_mode=cfg.encoder_mode,
    ).to(device)
    act_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    attn_used = model.resolve_attention(device, act_dtype)  # raises here if an explicit backend cannot run
    kernels_used = model.kernels_used(device)
    base_lr = cfg.effective_lr(world_size)
    step_module = wrap_model(model, ctx, device)  # DDP wrapper, or the model itself (FSDP2 shards it in place)
    # Fused AdamW (CPU and CUDA): it can skip a non-finite update on the device (found_inf), with no host sync.
    optimizer = build_optimizer(model, base_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=True)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    step, start_epoch, start_batch, rng_resume = 0, 0, 0, None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        try:
            load_full_state(model, optimizer, ckpt["model"], ckpt.get("optimizer"), ctx)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise FastMAEError(
                f"checkpoint {resume_path} does not fit model {cfg.model}: {str(exc).splitlines()[0]}"
            ) from exc
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt.get("step", 0))
        rng_resume = ckpt.get("rng")
        logger.info("resumed from %s at step %d", resume_path, step)

    accum = cfg.accum_iter
    steps_per_epoch = optimizer_steps(loader.steps_per_epoch, accum)
    micro_per_epoch = steps_per_epoch * accum
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.stop_after_steps or total_steps)
    if resume_path is not None:
        start_epoch, start_batch = resume_position(ckpt, step, steps_per_epoch, accum, world_size)
    recipe, warnings_ = cfg.recipe_check(world_size, steps_per_epoch)
    for line in recipe:
        logger.info("recipe: %s", line)
    for line in warnings_:
        logger.warning("recipe: %s", line)

    if main:
        out.mkdir(parents=True, exist_ok=True)
    resolved = {
        **cfg.to_dict(),
        "lr": base_lr,
        "device": device.type,
        "precision": precision,
        "compile": use_compile,
        "parallel": ctx.strategy,
        "steps_per_epoch": steps_per_epoch,
        "effective_batch": cfg.effective_batch(world_size),
        "world_size": world_size,
        "recipe_warnings": warnings_,
        "total_steps": total_steps,
        "data": str(index.root) if index is not None else None,
        "num_images": len(index) if index is not None else None,
    }
    if main:
        write_json(out / "config.json", resolved)
    logger.info(
        "model %s on %s (%s), attention %s, kernels %s, loader %s, %d steps/epoch, lr %.3g, %d process(es) (%s)",
        cfg.model, device, precision, attn_used, kernels_used, loader_name, steps_per_epoch, base_lr, world_size,
        ctx.strategy,
    )  # fmt: skip
    # Fixed images (centre crops of the first decodable files) with a fixed mask: pictures and a comparable eval loss.
    eval_imgs = (
        sample_images(index, cfg.img_size, max(cfg.num_reconstructions, EVAL_IMAGES))
        if index is not None
        else next(loader.epoch(0))[0][: cfg.num_reconstructions].cpu()
    )

    step_fn = torch.compile(step_module) if use_compile else step_module
    autocast = (
        torch.autocast(device_type=device.type, dtype=act_dtype) if precision != "fp32" else contextlib.nullcontext()
    )

    def save(epoch: int) -> None:
        model_state, optim_state = full_state(model, optimizer, ctx)  # a collective under FSDP: every rank calls it
        if main:
            state = {
                "model": model_state,
                "optimizer": optim_state,
                "step": step,
                "epoch": epoch,
                "config": resolved,
                "rng": rng_state(device),
                "data_position": list(loader.position),  # (epoch, batches consumed): where a restart continues
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            save_checkpoint(state, out / LAST)
            if cfg.keep_every and step % cfg.keep_every == 0:
                save_checkpoint(state, out / f"checkpoint-{step:07d}.pth")
        ctx.barrier()  # no rank reads the checkpoint (rollback) before it is complete

    def picture() -> float | None:
        """Save the reconstruction picture (rank 0); returns the loss on the fixed images with a fixed mask. Every
        rank runs it: under FSDP the forward pass gathers shards from all of them."""
        if not len(eval_imgs):
            return None
        imgs = eval_imgs.to(device)
        with autocast:
            loss, *pics = reconstruct(model, imgs, cfg.mask_ratio, cfg.seed)
        if main:
            n = cfg.num_reconstructions
            write_grid(pics, out / "reconstructions" / f"step{step:07d}.png", n)
            if writer is not None:
                writer.add_scalar("eval_loss", loss, step)
        return loss

    writer = _tensorboard(cfg.tensorboard, out / "tensorboard") if main else None
    eval_loss_start = picture()
    if rng_resume is not None:
        set_rng_state(rng_resume, device)  # after the picture, so the step sees exactly the saved state
    model.train()
    metrics = MetricsLog(out / "metrics.jsonl", main)
    bar = tqdm(total=last_step, initial=step, disable=not (cfg.progress and main), unit="step", dynamic_ncols=True)
    first_loss = last_loss = None
    images_seen, t_start = 0, time.perf_counter()  # images this process saw
    t_log, imgs_since_log = t_start, 0
    epoch = start_epoch
    num_patches = model.patch_embed.num_patches
    params = [p for p in model.parameters() if p.requires_grad]
    nan_skipped = torch.zeros((), device=device)  # device-side counters, read on logging steps only
    nan_in_a_row = torch.zeros((), device=device)
    rollbacks, skipped_logged = 0, 0

    def log_row(row: dict) -> None:
        metrics.write(row)
        if writer is not None:  # rank 0 only
            for key, value in row.items():
                if key not in ("step", "epoch") and value is not None:
                    writer.add_scalar(key, value, row["step"])

    def optimizer_step(loss_sum: torch.Tensor) -> torch.Tensor:
        """One optimizer update from the accumulated gradients; returns the step's loss sum averaged over ranks."""
        nonlocal nan_in_a_row
        loss_sum = ctx.all_reduce_mean(loss_sum)  # queued on the stream: no host sync
        if scaler is not None:
            scaler.unscale_(optimizer)  # true-scale gradients for the norm; records the scaler's overflow flag
        if cfg.nan_guard or cfg.clip_grad:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if cfg.clip_grad:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_grad, norm)
            if cfg.nan_guard:
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
                # fp16: gradient overflow is the scaler's business (skip + lower the scale); a non-finite loss is ours.
                bad = (~torch.isfinite(loss_sum if scaler is not None else norm + loss_sum)).float()
                if scaler is None:
                    optimizer.found_inf = bad  # fused AdamW leaves weights and moments untouched where this is 1
                nan_skipped.add_(bad)
                nan_in_a_row = (nan_in_a_row + bad) * bad
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def rollback() -> None:
        nonlocal rollbacks, nan_in_a_row
        rollbacks += 1
        if rollbacks > cfg.max_rollbacks or not (out / LAST).exists():
            raise FastMAEError(
                f"loss or gradients not finite for {int(nan_in_a_row.item())} steps in a row at step {step}"
                + (f" after {rollbacks - 1} rollback(s)" if rollbacks > 1 else ", and no checkpoint to roll back to")
                + "; lower the learning rate or enable --clip-grad"
            )
        ckpt = load_checkpoint(out / LAST)  # every rank reads it (a shared file system, as for --resume)
        load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"], ctx)
        nan_in_a_row = torch.zeros((), device=device)
        logger.warning("rolled back to %s (step %s) after non-finite steps; continuing at step %d (rollback %d/%d)",
                       out / LAST, ckpt.get("step"), step, rollbacks, cfg.max_rollbacks)  # fmt: skip

    stopping = False  # set from the signal flag; under torchrun agreed by all ranks on logging steps
    with StopSignal() as stop:
        try:
            while step < last_step and not stopping:
                micro, loss_sum = start_batch, 0.0  # becomes a device tensor at the first micro-batch
                for imgs, _ in loader.epoch(epoch, start_batch):
                    imgs = imgs.to(device, non_blocking=True)
                    ids = loader.last_ids
                    if device.type == "cuda" and ids.device.type == "cpu":
                        ids = ids.pin_memory().to(device, non_blocking=True)  # a pageable copy would sync the host
                    noise = mask_noise(cfg.seed, epoch, ids, num_patches, device)  # per-sample masks
                    micro += 1
                    with no_sync(step_fn, model, ctx, sync=micro % accum == 0):  # all-reduce on the last micro-batch
                        with autocast:
                            loss, _, _ = step_fn(imgs, mask_ratio=cfg.mask_ratio, noise=noise)
                        scaled = loss / accum
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum = loss_sum + loss.detach().float()
                    images_seen += imgs.shape[0]
                    imgs_since_log += imgs.shape[0]
                    if micro % accum:
                        continue
                    lr = lr_at(step / steps_per_epoch, base_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    step_loss = optimizer_step(loss_sum) / accum
                    loss_sum = 0.0
                    step += 1
                    bar.update(1)
                    log_now = step % cfg.log_every == 0 or step == last_step or step == 1
                    stopping, log_now = ctx.agree_stop(stop.received is not None, log_now, device)
                    if log_now:
                        loss_value = step_loss.item()  # the only host syncs, on logging steps
                        skipped_now = int(nan_skipped.item())
                        now = time.perf_counter()
                        rate = imgs_since_log * world_size / max(now - t_log, 1e-9)
                        t_log, imgs_since_log = now, 0
                        finite = math.isfinite(loss_value)
                        if finite:
                            first_loss = loss_value if first_loss is None else first_loss
                            last_loss = loss_value
                        log_row({"step": step, "epoch": step / steps_per_epoch, "loss": loss_value if finite else None,
                                 "lr": lr, "img_per_s": rate, "nan_skipped": skipped_now})  # fmt: skip
                        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                        if skipped_now > skipped_logged:
                            logger.warning("skipped %d non-finite update(s) so far (step %d)", skipped_now, step)
                            skipped_logged = skipped_now
                        if cfg.nan_guard and nan_in_a_row.item() >= cfg.nan_rollback_after:
                            rollback()
                        elif not cfg.nan_guard and not finite:
                            raise FastMAEError(f"loss is {loss_value} at step {step}; lower the learning rate")
                    if step >= last_step or stopping:
                        break
                    if cfg.picture_every and step % cfg.picture_every == 0:
                        log_row({"step": step, "epoch": step / steps_per_epoch, "eval_loss": picture()})
                    if cfg.save_every and step % cfg.save_every == 0:
                        save(epoch)
                    if micro >= micro_per_epoch:  # the rest of the epoch cannot fill an accumulation
                        break
                if step >= last_step or stopping:
                    break
                epoch, start_batch = epoch + 1, 0
                save(epoch)  # every epoch end
        finally:
            bar.close()
            metrics.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t_start
        save(step // steps_per_epoch)  # at the end, and on SIGTERM/SIGINT (a second Ctrl-C still stops at once)
    eval_loss_end = picture()
    in_sync = params_in_sync(model, ctx, device)  # logs an error when they differ
    summary = {
        "steps": step,
        # SIGTERM / SIGINT ("peer": another rank received it), or None when the run reached its last step
        "stopped_by": (stop.received or "peer") if stopping else None,
        "nan_skipped": int(nan_skipped.item()),
        "rollbacks": rollbacks,
        "images_seen": images_seen * world_size,
        "skipped_files": len(loader.skipped),
        "skipped_examples": sorted(loader.skipped)[:5],
        "wall_time_s": wall,
        "img_per_s": images_seen * world_size / max(wall, 1e-9),
        "first_logged_loss": first_loss,
        "final_loss": last_loss,
        "eval_loss_start": eval_loss_start,
        "eval_loss_end": eval_loss_end,
        "attn_backend": model.attn_backend_used or attn_used,
        "kernels": kernels_used,
        "loader": loader_name,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": precision,
        "compile": use_compile,
        "world_size": world_size,
        "parallel": ctx.strategy,
        "ranks_in_sync": in_sync,
        "fp16_scale": scaler.get_scale() if scaler is not None else None,
        "fastmae": fastmae.__version__,
        "torch": torch.__version__,
    }
    if writer is not None:
        writer.close()
    if main:
        write_json(out / "summary.json", summary)
        plot_loss_curve(out / "metrics.jsonl", out / "loss.png")  # skipped when matplotlib is not installed
    if loader.skipped:
        logger.warning("skipped %d undecodable file(s) in total", len(loader.skipped))
    return summary
