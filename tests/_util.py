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


def losses(out) -> list[tuple[int, float]]:
    """(step, loss) of each logged step of the run in ``out`` (its metrics.jsonl)."""
    import json

    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def resumed_run_is_bit_identical(main, base: list[str], tmp_path, between=None) -> dict:
    """``fastmae pretrain BASE`` 5 steps straight, and 2 steps, stopped, resumed to 5 (``between(folder)`` runs at the
    stop): the same losses at every step, the same weights and AdamW state at the end. Returns the last checkpoint."""
    import torch

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["pretrain", *base, "--output-dir", str(straight), "--stop-after-steps", "5"]) == 0
    assert main(["pretrain", *base, "--output-dir", str(split), "--stop-after-steps", "2"]) == 0
    if between is not None:
        between(split)
    assert main(["pretrain", *base, "--output-dir", str(split), "--stop-after-steps", "5", "--resume", "auto"]) == 0
    assert losses(split) == losses(straight) and [s for s, _ in losses(split)] == [1, 2, 3, 4, 5]
    a = torch.load(straight / "checkpoint-last.pth", weights_only=True)
    b = torch.load(split / "checkpoint-last.pth", weights_only=True)
    assert a["step"] == b["step"] == 5
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])
    return a
