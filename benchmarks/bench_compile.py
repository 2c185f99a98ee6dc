"""What compiling costs at start-up: time to the first training step, ``--compile full`` against ``regional``, from a
cold compile cache and again from the cache the first run left (a restart with the same flags).

Each run is a fresh process with its own ``TORCHINDUCTOR_CACHE_DIR`` (inductor's FX-graph cache, AOTAutograd's cache
and Triton's kernels all live under it): ``cold`` starts from an empty folder, ``warm`` is the next process on the
same folder. A run builds the model, compiles it, and times ``--steps`` training steps (forward, backward, AdamW);
the compile overhead is the first step's seconds less the median of the later ones. Eager rows give the step time
without compiling. Inductor, float32, on whatever device ``--device`` names (the CPU here).

    python benchmarks/bench_compile.py [--models mae_vit_base_patch16,mae_vit_large_patch16] [--batch 2] [--steps 4]
    python benchmarks/bench_compile.py --report benchmarks/results/compile-cpu-<date>.json --readme docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Rows, cli, env_info, median, report  # noqa: E402

MODELS = ("mae_vit_base_patch16", "mae_vit_large_patch16")


def child(model_name: str, variant: str, batch: int, steps: int, device: str, img_size: int = 224) -> dict:
    """One process's run (see the module docstring): seconds to build, first step, later steps; compile counters."""
    from fastmae.train.data import Batch
    from fastmae.train.pretrain import mae_loss
    from fastmae.train.schedule import build_optimizer
    from fastmae.train.spec import local_spec
    from fastmae.train.step import StepParts, build_step
    from torch._dynamo.utils import counters

    from fastmae.models import create_model

    dev = torch.device(device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    # the loop's run spec (bf16 autocast on CUDA, fp32 on a CPU) and its step builder
    spec = local_spec(dev, compile=variant, kernels="reference", attn_backend="auto", model=model_name)
    model = create_model(model_name, img_size=img_size, **spec.model_options()).to(dev)
    optimizer = build_optimizer(model, 1e-4, 0.05, (0.9, 0.95), fused=True)  # the loop's (the NaN guard sets found_inf)
    loss_fn = mae_loss(model, spec.compiled(model), dev, seed=0, mask_ratio=0.75)
    step = build_step(StepParts(loss_fn, optimizer, model.parameters()), spec)
    imgs = torch.randint(0, 256, (batch, 3, *model.patch_embed.img_size), dtype=torch.uint8, device=dev)
    labels = torch.zeros(batch, dtype=torch.long, device=dev)
    build = time.perf_counter() - t0
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        loss = step(Batch(imgs, labels, torch.arange(k * batch, (k + 1) * batch, device=dev), 0, (0, k + 1)), 1e-4)
        float(loss)  # the step's work done (and on a GPU, synchronised)
        times.append(time.perf_counter() - t0)
    steady = median(times[1:])
    return {"build_s": build, "first_step_s": times[0], "step_s": steady, "overhead_s": times[0] - steady,
            "loss": float(loss), "graphs": counters["stats"]["unique_graphs"],
            "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
            "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"]}  # fmt: skip


def run_child(model_name: str, variant: str, cache: Path, args) -> dict:
    """``child`` in a fresh process on compile cache ``cache``; its error's last line where it failed."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    env.pop("TRITON_CACHE_DIR", None)  # Triton's kernels under the inductor folder, as by default
    cmd = [sys.executable, __file__, "--child", model_name, variant, "--batch", str(args.batch),
           "--steps", str(args.steps), "--device", args.device, "--img-size", str(args.img_size)]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"error": last[:300], "wall_s": wall}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall}


def summarise(rows: list[dict]) -> list[dict]:
    """Per model: regional's cold overhead as a share of full's, and each variant's warm overhead as a share of its
    cold one (the targets: at most 1/3 each)."""
    by = {(r["model"], r["variant"], r["cache"]): r for r in rows if "error" not in r}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        full, regional = by.get((model, "full", "cold")), by.get((model, "regional", "cold"))
        s = {"model": model, "summary": True}
        if full and regional:
            s["regional_over_full_cold"] = regional["overhead_s"] / full["overhead_s"]
        for variant in ("full", "regional"):
            cold, warm = by.get((model, variant, "cold")), by.get((model, variant, "warm"))
            if cold and warm:
                s[f"{variant}_warm_over_cold"] = warm["overhead_s"] / cold["overhead_s"]
        out.append(s)
    return out


def readme_table(saved: dict, json_name: str) -> str:
    env = saved["env"]
    rows = [r for r in saved["rows"] if not r.get("summary")]
    size = rows[0].get("img_size", 224)
    lines = [f"{env.get('cpu', 'cpu')} ({env.get('device')}), torch {env.get('torch')}, git "
             f"`{str(env.get('git_sha'))[:12]}`, {str(env.get('date', ''))[:10]}; batch {rows[0]['batch']} at {size} "
             f"px, float32, inductor, a fresh process per row; raw JSON `benchmarks/results/{json_name}`.", "",
             "| model | compile | cache | first step s | later steps s | first step - later s | graphs | "
             "FX-graph cache hits / misses |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['cache']} | error: {r['error'][:80]} | | | | |")
            continue
        over = f"{r['overhead_s']:.1f}"  # eager's: the first step's own cost (allocations, kernels' first calls)
        hits = "" if r["variant"] == "off" else f"{r['fxgraph_cache_hit']} / {r['fxgraph_cache_miss']}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['cache']} | {r['first_step_s']:.1f} | {r['step_s']:.2f} | "
                     f"{over} | {r['graphs']} | {hits} |")  # fmt: skip
    for s in (r for r in saved["rows"] if r.get("summary")):
        parts = [f"{k.replace('_over_', ' / ').replace('_', ' ')} {v:.2f}" for k, v in s.items()
                 if k not in ("model", "summary")]  # fmt: skip
        lines.append(f"\n{s['model']}: compile overhead " + ", ".join(parts) + " (targets: at most 0.33).")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default="full,regional", help="compile variants to time (off rows are added)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="training steps per run (the first one compiles)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run before it counts as failed")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/compile-<device>-<date>.json)")
    ap.add_argument("--report", default=None, metavar="JSON", help="only print the table of a results JSON")
    ap.add_argument("--readme", default=None,
                    help="with --report: the page to write (docs/benchmarks.md), between its compile-bench markers")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.steps, args.device, args.img_size)))
        return {}
    if args.report:
        table = report(args.report, readme_table, "compile-bench", args.readme)
        print(table)
        return {"table": table}
    if args.steps < 2:
        ap.error("--steps must be at least 2: the first step compiles, the later ones time the step")
    from fastmae.compiling import check_variant
    from fastmae.registry import model_args

    variants = [check_variant(v) for v in args.variants.split(",") if v != "off"]
    for model in args.models.split(","):
        model_args(model)  # an unknown name: one line now, not a failed row per run
    rows = Rows("compile", env_info(torch.device(args.device)), args.out)
    for model in args.models.split(","):
        plan = [("off", "cold")] + [(v, c) for v in variants for c in ("cold", "warm")]
        with tempfile.TemporaryDirectory(prefix="fastmae-compile-") as tmp:
            for variant, cache in plan:
                folder = Path(tmp) / variant  # each variant its own cache: warm reuses only what its cold run left
                row = {"name": "compile", "model": model, "variant": variant, "cache": cache, "batch": args.batch,
                       "img_size": args.img_size,
                       **run_child(model, variant, folder, args)}  # fmt: skip
                rows.add(row)
                print(json.dumps(row), flush=True)
    for s in summarise(rows.rows):
        rows.add(s)
        print(json.dumps(s))
    print(f"wrote {rows.path}")
    return {"rows": rows.rows, "path": str(rows.path)}


if __name__ == "__main__":
    sys.exit(cli(main))
