"""Attention at MAE's call sites, per backend: forward + backward time of every backend that can run each shape, in
one process, after checking each against ``math``. The measured table that ``--attn-backend auto`` reads on a GPU is
written from these rows (``--write-table``).

Call sites (batch as ``fastmae bench`` runs them, bf16): the visible-only encoder (cls + 25% of the patches: 50
tokens at ViT-B/L, head dim 64; 65 tokens at ViT-H/14, head dim 80), the mask-token encoder (every patch), and the
decoder (every patch + cls, head dim 32).

    python benchmarks/bench_attention.py --write-table fastmae/attention_table.json     # on the GPU
    python benchmarks/bench_attention.py --smoke                                        # tiny shapes, any device

xformers beside SDPA's kernels: ``xformers`` is fastmae's xformers backend (xformers' own order: its flash pair
``fa2F@<v>-pt`` / ``fa2B@<v>-pt`` first, wrapping PyTorch's flash kernel), ``xformers-cutlass`` forces its CUTLASS
pair ``cutlassF-pt`` / ``cutlassB-pt`` (wrapping PyTorch's memory-efficient kernel); each row names the operators
that ran (``op``). Only backends that ``--attn-backend`` accepts enter the table.

Rows: {"name": "attention", "model", "site", "backend", "op", "batch", "heads", "tokens", "head_dim", "dtype", "ms"
(fwd + bwd, or null with "reasons" or "error"), "rel_err" and "grad_rel_err" (output and q/k/v gradients against
float64 math)}. A backend is timed, and can enter the table, only after its output and gradients are within
tolerance. The results file (and the table) are rewritten after every row (every shape).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Rows, cli, env_info, row_error, time_ms  # noqa: E402
from fastmae.train.context import resolve_device  # noqa: E402

from fastmae import attention  # noqa: E402
from fastmae.files import write_json  # noqa: E402

CANDIDATES = ("flash", "cudnn", "efficient", "sdpa", "xformers", "xformers-cutlass", "math")
# (model, site, batch, heads, tokens, head_dim)
SHAPES = [
    ("mae_vit_base_patch16", "encoder", 256, 12, 50, 64), ("mae_vit_base_patch16", "decoder", 256, 16, 197, 32),
    ("mae_vit_large_patch16", "encoder", 128, 16, 50, 64), ("mae_vit_large_patch16", "decoder", 128, 16, 197, 32),
    ("mae_vit_large_patch16", "mask_token encoder", 128, 16, 197, 64),
    ("mae_vit_huge_patch14", "encoder", 64, 16, 65, 80), ("mae_vit_huge_patch14", "decoder", 64, 16, 257, 32),
]  # fmt: skip
SMOKE = [("tiny", "encoder", 2, 3, 17, 16), ("tiny", "decoder", 2, 2, 65, 8)]


TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2, "fp32": 1e-4}  # relative error against float64 math, output and gradients


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def measure(shape, backend: str, device: torch.device, dtype: torch.dtype, reps: int) -> dict:
    """One backend at one call site: its reasons not to run, or its output and q/k/v gradients against float64 math
    (``rel_err``, ``grad_rel_err``), then fwd+bwd ms when both are within :data:`TOLERANCE`. Any error on the way (a
    kernel torch refuses for these inputs, a failing backward, an illegal memory access) is the row's ``error``: no
    backend wins that has not run forward and backward correctly."""
    model, site, batch, heads, tokens, head_dim = shape
    row = {"name": "attention", "model": model, "site": site, "backend": backend, "batch": batch, "heads": heads,
           "tokens": tokens, "head_dim": head_dim, "dtype": attention.dtype_name(dtype), "ms": None}  # fmt: skip
    g = torch.Generator(device=device).manual_seed(tokens * head_dim)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, generator=g, dtype=dtype).requires_grad_()
               for _ in range(3))  # fmt: skip
    impl = attention.XFormersAttention("cutlass") if backend == "xformers-cutlass" else attention.get_backend(backend)
    row["op"] = backend if backend in ("flash", "cudnn", "efficient", "math") else None  # sdpa: torch's choice
    if reasons := impl.unsupported(q, k, v):
        return {**row, "reasons": reasons}
    try:
        out = impl(q, k, v)
        if backend.startswith("xformers"):
            used = attention.xformers_ops_used()
            row["op"] = f"{used['forward']} + {used['backward']} (C++ extension {used['extension']})"
        grad = torch.randn(out.shape, device=device, generator=g, dtype=dtype)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = attention.get_backend("math")(qd, kd, vd)
        ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad.double())
        row["rel_err"] = _rel(out, ref.detach())
        row["grad_rel_err"] = max(_rel(a, b) for a, b in zip(grads, ref_grads, strict=True))
        tol = TOLERANCE.get(row["dtype"], 2e-2)
        if not (row["rel_err"] <= tol and row["grad_rel_err"] <= tol):  # NaN fails too
            return {**row, "error": f"output {row['rel_err']:.2e} / gradients {row['grad_rel_err']:.2e} off math "
                                    f"(tolerance {tol:g}): not timed"}  # fmt: skip

        def fwd_bwd():
            torch.autograd.grad(impl(q, k, v), (q, k, v), grad)

        row["ms"] = time_ms(fwd_bwd, device, reps)
    except Exception as exc:  # torch's own checks, a kernel failing at these shapes: a row, not the end of the run
        return {**row, "ms": None, "error": row_error(exc)}
    return row


def entry_key(e: dict) -> tuple:
    """What a table entry is measured at: the GPU, dtype and call site's shape, and the model and batch it is of (an
    entry written before entries named them has neither: its shape alone)."""
    return (e["gpu"], e["dtype"], e.get("model"), e.get("site"), e.get("batch"), e["head_dim"], e["tokens"],
            e.get("batch_heads"))  # fmt: skip


def table_entries(rows: list[dict], env: dict, source: str) -> list[dict]:
    """One entry per measured call site (model, site, batch): every backend's fwd+bwd ms and the fastest (within 2% of
    the fastest, the earlier of :data:`CANDIDATES`: no switch for noise). ViT-B's and ViT-L's encoders have the same
    head dim and tokens at other batch x heads: each keeps its own entry."""
    out = {}
    for r in rows:
        if r["ms"] is None or r.get("error") or r["backend"] not in attention.BACKENDS:  # checked, and choosable
            continue
        key = (r["dtype"], r["model"], r["site"], r["batch"], r["heads"], r["head_dim"], r["tokens"])
        e = out.setdefault(key, {"gpu": env["gpu"], "dtype": r["dtype"], "model": r["model"], "site": r["site"],
                                 "batch": r["batch"], "head_dim": r["head_dim"], "tokens": r["tokens"],
                                 "batch_heads": r["batch"] * r["heads"], "ms": {}, "source": source})  # fmt: skip
        e["ms"][r["backend"]] = r["ms"]
    for e in out.values():
        fastest = min(e["ms"].values())
        e["best"] = next(b for b in CANDIDATES if e["ms"].get(b, float("inf")) <= 1.02 * fastest)
    return list(out.values())


def write_table(path: Path, entries: list[dict]) -> None:
    """Merge ``entries`` into the table at ``path``: an entry of the same GPU, dtype, model, site, batch and shape is
    replaced, every other kept (older entries without model and batch too)."""
    keys = {entry_key(e) for e in entries}
    old = json.loads(path.read_text()).get("entries", []) if path.exists() else []
    kept = [e for e in old if entry_key(e) not in keys]
    doc = {"about": "fwd+bwd ms per attention backend at MAE's call sites, per model and batch, written by "
                    "benchmarks/bench_attention.py; --attn-backend auto on a GPU takes each site's fastest "
                    "(fastmae.attention.measured_choice)",
           "entries": sorted(kept + entries, key=lambda e: tuple(str(x) for x in entry_key(e)))}  # fmt: skip
    write_json(path, doc)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda (default: auto)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per backend on a CPU (a GPU uses do_bench)")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/attention-<gpu>-<date>)")
    ap.add_argument("--write-table", default=None, metavar="JSON", help="merge the fastest per shape into this table")
    args = ap.parse_args(argv)
    device = resolve_device(args.device or "auto")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = env_info(device)
    results = Rows("attention", env, args.out)
    for shape in SMOKE if args.smoke else SHAPES:
        for backend in CANDIDATES:
            row = results.add(measure(shape, backend, device, dtype, args.reps))  # the file holds every row so far
            took = f"{row['ms']:.3f} ms" if row["ms"] is not None else row.get("error") or "; ".join(row["reasons"])
            print(f"{shape[0]:22s} {shape[1]:18s} {backend:16s} {took[:100]}", flush=True)
        if args.write_table:  # after each shape: a run stopped later still leaves the shapes it measured
            write_table(Path(args.write_table), table_entries(results.rows, env, f"benchmarks/results/"
                                                              f"{results.path.name}"))  # fmt: skip
    print(f"wrote {results.path}")
    if args.write_table:
        entries = table_entries(results.rows, env, f"benchmarks/results/{results.path.name}")
        print(f"{len(entries)} entries into {args.write_table}: " + ", ".join(
            f"{e['model']} {e['site']} (batch {e['batch']}, h{e['head_dim']}/{e['tokens']} tokens) -> {e['best']}"
            for e in entries))  # fmt: skip
    return {"rows": results.rows, "path": str(results.path)}


if __name__ == "__main__":
    sys.exit(cli(main))
