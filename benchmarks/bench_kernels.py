"""Per-op benchmark: fused Triton vs eager reference vs torch.compile of the reference, forward and forward+backward.

For each op at ViT-B/L/H shapes (batch 256, bf16 activations, fp32 images), reports ms, GB/s of the minimum traffic
(each input read once, each output written once; for the loss only removed patches) and the fraction of the HBM
bandwidth given by --peak-gbps (H100 measured ~3000). Correctness is checked against the reference before timing.

    python benchmarks/bench_kernels.py                 # GPU: full shapes
    python benchmarks/bench_kernels.py --smoke         # tiny shapes; on CPU only the two references are timed

Rows: {"name": "kernel", "op", "impl", "pass", "shape", "dtype", "ms", "gb_per_s", "frac_peak_bw"}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Rows, cli, env_info, time_ms  # noqa: E402
from fastmae.kernels import masked_mse as mse_mod  # noqa: E402
from fastmae.kernels import masking as masking_mod  # noqa: E402
from fastmae.kernels import unshuffle as unshuffle_mod  # noqa: E402
from fastmae.train.context import resolve_device  # noqa: E402

MODELS = {  # name: (img, patch, encoder width, decoder width)
    "vit_b": (224, 16, 768, 512),
    "vit_l": (224, 16, 1024, 512),
    "vit_h": (224, 14, 1280, 512),
}


def _cases(model, batch, device, act_dtype):
    img, p, D, Dd = MODELS[model]
    L = (img // p) ** 2
    K = int(L * 0.25)
    P = p * p * 3
    e = torch.tensor([], dtype=act_dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, dtype=act_dtype):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    x = rnd(batch, L, D).requires_grad_(True)
    noise = torch.rand(batch, L, generator=g, device=device)
    pos = rnd(1, L + 1, D, dtype=torch.float32)
    pos_d = rnd(1, L + 1, Dd, dtype=act_dtype)
    xv = rnd(batch, 1 + K, Dd).requires_grad_(True)
    tok = rnd(1, 1, Dd).requires_grad_(True)
    ids = torch.argsort(torch.argsort(noise, 1), 1)
    imgs = rnd(batch, 3, img, img, dtype=torch.float32)
    pred = rnd(batch, L, P).requires_grad_(True)
    mask = (ids >= K).float()
    out_e = 4  # masking output is fp32 here (bf16 x + fp32 pos), as under autocast in the model
    return {
        "masking": dict(
            args=(x, noise, K, pos), fused=masking_mod.random_masking, ref=masking_mod.random_masking_reference,
            grad_inputs=(x,), shape=[batch, L, D],
            fwd_bytes=batch * L * 4 + batch * K * D * (e + out_e) + batch * L * (4 + 8),
            bwd_bytes=batch * K * D * out_e + batch * L * 8 + batch * L * D * e,
        ),
        "unshuffle": dict(
            args=(xv, tok, ids, pos_d), fused=unshuffle_mod.unshuffle, ref=unshuffle_mod.unshuffle_reference,
            grad_inputs=(xv, tok), shape=[batch, L, Dd],
            fwd_bytes=batch * (1 + K) * Dd * e + batch * L * 8 + batch * (1 + L) * Dd * e,
            bwd_bytes=batch * (1 + L) * Dd * e + batch * L * 8 + batch * (1 + K) * Dd * e,
        ),
        "masked_mse": dict(
            args=(pred, imgs, mask, p, True), fused=mse_mod.masked_mse, ref=mse_mod.masked_mse_reference,
            grad_inputs=(pred,), shape=[batch, L, P],
            fwd_bytes=batch * (L - K) * P * (e + 4) + batch * L * 4,
            bwd_bytes=batch * (L - K) * P * (e + 4) + batch * L * 4 + batch * L * P * e,
        ),
    }  # fmt: skip


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_b,vit_l,vit_h")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="batch 2, ViT-B only: checks the script, not a measurement")
    ap.add_argument("--peak-gbps", type=float, default=3000.0, help="HBM bandwidth for frac_peak_bw (H100: ~3000)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    fused_ok = device.type == "cuda"
    batch, models = (2, ["vit_b"]) if args.smoke else (args.batch, args.models.split(","))
    env = env_info(device)
    env["smoke"] = args.smoke
    results = Rows("kernels" + ("-smoke" if args.smoke else ""), env, args.out)  # rewritten after every row
    rows = results.rows
    for model in models:
        for op, c in _cases(model, batch, device, torch.bfloat16).items():
            compiled = torch.compile(c["ref"])
            impls = {"eager_reference": c["ref"], "compiled_reference": compiled}
            if fused_ok:
                impls = {"fused": c["fused"], **impls}
                got, want = _first(c["fused"](*c["args"])), _first(c["ref"](*c["args"]))
                tol = 1e-5 if op == "masked_mse" else 0.0
                assert ((got.float() - want.float()).abs().max() <= tol * want.float().abs().max()).item(), op
            for impl, fn in impls.items():
                out0 = _first(fn(*c["args"]))
                grad = torch.ones_like(out0) if out0.dim() == 0 else torch.randn_like(out0)

                def fwd(fn=fn, a=c["args"]):
                    with torch.no_grad():
                        fn(*a)

                def fwd_bwd(fn=fn, grad=grad, a=c["args"], inputs=c["grad_inputs"]):
                    torch.autograd.grad(_first(fn(*a)), inputs, grad)

                for pass_name, f, nbytes in (("fwd", fwd, c["fwd_bytes"]),
                                             ("fwd+bwd", fwd_bwd, c["fwd_bytes"] + c["bwd_bytes"])):  # fmt: skip
                    ms = time_ms(f, device, args.reps)
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    results.add({"name": "kernel", "op": op, "impl": impl, "pass": pass_name, "model": model,
                                 "shape": c["shape"], "dtype": "bf16", "ms": ms, "gb_per_s": gbps,
                                 "frac_peak_bw": gbps / args.peak_gbps if device.type == "cuda" else None})  # fmt: skip
                    print(f"{model:6s} {op:10s} {pass_name:8s} {impl:18s} {ms:9.3f} ms {gbps:8.1f} GB/s")
    if not fused_ok:
        print("no CUDA device: the fused Triton ops were not timed (the interpreter's speed means nothing)")
    print(f"results: {results.path}")
    return rows


if __name__ == "__main__":
    sys.exit(cli(main))
