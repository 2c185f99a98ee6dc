"""Who this process is in a multi-process job, from its launcher's environment: torchrun's variables, or SLURM's when
``srun`` (or anything that sets SLURM's task variables) started one task per GPU without torchrun.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.
Under SLURM (and no ``RANK``), as facebookresearch/mae reads it: rank ``SLURM_PROCID``, world size ``SLURM_NTASKS``,
local rank ``SLURM_LOCALID``; the master is ``MASTER_ADDR`` when set, else the first host of the node list
(``SLURM_STEP_NODELIST``, ``SLURM_JOB_NODELIST`` or ``SLURM_NODELIST``, expanded here in Python: no ``scontrol``
needed), on ``MASTER_PORT`` when set, else a port derived from ``SLURM_JOB_ID`` (the same on every task of the job,
different between jobs). A task without ``SLURM_STEP_ID`` (a hand-made environment, an MPI launcher) is still a task
when ``SLURM_NTASKS`` > 1: two such processes form one run, never two runs into one folder. What cannot be read
(a rank outside the job, an unreadable node list, several nodes and no node list) is one line in every task.
"""

from __future__ import annotations

import itertools
import os
import re

from fastmae.errors import FastMAEError

SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000  # derived master ports lie in [20000, 40000)
NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")  # the step's own first


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise FastMAEError(f"{name}={value!r} is not a whole number") from None


def _slurm_step() -> str | None:
    return os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID"))


def _slurm_task() -> bool:
    """A task of a SLURM job step: SLURM_PROCID and SLURM_NTASKS set, and not the batch script itself (step
    ``batch``/``extern``, or no step and one task, which is also what the batch script of a one-task job sees)."""
    env = os.environ
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return False
    step = _slurm_step()
    if step in ("batch", "extern"):
        return False
    return step is not None or _int_env("SLURM_NTASKS") > 1


_EXPORTED: dict[str, bool] = {}  # set by export_slurm_env: this process's launch was SLURM's (and without a step id)


def launcher() -> str:
    """``torchrun`` (or anything that sets RANK), ``slurm`` (srun tasks, also after :func:`export_slurm_env` set
    RANK from their variables) or ``none``."""
    if _EXPORTED:
        return "slurm"
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return "torchrun"
    return "slurm" if _slurm_task() else "none"


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank); (0, 1, 0) when no launcher started several processes. A SLURM task whose
    variables do not describe one place in the job is a one-line error."""
    if launcher() == "slurm":
        rank, world = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS")
        if not 0 <= rank < world:
            raise FastMAEError(f"SLURM_PROCID={rank} is not a task of SLURM_NTASKS={world}")
        return rank, world, _slurm_local_rank(rank)
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _slurm_local_rank(rank: int) -> int:
    """SLURM_LOCALID, or on one node the rank itself; several nodes without it is a one-line error."""
    if "SLURM_LOCALID" in os.environ:
        return _int_env("SLURM_LOCALID")
    if _nodes() == 1:
        return rank
    raise FastMAEError(f"SLURM_LOCALID is not set and the job has {_nodes()} nodes: cannot tell which GPU task "
                       f"{rank} uses; start the tasks with srun")  # fmt: skip


def _nodes() -> int:
    """SLURM_NNODES (or SLURM_JOB_NUM_NODES), else the length of the node list, else 1."""
    for name in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if name in os.environ:
            return _int_env(name)
    nodelist = _nodelist()
    return len(expand_nodelist(nodelist[1])) if nodelist else 1


def _nodelist() -> tuple[str, str] | None:
    """(variable, value) of the first node list set."""
    return next(((name, os.environ[name]) for name in NODELISTS if os.environ.get(name)), None)


def _tasks_per_node() -> int:
    """SLURM_NTASKS_PER_NODE, or the first count of SLURM_TASKS_PER_NODE (``4(x2),3``)."""
    if "SLURM_NTASKS_PER_NODE" in os.environ:
        return int(os.environ["SLURM_NTASKS_PER_NODE"])
    m = re.match(r"(\d+)", os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_TASKS_PER_NODE", "")))
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


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise ValueError("unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError("unbalanced brackets")
    parts.append("".join(cur))
    return parts


def _expand_range(spec: str) -> list[str]:
    """``01-04,07`` -> 01 02 03 04 07 (the zero padding of the lower bound kept)."""
    out = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{item!r} is not a number or a range")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"range {item!r} runs backwards")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host of a SLURM node list, in order, as ``scontrol show hostnames`` prints them: ``localhost``;
    ``node[01-04,07]`` -> node01..node04, node07; ``a,b``; ``rack[1-2]-gpu[1,3]`` (brackets anywhere, several).
    An unreadable list raises ``ValueError`` naming it."""
    hosts = []
    try:
        for part in _split_top(nodelist.strip()):
            if not part:
                raise ValueError("an empty host name")
            pieces = re.split(r"\[([^\]]*)\]", part)  # text, range, text, range, ..., text
            if any("[" in p or "]" in p for p in pieces[::2]):
                raise ValueError("unbalanced brackets")
            choices = [[p] if i % 2 == 0 else _expand_range(p) for i, p in enumerate(pieces)]
            hosts += ["".join(combo) for combo in itertools.product(*choices)]
    except ValueError as exc:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}: {exc}") from None
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07`` (zero padding kept)."""
    return expand_nodelist(nodelist)[0]


def slurm_port(job_id: str) -> int:
    return SLURM_PORT_BASE + int(re.sub(r"\D", "", job_id) or 0) % SLURM_PORT_SPAN


def _slurm_master() -> str:
    """MASTER_ADDR for SLURM tasks: the first host of the node list; on one node without a list, this machine."""
    found = _nodelist()
    if found is None:
        if _nodes() > 1:
            raise FastMAEError(f"the job has {_nodes()} nodes but none of {', '.join(NODELISTS)} is set: cannot "
                               "tell which host leads; set MASTER_ADDR (and MASTER_PORT) in every task")  # fmt: skip
        return "localhost"
    name, value = found
    try:
        return first_host(value)
    except ValueError as exc:
        raise FastMAEError(f"{name}: {exc}; set MASTER_ADDR in every task") from None


def export_slurm_env() -> None:
    """Under SLURM, give torch.distributed the variables torchrun would have set (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) from SLURM's; values already set are kept."""
    if launcher() != "slurm":
        return
    rank, world, local = dist_info()
    without_step = _slurm_step() is None
    env = os.environ
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _slurm_master()
    if "MASTER_PORT" not in env:
        if "SLURM_JOB_ID" not in env:
            raise FastMAEError("SLURM_JOB_ID is not set: the tasks cannot agree on a port; set MASTER_PORT in every "
                               "task")  # fmt: skip
        env["MASTER_PORT"] = str(slurm_port(env["SLURM_JOB_ID"]))
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
                "LOCAL_WORLD_SIZE": str(local_world_size())})  # fmt: skip
    _EXPORTED["without_step_id"] = without_step


def without_step_id() -> bool:
    """A SLURM task with no SLURM_STEP_ID (not started by srun): worth a word when its peers never come."""
    return _EXPORTED.get("without_step_id", launcher() == "slurm" and _slurm_step() is None)
