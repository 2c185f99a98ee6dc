"""The one benchmark harness, for ``fastmae bench`` and the scripts in ``benchmarks/`` alike: what ran (the machine,
library versions, git sha), synchronised timing, results JSON rewritten after every row, tables written between a
page's markers, and errors as one line.

A results file is ``{"env": ..., "rows": [...]}`` (plus what a ``summary`` function derives from the rows), rewritten
atomically after every row: a command stopped at its time budget leaves every row it finished, and a crash never
leaves half a file. Timing synchronises with the device around every measured call; ratios are taken within one run.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastmae.errors import FastMAEError, one_line
from fastmae.files import write_json

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"  # where a checkout's benchmark scripts write by default


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO)
    except OSError:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None


def env_info(device: torch.device) -> dict:
    """What ran: the device, GPU (or "cpu") and CUDA, library versions, git sha, date, CPU details."""
    cuda = device.type == "cuda"
    return {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "dali": _version("nvidia-dali-cuda120", "nvidia-dali-cuda130"),
        "timm": _version("timm"),
        "fastmae": _version("fastmae"),
        "git_sha": git_sha(),
        "date": datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on CUDA, else ``reps`` synchronised calls after one
    untimed call."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def time_interleaved(fns: dict, device: torch.device, warmup: int = 2, reps: int = 5) -> dict[str, list[float]]:
    """Seconds per call for each fn, alternating between them so drift and noise hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def free_memory(device: torch.device) -> None:
    """What a failed or finished configuration held, given back before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def row_error(exc: BaseException) -> str:
    """What a failed row's ``error`` holds: the exception's type and the last line of its message (torch puts the
    cause last)."""
    return one_line(exc, last=True, typed=True, limit=300)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------------------------------------- results
def results_path(name: str, env: dict, out: str | os.PathLike | None = None) -> Path:
    return Path(out) if out else RESULTS / f"{name}-{env['device']}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_results(name: str, rows: list[dict], env: dict, out: str | os.PathLike | None = None) -> Path:
    """Write ``{"env": ..., "rows": [...]}`` as JSON, atomically; default path
    benchmarks/results/<name>-<device>-<date>.json."""
    return write_json(results_path(name, env, out), {"env": env, "rows": rows})


class Rows:
    """A results JSON rewritten (atomically) after every row (see the module docstring); ``summary(rows)`` adds its
    entries to the file (``fastmae bench``: the same-run speedups). ``path``: a file, or a name for
    :func:`results_path`."""

    def __init__(self, name: str, env: dict, out: str | os.PathLike | None = None,
                 summary: Callable[[list[dict]], dict] | None = None):  # fmt: skip
        self.env, self.rows, self.summary = env, [], summary
        self.path = results_path(name, env, out)
        self.write()

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.write()
        return row

    def extend(self, rows: list[dict]) -> None:
        self.rows += rows
        self.write()

    def write(self) -> Path:
        extra = self.summary(self.rows) if self.summary is not None else {}
        return write_json(self.path, {"env": self.env, "rows": self.rows, **extra})


def report(json_path: str | os.PathLike, table, marker: str, readme: str | os.PathLike | None = None) -> str:
    """``table(results, json_name)`` of a results JSON, written into ``readme`` between ``<!-- marker:start -->``
    and ``<!-- marker:end -->`` when given (README.md or a docs/ page): tables are generated, never typed."""
    from fastmae.files import update_readme

    text = table(json.loads(Path(json_path).read_text()), Path(json_path).name)
    if readme is not None:
        update_readme(Path(readme), text, marker)
    return text


def cli(main) -> int:
    """A script's ``main()`` as a command: a :class:`FastMAEError` (no CUDA device for ``--device cuda``, a bad
    value) is one line on stderr and exit code 2, not a traceback."""
    try:
        main()
    except FastMAEError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
