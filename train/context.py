"""The run context: the run spec (every "can this run here?" decision, made once, before any data is indexed), the
process group and the output folder.

:func:`start_run` validates the configuration, chooses the batch per process and the accumulation (a recipe's
effective batch kept at this many processes, on this GPU: :func:`~fastmae.train.spec.plan_batch`), decides the
:class:`~fastmae.train.spec.RunSpec` (device ``cuda:LOCAL_RANK``, precision and its one autocast, compile variant,
CUDA graphs, loader, attention, kernels; every problem in one line), checks the output folder and the checkpoints to
start from, then joins the process group and takes the folder's lock. The :class:`RunContext` it returns is what
every later part asks (recipes, trainer, checkpointer, loaders), so that none decides again.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

import fastmae
from fastmae.files import check_checkpoint_file
from fastmae.interop import check_pretrained

from .checkpointer import resolve_resume
from .data import make_loader
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
)
from .spec import Asked, RunSpec, decide, plan_batch, resolve_device  # noqa: F401 (benchmarks import resolve_device)

logger = logging.getLogger("fastmae.context")


@dataclass
class RunContext(RunSpec):
    """A run's spec with its process group and output folder (see the module docstring). A context manager: it leaves
    the process group and lets go of the folder at the end, also on errors."""

    dist: DistContext = field(default_factory=DistContext)
    out: Path | None = None
    resume_path: Path | None = None
    lock: int | None = field(default=None, repr=False)  # rank 0's descriptor of out/.fastmae.lock
    made: Path | None = field(default=None, repr=False)  # the outermost folder rank 0 created for out (or None)

    @classmethod
    def of(cls, spec: RunSpec, **kw) -> RunContext:
        return cls(**{f.name: getattr(spec, f.name) for f in fields(RunSpec)}, **kw)

    @property
    def main(self) -> bool:
        return self.dist.is_main

    def loader_for(self, index, pipeline: str, cfg, bands=None):
        """The run's loader (chosen at the start) over ``index`` for this rank, as ``pipeline`` (pretrain, finetune,
        linprobe, eval) reads it, with the run's ``bands`` (a :class:`~fastmae.train.data.DataBands`, or None for
        8-bit RGB with ImageNet's statistics); under ``--loader auto`` a GPU route has the torchvision loader behind
        it."""
        bands = bands.for_loader() if bands is not None else None
        return make_loader(self.loader, index, pipeline, cfg, self.device, self.dist.rank, self.dist.world_size,
                           fallback=cfg.loader == "auto", bands=bands)  # fmt: skip

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


def start_run(cfg, command: str) -> RunContext:
    """Validate ``cfg`` (a config of ``command``: pretrain, finetune or linprobe), decide its run spec and check its
    files, then join torchrun's process group (when there is one) and lock the output folder. Everything here is
    quick: a flag that cannot run here, or a wrong ``--resume``, fails before a data set is indexed."""
    cfg.validate()
    export_slurm_env()  # SLURM tasks that cannot form one run stop here, each with one line, before any file exists
    rank, world, _ = dist_info()
    batch_choice = plan_batch(cfg, command, world)  # a recipe batch kept at this many processes, on this GPU
    spec = dataclasses.replace(decide(Asked.of(cfg, command, world)), batch_choice=batch_choice)
    out = check_output_dir(cfg.output_dir)
    check_fresh_start(out, cfg.resume, cfg.overwrite)
    resume_path = resolve_resume(cfg.resume, out)
    if resume_path is not None:
        check_checkpoint_file(resume_path, "--resume")
    if cfg.pretrained is not None:
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
        dist, device = init_distributed(cfg.get("parallel", "ddp"), spec.device, cfg.dist_timeout)
        ctx = RunContext.of(spec, dist=dist, out=out, resume_path=resume_path, lock=lock, made=made)
        ctx.device = device
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
