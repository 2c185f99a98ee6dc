"""The run context: every "can this run here?" decision, made once, before any data is indexed.

:func:`start_run` validates the configuration, picks the device (``cuda:LOCAL_RANK``), the precision and its one
autocast, the compile variant, the loader and whether the step is one CUDA graph; checks the output folder and the
checkpoints to start from; then joins the process group and takes the folder's lock. What cannot run here is one line
naming every reason at once, before a data set is indexed or a file written. The :class:`RunContext` it returns is
what every later part asks (recipes, trainer, checkpointer, loaders, the benchmark), so that none decides again.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import fastmae
from fastmae.compiling import DEFAULT_VARIANT, compile_model
from fastmae.errors import FastMAEError
from fastmae.files import check_checkpoint_file
from fastmae.interop import check_pretrained

from .checkpointer import resolve_resume
from .data import loader_problem, make_loader
from .distributed import DistContext, init_distributed
from .job import dist_info, export_slurm_env
from .output import (
    check_fresh_start,
    check_output_dir,
    lock_output_dir,
    missing_folder,
    move_run_aside,
    release_output_dir,
    run_files,
    tensorboard_problem,
)
from .step import graphs_unsupported

logger = logging.getLogger("fastmae.context")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` is CUDA when available, else CPU; an explicit ``cuda``/``cuda:N`` without a GPU is a one-line error.
    ``cuda`` is this process's GPU: ``cuda:LOCAL_RANK`` in a multi-process job (so that every check before joining,
    the decode probe among them, runs on it, not on GPU 0), ``cuda:0``-or-current in one process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise FastMAEError(f"--device {name} was requested but no CUDA device is available")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        local = dist_info()[2] if local_rank is None else local_rank
        device = torch.device("cuda", local if local < torch.cuda.device_count() else torch.cuda.current_device())
    return device


@dataclass
class RunContext:
    """Where and how a run runs (see the module docstring). A context manager: it leaves the process group and lets go
    of the folder at the end, also on errors."""

    dist: DistContext
    device: torch.device
    precision: str = "fp32"  # bf16 | fp16 | fp32
    compile: str = "off"  # off | full | regional
    compile_mode: str = "default"
    loader: str = "torchvision"
    graphs: bool = False  # the whole step as one CUDA graph
    out: Path | None = None
    resume_path: Path | None = None
    lock: int | None = field(default=None, repr=False)  # rank 0's descriptor of out/.fastmae.lock
    made: Path | None = field(default=None, repr=False)  # the outermost folder rank 0 created for out (or None)

    @classmethod
    def local(cls, device: torch.device, precision: str = "auto", compile: str = "off",
              compile_mode: str = "default", graphs: bool = False) -> RunContext:  # fmt: skip
        """One process, no output folder: what ``fastmae bench`` measures the step in."""
        precision = ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision
        return cls(DistContext(), device, precision, compile, compile_mode, graphs=graphs)

    @property
    def main(self) -> bool:
        return self.dist.is_main

    @property
    def act_dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    def autocast(self):
        """The one autocast of the run (bf16 / fp16; a no-op in fp32), the same for the step, evaluation and
        pictures. Its weight-cast cache is off: inside a CUDA graph cached casts would be graph memory freed after
        capture, and dynamo guards on the setting (``autocast_cache_enabled``), so code run under two settings
        would compile twice (at a graph's capture, where compiling is refused). Off costs nothing here: each weight is
        cast once per forward."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.act_dtype, cache_enabled=False)

    def loader_for(self, index, kind: str, cfg):
        """The run's loader (chosen at the start) over ``index`` for this rank, as ``kind`` (pretrain, finetune,
        linprobe, eval) reads it; under ``--loader auto`` a GPU route has the torchvision loader behind it."""
        return make_loader(self.loader, index, kind, cfg, self.device, self.dist.rank, self.dist.world_size,
                           fallback=cfg.loader == "auto")  # fmt: skip

    def compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the step calls: ``module`` compiled as ``--compile`` says (:func:`fastmae.compiling.compile_model`)."""
        return compile_model(module, self.compile, self.compile_mode)

    def info(self) -> dict:
        """Where and how the run ran, for ``config.json`` and ``summary.json``."""
        return {"device": self.device.type, "precision": self.precision, "compile": self.compile,
                "cuda_graphs": self.graphs, "loader": self.loader, "world_size": self.dist.world_size,
                "parallel": self.dist.strategy}  # fmt: skip

    def close(self, clean: bool = False) -> None:
        if clean and self.dist.enabled:
            # Leave together: a rank that tears down its gloo pairs while a peer is still finishing its last
            # collective can make that peer abort (a SIGABRT of rank 1 was seen once in the 2-process tests). Best
            # effort: the run's work is done, and a peer that ended with an error of its own must not make this one's
            # clean end a failure.
            try:
                self.dist.barrier()
            except Exception as exc:  # noqa: BLE001
                logger.debug("leaving the process group without the other ranks: %s", exc)
        self.dist.close()  # leave torchrun's process group
        if self.lock is not None or self.made is not None:
            release_output_dir(self.out, self.lock, self.made)  # lets go of the folder (gone if nothing was written)
            self.lock = self.made = None

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(clean=exc_type is None)


def _problems(cfg, command: str, device: torch.device, precision: str, variant: str, loader_reason: str | None,
              world: int) -> list[str]:  # fmt: skip
    """Every reason this configuration cannot run here (empty: it can)."""
    strategy = getattr(cfg, "parallel", "ddp") if world > 1 else "none"
    problems = [loader_reason] if loader_reason else []
    if precision == "fp16" and strategy == "fsdp":
        problems.append("--precision fp16 is not supported with --parallel fsdp; use bf16")
    if variant == "regional" and strategy == "fsdp":
        problems.append("--compile regional with --parallel fsdp: FSDP2 shards the very blocks it compiles; use "
                        "--compile full")  # fmt: skip
    if getattr(cfg, "cuda_graphs", False) and (why := graphs_unsupported(device, world, cfg.accum_iter, precision,
                                                                          strategy)):  # fmt: skip
        problems.append(f"--cuda-graphs cannot run here: {'; '.join(why)}")
    if problem := tensorboard_problem(cfg.tensorboard):
        problems.append(problem)
    return problems


def start_run(cfg, command: str) -> RunContext:
    """Validate ``cfg`` (a config of ``command``: pretrain, finetune or linprobe), make every choice of the run and
    check its files, then join torchrun's process group (when there is one) and lock the output folder. Everything
    here is quick: a wrong ``--resume`` fails before a data set is indexed."""
    cfg.validate()
    export_slurm_env()  # SLURM tasks that cannot form one run stop here, each with one line, before any file exists
    rank, world, _ = dist_info()
    device = resolve_device(cfg.device)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    variant = cfg.compile if cfg.compile is not None else (DEFAULT_VARIANT if device.type == "cuda" else "off")
    loader, loader_reason = loader_problem(cfg.loader, device, command)
    if problems := _problems(cfg, command, device, precision, variant, loader_reason, world):
        raise FastMAEError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: {'; '.join(problems)}")
    out = check_output_dir(cfg.output_dir)
    check_fresh_start(out, cfg.resume, cfg.overwrite)
    resume_path = resolve_resume(cfg.resume, out)
    if resume_path is not None:
        check_checkpoint_file(resume_path, "--resume")
    if getattr(cfg, "pretrained", None) is not None:
        check_pretrained(cfg.pretrained, "--pretrained")
    # One writer per folder: rank 0 locks it, then checks it again (another run may have written it meanwhile).
    made = missing_folder(out) if rank == 0 else None
    lock = lock_output_dir(out) if rank == 0 else None
    try:
        if lock is not None:
            check_fresh_start(out, cfg.resume, cfg.overwrite)
        # --overwrite, or --resume auto with nothing to resume (a run that died before its first checkpoint): the old
        # files go aside, so that the new run's metrics and pictures are its own. Decided before any rank moves one.
        aside = cfg.overwrite or (cfg.resume == "auto" and resume_path is None and bool(run_files(out)))
        dist, device = init_distributed(getattr(cfg, "parallel", "ddp"), device, cfg.dist_timeout)
        ctx = RunContext(dist, device, precision, variant, cfg.compile_mode, loader, bool(getattr(cfg, "cuda_graphs",
                         False)), out, resume_path, lock, made)  # fmt: skip
    except BaseException:
        if rank == 0:
            release_output_dir(out, lock, made)
        raise
    try:
        if aside:
            if ctx.main:
                move_run_aside(out)
            dist.barrier()
    except BaseException:
        ctx.close()
        raise
    return ctx


# ------------------------------------------------------------------------------------------------------- seeding
def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def versions() -> dict:
    return {"fastmae": fastmae.__version__, "torch": torch.__version__}


def processes(world: int, strategy: str) -> str:
    """"1 process", or "8 processes (ddp)", for log lines."""
    return "1 process" if world == 1 else f"{world} processes ({strategy})"
