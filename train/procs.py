"""Processes that the fault tests and ``benchmarks/bench_restarts.py`` start, kill and wait for: start a command tagged
with a marker that every process it starts inherits, find those processes by marker and rank, wait with a bound, and
leave nothing behind."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

MARKER = "FASTMAE_TEST_RUN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, **kw) -> subprocess.Popen:
    """Start ``cmd`` with environment ``env`` plus a marker that every process it starts inherits (torchrun's workers
    and their DataLoader workers live in process groups of their own), so that :func:`finish` can find them all."""
    marker = env.get(MARKER) or uuid.uuid4().hex
    proc = subprocess.Popen(cmd, env={**env, MARKER: marker}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kw)  # fmt: skip
    proc.marker = marker
    return proc


def torchrun_cmd(args: list[str], nproc: int = 2, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", "--monitor-interval=0.5", "-m", "fastmae.cli", *args]  # fmt: skip


def _ppid(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def pids_with(marker: str, rank: str | None = None, workers: bool = False, key: str = "RANK") -> list[int]:
    """Python processes started with the marker (and ``key``=rank) in their environment: the ranks themselves, or
    with ``workers`` their children (DataLoader workers, which inherit the environment)."""
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
            python = "python" in open(f"/proc/{pid}/cmdline").read()
        except (OSError, ValueError):
            continue
        if python and env.get(MARKER) == marker and (rank is None or env.get(key) == rank):
            found.append(pid)
    children = []
    for pid in found:
        with contextlib.suppress(OSError):
            if _ppid(pid) in found:
                children.append(pid)
    return children if workers else [p for p in found if p not in children]


def kill_all(marker: str) -> None:
    for pid in pids_with(marker) + pids_with(marker, workers=True):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str, bool]:
    """Wait for ``proc``; on timeout kill it and everything it started. Returns (exit code, output, hung); nothing it
    started outlives this call."""
    hung = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        kill_all(proc.marker)
        out, _ = proc.communicate(timeout=30)
    finally:
        kill_all(proc.marker)
    return (None if hung else proc.returncode), out, hung


def logged_steps(out: Path) -> int:
    """The last optimizer step in a run's metrics.jsonl (0 before the first): rows with a loss, or linear probing's
    losses."""
    try:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return 0
    return max((r["step"] for r in rows if "loss" in r or "losses" in r), default=0)


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> bool:
    """Whether the run of ``proc`` logged ``step`` into ``out`` while still running, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while logged_steps(out) < step:
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
