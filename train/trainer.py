"""The one training loop: pretraining, finetuning and linear probing are recipes it runs.

:class:`Trainer` owns the loop, the logs, the checkpoints (through :class:`~fastmae.train.checkpointer.Checkpointer`,
which decides every save) and every fault path. A :class:`Recipe` is plain parts: its model, optimizer, loader and
step (built with :func:`~fastmae.train.step.build_step` over its loss), the extras it saves, its evaluations and its
log fields; it never holds the trainer, and its hooks get a read-only :class:`TrainingState`. So every lever (device
prefetch, the device-side NaN guard and rollback, compile, CUDA graphs where the recipe allows them) and every
guarantee (bit-exact resume, one line and a checkpoint after a lost peer, SIGTERM saves) holds for all three.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastmae.errors import FastMAEError, NoRoom, RunFault, one_line

from .checkpointer import END, EPOCH_END, FAULT, SIGNAL, STEP, Checkpointer
from .context import RunContext, processes, versions
from .data import epochs, on_device
from .distributed import params_in_sync, peer_lost
from .output import RunLog
from .schedule import lr_at
from .step import GraphedStep, TrainStep

logger = logging.getLogger("fastmae.trainer")


@dataclass(frozen=True)
class TrainingState:
    """Where the run stands, as the loop tells a recipe's hooks and the checkpointer (read-only)."""

    step: int = 0  # optimizer steps done
    position: tuple[int, int] = (0, 0)  # (epoch, batches of it consumed) after the last whole step
    steps_per_epoch: int = 1
    usable: int = 1  # an epoch's batches that make whole steps
    resumed: bool = False
    first_loss: float | list[float] | None = None  # the first and last finite logged losses
    last_loss: float | list[float] | None = None

    @property
    def epoch(self) -> float:
        """Epochs done, fractional (the ``epoch`` of a metrics row)."""
        return self.step / self.steps_per_epoch

    @property
    def mid_epoch(self) -> bool:
        """Whether the run stands inside an epoch (stopped early), not at an epoch's end."""
        return self.position[1] < self.usable


class Recipe:
    """What a recipe gives the :class:`Trainer`; the defaults are a recipe without evaluations or extra state."""

    name = "recipe"
    model: torch.nn.Module  # what a checkpoint's "model" holds
    optimizer: torch.optim.Optimizer
    loader = None  # the training loader (a fastmae.train.data.Loader)
    scaler: torch.amp.GradScaler | None = None
    train_step: TrainStep | GraphedStep  # built by prepare() with build_step
    base_lr: float  # the schedule's peak; each optimizer group scales it by its lr_scale
    fits = "fit this model"  # words for a checkpoint that does not fit: "--resume X does not <fits> (...)"
    copies = 3  # checkpoint sizes in weights: weights + two AdamW moments

    def check_checkpoint(self, state: dict, what: str) -> None:
        """A checkpoint's model state that cannot be this recipe's: a one-line error (before any loading)."""

    def check_config(self, config: dict, what: str) -> None:
        """A resumed checkpoint's configuration that this run cannot continue (other bands): a one-line error."""

    def extra_state(self) -> dict:
        """The recipe's own checkpoint entries."""
        return {}

    def load_extra_state(self, ckpt: dict) -> None:
        pass

    def prepare(self, state: TrainingState, log: RunLog) -> dict:
        """Build the step (after a resume loaded the optimizer's state) and what only a run that trains needs;
        ``log`` is the run's metrics log the recipe writes its rows to. Returns the recipe's part of
        ``config.json``."""
        raise NotImplementedError

    def start_line(self) -> str:
        """The log line that says what runs where."""
        return self.name

    def begin(self, state: TrainingState):
        """Before the first step: the start's evaluation; returned to :meth:`summary`."""

    def row(self, losses: list[float], finite: bool, lr: float) -> dict:
        """The recipe's fields of a ``metrics.jsonl`` row."""
        return {"loss": losses[0] if finite else None, "lr": lr}

    def after_step(self, state: TrainingState) -> None:
        """After a step that does not end the run (pictures every N steps)."""

    def end_epoch(self, state: TrainingState) -> bool:
        """At the end of an epoch (not the run's stop on a signal): evaluation; returns whether it is the best."""
        return False

    def summary(self, state: TrainingState, start, stopped_by: str | None) -> dict:
        """The recipe's fields of ``summary.json`` (end evaluations); every rank calls it."""
        return {}

    def finished(self, summary: dict) -> None:
        """After ``summary.json`` is written (rank 0's plots, late warnings)."""


def optimizer_steps(batches: int, accum: int) -> int:
    """Optimizer steps per epoch from a loader's ``batches`` with ``accum`` micro-batches per step (a last partial
    accumulation is dropped); a one-line error when the epoch cannot fill one step."""
    if batches < accum:
        raise FastMAEError(f"--accum-iter {accum} needs at least {accum} batches per epoch, the data gives {batches}")
    return batches // accum


class Trainer:
    """One run of ``recipe`` in ``ctx`` as ``cfg`` says (see the module docstring)."""

    def __init__(self, ctx: RunContext, cfg, recipe: Recipe):
        self.ctx, self.cfg, self.recipe = ctx, cfg, recipe
        self.steps_per_epoch = optimizer_steps(recipe.loader.steps_per_epoch, cfg.accum_iter)
        self.usable = self.steps_per_epoch * cfg.accum_iter  # an epoch's batches that make whole steps
        total = cfg.epochs * self.steps_per_epoch
        self.last_step = min(total, cfg.stop_after_steps or total)
        self.checkpointer = Checkpointer(ctx, cfg, recipe, self.usable)
        self.step, self.position = 0, (0, 0)  # the last whole step, and the data position after it
        if ctx.resume_path is not None:
            self.step, self.position = self.checkpointer.resume(self.steps_per_epoch, cfg.accum_iter)
        self.images = self.images_since_log = self.skipped_logged = 0  # images this process saw
        self.first_loss = self.last_loss = None

    def state(self) -> TrainingState:
        return TrainingState(self.step, self.position, self.steps_per_epoch, self.usable,
                             self.ctx.resume_path is not None, self.first_loss, self.last_loss)  # fmt: skip

    @property
    def finished(self) -> bool:
        """A resumed run already at its last step (a requeued or repeated job): nothing is to be built or written."""
        return self.ctx.resume_path is not None and self.step >= self.last_step

    def run(self) -> dict:
        if self.finished:
            return self.already_finished()
        self.prepare()
        return self.train()

    def prepare(self) -> None:
        ctx, cfg, world = self.ctx, self.cfg, self.ctx.dist.world_size
        self.log = RunLog(ctx.out, ctx.main, cfg.tensorboard, self.step if ctx.resume_path is not None else None)
        self.checkpointer.warn_if_no_room(self.recipe.copies)
        recipe, warnings_ = cfg.recipe_check(world, self.steps_per_epoch, ctx.batch_choice)  # the batch chosen first
        for line in recipe:
            logger.info("recipe: %s", line)
        for line in warnings_:
            logger.warning("recipe: %s", line)
        resolved = {**cfg.to_dict(), **ctx.info(), "command": self.recipe.name, "steps_per_epoch": self.steps_per_epoch,
                    "effective_batch": cfg.effective_batch(world), "batch_choice": list(ctx.batch_choice),
                    "recipe_warnings": warnings_, "total_steps": cfg.epochs * self.steps_per_epoch,
                    "lr": self.recipe.base_lr}  # fmt: skip
        resolved.update(self.recipe.prepare(self.state(), self.log))
        self.checkpointer.config = resolved
        self.log.config(resolved)
        logger.info("%s, loader %s, %s, %d steps/epoch, lr %.3g", self.recipe.start_line(), ctx.loader,
                    processes(world, ctx.dist.strategy), self.steps_per_epoch, self.recipe.base_lr)  # fmt: skip

    # ------------------------------------------------------------------------------------------------- the loop
    def train(self) -> dict:
        """The run, top to bottom. Batches come on the device, one ahead; the step pulls its micro-batches; the only
        host syncs are the logging steps' (and, under torchrun, the agreement on the save clock at epoch ends)."""
        ctx, recipe, train_step = self.ctx, self.recipe, self.recipe.train_step
        bar = self.bar = self.log.progress(self.last_step, self.step, self.cfg.progress)
        stopping, start = False, None
        with StopSignal() as stop:
            try:
                start = recipe.begin(self.state())  # the start's evaluation / picture
                self.checkpointer.restore_rng()  # after it: the steps draw what the interrupted run would have
                t_start = self.t_log = time.perf_counter()
                batches = on_device(epochs(recipe.loader, *self.position, self.usable), ctx.device)
                while True:
                    loss = train_step(batches, self.lr())  # pulls --accum-iter micro-batches, then the update
                    batch = train_step.last_batch
                    self.step, self.position = self.step + 1, batch.position
                    self.images += train_step.images
                    self.images_since_log += train_step.images
                    bar.update(1)
                    log_now = self.step % self.cfg.log_every == 0 or self.step in (1, self.last_step)
                    stopping, log_now = ctx.dist.agree_stop(stop.received is not None, log_now, ctx.device)
                    if log_now:
                        self.log_step(loss)
                    best = batch.epoch_end and not stopping and recipe.end_epoch(self.state())
                    if self.step >= self.last_step or stopping:
                        break
                    recipe.after_step(self.state())
                    self.checkpointer.save(self.state(), EPOCH_END if batch.epoch_end else STEP, best)
            except Exception as exc:  # a lost peer or a dying loader: save what is whole, then one line
                raise fault(exc, ctx, self.step, lambda: self.checkpointer.save(self.state(), FAULT))  # noqa: B904
            finally:
                self.log.end_progress()
            ctx.synchronize()
            wall = time.perf_counter() - t_start
            # the end, or a stop on SIGTERM/SIGINT (2nd Ctrl-C: at once)
            self.checkpointer.save(self.state(), SIGNAL if stopping else END, best)
        return self.finish(start, wall, stop.stopped_by(stopping))

    def lr(self) -> float:
        """The schedule's lr for the step about to be taken: linear warmup, then half-cycle cosine per iteration."""
        cfg = self.cfg
        self.current_lr = lr_at(self.step / self.steps_per_epoch, self.recipe.base_lr, cfg.min_lr, cfg.warmup_epochs,
                                cfg.epochs)  # fmt: skip
        return self.current_lr

    def log_step(self, loss: torch.Tensor) -> None:
        """A logging step: the row, the bar, NaN warnings, and a rollback after too many non-finite steps in a row."""
        cfg, train_step = self.cfg, self.recipe.train_step
        counters = train_step.nan_counters().to(loss.device, torch.float32)
        # note: this is the CPU-GPU sync point of a logging step (the loss and the NaN counters, read at once)
        *losses, skipped, in_a_row = torch.cat([loss.reshape(-1).float(), counters]).tolist()
        now = time.perf_counter()
        rate = self.images_since_log * self.ctx.dist.world_size / max(now - self.t_log, 1e-9)
        self.t_log, self.images_since_log = now, 0
        finite = all(math.isfinite(v) for v in losses)
        value = losses[0] if len(losses) == 1 else losses
        if finite:
            self.first_loss = value if self.first_loss is None else self.first_loss
            self.last_loss = value
        self.log.row({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                      **self.recipe.row(losses, finite, self.current_lr), "img_per_s": rate,
                      "nan_skipped": int(skipped)})  # fmt: skip
        self.bar.set_postfix(loss=f"{min(losses):.4f}", lr=f"{self.current_lr:.2e}", img_s=f"{rate:.0f}")
        if skipped > self.skipped_logged:
            logger.warning("skipped %d non-finite update(s) so far (step %d)", skipped, self.step)
            self.skipped_logged = skipped
        if cfg.nan_guard and in_a_row >= cfg.nan_rollback_after:
            self.checkpointer.rollback(self.step, int(in_a_row))
            train_step.restart()  # new optimizer state: the run of NaNs starts anew, a CUDA graph captures again
        elif not cfg.nan_guard and not finite:
            raise FastMAEError(f"loss is {value} at step {self.step}; lower the learning rate")

    # ------------------------------------------------------------------------------------------------- the end
    def finish(self, start, wall: float, stopped_by: str | None) -> dict:
        """The summary (``summary.json``): the run's numbers, then the recipe's end evaluations."""
        ctx, recipe, world = self.ctx, self.recipe, self.ctx.dist.world_size
        loader = recipe.loader
        summary = {
            "steps": self.step, "stopped_by": stopped_by, "nan_skipped": int(recipe.train_step.nan_skipped.item()),
            "rollbacks": self.checkpointer.rollbacks, "images_seen": self.images * world,
            "skipped_files": len(loader.skipped), "skipped_examples": sorted(loader.skipped)[:5],
            "wall_time_s": wall, "img_per_s": self.images * world / max(wall, 1e-9),
            "first_logged_loss": self.first_loss, "final_loss": self.last_loss, **ctx.info(),
            "gpu": torch.cuda.get_device_name(ctx.device) if ctx.cuda else None,
            "loader": loader.name, "loader_fallback": getattr(loader, "fell_back", None),
            "decoders": getattr(loader, "decoders", None), **versions(),  # {decode route: the decoder that ran}
        }  # fmt: skip
        summary.update(recipe.summary(self.state(), start, stopped_by))
        summary["ranks_in_sync"] = params_in_sync(recipe.model, ctx.dist, ctx.device)  # logs an error when not
        self.log.summary(summary)
        self.log.close()
        recipe.finished(summary)
        return summary

    def already_finished(self) -> dict:
        """The summary of a run that ``--resume`` found at its last step: the folder's ``summary.json`` as it is
        (nothing is written), marked ``already_finished``."""
        try:
            summary = json.loads((self.ctx.out / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
        logger.info("%s already finished at step %d: nothing to do", self.ctx.resume_path, self.step)
        return {**summary, "steps": self.step, "already_finished": True, "output_dir": str(self.ctx.out)}


def fault(exc: Exception, ctx: RunContext, step: int, save_alone: Callable[[], str] | None = None) -> Exception:
    """What an exception out of a training loop becomes. A collective that failed because another rank died or went
    silent, or a :class:`RunFault` (a data-loader worker that kept dying), turns into one line, after
    ``save_alone()`` kept the last whole step where it can; a full disk stays as it is (saving again would not
    help); anything else, a bug, is returned unchanged, to be raised with its traceback."""
    if isinstance(exc, NoRoom):
        return exc
    lost = ctx.dist.enabled and peer_lost(exc)
    if not lost and not isinstance(exc, RunFault):
        return exc
    first = one_line(exc)
    what = f"lost another rank ({type(exc).__name__}: {first})" if lost else first
    try:
        kept = save_alone() if save_alone is not None else "nothing saved now; the last checkpoint stays"
    except Exception as err:  # e.g. the disk is full as well
        kept = f"could not save ({one_line(err, limit=10_000)})"
    out = RunFault(f"rank {ctx.dist.rank} of {ctx.dist.world_size}: {what}, after step {step}; {kept}")
    out.__cause__ = exc
    return out


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

    def stopped_by(self, stopping: bool) -> str | None:
        """For summaries: the signal that stopped the run ("peer": another rank received it), or None."""
        return (self.received or "peer") if stopping else None
