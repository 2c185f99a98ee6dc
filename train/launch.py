"""``fastmae launch [TORCHRUN OPTIONS] pretrain|finetune|linprobe [FLAGS]``: torchrun with restarts that work.

torchrun shares its rendezvous store with the workers by default, and restarted ranks then hang or fail while joining
(pytorch#135712; counted in ``benchmarks/bench_restarts.py``). The switch that turns it off is read by torchrun's
rendezvous handler, so it must be in torchrun's environment: set inside fastmae (a worker) it would come too late.
This command sets it, adds ``--standalone`` without a rendezvous option and one process per visible GPU without
``--nproc-per-node``, prints the command and replaces itself with it.
"""

from __future__ import annotations

import os
import shlex
import sys

from fastmae.errors import FastMAEError

LAUNCHABLE = ("pretrain", "finetune", "linprobe")
_RDZV = ("--standalone", "--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend", "--rdzv_backend",
         "--master-addr", "--master_addr")  # fmt: skip
SWITCH = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def launch_command(argv: list[str]) -> tuple[list[str], dict]:
    """(command, environment) that ``fastmae launch ARGV`` runs."""
    at = next((i for i, a in enumerate(argv) if a in LAUNCHABLE), None)
    if at is None:
        raise FastMAEError(f"launch: name the command to run ({', '.join(LAUNCHABLE)}) after torchrun's options, "
                           "e.g. fastmae launch --nproc-per-node 8 pretrain --data DIR")  # fmt: skip
    torchrun, command = argv[:at], argv[at:]
    given = {a.split("=", 1)[0] for a in torchrun}
    if not given & set(_RDZV):
        torchrun = ["--standalone", *torchrun]
    if not given & {"--nproc-per-node", "--nproc_per_node"}:
        import torch

        torchrun = [*torchrun, "--nproc-per-node", str(max(1, torch.cuda.device_count()))]
    env = dict(os.environ)
    if env.get(SWITCH, "1") != "1":
        print(f"fastmae launch: keeping {SWITCH}={env[SWITCH]} as set: restarts may hang", file=sys.stderr)
    env.setdefault(SWITCH, "1")
    return [sys.executable, "-m", "torch.distributed.run", *torchrun, "-m", "fastmae.cli", *command], env


def run_launch(argv: list[str], help_text: str) -> int:
    """``fastmae launch``: replaces this process with torchrun (its exit code is the command's)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text, end="")
        return 0
    cmd, env = launch_command(argv)
    shown = " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])
    print(f"fastmae launch: {SWITCH}={env[SWITCH]} {shown}", file=sys.stderr, flush=True)
    os.execve(sys.executable, cmd, env)
    return 1  # not reached
