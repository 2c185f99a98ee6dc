"""Linear probing of a frozen encoder (the paper's protocol), several learning rates in one pass, and kNN: the recipe
the :class:`~fastmae.train.trainer.Trainer` runs.

Each probe is ``BatchNorm1d(affine=False)`` + ``Linear`` on the encoder's cls token (or the token mean), trained with
LARS (timm's ``Lars``: trust ratio on the weight matrices, none on the biases, momentum 0.9) and warmup + cosine. The
encoder runs once per batch and every probe trains on the same features, so K learning rates cost about one run. At
the end a weighted kNN vote (cosine similarity, weights exp(sim / t)) over the training features is reported beside
the probes. Output folder: ``config.json``, ``metrics.jsonl``, ``checkpoint-last.pth`` (the probes, resumable),
``summary.json``, ``tensorboard/``.

Under ``torchrun`` each rank runs the frozen encoder on its shard of the batch (the costly part); the features are
gathered so that every rank trains identical probes on the whole global batch (the batch-norm statistics are those of
the global batch, as with one process). Validation features are gathered likewise; the kNN search runs on each rank's
shard of the training features and merges the ranks' candidates.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fastmae.config import LinprobeConfig
from fastmae.interop import create_vit, encoder_arch, load_pretrained

from .context import RunContext, seed_all, start_run
from .data import labelled_data, pretrained_bands
from .data.databands import recorded
from .evaluate import extract, gather_features, knn_classify, lars_groups, make_probe, score_probes
from .step import StepParts, build_step
from .trainer import Recipe, Trainer, TrainingState

logger = logging.getLogger("fastmae.linprobe")


def linprobe(cfg: LinprobeConfig) -> dict:
    """Train the probes as ``cfg`` says, then kNN; returns the summary (also written to ``summary.json``)."""
    with start_run(cfg, "linprobe") as ctx:
        return Trainer(ctx, cfg, LinearProbing(cfg, ctx)).run()


class LinearProbing(Recipe):
    name = "linprobe"

    def __init__(self, cfg: LinprobeConfig, ctx: RunContext):
        from timm.optim import Lars

        self.cfg, self.ctx, dist = cfg, ctx, ctx.dist
        seed_all(cfg.seed + dist.rank)
        self.train_idx, self.val_idx, self.classes = labelled_data(cfg, dist)
        self.bands = pretrained_bands(cfg, self.train_idx, dist)  # the checkpoint's, matched to the data's
        self.feed = self.bands.for_loader()  # what the features are normalised with (None: today's RGB)
        arch = {**encoder_arch(cfg.model, cfg.pretrained), "in_chans": self.bands.count}
        self.encoder = create_vit(arch, 0, cfg.img_size, "avg" if cfg.global_pool else "token")
        self.loaded = load_pretrained(self.encoder, cfg.pretrained, cfg.model, bands=self.bands.spec)
        self.encoder.to(ctx.device).eval().requires_grad_(False)
        self.dim = self.encoder.num_features
        self.lrs, self.blr_list = cfg.probe_lrs(dist.world_size), ([None] if cfg.lr is not None else cfg.blrs())
        self.base_lr = self.lrs[0]  # the others are lr_scale multiples of it
        with torch.random.fork_rng(devices=[]):  # the same initial probes on every rank (they are not broadcast)
            torch.manual_seed(cfg.seed)
            self.model = nn.ModuleList([make_probe(self.dim, self.classes) for _ in self.lrs]).to(ctx.device)
        self.optimizer = Lars(lars_groups(self.model, self.lrs, cfg.weight_decay), lr=self.lrs[0], momentum=0.9)
        # crop + flip for training; the evaluation view
        self.loader = ctx.loader_for(self.train_idx, "linprobe", cfg, self.bands)
        self.val_loader = ctx.loader_for(self.val_idx, "eval", cfg, self.bands)
        self.start_scores = None
        self.fits = f"hold {len(self.lrs)} probe(s) of {self.dim} features x {self.classes} classes"

    def extra_state(self) -> dict:
        return {"start_scores": self.start_scores}

    def load_extra_state(self, ckpt: dict) -> None:
        self.start_scores = ckpt.get("start_scores")

    def prepare(self, state: TrainingState, log) -> dict:
        cfg, ctx = self.cfg, self.ctx
        self.log, self.features = log, ctx.compiled(self.encoder)

        def loss(batch):
            """Features of the frozen encoder (under torchrun every rank's: the whole global batch), every probe's
            loss [K], one backward for all (they share no parameters)."""
            with torch.no_grad():
                feats = self.features(batch.images)  # in the run's autocast
            feats, labels = gather_features(feats.float(), batch.labels, ctx.dist)  # a host sync for the row counts
            with torch.autocast(ctx.device.type, enabled=False):  # the probes train in float32
                return torch.stack([nn.functional.cross_entropy(p(feats), labels) for p in self.model])

        # every rank trains the same probes on the same gathered features: the losses need no reduction
        parts = StepParts(loss, self.optimizer, self.model.parameters(), bands=self.feed)
        self.train_step = build_step(parts, ctx, cfg.optimisation)
        return {"lrs": self.lrs, "num_classes": self.classes, "feature_dim": self.dim,
                **recorded(self.bands), **self.loaded}

    def start_line(self) -> str:
        cfg = self.cfg
        return (f"linear probes on {'mean-token' if cfg.global_pool else 'cls-token'} features of {cfg.model} "
                f"({self.classes} classes), lrs {', '.join(f'{lr:.3g}' for lr in self.lrs)}, effective batch "
                f"{cfg.effective_batch(self.ctx.dist.world_size)}")  # fmt: skip

    def begin(self, state: TrainingState) -> None:
        # the whole validation set, on every rank
        self.val_f, self.val_y = extract(self.features, self.val_loader, self.ctx.device, self.ctx.autocast, self.dim,
                                         self.ctx.dist, self.feed)  # fmt: skip
        self.start_scores = self.start_scores or score_probes(self.model, self.val_f, self.val_y, self.classes)

    def row(self, losses: list[float], finite: bool, lr: float) -> dict:
        return {"losses": losses, "lrs": [g["lr"] for g in self.optimizer.param_groups[::2]]}

    def end_epoch(self, state: TrainingState) -> bool:
        self.log.row({"step": state.step, "epoch": state.position[0] + 1,
                      "probes": score_probes(self.model, self.val_f, self.val_y, self.classes)})  # fmt: skip
        return False

    def summary(self, state: TrainingState, start, stopped_by: str | None) -> dict:
        cfg, ctx = self.cfg, self.ctx
        scores = score_probes(self.model, self.val_f, self.val_y, self.classes)
        knn = None
        if cfg.knn_k > 0:  # training features without augmentation, each rank its shard
            train_eval = ctx.loader_for(self.train_idx, "eval", cfg, self.bands)
            train_f, train_y = extract(self.features, train_eval, ctx.device, ctx.autocast, self.dim, bands=self.feed)
            knn = knn_classify(train_f, train_y, self.val_f, self.val_y, self.classes, cfg.knn_k, cfg.knn_t,
                               ctx=ctx.dist)  # fmt: skip
        rows = zip(self.blr_list, self.lrs, scores, self.start_scores, strict=True)
        probes = [{"blr": b, "lr": lr, **s, "top1_start": s0["top1"], "val_loss_start": s0["val_loss"]}
                  for b, lr, s, s0 in rows]  # fmt: skip
        best = max(range(len(probes)), key=lambda i: probes[i]["top1"])
        return {"probes": probes, "best_probe": best, "top1": probes[best]["top1"], "knn": knn,
                "first_logged_losses": _listed(state.first_loss), "final_losses": _listed(state.last_loss),
                "features": "mean-token" if cfg.global_pool else "cls-token", "num_classes": self.classes,
                "val_images": self.val_f.shape[0], "skipped_files": len(self.loader.skipped | self.val_loader.skipped),
                "decoders": {"train": self.loader.decoders, "val": self.val_loader.decoders},
                **self.loaded}  # fmt: skip


def _listed(losses: float | list[float] | None) -> list[float] | None:
    """The probes' losses as a list, also for one probe."""
    return [losses] if isinstance(losses, float) else losses
