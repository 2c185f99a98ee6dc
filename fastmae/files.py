"""Files written so that a crash, a kill or a full disk at any moment leaves either the old file or the new one.

:func:`atomic_write` writes a temporary file in the same folder, flushes and fsyncs it, then renames it over the
target (a rename within one file system is atomic). Every file fastmae rewrites in place goes through it: checkpoints,
``config.json`` / ``summary.json``, ``metrics.jsonl`` when a resume trims it, benchmark results after every row.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function that writes into the open binary file) to ``path``
    atomically; the folder is created if need be. On any error the temporary file is removed and ``path`` is as it
    was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented JSON (non-JSON values as their ``str``), atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`atomic_write` left beside ``path`` when its process was killed mid-write."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))
