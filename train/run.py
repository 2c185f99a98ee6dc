"""The run machinery that pretrain, finetune and linprobe share, and nothing recipe-specific.

- :func:`start_run` -> :class:`Run`: the configuration validated; device, precision, compile and loader chosen; the
  output folder and the checkpoints to start from checked (before any data is indexed); torchrun's process group
  joined. Use it as a context manager: it leaves the process group at the end, also on errors.
- Seeding and random-generator capture / restore (:func:`seed_all`, :func:`rng_state`, :func:`rank_rng_state`, ...).
- :class:`RunLog`: the output folder as rank 0 writes it (``config.json``, ``metrics.jsonl`` + TensorBoard,
  ``summary.json``) and the progress bar.
- :class:`SaveClock`: the epoch-end checkpoint policy (at most one per ``--save-interval`` minutes).
- :func:`micro_batches`: an epoch's batches from where a run resumes, each with its place in the accumulation.
- :class:`StopSignal`: SIGTERM / SIGINT finish the step, save and exit cleanly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import fastmae
from fastmae.compiling import DEFAULT_VARIANT, compile_model
from fastmae.config import PretrainConfig
from fastmae.errors import FastMAEError, NoRoom, RunFault
from fastmae.files import atomic_write, check_checkpoint_file, room_problem, write_json
from fastmae.interop import check_pretrained

from .checkpoint import LAST as LAST_CHECKPOINT
from .checkpoint import resolve_resume
from .data import resolve_loader
from .distributed import DistContext, init_distributed, peer_lost
from .launch import dist_info, export_slurm_env

logger = logging.getLogger("fastmae.run")


# ---------------------------------------------------------------------------------------------- choices of the run
def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; an explicit ``cuda``/``cuda:N`` without a GPU is a one-line error.
    ``cuda`` is this process's GPU: ``cuda:LOCAL_RANK`` in a multi-process job (so that every check before joining,
    the decode probe among them, runs on it, not on GPU 0)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise FastMAEError(f"--device {name} was requested but no CUDA device is available")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        _, world, local = dist_info()
        if world > 1 and local < torch.cuda.device_count():
            device = torch.device("cuda", local)
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 autocast on CUDA and fp32 on CPU; anything else as given."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def check_output_dir(path: str | os.PathLike) -> Path:
    """The output folder; one that exists as a file (or under a file) is a one-line error."""
    out = Path(path)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise FastMAEError(f"--output-dir {out}: {parent} is a file, not a folder")
    return out


# What a run writes into its output folder (the contract); --overwrite moves exactly these aside.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "loss.png", "reconstructions", "tensorboard")
_CHECKPOINTS = re.compile(r"^\.?checkpoint-.*\.(pth|tmp)$")


def run_files(out: Path) -> list[Path]:
    """The files and folders of a run in ``out`` (none: ``out`` holds no run)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name in RUN_FILES or _CHECKPOINTS.match(p.name))


def describe_run(out: Path) -> str:
    """A few words on the run in ``out``: its command, model and the step it reached, as far as its files say."""
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
    elif (out / LAST_CHECKPOINT).exists():
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


LOCK = ".fastmae.lock"  # rank 0 of a run holds an exclusive flock on it while the run writes the folder


def _lock_holder(path: Path) -> str:
    """`` (pid N)`` of the process holding the flock on ``path``, from /proc/locks; empty where unknown."""
    try:
        st = path.stat()
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and key in fields:
                return f" (pid {fields[fields.index(key) - 1]})"
    except (OSError, ValueError, IndexError):
        pass
    return ""


def lock_output_dir(out: Path) -> int | None:
    """Hold ``out/.fastmae.lock`` (created if need be, never written) for as long as this process runs, so that two
    runs never write one folder: a second one stops with one line. The kernel lets go when the process ends, killed
    or not, so a restarted run takes it again. Returns the descriptor (None where the file system has no locks)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FastMAEError(f"--output-dir {out} is being written by another fastmae run{_lock_holder(path)}; wait "
                           "for it to end, or choose another --output-dir") from None  # fmt: skip
    except OSError as exc:  # e.g. ENOLCK on a network file system without lock support
        os.close(fd)
        logger.warning("--output-dir %s: cannot lock %s (%s); nothing stops another run from writing there", out,
                       LOCK, exc.strerror or exc)  # fmt: skip
        return None
    return fd


def optimizer_steps(batches: int, accum: int) -> int:
    """Optimizer steps per epoch from a loader's ``batches`` with ``accum`` micro-batches per step (a last partial
    accumulation is dropped); a one-line error when the epoch cannot fill one step."""
    if batches < accum:
        raise FastMAEError(f"--accum-iter {accum} needs at least {accum} batches per epoch, the data gives {batches}")
    return batches // accum


@dataclass
class Run:
    """Where and how a run runs: process group, device, precision, compile, loader, output folder, resume file."""

    ctx: DistContext
    device: torch.device
    precision: str
    compile: str  # off | full | regional
    loader_name: str
    out: Path
    resume_path: Path | None
    lock: int | None = None  # rank 0's descriptor of out/.fastmae.lock
    compile_mode: str = "default"

    @property
    def main(self) -> bool:
        return self.ctx.is_main

    @property
    def act_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)

    def autocast(self):
        """The step's autocast context (bf16 / fp16), or a no-op in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.act_dtype)

    def compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the step calls: ``module`` compiled as ``--compile`` says (:func:`fastmae.compiling.compile_model`)."""
        return compile_model(module, self.compile, self.compile_mode)

    def run_info(self) -> dict:
        """Where and how the run ran, for ``config.json`` and ``summary.json``."""
        return {"device": self.device.type, "precision": self.precision, "compile": self.compile,
                "loader": self.loader_name, "world_size": self.ctx.world_size}  # fmt: skip

    def log_and_stop(self, step: int, every: int, last_step: int, stop: StopSignal) -> tuple[bool, bool]:
        """(stop now, log this step): logging on every ``every``-th, the first and the last step; a stop signal is
        agreed by all ranks on logging steps (:meth:`DistContext.agree_stop`)."""
        log_now = step % every == 0 or step == 1 or step == last_step
        return self.ctx.agree_stop(stop.received is not None, log_now, self.device)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.ctx.close()  # leave torchrun's process group, also on errors
        if self.lock is not None:
            os.close(self.lock)  # lets go of the folder
            self.lock = None


def start_run(cfg, parallel: str = "ddp") -> Run:
    """Validate ``cfg``, make every choice of the run and check its files, then join torchrun's process group (when
    there is one). Everything here is quick: a wrong ``--resume`` fails before a data set is indexed."""
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    variant = cfg.compile if cfg.compile is not None else (DEFAULT_VARIANT if device.type == "cuda" else "off")
    if variant == "regional" and getattr(cfg, "parallel", "ddp") == "fsdp" and dist_info()[1] > 1:
        raise FastMAEError("--compile regional with --parallel fsdp: FSDP2 shards the very blocks it compiles; use "
                           "--compile full")  # fmt: skip
    loader_name = resolve_loader(cfg.loader, device, gpu_loader=isinstance(cfg, PretrainConfig))
    out = check_output_dir(cfg.output_dir)
    check_fresh_start(out, cfg.resume, cfg.overwrite)
    resume_path = resolve_resume(cfg.resume, out)
    if resume_path is not None:
        check_checkpoint_file(resume_path, "--resume")
    if getattr(cfg, "pretrained", None) is not None:
        check_pretrained(cfg.pretrained, "--pretrained")
    export_slurm_env()  # SLURM tasks that cannot form one run stop here, each with one line, before any file exists
    # One writer per folder: rank 0 locks it, then checks it again (another run may have written it meanwhile).
    lock = lock_output_dir(out) if dist_info()[0] == 0 else None
    try:
        if lock is not None:
            check_fresh_start(out, cfg.resume, cfg.overwrite)
        run = _join(cfg, parallel, device, precision, variant, loader_name, out, resume_path, lock)
        run.compile_mode = cfg.compile_mode
        return run
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise


def _join(cfg, parallel, device, precision, variant, loader_name, out, resume_path, lock) -> Run:
    """The rest of :func:`start_run`: the process group, and the old run's files moved aside where asked."""
    # --overwrite, or --resume auto with nothing to resume (a run that died before its first checkpoint): the old
    # files go aside, so that the new run's metrics and pictures are its own. Decided before any rank moves a file.
    aside = cfg.overwrite or (cfg.resume == "auto" and resume_path is None and bool(run_files(out)))
    ctx, device = init_distributed(parallel, device, cfg.dist_timeout)
    if aside:
        try:
            if ctx.is_main:
                move_run_aside(out)
            ctx.barrier()
        except BaseException:
            ctx.close()
            raise
    return Run(ctx, device, precision, variant, loader_name, out, resume_path, lock)


# ------------------------------------------------------------------------------------------ seeding and generators
def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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


def rank_rng_state(ctx: DistContext, device: torch.device):
    """This process's generators (one process), or every rank's in rank order (torchrun; a collective)."""
    state = rng_state(device)
    return state if not ctx.enabled else ctx.gather_objects(state)


def restore_rng_state(saved, ctx: DistContext, device: torch.device) -> None:
    """Put back the generators saved by :func:`rank_rng_state` when the number of processes is the same."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == ctx.world_size:
        set_rng_state(states[ctx.rank], device)


# ---------------------------------------------------------------------------------------------- the output folder
def _tensorboard(enabled: bool | None, path: Path):
    """A SummaryWriter when TensorBoard is installed (and not turned off); asking for it without it fails loudly."""
    if enabled is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if enabled:
            raise FastMAEError(f"--tensorboard: {exc}; pip install 'fastmae[tensorboard]'") from exc
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

    def scalar(self, name: str, value: float, step: int) -> None:
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


def versions() -> dict:
    return {"fastmae": fastmae.__version__, "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------- the loop's pieces
class SaveClock:
    """The epoch-end checkpoint policy: an epoch end saves only when ``minutes`` have passed since the last save
    (0: at every epoch end). A run of many short epochs (the demo) then writes a few checkpoints, not one per epoch,
    while an ImageNet epoch, longer than the interval, still ends with one. Saves every ``--save-every`` steps, at
    the end and on a stop signal are not affected."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.last = time.monotonic()

    def due(self, ctx: DistContext, device: torch.device) -> bool:
        """Whether the epoch-end checkpoint is due; under torchrun the ranks agree (a host sync, at epoch ends only),
        since saving is a collective."""
        return ctx.any(time.monotonic() - self.last >= self.seconds, device)

    def saved(self) -> None:
        self.last = time.monotonic()


def micro_batches(loader, epoch: int, start_batch: int, accum: int, steps_per_epoch: int) -> Iterator[tuple]:
    """``(images, labels, sample ids, micro)`` for the batches of ``epoch`` from ``start_batch`` on; ``micro`` counts
    the epoch's batches so far (an optimizer step is complete when ``micro % accum == 0``). The epoch ends where its
    rest could not fill an accumulation."""
    micro = start_batch
    for imgs, labels in loader.epoch(epoch, start_batch):
        micro += 1
        yield imgs, labels, loader.last_ids, micro
        if micro >= steps_per_epoch * accum:
            return


def processes(world: int, strategy: str) -> str:
    """"1 process", or "8 processes (ddp)", for log lines."""
    return "1 process" if world == 1 else f"{world} processes ({strategy})"


def already_finished(run: Run, step: int) -> dict:
    """The summary of a run that ``--resume`` found at its last step: the folder's ``summary.json`` as it is (nothing
    is written), marked ``already_finished``."""
    try:
        summary = json.loads((run.out / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    logger.info("%s already finished at step %d: nothing to do", run.resume_path, step)
    return {**summary, "steps": step, "already_finished": True, "output_dir": str(run.out)}


def warn_if_no_room(run: Run, model: torch.nn.Module, copies: int = 3) -> None:
    """A warning at the start when the output folder cannot hold two checkpoints (a save writes the new one before
    the old one goes): ``copies`` times the weights (weights + AdamW's two moments)."""
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))  # DTensors too
    if run.main and (problem := room_problem(run.out, copies * weights)):
        logger.warning("--output-dir %s: %s; saving will fail there", run.out, problem)


def fault(exc: Exception, run: Run, step: int, save_alone: Callable[[], str] | None = None) -> Exception:
    """What an exception out of a training loop becomes. A collective that failed because another rank died or went
    silent, or a :class:`RunFault` (a data-loader worker that kept dying), turns into one line, after
    ``save_alone()`` kept the last whole step where it can; a full disk stays as it is (saving again would not
    help); anything else, a bug, is returned unchanged, to be raised with its traceback."""
    if isinstance(exc, NoRoom):
        return exc
    lost = run.ctx.enabled and peer_lost(exc)
    if not lost and not isinstance(exc, RunFault):
        return exc
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    what = f"lost another rank ({type(exc).__name__}: {first})" if lost else first
    try:
        kept = save_alone() if save_alone is not None else "nothing saved now; the last checkpoint stays"
    except Exception as err:  # e.g. the disk is full as well
        kept = f"could not save ({(str(err).splitlines() or [type(err).__name__])[0]})"
    out = RunFault(f"rank {run.ctx.rank} of {run.ctx.world_size}: {what}, after step {step}; {kept}")
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
