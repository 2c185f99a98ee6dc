"""Attention dispatch: small backends that say why they cannot run, and a resolver that never degrades silently.

Backends take ``q, k, v`` shaped ``[B, H, N, Dh]`` and return ``[B, H, N, Dh]`` (no mask, no dropout: MAE needs
neither). ``auto`` picks the first backend in :data:`AUTO_ORDER` that reports no reasons; an explicitly requested
backend that reports reasons raises :class:`AttentionBackendUnavailable` with them. ``flash``, ``cudnn`` and
``efficient`` force one of the kernels behind ``torch.nn.functional.scaled_dot_product_attention`` (``sdpa`` lets
torch choose among them).

The model asks per call site (:data:`SITES`: the encoder, head dim 64 at ViT-B/L, 50 visible tokens; the decoder,
head dim 32, 197 tokens): ``--attn-backend encoder=flash,decoder=efficient``. For ``auto`` on a GPU,
:func:`measured_choice` looks the site's shape up in a table of measured fwd+bwd times (``attention_table.json``,
written by ``benchmarks/bench_attention.py`` on that GPU, one entry per model, call site and batch) and picks the
fastest at the nearest tokens and batch x heads, saying so; without an entry it keeps :data:`AUTO_ORDER` and says
that.

xformers is imported only when a call site asks for it (explicitly, or ``auto`` from a measured table entry): its import
warns when its C++ extension does not load, and a user who did not choose it never sees that. Its
``memory_efficient_attention`` operators ``fa2F@<v>-pt`` / ``fa2B@<v>-pt`` and ``cutlassF-pt`` / ``cutlassB-pt`` wrap
PyTorch's own flash and memory-efficient kernels (the ones SDPA calls): fastmae picks the pair itself (xformers' order,
flash first), names it (:func:`xformers_ops_used`), and runs it without xformers' C++ extension too, where xformers'
own dispatch refuses every operator ("xFormers wasn't build with CUDA support").

Resolution uses only tensor metadata and facts probed at import, so it traces under ``torch.compile(fullgraph=True)``;
xformers' operator pair is resolved outside the trace (once per shape, eagerly) and its operators are opaque custom
ops (``fastmae::xformers_attention`` and its backward), so a compiled block with xformers is one graph too.
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
# auto without a measured table entry. xformers comes after sdpa: its operators wrap the kernels SDPA calls (and SDPA
# has cuDNN's too), so it is auto's choice only where the measured table has it fastest (bench_attention.py).
AUTO_ORDER = ("sdpa", "xformers", "math")
SITES = ("encoder", "decoder")
TABLE = Path(__file__).with_name("attention_table.json")  # FASTMAE_ATTENTION_TABLE overrides it


class AttentionBackendUnavailable(FastMAEError):
    """An explicitly requested attention backend cannot run these inputs."""


_XFORMERS: tuple | None = None  # (``xformers.ops.fmha`` or None, why not, C++ extension loaded): set once, eagerly


def _xformers_fmha():
    """(``xformers.ops.fmha``, None), or (None, why it is unusable): imported on the first call, by a caller that chose
    xformers, never at fastmae's import (its import warns when its C++ extension does not load). Called eagerly only:
    under torch.compile the dispatch reads what :func:`_xformers_pair` resolved outside the trace."""
    global _XFORMERS
    if _XFORMERS is None:
        _XFORMERS = _import_xformers()
    return _XFORMERS[:2]


def _import_xformers() -> tuple:
    if importlib.util.find_spec("xformers") is None:
        return None, "xformers is not installed (pip install 'fastmae[xformers]')", False
    # Its import logs a many-line warning when the C++ extension does not load: kept, as one line of fastmae's log.
    held: list[logging.LogRecord] = []
    xlog = logging.getLogger("xformers")
    handler, propagate = logging.Handler(), xlog.propagate
    handler.emit = held.append
    xlog.addHandler(handler)
    xlog.propagate = False
    try:
        import xformers
        from xformers.ops import fmha
    except Exception as exc:  # a broken build must not break fastmae; it becomes a reason
        return None, f"xformers failed to import: {type(exc).__name__}: {exc}".splitlines()[0], False
    finally:
        xlog.removeHandler(handler)
        xlog.propagate = propagate
    for record in held:
        logger.info("xformers at import: %s", " ".join(record.getMessage().split())[:300])
    return fmha, None, bool(getattr(xformers, "_has_cpp_library", False))


def _xformers_has_extension() -> bool:
    _xformers_fmha()
    return bool(_XFORMERS[2])


_NO_EXTENSION = "wasn't build with CUDA support"  # xformers' reason for every op when its C++ extension did not load


XFORMERS_PAIRS = ("flash", "cutlass")  # xformers' own order on CUDA: flash-attention 2 (PyTorch's), then CUTLASS


def xformers_op_pairs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      pairs: tuple[str, ...] = XFORMERS_PAIRS) -> tuple[str | None, list[str]]:  # fmt: skip
    """(the first of xformers' operator ``pairs`` whose forward and backward take these ``[B, N, H, Dh]`` inputs, or
    None; every reason of the pairs passed over, named by operator). Without xformers' C++ extension, the ``-pt``
    operators (wrappers over PyTorch's kernels, which need no extension) are judged on everything but the missing
    extension."""
    fmha, why = _xformers_fmha()
    if fmha is None:
        return None, [why]
    inp = fmha.Inputs(query=q, key=k, value=v)
    extension = _xformers_has_extension()
    reasons = []
    for pair in pairs:
        found = []
        for op in (getattr(fmha, pair).FwOp, getattr(fmha, pair).BwOp):
            if op.OPERATOR is None:
                found.append(f"{op.NAME}: not available in this build")
                continue
            why_not = op.not_supported_reasons(inp)
            if not extension and op.NAME.endswith("-pt"):
                why_not = [r for r in why_not if _NO_EXTENSION not in r]
            found += [f"{op.NAME}: {r}" for r in why_not]
        if not found:
            return pair, reasons
        reasons += found
    return None, reasons


_PAIRS: dict[tuple, tuple[str | None, list[str]]] = {}


def _xformers_pair(pairs: tuple[str, ...], device: torch.device, dtype: torch.dtype, shape: tuple[int, ...],
                   strides: tuple[tuple[int, ...], ...]) -> tuple[str | None, tuple[str, ...]]:  # fmt: skip
    """:func:`xformers_op_pairs` for ``[B, N, H, Dh]`` inputs of this device, dtype, shape and q/k/v strides, once per
    key. Called from the trace it runs eagerly, outside torch.compile (:func:`torch.compiler.assume_constant_result`
    below, with arguments that are constants of the static shapes): xformers' import, its logging and its Python
    checks never enter the graph, so a compiled block that uses xformers is one graph, as with SDPA."""
    key = (pairs, device, dtype, shape, strides)
    if key not in _PAIRS:
        q, k, v = (torch.empty_strided(shape, s, device=device, dtype=dtype) for s in strides)
        _PAIRS[key] = xformers_op_pairs(q, k, v, pairs)
    pair, why = _PAIRS[key]
    return pair, tuple(why)


_xformers_pair_traced = torch.compiler.assume_constant_result(_xformers_pair)


def _pair_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              pairs: tuple[str, ...] = XFORMERS_PAIRS) -> tuple[str | None, tuple[str, ...]]:  # fmt: skip
    """The operator pair for these ``[B, N, H, Dh]`` inputs and why the others were passed over (see
    :func:`_xformers_pair`); the same answer eager and under torch.compile."""
    key = (pairs, q.device, q.dtype, tuple(q.shape), (tuple(q.stride()), tuple(k.stride()), tuple(v.stride())))
    return _xformers_pair_traced(*key) if torch.compiler.is_compiling() else _xformers_pair(*key)


def _xformers_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pair: str) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
    """xformers' forward operator of ``pair`` (``flash`` | ``cutlass``) on ``[B, N, H, Dh]`` inputs: (output, the
    log-sum-exp its backward needs), called directly (``op.apply``) with or without xformers' C++ extension: its public
    ``memory_efficient_attention`` refuses every operator without the extension, though the ``-pt`` ones need none."""
    fmha = _xformers_fmha()[0]
    out, ctx = getattr(fmha, pair).FwOp.apply(fmha.Inputs(query=q, key=k, value=v), needs_gradient=True)
    return out, ctx.lse


def _xformers_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, pair: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """xformers' backward operator of ``pair``: (dq, dk, dv)."""
    fmha = _xformers_fmha()[0]
    grads = getattr(fmha, pair).BwOp.apply(fmha.Context(lse=lse, out=out), fmha.Inputs(query=q, key=k, value=v),
                                           grad.contiguous())  # fmt: skip
    return grads.dq, grads.dk, grads.dv


# One opaque operator each to torch.compile: xformers' Python stays out of the graph. The fake forms run the same code
# on fake tensors, so shapes and strides come from the meta functions of the kernels xformers calls.
_xformers_attention = torch.library.custom_op("fastmae::xformers_attention", _xformers_forward, mutates_args=())
_xformers_attention.register_fake(_xformers_forward)
_xformers_attention_bwd = torch.library.custom_op("fastmae::xformers_attention_bwd", _xformers_backward_op,
                                                  mutates_args=())  # fmt: skip
_xformers_attention_bwd.register_fake(_xformers_backward_op)


def _xformers_setup(ctx, inputs, output):
    q, k, v, pair = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.pair = pair
    ctx.mark_non_differentiable(lse)


def _xformers_backward(ctx, grad, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return *_xformers_attention_bwd(grad, q, k, v, out, lse, ctx.pair), None


_xformers_attention.register_autograd(_xformers_backward, setup_context=_xformers_setup)


_XOPS_USED: dict[str, str] = {}  # {"forward": NAME, "backward": NAME, "extension": "loaded" | "not loaded"}


def xformers_ops_used() -> dict[str, str]:
    """The xformers operators the last eager call ran (empty before one): for logs and benchmark rows."""
    return dict(_XOPS_USED)


class MathAttention:
    """Explicit softmax(q k^T / sqrt(d)) v with fp32 accumulation: the reference every backend is tested against."""

    name = "math"

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
        return [] if q.is_floating_point() else [f"needs floating-point inputs, got {q.dtype}"]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        attn = (q.float() * scale) @ k.float().transpose(-2, -1)  # [B, H, N, N]
        return (attn.softmax(dim=-1) @ v.float()).to(q.dtype)


class SDPAAttention:
    """``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / math kernels inside torch)."""

    name = "sdpa"

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
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

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
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
    """xformers' ``memory_efficient_attention`` (CUDA only), with the operator pair fastmae picked and names;
    ``pair`` forces one of :data:`XFORMERS_PAIRS` (the benchmark's ``xformers-cutlass`` row)."""

    max_head_dim = 256
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    devices = ("cuda",)  # its operators' devices (the tests add "cpu" for operators stood in on a CPU)

    def __init__(self, pair: str | None = None):
        self.pairs = (pair,) if pair else XFORMERS_PAIRS
        self.name = f"xformers-{pair}" if pair else "xformers"

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
        if q.device.type not in self.devices:  # whether installed or not: advice to install it would only mislead here
            return [f"xformers has no {q.device.type.upper()} operator: its memory_efficient_attention operators "
                    f"(fa2F-pt, cutlassF-pt, ...) run on CUDA only (inputs are on {q.device.type})"]  # fmt: skip
        reasons = []
        if not torch.compiler.is_compiling():  # (under torch.compile the operator pair below says it)
            if _XFORMERS is None and importlib.util.find_spec("xformers") is None:  # no import: from metadata alone
                reasons.append("xformers is not installed (pip install 'fastmae[xformers]')")
            elif _XFORMERS is not None and _XFORMERS[0] is None:
                reasons.append(_XFORMERS[1])
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} is not one of float16, bfloat16, float32")
        if q.shape[-1] > self.max_head_dim:
            reasons.append(f"head dim {q.shape[-1]} exceeds {self.max_head_dim}")
        if reasons or not isinstance(q, torch.Tensor):  # metadata stand-ins (resolve_attention) stop here
            return reasons
        pair, why = _pair_for(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.pairs)
        return [] if pair is not None else [f"no xformers operator takes these inputs ({'; '.join(why)})"]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # xformers wants [B, N, H, Dh]; transposes are views, the kernels read strided rows.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        pair, why = _pair_for(q, k, v, self.pairs)
        if pair is None:
            raise AttentionBackendUnavailable(f"attention backend 'xformers' cannot run: {'; '.join(why)}")
        if not torch.compiler.is_compiling():
            fmha = _xformers_fmha()[0]
            fw, bw = getattr(fmha, pair).FwOp, getattr(fmha, pair).BwOp
            if _XOPS_USED.get("forward") != fw.NAME:
                _XOPS_USED.update(forward=fw.NAME, backward=bw.NAME,
                                  extension="loaded" if _xformers_has_extension() else "not loaded")  # fmt: skip
                logger.info("xformers runs %s + %s (C++ extension %s; the -pt operators wrap PyTorch's own kernels)",
                            fw.NAME, bw.NAME, _XOPS_USED["extension"])  # fmt: skip
        return _xformers_attention(q, k, v, pair)[0].transpose(1, 2)


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
        reasons = backend.unsupported(q, k, v)
        if reasons and requested == "xformers" and isinstance(q, torch.Tensor) and _xformers_fmha()[0] is not None:
            # chosen explicitly, so xformers may be imported: its own operators say why too
            _, theirs = _pair_for(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            reasons = [*reasons, f"its operators: {', '.join(dict.fromkeys(theirs))}"] if theirs else reasons
        if reasons:
            raise AttentionBackendUnavailable(f"attention backend {requested!r} cannot run: {'; '.join(reasons)}")
        skipped = []
    else:
        skipped = []
        for name in AUTO_ORDER:
            backend = _BACKENDS[name]
            reasons = backend.unsupported(q, k, v)
            if not reasons:
                break
            skipped.append(f"{name}: {'; '.join(reasons)}")
        else:  # pragma: no cover - math accepts every floating input
            raise AttentionBackendUnavailable(f"no attention backend can run these inputs: {' | '.join(skipped)}")
    if not torch.compiler.is_compiling() and (requested, backend.name) not in _logged:
        _logged.add((requested, backend.name))
        why = f" (skipped {' | '.join(skipped)})" if skipped else ""
        if requested == "auto" and backend.name == "sdpa":
            why += (" (ahead of xformers, whose operators wrap the kernels SDPA calls: auto takes xformers only where "
                    "the measured table has it fastest)")  # fmt: skip
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
    return {name: _BACKENDS[name].unsupported(q, k, v) for name in AUTO_ORDER}


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


class StandIn:
    """The metadata of ``q`` (shape, dtype) on ``device``, without a tensor: lets a backend's ``unsupported`` answer for
    a device and a shape before anything is allocated (the run spec's check, the model's resolution per call site)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str):
        self._t, self.device = torch.empty(shape, dtype=dtype, device="meta"), torch.device(device)

    def __getattr__(self, name):
        return getattr(self._t, name)


def dtype_name(dtype: torch.dtype) -> str:
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


def measured_choice(gpu: str, dtype: torch.dtype, head_dim: int, tokens: int, entries: list[dict] | None = None,
                    batch_heads: int | None = None) -> tuple[str, str] | None:  # fmt: skip
    """(backend, why) of the fastest measured backend for this GPU, dtype and head dim at the nearest measured token
    count (within 2x) and, given ``batch_heads`` (batch x heads), the nearest measured one of those (the table holds
    an entry per model and batch: ViT-B's and ViT-L's encoders share head dim and tokens), or None when the table has
    no such entry."""
    entries = load_table() if entries is None else entries
    near = [e for e in entries if e["gpu"] == gpu and e["dtype"] == dtype_name(dtype) and e["head_dim"] == head_dim
            and abs(math.log(e["tokens"] / max(tokens, 1))) <= math.log(2)]  # fmt: skip
    if not near:
        return None

    def distance(e: dict) -> tuple[float, float]:
        apart = abs(math.log(e["tokens"] / max(tokens, 1)))
        if batch_heads is None or not e.get("batch_heads"):
            return apart, 0.0
        return apart, abs(math.log(e["batch_heads"] / max(batch_heads, 1)))

    e = min(near, key=distance)
    times = ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(e["ms"].items(), key=lambda kv: kv[1]))
    of = f"{e['model']} {e.get('site', '')} at batch {e['batch']}, ".replace(" ,", ",") if e.get("model") else ""
    why = (f"measured fastest on {gpu} ({of}{e['dtype']}, head dim {head_dim}, {e['tokens']} tokens x "
           f"{e['batch_heads']} batch x heads, fwd+bwd: {times}; {e.get('source', 'attention table')})")  # fmt: skip
    return e["best"], why


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention over ``[B, H, N, Dh]`` with the requested backend."""
    return resolve(backend, q, k, v)(q, k, v)
