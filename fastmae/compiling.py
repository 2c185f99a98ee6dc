"""How a model is compiled: ``off``, ``full`` (``torch.compile`` of the whole module) or ``regional`` (each transformer
block compiled on its own; the blocks of one width share one compiled graph, and the fused ops, the embedding and the
heads around them run as they are).

Compiling the whole ViT-L step took 45-80 s on an H200 (``../shared/gpu-results/2026-11-30-h200``), and every start
and every restart pays it again. A ViT's blocks are the same code with the same shapes, so regional compilation
compiles one encoder block and one decoder block instead of 32: the compile time of two blocks, whatever the depth
(``benchmarks/bench_compile.py`` measures both). What it gives up is fusion across block boundaries.

Both variants compile with ``dynamic=False``: a second input shape (a batch-size sweep, a short batch after skipped
files) compiles its own static kernels instead of turning the batch dimension symbolic for every later step.

Dynamo keeps its compiled entries per code object, and past ``torch._dynamo.config.recompile_limit`` (8) it runs the
code uncompiled, saying so once in a warning. Regional compilation's blocks share one code object: each kind of block
(encoder, decoder) takes one entry per distinct input it sees (training and evaluation mode, with and without
gradients, every batch size: the batch, the pictures', a short batch after skipped files, a benchmark's sweep; the
visible-only and the mask-token encoder's token counts), and on a CPU a run and a benchmark reached 8. So ``regional``
raises the limit to :data:`REGIONAL_ENTRIES_PER_BLOCK_KIND` per kind of block. Every hit of a limit is recorded
(:func:`recompile_limit_hits`): ``fastmae bench`` fails the rows measured while one happened, instead of reporting
uncompiled steps as compiled.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import nn

from .config import DEFAULT_VARIANT, GRAPH_MODES, MODES, VARIANTS  # noqa: F401 (the choice lists live in config)
from .errors import FastMAEError

REGIONAL_ENTRIES_PER_BLOCK_KIND = 16  # compiled entries a kind of block may take before dynamo runs it uncompiled


class _LimitHits(logging.Handler):
    """Keeps dynamo's "hit config.recompile_limit" warnings (one line each) as they are logged."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hits: list[str] = []
        self.lock_ = threading.Lock()
        self.last: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record is self.last or not str(record.msg).startswith("torch._dynamo hit config."):
            return  # (the same record seen again where it propagates from convert_frame's logger to dynamo's)
        self.last = record
        try:
            text = " ".join(record.getMessage().split())
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is still a hit
            text = str(record.msg)
        with self.lock_:
            self.hits.append(text.split(" To log all recompilation reasons")[0][:400])


_HITS = _LimitHits()


def watch_recompile_limit() -> None:
    """Start recording dynamo's recompile-limit hits in this process (once; :func:`compile_model` calls it)."""
    for name in ("torch._dynamo.convert_frame", "torch._dynamo"):  # where it is logged, and above it
        log = logging.getLogger(name)
        if _HITS not in log.handlers:
            log.addHandler(_HITS)


def recompile_limit_hits() -> list[str]:
    """Every recompile-limit hit recorded in this process so far, oldest first: after one, the code it names runs
    uncompiled for inputs it has no compiled entry for."""
    with _HITS.lock_:
        return list(_HITS.hits)


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise FastMAEError(f"--compile must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return variant


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an MAE (encoder, then decoder) or a timm ViT, also inside DDP."""
    inner = getattr(module, "module", module)  # DistributedDataParallel
    return [b for name in ("blocks", "decoder_blocks") for b in getattr(inner, name, ())]


class TensorDropPath(nn.Module):
    """Stochastic depth with the keep probability as a tensor: timm's ``DropPath`` keeps it as a Python float, which
    dynamo compiles in as a constant, so the blocks of a finetuned ViT (each its own rate, 0 to 0.1-0.3 along the
    depth) would each compile again, and past the recompile limit (8) run uncompiled. Same distribution as timm's
    (each sample's branch kept with probability ``keep``, scaled by 1 / keep); other random draws."""

    def __init__(self, drop_prob: float, scale_by_keep: bool = True):
        super().__init__()
        self.register_buffer("keep", torch.tensor(1.0 - drop_prob), persistent=False)  # not in the state_dict
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        kept = (torch.rand(shape, device=x.device) < self.keep).to(x.dtype)  # [B, 1, ...]
        if self.scale_by_keep:
            kept = kept / self.keep.clamp_min(1e-12).to(x.dtype)
        return x * kept


def _tensor_drop_paths(block: nn.Module, identities: bool) -> None:
    """timm's ``DropPath`` in ``block`` replaced by :class:`TensorDropPath`; with ``identities``, also the
    ``nn.Identity`` timm puts where the rate is 0 (the first block), which would otherwise trace a graph of its own."""
    from timm.layers import DropPath

    for name, child in list(block.named_children()):
        if isinstance(child, DropPath) or (identities and name.startswith("drop_path") and type(child) is nn.Identity):
            rate, scale = (child.drop_prob, child.scale_by_keep) if isinstance(child, DropPath) else (0.0, True)
            new = TensorDropPath(rate, scale).train(child.training)
            p = next(block.parameters(), None)
            setattr(block, name, new.to(p.device) if p is not None else new)
        else:
            _tensor_drop_paths(child, identities)


def compile_model(module: nn.Module, variant: str, mode: str = "default", backend: str = "inductor") -> nn.Module:
    """``module`` compiled as ``variant`` says; returns what the step calls (the module itself for ``off`` and
    ``regional``, whose blocks are compiled in place; ``torch.compile``'s wrapper for ``full``)."""
    check_variant(variant)
    if variant == "off":
        return module
    watch_recompile_limit()
    options: dict = {"dynamic": False, "backend": backend}
    if mode != "default":
        options["mode"] = mode
    if variant == "full":
        return torch.compile(module, **options)
    blocks = repeated_blocks(module)
    if not blocks:
        raise FastMAEError(f"--compile regional: {type(module).__name__} has no transformer blocks (blocks, "
                           "decoder_blocks) to compile; use --compile full")  # fmt: skip
    from timm.layers import DropPath

    kinds = {(type(b), tuple((n, tuple(p.shape)) for n, p in b.named_parameters())) for b in blocks}
    limit = REGIONAL_ENTRIES_PER_BLOCK_KIND * len(kinds)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)  # process-wide
    dropping = any(isinstance(m, DropPath) for b in blocks for m in b.modules())
    for block in blocks:
        _tensor_drop_paths(block, identities=dropping)  # one compiled graph for blocks of different drop-path rates
        block.compile(**options)  # in place: state_dict keys and hooks stay as they are
    return module
