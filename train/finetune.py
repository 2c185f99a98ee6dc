"""End-to-end finetuning with the MAE paper's recipe, built from timm's pieces.

timm ``VisionTransformer`` with global average pooling + ``fc_norm`` (:func:`fastmae.interop.create_vit`), layer-wise
lr decay (``timm.optim.param_groups_layer_decay``), drop path, mixup/cutmix with label smoothing (``timm.data.Mixup``
+ ``SoftTargetCrossEntropy``) on the device, RandAugment + random erasing in the loader, AdamW, warmup + cosine per
iteration, optional EMA (``timm.utils.ModelEmaV3``), top-1/top-5 every epoch, best and last checkpoints, resume.

Output folder: ``config.json``, ``metrics.jsonl``, ``checkpoint-last.pth``, ``checkpoint-best.pth``, ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
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

from .checkpoint import LAST, load_checkpoint, resolve_resume, save_checkpoint
from .labelled import labelled_splits, num_classes
from .pretrain import (
    StopSignal,
    make_loader,
    resolve_device,
    resolve_loader,
    resolve_precision,
    rng_state,
    seed_all,
    set_rng_state,
    write_json,
)
from .schedule import lr_at
from .sources import dist_info

logger = logging.getLogger("fastmae.finetune")
BEST = "checkpoint-best.pth"


def setup(cfg, what: str):
    """Device, precision, compile, loader name and labelled splits: what finetuning and probing share."""
    cfg.validate()
    if dist_info()[1] > 1:
        raise FastMAEError(f"fastmae {what} runs in one process; torchrun (WORLD_SIZE > 1) is only for pretraining")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    loader_name = resolve_loader(cfg.loader, device)
    seed_all(cfg.seed)
    train_idx, val_idx = labelled_splits(cfg.data, cfg.val_split, cfg.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    return device, precision, use_compile, loader_name, train_idx, val_idx, autocast


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
def evaluate(model: torch.nn.Module, loader, device: torch.device, autocast, classes: int) -> dict:
    """Cross-entropy, top-1 and top-5 (%) over the whole validation loader."""
    was_training = model.training
    model.eval()
    k = min(5, classes)
    loss_sum, hits1, hits5, n = 0.0, 0, 0, 0
    for imgs, labels in loader.epoch(0):
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            logits = model(imgs)
        logits = logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(k, dim=1).indices  # [B, k]
        hit = top == labels[:, None]
        hits1 += int(hit[:, 0].sum())
        hits5 += int(hit.any(dim=1).sum())
        n += labels.numel()
    model.train(was_training)
    return {"val_loss": loss_sum / max(n, 1), "top1": 100 * hits1 / max(n, 1), "top5": 100 * hits5 / max(n, 1)}


def finetune(cfg: FinetuneConfig) -> dict:
    """Finetune as ``cfg`` says; returns the summary (also written to ``summary.json``)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3

    device, precision, use_compile, loader_name, train_idx, val_idx, autocast = setup(cfg, "finetune")
    out = Path(cfg.output_dir)
    resume_path = resolve_resume(cfg.resume, out)
    classes = num_classes(train_idx)
    model = create_vit(cfg.model, classes, cfg.img_size, "avg", cfg.drop_path)
    loaded = load_pretrained(model, cfg)
    model.to(device)
    base_lr = cfg.effective_lr()
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
    train_loader = make_loader(loader_name, train_idx, "finetune", cfg, device)
    val_loader = make_loader(loader_name, val_idx, "eval", cfg, device)
    accum = cfg.accum_iter
    steps_per_epoch = train_loader.steps_per_epoch // accum
    if steps_per_epoch == 0:
        raise FastMAEError(f"--accum-iter {accum} needs at least {accum} batches per epoch, the data gives "
                           f"{train_loader.steps_per_epoch}")  # fmt: skip
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
        start_epoch, start_batch = (int(v) for v in ckpt["data_position"])
        if start_batch >= steps_per_epoch * accum:
            start_epoch, start_batch = start_epoch + 1, 0
        logger.info("resumed from %s at step %d", resume_path, step)

    out.mkdir(parents=True, exist_ok=True)
    resolved = {**cfg.to_dict(), "lr": base_lr, "num_classes": classes, "classes": train_idx.classes,
                "device": device.type, "precision": precision, "compile": use_compile, "loader": loader_name,
                "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "train_images": len(train_idx),
                "val_images": len(val_idx), **loaded}  # fmt: skip
    write_json(out / "config.json", resolved)
    logger.info(
        "finetune %s (%d classes) on %s (%s), loader %s, %d steps/epoch, lr %.3g, layer decay %g",
        cfg.model, classes, device, precision, loader_name, steps_per_epoch, base_lr, cfg.layer_decay,
    )  # fmt: skip
    step_fn = torch.compile(model) if use_compile else model

    def save(path: Path, epoch: int) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                 "best_top1": best, "config": resolved, "rng": rng_state(device),
                 "data_position": list(train_loader.position)}  # fmt: skip
        if ema is not None:
            state["ema"] = ema.module.state_dict()
        save_checkpoint(state, path)

    start_eval = evaluate(model, val_loader, device, autocast, classes) if resume_path is None else None
    if rng_resume is not None:
        set_rng_state(rng_resume, device)
    metrics = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=last_step, initial=step, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    first_loss = last_loss = None
    images, t_start, epoch, last_eval = 0, time.perf_counter(), start_epoch, None
    model.train()
    with StopSignal() as stop:
        try:
            while step < last_step and not stop.received:
                micro, loss_sum = start_batch, 0.0
                for imgs, labels in train_loader.epoch(epoch, start_batch):
                    imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    if mixup is not None:
                        if imgs.shape[0] % 2:  # a batch that lost an undecodable file: mixup pairs need an even one
                            imgs, labels = imgs[:-1], labels[:-1]
                        imgs, targets = mixup(imgs, labels)
                    else:
                        targets = labels
                    with autocast:
                        loss = criterion(step_fn(imgs), targets)
                    (loss / accum).backward()
                    loss_sum = loss_sum + loss.detach().float()
                    micro += 1
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
                    if step % cfg.log_every == 0 or step == 1 or step == last_step or stop.received:
                        value = (loss_sum / accum).item()  # host sync on logging steps only
                        if not math.isfinite(value):
                            raise FastMAEError(f"loss is {value} at step {step}; lower the learning rate")
                        first_loss = value if first_loss is None else first_loss
                        last_loss = value
                        metrics.write(json.dumps({"step": step, "epoch": step / steps_per_epoch, "loss": value,
                                                  "lr": lr}) + "\n")  # fmt: skip
                        metrics.flush()
                        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                    loss_sum = 0.0
                    if step >= last_step or stop.received:
                        break
                    if cfg.save_every and step % cfg.save_every == 0:
                        save(out / LAST, epoch)
                    if micro >= steps_per_epoch * accum:
                        break
                if stop.received:
                    break
                last_eval = evaluate(model, val_loader, device, autocast, classes)
                row = {"step": step, "epoch": epoch + 1, **last_eval}
                if ema is not None:
                    row.update({f"ema_{k}": v for k, v in evaluate(ema.module, val_loader, device, autocast,
                                                                  classes).items()})  # fmt: skip
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
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
    if last_eval is None or stop.received:  # stopped inside an epoch: evaluate where it stands
        last_eval = evaluate(model, val_loader, device, autocast, classes)
    summary = {
        "steps": step,
        "stopped_by": stop.received,
        "images_seen": images,
        "img_per_s": images / max(wall, 1e-9),
        "first_logged_loss": first_loss,
        "final_loss": last_loss,
        **last_eval,
        "val_loss_start": start_eval["val_loss"] if start_eval else None,
        "top1_start": start_eval["top1"] if start_eval else None,
        "best_top1": best if best is not None else last_eval["top1"],
        "ema_top1": evaluate(ema.module, val_loader, device, autocast, classes)["top1"] if ema is not None else None,
        "num_classes": classes,
        "skipped_files": len(train_loader.skipped | val_loader.skipped),
        "loader": loader_name,
        "device": device.type,
        "precision": precision,
        "compile": use_compile,
        **loaded,
        "fastmae": fastmae.__version__,
        "torch": torch.__version__,
    }
    write_json(out / "summary.json", summary)
    return summary
