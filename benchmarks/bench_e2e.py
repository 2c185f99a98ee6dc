"""The real loop against the bare step: ``fastmae pretrain`` (its loader, loop, logging, NaN guard and checkpoint
cadence) on a folder of ImageNet-like JPEGs, against the bare training step (the same model, compile and batch, on
images already on the device) in the same run. The target is a loop within 5% of the bare step.

For each model and loader: the bare step (:class:`fastmae.train.bench.StepBench`, the ``fastmae`` / ``visible`` row,
norm-pix loss as the recipe), then ``fastmae pretrain --model M --batch-size B --loader L --num-workers W
--stop-after-steps N --log-every 10 --picture-every 0`` in a child process; its rate is the median ``img_per_s`` of
the ``metrics.jsonl`` rows after ``--skip`` steps (compilation and the first batches left out). The checkpoint
cadence is the recipe's (``--save-every 1000``), so no save falls inside a measurement of a few hundred steps; the
end-of-run save and pictures come after the last logged row.

With ``--loaders gpu,synthetic`` it says how much the GPU loader's decode and augmentation, running beside the step
on the same GPU, take from it: the loop with the GPU loader against the loop with the synthetic loader (random images
made on the device, no feed at all), column "vs synthetic loop".

    python benchmarks/bench_e2e.py --data DIR --models mae_vit_base_patch16 --loaders torchvision,gpu --workers 16
    python benchmarks/bench_e2e.py --smoke            # tiny model and images on any device: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _harness import Rows, cli, env_info, free_memory, report, row_error  # noqa: E402
from bench_loader import make_jpegs  # noqa: E402
from fastmae.train.bench import BATCH, StepBench  # noqa: E402
from fastmae.train.context import resolve_device  # noqa: E402

from fastmae.compiling import DEFAULT_VARIANT, VARIANTS  # noqa: E402


def loop_rate(model: str, data: Path, out: Path, batch: int, loader: str, workers: int, steps: int, skip: int,
              device: torch.device, smoke: dict | None, compile_variant: str = DEFAULT_VARIANT) -> dict:  # fmt: skip
    """``fastmae pretrain`` in a child process; its img/s after ``skip`` steps, from metrics.jsonl."""
    from fastmae.config import PRESETS

    # The recipe's preset (224 px, norm-pix loss, 800 epochs, 40 warmup, a save every 1000 steps) at the bench's batch
    what = ["--preset", model] if model in PRESETS else ["--model", model, "--norm-pix-loss"]
    cmd = [sys.executable, "-m", "fastmae.cli", "pretrain", *what, "--data", str(data), "--batch-size", str(batch),
           "--loader", loader, "--num-workers", str(workers), "--stop-after-steps", str(steps), "--log-every", "10",
           "--picture-every", "0", "--no-progress", "--no-tensorboard", "--output-dir", str(out), "--device",
           device.type, "--num-reconstructions", "2"]  # fmt: skip
    if device.type == "cuda":
        cmd += ["--compile", compile_variant]
    if smoke:
        cmd += ["--img-size", str(smoke["img_size"])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300], "wall_s": wall}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["img_per_s"] for r in rows if "img_per_s" in r and r["step"] > skip]
    summary = json.loads((out / "summary.json").read_text())
    return {"img_per_s": statistics.median(rates) if rates else None, "rates": rates, "wall_s": wall,
            "loader": summary.get("loader"), "skipped_files": summary.get("skipped_files"),
            "compile": summary.get("compile"), "attn_backend": summary.get("attn_backend")}  # fmt: skip


def readme_table(saved: dict, json_name: str) -> str:
    env, rows = saved["env"], saved["rows"]
    lines = [f"Measured on **{env.get('gpu')}** ({env.get('cpu_count', '?')} CPU cores), torch {env.get('torch')}, git "
             f"`{str(env.get('git_sha'))[:12]}`, {str(env.get('date', ''))[:10]}; raw JSON "
             f"`benchmarks/results/{json_name}`.", "",
             "| model | batch | loader | workers | bare step img/s | fastmae pretrain img/s | loop / step | "
             "vs synthetic loop |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    synthetic = {r["model"]: r.get("loop_img_per_s") for r in rows if r["loader"] == "synthetic"}
    for r in rows:
        loop = "failed: " + r["error"] if r.get("error") else f"{r['loop_img_per_s']:.0f}"
        ratio = "n/a" if r.get("error") or not r.get("loop_img_per_s") else f"{r['loop_vs_step']:.3f}"
        base = synthetic.get(r["model"])
        vs = f"{r['loop_img_per_s'] / base:.3f}" if base and r.get("loop_img_per_s") else "n/a"
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['loader']} | {r['workers']} | "
                     f"{'n/a' if r['step_img_per_s'] is None else format(r['step_img_per_s'], '.0f')} | {loop} | "
                     f"{ratio} | {vs} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="JPEG folder (default: --images generated ImageNet-like JPEGs; a "
                    "folder that does not exist is written first)")  # fmt: skip
    ap.add_argument("--images", type=int, default=20480, help="JPEGs to generate without --data")
    ap.add_argument("--models", default="mae_vit_base_patch16,mae_vit_large_patch16")
    ap.add_argument("--loaders", default="torchvision,gpu", help="the loaders of the loop (torchvision, gpu, dali; "
                    "synthetic: images made on the device, the loop with no feed)")  # fmt: skip
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="default: the bench's (B 256, L 128)")
    ap.add_argument("--steps", type=int, default=120, help="steps of each fastmae pretrain")
    ap.add_argument("--skip", type=int, default=40, help="steps left out of the loop's rate (compile, first batches)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", default=DEFAULT_VARIANT, choices=VARIANTS, help="how the bare step and the loop "
                    "compile (on CUDA)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="tiny model and images on any device (checks the script)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", default=None, metavar="JSON")
    ap.add_argument("--readme", default=None,
                    help="with --report: the page to write it into (docs/data.md), between its e2e-bench markers")
    args = ap.parse_args(argv)
    if args.report:
        table = report(args.report, readme_table, "e2e-bench", args.readme)
        print(table)
        return {"table": table}
    device = resolve_device(args.device)
    smoke = {"img_size": 32} if args.smoke else None
    if args.smoke:
        args.models, args.images, args.steps, args.skip, args.workers = "mae_vit_tiny_patch16", 64, 12, 4, 1
        args.batch = args.batch or 4
    results = Rows("e2e", {**env_info(device), "cpu_count": len(os.sched_getaffinity(0))}, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else make_jpegs(Path(tmp) / "jpegs", args.images)
        if args.data and not data.exists():  # the sitting's first command on that folder writes it
            make_jpegs(data, args.images)
            print(f"wrote {args.images} JPEGs under {data}", flush=True)
        images = sum(1 for _ in data.rglob("*.jpg"))
        for model in args.models.split(","):
            batch = args.batch or BATCH.get(model, 64)
            base = {"name": "e2e", "model": model, "batch_size": batch, "workers": args.workers, "images": images}
            try:
                tiny = {**(smoke or {}), "norm_pix_loss": True}
                step = StepBench(model, 8, "fastmae", "visible", batch, device, tiny, compile_variant=args.compile)
                bare = step.row("plain", 10 if not args.smoke else 3, 3 if not args.smoke else 1)
            except Exception as exc:  # the bare step failed: a row per loader that says so, then the next model
                for loader in args.loaders.split(","):
                    results.add({**base, "loader": loader, "step_img_per_s": None, "loop_img_per_s": None,
                                 "loop_vs_step": None, "error": f"bare step: {row_error(exc)}"})  # fmt: skip
                continue
            finally:
                step = None
                free_memory(device)
            for loader in args.loaders.split(","):
                got = loop_rate(model, data, Path(tmp) / f"run-{model}-{loader}", batch, loader, args.workers,
                                args.steps, args.skip, device, smoke, args.compile)  # fmt: skip
                row = {**base, "loader": loader, "step_img_per_s": bare["img_per_s"],
                       "loop_img_per_s": got.get("img_per_s"),
                       "loop_vs_step": (got["img_per_s"] / bare["img_per_s"]) if got.get("img_per_s") else None,
                       **{f"loop_{k}": v for k, v in got.items() if k != "img_per_s"}}  # fmt: skip
                if got.get("error"):
                    row["error"] = got["error"]
                results.add(row)  # the file holds every row so far
                loop = f"{got['img_per_s']:.0f} img/s" if got.get("img_per_s") else got.get("error")
                print(f"{model} {loader:12s} batch {batch}: step {bare['img_per_s']:.0f} img/s, loop {loop}",
                      flush=True)  # fmt: skip
    print(f"wrote {results.path}")
    return {"rows": results.rows, "path": str(results.path)}


if __name__ == "__main__":
    sys.exit(cli(main))
