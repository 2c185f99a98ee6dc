"""Bytes to pixels, as pure functions of (bytes, per-sample parameters): the validation probe, decoding to uint8
tensors, and the crop / resize / flip of the loaders on uint8 tensors.

Decoding: JPEG (RGB, greyscale) and 8-bit PNG (RGB, greyscale, palette; no transparency, no ICC profile) go through
``torchvision.io`` (libjpeg-turbo, libpng): the same pixels as Pillow, bit for bit (``tests/test_data.py``), in about
0.6 of the time. Every other file (CMYK, 16-bit, alpha, GIF, WebP, TIFF, BMP, ...) goes through Pillow's
:func:`load_rgb`, which turns any mode into 8-bit RGB. The route is chosen once, at validation, and kept in the index
(:data:`TORCHVISION`, :data:`DALI_NATIVE`).

Resampling: torch's antialiased bicubic resize of uint8 images, which follows Pillow's filter (a = -0.5, support
scaled with the reduction): pixels within a few levels of Pillow's resize (the tests bound it). Normalisation is not
done here: batches stay uint8 until they are on the device (:func:`normalize`).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Decode routes, one byte per sample in the index, found by :func:`probe`.
BAD, JPEG, JPEG_CMYK, PNG, PNG16, OTHER_NATIVE, PIL_ONLY = range(7)
UNKNOWN = 255  # not validated yet (only inside the index builder)
TORCHVISION = (JPEG, PNG)  # torchvision.io gives Pillow's pixels exactly
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


def _torchvision_decoders() -> dict | None:
    """torchvision.io's JPEG and PNG decoders, or None where this torchvision has none (deprecated since 0.29 in
    favour of TorchCodec: when they go, every file takes the Pillow route, same pixels, slower)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg, decode_png
    except ImportError:
        return None
    # Each call warns about that deprecation; fastmae knows and falls back by itself.
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)  # fmt: skip
    return {JPEG: decode_jpeg, PNG: decode_png, "mode": ImageReadMode.RGB}


_DECODERS: list = []  # [decoders or None], filled on first use (torchvision is not imported before it is needed)


def decode(data, route: int) -> torch.Tensor:
    """uint8 RGB [3, H, W] of an encoded image, by the route its validation chose."""
    if not _DECODERS:
        _DECODERS.append(_torchvision_decoders())
    tv = _DECODERS[0]
    if route in TORCHVISION and tv is not None:
        encoded = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)
        return tv[route](encoded, mode=tv["mode"])
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
