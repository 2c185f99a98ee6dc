"""``fastmae bench``: the pretraining step of the official models in several configurations side by side, in one run.

Configurations (``config`` x ``encoder_mode``):

- ``eager`` / ``visible``: the official semantics as plain PyTorch: reference ops, ``math`` attention, no compile.
- ``compiled-reference`` / ``visible``: what a user builds in five minutes: the reference ops, SDPA attention and
  ``torch.compile`` (on CUDA). fastmae's own work (kernels, visible-only embedding, graphs, tuning) is what the next
  row beats it by.
- ``fastmae`` / ``visible``: Triton ops (on CUDA), attention ``auto`` (per call site, from the measured table),
  ``torch.compile`` (on CUDA).
- ``fastmae`` / ``mask_token``: the same fast settings with the encoder run on every patch (the paper's baseline).

Every configuration runs the training loop's own step (:class:`fastmae.train.step.TrainStep`): a uint8 batch
normalised on the device, per-sample mask noise from the sample ids, bf16 autocast on CUDA (fp32 on CPU), forward,
backward, NaN guard and fused AdamW over the recipe's parameter groups. Before timing, the fast configuration's loss is
checked against the eager one on the same weights, images and masks (an ``equivalence`` row). Rows record what
actually ran (attention backend per call site, kernels, compile variant and mode, graphs), img/s, model TFLOP/s (3x
the forward FLOPs of :func:`fastmae.flops_per_image`: matmuls and attention), MFU against the GPU's spec dense bf16
peak (``mfu``, the field's convention) and against the measured matmul peak (``mfu_measured_peak``), and peak memory
per image (with graphs: from the capture on, where the step's activations are allocated). The results file is
rewritten after every row; a configuration that fails is a row with its ``error``, and the suite goes on.

Levers, each measured side by side in the same run: ``--graphs`` adds a ``graphs`` variant of every compiled
configuration (the whole step as one CUDA graph, on the same compiled model); ``--batches`` sweeps the batch size of
the fastmae rows (img/s and peak memory; the knee is the smallest batch within 5% of the best rate);
``--attn-backend`` forces backends per call site; ``--compile full,regional`` times each compile variant
(:mod:`fastmae.compiling`); ``--compile-mode`` picks inductor's mode; ``--optimizer-bench``
times fused AdamW against a compiled AdamW on the model's parameters. ``--profile`` adds where the time goes
(:mod:`fastmae.profiling`: time by category and idle). ``--quick`` runs tiny shapes on whatever device there is, to
check the suite end to end (the tests run it). ``--report`` turns results JSON into a PNG chart and the README's
tables.
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

from .compiling import DEFAULT_VARIANT, GRAPH_MODES, compile_model
from .config import COMPILE_MODES  # noqa: F401 (the --compile-mode choices)
from .errors import FastMAEError
from .files import write_json
from .models import create_model, flops_per_image

REPO = Path(__file__).resolve().parent.parent
MODELS = ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")
BATCH = {"mae_vit_base_patch16": 256, "mae_vit_large_patch16": 128, "mae_vit_huge_patch14": 64}  # fixed per model
CASES = (("eager", "visible"), ("compiled-reference", "visible"), ("fastmae", "visible"), ("fastmae", "mask_token"))
CONFIG_NAMES = {"eager": CASES[0], "compiled-reference": CASES[1], "fastmae": CASES[2], "mask-token": CASES[3]}
# Dense bf16 tensor-core peaks (TFLOP/s), the datasheets' (MFU is stated against these, as the field does), by GPU name
# fragment, the more specific first; and, where one was measured, a large bf16 matmul's rate (DEVELOPERS.md: ~790 on
# H100 / H200), for the second MFU column.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0,
               "L4": 121.0, "4090": 165.2}  # fmt: skip
MEASURED_PEAK_TFLOPS = {"H100 PCIe": None, "H200": 790.0, "H100": 790.0}
TABLE_START, TABLE_END = "<!-- fastmae-bench:start -->", "<!-- fastmae-bench:end -->"
BREAKDOWN = "fastmae-breakdown"  # README markers of the where-the-time-goes table


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


def peak_tflops(gpu: str, table: dict = PEAK_TFLOPS) -> float | None:
    return next((v for k, v in table.items() if k in gpu), None)


def mfu_of(tflops: float | None, gpu: str) -> tuple[float | None, float | None]:
    """(MFU against the spec dense bf16 peak, MFU against the measured matmul peak) of a model rate in TFLOP/s (model
    FLOPs: 3 x the forward's, attention included); None where the GPU has no such peak (a CPU)."""
    spec, measured = peak_tflops(gpu), peak_tflops(gpu, MEASURED_PEAK_TFLOPS)
    if tflops is None:
        return None, None
    return (tflops / spec if spec else None), (tflops / measured if measured else None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(model_name, decoder_depth, config, mode, device: torch.device, quick: dict | None, attn: str | None = None):
    fast = config == "fastmae"
    kernels = ("triton" if device.type == "cuda" else "reference") if fast else "reference"
    attn_backend = (attn or "auto") if fast else "sdpa" if config == "compiled-reference" else "math"
    kw = dict(quick or {}, decoder_depth=decoder_depth, kernels=kernels, encoder_mode=mode, attn_backend=attn_backend)
    return create_model(model_name, **kw).to(device)


def _top_kernels(prof, cuda: bool, steps: int, top: int = 10) -> list[dict]:
    """The ``top`` kernels by self time (CUDA kernels on a GPU, CPU ops otherwise) with calls and ms per step, and
    their share of all kernel time."""
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda or not cuda]

    def self_us(e) -> float:
        return getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total

    events = [e for e in events if self_us(e) > 0]
    total = sum(self_us(e) for e in events) or 1.0
    events.sort(key=self_us, reverse=True)
    return [{"kernel": e.key, "calls": e.count // steps, "ms_per_step": self_us(e) / 1e3 / steps,
             "share": self_us(e) / total} for e in events[:top]]  # fmt: skip


def profile_steps(step, device: torch.device, step_ms: float, steps: int = 2) -> tuple[list[dict], dict]:
    """``steps`` steps under torch.profiler: (top kernels, breakdown by category with idle; see
    :mod:`fastmae.profiling`)."""
    from torch.profiler import ProfilerActivity, profile

    from .profiling import breakdown

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    return _top_kernels(prof, cuda, steps), breakdown(prof, cuda, steps, step_ms)


class StepBench:
    """One configuration's model, compiled once, and the training step over it: :meth:`row` times a variant (the
    plain step, or the same step as one CUDA graph) on the same weights and compiled code. ``compile_variant`` is how
    the compiled configurations compile (:mod:`fastmae.compiling`); ``eager`` never does, nor anything on a CPU."""

    def __init__(self, model_name, decoder_depth, config, mode, batch, device, quick=None, attn=None,
                 compile_mode: str = "default", compile_variant: str = DEFAULT_VARIANT):  # fmt: skip
        from fastmae.train.schedule import build_optimizer

        torch.manual_seed(0)
        self.device, self.batch, self.config, self.mode = device, batch, config, mode
        self.model_name, self.decoder_depth, self.compile_mode = model_name, decoder_depth, compile_mode
        self.model = _build(model_name, decoder_depth, config, mode, device, quick, attn)
        cuda = device.type == "cuda"
        self.dtype = torch.bfloat16 if cuda else torch.float32
        self.compile = compile_variant if config != "eager" and cuda else "off"
        self.step_fn = compile_model(self.model, self.compile, compile_mode)
        # The recipe's AdamW (no weight decay on norms, biases, tokens), fused: the optimizer the loop runs.
        self.optimizer = build_optimizer(self.model, 1e-4, 0.05, (0.9, 0.95), fused=True)
        self.attn_backend = self.model.resolve_attention(device, self.dtype)
        size = self.model.patch_embed.img_size
        g = torch.Generator(device=device).manual_seed(0)
        self.imgs = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, device=device, generator=g)
        self.calls = 0

    def trainer(self, graphs: bool):
        from fastmae.train.step import TrainStep

        return TrainStep(self.model, self.step_fn, self.optimizer, seed=0, mask_ratio=0.75, device=self.device,
                         dtype=self.dtype if self.device.type == "cuda" else None, graphs=graphs)  # fmt: skip

    def _step(self, trainer):
        """One step on the fixed images with new sample ids (so new masks) every call."""
        k = self.calls
        self.calls += 1
        ids = torch.arange(k * self.batch, (k + 1) * self.batch, device=self.device)
        return trainer(self.imgs, ids, k // 1000, 1e-4)

    def row(self, variant: str, steps: int, warmup: int, profile: bool = False) -> dict:
        device = self.device
        cuda = device.type == "cuda"
        graphs = variant == "graphs"
        if graphs and self.compile != "off" and self.compile_mode in GRAPH_MODES:
            raise FastMAEError(f"--compile-mode {self.compile_mode} captures CUDA graphs of its own: not with --graphs")
        trainer = self.trainer(graphs=graphs)
        for _ in range(max(warmup, trainer.warmup + 2) if graphs else warmup):
            if cuda and trainer.captures_next:  # the capture allocates the step's activations (in the graph's pool)
                torch.cuda.reset_peak_memory_stats(device)
            self._step(trainer)
        _sync(device)
        if cuda and not graphs:  # an ordinary step allocates its activations at every step
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self._step(trainer)
        _sync(device)
        seconds = (time.perf_counter() - t0) / steps
        img_s = self.batch / seconds
        embed = self.model.embed_used(device)
        flops = 3 * flops_per_image(self.model, 0.75, embed)["total"]  # forward + backward (2x forward) per image
        tflops = flops * img_s / 1e12
        gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
        mfu, mfu_measured = mfu_of(tflops, gpu)
        peak_mem = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
        top = parts = None
        if profile:
            top, parts = profile_steps(lambda: self._step(trainer), device, seconds * 1e3)
        return {
            "name": "pretrain_step", "model": self.model_name, "decoder_depth": self.decoder_depth,
            "encoder_mode": self.mode, "config": self.config, "variant": variant, "batch_size": self.batch,
            "img_size": self.model.patch_embed.img_size[0], "dtype": "bf16" if cuda else "fp32",
            "attn_backend": self.attn_backend, "kernels": self.model.kernels_used(device), "embed": embed,
            "compile": self.compile, "compile_mode": self.compile_mode if self.compile != "off" else None,
            "graphs": trainer.captured, "img_per_s": img_s, "step_ms": seconds * 1e3, "tflops": tflops, "mfu": mfu,
            "mfu_measured_peak": mfu_measured, "peak_tflops": peak_tflops(gpu),
            "peak_mem_gb": peak_mem, "peak_mem_gb_per_image": peak_mem / self.batch if cuda else None,
            "gflops_per_image": flops / 1e9, "profile": top, "breakdown": parts,
        }  # fmt: skip


def pretrain_step_row(model_name, decoder_depth, config, mode, batch, device, steps, warmup, quick=None,
                      profile: bool = False) -> dict:  # fmt: skip
    """Time ``steps`` optimizer steps of one configuration (the plain step); returns its results row."""
    return StepBench(model_name, decoder_depth, config, mode, batch, device, quick).row("plain", steps, warmup, profile)


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


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def optimizer_rows(model_name: str, device: torch.device, quick: dict | None, steps: int = 10) -> list[dict]:
    """The optimizer lever: one AdamW update over the model's parameter groups (random gradients), fused AdamW (the
    loop's) against ``torch.compile`` of the foreach AdamW (lr as a tensor, so no recompile per lr), ms per update."""
    from fastmae.train.schedule import build_optimizer

    model = create_model(model_name, **(quick or {})).to(device)
    rows = []
    for impl in ("fused", "compiled"):
        opt = build_optimizer(model, 1e-4, 0.05, (0.9, 0.95), fused=impl == "fused")
        if impl == "compiled":
            for group in opt.param_groups:
                group["lr"] = torch.tensor(1e-4, device=device)
            step = torch.compile(opt.step) if device.type == "cuda" else opt.step
        else:
            step = opt.step
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        for _ in range(3):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rows.append({"name": "optimizer_step", "model": model_name, "impl": impl,
                     "compile": impl == "compiled" and device.type == "cuda",
                     "params": sum(p.numel() for p in model.parameters()),
                     "ms": (time.perf_counter() - t0) / steps * 1e3})  # fmt: skip
    return rows


def _error_line(exc: BaseException) -> str:
    """An exception as one line: its type and the last non-empty line of its message (torch puts the cause last)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}".rstrip(": ")


def check_graphs_mode(graphs: bool, compile_mode: str) -> None:
    """--graphs captures the whole step; a compile mode that captures graphs of its own inside it cannot go with it."""
    if graphs and compile_mode in GRAPH_MODES:
        raise FastMAEError(f"--compile-mode {compile_mode} captures CUDA graphs of its own, which --graphs captures "
                           "whole: use one of them (max-autotune-no-cudagraphs goes with --graphs)")  # fmt: skip


def run_suite(models=MODELS, decoder_depths=(8, 1), device=None, steps=10, warmup=3, quick=False, batch=None,
              log=print, profile: bool = False, configs=tuple(CONFIG_NAMES), graphs: bool = False,
              batches: tuple[int, ...] = (), attn: str | None = None, compile_mode: str = "default",
              optimizer_bench: bool = False, compile_variants: tuple[str, ...] = (DEFAULT_VARIANT,),
              on_row=None) -> list[dict]:  # fmt: skip
    """Rows for every model x decoder depth x configuration x compile variant (see the module docstring), then the
    levers asked for. ``on_row(row)`` sees each row as soon as it is measured (:class:`ResultsFile` writes it then). A
    configuration that fails (out of memory, a compile error, a kernel that cannot run) is a row with its one-line
    ``error``, and the suite goes on; a fast loss that disagrees with eager's is an ``equivalence`` row and that model
    and depth are not timed."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = dict(img_size=32) if quick else None
    chosen = [CONFIG_NAMES[c] for c in configs]
    cuda = device.type == "cuda"
    check_graphs_mode(graphs, compile_mode)
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    def measure(name, depth, config, mode, b, variants, variant_compile, sweep=False):
        base = {"name": "pretrain_step", "model": name, "decoder_depth": depth, "config": config,
                "encoder_mode": mode, "batch_size": b, "sweep": sweep,
                "compile": variant_compile if config != "eager" and cuda else "off"}  # fmt: skip
        bench = None
        try:
            bench = StepBench(name, depth, config, mode, b, device, tiny, attn if config == "fastmae" else None,
                              compile_mode, variant_compile)  # fmt: skip
        except Exception as exc:
            add({**base, "variant": variants[0], "error": _error_line(exc), "oom": _is_oom(exc)})
            log(f"{name} dec{depth} {config} {mode} batch {b}: {_error_line(exc)}")
        for variant in variants if bench is not None else ():
            what = f"{name} dec{depth} {config:18s} {mode:10s} {bench.compile:8s} {variant:6s} batch {b}"
            try:
                row = {**bench.row(variant, steps, warmup, profile and not sweep), "sweep": sweep}
            except Exception as exc:
                add({**base, "variant": variant, "error": _error_line(exc), "oom": _is_oom(exc)})
                log(f"{what}: {'out of memory' if _is_oom(exc) else _error_line(exc)}")
                _free(device)
                continue
            add(row)
            log(f"{what}: {row['img_per_s']:9.1f} img/s {row['tflops']:7.2f} TFLOP/s attn {row['attn_backend']} "
                f"kernels {','.join(sorted(set(row['kernels'].values())))}")  # fmt: skip
            if row["profile"]:
                top = ", ".join(f"{p['kernel'][:40]} {100 * p['share']:.0f}%" for p in row["profile"][:3])
                log(f"    where the time goes: {top}")
        del bench
        _free(device)

    for name in models:
        for depth in decoder_depths:
            try:
                rel = check_fast_matches_eager(name, depth, device, tiny)
                add({"name": "equivalence", "model": name, "decoder_depth": depth, "ok": True, "rel_loss_diff": rel})
            except Exception as exc:
                add({"name": "equivalence", "model": name, "decoder_depth": depth, "ok": False,
                     "error": _error_line(exc)})  # fmt: skip
                log(f"{name} dec{depth}: not timed: {_error_line(exc)}")
                _free(device)
                continue
            b = batch or (2 if quick else BATCH.get(name, 64))
            for config, mode in chosen:
                with_graphs = graphs and config != "eager" and cuda
                variants = ["plain", "graphs"] if with_graphs else ["plain"]
                for variant_compile in compile_variants if config != "eager" and cuda else (DEFAULT_VARIANT,):
                    measure(name, depth, config, mode, b, variants, variant_compile)
            for sweep_batch in batches:
                if sweep_batch == b:
                    continue
                for config, mode in chosen:
                    if config == "fastmae":
                        measure(name, depth, config, mode, sweep_batch, ["plain"], compile_variants[0], sweep=True)
        if optimizer_bench:
            try:
                for row in optimizer_rows(name, device, tiny):
                    add(row)
                log(f"{name} AdamW update: " + ", ".join(f"{r['impl']} {r['ms']:.2f} ms" for r in rows[-2:]))
            except Exception as exc:
                add({"name": "optimizer_step", "model": name, "error": _error_line(exc)})
    return rows


class ResultsFile:
    """A results JSON (``{"env", "rows", "speedups"}``) rewritten atomically after every row, so that a command
    stopped at its time budget leaves every row it had finished, and a crash never leaves half a file."""

    def __init__(self, path: str | Path, env: dict):
        self.path, self.env, self.rows = Path(path), env, []
        self.write()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def extend(self, rows: list[dict]) -> None:
        self.rows += rows
        self.write()

    def write(self) -> Path:
        return write_json(self.path, {"env": self.env, "rows": self.rows, "speedups": speedups(self.rows)})


def default_results_path(env: dict) -> Path:
    gpu = env["gpu"].replace("NVIDIA ", "").replace(" ", "-").lower()
    return Path.cwd() / f"fastmae-bench-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.json"


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
    """Same-run ratios per (model, decoder depth) at the fixed batch, each configuration at its best variant:
    fastmae vs eager, vs compiled-reference, visible vs mask-token, memory ratio; and, with a batch sweep, the best
    batch and the knee of the fastmae visible rows."""
    out = []
    steps = [r for r in rows if r["name"] == "pretrain_step"]
    keys = sorted({(r["model"], r["decoder_depth"]) for r in steps})
    for model, depth in keys:
        mine = [r for r in steps if (r["model"], r["decoder_depth"]) == (model, depth)]
        fixed = [r for r in mine if not r.get("sweep")]
        e, f = _best(fixed, "eager", "visible"), _best(fixed, "fastmae", "visible")
        c, m = _best(fixed, "compiled-reference", "visible"), _best(fixed, "fastmae", "mask_token")
        ratio = {"model": model, "decoder_depth": depth}
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


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def results_table(results: dict, source: str) -> str:
    """The README table (markdown) of a results JSON's pretrain_step rows, with same-run speedups (on the fastest
    fastmae visible row at the fixed batch), then the batch sweeps, the optimizer rows and what failed. MFU is
    computed here from each row's TFLOP/s and the GPU's peaks (:func:`mfu_of`), so files written under an older
    convention read the same way."""
    env = results["env"]
    gpu = env.get("gpu") or "cpu"
    ratios = {(s["model"], s["decoder_depth"]): s for s in results.get("speedups") or speedups(results["rows"])}
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
        mine = [r for r in steps if (r["model"], r["decoder_depth"]) == key]
        best[key] = _best(mine, "fastmae", "visible")
    for r in steps:
        if not _ran(r):
            continue
        s = ratios.get((r["model"], r["decoder_depth"]), {})
        lead = r is best.get((r["model"], r["decoder_depth"]))
        kernels = ",".join(sorted(set(r["kernels"].values())))
        mfu, mfu_measured = mfu_of(r["tflops"], gpu)
        lines.append(
            f"| {r['model']} | {r['decoder_depth']} | {r['config']} | {r['encoder_mode']} | "
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
                                (r["model"], r["decoder_depth"]) == (s["model"], s["decoder_depth"])])  # fmt: skip
            seen = ", ".join(f"{r['batch_size']}: " + ("out of memory" if r.get("oom") else f"failed ({r['error']})"
                             if r.get("error") else f"{r['img_per_s']:.0f} img/s, {_fmt(r.get('peak_mem_gb'), '.1f')} "
                             "GB") for r in sweep)  # fmt: skip
            top = next(r for r in sweep if _ran(r) and r["batch_size"] == s["best_batch"])
            top_mfu = mfu_of(top["tflops"], gpu)[0]
            lines += ["", f"Batch sweep, {s['model']} dec{s['decoder_depth']} fastmae visible: {seen}; best batch "
                      f"{s['best_batch']} ({s['best_batch_img_per_s']:.0f} img/s, MFU {_pct(top_mfu)}), knee "
                      f"{s['knee_batch']} (the smallest batch within 5% of the best)."]  # fmt: skip
    opt = [r for r in results["rows"] if r["name"] == "optimizer_step" and "ms" in r]
    if opt:
        lines += ["", "AdamW update alone: " + ", ".join(f"{r['model']} {r['impl']} {r['ms']:.2f} ms" for r in opt)]
    failed = [r for r in results["rows"] if r.get("error") or r.get("ok") is False]
    if failed:
        lines += ["", "Did not run: " + "; ".join(
            f"{r.get('model')} dec{r.get('decoder_depth')} {r.get('config', r['name'])} {r.get('encoder_mode', '')} "
            f"{r.get('variant', '')} ({r.get('error') or 'loss differs from eager'})".replace("  ", " ")
            for r in failed)]  # fmt: skip
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

    rows = [r for r in results["rows"] if r["name"] == "pretrain_step" and not r.get("sweep") and _ran(r)]
    groups = sorted({(r["model"], r["decoder_depth"]) for r in rows}, key=lambda g: (MODELS + (g[0],)).index(g[0]))
    fig, ax = plt.subplots(figsize=(max(6, 2.4 * len(groups)), 4.2))
    width = 0.8 / len(CASES)
    for c, (config, mode) in enumerate(CASES):
        xs, ys = [], []
        for g, (model, depth) in enumerate(groups):
            hit = _best([r for r in rows if (r["model"], r["decoder_depth"]) == (model, depth)], config, mode)
            if hit:
                xs.append(g + (c - (len(CASES) - 1) / 2) * width)
                ys.append(hit["img_per_s"])
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


def report(json_path, png: str | Path | None = None, readme: str | Path | None = None,
           marker: str = "fastmae-bench") -> dict:  # fmt: skip
    """Chart and README table (between the ``marker`` markers) from one committed results JSON or several merged
    (never typed by hand)."""
    paths = [Path(p) for p in ([json_path] if isinstance(json_path, str | Path) else json_path)]
    results = merge_results(paths)
    png = Path(png) if png else paths[0].with_suffix(".png")
    plot(results, png)
    names = ", ".join(p.name for p in paths)
    table = results_table(results, names)
    from .profiling import breakdown_table

    parts = breakdown_table(results["rows"], names, results["env"])
    if readme:
        update_readme(Path(readme), table + f"\n\n![pretrain step chart]({_relative(png, Path(readme).parent)})",
                      marker)  # fmt: skip
        profiled = any(r.get("breakdown") for r in results["rows"])
        if profiled and f"<!-- {BREAKDOWN}:start -->" in Path(readme).read_text():
            update_readme(Path(readme), parts, BREAKDOWN)
    return {"png": str(png), "table": table, "breakdown": parts}


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
