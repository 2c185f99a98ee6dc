"""Multi-band rasters to pixels: ``.npy`` arrays, TIFF / GeoTIFF and PNG (8 and 16 bits), read from a path or from
bytes (a webdataset member) to a ``[C, H, W]`` tensor in the file's own dtype (uint8, uint16, int16 or float32).

- :func:`probe_raster`: what the index needs per file (format, bands, height, width, dtype, GeoTIFF keys or not), from
  the header only: numpy's ``.npy`` header, tifffile's first IFDs (no pixel is decoded), a PNG's IHDR chunk.
- :func:`read_raster`: the pixels. A ``.npy`` file is memory-mapped (copy on write); from bytes it is a view of
  them. :func:`read_raster_rows`: a crop's rows, read alone from a ``.npy`` file (``pread``). TIFF goes through
  tifffile (deflate, LZMA and uncompressed with tifffile alone;
  LZW, zstd, JPEG, packbits and the rest need the ``imagecodecs`` package, ``pip install 'fastmae[tiff]'``); PNG
  through TorchCodec or torchvision.io in their ``UNCHANGED`` mode, which keep 16 bits (Pillow turns 16-bit RGB into
  8 bits: it is used only for 8-bit and greyscale 16-bit files when neither loads).
- :func:`check_raster`: the validation the index runs once per file: the header, then a full decode (so truncation
  shows), the decoded shape against the header's, and no band that is NaN everywhere. It never raises: it returns the
  :class:`RasterInfo`, or a one-line reason (the index counts the file as broken with it).

Layouts: a ``.npy`` array is ``H x W`` (one band), ``H x W x C``, or ``C x H x W`` when its first axis is smaller than
its last. A TIFF's bands are its samples (contiguous or planar), or its pages when they form one series (tifffile's
``series[0]``, axes such as ``SYX``, ``YXS``, ``IYX``); a file with more than one axis besides Y and X (a time series of
multi-band images) is refused. GeoTIFF keys are read as tags and otherwise ignored: pixels as stored.

Dtypes: uint8, uint16, int16 and float32 travel as they are (:data:`DTYPES`); anything else (int8, int32, int64,
float16, float64, bool, complex, ...) is refused with a reason naming the dtype rather than converted behind the
caller's back.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

DTYPES = ("uint8", "uint16", "int16", "float32")
RASTER_EXTENSIONS = (".npy", ".tif", ".tiff", ".png")
FORMATS = ("npy", "tiff", "png")
GEOTIFF_TAGS = {33550: "ModelPixelScale", 33922: "ModelTiepoint", 34264: "ModelTransformation",
                34735: "GeoKeyDirectory"}  # fmt: skip
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_NPY_MAGIC = b"\x93NUMPY"
_PNG_BANDS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples (3, palette, is an RGB image, not a raster)


class RasterError(ValueError):
    """A raster fastmae does not read; the message is the one-line reason."""


@dataclass(frozen=True)
class RasterInfo:
    """One raster's header: ``format`` (npy, tiff, png), band count, size, dtype name, whether it has GeoTIFF keys
    (read as plain pixels all the same), and the band names a TIFF carries as GDAL band descriptions (else empty)."""

    format: str
    bands: int
    height: int
    width: int
    dtype: str
    geo: bool = False
    names: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.bands, self.height, self.width


# ------------------------------------------------------------------------------------------------ sources
def _is_bytes(source) -> bool:
    return isinstance(source, bytes | bytearray | memoryview)


def _head(source, n: int = 8) -> bytes:
    if _is_bytes(source):
        return bytes(source[:n])
    with open(source, "rb") as f:
        return f.read(n)


def raster_format(source) -> str | None:
    """``npy``, ``tiff`` or ``png`` from the first bytes of ``source`` (a path or bytes), or None."""
    head = _head(source)
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head.startswith(_PNG_MAGIC):
        return "png"
    return None


def _format(source) -> str:
    if (len(source) if _is_bytes(source) else os.path.getsize(source)) == 0:
        raise RasterError("empty file")
    fmt = raster_format(source)
    if fmt is None:
        raise RasterError("not a .npy, TIFF or PNG file (unknown first bytes)")
    return fmt


def _dtype_name(dtype: np.dtype, what: str) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise RasterError(f"{what} of dtype {name}: fastmae reads {', '.join(DTYPES)}")
    return name


# --------------------------------------------------------------------------------------------------- .npy
def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        major, _ = np.lib.format.read_magic(f)
        read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
        if read is None:
            raise RasterError(f".npy format version {major} is not readable")
        return read(f)
    except RasterError:
        raise
    except Exception as exc:  # numpy's own ValueError texts are clear
        raise RasterError(f"bad .npy header ({str(exc).splitlines()[0][:120]})") from exc


def _npy_layout(shape: tuple[int, ...]) -> str:
    """``hw``, ``hwc`` or ``chw`` of an array shape."""
    if len(shape) == 2:
        return "hw"
    if len(shape) == 3:
        return "chw" if shape[0] < shape[2] else "hwc"
    raise RasterError(f".npy array of shape {shape}: fastmae reads H x W, H x W x C or C x H x W")


def _npy_info(source) -> tuple[RasterInfo, int, bool, np.dtype, tuple[int, ...]]:
    """(info, data offset, fortran order, dtype, shape) from a ``.npy`` header."""
    f = io.BytesIO(source[: 65536 + 16]) if _is_bytes(source) else open(source, "rb")  # header <= 64 KiB
    with f:
        shape, fortran, dtype = _npy_header(f)
        offset = f.tell()
    name = _dtype_name(dtype, ".npy array")
    layout = _npy_layout(shape)
    c, h, w = (1, *shape) if layout == "hw" else (shape[2], shape[0], shape[1]) if layout == "hwc" else shape
    if min(c, h, w) < 1:
        raise RasterError(f".npy array of shape {shape} is empty")
    return RasterInfo("npy", int(c), int(h), int(w), name), offset, fortran, dtype, shape


def _read_npy(source) -> torch.Tensor:
    info, offset, fortran, dtype, shape = _npy_info(source)
    count = int(np.prod(shape))
    if _is_bytes(source):
        if len(source) - offset < count * dtype.itemsize:
            raise RasterError(f".npy data is truncated ({len(source) - offset} of {count * dtype.itemsize} bytes)")
        arr = np.frombuffer(source, dtype=dtype, count=count, offset=offset)
        if not arr.flags.writeable:  # immutable bytes: torch wants a buffer it may write
            arr = arr.copy()
        arr = arr.reshape(shape, order="F" if fortran else "C")
    else:
        size = os.path.getsize(source)
        if size - offset < count * dtype.itemsize:
            raise RasterError(f".npy data is truncated ({size - offset} of {count * dtype.itemsize} bytes)")
        # copy on write: writable (torch wants that) without touching the file; pages are read as a crop needs them
        arr = np.load(source, mmap_mode="c")
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    layout = _npy_layout(shape)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if layout == "hw" else t.permute(2, 0, 1) if layout == "hwc" else t


# --------------------------------------------------------------------------------------------------- TIFF
def _tifffile():
    try:
        import tifffile
    except ImportError as exc:  # a dependency of fastmae (and of scikit-image): only a broken install lacks it
        raise RasterError(f"reading TIFF needs tifffile ({exc})") from exc
    quiet = logging.getLogger("tifffile")
    if quiet.level == logging.NOTSET:  # its warnings about a malformed file are our reason line; the index is quiet
        quiet.setLevel(logging.ERROR)
    return tifffile


def _tiff_axes(series) -> tuple[int | None, tuple[int, ...]]:
    """(the band axis or None, axes to squeeze) of a tifffile series, by its axes letters."""
    axes, shape = series.axes, series.shape
    if "Y" not in axes or "X" not in axes:
        raise RasterError(f"TIFF of shape {shape} with axes {axes}: no Y and X axes")
    squeeze = tuple(i for i, a in enumerate(axes) if a not in "YX" and shape[i] == 1)
    band = [i for i, a in enumerate(axes) if a not in "YX" and shape[i] > 1]
    if len(band) > 1:
        raise RasterError(f"TIFF of shape {shape} with axes {axes}: more than one axis besides Y and X")
    return (band[0] if band else None), squeeze


def _open_tiff(source):
    tifffile = _tifffile()
    try:
        return tifffile.TiffFile(io.BytesIO(source) if _is_bytes(source) else source)
    except Exception as exc:
        raise RasterError(f"TIFF header does not read ({_first_line(exc)})") from exc


def _tiff_info(tif) -> tuple[RasterInfo, object]:
    try:
        series = tif.series[0]
        page = tif.pages[0]
    except IndexError as exc:
        raise RasterError("TIFF has no image directory that reads (truncated, or not a TIFF)") from exc
    except Exception as exc:
        raise RasterError(f"TIFF has no image ({_first_line(exc)})") from exc
    band, _ = _tiff_axes(series)
    shape = series.shape
    c = shape[band] if band is not None else 1
    h, w = shape[series.axes.index("Y")], shape[series.axes.index("X")]
    name = _dtype_name(series.dtype, "TIFF")
    geo = any(tag in page.tags for tag in GEOTIFF_TAGS)
    names = _gdal_band_names(page, int(c))
    return RasterInfo("tiff", int(c), int(h), int(w), name, geo, names), series


def _gdal_band_names(page, bands: int) -> tuple[str, ...]:
    """Band descriptions from GDAL's metadata tag (42112: ``<Item name="DESCRIPTION" sample="i" role="description">``),
    all of them or none."""
    tag = page.tags.get(42112)
    if tag is None or not isinstance(tag.value, str):
        return ()
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(tag.value)
    except ET.ParseError:
        return ()
    found = {}
    for item in root.iter("Item"):
        if item.get("role") == "description" and (item.get("sample") or "").isdigit():
            found[int(item.get("sample"))] = (item.text or "").strip()
    names = tuple(found.get(i, "") for i in range(bands))
    return names if all(names) else ()


def _read_tiff(source) -> torch.Tensor:
    with _open_tiff(source) as tif:
        info, series = _tiff_info(tif)
        band, squeeze = _tiff_axes(series)
        try:
            arr = series.asarray()
        except Exception as exc:
            raise RasterError(_tiff_decode_reason(exc, tif)) from exc
    axes = "".join(a for i, a in enumerate(series.axes) if i not in squeeze)
    arr = arr.squeeze(squeeze) if squeeze else arr
    if arr.shape != tuple(series.shape[i] for i in range(len(series.shape)) if i not in squeeze):
        raise RasterError(f"TIFF decoded to shape {arr.shape}, its header says {series.shape}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    t = torch.from_numpy(arr)
    order = [axes.index(a) for a in axes if a not in "YX"] + [axes.index("Y"), axes.index("X")]
    t = t.permute(order)
    return t if band is not None else t.reshape(1, info.height, info.width)


def _tiff_decode_reason(exc: Exception, tif) -> str:
    text = _first_line(exc)
    if "imagecodecs" in text:
        try:
            codec = tif.pages[0].compression.name
        except Exception:
            codec = "this"
        return f"TIFF compression {codec} needs the imagecodecs package (pip install 'fastmae[tiff]')"
    return f"TIFF pixels do not decode ({text})"


# ---------------------------------------------------------------------------------------------------- PNG
def _png_info(source) -> RasterInfo:
    head = bytes(source[:33]) if _is_bytes(source) else _head(source, 33)
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise RasterError("PNG without a whole IHDR chunk")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if colour not in _PNG_BANDS or depth not in (8, 16):
        kind = "palette" if colour == 3 else f"{depth}-bit"
        raise RasterError(f"{kind} PNG is not a raster of 8- or 16-bit bands (the RGB route reads it)")
    if width < 1 or height < 1:
        raise RasterError(f"PNG of size {width}x{height}")
    return RasterInfo("png", _PNG_BANDS[colour], int(height), int(width), "uint16" if depth == 16 else "uint8")


def _png_decoder():
    """``(name, decode(encoded uint8 tensor) -> [C, H, W])`` of the process's PNG decoder (:mod:`.decode`'s choice,
    in its UNCHANGED mode), or ``("pillow", None)``."""
    from . import decode

    chosen = decode.resolve_decoder()
    if chosen == "torchcodec":
        from torchcodec.decoders import decode_png

        return chosen, lambda x: decode_png(x, mode="UNCHANGED", output_dtype="auto")
    if chosen == "torchvision":
        decode._fast("torchvision")  # its deprecation warning silenced, as for the RGB routes
        from torchvision.io import ImageReadMode, decode_png

        return chosen, lambda x: decode_png(x, mode=ImageReadMode.UNCHANGED)
    return "pillow", None


def _read_png(source) -> torch.Tensor:
    info = _png_info(source)
    if _is_bytes(source):
        data = source
    else:
        with open(source, "rb") as f:
            data = f.read()
    name, fast = _png_decoder()
    if fast is not None:
        try:
            t = fast(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except Exception as exc:
            raise RasterError(f"PNG does not decode ({_first_line(exc)})") from exc
        if t.dtype == torch.int32:  # older torchvision gave 16-bit PNGs as int32
            t = t.to(torch.uint16)
    else:
        if info.dtype == "uint16" and info.bands > 1:
            raise RasterError("16-bit colour PNG needs TorchCodec or torchvision.io (Pillow keeps 8 bits of it)")
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                arr = np.array(img)
        except Exception as exc:
            raise RasterError(f"PNG does not decode ({_first_line(exc)})") from exc
        arr = arr.astype(np.uint16) if info.dtype == "uint16" else arr
        t = torch.from_numpy(arr).unsqueeze(0) if arr.ndim == 2 else torch.from_numpy(arr).permute(2, 0, 1)
    return t


# ------------------------------------------------------------------------------------------------- public
def probe_raster(source) -> RasterInfo:
    """The header of a raster (a path or bytes): format, bands, height, width, dtype, GeoTIFF or not. No pixel is
    decoded. Raises :class:`RasterError` with the reason for what fastmae does not read."""
    fmt = _format(source)
    if fmt == "npy":
        return _npy_info(source)[0]
    if fmt == "png":
        return _png_info(source)
    with _open_tiff(source) as tif:
        return _tiff_info(tif)[0]


def read_raster(source) -> torch.Tensor:
    """The pixels of a raster (a path or bytes): ``[C, H, W]`` in the file's dtype (possibly a strided view of
    ``H x W x C`` memory, or of a memory-mapped ``.npy`` file). Raises :class:`RasterError` with the reason."""
    fmt = _format(source)
    return {"npy": _read_npy, "tiff": _read_tiff, "png": _read_png}[fmt](source)


def read_raster_rows(source, y0: int, y1: int) -> torch.Tensor:
    """Rows ``y0:y1`` of a raster: ``[C, y1 - y0, W]`` in the file's dtype, what a crop needs. A C-order ``.npy``
    file on disk is read with ``pread`` of just those rows (one call for ``H x W x C`` or ``H x W``, one per band for
    ``C x H x W``) into memory of this process, not memory-mapped: on page-cached data a fresh mapping of every file
    costs a page fault per 4 KiB touched, about as much as reading the bytes (bench_bands, ``--stages``). Other
    sources are read whole and sliced."""
    if not _is_bytes(source) and _format(source) == "npy":
        info, offset, fortran, dtype, shape = _npy_info(source)
        if not fortran and dtype.isnative and 0 <= y0 < y1 <= info.height:
            return _pread_npy_rows(source, info, offset, dtype, _npy_layout(shape), y0, y1)
    return read_raster(source)[:, y0:y1]


def _pread_npy_rows(path, info: RasterInfo, offset: int, dtype: np.dtype, layout: str, y0: int, y1: int):
    c, h, w = info.shape
    n = y1 - y0
    row = w * (c if layout == "hwc" else 1) * dtype.itemsize  # bytes of one row of one plane
    planes = c if layout == "chw" else 1  # a C x H x W file: each band's rows are their own byte range
    arr = np.empty((c, n, w) if layout == "chw" else (n, w, c) if layout == "hwc" else (n, w), dtype=dtype)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        pread_planes(fd, arr, planes, offset + y0 * row, h * row, ".npy data", f"rows {y0}-{y1} of ")
    finally:
        os.close(fd)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if layout == "hw" else t.permute(2, 0, 1) if layout == "hwc" else t


def pread_planes(fd: int, arr: np.ndarray, planes: int, start: int, stride: int, what: str,
                 where: str = "") -> np.ndarray:  # fmt: skip
    """Fill ``arr`` (C-contiguous) from file ``fd``: its ``planes`` equal parts from the byte ranges at ``start``,
    ``start + stride``, ..., one ``pread`` each. A short read is a :class:`RasterError`: ``what`` is truncated
    (``where`` band ...)."""
    flat = memoryview(arr.reshape(-1)).cast("B")
    size = len(flat) // planes
    for b in range(planes):
        got = os.preadv(fd, [flat[b * size : (b + 1) * size]], start + b * stride)
        if got != size:
            raise RasterError(f"{what} is truncated ({where}band {b}: {got} of {size} bytes)")
    return arr


def raster_label() -> str:
    """What reads the raster route, with versions: for ``summary.json`` and the log."""
    try:
        import tifffile

        tiff = f"tifffile {tifffile.__version__}"
    except ImportError:
        tiff = "no tifffile"
    return f"fastmae rasters (numpy {np.__version__}, {tiff})"


def check_raster(source) -> RasterInfo | str:
    """Validate a raster once (the index's probe): header, full decode, decoded shape and dtype against the header's,
    no float band that is NaN everywhere. The :class:`RasterInfo`, or the one-line reason it is not readable."""
    try:
        info = probe_raster(source)
        pixels = read_raster(source)
        if tuple(pixels.shape) != info.shape or str(pixels.dtype).removeprefix("torch.") != info.dtype:
            return (f"decoded to {list(pixels.shape)} {str(pixels.dtype).removeprefix('torch.')}, the header says "
                    f"{list(info.shape)} {info.dtype}")  # fmt: skip
        if pixels.is_floating_point():
            empty = torch.isnan(pixels).flatten(1).all(1).nonzero().flatten().tolist()
            if empty:
                return f"band {', '.join(str(b) for b in empty)} (from 0) is NaN everywhere"
        return info
    except RasterError as exc:
        return str(exc)
    except Exception as exc:  # anything a decoder raises: a reason, never a crash of the index
        return f"does not read ({_first_line(exc)})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__
