"""Per-sample masking noise: a counter-based hash of (seed, epoch, sample index, patch index), computed on the device.

Each sample's mask depends only on those four numbers, not on the batch it lands in, the batch size, the worker
count, the world size, or where a run was restarted. The public MAE code draws the noise with ``torch.rand`` over the
whole batch, so its masks change with any of those.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit avalanche hash (xor-shift-multiply, "lowbias32") on Python ints or int64 tensors holding values
    < 2**32. On tensors the second product can pass 2**63 and wrap; wrapping keeps the low 32 bits, which are all
    that is kept, so ints and tensors agree.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def mask_noise(seed: int, epoch: int | torch.Tensor, ids: torch.Tensor, num_patches: int, device=None) -> torch.Tensor:
    """Uniform noise [B, L] in [0, 1) for samples ``ids`` [B] in ``epoch``: feed it to ``model(imgs, noise=...)``.
    ``epoch`` may be a 0-d int64 tensor on the device (a CUDA graph reads it at every replay; a Python int would be
    frozen into the graph): the same noise either way."""
    device = ids.device if device is None else device
    ids = ids.to(device=device, dtype=torch.int64)
    base = _mix32(_mix32((seed & _MASK32) ^ 0x5BD1E995) ^ (epoch & _MASK32))  # a Python int: no host-device copy
    key = _mix32(base ^ (ids & _MASK32)).unsqueeze(1)  # [B, 1]
    patch = _mix32(torch.arange(num_patches, dtype=torch.int64, device=device) + 0x27D4EB2F).unsqueeze(0)  # [1, L]
    bits = _mix32(key ^ patch)  # [B, L] in [0, 2**32)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 bits: exact in float32, in [0, 1)
