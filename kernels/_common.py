"""Small helpers shared by the kernel launchers."""

import os

import torch

from fastmae.errors import FastMAEError

# Triton picks interpreter or compiler when a kernel is decorated, i.e. when fastmae is imported: record that moment.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check(ok: bool, message: str) -> None:
    """Raise a one-line FastMAEError when a launcher's input check fails."""
    if not ok:
        raise FastMAEError(message)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


try:  # Triton ships with torch's Linux wheels; elsewhere the references still import and run
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    HAVE_TRITON = False

    class _Stub:
        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    triton = tl = _Stub()


@triton.jit
def cast_rtne(v, dtype: tl.constexpr):
    """fp32 -> ``dtype`` rounding to nearest-even, bit-identical to torch's ``.to(dtype)``.

    bf16 is rounded with integer ops: the Triton CPU interpreter truncates a plain ``.to(tl.bfloat16)`` while GPUs
    round, and the same bits on both is what the tests check."""
    if dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), r)
    else:
        return v.to(dtype)
