"""Checkpoints: written atomically (temp file in the same folder, fsync, rename), read with ``weights_only=True``."""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path

import torch

from fastmae.errors import FastMAEError

LAST = "checkpoint-last.pth"
logger = logging.getLogger("fastmae.checkpoint")


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """Write ``obj`` to ``path`` so that a crash at any moment leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    return path


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a checkpoint, from a look at its bytes (no loading), or None. ``torch.save`` writes a
    zip archive (older releases a pickle, accepted here); safetensors files have their own header."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        if (path / LAST).is_file():
            return f"is a run's output folder; its checkpoint is {path / LAST}"
        return "is a folder, not a checkpoint file (nor a transformers folder with a config.json)"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as exc:
            return f"is not a readable safetensors file ({str(exc).splitlines()[0]})"
        return None
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # a pickle (torch.save with the legacy format): torch.load decides
        return None
    if head != b"PK\x03\x04":
        return "is not a PyTorch checkpoint (torch.save writes a zip archive; this file is something else)"
    try:
        with zipfile.ZipFile(path) as z:
            if not any(name.endswith("data.pkl") for name in z.namelist()):
                return "is a zip archive but not a PyTorch checkpoint (no data.pkl inside)"
    except (zipfile.BadZipFile, OSError):
        return "is truncated or corrupt (a zip archive whose directory cannot be read; was its copy cut short?)"
    return None


def check_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> None:
    """A one-line error naming ``what`` (e.g. ``--resume``) and the path when ``path`` cannot be a checkpoint."""
    if (problem := checkpoint_problem(path)) is not None:
        raise FastMAEError(f"{what} {path} {problem}")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint on CPU with ``weights_only=True``; a missing or unreadable file is a one-line error."""
    path = Path(path)
    check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FastMAEError(f"checkpoint {path} could not be read: {str(exc).splitlines()[0]}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise FastMAEError(f"checkpoint {path} is not a fastmae/MAE checkpoint (no 'model' entry)")
    return ckpt


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``None`` -> no resume; ``"auto"`` -> the output folder's last checkpoint if there is one; else the path."""
    if resume is None:
        return None
    if resume == "auto":
        last = Path(output_dir) / LAST
        return last if last.is_file() else None
    if not Path(resume).is_file():
        raise FastMAEError(f"--resume {resume} does not exist")
    return Path(resume)


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
