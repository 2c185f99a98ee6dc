"""Where a training step's time goes: kernels (CUDA) or ops (CPU) of a torch.profiler trace, by category, and the
time no kernel ran ("idle": launch gaps, host work, syncs), as ``fastmae bench --profile`` reports it.

Categories (:data:`CATEGORIES`), by kernel or op name, first match wins (:func:`categorize`): fastmae's fused Triton
ops; attention (flash, cuDNN, memory-efficient, xformers kernels; the ``math`` backend's matmuls count as GEMMs);
the optimizer update (fused AdamW and the gradient norm of the NaN guard, multi-tensor kernels); GEMMs (cuBLAS,
CUTLASS, inductor's GEMM templates, the patch-embedding convolution); copies (memcpy, memset, dtype casts);
norms and elementwise (LayerNorm, GELU, inductor's fused pointwise and reduction kernels, gathers); other.

On a GPU, kernel time is the union of the kernels' intervals over the profiled steps, per step; idle is the measured
(unprofiled) step time minus it. On a CPU the "kernels" are the ATen ops' self times, and idle is the Python around
them (the profiler's own overhead can make the ops' sum exceed the unprofiled step: idle is then 0).
"""

from __future__ import annotations

import functools

CATEGORIES = ("fastmae ops", "attention", "optimizer", "gemm", "copies", "norm/elementwise", "other")
_RULES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "mha_", "xformers", "cudnn_generated")),
    ("optimizer", ("adam", "multi_tensor_apply", "_foreach_", "lpnorm", "optimizer")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_addmm_activation", "matmul", "triton_tem_", "splitk", "conv", "wgmma", "sm90_", "sm80_")),
    ("copies", ("memcpy", "memset", "copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous",
                "cast", "aten::fill_", "aten::zero_")),
    ("norm/elementwise", ("norm", "elementwise", "triton_poi", "triton_per", "triton_red", "reduce", "gelu", "softmax",
                          "aten::add", "aten::mul", "aten::div", "aten::sub", "aten::cat", "aten::index", "gather",
                          "scatter", "aten::where", "aten::exp", "aten::sqrt", "aten::rsqrt", "aten::sum",
                          "aten::mean", "aten::pow", "aten::neg", "aten::var", "aten::argsort", "aten::sort",
                          "aten::gelu", "aten::isfinite", "aten::bitwise", "aten::rshift", "aten::lshift",
                          "aten::__rshift__", "aten::__xor__", "aten::__and__", "aten::arange", "aten::expand",
                          "aten::scatter", "aten::addcmul", "aten::abs", "aten::ne", "aten::eq", "aten::lt")),
)  # fmt: skip
# Host-side records of torch.profiler that are not work on the device or in ATen.
_NOT_OPS = ("ProfilerStep", "## ", "cudaLaunch", "cudaStream", "cudaEvent", "cudaDeviceSynchronize", "cudaMemcpy",
            "cudaFuncGetAttributes", "cudaPeekAtLastError", "cudaGetDevice", "Optimizer.", "autograd::engine",
            "[memory]", "cuLaunchKernel", "Torch-Compiled Region", "CompiledFunction", "TorchDynamo")  # fmt: skip


@functools.cache
def fastmae_kernel_names() -> tuple[str, ...]:
    """The names of fastmae's Triton kernels (as they appear in traces) and its custom ops' namespace."""
    import importlib

    names = ["fastmae::"]
    for mod in ("masking", "unshuffle", "masked_mse", "visible_embed", "_common"):
        try:
            module = importlib.import_module(f"fastmae.kernels.{mod}")
        except ImportError:  # pragma: no cover - every module imports where fastmae does
            continue
        names += [name for name, obj in vars(module).items()
                  if type(obj).__name__ in ("JITFunction", "InterpretedFunction")]  # fmt: skip
    return tuple(dict.fromkeys(names))


def categorize(name: str) -> str:
    """The category of a kernel or op ``name`` (see the module docstring)."""
    if name.startswith(fastmae_kernel_names()):  # Triton names a kernel after its function
        return "fastmae ops"
    low = name.lower()
    for category, keys in _RULES:
        if any(k in low for k in keys):
            return category
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def breakdown(prof, cuda: bool, steps: int, step_ms: float) -> dict:
    """``{"categories_ms": {category: ms per step}, "kernel_ms", "idle_ms", "step_ms", "kernels_per_step"}`` of a
    finished ``torch.profiler.profile`` over ``steps`` steps, against the unprofiled ``step_ms``."""
    from torch.autograd import DeviceType

    per = dict.fromkeys(CATEGORIES, 0.0)
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        for e in kernels:
            per[categorize(e.name)] += e.time_range.elapsed_us()
        busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in kernels])
        count = len(kernels)
    else:
        ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0 and not e.key.startswith(_NOT_OPS)]
        for e in ops:
            per[categorize(e.key)] += e.self_cpu_time_total
        busy_us = sum(per.values())
        count = sum(e.count for e in ops)
    kernel_ms = busy_us / 1e3 / steps
    return {
        "categories_ms": {k: v / 1e3 / steps for k, v in per.items()},
        "kernel_ms": kernel_ms,
        "idle_ms": max(0.0, step_ms - kernel_ms),
        "step_ms": step_ms,
        "kernels_per_step": count / steps,
    }


def breakdown_table(rows: list[dict], source: str, env: dict) -> str:
    """The docs table of the rows that carry a breakdown: ms per step by category, idle, kernels per step."""
    have = [r for r in rows if r.get("breakdown")]
    if not have:
        return "No profiled rows yet: `fastmae bench --profile` writes them."
    unit = "kernel" if env.get("gpu", "cpu") != "cpu" else "op"
    lines = [f"Measured on **{env.get('gpu')}** (torch {env.get('torch')}), git `{(env.get('git_sha') or '?')[:12]}`; "
             f"ms per step; raw JSON `{source}`.", "",
             "| model | dec | config | encoder | variant | batch | step | " + " | ".join(CATEGORIES)
             + f" | idle | {unit}s/step |",
             "| --- | ---: | --- | --- | --- | ---: | ---: |" + " ---: |" * (len(CATEGORIES) + 2)]  # fmt: skip
    for r in have:
        b = r["breakdown"]
        cats = " | ".join(f"{b['categories_ms'][c]:.2f}" for c in CATEGORIES)
        lines.append(f"| {r['model']} | {r['decoder_depth']} | {r['config']} | {r['encoder_mode']} | "
                     f"{r.get('variant', 'plain')} | {r['batch_size']} | {b['step_ms']:.2f} | {cats} | "
                     f"{b['idle_ms']:.2f} | {b['kernels_per_step']:.0f} |")  # fmt: skip
    return "\n".join(lines)
