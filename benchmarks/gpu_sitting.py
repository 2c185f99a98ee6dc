"""A GPU sitting in stages, each one call of the device tool, every JSON and log under one folder, a short table
last. ../shared/GPU.md says how a session uses it. Device time is 15 minutes a session, start included: the
``quick`` stage is the one call that yields the headline, and every stage stops its commands at its time budget.

    python3 -m pip install -q --no-deps --no-build-isolation -e .    # on the machine, no network needed
    python benchmarks/gpu_sitting.py --stage quick --out $OUT   # the headline in one call (budget 450 s)
    python benchmarks/gpu_sitting.py --stage step --out $OUT    # issue 26: breakdown and every lever (470 s)
    python benchmarks/gpu_sitting.py --stage feed --out $OUT    # issue 27: loaders, the loop vs the step (470 s)
    python benchmarks/gpu_sitting.py --stage 2 --out $OUT       # slow GPU tests + kernel benchmark
    python benchmarks/gpu_sitting.py --stage 3 --out $OUT       # ViT-B dec 1, ViT-L dec 1
    python benchmarks/gpu_sitting.py --stage 4 --out $OUT       # ViT-H dec 8
    python benchmarks/gpu_sitting.py --stage 5 --out $OUT       # finetune step, profiled ViT-L
    python benchmarks/gpu_sitting.py --stage quick,2 --dry-run  # print the commands only
    python benchmarks/gpu_sitting.py --table DIR                # the table of every JSON in DIR

``quick``, in order of value (a wrong fast path is worse than a slow one, so correctness comes first): nvidia-smi; the
GPU tests that compile no whole model (``pytest -m "gpu and not slow"``: fused ops against their references at
ViT-B/L/H shapes, attention, the visible-only embedding); ViT-L/16 dec 8 eager / fastmae / mask-token; ViT-B/16 dec 8;
the loader rows (official vs fastmae vs decode alone, 16 workers). ``quick`` ran on an H200 on 2026-11-30
(../shared/gpu-results/2026-11-30-h200/). ``step`` is issue 26's sitting: each command has its own budget inside the
stage's, so a slow compile costs its own measurement, not the ones after it. Afterwards:
``fastmae bench --report DIR/*.json --readme README.md`` for the chart and the table.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
BENCH = [PY, "-m", "fastmae.cli", "bench"]


# seconds of commands per stage (one device call each)
BUDGETS = {"quick": 450, "step": 470, "feed": 470, 2: 480, 3: 480, 4: 480, 5: 480}


def stages(out: Path) -> dict:
    """The commands of each stage, in the order they run; every result goes under ``out``. A command may come as
    ``(seconds, command)``: its own budget inside the stage's."""
    pretrain = [*BENCH, "--suite", "pretrain"]
    fast = ["--steps", "5", "--warmup", "2"]
    table = ["--attn-table", str(out / "attention_table.json")]
    large, base = ["--models", "mae_vit_large_patch16"], ["--models", "mae_vit_base_patch16"]
    jpegs = Path("/tmp/fastmae-feed-jpegs")  # on the machine's disk, not under $OUT (nothing to bring back)
    return {
        # Issue 26, the step at its limit, ordered by value: correctness of the new paths; the attention table per
        # call site; ViT-L dec 8 (all four configurations, plain and as one CUDA graph, profiled: the headline, the
        # breakdown, the graphs lever, compiled-reference); ViT-B dec 8 (MFU target); the batch sweep; the
        # optimizer; inductor's max-autotune GEMMs. Compiling one ViT-L configuration costs 45-80 s there.
        "step": [(25, ["nvidia-smi"]),
                 (60, [PY, "-m", "pytest", "-m", "gpu and not slow", "-x", "-q", "-p", "no:cacheprovider", "-k",
                       "graph or sync or attention or step"]),
                 (45, [PY, str(HERE / "bench_attention.py"), "--out", str(out / "attention.json"), "--write-table",
                       str(out / "attention_table.json")]),
                 (270, [*pretrain, *large, "--decoder-depths", "8", "--steps", "8", "--warmup", "3", "--graphs",
                        "--profile", *table, "--out", str(out / "l8.json")]),
                 (110, [*pretrain, *base, "--decoder-depths", "8", "--configs", "fastmae,mask-token", "--graphs",
                        *fast, *table, "--out", str(out / "b8.json")]),
                 (130, [*pretrain, *large, "--decoder-depths", "8", "--configs", "fastmae", "--batches", "256,512",
                        *fast, *table, "--out", str(out / "l8-batches.json")]),
                 (60, [*pretrain, *large, "--decoder-depths", "8", "--configs", "", "--optimizer-bench",
                       "--out", str(out / "l8-optimizer.json")]),
                 (150, [*pretrain, *base, "--decoder-depths", "8", "--configs", "fastmae", "--compile-mode",
                        "max-autotune-no-cudagraphs", *fast, *table, "--out", str(out / "b8-autotune.json")])],
        "quick": [["nvidia-smi"],
                  [PY, "-m", "pytest", "-m", "gpu and not slow", "-x", "-q", "-p", "no:cacheprovider"],
                  [*pretrain, *fast, "--models", "mae_vit_large_patch16", "--decoder-depths", "8", "--out",
                   str(out / "l8.json")],
                  [*pretrain, *fast, "--models", "mae_vit_base_patch16", "--decoder-depths", "8", "--out",
                   str(out / "b8.json")],
                  [PY, str(HERE / "bench_loader.py"), "--workers", "16", "--loaders", "official,fastmae,decode",
                   "--rounds", "2", "--out", str(out / "loader.json")]],
        # Issue 27, feeding the step: the GPU loader's correctness; 20480 ImageNet-like JPEGs written once (16
        # processes); the loaders at 4, 8, 16 workers, batch 256; the real fastmae pretrain against the bare step at
        # ViT-B and ViT-L dec 8 with the torchvision and the gpu loader (each loop compiles its model again: the
        # inductor cache makes that cheaper than the first).
        "feed": [(25, ["nvidia-smi"]),
                 (60, [PY, "-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider", "-k",
                       "crop_resize or gpu_loader or ahead"]),
                 (45, [PY, str(HERE / "bench_loader.py"), "--make-data", str(jpegs), "--images", "20480"]),
                 (90, [PY, str(HERE / "bench_loader.py"), "--data", str(jpegs), "--workers", "4,8,16", "--batch",
                        "256", "--batches", "20", "--rounds", "2", "--settle", "1", "--loaders",
                        "official,fastmae,decode,gpu", "--out", str(out / "loader.json")]),
                 (140, [PY, str(HERE / "bench_e2e.py"), "--data", str(jpegs), "--models", "mae_vit_base_patch16",
                        "--loaders", "torchvision,gpu", "--workers", "16", "--steps", "120", "--skip", "40",
                        "--out", str(out / "e2e-b.json")]),
                 (150, [PY, str(HERE / "bench_e2e.py"), "--data", str(jpegs), "--models", "mae_vit_large_patch16",
                        "--loaders", "gpu,torchvision", "--workers", "16", "--steps", "80", "--skip", "30",
                        "--out", str(out / "e2e-l.json")])],
        2: [[PY, "-m", "pytest", "-m", "gpu and slow", "-x", "-q", "-p", "no:cacheprovider"],
            [PY, str(HERE / "bench_kernels.py"), "--out", str(out / "kernels.json")]],
        3: [[*pretrain, "--models", "mae_vit_base_patch16", "--decoder-depths", "1", "--out", str(out / "b1.json")],
            [*pretrain, "--models", "mae_vit_large_patch16", "--decoder-depths", "1", "--out", str(out / "l1.json")]],
        4: [[*pretrain, "--models", "mae_vit_huge_patch14", "--decoder-depths", "8", "--out", str(out / "h8.json")]],
        5: [[*BENCH, "--suite", "finetune", "--out", str(out / "finetune.json")],
            [*pretrain, "--profile", "--models", "mae_vit_large_patch16", "--decoder-depths", "8", "--out",
             str(out / "l8-profile.json")]],
    }  # fmt: skip


def run_stage(name, commands: list[list[str]], out: Path, dry_run: bool, budget: float) -> int:
    """Run a stage's commands in order, each logged to ``out/stage-<name>.log`` (and echoed), stopping at the first
    failure (its exit code is returned) or when the stage's ``budget`` seconds are spent (the command running then is
    stopped, and so noted in the log)."""
    log_path = out / f"stage-{name}.log"
    deadline = time.monotonic() + budget
    for item in commands:
        own, cmd = item if isinstance(item[0], int | float) else (None, item)
        line = " ".join(shlex.quote(c) for c in cmd)
        print(f"[stage {name}] {line}" + (f"  (budget {own} s)" if own else ""), flush=True)
        if dry_run:
            continue
        left = deadline - time.monotonic()
        left = min(left, own) if own else left
        out.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            if left <= 0:
                log.write(f"$ {line}\n# not run: the stage's {budget:.0f} s budget is spent\n")
                print(f"[stage {name}] budget spent; not run", flush=True)
                continue
            log.write(f"$ {line}\n")
            log.flush()
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            timer = threading.Timer(left, proc.kill)
            timer.start()
            try:
                for text in proc.stdout:
                    sys.stdout.write(text)
                    log.write(text)
                code = proc.wait()
            finally:
                timer.cancel()
            stopped = time.perf_counter() - t0 >= left - 0.5 and code != 0
            log.write(f"# exit {code} after {time.perf_counter() - t0:.0f} s"
                      + (" (stopped at its budget)\n" if stopped else "\n"))  # fmt: skip
        if stopped and own and time.monotonic() < deadline:  # its own budget: the stage goes on
            print(f"[stage {name}] stopped at its own budget ({own} s); next command", flush=True)
            continue
        if stopped:
            print(f"[stage {name}] stopped at the stage budget ({budget:.0f} s); see {log_path}", flush=True)
            return 0
        if code != 0:
            print(f"[stage {name}] failed with exit code {code}; see {log_path}", flush=True)
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
    ap.add_argument("--stage", default=None, help="comma-separated stages: quick, step, feed, 2, 3, 4, 5")
    ap.add_argument("--out", default="benchmarks/results/sitting", help="folder for every JSON and log")
    ap.add_argument("--budget", type=float, default=None, help="seconds per stage (default: each stage's own)")
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
    names = ", ".join(str(k) for k in plan)
    chosen = []
    for part in (p.strip() for p in args.stage.split(",") if p.strip()):
        key = "quick" if part in ("quick", "1") else int(part) if part.isdigit() else part
        if key not in plan:
            ap.error(f"--stage: no stage {part!r}; stages are {names}")
        chosen.append(key)
    for name in chosen:
        code = run_stage(name, plan[name], out, args.dry_run, args.budget or BUDGETS[name])
        if code:
            return code
    if not args.dry_run:
        print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
