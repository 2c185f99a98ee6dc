"""Checkpoints: written atomically (temp file in the same folder, fsync, rename), read with ``weights_only=True``.

A save that runs out of room (full disk, quota, a file size limit) ends with one line saying where, how much was
needed and how much is free; the previous checkpoint is left as it was. ``--resume auto`` falls back from an
unreadable ``checkpoint-last.pth`` to the newest readable numbered checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from fastmae.errors import FastMAEError, NoRoom

LAST = "checkpoint-last.pth"
NUMBERED = re.compile(r"checkpoint-(\d+)\.pth$")
logger = logging.getLogger("fastmae.checkpoint")
_NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "the file size limit (ulimit -f) is reached"}  # fmt: skip


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists, tuples), each storage counted once: about the size of
    its checkpoint."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list | tuple):
            stack.extend(x)
    return total


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} KB"


def _no_room(exc: BaseException) -> int | None:
    """The errno of an out-of-room error anywhere in ``exc``'s chain (torch's zip writer wraps the OSError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
            return exc.errno
        text = str(exc)
        if "file write failed" in text or "No space left on device" in text:
            return errno.EFBIG if _file_limit() is not None else errno.ENOSPC
        exc = exc.__cause__ or exc.__context__
    return None


def _file_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def room_problem(folder: Path, needed: int) -> str | None:
    """Why ``folder`` cannot take a file of ``needed`` bytes next to another (a save writes the new checkpoint
    before the old one goes), or None."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free < 2 * needed:
        return f"{_mb(free)} free on its disk, less than two checkpoints of about {_mb(needed)}"
    limit = _file_limit()
    if limit is not None and limit < needed:
        return f"the file size limit (ulimit -f) is {_mb(limit)}, less than one checkpoint of about {_mb(needed)}"
    return None


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """Write ``obj`` to ``path`` so that a crash at any moment leaves either the old file or the new one. Running out
    of room is a one-line :class:`NoRoom` fault; the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        code = _no_room(exc) if isinstance(exc, Exception) else None
        if code is None:
            raise
        try:
            free = _mb(shutil.disk_usage(path.parent).free)
        except OSError:
            free = "unknown"
        limit = f"; the file size limit is {_mb(_file_limit())}" if code == errno.EFBIG and _file_limit() else ""
        kept = f"{path.name} there is the previous one, intact" if path.exists() else "no earlier checkpoint there"
        raise NoRoom(f"cannot save {path.name} in {path.parent}: {_NO_ROOM[code]} (it needs about "
                       f"{_mb(tensor_bytes(obj))}, {free} free on that disk{limit}); {kept}") from exc  # fmt: skip
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
    path = Path(path)
    check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FastMAEError(f"checkpoint {path} could not be read: {str(exc).splitlines()[0]}") from exc
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
