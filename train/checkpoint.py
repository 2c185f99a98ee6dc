"""Checkpoints: written atomically (temp file in the same folder, fsync, rename), read with ``weights_only=True``.

A save that runs out of room (full disk, quota, a file size limit) ends with one line saying where, how much was
needed and how much is free; the previous checkpoint is left as it was. ``--resume auto`` falls back from an
unreadable ``checkpoint-last.pth`` to the newest readable numbered checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from fastmae.errors import FastMAEError
from fastmae.files import CHECKPOINT_NAME, checkpoint_problem, load_file, save_torch

LAST = CHECKPOINT_NAME
NUMBERED = re.compile(r"checkpoint-(\d+)\.pth$")
logger = logging.getLogger("fastmae.checkpoint")
save_checkpoint = save_torch  # atomic, with the one-line out-of-room error (fastmae.files)


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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint on CPU with ``weights_only=True``; a missing or unreadable file is a one-line error."""
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


def position_at(step: int, steps_per_epoch: int, accum: int) -> tuple[int, int]:
    """(epoch, batches consumed) of a run right after optimizer ``step``: every epoch has ``steps_per_epoch`` steps of
    ``accum`` batches."""
    epoch, k = divmod(step, steps_per_epoch)
    return epoch, k * accum


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
