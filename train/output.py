"""The output folder: the contract of what a run leaves in ``--output-dir``, the lock that keeps one run per folder,
and :class:`RunLog`, which writes the folder's logs (``config.json``, ``metrics.jsonl`` + TensorBoard,
``summary.json``) and the progress bar.

A folder holds a run when it has any of :data:`RUN_FILES` or a checkpoint. A new run into it is refused with one line
that touches nothing, unless it continues the run (``--resume``) or starts anew after moving the old files aside
(``--overwrite``; nothing is deleted).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import time
from pathlib import Path

from tqdm import tqdm

from fastmae.errors import FastMAEError
from fastmae.files import CHECKPOINT_NAME, atomic_write, write_json

logger = logging.getLogger("fastmae.output")

# What a run writes into its output folder (the contract); --overwrite moves exactly these aside.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "loss.png", "reconstructions", "tensorboard")
_CHECKPOINTS = re.compile(r"^\.?checkpoint-.*\.(pth|tmp)$")
LOCK = ".fastmae.lock"  # rank 0 of a run holds a write lock on it while the run writes the folder


def check_output_dir(path: str | os.PathLike) -> Path:
    """The output folder; one that exists as a file (or under a file) is a one-line error."""
    out = Path(path)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise FastMAEError(f"--output-dir {out}: {parent} is a file, not a folder")
    return out


def run_files(out: Path) -> list[Path]:
    """The files and folders of a run in ``out`` (none: ``out`` holds no run)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name in RUN_FILES or _CHECKPOINTS.match(p.name))


def describe_run(out: Path) -> str:
    """A few words on the run in ``out``: its model and the step it reached, as far as its files say."""
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    words = [config.get("model") or "a run"]
    if summary.get("steps") is not None:
        total = config.get("total_steps")
        words.append(f"at step {summary['steps']}" + (f" of {total}" if total else ""))
    elif (out / CHECKPOINT_NAME).exists():
        words.append("with a checkpoint, unfinished")
    return " ".join(words)


def check_fresh_start(out: Path, resume: str | None, overwrite: bool) -> None:
    """A folder that holds a run is only written into to continue it (``--resume``) or, with ``--overwrite``, after
    its files are moved aside; otherwise a one-line error that touches nothing."""
    if overwrite and resume is not None:
        raise FastMAEError("--overwrite starts a run anew and --resume continues one: give one of them")
    if resume is None and not overwrite and run_files(out):
        raise FastMAEError(f"--output-dir {out} holds a run ({describe_run(out)}); continue it with --resume auto, "
                           f"start anew with --overwrite (its files are moved to {out}/replaced-<time>/), or choose "
                           "another --output-dir")  # fmt: skip


def move_run_aside(out: Path) -> Path | None:
    """--overwrite: the run's files into ``out/replaced-<time>/`` (nothing is deleted); returns that folder."""
    files = run_files(out)
    if not files:
        return None
    aside = out / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in files:
        os.replace(path, aside / path.name)
    logger.warning("--overwrite: moved the previous run's %d file(s) in %s to %s", len(files), out, aside)
    return aside


def _lock_holder(path: Path) -> str:
    """`` (pid N)`` of the process holding a lock on ``path``, from /proc/locks; empty where unknown."""
    try:
        st = path.stat()
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if key in fields and ("POSIX" in fields or "FLOCK" in fields):
                return f" (pid {fields[fields.index(key) - 1]})"
    except (OSError, ValueError, IndexError):
        pass
    return ""


def lock_output_dir(out: Path) -> int | None:
    """Hold a write lock on ``out/.fastmae.lock`` (created if need be, never written) for as long as this process
    runs, so that two runs never write one folder: a second one stops with one line naming the holder.

    A POSIX record lock (``fcntl``), not ``flock``: forked children (DataLoader workers) do not inherit it, so it dies
    with the process that took it. A SIGKILLed run's workers live on for seconds; with ``flock`` they held the lock
    and refused an immediate restart (torchrun's, a job script's). Nothing else in the process may open and close
    this file: closing any descriptor of it lets go of the lock. Returns the descriptor (None where the file system
    has no locks)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise FastMAEError(f"--output-dir {out} is being written by another fastmae run{_lock_holder(path)}; "
                               "wait for it to end, or choose another --output-dir") from None  # fmt: skip
        # e.g. ENOLCK on a network file system without lock support
        logger.warning("--output-dir %s: cannot lock %s (%s); nothing stops another run from writing there", out,
                       LOCK, exc.strerror or exc)  # fmt: skip
        return None
    return fd


def missing_folder(out: Path) -> Path | None:
    """The outermost folder on ``out``'s path that does not exist yet (the first one locking ``out`` creates), or
    None when ``out`` exists."""
    made = None
    for folder in (out, *out.parents):
        if folder.exists():
            break
        made = folder
    return made


def release_output_dir(out: Path, fd: int | None, made: Path | None = None) -> None:
    """Let go of ``out``'s lock (``fd`` from :func:`lock_output_dir`). A run that wrote nothing there (refused before
    its first file: a missing ``--data``, no image that decodes) leaves nothing behind: the lock file goes while
    still held, and so do the folders it created (``made``, from :func:`missing_folder`), if empty."""
    try:
        if [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink()
    except OSError:
        pass
    if fd is not None:
        os.close(fd)
    if made is None:
        return
    for folder in (out, *out.parents):
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            return
        if folder == made:
            return


# ---------------------------------------------------------------------------------------------------- the logs
def tensorboard_problem(enabled: bool | None) -> str | None:
    """Why ``--tensorboard`` cannot be honoured here (asked for, not installed), or None."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        return f"--tensorboard: {exc}; pip install 'fastmae[tensorboard]'"
    return None


def _tensorboard(enabled: bool | None, path: Path):
    """A SummaryWriter when TensorBoard is installed (and not turned off)."""
    if enabled is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


class RunLog:
    """The output folder as rank 0 writes it: ``config.json``, ``metrics.jsonl`` (one JSON row per call, flushed at
    once) with the same numbers as TensorBoard scalars (``tensorboard/``, when asked for or installed),
    ``summary.json``, and the progress bar. On the other ranks every method is a no-op."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool | None = False, resumed_at: int | None = None):
        self.out, self.enabled = out, enabled
        self._metrics = self._writer = self._bar = None
        if enabled:
            out.mkdir(parents=True, exist_ok=True)
            if resumed_at is not None:
                self._forget_after(resumed_at)
            self._writer = _tensorboard(tensorboard, out / "tensorboard")

    def _forget_after(self, step: int) -> None:
        """A resumed run logs its steps after ``step`` again: the rows the interrupted run wrote for them go, so that
        ``metrics.jsonl`` holds each step once (rewritten atomically)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:  # a line cut short by the crash
                continue
        atomic_write(path, "".join(f"{line}\n" for line in keep))

    def config(self, resolved: dict) -> None:
        if self.enabled:
            write_json(self.out / "config.json", resolved)

    def row(self, row: dict) -> None:
        """A ``metrics.jsonl`` row; its numbers (but step and epoch) also go to TensorBoard at ``row["step"]``."""
        if not self.enabled:
            return
        if self._metrics is None:
            self._metrics = open(self.out / "metrics.jsonl", "a")
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, int | float):
                self.scalar(key, value, row["step"])

    def scalar(self, name: str, value: float | None, step: int) -> None:
        """A TensorBoard scalar alone (not in ``metrics.jsonl``)."""
        if self._writer is not None and value is not None:
            self._writer.add_scalar(name, value, step)

    def progress(self, total: int, initial: int, show: bool) -> tqdm:
        self._bar = tqdm(total=total, initial=initial, disable=not (show and self.enabled), unit="step",
                         dynamic_ncols=True)  # fmt: skip
        return self._bar

    def end_progress(self) -> None:
        """Close the progress bar and ``metrics.jsonl`` (at the end of the loop)."""
        for f in (self._bar, self._metrics):
            if f is not None:
                f.close()
        self._bar = self._metrics = None

    def summary(self, summary: dict) -> None:
        if self.enabled:
            write_json(self.out / "summary.json", summary)

    def close(self) -> None:
        self.end_progress()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
