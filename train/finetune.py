"""End-to-end finetuning with the MAE paper's recipe, built from timm's pieces.

timm ``VisionTransformer`` with global average pooling + ``fc_norm`` (:func:`fastmae.interop.create_vit`), layer-wise
lr decay (``timm.optim.param_groups_layer_decay``), drop path, mixup/cutmix with label smoothing (``timm.data.Mixup``
+ ``SoftTargetCrossEntropy``) on the device, RandAugment + random erasing in the loader, AdamW, warmup + cosine per
iteration, optional EMA (``timm.utils.ModelEmaV3``), top-1/top-5 every epoch, best and last checkpoints, resume.

Under ``torchrun`` every rank trains its shard of the data with DistributedDataParallel (gradients all-reduced, on
the last micro-batch only with ``--accum-iter``) and scores its shard of the validation set; the sums are reduced, so
the reported accuracy is that of the whole validation set, each image counted once. Rank 0 alone writes files.

Output folder: ``config.json``, ``metrics.jsonl``, ``checkpoint-last.pth``, ``checkpoint-best.pth``, ``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

import fastmae
from fastmae.config import FinetuneConfig
from fastmae.errors import FastMAEError
from fastmae.interop import create_vit, load_encoder

from .checkpoint import LAST, load_checkpoint, resolve_resume, resume_position, save_checkpoint
from .distributed import DistContext, init_distributed, no_sync, params_in_sync, wrap_model
from .labelled import labelled_splits, num_classes
from .pretrain import (
    MetricsLog,
    StopSignal,
    make_loader,
    optimizer_steps,
    resolve_device,
    resolve_loader,
    resolve_precision,
    rng_state,
    seed_all,
    set_rng_state,
    write_json,
)
from .schedule import lr_at

logger = logging.getLogger("fastmae.finetune")
BEST = "checkpoint-best.pth"


@dataclasses.dataclass
class Setup:
    """What finetuning and probing share: process group, device, precision, compile, loader, labelled splits and the
    output folder."""

    ctx: DistContext
    device: torch.device
    precision: str
    use_compile: bool
    loader_name: str
    train_idx: object
    val_idx: object
    classes: int
    autocast: object
    out: Path
    resume_path: Path | None

    def run_info(self) -> dict:
        """Where and how the run ran, for ``config.json`` and ``summary.json``."""
        return {"device": self.device.type, "precision": self.precision, "compile": self.use_compile,
                "loader": self.loader_name, "world_size": self.ctx.world_size}  # fmt: skip

    def __enter__(self) -> Setup:
        return self

    def __exit__(self, *exc) -> None:
        self.ctx.close()  # leave torchrun's process group, also on errors


def setup(cfg) -> Setup:
    """Validate ``cfg``, join torchrun's process group when there is one (DDP) and index the labelled data. Use it as
    a context manager: it leaves the process group at the end."""
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    loader_name = resolve_loader(cfg.loader, device)
    out = Path(cfg.output_dir)
    resume_path = resolve_resume(cfg.resume, out)  # checked before any work
    ctx, device = init_distributed("ddp", device)
    try:
        # Each rank its own stream (drop path, mixup draws), as the official code seeds with seed + rank; the data
        # order and augmentations are drawn from (seed, epoch, sample) and do not depend on it.
        seed_all(cfg.seed + ctx.rank)
        train_idx, val_idx = labelled_splits(cfg.data, cfg.val_split, cfg.seed)
    except BaseException:
        ctx.close()
        raise
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    return Setup(ctx, device, precision, use_compile, loader_name, train_idx, val_idx, num_classes(train_idx), autocast,
                 out, resume_path)  # fmt: skip


def rank_rng_state(ctx: DistContext, device: torch.device):
    """This process's generators (one process), or every rank's in rank order (torchrun; a collective)."""
    state = rng_state(device)
    return state if not ctx.enabled else ctx.gather_objects(state)


def restore_rng_state(saved, ctx: DistContext, device: torch.device) -> None:
    """Put back the generators saved by :func:`rank_rng_state` when the number of processes is the same."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == ctx.world_size:
        set_rng_state(states[ctx.rank], device)


def load_pretrained(model: torch.nn.Module, cfg) -> dict:
    """Load ``cfg.pretrained`` into ``model`` and log what was missing / unexpected; a warning without one."""
    if cfg.pretrained is None:
        logger.warning("no --pretrained checkpoint: the encoder starts from random weights")
        return {"pretrained": None}
    missing, unexpected = load_encoder(model, cfg.pretrained, cfg.model)
    logger.info("loaded %s: missing %s, unexpected %s", cfg.pretrained, missing or "none", unexpected or "none")
    return {"pretrained": cfg.pretrained, "missing_keys": missing, "unexpected_keys": unexpected}


def layer_decay_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-decay groups, which follow the official rule (BEiT / MAE ``param_groups_lrd``): block i has
    ``lr_scale = decay ** (depth + 1 - (i + 1))``; cls token, position table and patch embedding are layer 0; the
    final norms and the head are layer depth + 1 (scale 1). No weight decay on 1-D parameters and tokens."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=layer_decay)  # fmt: skip


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, autocast, classes: int,
             ctx: DistContext | None = None) -> dict:  # fmt: skip
    """Cross-entropy, top-1 and top-5 (%) over the whole validation set. Sums stay on the device (one host sync at
    the end) and, under torchrun, are added up over the ranks' disjoint shards."""
    was_training = model.training
    model.eval()
    k = min(5, classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for imgs, labels in loader.epoch(0):
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            logits = model(imgs)
        logits = logits.float()
        hit = logits.topk(k, dim=1).indices == labels[:, None]  # [B, k]
        sums += torch.stack([
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            torch.tensor(labels.numel(), dtype=torch.float64, device=device),
        ])  # fmt: skip
    if ctx is not None:
        sums = ctx.sum(sums)
    loss_sum, hits1, hits5, n = sums.tolist()
    model.train(was_training)
    n = max(n, 1)
    return {"val_loss": loss_sum / n, "top1": 100 * hits1 / n, "top5": 100 * hits5 / n}


def finetune(cfg: FinetuneConfig) -> dict:
    """Finetune as ``cfg`` says; returns the summary (also written to ``summary.json``)."""
    with setup(cfg) as env:
        return _finetune(cfg, env)


def _finetune(cfg: FinetuneConfig, env: Setup) -> dict:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3

    ctx, device, autocast, train_idx, val_idx = env.ctx, env.device, env.autocast, env.train_idx, env.val_idx
    main, world, out, resume_path, classes = ctx.is_main, ctx.world_size, env.out, env.resume_path, env.classes
    model = create_vit(cfg.model, classes, cfg.img_size, "avg", cfg.drop_path)
    loaded = load_pretrained(model, cfg)
    model.to(device)
    base_lr = cfg.effective_lr(world)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=base_lr, fused=True)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=classes)  # fmt: skip
        criterion = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    train_loader = make_loader(env.loader_name, train_idx, "finetune", cfg, device)
    val_loader = make_loader(env.loader_name, val_idx, "eval", cfg, device)
    accum = cfg.accum_iter
    steps_per_epoch = optimizer_steps(train_loader.steps_per_epoch, accum)
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.stop_after_steps or total_steps)

    step, best, start_epoch, start_batch, rng_resume = 0, None, 0, 0, None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as exc:
            raise FastMAEError(f"checkpoint {resume_path} does not fit {cfg.model} with {classes} classes: "
                               f"{str(exc).splitlines()[0]}") from exc  # fmt: skip
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None and "ema" in ckpt:
            ema.module.load_state_dict(ckpt["ema"])
        step, best, rng_resume = int(ckpt["step"]), ckpt.get("best_top1"), ckpt.get("rng")
        start_epoch, start_batch = resume_position(ckpt, step, steps_per_epoch, accum, world)
        logger.info("resumed from %s at step %d", resume_path, step)
    step_module = wrap_model(model, ctx, device)  # DDP after loading: it broadcasts rank 0's weights

    if main:
        out.mkdir(parents=True, exist_ok=True)
    resolved = {**cfg.to_dict(), "lr": base_lr, "num_classes": classes, "classes": train_idx.classes,
                **env.run_info(), "effective_batch": cfg.effective_batch(world),
                "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "train_images": len(train_idx),
                "val_images": len(val_idx), **loaded}  # fmt: skip
    if main:
        write_json(out / "config.json", resolved)
    logger.info(
        "finetune %s (%d classes) on %s (%s), loader %s, %d process(es), effective batch %d, %d steps/epoch, lr %.3g, "
        "layer decay %g", cfg.model, classes, device, env.precision, env.loader_name, world,
        cfg.effective_batch(world), steps_per_epoch, base_lr, cfg.layer_decay,
    )  # fmt: skip
    step_fn = torch.compile(step_module) if env.use_compile else step_module

    def score(module: torch.nn.Module) -> dict:
        return evaluate(module, val_loader, device, autocast, classes, ctx)

    def save(path: Path, epoch: int) -> None:
        rng = rank_rng_state(ctx, device)  # a collective under torchrun: every rank calls save
        if main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                     "best_top1": best, "config": resolved, "rng": rng,
                     "data_position": list(train_loader.position)}  # fmt: skip
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            save_checkpoint(state, path)
        ctx.barrier()

    start_eval = score(model) if resume_path is None else None
    if rng_resume is not None:
        restore_rng_state(rng_resume, ctx, device)
    metrics = MetricsLog(out / "metrics.jsonl", main)
    bar = tqdm(total=last_step, initial=step, disable=not (cfg.progress and main), unit="step", dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    first_loss = last_loss = None
    images, t_start, epoch, last_eval, stopping = 0, time.perf_counter(), start_epoch, None, False
    model.train()
    with StopSignal() as stop:
        try:
            while step < last_step and not stopping:
                micro, loss_sum = start_batch, 0.0
                for imgs, labels in train_loader.epoch(epoch, start_batch):
                    imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    if mixup is not None:
                        if imgs.shape[0] % 2:  # a batch that lost an undecodable file: mixup pairs need an even one
                            imgs, labels = imgs[:-1], labels[:-1]
                        imgs, targets = mixup(imgs, labels)
                    else:
                        targets = labels
                    micro += 1
                    with no_sync(step_fn, model, ctx, sync=micro % accum == 0):  # all-reduce on the last micro-batch
                        with autocast:
                            loss = criterion(step_fn(imgs), targets)
                        (loss / accum).backward()
                    loss_sum = loss_sum + loss.detach().float()
                    images += imgs.shape[0]
                    if micro % accum:
                        continue
                    lr = lr_at(step / steps_per_epoch, base_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)  # layer decay
                    if cfg.clip_grad:
                        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    if ema is not None:
                        ema.update(model, step=step)
                    bar.update(1)
                    step_loss = ctx.all_reduce_mean(loss_sum / accum)  # queued on the stream: no host sync
                    log_now = step % cfg.log_every == 0 or step == 1 or step == last_step
                    stopping, log_now = ctx.agree_stop(stop.received is not None, log_now, device)
                    if log_now:
                        value = step_loss.item()  # host sync on logging steps only
                        if not math.isfinite(value):
                            raise FastMAEError(f"loss is {value} at step {step}; lower the learning rate")
                        first_loss = value if first_loss is None else first_loss
                        last_loss = value
                        metrics.write({"step": step, "epoch": step / steps_per_epoch, "loss": value, "lr": lr})
                        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                    loss_sum = 0.0
                    if step >= last_step or stopping:
                        break
                    if cfg.save_every and step % cfg.save_every == 0:
                        save(out / LAST, epoch)
                    if micro >= steps_per_epoch * accum:
                        break
                if stopping:
                    break
                last_eval = score(model)
                row = {"step": step, "epoch": epoch + 1, **last_eval}
                if ema is not None:
                    row.update({f"ema_{k}": v for k, v in score(ema.module).items()})
                metrics.write(row)
                logger.info("epoch %d: val loss %.4f, top-1 %.2f%%, top-5 %.2f%%", epoch + 1, last_eval["val_loss"],
                            last_eval["top1"], last_eval["top5"])  # fmt: skip
                epoch, start_batch = epoch + 1, 0
                if best is None or last_eval["top1"] > best:
                    best = last_eval["top1"]
                    save(out / BEST, epoch)
                save(out / LAST, epoch)
                if step >= last_step:
                    break
        finally:
            bar.close()
            metrics.close()
        wall = time.perf_counter() - t_start
        save(out / LAST, epoch)
    if last_eval is None or stopping:  # stopped inside an epoch: evaluate where it stands
        last_eval = score(model)
    in_sync = params_in_sync(model, ctx, device)  # logs an error when they differ
    summary = {
        "steps": step,
        # SIGTERM / SIGINT ("peer": another rank received it), or None when the run reached its last step
        "stopped_by": (stop.received or "peer") if stopping else None,
        "images_seen": images * world,
        "img_per_s": images * world / max(wall, 1e-9),
        "first_logged_loss": first_loss,
        "final_loss": last_loss,
        **last_eval,
        "val_loss_start": start_eval["val_loss"] if start_eval else None,
        "top1_start": start_eval["top1"] if start_eval else None,
        "best_top1": best if best is not None else last_eval["top1"],
        "ema_top1": score(ema.module)["top1"] if ema is not None else None,
        "num_classes": classes,
        "skipped_files": len(train_loader.skipped | val_loader.skipped),
        **env.run_info(),
        "ranks_in_sync": in_sync,
        **loaded,
        "fastmae": fastmae.__version__,
        "torch": torch.__version__,
    }
    if main:
        write_json(out / "summary.json", summary)
    return summary
