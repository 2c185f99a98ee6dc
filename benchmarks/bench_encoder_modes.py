"""Visible-only vs mask-token encoder: one training step (forward + backward), same model, same run.

The MAE paper reports ~3x faster pretraining from encoding only the visible 25% of patches. This measures it:
ViT-S/16 at 224 px with a one-block decoder by default, on CPU or GPU (bf16 autocast on GPU).

    python benchmarks/bench_encoder_modes.py [--model mae_vit_small_patch16] [--batch 8] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import env_info, median, time_interleaved, write_results  # noqa: E402
from fastmae.train.spec import local_spec  # noqa: E402

import fastmae  # noqa: E402

TARGET_CPU = 2.7  # the visible path must add no overhead over plain PyTorch (about 3.2x on a 2-core CPU)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mae_vit_small_patch16")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--decoder-depth", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on GPU")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--attn-backend", default="auto")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    args = ap.parse_args(argv)

    # the loop's run spec: the device, bf16 autocast on a GPU, the attention and kernels resolved (or one line why not)
    spec = local_spec(args.device, kernels=args.kernels, attn_backend=args.attn_backend, model=args.model)
    device = spec.device
    batch = args.batch or (128 if spec.cuda else 8)
    torch.manual_seed(0)
    common = dict(img_size=args.img_size, decoder_depth=args.decoder_depth, **spec.model_options())
    models = {mode: fastmae.create_model(args.model, encoder_mode=mode, **common).to(device)
              for mode in ("visible", "mask_token")}  # fmt: skip
    models["mask_token"].load_state_dict(models["visible"].state_dict(), strict=False)
    imgs = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    L = models["visible"].patch_embed.num_patches
    noise = torch.rand(batch, L, device=device)
    def step(model):
        def run():
            with spec.autocast():
                loss, _, _ = model(imgs, mask_ratio=args.mask_ratio, noise=noise)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    # correctness before timing: the two modes share weights and masks; both losses finite, masks identical
    with torch.no_grad(), spec.autocast():
        lv, _, mv = models["visible"](imgs, args.mask_ratio, noise)
        lm, _, mm = models["mask_token"](imgs, args.mask_ratio, noise)
    assert torch.equal(mv, mm) and torch.isfinite(lv) and torch.isfinite(lm)

    times = time_interleaved({m: step(models[m]) for m in models}, device, warmup=2, reps=args.reps)
    ms = {m: 1e3 * median(t) for m, t in times.items()}
    ratio = ms["mask_token"] / ms["visible"]
    flops = {m: fastmae.flops_per_image(models[m], args.mask_ratio) for m in models}
    env = env_info(device)
    rows = []
    for mode in models:
        rows.append({
            "name": "encoder_modes", "model": args.model, "encoder_mode": mode, "img_size": args.img_size,
            "decoder_depth": args.decoder_depth, "batch": batch, "mask_ratio": args.mask_ratio,
            "dtype": spec.precision, "ms_per_step": ms[mode], "img_per_s": batch / ms[mode] * 1e3,
            "train_tflop_per_s": 3 * flops[mode]["total"] * batch / (ms[mode] * 1e-3) / 1e12,
            "attn_backend": models[mode].attn_backend_used, "kernels": models[mode].kernels_used(device),
            "times_s": times[mode],
        })  # fmt: skip
    rows.append({"name": "encoder_modes_ratio", "model": args.model, "ratio_mask_token_over_visible": ratio,
                 "target": TARGET_CPU if device.type == "cpu" else None,
                 "meets_target": ratio >= TARGET_CPU if device.type == "cpu" else None})  # fmt: skip
    path = write_results("encoder_modes", rows, env, args.out)
    print(f"{args.model} {args.img_size}px batch {batch} on {device.type} ({env['gpu'] or env['cpu']}), "
          f"attention {models['visible'].attn_backend_used}")  # fmt: skip
    print(f"  visible-only : {ms['visible']:8.1f} ms/step  {batch / ms['visible'] * 1e3:8.1f} img/s")
    print(f"  mask-token   : {ms['mask_token']:8.1f} ms/step  {batch / ms['mask_token'] * 1e3:8.1f} img/s")
    print(f"  speed-up     : {ratio:.2f}x" + (f" (target >= {TARGET_CPU}x on CPU)" if device.type == "cpu" else ""))
    print(f"  results      : {path}")
    return {"ratio": ratio, "ms": ms, "path": str(path)}


if __name__ == "__main__":
    main()
