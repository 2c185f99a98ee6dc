"""Files fastmae writes and reads: written so that a crash, a kill or a full disk at any moment leaves either the old
file or the new one; read with one-line errors.

- :func:`atomic_write` writes a temporary file in the same folder, flushes and fsyncs it, then renames it over the
  target (a rename within one file system is atomic). Every file fastmae writes goes through it: checkpoints
  (:func:`save_torch`), ``config.json`` / ``summary.json`` (:func:`write_json`), ``metrics.jsonl`` when a resume trims
  it, exported weights, the image index cache, benchmark results after every row. Running out of room (a full disk,
  a quota, ``ulimit -f``) is one :class:`~fastmae.errors.NoRoom` line saying where, how much was needed and how much
  is free; the old file stays.
- :func:`load_file` is the one checked reader of weight files (``torch.save`` archives and ``.safetensors``):
  :func:`checkpoint_problem` looks at the bytes first, so a truncated copy or a file of another kind is a one-line
  error naming the path, never a traceback from deep inside ``torch.load``.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import FastMAEError, NoRoom, one_line

_NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "the file size limit (ulimit -f) is reached"}  # fmt: skip
CHECKPOINT_NAME = "checkpoint-last.pth"  # what a run's output folder holds (named in the error for a folder)


# ------------------------------------------------------------------------------------------------------ writing
def mb(n: float) -> str:
    """A byte count for messages: ``36 MB``, ``12 KB``."""
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} KB"


def file_size_limit() -> int | None:
    """The soft ``RLIMIT_FSIZE`` (``ulimit -f``) in bytes, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _no_room(exc: BaseException) -> int | None:
    """The errno of an out-of-room error anywhere in ``exc``'s chain (torch's zip writer wraps the OSError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
            return exc.errno
        text = str(exc)
        if "file write failed" in text or "No space left on device" in text:
            return errno.EFBIG if file_size_limit() is not None else errno.ENOSPC
        exc = exc.__cause__ or exc.__context__
    return None


def room_problem(folder: str | os.PathLike, needed: int) -> str | None:
    """Why ``folder`` cannot take a file of ``needed`` bytes next to another (a save writes the new file before the
    old one goes), or None."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free < 2 * needed:
        return f"{mb(free)} free on its disk, less than two checkpoints of about {mb(needed)}"
    limit = file_size_limit()
    if limit is not None and limit < needed:
        return f"the file size limit (ulimit -f) is {mb(limit)}, less than one checkpoint of about {mb(needed)}"
    return None


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None],
                 size: int | None = None) -> Path:  # fmt: skip
    """Write ``data`` (bytes, text as UTF-8, or a function that writes into the open binary file) to ``path``
    atomically; the folder is created if need be. On any error the temporary file is removed and ``path`` is as it
    was; running out of room is a one-line :class:`NoRoom` (``size``: about how many bytes the file needs, for that
    line). Temporary files of a writer killed mid-write are cleared after a successful write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        code = _no_room(exc) if isinstance(exc, Exception) else None
        if code is None:
            raise
        if size is None and not callable(data):
            size = len(data)
        raise NoRoom(_no_room_line(path, code, size)) from exc
    for stale in stale_temporaries(path):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    return path


def _no_room_line(path: Path, code: int, size: int | None) -> str:
    try:
        free = mb(shutil.disk_usage(path.parent).free)
    except OSError:
        free = "unknown"
    limit = file_size_limit()
    limit = f"; the file size limit is {mb(limit)}" if code == errno.EFBIG and limit else ""
    kept = f"{path.name} there is the previous one, intact" if path.exists() else f"no earlier {path.name} there"
    needs = f"it needs about {mb(size)}, " if size is not None else ""
    return (f"cannot save {path.name} in {path.parent}: {_NO_ROOM[code]} ({needs}{free} free on that disk{limit}); "
            f"{kept}")


def write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented JSON (non-JSON values as their ``str``), atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def update_readme(readme: str | os.PathLike, table: str, name: str = "fastmae-bench") -> None:
    """Replace what lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``readme`` with ``table``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = Path(readme).read_text()
    if start not in text or end not in text:
        raise FastMAEError(f"{readme} has no {start} ... {end} markers for the results table")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write(readme, f"{head}{start}\n{table}\n{end}{tail}")


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`atomic_write` left beside ``path`` when its process was killed mid-write."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists, tuples), each storage counted once: about the size of
    its checkpoint."""
    import torch

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


def save_torch(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), size=tensor_bytes(obj))


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """``tensors`` (contiguous, on the CPU) as a ``.safetensors`` file with string ``metadata``, atomically."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata={k: str(v) for k, v in (metadata or {}).items()})  # fmt: skip
    return atomic_write(path, blob)


# ------------------------------------------------------------------------------------------------------ reading
def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a weight file, from a look at its bytes (no loading), or None. ``torch.save`` writes a
    zip archive (older releases a pickle, accepted here); safetensors files have their own header."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        if (path / CHECKPOINT_NAME).is_file():
            return f"is a run's output folder; its checkpoint is {path / CHECKPOINT_NAME}"
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
    """A one-line error naming ``what`` (e.g. ``--resume``) and the path when ``path`` cannot be a weight file."""
    if (problem := checkpoint_problem(path)) is not None:
        raise FastMAEError(f"{what} {path} {problem}")


def load_file(path: str | os.PathLike, what: str = "checkpoint") -> tuple[object, dict]:
    """(object, metadata) of a weight file: a ``torch.save`` archive loaded on the CPU with ``weights_only=True``
    (metadata empty), or a ``.safetensors`` file as a name -> tensor dict with its string metadata. Anything that
    cannot be read is a one-line error naming ``what`` and the path."""
    path = Path(path)
    check_checkpoint_file(path, what)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        import torch

        return torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as exc:
        raise FastMAEError(f"{what} {path} could not be read: {one_line(exc, limit=10_000)}") from exc
