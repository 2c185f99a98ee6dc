"""MAE pretraining, the recipe: the official model and AdamW, per-sample masks, reconstruction pictures on fixed images.

The loop, checkpoints, logs and faults are the :class:`~fastmae.train.trainer.Trainer`'s. What is pretraining's own:
the data (any image folder, shards, the digits, or synthetic batches) and its bands (``--bands``, ``--nodata``,
``--norm``: :func:`~fastmae.train.data.resolve_bands`; the model's ``in_chans`` is their count, and the resolved
:class:`~fastmae.bands.BandSpec` goes into ``config.json`` and every checkpoint as ``"bands"``), the MAE (new, or
from ``--pretrained``, moved to the data's bands when they differ) wrapped
for DDP / FSDP2, fused AdamW with the recipe's weight-decay groups, the loss (each sample's mask from
``(seed, epoch, sample id)``, :func:`mae_loss`), and a picture + fixed-image eval loss at the start, every
``--picture-every`` steps and at the end. Output folder: see docs/output.md (``config.json``, ``metrics.jsonl``,
``checkpoint-last.pth``, ``summary.json``, ``reconstructions/step*.png``, ``loss.png``, ``tensorboard/``).
"""

from __future__ import annotations

import logging

import torch

import fastmae
from fastmae.bands import band_flags_of
from fastmae.config import PretrainConfig
from fastmae.interop import check_model, from_pretrained
from fastmae.models import model_arch

from .context import RunContext, seed_all, start_run
from .data import SyntheticLoader, pretrain_index, resolve_bands, sample_images
from .data.databands import check_resumed, recorded
from .distributed import gradient_sync, wrap_model
from .noise import mask_noise
from .schedule import build_optimizer
from .step import StepParts, build_step
from .trainer import Recipe, Trainer, TrainingState
from .visualize import auto_scale, plot_loss_curve, reconstruct, write_grid

logger = logging.getLogger("fastmae.pretrain")
EVAL_IMAGES = 32  # fixed images scored for eval_loss_start / eval_loss_end


def pretrain(cfg: PretrainConfig) -> dict:
    """Run MAE pretraining as ``cfg`` says; returns the summary (also written to ``summary.json``)."""
    with start_run(cfg, "pretrain") as ctx:
        return Trainer(ctx, cfg, Pretraining(cfg, ctx)).run()


def mae_loss(model, step_fn, device: torch.device, seed: int, mask_ratio: float):
    """The pretraining loss of a batch, which the loop's step and the benchmarks' are built on: ``step_fn`` (the MAE
    ``model``, compiled and/or wrapped) on the batch with each sample's mask noise from ``(seed, epoch, sample id)``."""
    num_patches = model.patch_embed.num_patches

    def loss(batch):
        noise = mask_noise(seed, batch.epoch, batch.ids, num_patches, device)
        return step_fn(batch.images, mask_ratio=mask_ratio, noise=noise)[0]

    return loss


class Pretraining(Recipe):
    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, ctx: RunContext):
        self.cfg, self.ctx, dist = cfg, ctx, ctx.dist
        seed_all(cfg.seed)
        flags = band_flags_of(cfg)
        if cfg.loader == "synthetic":  # 3-band images: the run spec refused band flags (bands_reasons)
            self.index = self.bands = None
            self.loader = SyntheticLoader(cfg.img_size, cfg.batch_size, cfg.synthetic_images, cfg.seed, ctx.device,
                                          dist.rank, dist.world_size)  # fmt: skip
        else:
            self.index = pretrain_index(cfg.data, dist, cfg.index_check)
            self.bands = resolve_bands(self.index, flags, cfg.seed, dist)  # the statistics at index time, cached
            self.loader = ctx.loader_for(self.index, "pretrain", cfg, self.bands)
        spec = self.bands.spec if self.bands is not None else None
        options = dict(ctx.model_options(), encoder_mode=cfg.encoder_mode)  # attention and kernels as the spec chose
        if cfg.pretrained is not None:  # continued pretraining: the checkpoint's architecture and weights
            self.model = from_pretrained(cfg.pretrained, cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size,
                                         norm_pix_loss=cfg.norm_pix_loss, bands=spec, **options)  # fmt: skip
            logger.info("starting from the weights of %s", cfg.pretrained)
        else:
            patch = {"patch_size": cfg.patch_size} if cfg.patch_size is not None else {}
            chans = {"in_chans": spec.count} if spec is not None else {}  # --in-chans: the data's (selected) bands
            self.model = fastmae.create_model(cfg.model, img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss,
                                              **patch, **chans, **options)  # fmt: skip
        self.model.bands = spec  # the pictures draw and un-normalise with them
        self.model.to(ctx.device)
        # auto: the measured table's fastest at this batch, per call site
        self.attn_used = self.model.resolve_attention(ctx.device, ctx.act_dtype, batch=cfg.batch_size)
        self.kernels_used = self.model.kernels_used(ctx.device)
        self.base_lr = cfg.effective_lr(dist.world_size)
        self.step_module = wrap_model(self.model, dist, ctx.device)  # DDP, or the model (FSDP2 shards in place)
        # Fused AdamW (CPU and CUDA): it can skip a non-finite update on the device (found_inf), with no host sync.
        self.optimizer = build_optimizer(self.model, self.base_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=True)
        self.scaler = torch.amp.GradScaler(ctx.device.type) if ctx.precision == "fp16" else None
        self.fits = f"fit {cfg.model or 'this model'} at {cfg.img_size} px"

    def check_checkpoint(self, state: dict, what: str) -> None:
        check_model(state, self.cfg.model or "this model", what, model_arch(self.model))  # the architecture: one line

    def check_config(self, config: dict, what: str) -> None:
        check_resumed(config, self.bands, what)  # the checkpoint's bands, names, statistics and nodata: one line

    def prepare(self, state: TrainingState, log) -> dict:
        cfg, ctx = self.cfg, self.ctx
        self.log = log
        # Fixed images (centre crops of the first decodable files) with a fixed mask: pictures and a comparable loss.
        feed = self.bands.for_loader() if self.bands is not None else None  # None: 8-bit RGB, ImageNet's statistics
        self.eval_imgs = (sample_images(self.index, cfg.img_size, max(cfg.num_reconstructions, EVAL_IMAGES), feed)
                          if self.index is not None else next(self.loader.epoch(0)).images[: cfg.num_reconstructions]
                          .cpu())  # fmt: skip
        loss = mae_loss(self.model, ctx.compiled(self.step_module), ctx.device, cfg.seed, cfg.mask_ratio)
        parts = StepParts(loss, self.optimizer, self.model.parameters(), scaler=self.scaler,
                          sync=gradient_sync(self.step_module, self.model, ctx.dist),
                          reduce=ctx.dist.all_reduce_mean if ctx.dist.enabled else None, bands=feed)  # fmt: skip
        self.train_step = build_step(parts, ctx, cfg.optimisation)
        return {"arch": model_arch(self.model), **recorded(self.bands),
                "data": str(self.index.root) if self.index is not None else None,
                "num_images": len(self.index) if self.index is not None else None}  # fmt: skip

    def start_line(self) -> str:
        kernels = set(self.kernels_used.values())
        kernels = kernels.pop() if len(kernels) == 1 else ",".join(f"{k}={v}" for k, v in self.kernels_used.items())
        return (f"model {self.cfg.model} on {self.ctx.device} ({self.ctx.precision}), attention {self.attn_used}, "
                f"kernels {kernels}")  # fmt: skip

    def begin(self, state: TrainingState) -> float | None:
        loss = self.picture(state.step)
        self.log.scalar("eval_loss", loss, state.step)
        self.model.train()
        return loss

    def after_step(self, state: TrainingState) -> None:
        if self.cfg.picture_every and state.step % self.cfg.picture_every == 0:
            self.log.row({"step": state.step, "epoch": state.epoch, "eval_loss": self.picture(state.step)})

    def picture(self, step: int) -> float | None:
        """The reconstruction picture (rank 0); returns the loss on the fixed images with a fixed mask. Every rank
        runs it: under FSDP the forward pass gathers shards from all of them."""
        if not len(self.eval_imgs):
            return None
        cfg = self.cfg
        with self.ctx.autocast():
            loss, *pics = reconstruct(self.model, self.eval_imgs.to(self.ctx.device), cfg.mask_ratio, cfg.seed)
        if self.ctx.main:
            path = self.ctx.out / "reconstructions" / f"step{step:07d}.png"
            shown = torch.linspace(0, len(self.eval_imgs) - 1, min(cfg.num_reconstructions, len(self.eval_imgs)))
            write_grid([p[shown.round().long()] for p in pics], path, scale=auto_scale(cfg.img_size,
                       cfg.picture_scale), title=f"step {step}, eval loss {loss:.4f}")  # fmt: skip
        return loss

    def summary(self, state: TrainingState, start: float | None, stopped_by: str | None) -> dict:
        end = self.picture(state.step)
        self.log.scalar("eval_loss", end, state.step)
        return {"eval_loss_start": start, "eval_loss_end": end,
                "attn_backend": self.model.attn_backend_used or self.attn_used, "kernels": self.kernels_used,
                "embed": self.model.embed_used(self.ctx.device), "fp16_scale": self.scaler.get_scale() if self.scaler
                is not None else None}  # fmt: skip

    def finished(self, summary: dict) -> None:
        if self.ctx.main:
            plot_loss_curve(self.ctx.out / "metrics.jsonl", self.ctx.out / "loss.png")  # skipped without matplotlib
        found_late = len(self.loader.skipped) - (len(self.index.bad) if self.index is not None else 0)
        if found_late > 0:  # the index's own were reported when it was built
            logger.warning("%d more file(s) failed to decode during the run and were skipped (%d in all)", found_late,
                           len(self.loader.skipped))  # fmt: skip
