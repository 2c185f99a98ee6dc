"""Attention dispatch: small backends that say why they cannot run, and a resolver that never degrades silently.

Backends take ``q, k, v`` shaped ``[B, H, N, Dh]`` and return ``[B, H, N, Dh]`` (no mask, no dropout: MAE needs
neither). ``auto`` picks the first backend in :data:`AUTO_ORDER` that reports no reasons; an explicitly requested
backend that reports reasons raises :class:`AttentionBackendUnavailable` with them.

Resolution uses only tensor metadata and facts probed at import, so it traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

from .errors import FastMAEError

logger = logging.getLogger("fastmae.attention")

BACKENDS = ("auto", "xformers", "sdpa", "math")
AUTO_ORDER = ("xformers", "sdpa", "math")


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


_BACKENDS = {b.name: b for b in (XFormersAttention(), SDPAAttention(), MathAttention())}
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


def explain(requested: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, list[str]]:
    """Reasons each backend gives for these inputs (empty list = can run). For logs and benchmark records."""
    check_backend_name(requested)
    return {name: _BACKENDS[name].supports(q, k, v) for name in AUTO_ORDER}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention over ``[B, H, N, Dh]`` with the requested backend."""
    return resolve(backend, q, k, v)(q, k, v)
