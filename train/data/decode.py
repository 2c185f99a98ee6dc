"""Bytes to pixels, as pure functions of (bytes, per-sample parameters): the validation probe, decoding to uint8
tensors, and the crop / resize / flip of the loaders on uint8 tensors.

Decoding: JPEG (RGB, greyscale; baseline and progressive) and 8-bit PNG (RGB, greyscale, palette; no transparency, no
ICC profile) go through the first of these that loads: **TorchCodec** (``torchcodec.decoders``, >= 0.16, torch >=
2.11; ``pip install 'fastmae[torchcodec]'``), **torchvision** (``torchvision.io``, deprecated since 0.29 in favour of
TorchCodec), else Pillow. Both give Pillow's pixels bit for bit (libjpeg-turbo, libpng; ``tests/test_data.py``), in
about 0.6 of the time. Every other file (CMYK, 16-bit, alpha, GIF, WebP, TIFF, BMP, ...) goes through Pillow's
:func:`load_rgb`, which turns any mode into 8-bit RGB, and so does a file the chosen decoder refuses. The route is
chosen once, at validation, and kept in the index (:data:`FAST_ROUTES`, :data:`DALI_NATIVE`); the decoder per route
once per process (:func:`resolve_decoder`; ``FASTMAE_DECODER=torchcodec|torchvision|pillow`` forces one).

EXIF orientation is applied by **no** route: pixels are taken as encoded, as the official MAE pipeline (Pillow's
``ImageFolder``) and DALI (``adjust_orientation=False``) take them, and the index's widths and heights are those.
TorchCodec always applies a JPEG's EXIF orientation, so a JPEG whose EXIF orientation tag is not 1
(:func:`exif_orientation`, read from the header) goes around it, to Pillow.

Resampling: torch's antialiased bicubic resize of uint8 images, which follows Pillow's filter (a = -0.5, support
scaled with the reduction): pixels within a few levels of Pillow's resize (the tests bound it). Normalisation is not
done here: batches stay uint8 until they are on the device (:func:`normalize`).
"""

from __future__ import annotations

import functools
import io
import os
import struct
import warnings

import numpy as np
import torch
from PIL import Image

from fastmae.bands import IMAGENET
from fastmae.errors import FastMAEError, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".npy")
IMAGENET_MEAN = tuple(m / 255 for m in IMAGENET.mean)  # 0-1 units: (0.485, 0.456, 0.406) to the bit
IMAGENET_STD = tuple(s / 255 for s in IMAGENET.std)  # (0.229, 0.224, 0.225)

# Decode routes, one byte per sample in the index, found by :func:`probe` (RASTER: by the index's raster check, read
# by :func:`~fastmae.train.data.rasters.read_raster` in the file's own bands and dtype, never through these decoders).
BAD, JPEG, JPEG_CMYK, PNG, PNG16, OTHER_NATIVE, PIL_ONLY, RASTER = range(8)
UNKNOWN = 255  # not validated yet (only inside the index builder)
FAST_ROUTES = (JPEG, PNG)  # TorchCodec and torchvision.io give Pillow's pixels exactly
TORCHVISION = FAST_ROUTES  # the older name
ROUTE_NAMES = {JPEG: "jpeg", JPEG_CMYK: "jpeg-cmyk", PNG: "png", PNG16: "png16", OTHER_NATIVE: "other",
               PIL_ONLY: "pillow-only", RASTER: "raster"}  # fmt: skip
DECODERS = ("auto", "torchcodec", "torchvision", "pillow")  # FASTMAE_DECODER; auto: the first that loads
# DALI's decoders give load_rgb's pixels (checked in the tests); anything else reaches DALI as an uncompressed BMP.
DALI_NATIVE = (JPEG, JPEG_CMYK, PNG, PNG16, OTHER_NATIVE)
_OTHER_NATIVE = {"BMP": {"RGB", "L"}, "TIFF": {"RGB", "L"}, "WEBP": {"RGB"}}


def load_rgb(source) -> Image.Image:
    """Decode any image mode to 8-bit RGB (16-bit and float images rescaled, alpha composited on white).

    ``source`` is a path, a binary file object or a bytes-like object.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    with Image.open(source) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        elif img.mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def _route(fmt: str | None, mode: str, info: dict, data) -> int:
    transparent = "transparency" in info
    if fmt == "JPEG":
        return JPEG if mode in ("RGB", "L") else JPEG_CMYK if mode == "CMYK" else PIL_ONLY
    if fmt == "PNG":
        if mode in ("RGB", "L", "P", "I;16") and not transparent:
            depth = data[24] if len(data) > 24 else 0  # IHDR bit depth (Pillow shows 16-bit RGB as mode RGB)
            if depth == 8 and mode != "I;16" and "icc_profile" not in info:
                return PNG
            # An ICC profile makes libpng print a warning per decode for some profiles (scikit-image's own photos):
            # Pillow decodes those quietly, to the same pixels (neither applies the profile).
            return PNG16 if depth == 16 else OTHER_NATIVE
        return PIL_ONLY
    return OTHER_NATIVE if mode in _OTHER_NATIVE.get(fmt, ()) else PIL_ONLY


def probe(data) -> tuple[int, int, int]:
    """Fully decode ``data`` (JPEG at 1/8 scale: the entropy stream is still read to the end, so truncation shows).

    Returns (width, height, decode route); raises on anything that is not a whole image.
    """
    if not data:
        raise ValueError("empty file")
    with Image.open(io.BytesIO(data)) as img:
        width, height, route = img.width, img.height, _route(img.format, img.mode, img.info, data)
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        img.load()
    if width < 1 or height < 1:
        raise ValueError(f"image has size {width}x{height}")
    return width, height, route


def exif_orientation(data) -> int:
    """The EXIF orientation tag (1-8) of a JPEG, from its APP1 segment; 1 when it has none. A JPEG whose EXIF segment
    cannot be read counts as oriented (0), so that it takes the decoder that ignores EXIF (Pillow)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return 1
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return 1
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA or (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):  # scan or frame: no more
            return 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if marker == 0xE1 and bytes(data[i + 4 : i + 10]) == b"Exif\x00\x00":
            return _tiff_orientation(bytes(data[i + 10 : i + 2 + length]))
        i += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 of an EXIF TIFF block; 1 without it, 0 when the block is malformed."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHIH", tiff, ifd + 2 + 12 * k)
            if tag == 0x0112:
                return value if kind == 3 else 0  # SHORT
    except (KeyError, struct.error):
        return 0
    return 1


def _load_torchcodec():
    """TorchCodec's JPEG and PNG decoders (CPU), or the reason they do not load."""
    try:
        from importlib.metadata import version

        from torchcodec.decoders import decode_jpeg, decode_png
    except ImportError as exc:  # not installed, or a build for another torch (its libraries do not load)
        why = one_line(exc, limit=160)
        return f"torchcodec does not import ({why}); pip install 'fastmae[torchcodec]' (torch >= 2.11)"
    except Exception as exc:  # e.g. RuntimeError from its library loading
        return f"torchcodec does not load ({one_line(exc, typed=True, limit=160)})"
    return {JPEG: decode_jpeg, PNG: decode_png, "mode": "RGB", "version": version("torchcodec").split("+")[0]}


def _load_torchvision():
    """torchvision.io's JPEG and PNG decoders (deprecated since 0.29 in favour of TorchCodec), or why not."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg, decode_png
    except ImportError as exc:
        return f"torchvision.io has no image decoders ({exc})"
    import torchvision

    # Each call warns about that deprecation; fastmae knows (TorchCodec comes first where it is installed).
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)  # fmt: skip
    return {JPEG: decode_jpeg, PNG: decode_png, "mode": ImageReadMode.RGB, "version": torchvision.__version__}


_LOADERS = {"torchcodec": _load_torchcodec, "torchvision": _load_torchvision}


@functools.cache
def _fast(name: str) -> dict | str:
    """The decoders of ``name`` (torchcodec | torchvision), or the reason they cannot run; loaded once per process
    (nothing is imported before a decode needs it)."""
    return _LOADERS[name]()


def decoder_unavailable_reason(name: str) -> str | None:
    """Why decoder ``name`` cannot run in this process, or None (``pillow`` always can)."""
    if name not in DECODERS:
        raise FastMAEError(f"unknown decoder {name!r} (FASTMAE_DECODER); choose one of {', '.join(DECODERS)}")
    if name in ("auto", "pillow"):
        return None
    got = _fast(name)
    return got if isinstance(got, str) else None


def resolve_decoder(name: str | None = None) -> str:
    """The decoder the JPEG and PNG routes use: ``name``, else ``$FASTMAE_DECODER``, else ``auto`` = TorchCodec where
    it loads, else torchvision, else Pillow. An explicit one that cannot run raises with the reason."""
    name = name or os.environ.get("FASTMAE_DECODER") or "auto"
    if name == "auto":
        return next((n for n in ("torchcodec", "torchvision") if isinstance(_fast(n), dict)), "pillow")
    if (reason := decoder_unavailable_reason(name)) is not None:
        raise FastMAEError(f"decoder {name}: {reason}")
    return name


def pillow_label() -> str:
    import PIL

    return f"pillow {PIL.__version__}"


def decoder_names(routes, decoder: str | None = None) -> dict[str, str]:
    """``{route: decoder and version}`` for the decode routes in ``routes`` (an index's), as :func:`decode` with
    ``decoder`` runs them: what ``summary.json`` and the first log lines name."""
    chosen = resolve_decoder(decoder)
    fast = _fast(chosen) if chosen != "pillow" else None
    pillow = pillow_label()
    out = {}
    for route in sorted({int(r) for r in routes}):
        if route in FAST_ROUTES and fast is not None:
            out[ROUTE_NAMES[route]] = f"{chosen} {fast['version']}"
            if route == JPEG and chosen == "torchcodec":
                out["jpeg with an EXIF orientation"] = pillow
        elif route == RASTER:
            from .rasters import raster_label

            out[ROUTE_NAMES[route]] = raster_label()
        elif route in ROUTE_NAMES:
            out[ROUTE_NAMES[route]] = pillow
    return out


def decode(data, route: int, decoder: str | None = None) -> torch.Tensor:
    """uint8 RGB [3, H, W] of an encoded image, by the route its validation chose and ``decoder`` (default: this
    process's, :func:`resolve_decoder`). Pillow decodes what the fast decoder refuses; what Pillow refuses raises."""
    if route in FAST_ROUTES:
        chosen = resolve_decoder(decoder)
        if chosen != "pillow" and not (chosen == "torchcodec" and route == JPEG and exif_orientation(data) != 1):
            fast = _fast(chosen)
            encoded = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)
            try:
                return fast[route](encoded, mode=fast["mode"])
            except Exception:  # changed since validation, or a variant this decoder lacks: Pillow says which
                pass
    return torch.from_numpy(np.array(load_rgb(data))).permute(2, 0, 1)  # [3, H, W], a view of [H, W, 3]


def _resize(img: torch.Tensor, size: list[int]) -> torch.Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    return F.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)


def crop_resize_flip(img: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """The box ``(x, y, w, h)`` of ``img`` [3, H, W] resized (bicubic, antialiased) to [3, size, size], mirrored when
    ``flip``: torchvision's ``resized_crop`` + ``hflip`` on uint8."""
    x, y, w, h = (int(v) for v in box)
    out = _resize(img[:, y : y + h, x : x + w], [size, size])
    return out.flip(-1) if flip else out


def eval_resize_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view: shorter side resized to ``int(size / 0.875)`` (bicubic, antialiased), then the centre
    ``size`` x ``size`` (torchvision's ``Resize`` + ``CenterCrop`` geometry)."""
    from torchvision.transforms.v2 import functional as F

    return F.center_crop(_resize(img, [int(size / 0.875)]), [size, size])


_AFFINE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _affine(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) [3, 1, 1] on ``device``, made once per device (a copy to a GPU at every step would sync)."""
    if device not in _AFFINE:
        scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD]).view(3, 1, 1)
        bias = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]).view(3, 1, 1)
        _AFFINE[device] = (scale.to(device), bias.to(device))
    return _AFFINE[device]


def normalize(imgs: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, H, W] -> float32 normalised with the ImageNet mean and std, on their device: one float
    copy, then x / (255 std) - mean / std in place (a second buffer doubled the time on a CPU)."""
    scale, bias = _affine(imgs.device)
    out = imgs.to(torch.float32)
    return torch.addcmul(bias, out, scale, out=out)
