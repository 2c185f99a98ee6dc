"""Who this process is in a multi-process job, from its launcher's environment: torchrun's variables, or SLURM's when
``srun`` started one task per GPU without torchrun.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.
Under ``srun`` (and no ``RANK``), as facebookresearch/mae reads SLURM: rank ``SLURM_PROCID``, world size
``SLURM_NTASKS``, local rank ``SLURM_LOCALID``; the master is ``MASTER_ADDR`` when set, else the first host of
``SLURM_JOB_NODELIST``, on ``MASTER_PORT`` when set, else a port derived from ``SLURM_JOB_ID`` (the same on every
task of the job, different between jobs).
"""

from __future__ import annotations

import os
import re

SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000  # derived master ports lie in [20000, 40000)


def _slurm_task() -> bool:
    """A task started by ``srun`` (not the batch script itself, which also has SLURM_PROCID=0)."""
    step = os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID"))
    return "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and step not in (None, "batch", "extern")


def launcher() -> str:
    """``torchrun`` (or anything that sets RANK), ``slurm`` (srun tasks) or ``none``."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return "torchrun"
    return "slurm" if _slurm_task() else "none"


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank); (0, 1, 0) when no launcher started several processes."""
    kind = launcher()
    if kind == "slurm":
        env = os.environ
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _tasks_per_node() -> int:
    """SLURM_NTASKS_PER_NODE, or the first count of SLURM_TASKS_PER_NODE (``4(x2),3``)."""
    if "SLURM_NTASKS_PER_NODE" in os.environ:
        return int(os.environ["SLURM_NTASKS_PER_NODE"])
    m = re.match(r"(\d+)", os.environ.get("SLURM_TASKS_PER_NODE", ""))
    return int(m.group(1)) if m else 1


def local_world_size() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node; else 1)."""
    if launcher() == "slurm":
        return max(1, _tasks_per_node())
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask: a scheduler's cgroup or taskset, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07`` (zero padding kept)."""
    m = re.match(r"([^,\[]+)(\[([^\]]*)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_port(job_id: str) -> int:
    return SLURM_PORT_BASE + int(re.sub(r"\D", "", job_id) or 0) % SLURM_PORT_SPAN


def export_slurm_env() -> None:
    """Under srun, give torch.distributed the variables torchrun would have set (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from SLURM's; values already set are kept."""
    if launcher() != "slurm":
        return
    rank, world, local = dist_info()
    env = os.environ
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))))
    env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
                "LOCAL_WORLD_SIZE": str(local_world_size())})  # fmt: skip
