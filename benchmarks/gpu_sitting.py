"""A GPU sitting in stages: each stage one call of the device tool (under its 10-minute limit), every JSON and log
written under one folder, a short table last. ../shared/GPU.md says how a session uses it.

    python benchmarks/gpu_sitting.py --stage 1 --out $OUT     # GPU tests + kernel benchmark
    python benchmarks/gpu_sitting.py --stage 2 --out $OUT     # ViT-L dec 8, eager / fastmae / mask-token, profiled
    python benchmarks/gpu_sitting.py --stage 3 --out $OUT     # ViT-B dec 8 and 1, ViT-L dec 1
    python benchmarks/gpu_sitting.py --stage 4 --out $OUT     # ViT-H dec 8
    python benchmarks/gpu_sitting.py --stage 5 --out $OUT     # finetune step and data loader
    python benchmarks/gpu_sitting.py --stage 1,2,3 --dry-run  # print the commands only
    python benchmarks/gpu_sitting.py --table DIR              # the table of every JSON in DIR

The stages' sizes were chosen to fit 9 minutes each on one H100 by estimate (FLOPs at 40% MFU plus compilation); no
stage has run on a GPU yet. Afterwards: ``fastmae bench --report DIR/*.json --readme README.md`` for chart and table.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
BENCH = [PY, "-m", "fastmae.cli", "bench"]


def stages(out: Path) -> dict[int, list[list[str]]]:
    """The commands of each stage; every result goes under ``out``."""
    pretrain = [*BENCH, "--suite", "pretrain", "--profile"]
    return {
        1: [[PY, "-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider"],
            [PY, str(HERE / "bench_kernels.py"), "--out", str(out / "kernels.json")]],
        2: [[*pretrain, "--models", "mae_vit_large_patch16", "--decoder-depths", "8", "--out", str(out / "l8.json")]],
        3: [[*pretrain, "--models", "mae_vit_base_patch16", "--decoder-depths", "8,1", "--out", str(out / "b.json")],
            [*pretrain, "--models", "mae_vit_large_patch16", "--decoder-depths", "1", "--out", str(out / "l1.json")]],
        4: [[*pretrain, "--models", "mae_vit_huge_patch14", "--decoder-depths", "8", "--out", str(out / "h8.json")]],
        5: [[*BENCH, "--suite", "finetune,loader", "--out", str(out / "downstream.json")]],
    }  # fmt: skip


def run_stage(number: int, commands: list[list[str]], out: Path, dry_run: bool) -> int:
    """Run a stage's commands in order, each logged to ``out/stage<N>.log`` (and echoed); stops at the first
    failure and returns its exit code."""
    log_path = out / f"stage{number}.log"
    for cmd in commands:
        line = " ".join(shlex.quote(c) for c in cmd)
        print(f"[stage {number}] {line}", flush=True)
        if dry_run:
            continue
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log_path, "a") as log:
            log.write(f"$ {line}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for text in proc.stdout:
                sys.stdout.write(text)
                log.write(text)
            code = proc.wait()
            log.write(f"# exit {code} after {time.perf_counter() - t0:.0f} s\n")
        if code != 0:
            print(f"[stage {number}] failed with exit code {code}; see {log_path}", flush=True)
            return code
    return 0


def table(folder: Path) -> str:
    """One line per pretrain-step row and a count of the other rows, from every results JSON in ``folder``."""
    import json

    lines = ["| file | model | dec | config | encoder | img/s | MFU | peak GB/img | top kernel |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    others = {}
    for path in sorted(folder.glob("*.json")):
        for r in json.loads(path.read_text()).get("rows", []):
            if r.get("name") != "pretrain_step":
                others[r.get("name", "?")] = others.get(r.get("name", "?"), 0) + 1
                continue
            top = (r.get("profile") or [{}])[0]
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            mem = "n/a" if r["peak_mem_gb_per_image"] is None else f"{r['peak_mem_gb_per_image']:.3f}"
            kernel = f"{top['kernel'][:40]} {100 * top['share']:.0f}%" if top else "-"
            lines.append(f"| {path.name} | {r['model']} | {r['decoder_depth']} | {r['config']} | "
                         f"{r['encoder_mode']} | {r['img_per_s']:.1f} | {mfu} | {mem} | {kernel} |")  # fmt: skip
    lines.append("other rows: " + (", ".join(f"{k} {v}" for k, v in sorted(others.items())) or "none"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default=None, help="comma-separated stage numbers (1-5)")
    ap.add_argument("--out", default="benchmarks/results/sitting", help="folder for every JSON and log")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--table", default=None, metavar="DIR", help="only print the table of the JSONs in DIR")
    args = ap.parse_args(argv)
    if args.table:
        print(table(Path(args.table)))
        return 0
    if not args.stage:
        ap.error("--stage is required (or --table DIR)")
    out = Path(args.out)
    plan = stages(out)
    try:
        chosen = [int(s) for s in args.stage.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--stage takes numbers 1-{len(plan)}, got {args.stage!r}")
    if unknown := [s for s in chosen if s not in plan]:
        ap.error(f"--stage: no stage {unknown[0]}; stages are 1-{len(plan)}")
    for number in chosen:
        code = run_stage(number, plan[number], out, args.dry_run)
        if code:
            return code
    if not args.dry_run:
        print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
