"""Shared benchmark harness: environment record, synchronised timing, JSON results."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from fastmae.train.bench import env_info as bench_env_info

from fastmae.errors import FastMAEError
from fastmae.files import write_json

RESULTS = Path(__file__).parent / "results"


def env_info(device: torch.device) -> dict:
    """What ran: device, GPU name, library versions, git sha, date (``fastmae.train.bench.env_info``), CPU details."""
    return {
        "device": device.type,
        **bench_env_info(device),
        "cpu": platform.processor() or platform.machine(),
        "fastmae": importlib.metadata.version("fastmae"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def results_path(name: str, env: dict, out: str | os.PathLike | None = None) -> Path:
    return Path(out) if out else RESULTS / f"{name}-{env['device']}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_results(name: str, rows: list[dict], env: dict, out: str | os.PathLike | None = None) -> Path:
    """Write ``{"env": ..., "rows": [...]}`` as JSON, atomically; default path
    benchmarks/results/<name>-<device>-<date>.json."""
    return write_json(results_path(name, env, out), {"env": env, "rows": rows})


class Rows:
    """A results JSON rewritten (atomically) after every row: a script stopped at its time budget leaves the rows it
    finished, never half a file."""

    def __init__(self, name: str, env: dict, out: str | os.PathLike | None = None):
        self.env, self.rows = env, []
        self.path = results_path(name, env, out)
        self.write()

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.write()
        return row

    def write(self) -> Path:
        return write_json(self.path, {"env": self.env, "rows": self.rows})


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
