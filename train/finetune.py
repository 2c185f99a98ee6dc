"""End-to-end finetuning with the MAE paper's recipe, built from timm's pieces: the recipe the
:class:`~fastmae.train.trainer.Trainer` runs.

timm ``VisionTransformer`` with global average pooling + ``fc_norm`` (:func:`fastmae.interop.create_vit`), layer-wise
lr decay (``timm.optim.param_groups_layer_decay``), drop path, mixup/cutmix with label smoothing (``timm.data.Mixup``
+ ``SoftTargetCrossEntropy``) on the device, RandAugment + random erasing in the loader, fused AdamW, warmup + cosine
per iteration, optional EMA (``timm.utils.ModelEmaV3``), top-1/top-5 at every epoch end, the best checkpoint.

Under ``torchrun`` every rank trains its shard of the data with DistributedDataParallel and scores its shard of the
validation set; the sums are reduced, so the reported accuracy is that of the whole validation set, each image counted
once. Output folder: ``config.json``, ``metrics.jsonl``, ``checkpoint-last.pth``, ``checkpoint-best.pth``,
``summary.json``, ``tensorboard/``.
"""

from __future__ import annotations

import logging

import torch

from fastmae.config import FinetuneConfig
from fastmae.interop import create_vit, encoder_arch, load_pretrained

from .context import RunContext, seed_all, start_run
from .data import labelled_data, pretrained_bands
from .data.databands import recorded
from .distributed import gradient_sync, wrap_model
from .evaluate import evaluate, layer_decay_groups
from .step import StepParts, build_step
from .trainer import Recipe, Trainer, TrainingState

logger = logging.getLogger("fastmae.finetune")


def finetune(cfg: FinetuneConfig) -> dict:
    """Finetune as ``cfg`` says; returns the summary (also written to ``summary.json``)."""
    with start_run(cfg, "finetune") as ctx:
        return Trainer(ctx, cfg, Finetuning(cfg, ctx)).run()


def mixing(classes: int, mixup: float, cutmix: float, smoothing: float):
    """(timm's ``Mixup`` or None, the criterion): soft-target cross-entropy after mixup / cutmix, label smoothing
    without them, plain cross-entropy without either."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup > 0 or cutmix > 0:
        mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=classes)
        return mix, SoftTargetCrossEntropy()
    return None, (LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else torch.nn.CrossEntropyLoss())


def finetune_loss(step_fn, mixup, criterion):
    """The finetuning loss of a batch, which the loop's step and ``benchmarks/bench_finetune.py``'s are built on:
    mixup / cutmix on the device, ``step_fn`` (the ViT, compiled and/or wrapped) and the criterion."""

    def loss(batch):
        imgs, labels = batch.images, batch.labels
        targets = labels
        if mixup is not None:
            if imgs.shape[0] % 2:  # a batch that lost an undecodable file: mixup pairs need an even one
                imgs, labels = imgs[:-1], labels[:-1]
            imgs, targets = mixup(imgs, labels)
        return criterion(step_fn(imgs), targets)

    return loss


class Finetuning(Recipe):
    name = "finetune"

    def __init__(self, cfg: FinetuneConfig, ctx: RunContext):
        from timm.utils import ModelEmaV3

        self.cfg, self.ctx, dist = cfg, ctx, ctx.dist
        # Each rank its own stream (drop path, mixup draws), as the official code seeds with seed + rank; the data
        # order and augmentations are drawn from (seed, epoch, sample) and do not depend on it.
        seed_all(cfg.seed + dist.rank)
        self.train_idx, self.val_idx, self.classes = labelled_data(cfg, dist)
        self.bands = pretrained_bands(cfg, self.train_idx, dist)  # the checkpoint's, matched to the data's
        self.arch = {**encoder_arch(cfg.model, cfg.pretrained), "img_size": cfg.img_size, "in_chans": self.bands.count}
        self.model = create_vit(self.arch, self.classes, cfg.img_size, "avg", cfg.drop_path)
        self.loaded = load_pretrained(self.model, cfg.pretrained, cfg.model, bands=self.bands.spec)
        self.model.to(ctx.device)
        self.step_module = wrap_model(self.model, dist, ctx.device)
        self.base_lr = cfg.effective_lr(dist.world_size)
        groups = layer_decay_groups(self.model, cfg.weight_decay, cfg.layer_decay)
        # Fused AdamW: it can skip a non-finite update on the device (found_inf), with no host sync.
        self.optimizer = torch.optim.AdamW(groups, lr=self.base_lr, fused=True)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.mixup, self.criterion = mixing(self.classes, cfg.mixup, cfg.cutmix, cfg.smoothing)
        self.loader = ctx.loader_for(self.train_idx, "finetune", cfg, self.bands)
        self.val_loader = ctx.loader_for(self.val_idx, "eval", cfg, self.bands)
        self.feed = self.bands.for_loader()  # what the step and the evaluation normalise with (None: today's RGB)
        self.best = None
        self.fits = f"fit {cfg.model or 'this model'} with {self.classes} classes at {cfg.img_size} px"
        self.copies = 4 if cfg.ema else 3

    def extra_state(self) -> dict:
        state = {"best_top1": self.best}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_extra_state(self, ckpt: dict) -> None:
        self.best = ckpt.get("best_top1")
        if self.ema is not None and "ema" in ckpt:
            self.ema.module.load_state_dict(ckpt["ema"])

    def prepare(self, state: TrainingState, log) -> dict:
        cfg, ctx = self.cfg, self.ctx
        self.log, self.updates = log, state.step  # the EMA's warm-up counts the run's optimizer steps
        loss = finetune_loss(ctx.compiled(self.step_module), self.mixup, self.criterion)
        ema = self.update_ema if self.ema is not None else None
        parts = StepParts(loss, self.optimizer, self.model.parameters(), after_update=ema,
                          sync=gradient_sync(self.step_module, self.model, ctx.dist),
                          reduce=ctx.dist.all_reduce_mean if ctx.dist.enabled else None, bands=self.feed)  # fmt: skip
        self.train_step = build_step(parts, ctx, cfg.optimisation)
        return {"arch": self.arch, "num_classes": self.classes, "classes": self.train_idx.classes,
                **recorded(self.bands),
                "train_images": len(self.train_idx), "val_images": len(self.val_idx), **self.loaded}  # fmt: skip

    def update_ema(self) -> None:
        self.updates += 1
        self.ema.update(self.model, step=self.updates)

    def start_line(self) -> str:
        cfg = self.cfg
        return (f"finetune {cfg.model} ({self.classes} classes) on {self.ctx.device} ({self.ctx.precision}), "
                f"effective batch {cfg.effective_batch(self.ctx.dist.world_size)}, layer decay {cfg.layer_decay}")

    def score(self, module: torch.nn.Module) -> dict:
        return evaluate(module, self.val_loader, self.ctx.device, self.ctx.autocast, self.classes, self.ctx.dist,
                        self.feed)  # fmt: skip

    def begin(self, state: TrainingState) -> dict | None:
        start = None if state.resumed else self.score(self.model)
        self.model.train()
        return start

    def end_epoch(self, state: TrainingState) -> bool:
        """Validation (and of the EMA weights); returns whether top-1 improved (the checkpointer saves the best)."""
        self.last_eval, epoch = self.score(self.model), state.position[0]
        row = {"step": state.step, "epoch": epoch + 1, **self.last_eval}
        if self.ema is not None:
            row.update({f"ema_{k}": v for k, v in self.score(self.ema.module).items()})
        self.log.row(row)
        logger.info("epoch %d: val loss %.4f, top-1 %.2f%%, top-5 %.2f%%", epoch + 1, self.last_eval["val_loss"],
                    self.last_eval["top1"], self.last_eval["top5"])  # fmt: skip
        improved = self.best is None or self.last_eval["top1"] > self.best
        if improved:
            self.best = self.last_eval["top1"]
        return improved

    def summary(self, state: TrainingState, start: dict | None, stopped_by: str | None) -> dict:
        last = getattr(self, "last_eval", None)
        if last is None or stopped_by is not None or state.mid_epoch:
            last = self.score(self.model)  # stopped inside an epoch: evaluate where it stands
        return {**last, "val_loss_start": start["val_loss"] if start else None,
                "top1_start": start["top1"] if start else None,
                "best_top1": self.best if self.best is not None else last["top1"],
                "ema_top1": self.score(self.ema.module)["top1"] if self.ema is not None else None,
                "num_classes": self.classes, "skipped_files": len(self.loader.skipped | self.val_loader.skipped),
                "decoders": {"train": self.loader.decoders, "val": self.val_loader.decoders},
                **self.loaded}  # fmt: skip

