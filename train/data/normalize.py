"""Per-band normalisation on the device, from the batch's own dtype: ``(x - mean) / std`` as one affine per band,
``x * scale + shift``, with ``mean`` and ``std`` in the data's native units (what
:func:`~fastmae.train.data.bandstats.band_statistics` returns; ImageNet's RGB statistics are ``0.485 * 255, ...``).

What crosses processes and the bus: batches leave the DataLoader workers through shared memory and go to the GPU in
their native dtype, and only there become float. Per 224 x 224 image:

============================  ==================================  ==================================
data                          shared memory and PCIe (native)     as float32 (what a float loader sends)
============================  ==================================  ==================================
uint8 RGB (3 bands)           150,528 B (147 KiB)                 602,112 B (588 KiB)
uint16, 13 bands              1,304,576 B (1.24 MiB)              2,609,152 B (2.49 MiB)
float32, 13 bands             2,609,152 B (2.49 MiB)              2,609,152 B (2.49 MiB)
============================  ==================================  ==================================

(a batch of 256 13-band uint16 images: 334 MB, against 668 MB as float32). The float batch exists only on the device:
``bf16`` halves it there.
"""

from __future__ import annotations

import math

import torch

from fastmae.errors import FastMAEError

_AFFINES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_NATIVE = (torch.uint8, torch.uint16, torch.int16, torch.float32)


def band_affine(mean, std, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` float32 ``[C, 1, 1]`` on ``device`` with ``x * scale + shift == (x - mean) / std``: scale
    ``1 / std`` and shift ``-mean / std``, computed in float64 then rounded once. Made once per (statistics, device):
    a copy to a GPU at every step would synchronise it. A zero, negative or non-finite std is an error."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std) or not mean:
        raise FastMAEError(f"per-band mean ({len(mean)} values) and std ({len(std)} values) must have one value per "
                           "band")  # fmt: skip
    bad = [i for i, s in enumerate(std) if not (math.isfinite(s) and s > 0)]
    if bad or not all(math.isfinite(m) for m in mean):
        raise FastMAEError(f"band statistics unusable: std {[std[i] for i in bad]} at band(s) {bad} (need finite "
                           "std > 0 and finite means)")  # fmt: skip
    device = torch.device(device)
    key = (mean, std, device)
    if key not in _AFFINES:
        scale = torch.tensor([1 / s for s in std], dtype=torch.float64).view(-1, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float64).view(-1, 1, 1)
        _AFFINES[key] = (scale.float().to(device), shift.float().to(device))
    return _AFFINES[key]


def normalize_bands(imgs: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``imgs [..., C, H, W]`` (uint8, uint16, int16 or float32, on any device) normalised per band to ``dtype``
    (float32 or bfloat16): one float32 copy, then ``x * scale + shift`` in place (:func:`band_affine`), then the cast
    to ``dtype`` if it is not float32. For uint8 RGB with ImageNet's statistics times 255 it gives
    :func:`~fastmae.train.data.decode.normalize`'s numbers bit for bit (the same float32 scale and shift, the same
    op). A float32 batch is not modified."""
    if imgs.dtype not in _NATIVE:
        raise FastMAEError(f"batches of dtype {imgs.dtype} are not normalised (uint8, uint16, int16, float32 are)")
    if dtype not in (torch.float32, torch.bfloat16):
        raise FastMAEError(f"normalised batches are float32 or bfloat16, not {dtype}")
    scale, shift = band_affine(mean, std, imgs.device)
    if imgs.shape[-3] != scale.shape[0]:
        raise FastMAEError(f"batch of {imgs.shape[-3]} bands, statistics of {scale.shape[0]}")
    out = imgs.to(torch.float32, copy=True)
    torch.addcmul(shift, out, scale, out=out)
    return out if dtype == torch.float32 else out.to(dtype)
