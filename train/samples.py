"""Image files made on the spot, for the tests and the benchmarks: random-noise PNGs of a few pixels over a crop, and
ImageNet-like JPEGs cut from scikit-image's photos (real photo statistics, so decoding costs what it does on
ImageNet). The same files for the same arguments, whichever process writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .data.index import bundled_images_dir

LARGE_EVERY = 32  # one generated JPEG in this many is large (about 2000 x 1500), as ImageNet has a few


def noise_pngs(root, count: int, seed: int, size: tuple[int, int] = (36, 40)):
    """``count`` random RGB PNGs of slightly different sizes (a few pixels over a 32 px crop) in ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    h, w = size
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (h + 3 * i, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def make_jpegs(folder: Path, count: int, seed: int = 0, classes: int = 4, processes: int | None = None,
               large_every: int = LARGE_EVERY) -> Path:  # fmt: skip
    """ImageNet-like JPEGs in ``classes`` folders: crops of scikit-image's photos at random places and scales, resized
    to about 520 x 390 (a few pixels either way), quality 90: real photo statistics, so decoding costs what it does
    on ImageNet (~110 KB each); every ``large_every``-th about 2000 x 1500 (0: none; upsampled, so smoother than a
    real photo of that size). Written by ``processes`` processes (default: the usable cores), the same files
    whatever their number."""
    import os

    processes = processes or len(os.sched_getaffinity(0))
    if processes <= 1 or count < 256:
        _write_jpegs(folder, range(count), seed, classes, large_every)
        return folder
    from .data.pool import context

    ctx = context()
    procs = [ctx.Process(target=_write_jpegs, args=(folder, range(k, count, processes), seed, classes, large_every))
             for k in range(processes)]  # fmt: skip
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise SystemExit(f"make_jpegs: writing JPEGs under {folder} failed in a child process")
    return folder


def _write_jpegs(folder: Path, which, seed: int, classes: int, large_every: int = 0) -> None:
    photos = []
    for p in sorted(bundled_images_dir().iterdir()):
        try:
            img = Image.open(p).convert("RGB")
        except Exception:
            continue
        if min(img.size) >= 256:
            photos.append(img)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in which:
        rng = np.random.default_rng([seed, i])  # per file: the same image whichever process writes it
        src = photos[i % len(photos)]
        w, h = int(rng.integers(505, 540)), int(rng.integers(375, 405))
        if large_every and i % large_every == large_every - 1:
            w, h = int(rng.integers(1900, 2100)), int(rng.integers(1400, 1600))
        frac = rng.uniform(0.6, 1.0)
        cw, ch = int(src.width * frac), int(src.height * frac)
        x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        img.save(folder / f"class{i % classes}" / f"{i:06d}.jpg", quality=90)
