"""What ``fastmae bench`` measured, read back: same-run ratios (:func:`speedups`), the docs table, the chart, and
several results files of one sitting merged (``fastmae bench --report``). MFU is computed here from each row's TFLOP/s
and the GPU's peaks (:func:`mfu_of`), so files written under an older convention read the same way."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fastmae.errors import FastMAEError
from fastmae.files import update_readme, write_json

MODELS = ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")
CASES = (("eager", "visible"), ("compiled-reference", "visible"), ("fastmae", "visible"), ("fastmae", "mask_token"))
CONFIG_NAMES = {"eager": CASES[0], "compiled-reference": CASES[1], "fastmae": CASES[2], "mask-token": CASES[3]}
# Dense bf16 tensor-core peaks (TFLOP/s), the datasheets' (MFU is stated against these, as the field does), by GPU name
# fragment, the more specific first; and a large bf16 matmul's rate (~790 on H100 / H200, as taken here: no fastmae
# sitting has timed one), for the second MFU column ("against the measured matmul peak").
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0,
               "L4": 121.0, "4090": 165.2}  # fmt: skip
MEASURED_PEAK_TFLOPS = {"H100 PCIe": None, "H200": 790.0, "H100": 790.0}
TABLE_START, TABLE_END = "<!-- fastmae-bench:start -->", "<!-- fastmae-bench:end -->"
BREAKDOWN = "fastmae-breakdown"  # docs/benchmarks.md markers of the where-the-time-goes table


def peak_tflops(gpu: str, table: dict = PEAK_TFLOPS) -> float | None:
    return next((v for k, v in table.items() if k in gpu), None)


def mfu_of(tflops: float | None, gpu: str) -> tuple[float | None, float | None]:
    """(MFU against the spec dense bf16 peak, MFU against the measured matmul peak) of a model rate in TFLOP/s (model
    FLOPs: 3 x the forward's, attention included); None where the GPU has no such peak (a CPU)."""
    spec, measured = peak_tflops(gpu), peak_tflops(gpu, MEASURED_PEAK_TFLOPS)
    if tflops is None:
        return None, None
    return (tflops / spec if spec else None), (tflops / measured if measured else None)


def default_results_path(env: dict) -> Path:
    gpu = env["gpu"].replace("NVIDIA ", "").replace(" ", "-").lower()
    return Path.cwd() / f"fastmae-bench-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def group_key(row: dict) -> tuple[str, int, int]:
    """(model, decoder depth, input bands): the rows compared with each other (rows before ``--in-chans``: 3)."""
    return row["model"], row["decoder_depth"], row.get("in_chans", 3)


def group_label(row: dict) -> str:
    """A group in words: ``mae_vit_base_patch16 dec8``, with `` 13 bands`` when not 3."""
    model, depth, chans = group_key(row)
    return f"{model} dec{depth}" + ("" if chans == 3 else f" {chans} bands")


def _best(rows: list[dict], config: str, mode: str) -> dict | None:
    """The fastest variant of a configuration among ``rows`` (plain or graphs), None when it did not run."""
    hit = [r for r in rows if (r["config"], r["encoder_mode"]) == (config, mode) and _ran(r)]
    return max(hit, key=lambda r: r["img_per_s"]) if hit else None


def _ran(row: dict) -> bool:
    """A timed row (not an out-of-memory or error row)."""
    return not row.get("oom") and not row.get("error")


def _per_batch(rows: list[dict]) -> list[dict]:
    """The fastmae visible rows of one model and depth, the best variant per batch size (an out-of-memory row where
    nothing else ran), by batch size."""
    by = {}
    for r in rows:
        if (r["config"], r["encoder_mode"]) == ("fastmae", "visible"):
            old = by.get(r["batch_size"])
            if old is None or not _ran(old) or (_ran(r) and r["img_per_s"] > old["img_per_s"]):
                by[r["batch_size"]] = r
    return [by[b] for b in sorted(by)]


def speedups(rows: list[dict]) -> list[dict]:
    """Same-run ratios per (model, decoder depth, input bands) at the fixed batch, each configuration at its best
    variant: fastmae vs eager, vs compiled-reference, visible vs mask-token, memory ratio; and, with a batch sweep, the
    best batch and the knee of the fastmae visible rows."""
    out = []
    steps = [r for r in rows if r["name"] == "pretrain_step"]
    keys = sorted({group_key(r) for r in steps})
    for model, depth, chans in keys:
        mine = [r for r in steps if group_key(r) == (model, depth, chans)]
        fixed = [r for r in mine if not r.get("sweep")]
        e, f = _best(fixed, "eager", "visible"), _best(fixed, "fastmae", "visible")
        c, m = _best(fixed, "compiled-reference", "visible"), _best(fixed, "fastmae", "mask_token")
        ratio = {"model": model, "decoder_depth": depth, "in_chans": chans}
        ratio["fastmae_vs_eager"] = f["img_per_s"] / e["img_per_s"] if e and f else None
        ratio["fastmae_vs_compiled_reference"] = f["img_per_s"] / c["img_per_s"] if c and f else None
        ratio["visible_vs_mask_token"] = f["img_per_s"] / m["img_per_s"] if f and m else None
        ratio["best_variant"] = f.get("variant", "plain") if f else None
        ratio["mfu"] = f.get("mfu") if f else None
        ratio["mem_vs_eager"] = (
            f["peak_mem_gb_per_image"] / e["peak_mem_gb_per_image"] if e and f and e["peak_mem_gb_per_image"] else None
        )
        sweep = [r for r in _per_batch(mine) if _ran(r)]
        if len(sweep) > 1:
            top = max(sweep, key=lambda r: r["img_per_s"])
            knee = next(r for r in sweep if r["img_per_s"] >= 0.95 * top["img_per_s"])
            ratio.update(best_batch=top["batch_size"], best_batch_img_per_s=top["img_per_s"],
                         best_batch_mfu=top.get("mfu"), knee_batch=knee["batch_size"],
                         oom_batches=sorted({r["batch_size"] for r in mine if r.get("oom")}))  # fmt: skip
        out.append(ratio)
    return out


def write_results(rows: list[dict], env: dict, out: str | Path | None = None) -> Path:
    """``{"env": ..., "rows": [...], "speedups": [...]}`` to ``out`` or ``./fastmae-bench-<gpu>-<date>.json`` (the
    current folder: never into the installed package), atomically."""
    path = Path(out) if out is not None else default_results_path(env)
    return write_json(path, {"env": env, "rows": rows, "speedups": speedups(rows)})


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _compiled(row: dict) -> str:
    """The compile column: ``no``, or the variant (and mode when not the default); older rows said True / False."""
    variant = {True: "full", False: "off", None: "off"}.get(row.get("compile"), row.get("compile"))
    if variant == "off":
        return "no"
    mode = row.get("compile_mode")
    return variant + (f" {mode}" if mode and mode != "default" else "")


def _bands(row: dict) -> str:
    chans = row.get("in_chans", 3)
    return "" if chans == 3 else f" ({chans} bands)"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def results_table(results: dict, source: str) -> str:
    """The docs table (markdown) of a results JSON's pretrain_step rows, with same-run speedups (on the fastest
    fastmae visible row at the fixed batch), then the batch sweeps, the optimizer rows and what failed. MFU is
    computed here from each row's TFLOP/s and the GPU's peaks (:func:`mfu_of`), so files written under an older
    convention read the same way."""
    env = results["env"]
    gpu = env.get("gpu") or "cpu"
    ratios = {group_key(s): s for s in results.get("speedups") or speedups(results["rows"])}
    lines = [
        f"Measured on **{gpu}** (torch {env['torch']}, triton {env.get('triton')}, xformers "
        f"{env.get('xformers') or 'not installed'}), git `{(env.get('git_sha') or '?')[:12]}`, {env['date']}; raw "
        f"JSON `{source}`. MFU: model FLOPs (3 x forward, attention included) / the spec dense bf16 peak "
        f"({_fmt(peak_tflops(gpu), '.1f')} TFLOP/s); beside it against the measured matmul peak "
        f"({_fmt(peak_tflops(gpu, MEASURED_PEAK_TFLOPS), '.0f')}).",
        "",
        "| model | dec | config | encoder | variant | batch | dtype | attention | kernels | compile | img/s | TFLOP/s "
        "| MFU | MFU (measured peak) | peak GB/img | vs eager | vs compiled-reference | visible vs mask-token |",
        "| --- | ---: | --- | --- | --- | ---: | --- | --- | --- | --- |" + " ---: |" * 8,
    ]
    steps = [r for r in results["rows"] if r["name"] == "pretrain_step" and not r.get("sweep")]
    best = {}
    for key in ratios:
        mine = [r for r in steps if group_key(r) == key]
        best[key] = _best(mine, "fastmae", "visible")
    for r in steps:
        if not _ran(r):
            continue
        s = ratios.get(group_key(r), {})
        lead = r is best.get(group_key(r))
        kernels = ",".join(sorted(set(r["kernels"].values())))
        mfu, mfu_measured = mfu_of(r["tflops"], gpu)
        lines.append(
            f"| {r['model']}{_bands(r)} | {r['decoder_depth']} | {r['config']} | {r['encoder_mode']} | "
            f"{r.get('variant', 'plain')} | {r['batch_size']} | {r['dtype']} | {r['attn_backend']} | {kernels} | "
            f"{_compiled(r)} | {r['img_per_s']:.1f} | {r['tflops']:.2f} | {_pct(mfu)} | {_pct(mfu_measured)} | "
            f"{_fmt(r['peak_mem_gb_per_image'], '.3f')} | "
            f"{_fmt(s.get('fastmae_vs_eager') if lead else None, '.2f')} | "
            f"{_fmt(s.get('fastmae_vs_compiled_reference') if lead else None, '.2f')} | "
            f"{_fmt(s.get('visible_vs_mask_token') if lead else None, '.2f')} |"
        )
    for s in ratios.values():
        if s.get("best_batch") is not None:
            sweep = _per_batch([r for r in results["rows"] if r["name"] == "pretrain_step" and
                                group_key(r) == group_key(s)])  # fmt: skip
            seen = ", ".join(f"{r['batch_size']}: " + ("out of memory" if r.get("oom") else f"failed ({r['error']})"
                             if r.get("error") else f"{r['img_per_s']:.0f} img/s, {_fmt(r.get('peak_mem_gb'), '.1f')} "
                             "GB") for r in sweep)  # fmt: skip
            top = next(r for r in sweep if _ran(r) and r["batch_size"] == s["best_batch"])
            top_mfu = mfu_of(top["tflops"], gpu)[0]
            lines += ["", f"Batch sweep, {group_label(s)} fastmae visible: {seen}; best batch "
                      f"{s['best_batch']} ({s['best_batch_img_per_s']:.0f} img/s, MFU {_pct(top_mfu)}), knee "
                      f"{s['knee_batch']} (the smallest batch within 5% of the best)."]  # fmt: skip
    opt = [r for r in results["rows"] if r["name"] == "optimizer_step" and "ms" in r]
    if opt:
        lines += ["", "AdamW update alone: " + ", ".join(f"{r['model']} {r['impl']} {r['ms']:.2f} ms" for r in opt)]
    failed = [r for r in results["rows"] if r.get("error") or r.get("ok") is False]
    if failed:
        lines += ["", "Did not run: " + "; ".join(
            f"{r.get('model')} dec{r.get('decoder_depth')}{_bands(r)} {r.get('config', r['name'])} "
            f"{r.get('encoder_mode', '')} {r.get('variant', '')} "
            f"({r.get('error') or 'loss differs from eager'})".replace("  ", " ")
            for r in failed)]  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, png: Path) -> Path:
    """Grouped bars of img/s per (model, decoder depth), one bar per configuration, speedups annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["name"] == "pretrain_step" and not r.get("sweep") and _ran(r)]
    groups = sorted({group_key(r) for r in rows}, key=lambda g: ((MODELS + (g[0],)).index(g[0]), g[1:]))
    fig, ax = plt.subplots(figsize=(max(6, 2.4 * len(groups)), 4.2))
    width = 0.8 / len(CASES)
    for c, (config, mode) in enumerate(CASES):
        xs, ys = [], []
        for g, key in enumerate(groups):
            hit = _best([r for r in rows if group_key(r) == key], config, mode)
            if hit:
                xs.append(g + (c - (len(CASES) - 1) / 2) * width)
                ys.append(hit["img_per_s"])
        bars = ax.bar(xs, ys, width, label=f"{config} / {mode}")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ratios = {group_key(s): s for s in results.get("speedups") or speedups(results["rows"])}
    labels = []
    for model, depth, chans in groups:
        s = ratios.get((model, depth, chans), {})
        bands = "" if chans == 3 else f", {chans} bands"
        labels.append(f"{model.replace('mae_vit_', '')}\ndec{depth}{bands}\n"
                      f"{_fmt(s.get('fastmae_vs_eager'), '.2f')}x eager, "
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


def report(json_path, png: str | Path | None = None, readme: str | Path | None = None,
           marker: str = "fastmae-bench") -> dict:  # fmt: skip
    """Chart and table (between the ``marker`` markers of ``readme``, docs/benchmarks.md) from one committed results
    JSON or several merged (never typed by hand)."""
    paths = [Path(p) for p in ([json_path] if isinstance(json_path, str | Path) else json_path)]
    results = merge_results(paths)
    png = Path(png) if png else paths[0].with_suffix(".png")
    plot(results, png)
    names = ", ".join(p.name for p in paths)
    table = results_table(results, names)
    from fastmae.profiling import breakdown_table

    parts = breakdown_table(results["rows"], names, results["env"])
    if readme:
        update_readme(Path(readme), table + f"\n\n![pretrain step chart]({_relative(png, Path(readme).parent)})",
                      marker)  # fmt: skip
        profiled = any(r.get("breakdown") for r in results["rows"])
        if profiled and f"<!-- {BREAKDOWN}:start -->" in Path(readme).read_text():
            update_readme(Path(readme), parts, BREAKDOWN)
    return {"png": str(png), "table": table, "breakdown": parts}


def _relative(path: Path, base: Path) -> str:
    """``path`` as a link from a file in ``base``: ``../benchmarks/results/x.png`` from ``docs/``."""
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


