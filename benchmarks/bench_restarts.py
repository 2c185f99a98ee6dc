"""torchrun restarts after a killed rank, counted: how often the restarted ranks finish, and how long a failure takes
to end, in three launch forms: torchrun's default (its rendezvous TCPStore shared with the workers),
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...``, and ``fastmae launch ...`` (which sets that variable).

Each trial: ``--standalone``, 2 processes, ``--max-restarts=1``, ``fastmae pretrain ... --resume auto
--dist-timeout 0.25`` (gloo on CPU, 96 steps, a checkpoint every 8), rank 1 SIGKILLed after step 20, then up to
``--wait`` seconds for the job to end. Outcomes: ``finished`` (exit 0), ``failed`` (a non-zero exit; the row says
after how many seconds and whether fastmae's last line named the variable), ``hung`` (no exit in time; every
process is killed). Trials of the settings alternate.

    python benchmarks/bench_restarts.py [--trials 5] [--wait 120]
    python benchmarks/bench_restarts.py --report benchmarks/results/restarts-cpu-<date>.json --readme docs/long-runs.md
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
from _harness import env_info, report, write_results  # noqa: E402
from fastmae.train.procs import finish, logged_steps, pids_with, start, torchrun_cmd, wait_for_step  # noqa: E402
from fastmae.train.samples import noise_pngs  # noqa: E402

RUN = ["--model", "mae_vit_mini_patch4", "--img-size", "32", "--batch-size", "2", "--epochs", "24",
       "--warmup-epochs", "1", "--no-progress", "--log-every", "1", "--save-every", "8", "--picture-every", "0",
       "--num-reconstructions", "2", "--precision", "fp32", "--no-tensorboard", "--num-workers", "0",
       "--dist-timeout", "0.25"]  # fmt: skip
SETTINGS = {"shared": "torchrun, default (store shared with the workers)",
            "disabled": "`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun`", "launch": "`fastmae launch`"}  # fmt: skip
VARIABLE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def command(setting: str, args: list[str]) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    env["OMP_NUM_THREADS"] = "1"
    if setting == "launch":
        return [sys.executable, "-m", "fastmae.cli", "launch", "--nproc-per-node", "2", "--max-restarts=1",
                "--monitor-interval=0.5", *args], env  # fmt: skip
    env[VARIABLE] = "0" if setting == "shared" else "1"
    return torchrun_cmd(args, restarts=1), env


def trial(images: Path, out: Path, setting: str, wait: float) -> dict:
    cmd, env = command(setting, ["pretrain", *RUN, "--data", str(images), "--output-dir", str(out), "--resume",
                                 "auto"])  # fmt: skip
    proc = start(cmd, env)
    wait_for_step(proc, out, 20)
    victims = pids_with(proc.marker, rank="1")
    if proc.poll() is not None or not victims:
        finish(proc, 5)
        return {"outcome": "no kill (the run ended or did not start)"}
    os.kill(victims[0], signal.SIGKILL)
    t0 = time.monotonic()
    code, log, hung = finish(proc, wait)
    outcome = "hung" if hung else "finished" if code == 0 else "failed"
    errors = [line for line in log.split("lost another rank", 1)[-1].splitlines() if line.startswith("fastmae: error")]
    return {"outcome": outcome, "exit_code": code, "seconds_after_kill": time.monotonic() - t0,
            "steps": logged_steps(out), "names_the_variable": bool(errors) and all(VARIABLE in e for e in errors),
            "tail": log[-600:] if outcome != "finished" else ""}  # fmt: skip


def _setting(row: dict) -> str:
    """The launch form of a row (rows before ``setting`` existed say ``shared_store``)."""
    return row.get("setting") or ("shared" if row["shared_store"] else "disabled")


def readme_table(saved: dict, json_name: str) -> str:
    env, rows = saved["env"], saved["rows"]
    lines = [f"torch {env.get('torch')}, git `{str(env.get('git_sha'))[:12]}`, {str(env.get('date', ''))[:10]}; raw "
             f"JSON `benchmarks/results/{json_name}`.", "",
             "| launch form | trials | finished | failed (non-zero exit) | slowest failure, s after the kill | "
             "failures naming the variable | hung |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for setting, label in SETTINGS.items():
        got = [r for r in rows if _setting(r) == setting]
        if not got:
            continue
        failed = [r for r in got if r["outcome"] == "failed"]
        slowest = max((r.get("seconds_after_kill", 0) for r in failed), default=None)
        named = sum(bool(r.get("names_the_variable")) for r in failed)
        outcomes = [r["outcome"] for r in got]
        lines.append(f"| {label} | {len(got)} | {outcomes.count('finished')} | {len(failed)} | "
                     f"{'-' if slowest is None else f'{slowest:.0f}'} | {named} of {len(failed)} | "
                     f"{outcomes.count('hung')} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5, help="trials per setting")
    ap.add_argument("--wait", type=float, default=120, help="seconds after the kill before a job counts as hung")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/restarts-cpu-<date>.json)")
    ap.add_argument("--report", default=None, metavar="JSON", help="only print the table of a results JSON")
    ap.add_argument("--readme", default=None,
                    help="with --report: the page to write (docs/long-runs.md), between its restarts-bench markers")
    args = ap.parse_args(argv)
    if args.report:
        table = report(args.report, readme_table, "restarts-bench", args.readme)
        print(table)
        return {"table": table}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = noise_pngs(Path(tmp) / "imgs", 16, seed=5)
        for k in range(args.trials):
            for setting in SETTINGS:
                got = trial(images, Path(tmp) / f"run-{k}-{setting}", setting, args.wait)
                rows.append({"name": "restart", "trial": k, "setting": setting, **got})
                print(f"trial {k} {setting:8s}: {got['outcome']} ({got.get('seconds_after_kill', 0):.0f} s after "
                      "the kill)", flush=True)  # fmt: skip
    for setting in SETTINGS:
        done = [r["outcome"] for r in rows if r["setting"] == setting]
        print(f"{setting}: {done.count('finished')} of {len(done)} finished, {done.count('hung')} hung")
    path = write_results("restarts", rows, env_info(torch.device("cpu")), args.out)
    print(f"wrote {path}")
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    main()
