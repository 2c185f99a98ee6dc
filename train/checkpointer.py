"""Checkpoints for every recipe: what a checkpoint holds, when one is written, and how a run starts from one, falls
back from a broken one and rolls back to one.

What (:meth:`Checkpointer.contents`, the one function that builds checkpoint dicts): ``model`` (official-named weights,
FSDP shards gathered; a linear probe's probes), ``optimizer`` (as an ungraphed one-process run writes it), ``step``,
``epoch``, ``config``, ``data_position`` (``[epoch, batches consumed]`` of the last whole step), ``rng`` (every rank's
generators in rank order: restored when a resume has as many processes), ``scaler`` with fp16, and the recipe's own
entries (EMA weights, the best top-1, the probes' start scores). Files are written atomically and read with
``weights_only=True`` (:mod:`fastmae.files`).

When (:meth:`Checkpointer.save`, the one save policy, which the loop calls once per step with the run's state and a
reason): every ``--save-every`` steps; at an epoch end when ``--save-interval`` minutes have passed since the last
save; ``checkpoint-best.pth`` when the recipe's score improved; at the end of the run and on a stop signal; and after a
fault, what one process can still write. ``--keep-every N`` keeps a numbered copy of each save on a multiple of N.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from fastmae.errors import FastMAEError
from fastmae.files import CHECKPOINT_NAME, checkpoint_problem, load_file, room_problem, save_torch

from .distributed import full_state, load_full_state

LAST, BEST = CHECKPOINT_NAME, "checkpoint-best.pth"
# Why the loop asks for a save: an ordinary step, a step that ends an epoch, the run's end, a stop signal, a fault.
STEP, EPOCH_END, END, SIGNAL, FAULT = "step", "epoch end", "end", "signal", "fault"
NUMBERED = re.compile(r"checkpoint-(\d+)\.pth$")
logger = logging.getLogger("fastmae.checkpoint")


# --------------------------------------------------------------------------------------------------- the files
def load_checkpoint(path: str | os.PathLike) -> dict:
    """A fastmae checkpoint on the CPU (``weights_only=True``); a missing or unreadable file is a one-line error."""
    ckpt, _ = load_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise FastMAEError(f"checkpoint {path} is not a fastmae/MAE checkpoint (no 'model' entry)")
    return ckpt


def numbered_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``checkpoint-<step>.pth`` files of a folder, newest step first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint-*.pth") if (m := NUMBERED.search(p.name))]
    return sorted(found, reverse=True)


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``None`` -> no resume; ``"auto"`` -> the output folder's last checkpoint if there is one (an unreadable one:
    the newest readable ``checkpoint-<step>.pth`` instead, with a warning); a run's output folder -> its last
    checkpoint, the same way; else the path."""
    if resume is None:
        return None
    if resume != "auto" and Path(resume).is_dir():  # a run's output folder: its last checkpoint
        if not (Path(resume) / LAST).exists() and not numbered_checkpoints(Path(resume)):
            raise FastMAEError(f"--resume {resume} is a folder with no {LAST} (nor checkpoint-<step>.pth) in it")
        resume, output_dir = "auto", resume
    if resume == "auto":
        out = Path(output_dir)
        last = out / LAST
        numbered = numbered_checkpoints(out)
        if not last.is_file() and not numbered:
            return None
        problem = checkpoint_problem(last) if last.is_file() else "does not exist"
        if problem is None:
            return last
        for step, path in numbered:
            if checkpoint_problem(path) is None:
                logger.warning("--resume auto: %s %s; resuming from %s (step %d) instead", last, problem, path.name,
                               step)  # fmt: skip
                return path
        raise FastMAEError(f"--resume auto: {last} {problem}, and no readable checkpoint-<step>.pth in {out} to fall "
                           "back to (--keep-every N keeps them)")  # fmt: skip
    if not Path(resume).is_file():
        raise FastMAEError(f"--resume {resume} does not exist")
    return Path(resume)


def state_mismatch(expected: dict, found: dict, limit: int = 3) -> str:
    """What differs between a model's state_dict (``expected``) and a checkpoint's (``found``), in words: keys missing
    from the checkpoint, keys it has in excess, shapes that differ (the first ``limit`` of each)."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} in the checkpoint, {tuple(v.shape)} in the model" for k, v in
              expected.items() if k in found and hasattr(found[k], "shape") and found[k].shape != v.shape]  # fmt: skip
    parts = []
    for what, items in (("shapes differ", shapes), ("missing from the checkpoint", missing),
                        ("not in the model", extra)):  # fmt: skip
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{what}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts) or "the same keys and shapes"


def resume_position(ckpt: dict, step: int, steps_per_epoch: int, accum: int, world_size: int) -> tuple[int, int]:
    """(epoch, batch) where a run resumed at optimizer ``step`` continues: the loader position saved in ``ckpt`` when
    the number of processes is the same (so it sees the batches the original run would have seen), else ``step``'s
    place in the epoch, with a warning that the batches now differ."""
    epoch, batch = divmod(step, steps_per_epoch)
    batch *= accum
    saved_world = (ckpt.get("config") or {}).get("world_size", 1)
    if saved_world != world_size:
        logger.warning("resuming a %d-process run with %d processes: continuing from step %d's place in the epoch; "
                       "batches are no longer the ones the original run would have seen", saved_world, world_size,
                       step)  # fmt: skip
    elif "data_position" in ckpt:
        epoch, batch = (int(v) for v in ckpt["data_position"])
    if batch >= steps_per_epoch * accum:  # saved at the end of an epoch's usable batches
        epoch, batch = epoch + 1, 0
    return epoch, batch


# ----------------------------------------------------------------------------------------------- the generators
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


class SaveClock:
    """The epoch-end policy: an epoch end saves only when ``minutes`` have passed since the last save (0: at every
    epoch end). A run of many short epochs (the demo) then writes a few checkpoints, not one per epoch, while an
    ImageNet epoch, longer than the interval, still ends with one."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = time.monotonic()


# ------------------------------------------------------------------------------------------------ the checkpointer
class Checkpointer:
    """Saves, loads and rolls back one run's registered parts (see the module docstring). ``recipe`` provides
    ``model`` and ``optimizer`` (the weights and state a checkpoint's ``model`` and ``optimizer`` hold), ``scaler``
    (or None), ``fits`` (words for a mismatch: "fit mae_vit_base_patch16 at 224 px"), and ``extra_state()`` /
    ``load_extra_state(ckpt)`` for its own entries. Every rank calls :meth:`save`: gathering FSDP shards and the
    ranks' generators are collectives; rank 0 writes."""

    def __init__(self, ctx, cfg, recipe, usable: int):
        self.ctx, self.recipe, self.usable = ctx, recipe, usable  # usable: batches of an epoch that make whole steps
        self.every, self.keep_every, self.max_rollbacks = cfg.save_every, cfg.keep_every, cfg.max_rollbacks
        self.clock = SaveClock(cfg.save_interval)
        self.config: dict = {}  # the resolved configuration, saved with every checkpoint
        self.rollbacks = 0
        self.saved_rng: list | None = None

    # ----------------------------------------------------------------------------------------- what and when
    def contents(self, step: int, position: tuple[int, int], rng: list | None, model_state: dict,
                 optim_state: dict) -> dict:  # fmt: skip
        """The checkpoint dict (the only place one is built)."""
        epoch = position[0] + (1 if position[1] >= self.usable else 0)  # whole epochs done
        state = {"model": model_state, "optimizer": portable_optimizer_state(optim_state), "step": step,
                 "epoch": epoch, "config": self.config, "data_position": list(position)}  # fmt: skip
        if rng is not None:
            state["rng"] = rng
        if self.recipe.scaler is not None:
            state["scaler"] = self.recipe.scaler.state_dict()
        return {**state, **self.recipe.extra_state()}

    def save(self, state, reason: str, best: bool = False) -> str | None:
        """The one save policy: what the step ``state`` (a :class:`~fastmae.train.trainer.TrainingState`) just done
        leaves on disk, for ``reason`` (:data:`STEP`, :data:`EPOCH_END`, :data:`END`, :data:`SIGNAL`, :data:`FAULT`)
        and whether the recipe's score is the ``best`` so far. ``checkpoint-best.pth`` when it is; then
        ``checkpoint-last.pth`` at the end and on a signal, every ``--save-every`` steps, and at an epoch end once
        ``--save-interval`` minutes have passed (under torchrun the ranks agree on the clock: a collective, so a host
        sync, at epoch ends only). After a fault, this process alone keeps what it can; returns what it kept, in words.
        Every rank calls it (but after a fault)."""
        if reason == FAULT:
            return self._save_alone(state.step, state.position)
        if best:
            self._save(state.step, state.position, BEST)
        if (reason in (END, SIGNAL) or (self.every and state.step % self.every == 0)
                or (reason == EPOCH_END and self.ctx.dist.any(self.clock.due(), self.ctx.device))):  # fmt: skip
            self._save(state.step, state.position, LAST)
        return None

    def _save(self, step: int, position: tuple[int, int], name: str) -> None:
        """``name`` (and a numbered copy with ``--keep-every``); every rank calls it."""
        model_state, optim_state = full_state(self.recipe.model, self.recipe.optimizer, self.ctx.dist)
        rng = self.ctx.dist.gather_objects(rng_state(self.ctx.device))  # every rank's, in rank order
        if self.ctx.main:
            self._write(self.contents(step, position, rng, model_state, optim_state), step, name)
        if name == LAST:
            self.clock.saved()
        self.ctx.dist.barrier()  # no rank reads the checkpoint (rollback) before it is complete

    def _write(self, state: dict, step: int, name: str) -> None:
        save_torch(state, self.ctx.out / name)
        if name == LAST and self.keep_every and step % self.keep_every == 0:
            save_torch(state, self.ctx.out / f"checkpoint-{step:07d}.pth")

    def _save_alone(self, step: int, position: tuple[int, int]) -> str:
        """After a fault: ``checkpoint-last.pth`` at the last whole step, written by this process with no collective
        (the other ranks may be gone). Weights and optimizer state are those after step ``step`` (an unfinished step
        never reaches the optimizer); generators only in a one-process run (the others' are out of reach). Returns
        what was kept, in words."""
        if self.ctx.dist.strategy == "fsdp":
            return "no checkpoint written now (under FSDP every rank holds a shard); the last one stays"
        if not self.ctx.main:
            return "rank 0 saves the checkpoint"
        rng = [rng_state(self.ctx.device)] if not self.ctx.dist.enabled else None
        model, optimizer = self.recipe.model, self.recipe.optimizer
        self._write(self.contents(step, position, rng, model.state_dict(), optimizer.state_dict()), step, LAST)
        return f"saved {self.ctx.out / LAST} at step {step}; --resume auto continues from there"

    def warn_if_no_room(self, copies: int = 3) -> None:
        """A warning at the start when the output folder cannot hold two checkpoints (a save writes the new one before
        the old one goes): ``copies`` times the weights (weights + AdamW's two moments, + EMA)."""
        model = self.recipe.model
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))  # DTensors too
        if self.ctx.main and (problem := room_problem(self.ctx.out, copies * weights)):
            logger.warning("--output-dir %s: %s; saving will fail there", self.ctx.out, problem)

    # ---------------------------------------------------------------------------------------- load and roll back
    def resume(self, steps_per_epoch: int, accum: int) -> tuple[int, tuple[int, int]]:
        """Load ``--resume``'s checkpoint into the registered parts; returns (its step, where the data continues).
        Its generators are put back by :meth:`restore_rng`, just before the first step."""
        path = self.ctx.resume_path
        ckpt = load_checkpoint(path)
        self.recipe.check_checkpoint(ckpt["model"], f"--resume {path}")
        self.recipe.check_config(ckpt.get("config") or {}, f"--resume {path}")
        self._load_weights(ckpt, f"--resume {path}")
        if self.recipe.scaler is not None and "scaler" in ckpt:
            self.recipe.scaler.load_state_dict(ckpt["scaler"])
        self.recipe.load_extra_state(ckpt)
        step = int(ckpt.get("step", 0))
        saved = ckpt.get("rng")
        self.saved_rng = [saved] if isinstance(saved, dict) else saved  # older one-process files: one dict
        logger.info("resumed from %s at step %d", path, step)
        return step, resume_position(ckpt, step, steps_per_epoch, accum, self.ctx.dist.world_size)

    def _load_weights(self, ckpt: dict, what: str) -> None:
        model = self.recipe.model
        try:
            load_full_state(model, self.recipe.optimizer, ckpt["model"], ckpt.get("optimizer"), self.ctx.dist)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise FastMAEError(
                f"{what} does not {self.recipe.fits} ({state_mismatch(model.state_dict(), ckpt['model'])}); resume "
                "with the flags of the run that wrote it (its config.json), or start a new run in another --output-dir"
            ) from exc

    def restore_rng(self) -> None:
        """Put back this rank's generators from the resumed checkpoint, when it had as many processes."""
        if self.saved_rng is not None and len(self.saved_rng) == self.ctx.dist.world_size:
            set_rng_state(self.saved_rng[self.ctx.dist.rank], self.ctx.device)

    def rollback(self, step: int, in_a_row: int) -> None:
        """Reload the last checkpoint's weights and optimizer state after ``in_a_row`` non-finite steps (every rank
        reads the file: a shared file system, as for ``--resume``); the run goes on with the next data. Past
        ``--max-rollbacks``, or with nothing to roll back to, a one-line error."""
        last = self.ctx.out / LAST
        self.rollbacks += 1
        if self.rollbacks > self.max_rollbacks or not last.exists():
            raise FastMAEError(
                f"loss or gradients not finite for {in_a_row} steps in a row at step {step}"
                + (f" after {self.rollbacks - 1} rollback(s)" if self.rollbacks > 1
                   else ", and no checkpoint to roll back to")
                + "; lower the learning rate or enable --clip-grad"
            )  # fmt: skip
        ckpt = load_checkpoint(last)
        self._load_weights(ckpt, f"rollback to {last}")
        logger.warning("rolled back to %s (step %s) after non-finite steps; continuing at step %d (rollback %d/%d)",
                       last, ckpt.get("step"), step, self.rollbacks, self.max_rollbacks)  # fmt: skip


def portable_optimizer_state(state: dict) -> dict:
    """An optimizer state dict as an ungraphed run writes it: a device-side lr as a number, capturable off (so a
    checkpoint resumes the same with or without CUDA graphs)."""
    groups = []
    for group in state["param_groups"]:
        lr = group["lr"]
        group = {**group, "lr": float(lr) if isinstance(lr, torch.Tensor) else lr}
        if "capturable" in group:
            group["capturable"] = False
        groups.append(group)
    return {**state, "param_groups": groups}
