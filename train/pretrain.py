"""MAE pretraining: the official recipe, resumable, with metrics, atomic checkpoints and reconstruction pictures.

Output folder (later tools rely on these names): ``config.json``, ``metrics.jsonl``, ``checkpoint-last.pth``,
``summary.json``, ``reconstructions/step*.png``, ``loss.png``, ``tensorboard/`` (when installed).

Under ``torchrun`` every rank runs this same loop on its shard of the data (DDP or FSDP2); rank 0 alone writes files.
The loop is :meth:`Pretraining.train`; one optimizer step is :meth:`Pretraining.forward_backward` per micro-batch,
then :meth:`Pretraining.update`.
"""

from __future__ import annotations

import logging
import math
import time

import torch

import fastmae
from fastmae.config import PretrainConfig
from fastmae.errors import FastMAEError
from fastmae.interop import check_model, from_pretrained
from fastmae.models import model_arch

from .checkpoint import LAST, load_checkpoint, position_at, resume_position, save_checkpoint, state_mismatch
from .data import SyntheticLoader, make_loader, pretrain_index, sample_images
from .data.loaders import ahead_on_device
from .distributed import full_state, load_full_state, no_sync, params_in_sync, wrap_model
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
    rng_state,
    seed_all,
    set_rng_state,
    start_run,
    versions,
    warn_if_no_room,
)
from .schedule import build_optimizer, lr_at
from .step import TrainStep, graphs_unsupported, portable_optimizer_state
from .visualize import auto_scale, plot_loss_curve, reconstruct, write_grid

logger = logging.getLogger("fastmae.pretrain")
EVAL_IMAGES = 32  # fixed images scored for eval_loss_start / eval_loss_end


def pretrain(cfg: PretrainConfig) -> dict:
    """Run MAE pretraining as ``cfg`` says; returns the summary (also written to ``summary.json``)."""
    with start_run(cfg, cfg.parallel) as run:
        job = Pretraining(cfg, run)
        return already_finished(run, job.step) if job.finished else job.train()


class Pretraining:
    """One pretraining run: model, optimizer, loader, the step counter and the device-side NaN counters."""

    def __init__(self, cfg: PretrainConfig, run: Run):
        if run.precision == "fp16" and run.ctx.strategy == "fsdp":
            raise FastMAEError("--precision fp16 is not supported with --parallel fsdp; use bf16")
        self.cfg, self.run, self.device = cfg, run, run.device
        seed_all(cfg.seed)
        if cfg.loader == "synthetic":
            self.index = None
            self.loader = SyntheticLoader(cfg.img_size, cfg.batch_size, cfg.synthetic_images, cfg.seed, run.device)
        else:
            self.index = pretrain_index(cfg.data, run.ctx, cfg.index_check)
            self.loader = make_loader(run.loader_name, self.index, "pretrain", cfg, run.device,
                                        fallback=cfg.loader == "auto")
        self._build_model()
        self.step, self.rng_resume = 0, None
        ckpt = self._resume() if run.resume_path is not None else None
        self.accum = cfg.accum_iter
        self.steps_per_epoch = optimizer_steps(self.loader.steps_per_epoch, self.accum)
        total_steps = cfg.epochs * self.steps_per_epoch
        self.last_step = min(total_steps, cfg.stop_after_steps or total_steps)
        self.finished = ckpt is not None and self.step >= self.last_step
        if self.finished:  # a requeued or repeated job whose run is done: nothing more is built, nothing touched
            return
        self.epoch, self.start_batch = 0, 0
        if ckpt is not None:
            self.epoch, self.start_batch = resume_position(ckpt, self.step, self.steps_per_epoch, self.accum,
                                                           run.ctx.world_size)  # fmt: skip
        self.log = RunLog(run.out, run.main, cfg.tensorboard, self.step if ckpt is not None else None)
        warn_if_no_room(run, self.model)
        self._write_config()
        # Fixed images (centre crops of the first decodable files) with a fixed mask: pictures and a comparable loss.
        self.eval_imgs = (
            sample_images(self.index, cfg.img_size, max(cfg.num_reconstructions, EVAL_IMAGES))
            if self.index is not None
            else next(self.loader.epoch(0))[0][: cfg.num_reconstructions].cpu()
        )
        self.step_fn = run.compiled(self.step_module)
        self.trainer = TrainStep(
            self.model, self.step_fn, self.optimizer, seed=cfg.seed, mask_ratio=cfg.mask_ratio, device=self.device,
            dtype=None if run.precision == "fp32" else run.act_dtype, nan_guard=cfg.nan_guard, clip_grad=cfg.clip_grad,
            scaler=self.scaler, reduce=run.ctx.all_reduce_mean if run.ctx.enabled else None, graphs=cfg.cuda_graphs,
        )  # fmt: skip
        self.rollbacks = self.skipped_logged = 0
        self.first_loss = self.last_loss = None
        self.images_seen = self.imgs_since_log = 0  # images this process saw
        self.save_clock = SaveClock(cfg.save_interval)

    def _build_model(self) -> None:
        cfg, run = self.cfg, self.run
        options = dict(kernels=cfg.kernels, attn_backend=cfg.attn_backend, encoder_mode=cfg.encoder_mode)
        if cfg.pretrained is not None:  # continued pretraining: the checkpoint's architecture and weights
            self.model = from_pretrained(cfg.pretrained, cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size,
                                         norm_pix_loss=cfg.norm_pix_loss, **options)  # fmt: skip
            logger.info("starting from the weights of %s", cfg.pretrained)
        else:
            patch = {"patch_size": cfg.patch_size} if cfg.patch_size is not None else {}
            self.model = fastmae.create_model(cfg.model, img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss,
                                              **patch, **options)  # fmt: skip
        self.model.to(self.device)
        self.attn_used = self.model.resolve_attention(self.device, run.act_dtype)  # raises if an explicit one can't run
        self.kernels_used = self.model.kernels_used(self.device)
        self.base_lr = cfg.effective_lr(run.ctx.world_size)
        self.step_module = wrap_model(self.model, run.ctx, self.device)  # DDP, or the model (FSDP2 shards in place)
        # Fused AdamW (CPU and CUDA): it can skip a non-finite update on the device (found_inf), with no host sync.
        self.optimizer = build_optimizer(self.model, self.base_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=True)
        self.scaler = torch.amp.GradScaler(self.device.type) if run.precision == "fp16" else None
        if cfg.cuda_graphs and (why := graphs_unsupported(self.device, run.ctx.world_size, cfg.accum_iter,
                                                          run.precision, run.ctx.strategy)):  # fmt: skip
            raise FastMAEError(f"--cuda-graphs cannot run here: {'; '.join(why)}")

    def _resume(self) -> dict:
        path = self.run.resume_path
        ckpt = load_checkpoint(path)
        mine = model_arch(self.model)
        check_model(ckpt["model"], self.cfg.model or "this model", f"--resume {path}", mine)  # encoder: one line
        try:
            load_full_state(self.model, self.optimizer, ckpt["model"], ckpt.get("optimizer"), self.run.ctx)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise FastMAEError(
                f"--resume {path} does not fit {self.cfg.model or 'this model'} at {self.cfg.img_size} px "
                f"({state_mismatch(self.model.state_dict(), ckpt['model'])}); resume with the flags of the run that "
                "wrote it (its config.json), or start a new run in another --output-dir"
            ) from exc
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.rng_resume = int(ckpt.get("step", 0)), ckpt.get("rng")
        logger.info("resumed from %s at step %d", path, self.step)
        return ckpt

    def _write_config(self) -> None:
        cfg, run, world = self.cfg, self.run, self.run.ctx.world_size
        recipe, warnings_ = cfg.recipe_check(world, self.steps_per_epoch)
        for line in recipe:
            logger.info("recipe: %s", line)
        for line in warnings_:
            logger.warning("recipe: %s", line)
        self.resolved = {
            **cfg.to_dict(), "arch": model_arch(self.model), "loader": run.loader_name, "lr": self.base_lr,
            "device": self.device.type,
            "precision": run.precision, "compile": run.compile, "parallel": run.ctx.strategy,
            "steps_per_epoch": self.steps_per_epoch, "effective_batch": cfg.effective_batch(world),
            "world_size": world, "recipe_warnings": warnings_, "total_steps": cfg.epochs * self.steps_per_epoch,
            "data": str(self.index.root) if self.index is not None else None,
            "num_images": len(self.index) if self.index is not None else None,
        }  # fmt: skip
        self.log.config(self.resolved)
        logger.info(
            "model %s on %s (%s), attention %s, kernels %s, loader %s, %d steps/epoch, lr %.3g, %s",
            cfg.model, self.device, run.precision, self.attn_used, self.kernels_used, run.loader_name,
            self.steps_per_epoch, self.base_lr, processes(world, run.ctx.strategy),
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------- the loop
    def train(self) -> dict:
        cfg = self.cfg
        eval_loss_start = self.picture()
        self.log.scalar("eval_loss", eval_loss_start, self.step)
        if self.rng_resume is not None:
            set_rng_state(self.rng_resume, self.device)  # after the picture: the step sees exactly the saved state
        self.model.train()
        self.data_position = (self.epoch, self.start_batch)  # where the loader stands after the step's batch
        self.bar = self.log.progress(self.last_step, self.step, cfg.progress)
        t_start = self.t_log = time.perf_counter()
        with StopSignal() as stop:
            try:
                stopping = self.loop(stop)
            except Exception as exc:  # a lost peer or a dying loader: save what is whole, then one line
                raise fault(exc, self.run, self.step, self.save_alone)  # noqa: B904 (fault sets the cause)
            finally:
                self.log.end_progress()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t_start
            self.save(self.step // self.steps_per_epoch)  # at the end, and on SIGTERM/SIGINT (a 2nd Ctrl-C: at once)
        return self.finish(eval_loss_start, wall, stop.stopped_by(stopping))

    def loop(self, stop: StopSignal) -> bool:
        """Epochs of optimizer steps until the last step or a stop signal (returns whether a signal stopped it)."""
        cfg, run, accum = self.cfg, self.run, self.accum
        stopping = False  # set from the signal flag; under torchrun agreed by all ranks on logging steps
        while self.step < self.last_step and not stopping:
            loss_sum = 0.0  # becomes a device tensor at the first micro-batch
            batches = micro_batches(self.loader, self.epoch, self.start_batch, accum, self.steps_per_epoch)
            for imgs, _, ids, micro, position in ahead_on_device(batches, self.loader, self.device):
                self.data_position = position
                if accum == 1:  # the whole step at once (one CUDA graph with --cuda-graphs)
                    step_loss = self.whole_step(imgs, ids)
                else:
                    with no_sync(self.step_fn, self.model, run.ctx, sync=micro % accum == 0):
                        loss_sum = loss_sum + self.forward_backward(imgs, ids)
                    if micro % accum:
                        continue
                    step_loss = self.update(loss_sum) / accum
                    loss_sum = 0.0
                stopping, log_now = run.log_and_stop(self.step, cfg.log_every, self.last_step, stop)
                if log_now:
                    self.log_step(step_loss)
                if self.step >= self.last_step or stopping:
                    break
                self.periodic()
            if self.step >= self.last_step or stopping:
                break
            self.epoch, self.start_batch = self.epoch + 1, 0
            if self.save_clock.due(run.ctx, self.device):
                self.save(self.epoch)
        return stopping

    def forward_backward(self, imgs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One micro-batch of an accumulation (see :meth:`TrainStep.forward_backward`); returns its loss."""
        loss = self.trainer.forward_backward(imgs, ids, self.epoch, self.accum)
        self._count(imgs)
        return loss

    def update(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """The optimizer update at the scheduled lr after the accumulation (see :meth:`TrainStep.update`); returns
        the step's loss sum averaged over ranks."""
        loss_sum = self.trainer.update(loss_sum, self._schedule())
        self._stepped()
        return loss_sum

    def whole_step(self, imgs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One micro-batch a step: forward, backward and update at once (:meth:`TrainStep.__call__`, one CUDA graph
        with ``--cuda-graphs``); returns the step's loss, averaged over ranks."""
        loss = self.trainer(imgs, ids, self.epoch, self._schedule())
        self._count(imgs)
        self._stepped()
        return loss

    def _schedule(self) -> float:
        cfg = self.cfg
        self.lr = lr_at(self.step / self.steps_per_epoch, self.base_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
        return self.lr

    def _count(self, imgs: torch.Tensor) -> None:
        self.images_seen += imgs.shape[0]
        self.imgs_since_log += imgs.shape[0]

    def _stepped(self) -> None:
        self.step += 1
        self.bar.update(1)

    # ------------------------------------------------------------------------------------------ periodic work
    def log_step(self, step_loss: torch.Tensor) -> None:
        """A logging step: the only host syncs (loss, NaN counters); the row, the bar, NaN warnings and rollback."""
        cfg = self.cfg
        loss_value = step_loss.item()
        skipped_now = int(self.trainer.nan_skipped.item())
        now = time.perf_counter()
        rate = self.imgs_since_log * self.run.ctx.world_size / max(now - self.t_log, 1e-9)
        self.t_log, self.imgs_since_log = now, 0
        finite = math.isfinite(loss_value)
        if finite:
            self.first_loss = loss_value if self.first_loss is None else self.first_loss
            self.last_loss = loss_value
        self.log.row({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                      "loss": loss_value if finite else None, "lr": self.lr, "img_per_s": rate,
                      "nan_skipped": skipped_now})  # fmt: skip
        self.bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{self.lr:.2e}", img_s=f"{rate:.0f}")
        if skipped_now > self.skipped_logged:
            logger.warning("skipped %d non-finite update(s) so far (step %d)", skipped_now, self.step)
            self.skipped_logged = skipped_now
        if cfg.nan_guard and self.trainer.nan_in_a_row.item() >= cfg.nan_rollback_after:
            self.rollback()
        elif not cfg.nan_guard and not finite:
            raise FastMAEError(f"loss is {loss_value} at step {self.step}; lower the learning rate")

    def periodic(self) -> None:
        """After a step that does not end the run: the reconstruction picture and the step-count checkpoint."""
        cfg = self.cfg
        if cfg.picture_every and self.step % cfg.picture_every == 0:
            self.log.row({"step": self.step, "epoch": self.step / self.steps_per_epoch, "eval_loss": self.picture()})
        if cfg.save_every and self.step % cfg.save_every == 0:
            self.save(self.epoch)

    def picture(self) -> float | None:
        """Save the reconstruction picture (rank 0); returns the loss on the fixed images with a fixed mask. Every
        rank runs it: under FSDP the forward pass gathers shards from all of them."""
        if not len(self.eval_imgs):
            return None
        with self.run.autocast():
            loss, *pics = reconstruct(self.model, self.eval_imgs.to(self.device), self.cfg.mask_ratio, self.cfg.seed)
        if self.run.main:
            path = self.run.out / "reconstructions" / f"step{self.step:07d}.png"
            shown = torch.linspace(0, len(self.eval_imgs) - 1, min(self.cfg.num_reconstructions, len(self.eval_imgs)))
            write_grid([p[shown.round().long()] for p in pics], path, scale=auto_scale(self.cfg.img_size,
                       self.cfg.picture_scale), title=f"step {self.step}, eval loss {loss:.4f}")  # fmt: skip
        return loss

    def save(self, epoch: int) -> None:
        """``checkpoint-last.pth`` (and a numbered copy with ``--keep-every``); a collective under FSDP."""
        model_state, optim_state = full_state(self.model, self.optimizer, self.run.ctx)
        if self.run.main:
            self._write(model_state, optim_state, epoch, list(self.data_position))
        self.save_clock.saved()
        self.run.ctx.barrier()  # no rank reads the checkpoint (rollback) before it is complete

    def _write(self, model_state: dict, optim_state: dict, epoch: int, position: list[int]) -> None:
        state = {
            "model": model_state, "optimizer": portable_optimizer_state(optim_state), "step": self.step, "epoch": epoch,
            "config": self.resolved, "rng": rng_state(self.device),
            "data_position": position,  # (epoch, batches consumed): where a restart continues
        }  # fmt: skip
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        save_checkpoint(state, self.run.out / LAST)
        if self.cfg.keep_every and self.step % self.cfg.keep_every == 0:
            save_checkpoint(state, self.run.out / f"checkpoint-{self.step:07d}.pth")

    def save_alone(self) -> str:
        """After a fault: ``checkpoint-last.pth`` at the last whole step, written by this process with no collective
        (the other ranks may be gone). Weights and AdamW state are those after step ``self.step`` (an unfinished
        step never reaches the optimizer); the data position is that step's. Returns what was kept, in words."""
        ctx = self.run.ctx
        if ctx.strategy == "fsdp":
            return "no checkpoint written now (under FSDP every rank holds a shard); the last one stays"
        if not self.run.main:
            return "rank 0 saves the checkpoint"
        epoch, batch = position_at(self.step, self.steps_per_epoch, self.accum)
        self._write(self.model.state_dict(), self.optimizer.state_dict(), epoch, [epoch, batch])
        return f"saved {self.run.out / LAST} at step {self.step}; --resume auto continues from there"

    def rollback(self) -> None:
        """Reload the last checkpoint's weights and optimizer after too many non-finite steps in a row."""
        cfg, last = self.cfg, self.run.out / LAST
        self.rollbacks += 1
        if self.rollbacks > cfg.max_rollbacks or not last.exists():
            in_a_row = int(self.trainer.nan_in_a_row.item())
            raise FastMAEError(
                f"loss or gradients not finite for {in_a_row} steps in a row at step {self.step}"
                + (f" after {self.rollbacks - 1} rollback(s)" if self.rollbacks > 1
                   else ", and no checkpoint to roll back to")
                + "; lower the learning rate or enable --clip-grad"
            )  # fmt: skip
        ckpt = load_checkpoint(last)  # every rank reads it (a shared file system, as for --resume)
        load_full_state(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"], self.run.ctx)
        self.trainer.nan_in_a_row.zero_()
        self.trainer.invalidate()  # new optimizer state tensors: a CUDA graph captures again
        logger.warning("rolled back to %s (step %s) after non-finite steps; continuing at step %d (rollback %d/%d)",
                       last, ckpt.get("step"), self.step, self.rollbacks, cfg.max_rollbacks)  # fmt: skip

    def finish(self, eval_loss_start: float | None, wall: float, stopped_by: str | None) -> dict:
        """The end picture, the summary (``summary.json``) and the loss curve."""
        run, world = self.run, self.run.ctx.world_size
        eval_loss_end = self.picture()
        self.log.scalar("eval_loss", eval_loss_end, self.step)
        in_sync = params_in_sync(self.model, run.ctx, self.device)  # logs an error when they differ
        summary = {
            "steps": self.step, "stopped_by": stopped_by, "nan_skipped": int(self.trainer.nan_skipped.item()),
            "rollbacks": self.rollbacks, "images_seen": self.images_seen * world,
            "skipped_files": len(self.loader.skipped), "skipped_examples": sorted(self.loader.skipped)[:5],
            "wall_time_s": wall, "img_per_s": self.images_seen * world / max(wall, 1e-9),
            "first_logged_loss": self.first_loss, "final_loss": self.last_loss,
            "eval_loss_start": eval_loss_start, "eval_loss_end": eval_loss_end,
            "attn_backend": self.model.attn_backend_used or self.attn_used, "kernels": self.kernels_used,
            "embed": self.model.embed_used(self.device),
            "loader": self.loader.name, "loader_fallback": getattr(self.loader, "fell_back", None),
            "decoders": getattr(self.loader, "decoders", None),  # {decode route: decoder that ran}
            "device": self.device.type,
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "precision": run.precision, "compile": run.compile, "world_size": world, "parallel": run.ctx.strategy,
            "ranks_in_sync": in_sync, "fp16_scale": self.scaler.get_scale() if self.scaler is not None else None,
            **versions(),
        }  # fmt: skip
        self.log.summary(summary)
        self.log.close()
        if run.main:
            plot_loss_curve(run.out / "metrics.jsonl", run.out / "loss.png")  # skipped without matplotlib
        found_late = len(self.loader.skipped) - (len(self.index.bad) if self.index is not None else 0)
        if found_late > 0:  # the index's own were reported when it was built
            logger.warning("%d more file(s) failed to decode during the run and were skipped (%d in all)", found_late,
                           len(self.loader.skipped))  # fmt: skip
        return summary
