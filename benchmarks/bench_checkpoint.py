"""What a pretraining checkpoint costs: its size and the time to save it, for ViT-B/L/H, so that a scheduler's grace
period (SLURM's ``GraceTime``, ``--signal=TERM@N``) can be set (docs/long-runs.md, Preemption).

- Size, exact, from the parameter counts (the models are built on the meta device, so ViT-H costs nothing): a
  pretraining checkpoint holds the fp32 weights (every parameter, the fixed position tables too), AdamW's two fp32
  moments and one fp32 step counter per trained tensor, and a few KB more (config, RNG states, data position).
- Save time, measured for the models in ``--save`` (default ViT-B and ViT-L): the checkpoint's contents (the model's
  state_dict, a fused AdamW's state after one step, the step, the config, every generator's state) written as the
  checkpointer writes them, by ``fastmae.files.save_torch`` (a temporary file in the folder, flushed, fsynced, then
  renamed over the previous checkpoint), ``--repeat`` times; the file's real size beside the computed one.
- The table (``--report JSON --readme docs/long-runs.md``) derives the save time of the models not saved here from
  the write rate of the largest model that was, and says so.

    python benchmarks/bench_checkpoint.py [--save mae_vit_base_patch16,mae_vit_large_patch16] [--dir DIR]
    python benchmarks/bench_checkpoint.py --report benchmarks/results/checkpoint-cpu-<date>.json \
        --readme docs/long-runs.md
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fastmae
from fastmae.files import save_torch
from fastmae.models import model_args

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Rows, env_info, median, report  # noqa: E402

MODELS = ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")
SHORT = {"mae_vit_base_patch16": "ViT-B/16", "mae_vit_large_patch16": "ViT-L/16", "mae_vit_huge_patch14": "ViT-H/14"}


def counts(name: str) -> dict:
    """Parameter counts and the checkpoint's tensor bytes, exactly (weights 4 B, AdamW moments 2 x 4 B per trained
    parameter, a 4-byte step per trained tensor)."""
    with torch.device("meta"):
        model = fastmae.create_model(name)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trained = [p for p in model.parameters() if p.requires_grad]
    return {"params": sum(p.numel() for p in model.parameters()), "trained_params": sum(p.numel() for p in trained),
            "trained_tensors": len(trained),
            "computed_bytes": weights + 2 * 4 * sum(p.numel() for p in trained) + 4 * len(trained)}  # fmt: skip


def checkpoint(name: str) -> dict:
    """A checkpoint of ``name`` with what the checkpointer puts in one: weights, a fused AdamW's state after a step,
    step, epoch, config, data position and every generator's state."""
    model = fastmae.create_model(name, kernels="reference")
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    for p in trained:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the moments and step counters
    optimizer.zero_grad(set_to_none=True)
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {"python": random.getstate(), "torch_cpu": torch.get_rng_state(),
           "numpy": ["MT19937", torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1000, "epoch": 3,
            "config": {"model": name, **model_args(name)}, "data_position": [3, 0], "rng": [rng]}  # fmt: skip


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def readme_table(saved: dict, json_name: str) -> str:
    """The docs table: size per model (exact), save time measured here or derived from the measured write rate."""
    env, rows = saved["env"], saved["rows"]
    measured = [r for r in rows if r.get("save_s")]
    base = max(measured, key=lambda r: r["file_bytes"]) if measured else None
    lines = [f"Saved on **{env.get('cpu', 'cpu')}, {env.get('cpu_threads')} threads** to a folder on its local disk "
             f"(torch {env.get('torch')}, git `{str(env.get('git_sha'))[:12]}`, {str(env.get('date', ''))[:10]}); "
             f"raw JSON `benchmarks/results/{json_name}`. Size: computed from the parameter counts (fp32 weights, "
             "AdamW's two fp32 moments, a step counter per tensor) and, where saved, the file's. Save time: "
             "`fastmae.files.save_torch` (write, flush, fsync, rename over the previous file), the median (and the "
             f"range) of {len(measured[0]['save_s']) if measured else 0} saves; this machine's disk is shared with "
             "other work, so the range is wide.",
             "", "| model | parameters | checkpoint GB (computed) | file GB (measured) | save s | write GB/s | "
             "save time is |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in rows:
        params = f"{r['params'] / 1e6:.1f} M"
        if r.get("save_s"):
            s = median(r["save_s"])
            lines.append(f"| {SHORT.get(r['model'], r['model'])} | {params} | {_gb(r['computed_bytes'])} | "
                         f"{_gb(r['file_bytes'])} | {s:.1f} ({min(r['save_s']):.1f}-{max(r['save_s']):.1f}) | "
                         f"{r['file_bytes'] / s / 1e9:.2f} | measured here |")  # fmt: skip
        elif base is not None:
            rate = base["file_bytes"] / median(base["save_s"])
            lines.append(f"| {SHORT.get(r['model'], r['model'])} | {params} | {_gb(r['computed_bytes'])} | - | "
                         f"{r['computed_bytes'] / rate:.1f} | - | derived: {SHORT.get(base['model'], base['model'])}'s "
                         "write rate here |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="models whose size is counted")
    ap.add_argument("--save", default="mae_vit_base_patch16,mae_vit_large_patch16",
                    help="models whose checkpoint is built and saved (ViT-H needs about 11 GB of memory)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="the folder to save into (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/checkpoint-cpu-<date>.json)")
    ap.add_argument("--report", default=None, metavar="JSON", help="only print the table of a results JSON")
    ap.add_argument("--readme", default=None,
                    help="with --report: the page to write (docs/long-runs.md), between its checkpoint-bench markers")
    args = ap.parse_args(argv)
    if args.report:
        table = report(args.report, readme_table, "checkpoint-bench", args.readme)
        print(table)
        return {"table": table}
    results = Rows("checkpoint", env_info(torch.device("cpu")), args.out)
    save = [m for m in args.save.split(",") if m]
    folder = Path(tempfile.mkdtemp(prefix="fastmae-ckpt-", dir=args.dir))
    try:
        for name in args.models.split(","):
            row = {"name": "checkpoint", "model": name, **counts(name)}
            if name in save:
                state = checkpoint(name)
                path, times = folder / "checkpoint-last.pth", []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    save_torch(state, path)
                    times.append(time.perf_counter() - t0)
                del state
                row.update(save_s=times, file_bytes=os.path.getsize(path))
                path.unlink()
            results.add(row)
            print(f"{name}: {row['params'] / 1e6:.1f} M parameters, {_gb(row['computed_bytes'])} GB computed"
                  + (f", {_gb(row['file_bytes'])} GB written in {median(row['save_s']):.1f} s" if "save_s" in row
                     else ""))  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {results.path}")
    return {"rows": results.rows, "path": str(results.path)}


if __name__ == "__main__":
    main()
