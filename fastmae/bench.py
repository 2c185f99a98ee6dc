"""``fastmae bench``: the pretraining step of the official models in several configurations side by side, in one run.

Configurations (``config`` x ``encoder_mode``):

- ``eager`` / ``visible``: the official semantics as plain PyTorch: reference ops, ``math`` attention, no compile.
- ``fastmae`` / ``visible``: Triton ops (on CUDA), attention ``auto``, ``torch.compile`` (on CUDA).
- ``fastmae`` / ``mask_token``: the same fast settings with the encoder run on every patch (the paper's baseline).

All use bf16 autocast on CUDA (fp32 on CPU) and a full step: forward, backward, AdamW. Before timing, the fast
configuration's loss is checked against the eager one on the same weights, images and masks. Rows record what
actually ran (attention backend, kernels), img/s, model TFLOP/s (3x the forward matmul FLOPs of
:func:`fastmae.flops_per_image`), MFU against the GPU's dense bf16 peak, and peak memory per image.
``--quick`` runs tiny shapes on whatever device there is, to check the suite end to end (the tests run it).
``--report`` turns a results JSON into a PNG chart and the README's results table.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import subprocess
import time
from pathlib import Path

import torch

from .errors import FastMAEError
from .models import create_model, flops_per_image

REPO = Path(__file__).resolve().parent.parent
MODELS = ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")
BATCH = {"mae_vit_base_patch16": 256, "mae_vit_large_patch16": 128, "mae_vit_huge_patch14": 64}  # fixed per model
CASES = (("eager", "visible"), ("fastmae", "visible"), ("fastmae", "mask_token"))
# Dense bf16 tensor-core peaks (TFLOP/s) by GPU name fragment; H100 SXM as measured-achievable in DEVELOPERS.md.
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "4090": 165.0}
TABLE_START, TABLE_END = "<!-- fastmae-bench:start -->", "<!-- fastmae-bench:end -->"


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO)
    except OSError:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None


def env_info(device: torch.device) -> dict:
    """What ran: GPU (or "cpu"), CUDA, library versions, git sha, date."""
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "dali": _version("nvidia-dali-cuda120", "nvidia-dali-cuda130"),
        "timm": _version("timm"),
        "git_sha": git_sha(),
        "date": datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S"),
        "cpu_threads": torch.get_num_threads(),
    }


def peak_tflops(gpu: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(model_name: str, decoder_depth: int, config: str, mode: str, device: torch.device, quick: dict | None):
    fast = config == "fastmae"
    kernels = ("triton" if device.type == "cuda" else "reference") if fast else "reference"
    kw = dict(quick or {}, decoder_depth=decoder_depth, kernels=kernels, encoder_mode=mode,
              attn_backend="auto" if fast else "math")  # fmt: skip
    return create_model(model_name, **kw).to(device)


def profile_steps(step, device: torch.device, steps: int = 2, top: int = 10) -> list[dict]:
    """Where a step's time goes: ``steps`` steps under torch.profiler, the ``top`` kernels by self time (CUDA kernels
    on a GPU, CPU ops otherwise) with calls and ms per step, and their share of all kernel time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda or not cuda]

    def self_us(e) -> float:
        return getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total

    events = [e for e in events if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    return [{"kernel": e.key, "calls": e.count // steps, "ms_per_step": self_us(e) / 1e3 / steps,
             "share": self_us(e) / total} for e in events[:top]]  # fmt: skip


def pretrain_step_row(model_name, decoder_depth, config, mode, batch, device, steps, warmup, quick=None,
                      profile: bool = False) -> dict:  # fmt: skip
    """Time ``steps`` optimizer steps of one configuration; returns its results row (with ``profile``, also the
    top kernels of a profiled pass after the timing)."""
    torch.manual_seed(0)
    model = _build(model_name, decoder_depth, config, mode, device, quick)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    use_compile = config == "fastmae" and cuda
    step_model = torch.compile(model) if use_compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    imgs = torch.randn(batch, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1], device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step():
        with autocast:
            loss = step_model(imgs, mask_ratio=0.75)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - t0) / steps
    img_s = batch / seconds
    flops = 3 * flops_per_image(model)["total"]  # forward + backward (2x forward) matmul FLOPs per image
    tflops = flops * img_s / 1e12
    peak = peak_tflops(torch.cuda.get_device_name(device)) if cuda else None
    peak_mem = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    return {
        "name": "pretrain_step",
        "model": model_name,
        "decoder_depth": decoder_depth,
        "encoder_mode": mode,
        "config": config,
        "batch_size": batch,
        "img_size": model.patch_embed.img_size[0],
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "attn_backend": model.attn_backend_used or model.resolve_attention(device, dtype),
        "kernels": model.kernels_used(device),
        "embed": model.embed_used(device),
        "compile": use_compile,
        "img_per_s": img_s,
        "step_ms": seconds * 1e3,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_mem_gb": peak_mem,
        "peak_mem_gb_per_image": peak_mem / batch if cuda else None,
        "gflops_per_image": flops / 1e9,
        "profile": profile_steps(step, device) if profile else None,
    }


def check_fast_matches_eager(model_name, decoder_depth, device, quick=None, batch=2) -> float:
    """Loss of the fast configuration vs eager on the same weights, images and masks; raises if they disagree."""
    eager = _build(model_name, decoder_depth, "eager", "visible", device, quick)
    fast = _build(model_name, decoder_depth, "fastmae", "visible", device, quick)
    fast.load_state_dict(eager.state_dict())
    g = torch.Generator(device=device).manual_seed(0)
    size = eager.patch_embed.img_size
    imgs = torch.randn(batch, 3, *size, generator=g, device=device)
    noise = torch.rand(batch, eager.patch_embed.num_patches, generator=g, device=device)
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        a = eager(imgs, mask_ratio=0.75, noise=noise)[0].float().item()
        b = fast(imgs, mask_ratio=0.75, noise=noise)[0].float().item()
    rel = abs(a - b) / max(abs(a), 1e-12)
    if rel > (3e-2 if cuda else 1e-4):
        raise FastMAEError(f"{model_name}: fast loss {b:.6f} differs from eager {a:.6f} (rel {rel:.2e}); not timing")
    return rel


def run_suite(models=MODELS, decoder_depths=(8, 1), device=None, steps=10, warmup=3, quick=False, batch=None,
              log=print, profile: bool = False) -> list[dict]:  # fmt: skip
    """Rows for every model x decoder depth x configuration (see the module docstring)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = dict(img_size=32) if quick else None
    rows = []
    for name in models:
        for depth in decoder_depths:
            check_fast_matches_eager(name, depth, device, tiny)
            for config, mode in CASES:
                b = batch or (2 if quick else BATCH.get(name, 64))
                row = pretrain_step_row(name, depth, config, mode, b, device, steps, warmup, tiny, profile)
                rows.append(row)
                log(f"{name} dec{depth} {config:8s} {mode:10s} batch {b}: {row['img_per_s']:9.1f} img/s "
                    f"{row['tflops']:7.2f} TFLOP/s attn {row['attn_backend']} kernels "
                    f"{','.join(sorted(set(row['kernels'].values())))}")  # fmt: skip
                if row["profile"]:
                    top = ", ".join(f"{p['kernel'][:40]} {100 * p['share']:.0f}%" for p in row["profile"][:3])
                    log(f"    where the time goes: {top}")
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    """Same-run ratios per (model, decoder depth): fastmae/eager img/s, visible/mask_token, memory ratio."""
    out = []
    keys = sorted({(r["model"], r["decoder_depth"]) for r in rows if r["name"] == "pretrain_step"})
    for model, depth in keys:
        got = {(r["config"], r["encoder_mode"]): r for r in rows if (r.get("model"), r.get("decoder_depth")) ==
               (model, depth) and r["name"] == "pretrain_step"}  # fmt: skip
        e, f, m = got.get(("eager", "visible")), got.get(("fastmae", "visible")), got.get(("fastmae", "mask_token"))
        ratio = {"model": model, "decoder_depth": depth}
        ratio["fastmae_vs_eager"] = f["img_per_s"] / e["img_per_s"] if e and f else None
        ratio["visible_vs_mask_token"] = f["img_per_s"] / m["img_per_s"] if f and m else None
        ratio["mem_vs_eager"] = (
            f["peak_mem_gb_per_image"] / e["peak_mem_gb_per_image"] if e and f and e["peak_mem_gb_per_image"] else None
        )
        out.append(ratio)
    return out


def write_results(rows: list[dict], env: dict, out: str | Path | None = None) -> Path:
    """``{"env": ..., "rows": [...]}`` to ``out`` or ``./fastmae-bench-<gpu>-<date>.json`` (the current folder: never
    into the installed package)."""
    if out is None:
        gpu = env["gpu"].replace("NVIDIA ", "").replace(" ", "-").lower()
        out = Path.cwd() / f"fastmae-bench-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "rows": rows, "speedups": speedups(rows)}, indent=2) + "\n")
    return out


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def results_table(results: dict, source: str) -> str:
    """The README table (markdown) of a results JSON's pretrain_step rows, with same-run speedups."""
    env = results["env"]
    ratios = {(s["model"], s["decoder_depth"]): s for s in results.get("speedups") or speedups(results["rows"])}
    lines = [
        f"Measured on **{env['gpu']}** (torch {env['torch']}, triton {env.get('triton')}, xformers "
        f"{env.get('xformers') or 'not installed'}), git `{(env.get('git_sha') or '?')[:12]}`, {env['date']}; raw "
        f"JSON `{source}`.",
        "",
        "| model | dec | config | encoder | batch | dtype | attention | kernels | compile | img/s | TFLOP/s | MFU "
        "| peak GB/img | vs eager | visible vs mask-token |",
        "| --- | ---: | --- | --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        if r["name"] != "pretrain_step":
            continue
        s = ratios.get((r["model"], r["decoder_depth"]), {})
        fast = r["config"] == "fastmae" and r["encoder_mode"] == "visible"
        kernels = ",".join(sorted(set(r["kernels"].values())))
        lines.append(
            f"| {r['model']} | {r['decoder_depth']} | {r['config']} | {r['encoder_mode']} | {r['batch_size']} | "
            f"{r['dtype']} | {r['attn_backend']} | {kernels} | {'yes' if r['compile'] else 'no'} | "
            f"{r['img_per_s']:.1f} | {r['tflops']:.2f} | {_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}"
            f"{'%' if r['mfu'] else ''} | {_fmt(r['peak_mem_gb_per_image'], '.3f')} | "
            f"{_fmt(s.get('fastmae_vs_eager') if fast else None, '.2f')} | "
            f"{_fmt(s.get('visible_vs_mask_token') if fast else None, '.2f')} |"
        )
    return "\n".join(lines)


def update_readme(readme: Path, table: str, name: str = "fastmae-bench") -> None:
    """Replace what lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``readme`` with ``table``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = Path(readme).read_text()
    if start not in text or end not in text:
        raise FastMAEError(f"{readme} has no {start} ... {end} markers for the results table")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    Path(readme).write_text(f"{head}{start}\n{table}\n{end}{tail}")


def plot(results: dict, png: Path) -> Path:
    """Grouped bars of img/s per (model, decoder depth), one bar per configuration, speedups annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["name"] == "pretrain_step"]
    groups = sorted({(r["model"], r["decoder_depth"]) for r in rows}, key=lambda g: (MODELS + (g[0],)).index(g[0]))
    fig, ax = plt.subplots(figsize=(max(6, 2.4 * len(groups)), 4.2))
    width = 0.8 / len(CASES)
    for c, (config, mode) in enumerate(CASES):
        xs, ys = [], []
        for g, (model, depth) in enumerate(groups):
            hit = [r for r in rows if (r["model"], r["decoder_depth"], r["config"], r["encoder_mode"]) ==
                   (model, depth, config, mode)]  # fmt: skip
            if hit:
                xs.append(g + (c - (len(CASES) - 1) / 2) * width)
                ys.append(hit[0]["img_per_s"])
        bars = ax.bar(xs, ys, width, label=f"{config} / {mode}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ratios = {(s["model"], s["decoder_depth"]): s for s in results.get("speedups") or speedups(results["rows"])}
    labels = []
    for model, depth in groups:
        s = ratios.get((model, depth), {})
        labels.append(f"{model.replace('mae_vit_', '')}\ndec{depth}\n{_fmt(s.get('fastmae_vs_eager'), '.2f')}x eager, "
                      f"{_fmt(s.get('visible_vs_mask_token'), '.2f')}x [M]")  # fmt: skip
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylabel("images / s (pretrain step)")
    ax.set_title(f"fastmae pretrain step on {results['env']['gpu']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def merge_results(paths: list[Path]) -> dict:
    """Several results JSONs of one machine (a GPU sitting writes one per call) as one: rows concatenated, speedups
    recomputed, the first file's env (the others' git sha and date must not differ in GPU)."""
    merged = None
    for path in paths:
        try:
            results = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise FastMAEError(f"--report {path}: cannot read results JSON ({exc})") from exc
        if merged is None:
            merged = {"env": results["env"], "rows": []}
        elif results["env"]["gpu"] != merged["env"]["gpu"]:
            raise FastMAEError(f"--report {path} was measured on {results['env']['gpu']}, not "
                               f"{merged['env']['gpu']}: compare timings of one machine only")  # fmt: skip
        merged["rows"] += results["rows"]
    merged["speedups"] = speedups(merged["rows"])
    return merged


def report(json_path, png: str | Path | None = None, readme: str | Path | None = None) -> dict:
    """Chart and README table from one committed results JSON or several merged (never typed by hand)."""
    paths = [Path(p) for p in ([json_path] if isinstance(json_path, str | Path) else json_path)]
    results = merge_results(paths)
    png = Path(png) if png else paths[0].with_suffix(".png")
    plot(results, png)
    table = results_table(results, ", ".join(p.name for p in paths))
    if readme:
        update_readme(Path(readme), table + f"\n\n![pretrain step chart]({_relative(png, Path(readme).parent)})")
    return {"png": str(png), "table": table}


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def extra_rows(suite: str, quick: bool, log=print) -> list[dict]:
    """Rows of the kernel and loader scripts in ``benchmarks/`` (present in a source checkout)."""
    import importlib.util
    import tempfile

    script = REPO / "benchmarks" / f"bench_{suite}.py"
    if not script.exists():
        log(f"{suite}: {script} not found (benchmarks/ ships with the source checkout); skipped")
        return []
    spec = importlib.util.spec_from_file_location(f"bench_{suite}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        module.main([*(["--smoke"] if quick else []), "--out", str(out)])
        return json.loads(out.read_text())["rows"]
