"""Multi-process training under ``torchrun`` or SLURM's ``srun``: process group, DDP / FSDP2 wrapping, full-state
checkpoints, and what a lost peer looks like.

One process per GPU (or per CPU slot with gloo). ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
``srun`` tasks get them from SLURM's variables (:mod:`fastmae.train.job`). Without either, everything here is a
no-op and the model runs unwrapped. Joining and every collective wait at most ``--dist-timeout`` minutes: a peer that
never comes, or dies, ends the run with one line (and exit 1, so torchrun restarts it) instead of a hang.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from fastmae.config import PARALLEL
from fastmae.errors import FastMAEError, RunFault, one_line

from .job import dist_info, export_slurm_env, launcher, without_step_id

logger = logging.getLogger("fastmae.distributed")
# Messages of collectives whose peer went away (gloo, NCCL, the TCP store), for errors torch does not type.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out",
              "NCCL communicator was aborted", "NCCL error", "DistBackendError", "connection refused")  # fmt: skip


def peer_lost(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank died or stopped answering."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _PEER_LOST)


def shared_store() -> bool:
    """Whether torchrun shares its rendezvous TCPStore with the workers (its default): after a restart the new workers
    can read the old round's keys and hang or fail while joining (pytorch issue 135712, gloo and NCCL alike; measured
    in benchmarks/bench_restarts.py)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def wait_hint() -> str:
    """What to do about a wait that did not end, for the one line that reports it."""
    if shared_store():
        return ("torchrun shared its rendezvous store with the workers, which makes restarted ranks hang or fail while "
                "joining (pytorch#135712): start it with `fastmae launch ...`, or as "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...")  # fmt: skip
    if without_step_id():
        return ("SLURM_STEP_ID is not set: if this is the batch script itself, start the tasks with srun; otherwise "
                "not every task of SLURM_NTASKS started")  # fmt: skip
    return "a peer did not come or stopped answering"


class Deadline:
    """Bounds the waits fastmae starts (joining, barriers, the first collective): one daemon thread that, when an
    armed wait outlives ``seconds``, writes one line (``WHO: WHAT within --dist-timeout N min (...); HINT``, the shape
    of the line a timeout torch raises itself becomes) and ends the process with exit code 1 (torchrun or the job
    script may then start it again). torch's own timeouts do not bound everything: a gloo process group joining a
    store with a previous round's keys blocks in its constructor past any timeout (seen after torchrun restarts)."""

    def __init__(self, seconds: float, who: str):
        self.seconds, self.who = seconds, who
        self._cond = threading.Condition()
        self._what: str | None = None
        self._until = 0.0
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def __call__(self, what: str):
        """Arm for ``what``, the failure in words ("could not join ...", "the other ranks did not reach a barrier")."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="fastmae-deadline", daemon=True)
                self._thread.start()
            outer = (self._what, self._until)
            self._what, self._until = what, time.monotonic() + self.seconds
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._what, self._until = outer if outer[0] is not None else (None, 0.0)
                self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._what is None:
                    self._cond.wait()
                    continue
                left = self._until - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                line = (f"fastmae: error: {self.who}: {self._what} within --dist-timeout {self.seconds / 60:g} min "
                        f"(the wait did not end); {wait_hint()}\n")  # fmt: skip
                os.write(2, line.encode())
                os._exit(1)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none (one process) | ddp | fsdp
    deadline: Deadline | None = field(default=None, repr=False)

    def bounded(self, what: str):
        """A context in which a wait that outlives --dist-timeout ends the process with one line (see Deadline)."""
        return self.deadline(what) if self.deadline is not None else contextlib.nullcontext()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            with self.bounded("the other ranks did not reach a barrier"):
                dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (no host sync on CUDA: the collective is queued on the stream)."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any (a host sync: call it on logging steps only)."""
        if not self.enabled:
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def agree_stop(self, received: bool, log_now: bool, device: torch.device) -> tuple[bool, bool]:
        """(stop now, log this step). One process stops at the step a signal arrived (and logs it); under torchrun
        the ranks agree on logging steps only (a host sync), so that all of them leave the loop at the same step."""
        if not self.enabled:
            return received, log_now or received
        return (self.any(received, device) if log_now else False), log_now

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a copy; the input is left alone)."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``x`` [n_rank, ...] concatenated in rank order, on every rank. Row counts may differ
        between ranks (they are exchanged first: a host sync)."""
        if not self.enabled:
            return x
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        sizes = [int(v) for v in sizes]
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    def gather_objects(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        with self.bounded("the other ranks did not send their state"):
            dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _warn_shared_store(rank: int) -> None:
    """A warning at the start of a job that torchrun may restart with its rendezvous store shared (see
    :func:`shared_store`)."""
    if rank == 0 and shared_store() and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        logger.warning("torchrun shares its rendezvous store with the workers: a restart can hang or fail while "
                       "joining (pytorch#135712); start it with `fastmae launch ...` or as "
                       "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ... (--dist-timeout bounds the wait)"
                       )  # fmt: skip


def init_distributed(strategy: str, device: torch.device,
                     timeout_min: float = 10.0) -> tuple[DistContext, torch.device]:  # fmt: skip
    """Join the job's process group (nccl on CUDA, gloo on CPU; torchrun's or srun's variables) and pick this
    process's device (cuda:LOCAL_RANK). Joining and collectives wait at most ``timeout_min`` minutes."""
    export_slurm_env()
    rank, world, local = dist_info()
    if world <= 1:
        return DistContext(), device
    if strategy not in PARALLEL:
        raise FastMAEError(f"--parallel must be one of {', '.join(PARALLEL)}, got {strategy!r}")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise FastMAEError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    who = f"rank {rank} of {world} ({launcher()})"
    deadline = Deadline(60.0 * timeout_min, who)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        _warn_shared_store(rank)
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        try:
            with deadline(f"could not join the {backend} process group at {where}"):
                dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min),
                                        device_id=device if device.type == "cuda" else None)  # fmt: skip
        except (ValueError, RuntimeError, dist.DistError, TimeoutError) as exc:
            first = one_line(exc)
            if "MASTER_ADDR" in str(exc) or "MASTER_PORT" in str(exc) or "environment variable" in str(exc):
                raise FastMAEError(f"WORLD_SIZE={world}: could not join the {backend} process group ({first}); "
                                   "launch with torchrun or srun, which set RANK, MASTER_ADDR and MASTER_PORT"
                                   ) from exc  # fmt: skip
            raise RunFault(f"{who}: could not join the {backend} process group at {where} within --dist-timeout "
                           f"{timeout_min:g} min ({first}); {wait_hint()}") from exc  # fmt: skip
    if dist.get_world_size() != world:
        raise FastMAEError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} processes")
    if rank != 0:  # one voice: the other ranks only report problems
        logging.getLogger("fastmae").setLevel(logging.WARNING)
    return DistContext(rank, world, local, strategy, deadline), device


def wrap_model(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """The module the step calls: the model itself, ``DistributedDataParallel`` around it, or the model made FSDP2
    (``fully_shard`` on every transformer block, then the root; parameters become sharded DTensors)."""
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # In mask_token mode the decoder's mask_token receives no gradient, so DDP must look for unused parameters.
        unused = getattr(model, "encoder_mode", "visible") == "mask_token"
        with ctx.bounded("the first collective (DDP's weight broadcast) did not end"):
            return DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
            )
    if ctx.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with ctx.bounded("the first collective (FSDP's device mesh) did not end"):
            mesh = init_device_mesh(device.type, (ctx.world_size,))
        for block in [*model.blocks, *model.decoder_blocks]:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def gradient_sync(step_module: torch.nn.Module, model: torch.nn.Module, ctx: DistContext):
    """The switch of the gradient all-reduce for the next forward + backward (on for the last micro-batch of an
    accumulation, off for the others), or None in one process: accumulation and none share one path, as nanoGPT sets
    ``require_backward_grad_sync``. DDP reads the flag in its forward (also under torch.compile, whose wrapper holds the
    DDP module); FSDP2 has its own setter."""
    if ctx.strategy == "ddp":
        ddp = getattr(step_module, "_orig_mod", step_module)
        return lambda on: setattr(ddp, "require_backward_grad_sync", on)
    if ctx.strategy == "fsdp":
        return model.set_requires_gradient_sync
    return None


def _fqn_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> tuple[dict, dict]:
    """(model state, optimizer state) of the whole model in the one-process format, whatever the strategy: under
    FSDP every rank must call this (it gathers the shards); the result is complete on rank 0."""
    if ctx.strategy != "fsdp":
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not ctx.is_main:
        return msd, osd
    # FQN-keyed -> index-keyed (the order of the optimizer's param groups), so any strategy can resume it.
    order = _fqn_order(model, optimizer)
    index = {name: i for i, name in enumerate(order)}
    groups, start = [], 0
    for group in osd["param_groups"]:
        n = len(group["params"])
        groups.append({**group, "params": list(range(start, start + n))})
        start += n
    return msd, {"state": {index[k]: v for k, v in osd["state"].items()}, "param_groups": groups}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, msd: dict, osd: dict | None,
                    ctx: DistContext) -> None:  # fmt: skip
    """Load a one-process-format state (every rank read the same file) into the model and optimizer."""
    if ctx.strategy != "fsdp":
        model.load_state_dict(msd, strict=True)
        if optimizer is not None and osd is not None:
            optimizer.load_state_dict(osd)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, msd, options=opts)
    if optimizer is not None and osd is not None:
        order = _fqn_order(model, optimizer)
        groups, start = [], 0
        for group in osd["param_groups"]:
            n = len(group["params"])
            groups.append({**group, "params": order[start : start + n]})
            start += n
        fqn_osd = {"state": {order[int(i)]: v for i, v in osd["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(model, optimizer, fqn_osd, options=opts)


def params_in_sync(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> bool:
    """Whether every rank holds the same weights (DDP): a float64 fingerprint per rank, compared across ranks; an
    error is logged when they differ."""
    if ctx.strategy != "ddp":
        return True  # one process, or FSDP where each rank holds a different shard by design
    with torch.no_grad():
        fp = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).to(device)
    fps = [torch.zeros_like(fp) for _ in range(ctx.world_size)]
    dist.all_gather(fps, fp)
    same = all(torch.equal(f, fps[0]) for f in fps)
    if not same and ctx.is_main:
        logger.error("the ranks' weights differ at the end of the run: they lost synchronisation")
    return same
