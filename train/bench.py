"""``fastmae bench``: the pretraining step of the official models in several configurations side by side, in one run.

Configurations (``config`` x ``encoder_mode``):

- ``eager`` / ``visible``: the official semantics as plain PyTorch: reference ops, ``math`` attention, no compile.
- ``compiled-reference`` / ``visible``: what a user builds in five minutes: the reference ops, SDPA attention and
  ``torch.compile`` (on CUDA). fastmae's own work (kernels, visible-only embedding, graphs, tuning) is what the next
  row beats it by.
- ``fastmae`` / ``visible``: Triton ops (on CUDA), attention ``auto`` (per call site, from the measured table),
  ``torch.compile`` (on CUDA).
- ``fastmae`` / ``mask_token``: the same fast settings with the encoder run on every patch (the paper's baseline).

Every configuration runs the training loop's own step (:func:`fastmae.train.step.build_step`): a uint8 batch normalised
on the device (``--in-chans 13``: a uint16 batch of 13 bands, normalised per band on the device, as a 13-band raster
run's; each band count is its own group of rows, ``in_chans``), per-sample mask noise from the sample ids, bf16 autocast
on CUDA (fp32 on CPU), forward, backward, NaN guard and fused AdamW over the recipe's parameter groups. Before timing,
the fast configuration's loss is checked against the eager one on the same weights, images and masks (an ``equivalence``
row). Rows record what actually ran (attention backend per call site, kernels, compile variant and mode, graphs), img/s,
model TFLOP/s (3x the forward FLOPs of :func:`fastmae.flops_per_image`: matmuls and attention), MFU against the GPU's
spec dense bf16 peak (``mfu``, the field's convention) and against the measured matmul peak (``mfu_measured_peak``), and
peak memory per image (with graphs: from the capture on, where the step's activations are allocated), the warm-up's
seconds (``warmup_s``: a configuration's compile time in its first row) and the recompile-limit hits seen while the row
ran (a row with one fails: part of its step ran uncompiled). The results file is rewritten after every row; a
configuration that fails is a row with its ``error``, and the suite goes on.

Levers, each measured side by side in the same run: ``--graphs`` adds a ``graphs`` variant of every compiled
configuration (the whole step as one CUDA graph, on the same compiled model); ``--batches`` sweeps the batch size of
the fastmae rows (img/s and peak memory; the knee is the smallest batch within 5% of the best rate);
``--attn-backend`` forces backends per call site; ``--compile full,regional`` times each compile variant
(:mod:`fastmae.compiling`); ``--compile-mode`` picks inductor's mode; ``--optimizer-bench``
times fused AdamW against a compiled AdamW on the model's parameters. ``--profile`` adds where the time goes
(:mod:`fastmae.profiling`: time by category and idle). ``--quick`` runs tiny shapes on whatever device there is, to
check the suite end to end (the tests run it). ``--report`` turns results JSON into a PNG chart and docs/benchmarks.md's
tables.
"""

from __future__ import annotations

import os
import time

import torch

from fastmae.bands import BandSpec
from fastmae.compiling import recompile_limit_hits
from fastmae.config import BenchConfig
from fastmae.errors import FastMAEError
from fastmae.models import create_model, flops_per_image

from .bench_report import CONFIG_NAMES, default_results_path, group_label, mfu_of, peak_tflops, speedups
from .data import Batch
from .harness import Rows, env_info, free_memory, is_oom, row_error, sync
from .pretrain import mae_loss
from .schedule import build_optimizer
from .spec import RunSpec, local_spec, resolve_device
from .step import StepParts, build_step

BATCH = {"mae_vit_base_patch16": 256, "mae_vit_large_patch16": 128, "mae_vit_huge_patch14": 64}  # fixed per model


def _spec(config: str, device: torch.device, compile_variant: str = "off", compile_mode: str = "default",
          attn: str | None = None, model: str | None = None) -> RunSpec:
    """The run spec of a configuration, from the loop's own function: ``eager`` is the reference ops with ``math``
    attention, ``compiled-reference`` the reference ops with SDPA, ``fastmae`` Triton ops (on CUDA) with ``attn``
    (default auto); only CUDA compiles. An attention backend that cannot run here is a one-line error."""
    cuda = device.type == "cuda"
    fast = config == "fastmae"
    kernels = ("triton" if cuda else "reference") if fast else "reference"
    attn_backend = (attn or "auto") if fast else "sdpa" if config == "compiled-reference" else "math"
    variant = compile_variant if config != "eager" and cuda else "off"
    return local_spec(device, "auto", variant, compile_mode, kernels=kernels, attn_backend=attn_backend, model=model)


def _build(model_name, decoder_depth, mode, spec: RunSpec, quick: dict | None, in_chans: int = 3):
    kw = dict(quick or {}, decoder_depth=decoder_depth, encoder_mode=mode, in_chans=in_chans, **spec.model_options())
    return create_model(model_name, **kw).to(spec.device)


RASTER_MAX = 10000  # a raster bench batch: uint16 reflectance x 10000, uniform; its per-band statistics below


def bench_bands(in_chans: int) -> BandSpec | None:
    """The bands of a bench batch: None for 3 (uint8 RGB, ImageNet's statistics: today's step), else ``in_chans``
    uint16 bands with the statistics of a uniform 0..10000 (normalised per band on the device in the step)."""
    if in_chans == 3:
        return None
    return BandSpec(in_chans, dtype="uint16", mean=[RASTER_MAX / 2] * in_chans,
                    std=[RASTER_MAX / 12**0.5] * in_chans)  # fmt: skip


def bench_images(batch: int, in_chans: int, size, device: torch.device, generator) -> torch.Tensor:
    """A fixed batch in the data's dtype, as a loader hands it over: uint8 for 3 bands, uint16 otherwise."""
    if in_chans == 3:
        return torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, device=device, generator=generator)
    high = RASTER_MAX + 1
    pixels = torch.randint(0, high, (batch, in_chans, *size), dtype=torch.int32, device=device, generator=generator)
    return pixels.to(torch.uint16)  # [B, C, H, W]


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

    from fastmae.profiling import breakdown

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    return _top_kernels(prof, cuda, steps), breakdown(prof, cuda, steps, step_ms)


class StepBench:
    """One configuration's model, compiled once, and the training step over it, built as the loop builds it: the run
    spec from the loop's function (:func:`~fastmae.train.spec.local_spec`: bf16 autocast on CUDA, fp32 on a CPU; the
    compile variant and mode; the resolved attention and kernels) and :func:`~fastmae.train.step.build_step` over
    :func:`~fastmae.train.pretrain.mae_loss`, so that every lever means the same here as in ``fastmae pretrain``.
    :meth:`row` times a variant (the plain step, or the same step as one CUDA graph) on the same weights and compiled
    code. ``eager`` never compiles, nor anything on a CPU."""

    def __init__(self, model_name, decoder_depth, config, mode, batch, device, quick=None, attn=None,
                 compile_mode: str = "default", compile_variant: str = "full", in_chans: int = 3):  # fmt: skip
        torch.manual_seed(0)
        self.device, self.batch, self.config, self.mode = device, batch, config, mode
        self.model_name, self.decoder_depth, self.compile_mode = model_name, decoder_depth, compile_mode
        self.in_chans, self.bands = in_chans, bench_bands(in_chans)
        self.spec = _spec(config, device, compile_variant, compile_mode, attn, model_name)
        self.compile = self.spec.compile
        self.model = _build(model_name, decoder_depth, mode, self.spec, quick, in_chans)
        self.step_fn = self.spec.compiled(self.model)
        # The recipe's AdamW (no weight decay on norms, biases, tokens), fused: the optimizer the loop runs.
        self.optimizer = build_optimizer(self.model, 1e-4, 0.05, (0.9, 0.95), fused=True)
        self.attn_backend = self.model.resolve_attention(device, self.spec.act_dtype, batch=batch)
        size = self.model.patch_embed.img_size
        g = torch.Generator(device=device).manual_seed(0)
        self.imgs = bench_images(batch, in_chans, size, device, g)
        self.labels = torch.zeros(batch, dtype=torch.long, device=device)
        self.calls = 0

    def step(self, graphs: bool):
        """The loop's pretraining step over this configuration's model (as one CUDA graph with ``graphs``)."""
        self.spec.graphs = graphs
        loss = mae_loss(self.model, self.step_fn, self.device, seed=0, mask_ratio=0.75)
        return build_step(StepParts(loss, self.optimizer, self.model.parameters(), bands=self.bands), self.spec)

    def _run_once(self, step):
        """One step on the fixed images with new sample ids (so new masks) every call."""
        k = self.calls
        self.calls += 1
        ids = torch.arange(k * self.batch, (k + 1) * self.batch, device=self.device)
        return step(Batch(self.imgs, self.labels, ids, k // 1000, (0, k + 1)), 1e-4)

    def row(self, variant: str, steps: int, warmup: int, profile: bool = False) -> dict:
        device = self.device
        cuda = device.type == "cuda"
        graphs = variant == "graphs"
        step = self.step(graphs=graphs)
        hits_before = len(recompile_limit_hits())
        t_warm = time.perf_counter()
        for _ in range(max(warmup, step.warmup + 2) if graphs else warmup):
            if cuda and step.captures_next:  # the capture allocates the step's activations (in the graph's pool)
                torch.cuda.reset_peak_memory_stats(device)
            self._run_once(step)
        sync(device)
        warmup_s = time.perf_counter() - t_warm  # the first row of a configuration: its compile time too
        if cuda and not graphs:  # an ordinary step allocates its activations at every step
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self._run_once(step)
        sync(device)
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
            top, parts = profile_steps(lambda: self._run_once(step), device, seconds * 1e3)
        hits = recompile_limit_hits()
        return {
            "name": "pretrain_step", "model": self.model_name, "decoder_depth": self.decoder_depth,
            "in_chans": self.in_chans, "input_dtype": str(self.imgs.dtype).removeprefix("torch."),
            "input_bytes_per_image": self.imgs[0].numel() * self.imgs.element_size(), "encoder_mode": self.mode,
            "config": self.config, "variant": variant, "batch_size": self.batch,
            "img_size": self.model.patch_embed.img_size[0], "dtype": self.spec.precision,
            "attn_backend": self.attn_backend, "kernels": self.model.kernels_used(device), "embed": embed,
            "compile": self.compile, "compile_mode": self.compile_mode if self.compile != "off" else None,
            "graphs": step.captured, "img_per_s": img_s, "step_ms": seconds * 1e3, "tflops": tflops, "mfu": mfu,
            "mfu_measured_peak": mfu_measured, "peak_tflops": peak_tflops(gpu),
            "peak_mem_gb": peak_mem, "peak_mem_gb_per_image": peak_mem / self.batch if cuda else None,
            "gflops_per_image": flops / 1e9, "profile": top, "breakdown": parts, "warmup_s": warmup_s,
            "recompile_limit_hits": hits[hits_before:], "recompile_limit_hits_before": hits_before,
        }  # fmt: skip


def pretrain_step_row(model_name, decoder_depth, config, mode, batch, device, steps, warmup, quick=None,
                      profile: bool = False) -> dict:  # fmt: skip
    """Time ``steps`` optimizer steps of one configuration (the plain step); returns its results row."""
    return StepBench(model_name, decoder_depth, config, mode, batch, device, quick).row("plain", steps, warmup, profile)


def check_fast_matches_eager(model_name, decoder_depth, device, quick=None, batch=2, in_chans: int = 3) -> float:
    """Loss of the fast configuration vs eager on the same weights, images and masks; raises if they disagree."""
    eager = _build(model_name, decoder_depth, "visible", _spec("eager", device), quick, in_chans)
    fast = _build(model_name, decoder_depth, "visible", _spec("fastmae", device), quick, in_chans)
    fast.load_state_dict(eager.state_dict())
    g = torch.Generator(device=device).manual_seed(0)
    size = eager.patch_embed.img_size
    imgs = torch.randn(batch, in_chans, *size, generator=g, device=device)
    noise = torch.rand(batch, eager.patch_embed.num_patches, generator=g, device=device)
    cuda = device.type == "cuda"
    with torch.no_grad(), local_spec(device).autocast():  # the loop's autocast (bf16 on CUDA, none on a CPU)
        a = eager(imgs, mask_ratio=0.75, noise=noise)[0].float().item()
        b = fast(imgs, mask_ratio=0.75, noise=noise)[0].float().item()
    rel = abs(a - b) / max(abs(a), 1e-12)
    if rel > (3e-2 if cuda else 1e-4):
        bands = "" if in_chans == 3 else f" at {in_chans} bands"
        raise FastMAEError(f"{model_name}{bands}: fast loss {b:.6f} differs from eager {a:.6f} (rel {rel:.2e}); not "
                           "timing")  # fmt: skip
    return rel


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
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rows.append({"name": "optimizer_step", "model": model_name, "impl": impl,
                     "compile": impl == "compiled" and device.type == "cuda",
                     "params": sum(p.numel() for p in model.parameters()),
                     "ms": (time.perf_counter() - t0) / steps * 1e3})  # fmt: skip
    return rows


def run_suite(cfg: BenchConfig, device: torch.device, log=print, on_row=None) -> list[dict]:
    """Rows for every model x decoder depth x configuration x compile variant (see the module docstring), then the
    levers asked for. ``on_row(row)`` sees each row as soon as it is measured (the results file writes it then). A
    configuration that fails (out of memory, a compile error, a kernel that cannot run) is a row with its one-line
    ``error``, and the suite goes on; a fast loss that disagrees with eager's is an ``equivalence`` row and that model
    and depth are not timed."""
    cfg.validate()
    models, decoder_depths, steps, warmup = cfg.model_names, cfg.depths, cfg.steps, cfg.warmup
    if cfg.quick:  # tiny shapes: the suite end to end, not a number (depths given on the command line are kept)
        models, steps, warmup = ["mae_vit_tiny_patch16"], min(steps, 2), min(warmup, 1)
        decoder_depths = decoder_depths if cfg.decoder_depths != "8,1" else [2, 1]
    quick, batch, profile, graphs, batches = cfg.quick, cfg.batch, cfg.profile, cfg.graphs, cfg.batch_sizes
    channels = cfg.channels
    attn, compile_mode, compile_variants = cfg.attn_backend, cfg.compile_mode, cfg.variants
    tiny = dict(img_size=32) if quick else None
    chosen = [CONFIG_NAMES[c] for c in cfg.config_names]
    cuda = device.type == "cuda"
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    def measure(name, depth, chans, config, mode, b, variants, variant_compile, sweep=False):
        base = {"name": "pretrain_step", "model": name, "decoder_depth": depth, "in_chans": chans, "config": config,
                "encoder_mode": mode, "batch_size": b, "sweep": sweep,
                "compile": variant_compile if config != "eager" and cuda else "off"}  # fmt: skip
        label = f"{name} dec{depth}" + ("" if chans == 3 else f" {chans} bands")
        bench = None
        try:
            bench = StepBench(name, depth, config, mode, b, device, tiny, attn if config == "fastmae" else None,
                              compile_mode, variant_compile, chans)  # fmt: skip
        except Exception as exc:
            add({**base, "variant": variants[0], "error": row_error(exc), "oom": is_oom(exc)})
            log(f"{label} {config} {mode} batch {b}: {row_error(exc)}")
        for variant in variants if bench is not None else ():
            what = f"{label} {config:18s} {mode:10s} {bench.compile:8s} {variant:6s} batch {b}"
            try:
                row = {**bench.row(variant, steps, warmup, profile and not sweep), "sweep": sweep}
            except Exception as exc:
                add({**base, "variant": variant, "error": row_error(exc), "oom": is_oom(exc)})
                log(f"{what}: {'out of memory' if is_oom(exc) else row_error(exc)}")
                free_memory(device)
                continue
            if row["recompile_limit_hits"]:  # part of the step ran uncompiled: not a compiled row's number
                row["error"] = (f"torch.compile hit its recompile limit during this row, so part of the step ran "
                                f"uncompiled: {row['recompile_limit_hits'][0][:200]}")  # fmt: skip
                add(row)
                log(f"{what}: {row['error']}")
                continue
            add(row)
            log(f"{what}: {row['img_per_s']:9.1f} img/s {row['tflops']:7.2f} TFLOP/s attn {row['attn_backend']} "
                f"kernels {','.join(sorted(set(row['kernels'].values())))}")  # fmt: skip
            if row["profile"]:
                top = ", ".join(f"{p['kernel'][:40]} {100 * p['share']:.0f}%" for p in row["profile"][:3])
                log(f"    where the time goes: {top}")
        del bench
        free_memory(device)

    for name in models:
        for depth in decoder_depths:
            for chans in channels:
                key = {"model": name, "decoder_depth": depth, "in_chans": chans}
                try:
                    rel = check_fast_matches_eager(name, depth, device, tiny, in_chans=chans)
                    add({"name": "equivalence", **key, "ok": True, "rel_loss_diff": rel})
                except Exception as exc:
                    add({"name": "equivalence", **key, "ok": False, "error": row_error(exc)})
                    log(f"{name} dec{depth} {chans} bands: not timed: {row_error(exc)}")
                    free_memory(device)
                    continue
                b = batch or (2 if quick else BATCH.get(name, 64))
                for config, mode in chosen:
                    with_graphs = graphs and config != "eager" and cuda
                    variants = ["plain", "graphs"] if with_graphs else ["plain"]
                    for variant_compile in compile_variants if config != "eager" and cuda else ("off",):
                        measure(name, depth, chans, config, mode, b, variants, variant_compile)
                for sweep_batch in batches:
                    if sweep_batch == b:
                        continue
                    for config, mode in chosen:
                        if config == "fastmae":
                            measure(name, depth, chans, config, mode, sweep_batch, ["plain"], compile_variants[0],
                                    sweep=True)  # fmt: skip
        if cfg.optimizer_bench:
            try:
                for row in optimizer_rows(name, device, tiny):
                    add(row)
                log(f"{name} AdamW update: " + ", ".join(f"{r['impl']} {r['ms']:.2f} ms" for r in rows[-2:]))
            except Exception as exc:
                add({"name": "optimizer_step", "model": name, "error": row_error(exc)})
    return rows


def bench(cfg: BenchConfig) -> int:
    """``fastmae bench``: measure (results JSON rewritten after every row) and print the same-run ratios, or, with
    ``--report``, draw the chart and the docs table from results JSONs."""
    if cfg.report:
        from .bench_report import report

        done = report(cfg.report, cfg.png, cfg.readme, cfg.marker)
        print(done["table"])
        print(f"chart: {done['png']}" + (f"; table written into {cfg.readme}" if cfg.readme else ""))
        return 0
    if cfg.attn_table is not None:
        os.environ["FASTMAE_ATTENTION_TABLE"] = cfg.attn_table
    device = resolve_device(cfg.device)
    env = env_info(device)
    results = Rows("fastmae-bench", env, cfg.out or default_results_path(env),
                   summary=lambda rows: {"speedups": speedups(rows)})  # rewritten after every row
    run_suite(cfg, device, on_row=results.add)
    for s in speedups(results.rows):
        print(f"{group_label(s)}: fastmae {_fmt(s['fastmae_vs_eager'])}x eager, "
              f"{_fmt(s['fastmae_vs_compiled_reference'])}x compiled-reference, visible "
              f"{_fmt(s['visible_vs_mask_token'])}x mask-token ({s['best_variant']})")  # fmt: skip
    print(f"wrote {results.path}; chart and table: fastmae bench --report {results.path} "
          "--readme docs/benchmarks.md")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"
