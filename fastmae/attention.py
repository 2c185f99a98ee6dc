"""Attention dispatch: small backends that say why they cannot run, and a resolver that never degrades silently.

Backends take ``q, k, v`` shaped ``[B, H, N, Dh]`` and return ``[B, H, N, Dh]`` (no mask, no dropout: MAE needs
neither). ``auto`` picks the first backend in :data:`AUTO_ORDER` that reports no reasons; an explicitly requested
backend that reports reasons raises :class:`AttentionBackendUnavailable` with them. ``flash``, ``cudnn`` and
``efficient`` force one of the kernels behind ``torch.nn.functional.scaled_dot_product_attention`` (``sdpa`` lets
torch choose among them).

The model asks per call site (:data:`SITES`: the encoder, head dim 64 at ViT-B/L, 50 visible tokens; the decoder,
head dim 32, 197 tokens): ``--attn-backend encoder=flash,decoder=efficient``. For ``auto`` on a GPU,
:func:`measured_choice` looks the site's shape up in a table of measured fwd+bwd times (``attention_table.json``,
written by ``benchmarks/bench_attention.py`` on that GPU) and picks the fastest, saying so; without an entry it keeps
:data:`AUTO_ORDER` and says that.

Resolution uses only tensor metadata and facts probed at import, so it traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import FastMAEError

logger = logging.getLogger("fastmae.attention")

BACKENDS = ("auto", "xformers", "sdpa", "flash", "cudnn", "efficient", "math")
AUTO_ORDER = ("xformers", "sdpa", "math")  # auto without a measured table entry
SITES = ("encoder", "decoder")
TABLE = Path(__file__).with_name("attention_table.json")  # FASTMAE_ATTENTION_TABLE overrides it


class AttentionBackendUnavailable(FastMAEError):
    """An explicitly requested attention backend cannot run these inputs."""


def _probe_xformers() -> tuple[object | None, str | None]:
    """(xformers.ops module or None, reason it is unusable or None). Probed once, at import."""
    if importlib.util.find_spec("xformers") is None:
        return None, "xformers is not installed (pip install 'fastmae[xformers]')"
    try:
        import xformers.ops as xops
    except Exception as exc:  # a broken build must not break fastmae; it becomes a reason
        return None, f"xformers failed to import: {type(exc).__name__}: {exc}".splitlines()[0]
    return xops, None


_XOPS, _XFORMERS_REASON = _probe_xformers()


class MathAttention:
    """Explicit softmax(q k^T / sqrt(d)) v with fp32 accumulation: the reference every backend is tested against."""

    name = "math"

    def supports(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
        return [] if q.is_floating_point() else [f"needs floating-point inputs, got {q.dtype}"]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        attn = (q.float() * scale) @ k.float().transpose(-2, -1)  # [B, H, N, N]
        return (attn.softmax(dim=-1) @ v.float()).to(q.dtype)


class SDPAAttention:
    """``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / math kernels inside torch)."""

    name = "sdpa"

    def supports(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
        return [] if q.is_floating_point() else [f"needs floating-point inputs, got {q.dtype}"]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, name, None)


class SDPAKernel:
    """One of SDPA's fused kernels, forced with ``torch.nn.attention.sdpa_kernel`` (CUDA only)."""

    def __init__(self, name: str, member: str, dtypes: tuple, max_head_dim: int, min_capability: tuple[int, int]):
        self.name, self.member, self.dtypes = name, member, dtypes
        self.max_head_dim, self.min_capability = max_head_dim, min_capability

    def supports(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
        if q.device.type != "cuda":
            return [f"{self.name} attention needs CUDA (inputs are on {q.device.type})"]
        reasons = []
        if _sdpa_backend(self.member) is None:
            reasons.append(f"this torch ({torch.__version__}) has no SDPBackend.{self.member}")
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} is not one of {', '.join(str(d).split('.')[-1] for d in self.dtypes)}")
        head_dim = q.shape[-1]
        if head_dim > self.max_head_dim or head_dim % 8:
            reasons.append(f"head dim {head_dim} is not a multiple of 8 up to {self.max_head_dim}")
        if not torch.compiler.is_compiling() and torch.cuda.is_available():  # checked before compiling
            cap = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
            if cap < self.min_capability:
                reasons.append(f"needs compute capability {self.min_capability[0]}.{self.min_capability[1]}+, "
                               f"the GPU has {cap[0]}.{cap[1]}")  # fmt: skip
        return reasons

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([_sdpa_backend(self.member)]):
            return F.scaled_dot_product_attention(q, k, v)


_HALF = (torch.float16, torch.bfloat16)


class XFormersAttention:
    """xformers' ``memory_efficient_attention`` (CUDA only)."""

    name = "xformers"
    max_head_dim = 256
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def supports(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
        if q.device.type != "cuda":  # whether installed or not: advice to install it would only mislead here
            return [f"xformers has no {q.device.type.upper()} operator (inputs are on {q.device.type})"]
        reasons = []
        if _XFORMERS_REASON is not None:
            reasons.append(_XFORMERS_REASON)
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} is not one of float16, bfloat16, float32")
        if q.shape[-1] > self.max_head_dim:
            reasons.append(f"head dim {q.shape[-1]} exceeds {self.max_head_dim}")
        return reasons

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # xformers wants [B, N, H, Dh]; transposes are views, the kernel reads strided rows.
        out = _XOPS.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


_BACKENDS = {b.name: b for b in (
    XFormersAttention(), SDPAAttention(), MathAttention(),
    SDPAKernel("flash", "FLASH_ATTENTION", _HALF, 256, (8, 0)),
    SDPAKernel("cudnn", "CUDNN_ATTENTION", _HALF, 128, (8, 0)),
    SDPAKernel("efficient", "EFFICIENT_ATTENTION", (*_HALF, torch.float32), 256, (5, 0)),
)}  # fmt: skip
_logged: set[tuple[str, str]] = set()


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise FastMAEError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend(name: str):
    return _BACKENDS[check_backend_name(name)]


def resolve(requested: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The backend that will run ``q, k, v`` for ``requested``; raises if an explicit request cannot run."""
    if requested != "auto":
        backend = get_backend(requested)
        reasons = backend.supports(q, k, v)
        if reasons:
            raise AttentionBackendUnavailable(f"attention backend {requested!r} cannot run: {'; '.join(reasons)}")
        skipped = []
    else:
        skipped = []
        for name in AUTO_ORDER:
            backend = _BACKENDS[name]
            reasons = backend.supports(q, k, v)
            if not reasons:
                break
            skipped.append(f"{name}: {'; '.join(reasons)}")
        else:  # pragma: no cover - math accepts every floating input
            raise AttentionBackendUnavailable(f"no attention backend can run these inputs: {' | '.join(skipped)}")
    if not torch.compiler.is_compiling() and (requested, backend.name) not in _logged:
        _logged.add((requested, backend.name))
        why = f" (skipped {' | '.join(skipped)})" if skipped else ""
        logger.info("attention backend %s -> %s%s", requested, backend.name, why)
    return backend


def log_choice(line: str) -> None:
    """Log a table-based choice once per process."""
    if ("table", line) not in _logged:
        _logged.add(("table", line))
        logger.info("attention %s", line)


def explain(requested: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, list[str]]:
    """Reasons each backend gives for these inputs (empty list = can run). For logs and benchmark records."""
    check_backend_name(requested)
    return {name: _BACKENDS[name].supports(q, k, v) for name in AUTO_ORDER}


def parse_sites(spec: str) -> dict[str, str]:
    """``auto`` / a backend name for both call sites, or ``encoder=NAME,decoder=NAME`` (a site not named: auto)."""
    if "=" not in spec:
        name = check_backend_name(spec.strip())
        return dict.fromkeys(SITES, name)
    out = dict.fromkeys(SITES, "auto")
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        site, _, name = part.partition("=")
        if site.strip() not in SITES:
            raise FastMAEError(f"attention backend {spec!r}: unknown call site {site.strip()!r}; sites are "
                               f"{', '.join(SITES)} (e.g. encoder=flash,decoder=efficient)")  # fmt: skip
        out[site.strip()] = check_backend_name(name.strip())
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def load_table(path: str | os.PathLike | None = None) -> list[dict]:
    """The measured entries (``benchmarks/bench_attention.py --write-table``); none when the file is absent."""
    path = Path(path or os.environ.get("FASTMAE_ATTENTION_TABLE") or TABLE)
    try:
        return json.loads(path.read_text()).get("entries", [])
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise FastMAEError(f"attention table {path} cannot be read ({exc})") from exc


def measured_choice(gpu: str, dtype: torch.dtype, head_dim: int, tokens: int,
                    entries: list[dict] | None = None) -> tuple[str, str] | None:  # fmt: skip
    """(backend, why) of the fastest measured backend for this GPU, dtype and head dim at the nearest measured token
    count (within 2x), or None when the table has no such entry."""
    entries = load_table() if entries is None else entries
    near = [e for e in entries if e["gpu"] == gpu and e["dtype"] == _dtype_name(dtype) and e["head_dim"] == head_dim
            and abs(math.log(e["tokens"] / max(tokens, 1))) <= math.log(2)]  # fmt: skip
    if not near:
        return None
    e = min(near, key=lambda e: abs(math.log(e["tokens"] / max(tokens, 1))))
    times = ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(e["ms"].items(), key=lambda kv: kv[1]))
    why = (f"measured fastest on {gpu} ({e['dtype']}, head dim {head_dim}, {e['tokens']} tokens x {e['batch_heads']} "
           f"batch x heads, fwd+bwd: {times}; {e.get('source', 'attention table')})")  # fmt: skip
    return e["best"], why


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention over ``[B, H, N, Dh]`` with the requested backend."""
    return resolve(backend, q, k, v)(q, k, v)
