"""Static report of the fused kernels compiled for real GPUs, on any machine: no GPU or driver needed.

Triton compiles ahead of time for a CUDA target with its bundled ptxas, and ``cuobjdump --dump-resource-usage`` (from
Triton's nvidia backend) reads each cubin's registers, shared memory and local-memory spills. This script runs the
launchers of every fused op (forward and backward) at the ViT-B/16, ViT-L/16 and ViT-H/14 shapes, with 3 bands (RGB)
and with 1, 4 and 13 (gray, RGB + near infrared, Sentinel-2: ``vit_b16/c13``; only the loss's patch of p*p*C values
depends on them), fp32 and bf16, norm-pix on and off, records each launch configuration instead of running it (block
sizes do not depend on the batch, so batch 2 stands for 256), compiles each distinct one for sm_80 and sm_90, and
writes rows

    {"name": "kernel_static", "kernel", "arch", "dtype", "shape", "block", "num_warps", "num_stages", "registers",
     "shared_bytes", "spill_bytes", "occupancy"}

with occupancy = resident warps / 64 per SM from registers (allocated per warp in 256s, 64 K per SM), warps
(64 per SM, 32 blocks at most) and shared memory (sm_80: 164 KB, sm_90: 228 KB per SM). Static: what the hardware
could keep resident, not a measured speed.

    python benchmarks/kernel_static.py [--out benchmarks/results/kernel-static.json] [--check]

``--check`` exits 1 if any kernel spills or has less than 25% theoretical occupancy on sm_90.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # compile, do not interpret (before fastmae is imported; an importer keeps its own mode)
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _harness import RESULTS, env_info, write_results  # noqa: E402

# (patches, encoder width, decoder width, patch size) at 224 px
SHAPES = {"vit_b16": (196, 768, 512, 16), "vit_l16": (196, 1024, 512, 16), "vit_h14": (256, 1280, 512, 14)}
CHANNELS = (3, 1, 4, 13)  # band counts: RGB first (its rows are named by the model alone), then gray, RGB+NIR, S2
ARCHS = {"sm_80": (80, 164 * 1024), "sm_90": (90, 228 * 1024)}
MIN_OCCUPANCY = 0.25
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32",
          torch.uint8: "u8"}


class _Recorder:
    """Replaces ``JITFunction.run`` while the launchers run: each launch is recorded, nothing executes."""

    def __init__(self):
        self.launches: list[tuple[JITFunction, dict, dict, int, int]] = []

    def __enter__(self):
        self._run = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            bound = dict(zip(fn.arg_names, args, strict=False))
            bound.update(kwargs)
            recorder.launches.append((fn, bound, options.get("num_warps", 4), options.get("num_stages", 3)))

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run
        return False


def capture(shape: str, dtype: torch.dtype, norm_pix: bool, chans: int = 3) -> list:
    """Every kernel launch (forward and backward) the three fused ops make at ``shape`` with ``chans`` bands in
    ``dtype``."""
    from fastmae.kernels.crop_resize import crop_resize_normalize
    from fastmae.kernels.masked_mse import masked_mse
    from fastmae.kernels.masking import random_masking
    from fastmae.kernels.unshuffle import unshuffle

    L, D, Dd, p = SHAPES[shape]
    N, K = 2, int(L * 0.25)
    with _Recorder() as rec:
        x = torch.zeros(N, D, L, dtype=dtype).transpose(1, 2).requires_grad_(True)  # the patch embedding's layout
        out, _, ids = random_masking(x, torch.rand(N, L), K, torch.zeros(1, L + 1, D))
        out.sum().backward()
        xd = torch.zeros(N, 1 + K, Dd, dtype=dtype, requires_grad=True)
        tok = torch.zeros(1, 1, Dd, requires_grad=True)
        unshuffle(xd, tok, torch.arange(L).repeat(N, 1), torch.zeros(1, L + 1, Dd)).sum().backward()
        pred = torch.zeros(N, L, p * p * chans, dtype=dtype, requires_grad=True)
        masked_mse(pred, torch.zeros(N, chans, 224, 224), torch.ones(N, L), p, norm_pix).backward()
        # --loader gpu's augmentation: one configuration whatever the model (ImageNet-sized images to 224 px)
        imgs = [torch.zeros(3, 375, 500, dtype=torch.uint8), torch.zeros(3, 333, 500, dtype=torch.uint8)]
        crop_resize_normalize(imgs, [(10, 20, 300, 250), (0, 0, 500, 333)], [0, 1], 224)
    return rec.launches


def _signature(fn: JITFunction, bound: dict) -> tuple[dict, dict]:
    sig, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        value = bound[name]
        if i in fn.constexprs:
            sig[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if abs(int(value)) >= 2**31 else "i32"
    return sig, constexprs


def _resources(cubin: bytes) -> dict:
    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    fields = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", text))
    return {k: int(v) for k, v in fields.items()}


def occupancy(registers: int, warps: int, shared: int, smem_per_sm: int) -> float:
    """Theoretical occupancy (resident warps / 64) of a kernel on an SM with 64 K registers and 64 warps."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_warps = 64 // warps
    by_smem = smem_per_sm // shared if shared else 32
    return min(by_regs, by_warps, by_smem, 32) * warps / 64


def report() -> list[dict]:
    """One row per distinct launch configuration and architecture; ``shape`` lists the models that launch it."""
    configs: dict[tuple, dict] = {}
    for chans in CHANNELS:
        for shape in SHAPES:
            label = shape if chans == 3 else f"{shape}/c{chans}"
            for dtype in (torch.float32, torch.bfloat16):
                for norm_pix in (False, True):
                    for fn, bound, warps, stages in capture(shape, dtype, norm_pix, chans):
                        sig, constexprs = _signature(fn, bound)
                        key = (fn.__name__, tuple(sig.items()), tuple(constexprs.items()), warps, stages)
                        new = {"fn": fn, "sig": sig, "constexprs": constexprs, "warps": warps, "stages": stages,
                               "dtype": _TYPES[dtype], "shapes": []}  # fmt: skip
                        entry = configs.setdefault(key, new)
                        if label not in entry["shapes"]:
                            entry["shapes"].append(label)
    rows = []
    for c in configs.values():
        fn, constexprs = c["fn"], c["constexprs"]
        for arch, (cc, smem) in ARCHS.items():
            kernel = triton.compile(ASTSource(fn, c["sig"], constexprs), target=GPUTarget("cuda", cc, 32),
                                    options={"num_warps": c["warps"], "num_stages": c["stages"]})  # fmt: skip
            res = _resources(kernel.asm["cubin"])
            shared = max(res.get("SHARED", 0), kernel.metadata.shared)
            rows.append({
                "name": "kernel_static", "kernel": fn.__name__, "arch": arch, "dtype": c["dtype"],
                "shape": ",".join(c["shapes"]) + " (batch 256)", "norm_pix": constexprs.get("NORM"),
                "block": {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}, "num_warps": c["warps"],
                "num_stages": c["stages"], "registers": res.get("REG", 0), "shared_bytes": shared,
                "spill_bytes": res.get("LOCAL", 0), "occupancy": occupancy(res.get("REG", 0), c["warps"], shared, smem),
            })  # fmt: skip
    return rows


def problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["spill_bytes"]:
            out.append(f"{r['kernel']} {r['arch']} {r['dtype']} {r['shape']}: spills {r['spill_bytes']} bytes")
        if r["arch"] == "sm_90" and r["occupancy"] < MIN_OCCUPANCY:
            out.append(f"{r['kernel']} sm_90 {r['dtype']} {r['shape']} {r['block']}: occupancy "
                       f"{100 * r['occupancy']:.1f}% < {100 * MIN_OCCUPANCY:.0f}% ({r['registers']} registers, "
                       f"{r['num_warps']} warps)")  # fmt: skip
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "kernel-static.json"), help="results JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 on a spill or < 25%% occupancy on sm_90")
    args = ap.parse_args(argv)
    rows = report()
    for r in rows:
        print(f"{r['kernel']:16s} {r['arch']} {r['dtype']} {str(r['norm_pix']):5s} {str(r['block']):42s} warps "
              f"{r['num_warps']} regs {r['registers']:3d} smem {r['shared_bytes']:6d} spill {r['spill_bytes']} "
              f"occupancy {100 * r['occupancy']:5.1f}%")  # fmt: skip
    env = {**env_info(torch.device("cpu")), "targets": list(ARCHS), "compiled_with": f"triton {triton.__version__}"}
    path = write_results("kernel-static", rows, env, args.out)
    print(f"wrote {path}: {len(rows)} compiled configurations")
    bad = problems(rows)
    for line in bad:
        print("PROBLEM:", line)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
