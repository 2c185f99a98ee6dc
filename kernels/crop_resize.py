"""Random-resized-crop, flip, antialiased bicubic resize and normalisation of a whole batch of decoded images of
different sizes, in one Triton kernel: what ``--loader gpu`` runs on the images nvJPEG decoded.

Input: the batch's uint8 images [3, H_b, W_b] (CHW, as torchvision's decoders give them) packed into one flat buffer
with per-image offsets and sizes, a crop box ``(x, y, w, h)`` and a flip flag per image. Output: float32
[B, 3, S, S], normalised with the ImageNet mean and std, the crop resized to S x S.

Resampling is Pillow's (and torchvision's antialiased) bicubic: a = -0.5, the filter's support scaled by the
reduction when shrinking, per output pixel the taps ``int(center - support + 0.5) .. int(center + support + 0.5)``
clipped to the crop, weights normalised to sum 1, separable in x and y. Pillow and torchvision's uint8 path round
to 8 bits between the two passes and use fixed-point weights; this kernel keeps float32 throughout (clipped to the
8-bit range after each pass, as they are), so pixels differ
from the CPU pipeline by a few levels at most (``tests/test_crop_resize.py`` bounds it on the same boxes).
"""

from __future__ import annotations

import torch

from fastmae.bands import IMAGENET

from ._common import FastMAEError, tl, triton

IMAGENET_MEAN = tuple(m / 255 for m in IMAGENET.mean)  # 0-1 units: (0.485, 0.456, 0.406) to the bit
IMAGENET_STD = tuple(s / 255 for s in IMAGENET.std)  # (0.229, 0.224, 0.225)
SUPPORT = 2.0  # bicubic


# --------------------------------------------------------------------------------------------- the reference
def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _coeffs(in_size: int, out_size: int, flip: bool = False) -> torch.Tensor:
    """Pillow's resampling matrix [out_size, in_size] (float64), rows mirrored when ``flip``."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        x = torch.arange(lo, hi, dtype=torch.float64)
        w = _cubic((x - center + 0.5) / filterscale)
        m[o, lo:hi] = w / w.sum()
    return m.flip(0) if flip else m


def crop_resize_normalize_reference(images: list[torch.Tensor], boxes, flips, size: int) -> torch.Tensor:
    """The same computation in float64 PyTorch, image by image: [B, 3, size, size] float32."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    out = []
    for img, (x, y, w, h), flip in zip(images, boxes, flips, strict=True):
        crop = img[:, int(y) : int(y) + int(h), int(x) : int(x) + int(w)].double().cpu()
        ry, rx = _coeffs(int(h), size), _coeffs(int(w), size, bool(flip))
        rows = torch.einsum("cyx,px->cyp", crop, rx).clamp(0, 255)  # each pass clipped, as Pillow's 8-bit result
        res = torch.einsum("oy,cyp->cop", ry, rows).clamp(0, 255)
        out.append(((res / 255.0 - mean) / std).float())
    return torch.stack(out)


# --------------------------------------------------------------------------------------------- the kernel
@triton.jit
def _cubic_w(x):
    x = tl.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
    return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))


@triton.jit
def _crop_resize_fwd(src_ptr, offs_ptr, hw_ptr, box_ptr, flip_ptr, taps_ptr, out_ptr, S,
                     m0, m1, m2, s0, s1, s2, BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # output pixels of image b
    live = p < S * S
    oy = p // S
    ox = p % S
    base = tl.load(offs_ptr + b)  # int64: where image b starts in the flat buffer
    W = tl.load(hw_ptr + 2 * b + 1)
    H = tl.load(hw_ptr + 2 * b)
    x0 = tl.load(box_ptr + 4 * b)
    y0 = tl.load(box_ptr + 4 * b + 1)
    cw = tl.load(box_ptr + 4 * b + 2)
    ch = tl.load(box_ptr + 4 * b + 3)
    flip = tl.load(flip_ptr + b)
    ntx = tl.load(taps_ptr + 2 * b)
    nty = tl.load(taps_ptr + 2 * b + 1)
    ox = tl.where(flip != 0, S - 1 - ox, ox)
    scale_x = cw.to(tl.float32) / S
    scale_y = ch.to(tl.float32) / S
    fs_x = tl.maximum(scale_x, 1.0)
    fs_y = tl.maximum(scale_y, 1.0)
    cx = (ox.to(tl.float32) + 0.5) * scale_x
    cy = (oy.to(tl.float32) + 0.5) * scale_y
    lo_x = tl.maximum((cx - 2.0 * fs_x + 0.5).to(tl.int32), 0)  # truncation, as Pillow's int(); >= 0 here
    hi_x = tl.minimum((cx + 2.0 * fs_x + 0.5).to(tl.int32), cw)
    lo_y = tl.maximum((cy - 2.0 * fs_y + 0.5).to(tl.int32), 0)
    hi_y = tl.minimum((cy + 2.0 * fs_y + 0.5).to(tl.int32), ch)
    sum_x = tl.zeros([BLOCK], dtype=tl.float32)
    for tx in range(0, ntx):
        xi = lo_x + tx
        sum_x += tl.where(xi < hi_x, _cubic_w((xi.to(tl.float32) - cx + 0.5) / fs_x), 0.0)
    inv_x = 1.0 / tl.maximum(sum_x, 1e-12)
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    sum_y = tl.zeros([BLOCK], dtype=tl.float32)
    plane = H.to(tl.int64) * W
    for ty in range(0, nty):
        yi = lo_y + ty
        wy = tl.where(yi < hi_y, _cubic_w((yi.to(tl.float32) - cy + 0.5) / fs_y), 0.0)
        sum_y += wy
        row0 = tl.zeros([BLOCK], dtype=tl.float32)
        row1 = tl.zeros([BLOCK], dtype=tl.float32)
        row2 = tl.zeros([BLOCK], dtype=tl.float32)
        for tx in range(0, ntx):
            xi = lo_x + tx
            ok = live & (xi < hi_x) & (yi < hi_y)
            wx = tl.where(ok, _cubic_w((xi.to(tl.float32) - cx + 0.5) / fs_x), 0.0)
            at = base + (y0 + yi).to(tl.int64) * W + (x0 + xi)
            row0 += wx * tl.load(src_ptr + at, mask=ok, other=0).to(tl.float32)
            row1 += wx * tl.load(src_ptr + at + plane, mask=ok, other=0).to(tl.float32)
            row2 += wx * tl.load(src_ptr + at + 2 * plane, mask=ok, other=0).to(tl.float32)
        # Each pass's result clipped to [0, 255], as Pillow's 8-bit intermediate is (bicubic overshoots)
        acc0 += wy * tl.minimum(tl.maximum(row0 * inv_x, 0.0), 255.0)
        acc1 += wy * tl.minimum(tl.maximum(row1 * inv_x, 0.0), 255.0)
        acc2 += wy * tl.minimum(tl.maximum(row2 * inv_x, 0.0), 255.0)
    inv_y = 1.0 / tl.maximum(sum_y, 1e-12)
    v0 = tl.minimum(tl.maximum(acc0 * inv_y, 0.0), 255.0) / 255.0
    v1 = tl.minimum(tl.maximum(acc1 * inv_y, 0.0), 255.0) / 255.0
    v2 = tl.minimum(tl.maximum(acc2 * inv_y, 0.0), 255.0) / 255.0
    out = out_ptr + b.to(tl.int64) * 3 * S * S + p
    tl.store(out, (v0 - m0) * s0, mask=live)
    tl.store(out + S * S, (v1 - m1) * s1, mask=live)
    tl.store(out + 2 * S * S, (v2 - m2) * s2, mask=live)


# --------------------------------------------------------------------------------------------- launcher
def _taps(in_size: torch.Tensor, size: int) -> torch.Tensor:
    """The most taps any output pixel needs along an axis of ``in_size`` pixels (support window, both ends)."""
    scale = in_size.double() / size
    return (2 * torch.ceil(SUPPORT * scale.clamp_min(1.0)) + 2).to(torch.int32)


def pack(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat uint8 buffer, int64 offsets [B], int32 [B, 2] heights and widths) of CHW uint8 images."""
    if any(img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3 for img in images):
        raise FastMAEError("crop_resize_normalize: images must be uint8 [3, H, W]")
    sizes = torch.tensor([img.numel() for img in images], dtype=torch.int64)
    offsets = torch.cumsum(sizes, 0) - sizes
    flat = torch.cat([img.reshape(-1) for img in images])
    hw = torch.tensor([[img.shape[1], img.shape[2]] for img in images], dtype=torch.int32)
    return flat, offsets, hw


def crop_resize_normalize(images: list[torch.Tensor], boxes, flips, size: int, block: int = 256) -> torch.Tensor:
    """[B, 3, size, size] float32 on the images' device: each box ``(x, y, w, h)`` of its image resized (bicubic,
    antialiased), mirrored where ``flips``, normalised. One kernel launch for the batch."""
    if not images:
        raise FastMAEError("crop_resize_normalize: an empty batch")
    device = images[0].device
    flat, offsets, hw = pack(images)
    boxes = torch.as_tensor(boxes, dtype=torch.int32).reshape(len(images), 4)
    if (boxes[:, :2] < 0).any() or (boxes[:, 2:] < 1).any() or (boxes[:, 0] + boxes[:, 2] > hw[:, 1]).any() or (
            boxes[:, 1] + boxes[:, 3] > hw[:, 0]).any():  # fmt: skip
        raise FastMAEError("crop_resize_normalize: a crop box lies outside its image")
    taps = torch.stack([_taps(boxes[:, 2], size), _taps(boxes[:, 3], size)], 1)
    flips = torch.as_tensor(flips, dtype=torch.int32).reshape(len(images))
    meta = [t.to(device, non_blocking=True) for t in (offsets, hw, boxes, flips, taps)]
    out = torch.empty(len(images), 3, size, size, dtype=torch.float32, device=device)
    norm = [m for m in IMAGENET_MEAN] + [1.0 / s for s in IMAGENET_STD]
    grid = (len(images), triton.cdiv(size * size, block))
    _crop_resize_fwd[grid](flat, *meta, out, size, *(m * 1.0 for m in norm), BLOCK=block)
    return out
