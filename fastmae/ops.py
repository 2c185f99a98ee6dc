"""The op layer: which implementation (fused Triton or pure-PyTorch reference) runs each memory-bound op.

Ops: ``masking`` (argsort-gather of visible tokens), ``unshuffle`` (decoder token restore), ``masked_mse`` (patchify +
norm-pix target + masked MSE). A kernels spec is ``"auto"``, ``"reference"``, ``"triton"``, or a per-op mapping /
string such as ``"masking=triton,masked_mse=reference"`` (ops not named stay ``auto``). The environment variable
``FASTMAE_KERNELS`` (same syntax) overrides whatever the code asked for, for debugging.

``auto`` means Triton on CUDA tensors when the op has a Triton implementation and Triton imports, else the reference.
``triton`` forces the fused op and raises a clear error where it cannot run (e.g. CPU without ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping

import torch

from .errors import FastMAEError

OPS = ("masking", "unshuffle", "masked_mse")
CHOICES = ("auto", "reference", "triton")
ENV_VAR = "FASTMAE_KERNELS"

# op -> (module in fastmae.kernels, reference function, fused function)
_IMPLS = {
    "masking": ("masking", "random_masking_reference", "random_masking"),
    "unshuffle": ("unshuffle", "unshuffle_reference", "unshuffle"),
    "masked_mse": ("masked_mse", "masked_mse_reference", "masked_mse"),
}


def parse_kernels(spec: str | Mapping[str, str] | None = "auto", *, use_env: bool = True) -> dict[str, str]:
    """Normalise a kernels spec to ``{op: "auto" | "reference" | "triton"}``; ``FASTMAE_KERNELS`` wins if set."""
    if use_env and os.environ.get(ENV_VAR):
        spec = os.environ[ENV_VAR]
    spec = "auto" if spec is None else spec
    if isinstance(spec, str):
        spec = spec.strip()
        if "=" not in spec:
            return {op: _check_choice(spec, op) for op in OPS}
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            op, _, choice = part.partition("=")
            items[op.strip()] = choice.strip()
        spec = items
    if not isinstance(spec, Mapping):
        raise FastMAEError(f"kernels must be a string or a mapping of op to choice, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(OPS))
    if unknown:
        raise FastMAEError(f"unknown kernel op(s) {', '.join(unknown)}; ops are {', '.join(OPS)}")
    return {op: _check_choice(spec.get(op, "auto"), op) for op in OPS}


def _check_choice(choice: str, op: str) -> str:
    if choice not in CHOICES:
        raise FastMAEError(f"unknown kernels choice {choice!r} for op {op}; choose one of {', '.join(CHOICES)}")
    return choice


def _module(op: str):
    return importlib.import_module(f"fastmae.kernels.{_IMPLS[op][0]}")


def _kernels_interpreted() -> bool:
    from fastmae.kernels import _common

    return _common.INTERPRETED


def triton_unavailable_reason(op: str, device: torch.device | None = None) -> str | None:
    """Why the fused ``op`` cannot run on ``device`` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if getattr(_module(op), _IMPLS[op][2], None) is None:
        return f"no Triton implementation of {op} is available in this build"
    if device is not None and device.type != "cuda" and not _kernels_interpreted():
        return (
            f"Triton kernels need a CUDA device, the inputs are on {device.type}; "
            "set TRITON_INTERPRET=1 before importing fastmae to run them (slowly) on CPU"
        )
    return None


def check_triton(kernels: Mapping[str, str], device: torch.device | None = None) -> None:
    """Raise one clear error if any op forced to ``triton`` cannot run (on ``device``, when given)."""
    for op, choice in kernels.items():
        if choice == "triton":
            reason = triton_unavailable_reason(op, device)
            if reason is not None:
                raise FastMAEError(f"kernels='triton' requested for {op} but it cannot run: {reason}")


def select(op: str, choice: str, device: torch.device) -> str:
    """The implementation name (``"triton"`` or ``"reference"``) that runs ``op`` for tensors on ``device``."""
    if choice == "reference":
        return "reference"
    if choice == "triton":
        reason = triton_unavailable_reason(op, device)
        if reason is not None:
            raise FastMAEError(f"kernels='triton' requested for {op} but it cannot run: {reason}")
        return "triton"
    return "triton" if device.type == "cuda" and triton_unavailable_reason(op, device) is None else "reference"


def get_impl(op: str, impl: str) -> Callable:
    """The function implementing ``op`` as ``impl`` (``"triton"`` or ``"reference"``)."""
    module = _module(op)
    return getattr(module, _IMPLS[op][2] if impl == "triton" else _IMPLS[op][1])
