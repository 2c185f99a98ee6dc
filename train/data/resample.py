"""Crop, resize and flip of multi-band images in their own dtype, in the loader's workers: ``[C, H, W]`` uint8 / uint16
/ int16 / float32 -> ``[C, S, S]`` of the same dtype, and the nodata fill that comes before.

The resampling is the uint8 path's (:func:`~fastmae.train.data.decode.crop_resize_flip`, Pillow's antialiased bicubic:
a = -0.5, the support scaled by the reduction, weights normalised per output pixel), computed in float32 from the
crop, with no rounding between the two passes; integers are rounded (half up) and clamped to their dtype once at the
end, float32 stays float32. uint8 images take the uint8 path itself, so RGB batches are bit for bit today's.

Three ways to compute it (``FASTMAE_RESAMPLE`` or ``backend=``):

- ``compiled`` (``fastmae/_resample.c``, built by pip where a C compiler is found): the crop is read once into a
  float32 pixel-interleaved buffer ``[h, w, C]``; the vertical pass sums each output row's taps over whole rows
  (``w * C`` floats, vectorised, in strips that stay in the core's L2); the horizontal pass sums each output pixel's
  taps with the bands as the vector (8 lanes at a time, four pixels in flight); each output row is rounded, clamped
  and written band by band. The hot loops are compiled for AVX2 + FMA and for the x86-64 baseline, picked when the
  module loads. About 2x the matrix path on a 13-band 264 px tile (``benchmarks/bench_bands.py``, stage rows).
- ``matmul``: torch only. The crop is copied once, cast to float32 and laid out ``[h, C, w]`` (rows, then bands,
  then columns). The vertical pass is ``R_y @ src.view(h, C*w)`` (``R_y``: the ``[S, h]`` resampling matrix),
  leaving ``[S, C, w]``; the horizontal pass multiplies on the right, ``tmp.view(S*C, w) @ R_x^T`` (rows of ``R_x``
  mirrored for a flip), leaving ``[S, C, S]``, and one casting copy writes ``[C, S, S]``. ``R`` is banded (each output
  takes 4 to ~10 neighbouring inputs), so each product runs over blocks of :data:`BLOCK` outputs and only the inputs
  they touch. About 2.5x torch's ``interpolate`` (which walks its taps pixel by pixel) on one core.
- ``reference``: :func:`crop_resize_flip_reference`, the same resampling matrices in float64, one image at a time;
  the tests bound both fast paths against it.

``fast`` (the default) is ``compiled`` where the extension is built and :data:`FASTER_ISAS` holds what it runs on this
CPU (AVX2 + FMA), else ``matmul``; :func:`backend_label` says which, and why (the loader logs it). Both use the same
float32 taps (the matrix's rows) and differ only in the order of the sums; work buffers are kept per thread and
reused.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import numpy as np
import torch

from fastmae.errors import FastMAEError

from .decode import crop_resize_flip as crop_resize_flip_uint8
from .decode import eval_resize_crop as eval_resize_crop_uint8

try:  # the compiled taps (fastmae/_resample.c): built by pip install where a C compiler is found, optional
    from fastmae import _resample as _compiled

    COMPILED_MISSING = ""
    COMPILED_ISA = _compiled.isa()  # the instruction set its hot loops run with on this CPU
except ImportError as err:  # pragma: no cover - depends on how fastmae was installed
    _compiled = None
    COMPILED_ISA = None
    COMPILED_MISSING = (f"fastmae's compiled resampler is not built ({err}); reinstall fastmae where a C compiler "
                        "and Python's headers are found")

BACKENDS = ("fast", "compiled", "matmul", "reference")
# where `fast` takes the compiled taps: where they measured faster than torch's products. On x86-64 with AVX2 + FMA,
# 2.0x (pixel-interleaved crops) and 1.5x (band planes); their x86-64 baseline clone (SSE2) was 1.04x and 1.32x
# slower than torch (13-band 264 px tiles, one core; benchmarks/bench_bands.py --stages). Elsewhere not measured.
FASTER_ISAS = ("x86-64-v3",)
BLOCK = 16  # output rows per banded block: 16 was fastest of 8/16/32/64 on a 13-band 264 px tile (x86, one core)
EVAL_CROP = 0.875  # the evaluation view resizes the shorter side to size / 0.875, then takes the centre
_INT_RANGE = {torch.uint8: (0, 255), torch.uint16: (0, 65535), torch.int16: (-32768, 32767)}


# ------------------------------------------------------------------------------------------ resampling matrices
def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=4096)
def resize_matrix(n_in: int, n_out: int, flip: bool = False) -> np.ndarray:
    """Pillow's antialiased bicubic resampling matrix ``[n_out, n_in]`` (float64, rows summing to 1): output ``o``
    takes inputs ``int(c - support + 0.5) .. int(c + support + 0.5)`` around ``c = (o + 0.5) * n_in / n_out``, with the
    support 2 scaled by the reduction when shrinking. Rows mirrored when ``flip``. Read-only (cached; made with array
    operations, ~0.1 ms: every crop size of an epoch is a new one the first time a worker meets it)."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    center = (np.arange(n_out) + 0.5) * scale
    lo = np.maximum(np.floor(center - support + 0.5), 0).astype(np.int64)  # Pillow's int() truncation, clipped at 0
    hi = np.minimum(np.floor(center + support + 0.5), n_in).astype(np.int64)
    taps = lo[:, None] + np.arange(int(np.max(hi - lo)))[None, :]  # [n_out, K] input positions
    valid = taps < hi[:, None]
    w = np.where(valid, _cubic((taps - center[:, None] + 0.5) / filterscale), 0.0)
    w /= w.sum(1, keepdims=True)
    m = np.zeros((n_out, n_in))
    rows = np.broadcast_to(np.arange(n_out)[:, None], taps.shape)
    m[rows[valid], taps[valid]] = w[valid]
    m = m[::-1].copy() if flip else m
    m.flags.writeable = False
    return m


@functools.lru_cache(maxsize=4096)
def _blocks(n_in: int, n_out: int, flip: bool) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """``resize_matrix`` cut into blocks of :data:`BLOCK` output rows: ``(o0, o1, i0, i1, float32 [o1-o0, i1-i0])``,
    each with the input rows its outputs touch."""
    m = resize_matrix(n_in, n_out, flip)
    out = []
    for o0 in range(0, n_out, BLOCK):
        sub = m[o0 : o0 + BLOCK]
        used = np.flatnonzero(np.abs(sub).sum(0))
        i0, i1 = int(used[0]), int(used[-1]) + 1
        out.append((o0, o0 + len(sub), i0, i1, torch.from_numpy(np.ascontiguousarray(sub[:, i0:i1], np.float32))))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _blocks_t(n_in: int, n_out: int, flip: bool) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """:func:`_blocks` with each block transposed (``[i1-i0, o1-o0]``), for multiplying on the right."""
    return tuple((o0, o1, i0, i1, m.t().contiguous()) for o0, o1, i0, i1, m in _blocks(n_in, n_out, flip))


def _banded(m_blocks, src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [n_out, K] = R @ src [n_in, K]`` with ``R`` given as banded blocks."""
    for o0, o1, i0, i1, m in m_blocks:
        torch.mm(m, src[i0:i1], out=out[o0:o1])
    return out


def _banded_right(src: torch.Tensor, m_blocks_t, out: torch.Tensor) -> torch.Tensor:
    """``out [K, n_out] = src [K, n_in] @ R^T`` with ``R^T`` given as banded blocks (column slices: BLAS takes them
    with their leading dimension, no copy)."""
    for o0, o1, i0, i1, m in m_blocks_t:
        torch.mm(src[:, i0:i1], m, out=out[:, o0:o1])
    return out


# ------------------------------------------------------------------------------------------------ the fast path
_SCRATCH = threading.local()  # per thread: float32 work buffers reused from call to call


def _scratch(slot: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 buffer of ``shape`` for this thread, reused by the next call: the three buffers of a 13-band 224 px
    resize are ~2.5 MB each, and fresh ones cost a page fault per 4 KiB at every call."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    numel = math.prod(shape)
    buf = bufs.get(slot)
    if buf is None or buf.numel() < numel:
        buf = bufs[slot] = torch.empty(numel, dtype=torch.float32)
    return buf[:numel].view(shape)


def _resize_float(crop: torch.Tensor, size_hw: tuple[int, int], flip: bool, nodata=None, fill=None) -> torch.Tensor:
    """``crop [C, h, w]`` (any dtype, any strides) -> float32 ``[S_h, C, S_w]``, resampled as above: a work buffer of
    this thread, overwritten by its next call."""
    c, h, w = crop.shape
    s_h, s_w = size_hw
    src = _scratch(0, (h, c, w))
    src.copy_(crop.permute(1, 0, 2))  # one read of the crop, cast on the way (a row at a time for H x W x C memory)
    if nodata is not None:  # on the float copy, with the fill an integer image would take (rounded, clamped)
        fill = _per_band(c, nodata, fill, crop.dtype)[1]
        fill_nodata(src.permute(1, 0, 2), nodata, fill, inplace=True)
    tmp = _banded(_blocks(h, s_h, False), src.view(h, c * w), _scratch(1, (s_h, c * w)))  # [S_h, C, w]
    out = _banded_right(tmp.view(s_h * c, w), _blocks_t(w, s_w, flip), _scratch(2, (s_h * c, s_w)))
    return out.view(s_h, c, s_w)


_DTYPE_CODE = {torch.uint8: 0, torch.uint16: 1, torch.int16: 2, torch.float32: 3}  # fastmae/_resample.c's codes


@functools.lru_cache(maxsize=4096)
def _taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``resize_matrix(n_in, n_out)`` as taps: the first input of each output row (int32 ``[n_out]``) and ``k``
    weights from there (float32 ``[n_out, k]``, zeros after a shorter row's last tap), ``k`` the widest row."""
    m = resize_matrix(n_in, n_out)
    nz = m != 0
    first = nz.argmax(1)
    last = n_in - 1 - nz[:, ::-1].argmax(1)
    k = int((last - first).max()) + 1
    lo = np.minimum(first, n_in - k)  # a row near the end starts earlier: its first weights are then zeros
    w = m[np.arange(n_out)[:, None], lo[:, None] + np.arange(k)[None, :]]
    return torch.from_numpy(lo.astype(np.int32)), torch.from_numpy(np.ascontiguousarray(w, np.float32)), k


def _nodata_arrays(c: int, dtype: torch.dtype, nodata, fill):
    """:func:`fill_nodata`'s rules as the compiled path's per-band arrays: which bands have a nodata value that the
    dtype can hold (uint8 ``[C]``), the value and the fill (float32 ``[C]``, the fill rounded and clamped for
    integers)."""
    nd, fv = _per_band(c, nodata, fill, dtype)
    if dtype == torch.float32:
        has = torch.ones(c, dtype=torch.uint8)  # NaN matches NaN there
    else:
        lo, hi = _INT_RANGE[dtype]
        has = (~torch.isnan(nd) & (nd == torch.round(nd)) & (nd >= lo) & (nd <= hi)).to(torch.uint8)
    return has, nd.float(), fv.float()


def _per_band(c: int, nodata, fill, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``nodata`` and ``fill`` (one value, or one per band) as float64 ``[C]`` each, the fill as an image of
    ``dtype`` takes it: for integers finite, rounded half up and clamped to the dtype."""
    nd = torch.as_tensor(nodata, dtype=torch.float64).flatten()
    fv = torch.as_tensor(fill, dtype=torch.float64).flatten()
    if nd.numel() not in (1, c) or fv.numel() not in (1, c):
        raise FastMAEError(f"nodata ({nd.numel()} values) and fill ({fv.numel()} values) need 1 or {c} values, one "
                           "per band")  # fmt: skip
    nd, fv = nd.expand(c).clone(), fv.expand(c).clone()
    if not dtype.is_floating_point:
        if not torch.isfinite(fv).all():
            raise FastMAEError(f"the nodata fill {fv.tolist()} of a {dtype} image must be finite (one value per "
                               "band, usually the band means)")  # fmt: skip
        lo, hi = _INT_RANGE[dtype]
        fv = torch.floor(fv + 0.5).clamp(lo, hi)
    return nd, fv


def _resize_compiled(crop: torch.Tensor, size_hw: tuple[int, int], flip: bool, nodata=None, fill=None,
                     out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``crop [C, h, w]`` (any strides) resized to ``[C, S_h, S_w]`` in its dtype by the compiled taps, into ``out``
    (any strides) or a new contiguous tensor. Every pointer, size and stride handed to C is checked here."""
    c, h, w = crop.shape
    s_h, s_w = size_hw
    if crop.device.type != "cpu" or (out is not None and out.device.type != "cpu"):
        raise FastMAEError(f"the compiled resampler works on CPU tensors (the image is on {crop.device}"
                           + (f", the output on {out.device})" if out is not None else ")"))  # fmt: skip
    if min(c, h, w, s_h, s_w) < 1:
        raise FastMAEError(f"cannot resample a crop of shape {list(crop.shape)} to {s_h} x {s_w}")
    if out is None:
        out = torch.empty(c, s_h, s_w, dtype=crop.dtype)
    elif out.shape != (c, s_h, s_w) or out.dtype != crop.dtype:
        raise FastMAEError(f"the output {list(out.shape)} {out.dtype} does not take a {c} x {s_h} x {s_w} "
                           f"{crop.dtype} resize")  # fmt: skip
    ylo, yw, ky = _taps(h, s_h)
    xlo, xw, kx = _taps(w, s_w)
    work = _scratch(3, (_compiled.work_floats(c, h, w, s_h, s_w),))
    has = nd = fv = None
    if nodata is not None:
        has, nd, fv = _nodata_arrays(c, crop.dtype, nodata, fill)
    _compiled.resample(crop.data_ptr(), _DTYPE_CODE[crop.dtype], c, h, w, *crop.stride(), ylo.data_ptr(),
                       yw.data_ptr(), ky, s_h, xlo.data_ptr(), xw.data_ptr(), kx, s_w, bool(flip), out.data_ptr(),
                       *out.stride(), work.data_ptr(), has.data_ptr() if has is not None else 0,
                       nd.data_ptr() if nd is not None else 0, fv.data_ptr() if fv is not None else 0)  # fmt: skip
    return out


def backend_label(backend: str | None = None) -> str:
    """What resamples non-8-bit crops in this process, for the log and the benchmarks' results."""
    chosen = _backend(backend)
    if chosen == "reference":
        return "float64 reference (FASTMAE_RESAMPLE=reference)"
    if chosen == "compiled" or (chosen == "fast" and _float_path("fast") == "compiled"):
        return f"compiled taps ({COMPILED_ISA})"
    if chosen == "matmul":
        return "torch matmul"
    if _compiled is None:
        return f"torch matmul ({COMPILED_MISSING})"
    return (f"torch matmul (the compiled taps run {COMPILED_ISA} code on this CPU, not measured faster there; "
            "FASTMAE_RESAMPLE=compiled takes them)")


def _to_dtype(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``x [S_h, C, S_w]`` (a work buffer) as ``[C, S_h, S_w]`` in ``dtype``: integers rounded half up and
    clamped to the dtype's range (in place on ``x``), then one casting copy into ``out``, or a new contiguous tensor."""
    if dtype != torch.float32:
        lo, hi = _INT_RANGE[dtype]
        x.add_(0.5)
        if lo < 0:
            x.floor_()  # a cast truncates towards zero: floor first for the negative ones
        x.clamp_(lo, hi)
    if out is None:
        out = torch.empty(x.shape[1], x.shape[0], x.shape[2], dtype=dtype)
    return out.copy_(x.permute(1, 0, 2))


def _check(img: torch.Tensor) -> None:
    if img.dim() != 3:
        raise FastMAEError(f"expected an image [C, H, W], got shape {list(img.shape)}")
    if img.dtype not in (torch.uint8, torch.uint16, torch.int16, torch.float32):
        raise FastMAEError(f"images of dtype {img.dtype} are not resampled (uint8, uint16, int16, float32 are)")


def _backend(backend: str | None) -> str:
    backend = backend or os.environ.get("FASTMAE_RESAMPLE") or "fast"
    if backend not in BACKENDS:
        raise FastMAEError(f"unknown resample backend {backend!r} (FASTMAE_RESAMPLE); choose one of "
                           f"{', '.join(BACKENDS)}")  # fmt: skip
    if backend == "compiled" and _compiled is None:
        raise FastMAEError(f"resample backend 'compiled' (FASTMAE_RESAMPLE): {COMPILED_MISSING}")
    return backend


def _float_path(backend: str, *tensors: torch.Tensor | None) -> str:
    """The path that computes non-uint8 crops: ``compiled``, ``matmul`` or ``reference``; ``fast`` is ``compiled``
    where it is built and every tensor is on the CPU."""
    if backend == "fast":
        on_cpu = all(t is None or t.device.type == "cpu" for t in tensors)
        return "compiled" if _compiled is not None and COMPILED_ISA in FASTER_ISAS and on_cpu else "matmul"
    return backend


def crop_resize_flip(img: torch.Tensor, box, flip: bool, size: int, *, nodata=None, fill=None,
                     backend: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The box ``(x, y, w, h)`` of ``img [C, H, W]`` resized to ``[C, size, size]`` (bicubic, antialiased), mirrored
    when ``flip``, in ``img``'s dtype: a new contiguous tensor, or written into ``out`` (a batch's slot) by the one
    casting copy that ends the computation. ``nodata`` (a value, per-band values, or NaN) is replaced by ``fill``
    (per-band values, e.g. the band means) before resampling: see :func:`fill_nodata`. uint8 without nodata takes the
    uint8 path (:func:`~.decode.crop_resize_flip`: today's RGB pixels, any band count)."""
    _check(img)
    x, y, w, h = (int(v) for v in box)
    crop = img[:, y : y + h, x : x + w]
    chosen = _backend(backend)
    path = _float_path(chosen, img, out)
    if path == "reference":
        if nodata is not None:
            crop = fill_nodata(crop, nodata, fill)
        res = crop_resize_flip_reference(crop, (0, 0, w, h), flip, size)
    elif chosen in ("fast", "matmul") and img.dtype == torch.uint8 and nodata is None:
        res = crop_resize_flip_uint8(img, box, flip, size)
    elif path == "compiled":
        return _resize_compiled(crop, (size, size), bool(flip), nodata, fill, out)
    else:
        return _to_dtype(_resize_float(crop, (size, size), bool(flip), nodata, fill), img.dtype, out)
    return res if out is None else out.copy_(res)


def eval_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after the evaluation view's first step: the shorter side resized to ``int(size / 0.875)``,
    the other in proportion (torchvision's ``Resize(int)`` arithmetic)."""
    short = int(size / EVAL_CROP)
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def eval_resize_crop(img: torch.Tensor, size: int, *, nodata=None, fill=None, backend: str | None = None):
    """The evaluation view of ``img [C, H, W]``: shorter side resized to ``int(size / 0.875)`` (bicubic, antialiased),
    then the centre ``size`` x ``size`` (:func:`~.decode.eval_resize_crop`'s geometry), in ``img``'s dtype."""
    _check(img)
    c, height, width = img.shape
    chosen = _backend(backend)
    path = _float_path(chosen, img)
    if chosen in ("fast", "matmul") and img.dtype == torch.uint8 and nodata is None:
        return eval_resize_crop_uint8(img, size)
    rh, rw = eval_size(height, width, size)
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))  # torchvision's center_crop
    if path == "reference":
        src = fill_nodata(img, nodata, fill) if nodata is not None else img
        full = _reference(src, (0, 0, width, height), False, (rh, rw))
    elif path == "compiled":
        full = _resize_compiled(img, (rh, rw), False, nodata, fill)
    else:
        full = _to_dtype(_resize_float(img, (rh, rw), False, nodata, fill), img.dtype)
    return full[:, top : top + size, left : left + size]


# ------------------------------------------------------------------------------------------------ the reference
def _reference(img: torch.Tensor, box, flip: bool, size_hw: tuple[int, int]) -> torch.Tensor:
    x, y, w, h = (int(v) for v in box)
    crop = img[:, y : y + h, x : x + w].to(torch.float64)
    ry = torch.from_numpy(resize_matrix(h, size_hw[0]).copy())
    rx = torch.from_numpy(resize_matrix(w, size_hw[1], bool(flip)).copy())
    out = torch.einsum("oy,cyx,px->cop", ry, crop, rx)
    if img.dtype == torch.float32:
        return out.float()
    lo, hi = _INT_RANGE[img.dtype]
    return torch.floor(out + 0.5).clamp(lo, hi).to(img.dtype)


def crop_resize_flip_reference(img: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """:func:`crop_resize_flip` in float64 with dense resampling matrices, one image at a time (integers rounded half
    up and clamped once at the end), for any dtype including uint8 (which the fast path leaves to the uint8 path,
    whose 8-bit rounding between the passes this one does not copy)."""
    _check(img)
    return _reference(img, box, flip, (size, size))


# ------------------------------------------------------------------------------------------------------ nodata
def fill_nodata(img: torch.Tensor, nodata, fill, inplace: bool = False) -> torch.Tensor:
    """``img [C, H, W]`` with every pixel equal to ``nodata`` replaced by ``fill``, band by band.

    ``nodata``: one value for all bands or one per band; NaN matches NaN (a float image's NaNs are filled only when
    ``nodata`` is NaN). ``fill``: one value or one per band; the band's mean (native units) is the usual choice, so that
    a filled pixel normalises to 0. For integer images the fill is rounded half up and clamped to the dtype, and a
    ``nodata`` that no value of the dtype equals matches nothing. A new tensor, or ``img`` itself when ``inplace``.

    Where it belongs: in the worker, on the native-dtype crop, *before* resampling. The bicubic filter mixes each
    output pixel from its neighbours, so a nodata value left in (0, -9999, NaN) would leak into the valid pixels next
    to it (a NaN spreads over the whole neighbourhood) before any device-side step could see it, and after the resize
    the nodata pixels can no longer be told apart. :func:`crop_resize_flip` fills its float32 working copy of the
    crop (no extra pass over the tile).
    """
    c = img.shape[0]
    nd, fv = _per_band(c, nodata, fill, img.dtype)
    nd, fv = nd.tolist(), fv.tolist()
    floating = img.is_floating_point()
    if not floating:
        lo, hi = _INT_RANGE[img.dtype]
    out = img if inplace else img.clone()
    bits = out.view(torch.int16) if out.dtype == torch.uint16 else out  # torch has no masked_fill for uint16

    def as_bits(v: float) -> int:  # a uint16 value as the int16 with its bits
        return int(v) - 65536 if out.dtype == torch.uint16 and v > 32767 else int(v)

    for b in range(c):  # per band: one comparison and one masked fill over a view
        v = nd[b]
        if math.isnan(v):
            if floating:
                out[b].masked_fill_(torch.isnan(out[b]), fv[b])
        elif floating:
            out[b].masked_fill_(out[b] == v, fv[b])
        elif v.is_integer() and lo <= v <= hi:
            bits[b].masked_fill_(bits[b] == as_bits(v), as_bits(fv[b]))
    return out
