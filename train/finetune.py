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

import logging
import math
import time

import torch

from fastmae.config import FinetuneConfig
from fastmae.errors import FastMAEError
from fastmae.interop import create_vit, encoder_arch, load_pretrained

from .checkpoint import LAST, load_checkpoint, position_at, resume_position, save_checkpoint, state_mismatch
from .data import labelled_data, make_loader, to_device
from .distributed import DistContext, no_sync, params_in_sync, wrap_model
from .run import (
    Run,
    RunLog,
    SaveClock,
    StopSignal,
    already_finished,
    fault,
    micro_batches,
    optimizer_steps,
    processes,
    rank_rng_state,
    restore_rng_state,
    seed_all,
    start_run,
    versions,
    warn_if_no_room,
)
from .schedule import lr_at

logger = logging.getLogger("fastmae.finetune")
BEST = "checkpoint-best.pth"


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
        imgs, labels = to_device(imgs, device), labels.to(device, non_blocking=True)
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
    with start_run(cfg, "ddp") as run:
        job = Finetuning(cfg, run)
        return already_finished(run, job.step) if job.finished else job.train()


class Finetuning:
    """One finetuning run: the timm ViT, layer-decay AdamW, mixup / criterion, EMA, loaders and counters."""

    def __init__(self, cfg: FinetuneConfig, run: Run):
        self.cfg, self.run, self.device, world = cfg, run, run.device, run.ctx.world_size
        # Each rank its own stream (drop path, mixup draws), as the official code seeds with seed + rank; the data
        # order and augmentations are drawn from (seed, epoch, sample) and do not depend on it.
        seed_all(cfg.seed + run.ctx.rank)
        self.train_idx, self.val_idx, self.classes = labelled_data(cfg, run.ctx)
        self._build_model()
        self.train_loader = make_loader(run.loader_name, self.train_idx, "finetune", cfg, self.device,
                                        fallback=cfg.loader == "auto")
        self.val_loader = make_loader(run.loader_name, self.val_idx, "eval", cfg, self.device,
                                        fallback=cfg.loader == "auto")
        self.accum = cfg.accum_iter
        self.steps_per_epoch = optimizer_steps(self.train_loader.steps_per_epoch, self.accum)
        total_steps = cfg.epochs * self.steps_per_epoch
        self.last_step = min(total_steps, cfg.stop_after_steps or total_steps)
        self.step, self.best, self.epoch, self.start_batch, self.rng_resume = 0, None, 0, 0, None
        if run.resume_path is not None:
            self._resume()
        self.finished = run.resume_path is not None and self.step >= self.last_step
        if self.finished:  # a requeued or repeated job whose run is done: nothing more is built, nothing touched
            return
        self.step_module = wrap_model(self.model, run.ctx, self.device)  # DDP after loading: rank 0's weights
        self.log = RunLog(run.out, run.main, resumed_at=self.step if run.resume_path is not None else None)
        warn_if_no_room(run, self.model, 4 if cfg.ema else 3)
        self.resolved = {
            **cfg.to_dict(), "arch": self.arch, "lr": self.base_lr, "num_classes": self.classes,
            "classes": self.train_idx.classes,
            **run.run_info(), "effective_batch": cfg.effective_batch(world), "steps_per_epoch": self.steps_per_epoch,
            "total_steps": total_steps, "train_images": len(self.train_idx), "val_images": len(self.val_idx),
            **self.loaded,
        }  # fmt: skip
        self.log.config(self.resolved)
        logger.info(
            "finetune %s (%d classes) on %s (%s), loader %s, %s, effective batch %d, %d steps/epoch, "
            "lr %.3g, layer decay %g", cfg.model, self.classes, self.device, run.precision, run.loader_name,
            processes(world, run.ctx.strategy),
            cfg.effective_batch(world), self.steps_per_epoch, self.base_lr, cfg.layer_decay,
        )  # fmt: skip
        self.step_fn = run.compiled(self.step_module)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.first_loss = self.last_loss = self.last_eval = None
        self.images = 0
        self.save_clock = SaveClock(cfg.save_interval)

    def _build_model(self) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.utils import ModelEmaV3

        cfg = self.cfg
        self.arch = {**encoder_arch(cfg.model, cfg.pretrained), "img_size": cfg.img_size}
        self.model = create_vit(self.arch, self.classes, cfg.img_size, "avg", cfg.drop_path)
        self.loaded = load_pretrained(self.model, cfg.pretrained, cfg.model)
        self.model.to(self.device)
        self.base_lr = cfg.effective_lr(self.run.ctx.world_size)
        groups = layer_decay_groups(self.model, cfg.weight_decay, cfg.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=self.base_lr, fused=True)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                               num_classes=self.classes)  # fmt: skip
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()

    def _resume(self) -> None:
        path, cfg = self.run.resume_path, self.cfg
        ckpt = load_checkpoint(path)
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as exc:
            raise FastMAEError(f"--resume {path} does not fit {cfg.model or 'this model'} with {self.classes} classes "
                               f"at {cfg.img_size} px ({state_mismatch(self.model.state_dict(), ckpt['model'])}); "
                               "resume with the flags of the run that wrote it (its config.json), or start a new run "
                               "in another --output-dir") from exc  # fmt: skip
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.ema is not None and "ema" in ckpt:
            self.ema.module.load_state_dict(ckpt["ema"])
        self.step, self.best, self.rng_resume = int(ckpt["step"]), ckpt.get("best_top1"), ckpt.get("rng")
        self.epoch, self.start_batch = resume_position(ckpt, self.step, self.steps_per_epoch, self.accum,
                                                       self.run.ctx.world_size)  # fmt: skip
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------------- the loop
    def train(self) -> dict:
        cfg, run, accum = self.cfg, self.run, self.accum
        start_eval = self.score(self.model) if run.resume_path is None else None
        if self.rng_resume is not None:
            restore_rng_state(self.rng_resume, run.ctx, self.device)
        self.bar = self.log.progress(self.last_step, self.step, cfg.progress)
        t_start, stopping = time.perf_counter(), False
        self.model.train()
        with StopSignal() as stop:
            try:
                while self.step < self.last_step and not stopping:
                    loss_sum = 0.0
                    for imgs, labels, _, micro in micro_batches(self.train_loader, self.epoch, self.start_batch,
                                                                accum, self.steps_per_epoch):  # fmt: skip
                        with no_sync(self.step_fn, self.model, run.ctx, sync=micro % accum == 0):
                            loss_sum = loss_sum + self.forward_backward(imgs, labels)
                        if micro % accum:
                            continue
                        step_loss = self.update(loss_sum)
                        loss_sum = 0.0
                        stopping, log_now = run.log_and_stop(self.step, cfg.log_every, self.last_step, stop)
                        if log_now:
                            self.log_step(step_loss)
                        if self.step >= self.last_step or stopping:
                            break
                        if cfg.save_every and self.step % cfg.save_every == 0:
                            self.save(LAST)
                    if stopping or self.step % self.steps_per_epoch:  # a signal, or the last step inside an epoch
                        break
                    self.end_epoch()
                    if self.step >= self.last_step:
                        break
            except Exception as exc:  # a lost peer or a dying loader: save what is whole, then one line
                raise fault(exc, run, self.step, self.save_alone)  # noqa: B904 (fault sets the cause)
            finally:
                self.log.end_progress()
            wall = time.perf_counter() - t_start
            self.save(LAST)
        return self.finish(start_eval, wall, stop.stopped_by(stopping))

    def forward_backward(self, imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: mixup / cutmix on the device, forward under autocast, backward of loss / accum."""
        imgs, labels = to_device(imgs, self.device), labels.to(self.device, non_blocking=True)
        targets = labels
        if self.mixup is not None:
            if imgs.shape[0] % 2:  # a batch that lost an undecodable file: mixup pairs need an even one
                imgs, labels = imgs[:-1], labels[:-1]
            imgs, targets = self.mixup(imgs, labels)
        with self.run.autocast():
            loss = self.criterion(self.step_fn(imgs), targets)
        (loss / self.accum).backward()
        self.images += imgs.shape[0]
        return loss.detach().float()

    def update(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """One optimizer update at the scheduled lr (times each group's layer-decay scale), clipping, EMA; returns
        the step's mean loss averaged over ranks (no host sync)."""
        cfg = self.cfg
        self.lr = lr_at(self.step / self.steps_per_epoch, self.base_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)  # layer decay
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.bar.update(1)
        return self.run.ctx.all_reduce_mean(loss_sum / self.accum)  # queued on the stream: no host sync

    # ------------------------------------------------------------------------------------------ periodic work
    def log_step(self, step_loss: torch.Tensor) -> None:
        value = step_loss.item()  # host sync on logging steps only
        if not math.isfinite(value):
            raise FastMAEError(f"loss is {value} at step {self.step}; lower the learning rate")
        self.first_loss = value if self.first_loss is None else self.first_loss
        self.last_loss = value
        self.log.row({"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": value, "lr": self.lr})
        self.bar.set_postfix(loss=f"{value:.4f}", lr=f"{self.lr:.2e}")

    def score(self, module: torch.nn.Module) -> dict:
        return evaluate(module, self.val_loader, self.device, self.run.autocast(), self.classes, self.run.ctx)

    def end_epoch(self) -> None:
        """Validation (and of the EMA weights), the best checkpoint when top-1 improved, the last one when due."""
        self.last_eval = self.score(self.model)
        row = {"step": self.step, "epoch": self.epoch + 1, **self.last_eval}
        if self.ema is not None:
            row.update({f"ema_{k}": v for k, v in self.score(self.ema.module).items()})
        self.log.row(row)
        logger.info("epoch %d: val loss %.4f, top-1 %.2f%%, top-5 %.2f%%", self.epoch + 1, self.last_eval["val_loss"],
                    self.last_eval["top1"], self.last_eval["top5"])  # fmt: skip
        self.epoch, self.start_batch = self.epoch + 1, 0
        if self.best is None or self.last_eval["top1"] > self.best:
            self.best = self.last_eval["top1"]
            self.save(BEST)
        if self.save_clock.due(self.run.ctx, self.device):
            self.save(LAST)

    def save_alone(self) -> str:
        """After a fault in a one-process run: ``checkpoint-last.pth`` at the last whole step (the data position of
        that step). Under torchrun the ranks' generators cannot be gathered any more: nothing is written then."""
        if self.run.ctx.enabled:
            return "nothing saved now (the ranks' generators cannot be gathered); the last checkpoint stays"
        self.save(LAST, list(position_at(self.step, self.steps_per_epoch, self.accum)))
        return f"saved {self.run.out / LAST} at step {self.step}; --resume auto continues from there"

    def save(self, name: str, position: list[int] | None = None) -> None:
        rng = rank_rng_state(self.run.ctx, self.device)  # a collective under torchrun: every rank calls save
        if self.run.main:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                     "epoch": self.epoch, "best_top1": self.best, "config": self.resolved, "rng": rng,
                     "data_position": position or list(self.train_loader.position)}  # fmt: skip
            if self.ema is not None:
                state["ema"] = self.ema.module.state_dict()
            save_checkpoint(state, self.run.out / name)
        if name == LAST:
            self.save_clock.saved()
        self.run.ctx.barrier()

    def finish(self, start_eval: dict | None, wall: float, stopped_by: str | None) -> dict:
        run, world = self.run, self.run.ctx.world_size
        last_eval = self.last_eval
        if last_eval is None or stopped_by is not None:  # stopped inside an epoch: evaluate where it stands
            last_eval = self.score(self.model)
        in_sync = params_in_sync(self.model, run.ctx, self.device)  # logs an error when they differ
        summary = {
            "steps": self.step, "stopped_by": stopped_by, "images_seen": self.images * world,
            "img_per_s": self.images * world / max(wall, 1e-9), "first_logged_loss": self.first_loss,
            "final_loss": self.last_loss, **last_eval,
            "val_loss_start": start_eval["val_loss"] if start_eval else None,
            "top1_start": start_eval["top1"] if start_eval else None,
            "best_top1": self.best if self.best is not None else last_eval["top1"],
            "ema_top1": self.score(self.ema.module)["top1"] if self.ema is not None else None,
            "num_classes": self.classes,
            "skipped_files": len(self.train_loader.skipped | self.val_loader.skipped),
            "decoders": {"train": self.train_loader.decoders, "val": self.val_loader.decoders},
            **run.run_info(), "ranks_in_sync": in_sync, **self.loaded, **versions(),
        }  # fmt: skip
        self.log.summary(summary)
        self.log.close()
        return summary
