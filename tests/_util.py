"""Helpers shared by the test modules: small image folders and torchrun launches."""

import os
import subprocess
import sys

from fastmae.train.samples import noise_pngs  # noqa: F401 (the test modules' small image folders)


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone -m fastmae.cli ARGS`` on ``nproc`` CPU (gloo) processes; asserts
    that it exits 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastmae.cli", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    # the head holds a failing rank's own traceback, the tail torchrun's summary of which rank died and how
    assert proc.returncode == 0, proc.stderr[:3000] + "\n[...]\n" + proc.stderr[-2000:]
    return proc


# ---- tasks that fastmae's process pools run in the pool tests (importable: the workers load them by name)
SHARED_LOCK = __import__("threading").Lock()


def take_shared_lock(_=None) -> str:
    """What a worker finds: the lock free, or held (as a fork copies it when a thread of the caller holds it)."""
    if SHARED_LOCK.acquire(timeout=2):
        SHARED_LOCK.release()
        return "free"
    return "held"


def die(_source):
    """A reader whose process is killed (as the kernel's out-of-memory killer would)."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
