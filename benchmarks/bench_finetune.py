"""Finetune step benchmark: img/s of the paper's finetune step (timm ViT, global pool + fc_norm, drop path, mixup/
cutmix + soft-target CE, layer-decay AdamW) for ViT-B/L at 224 px, bf16 autocast + torch.compile on GPU. The step
is the one ``fastmae finetune`` runs (``build_step`` over ``finetune_loss`` in the loop's run spec: the same autocast,
compile, NaN guard).

Synthetic images on the device (compute only, no loader). Each model is timed with compile off and on in one run, so
the row's ``speedup_vs_eager`` is a same-run ratio.

    python benchmarks/bench_finetune.py            # GPU: ViT-B batch 128, ViT-L batch 64
    python benchmarks/bench_finetune.py --smoke    # tiny shapes on any device: checks the script, not a number

Rows: {"name": "finetune", "model", "img_size", "batch", "compile", "precision", "img_per_s", "ms_per_step",
"peak_mem_gb", "speedup_vs_eager"}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import env_info, median, time_interleaved, write_results  # noqa: E402
from fastmae.train.data import Batch  # noqa: E402
from fastmae.train.evaluate import layer_decay_groups  # noqa: E402
from fastmae.train.finetune import finetune_loss, mixing  # noqa: E402
from fastmae.train.spec import local_spec, resolve_device  # noqa: E402
from fastmae.train.step import StepParts, build_step  # noqa: E402

from fastmae.interop import create_vit  # noqa: E402

MODELS = {"mae_vit_base_patch16": (128, 0.1, 0.65), "mae_vit_large_patch16": (64, 0.2, 0.75)}  # batch, dp, ld


def make_step(name: str, batch: int, img: int, drop_path: float, layer_decay: float, device, variant: str,
              classes: int = 1000):  # fmt: skip
    """The loop's finetuning step (:func:`fastmae.train.step.build_step` over
    :func:`fastmae.train.finetune.finetune_loss`, in the loop's run spec: its autocast, ``--compile`` variant, NaN
    guard and fused AdamW) on one synthetic batch; returns (one step, the precision it runs in)."""
    torch.manual_seed(0)
    model = create_vit(name, classes, img, "avg", drop_path).to(device).train()
    opt = torch.optim.AdamW(layer_decay_groups(model, 0.05, layer_decay), lr=1e-4, fused=True)
    spec = local_spec(device, compile=variant)  # bf16 autocast on CUDA, fp32 on a CPU
    mixup, criterion = mixing(classes, mixup=0.8, cutmix=1.0, smoothing=0.1)
    step = build_step(StepParts(finetune_loss(spec.compiled(model), mixup, criterion), opt, model.parameters()), spec)
    data = Batch(torch.randn(batch, 3, img, img, device=device), torch.randint(0, classes, (batch,), device=device),
                 torch.arange(batch, device=device), epoch=0, position=(0, 1))  # fmt: skip
    return (lambda: step(data, 1e-4)), spec.precision


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="ViT-tiny at 32 px, batch 4: checks the script works")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    configs = {m: MODELS[m] for m in args.models.split(",")}
    img = 224
    if args.smoke:
        configs, img, args.steps = {"mae_vit_tiny_patch16": (4, 0.1, 0.75)}, 32, 2
    rows = []
    for name, (batch, dp, ld) in configs.items():
        variants, precision = {}, {}
        variants[False], precision[False] = make_step(name, batch, img, dp, ld, device, "off")
        if gpu:  # compiled only on GPU: inductor on CPU needs a C++ toolchain and minutes
            variants[True], precision[True] = make_step(name, batch, img, dp, ld, device, "full")
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times = time_interleaved({str(k): v for k, v in variants.items()}, device, warmup=3, reps=args.steps)
        eager = median(times["False"])
        for compiled in variants:
            t = median(times[str(compiled)])
            rows.append({
                "name": "finetune", "model": name, "img_size": img, "batch": batch,
                "compile": "full" if compiled else "off", "precision": precision[compiled],
                "img_per_s": batch / t, "ms_per_step": 1000 * t,
                "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None,
                "speedup_vs_eager": eager / t,
            })  # fmt: skip
            print(f"{name} batch {batch} compile={compiled}: {batch / t:.1f} img/s ({1000 * t:.1f} ms/step)")
    env = env_info(device)
    path = write_results("finetune", rows, env, args.out)
    print(f"wrote {path}")
    return {"env": env, "rows": rows}


if __name__ == "__main__":
    main()
