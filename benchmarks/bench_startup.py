"""Start-up time of the command line: ``fastmae --help``, ``import fastmae.cli``, and a one-step ``fastmae pretrain``
against the imports it needs (torch's import is the floor of anything that trains). Each is the best of ``--repeat``
fresh processes; wall clock.

    python benchmarks/bench_startup.py [--repeat 3]
    python benchmarks/bench_startup.py --report benchmarks/results/startup-cpu-<date>.json --readme docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import env_info, report, write_results  # noqa: E402


def best_of(cmd: list[str], repeat: int, env: dict) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - t0)
    return min(times)


def readme_table(saved: dict, json_name: str) -> str:
    env = saved["env"]
    lines = [f"{env.get('cpu', 'cpu')}, torch {env.get('torch')}, git `{str(env.get('git_sha'))[:12]}`, "
             f"{str(env.get('date', ''))[:10]}; best of fresh processes; raw JSON `benchmarks/results/{json_name}`.",
             "", "| command | seconds |", "| --- | ---: |"]  # fmt: skip
    lines += [f"| `{r['what']}` | {r['seconds']:.2f} |" for r in saved["rows"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/startup-cpu-<date>.json)")
    ap.add_argument("--report", default=None, metavar="JSON", help="only print the table of a results JSON")
    ap.add_argument("--readme", default=None,
                    help="with --report: the page to write (docs/benchmarks.md), between its startup-bench markers")
    args = ap.parse_args(argv)
    if args.report:
        table = report(args.report, readme_table, "startup-bench", args.readme)
        print(table)
        return {"table": table}
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FASTMAE_CACHE": str(Path(tmp) / "cache")}
        run = [py, "-m", "fastmae.cli", "pretrain", "--stop-after-steps", "1", "--num-workers", "0", "--no-progress",
               "--picture-every", "0", "--no-tensorboard", "--output-dir", str(Path(tmp) / "run"), "--overwrite"]
        subprocess.run(run, check=True, capture_output=True, env=env)  # the index cache, as on any later start
        rows = {
            "python": best_of([py, "-c", "pass"], args.repeat, env),
            "import torch": best_of([py, "-c", "import torch"], args.repeat, env),
            "fastmae --help": best_of([py, "-m", "fastmae.cli", "--help"], args.repeat, env),
            "import fastmae.cli": best_of([py, "-c", "import fastmae.cli"], args.repeat, env),
            "imports of a pretrain run": best_of([py, "-c", "import fastmae.cli, fastmae.train.pretrain"], args.repeat,
                                                 env),  # fmt: skip
            "fastmae pretrain, 1 step (demo)": best_of(run, args.repeat, env),
        }
    for name, seconds in rows.items():
        print(f"{name:34s} {seconds:6.2f} s")
    out = [{"name": "startup", "what": k, "seconds": v} for k, v in rows.items()]
    path = write_results("startup", out, env_info(torch.device("cpu")), args.out)
    print(f"wrote {path}")
    return {"rows": out, "path": str(path)}


if __name__ == "__main__":
    main()
