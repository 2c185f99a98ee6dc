"""torchrun restarts after a killed rank, counted: how often the restarted ranks finish, with torchrun's default
(its rendezvous TCPStore shared with the workers) and with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's
environment (the README's launch form).

Each trial: ``torchrun --standalone --nproc_per_node=2 --max-restarts=1 -m fastmae.cli pretrain ... --resume auto``
(gloo on CPU, 96 steps, a checkpoint every 8), rank 1 SIGKILLed after step 20, then up to ``--wait`` seconds for the
job to end. Outcomes: ``finished`` (exit 0), ``failed`` (a non-zero exit), ``hung`` (no exit in time; every process
is killed). Trials of the two settings alternate.

    python benchmarks/bench_restarts.py [--trials 5] [--wait 120]
    python benchmarks/bench_restarts.py --report benchmarks/results/restarts-cpu-<date>.json --readme README.md
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _harness import env_info, report, write_results  # noqa: E402

from tests._procs import finish, logged_steps, pids_with, start, torchrun_cmd, wait_for_step  # noqa: E402
from tests._util import noise_pngs  # noqa: E402

RUN = ["--model", "mae_vit_mini_patch4", "--img-size", "32", "--batch-size", "2", "--epochs", "24",
       "--warmup-epochs", "1", "--no-progress", "--log-every", "1", "--save-every", "8", "--picture-every", "0",
       "--num-reconstructions", "2", "--precision", "fp32", "--no-tensorboard", "--num-workers", "0",
       "--dist-timeout", "10"]  # fmt: skip


def trial(images: Path, out: Path, shared: bool, wait: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0" if shared else "1"}
    proc = start(torchrun_cmd(["pretrain", *RUN, "--data", str(images), "--output-dir", str(out), "--resume", "auto"],
                              restarts=1), env)  # fmt: skip
    wait_for_step(proc, out, 20)
    victims = pids_with(proc.marker, rank="1")
    if proc.poll() is not None or not victims:
        finish(proc, 5)
        return {"outcome": "no kill (the run ended or did not start)"}
    os.kill(victims[0], signal.SIGKILL)
    t0 = time.monotonic()
    code, log, hung = finish(proc, wait)
    outcome = "hung" if hung else "finished" if code == 0 else "failed"
    return {"outcome": outcome, "exit_code": code, "seconds_after_kill": time.monotonic() - t0,
            "steps": logged_steps(out), "tail": log[-600:] if outcome != "finished" else ""}  # fmt: skip


def readme_table(saved: dict, json_name: str) -> str:
    env, rows = saved["env"], saved["rows"]
    lines = [f"torch {env.get('torch')}, git `{str(env.get('git_sha'))[:12]}`, {str(env.get('date', ''))[:10]}; raw "
             f"JSON `benchmarks/results/{json_name}`.", "",
             "| torchrun's environment | trials | finished | hung | failed (non-zero exit) |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for shared, label in ((True, "default (store shared with the workers)"),
                          (False, "`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`")):  # fmt: skip
        got = [r["outcome"] for r in rows if r["shared_store"] == shared]
        lines.append(f"| {label} | {len(got)} | {got.count('finished')} | {got.count('hung')} | "
                     f"{got.count('failed')} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5, help="trials per setting")
    ap.add_argument("--wait", type=float, default=120, help="seconds after the kill before a job counts as hung")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/restarts-cpu-<date>.json)")
    ap.add_argument("--report", default=None, metavar="JSON", help="only print the table of a results JSON")
    ap.add_argument("--readme", default=None, help="with --report: write it between the restarts-bench markers")
    args = ap.parse_args(argv)
    if args.report:
        table = report(args.report, readme_table, "restarts-bench", args.readme)
        print(table)
        return {"table": table}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = noise_pngs(Path(tmp) / "imgs", 16, seed=5)
        for k in range(args.trials):
            for shared in (True, False):
                got = trial(images, Path(tmp) / f"run-{k}-{int(shared)}", shared, args.wait)
                rows.append({"name": "restart", "trial": k, "shared_store": shared, **got})
                print(f"trial {k} {'shared store   ' if shared else 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1'}: "
                      f"{got['outcome']}", flush=True)  # fmt: skip
    for shared in (True, False):
        done = [r["outcome"] for r in rows if r["shared_store"] == shared]
        print(f"{'shared store' if shared else 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1'}: "
              f"{done.count('finished')} of {len(done)} finished, {done.count('hung')} hung")  # fmt: skip
    path = write_results("restarts", rows, env_info(torch.device("cpu")), args.out)
    print(f"wrote {path}")
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    main()
