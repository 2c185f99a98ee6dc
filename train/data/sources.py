"""Data sources shared by every loader: a validated, cached index of images (a folder searched recursively, or
webdataset-style ``.tar`` shards), the per-epoch sharded sample order, and per-sample augmentation parameters.

Everything random about a sample (its place in the epoch, its crop, its flip) is a function of
``(seed, epoch, sample index)``, so the torchvision and DALI loaders pick the same crops, and a run restarted at
``(epoch, batch)`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fastmae.errors import FastMAEError

logger = logging.getLogger("fastmae.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
# Formats and modes that DALI's decoders turn into the same RGB pixels as ``load_rgb`` (checked in the tests).
# Anything else (alpha, GIF, 32-bit/float, ...) is decoded by PIL and handed to DALI as an uncompressed BMP.
_DALI_NATIVE = {
    "JPEG": {"RGB", "L", "CMYK"},
    "PNG": {"RGB", "L", "P", "I;16"},
    "BMP": {"RGB", "L"},
    "TIFF": {"RGB", "L"},
    "WEBP": {"RGB"},
}
_INDEX_VERSION = 1


def bundled_images_dir() -> Path:
    """scikit-image's bundled sample photos: the default data set, so a first run needs no download."""
    import skimage

    return Path(skimage.__file__).parent / "data"


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``shard-{000..009}.tar`` (zero padding kept) and ``{train,val}``, nested."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if b >= a else -1
        parts = [str(i).zfill(width) for i in range(a, b + step, step)]
    else:
        parts = body.split(",")
    return [out for part in parts for out in expand_braces(head + part + tail)]


def load_rgb(source) -> Image.Image:
    """Decode any image mode to 8-bit RGB (16-bit and float images rescaled, alpha composited on white).

    ``source`` is a path, a binary file object or ``bytes``.
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


def _inspect(data: bytes) -> tuple[int, int, bool]:
    """Fully decode ``data`` (JPEG at 1/8 scale: the entropy stream is still read to the end, so truncation shows).

    Returns (width, height, dali_native); raises on anything that is not a whole image.
    """
    if not data:
        raise ValueError("empty file")
    with Image.open(io.BytesIO(data)) as img:
        width, height, fmt, mode = img.width, img.height, img.format, img.mode
        native = mode in _DALI_NATIVE.get(fmt, ()) and not (mode == "P" and "transparency" in img.info)
        if fmt == "JPEG":
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        img.load()
    if width < 1 or height < 1:
        raise ValueError(f"image has size {width}x{height}")
    return width, height, native


def _inspect_item(item: tuple[str, int, int]) -> tuple[int, int, bool] | str:
    path, offset, size = item
    try:
        return _inspect(_read(path, offset, size))
    except Exception as exc:  # any decode failure: recorded and skipped, never fatal
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def _read(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        if offset >= 0:
            f.seek(offset)
            return f.read(size)
        return f.read()


@dataclass
class DataIndex:
    """The decodable images of a data set: where their bytes are, labels, sizes, and which files were skipped."""

    root: str
    keys: list[str]  # file path, or "shard.tar/member"
    paths: list[str]  # file (or tar shard) holding the bytes
    offsets: np.ndarray  # [N] int64 byte offset inside the tar, -1 for plain files
    sizes: np.ndarray  # [N] int64 bytes
    labels: np.ndarray  # [N] int64
    widths: np.ndarray  # [N] int64 as decoded (no EXIF rotation, like both loaders)
    heights: np.ndarray  # [N] int64
    native: np.ndarray  # [N] bool: DALI decodes it to the same RGB as PIL
    classes: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of files that do not decode

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> bytes:
        return _read(self.paths[i], int(self.offsets[i]), int(self.sizes[i]))

    def subset(self, ids) -> DataIndex:
        """The samples at positions ``ids`` (a split); classes kept, bad files stay with the whole."""
        ids = np.asarray(ids, dtype=np.int64)
        return DataIndex(
            self.root, [self.keys[i] for i in ids], [self.paths[i] for i in ids], self.offsets[ids], self.sizes[ids],
            self.labels[ids], self.widths[ids], self.heights[ids], self.native[ids], list(self.classes), [],
        )  # fmt: skip


def _cache_file(root: str) -> Path:
    base = Path(os.environ.get("FASTMAE_CACHE", Path.home() / ".cache" / "fastmae"))
    return base / f"index-{hashlib.sha1(root.encode()).hexdigest()[:16]}.json"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data["entries"] if data.get("version") == _INDEX_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _save_cache(path: Path, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": _INDEX_VERSION, "entries": entries}))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home only costs the re-validation next time
        logger.warning("could not write the image index cache %s: %s", path, exc)


def _scan_folder(root: Path) -> tuple[list[tuple[str, str, int, int, int, str]], list[str]]:
    """(key, path, offset, size, mtime_ns, class name) per image file, and the ImageFolder classes."""
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    top = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]
    classes = sorted(set(top) - {""}) if top and all(top) else []
    items = []
    for p, t in zip(files, top, strict=True):
        st = p.stat()
        items.append((str(p), str(p), -1, st.st_size, st.st_mtime_ns, t))
    return items, classes


def _scan_tars(shards: list[Path]) -> list[tuple[str, str, int, int, int, str]]:
    """Webdataset shards: members sharing a key (name up to the first dot) form a sample; ``.cls`` holds the label."""
    items = []
    for shard in shards:
        try:
            mtime = shard.stat().st_mtime_ns  # members are revalidated when their shard changes
            with tarfile.open(shard) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                for m in members:
                    folder, _, base = m.name.rpartition("/")
                    key, _, ext = base.partition(".")
                    groups.setdefault(f"{folder}/{key}", {})[ext.lower()] = m
                for exts in groups.values():
                    label = ""
                    if "cls" in exts:
                        label = tar.extractfile(exts["cls"]).read().decode().strip()
                    image = next((exts[e] for e in exts if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
                    if image is not None:
                        items.append((f"{shard}/{image.name}", str(shard), image.offset_data, image.size, mtime, label))
        except (OSError, tarfile.TarError) as exc:
            raise FastMAEError(f"cannot read tar shard {shard}: {exc}") from exc
    return items


def _resolve_sources(data: str | os.PathLike) -> tuple[str, list[Path], Path | None]:
    """(root name, tar shards, image folder) for a folder of images, a folder of .tar shards, a .tar or a pattern."""
    text = str(data)
    if "{" in text:
        shards = [Path(p) for p in expand_braces(text)]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise FastMAEError(f"--data {text}: {len(missing)} shard(s) do not exist, e.g. {missing[0]}")
        return text, shards, None
    path = Path(text)
    if not path.exists():
        raise FastMAEError(f"--data {path} does not exist")
    if path.is_file():
        if path.suffix != ".tar":
            raise FastMAEError(f"--data {path} is a file; give a folder of images, .tar shards or a brace pattern")
        return str(path.resolve()), [path], None
    shards = sorted(p for p in path.glob("*.tar") if p.is_file())
    if shards and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")):
        return str(path.resolve()), shards, None
    return str(path.resolve()), [], path


def index_data(data: str | os.PathLike | None, cache: bool = True, workers: int | None = None) -> DataIndex:
    """Find and validate every image of a data set (cached by path, size and mtime, so later runs are instant).

    Files that do not decode are left out and listed in ``DataIndex.bad``; a missing path or no images at all is a
    one-line :class:`FastMAEError`.
    """
    root, shards, folder = _resolve_sources(bundled_images_dir() if data is None else data)
    if folder is not None:
        items, classes = _scan_folder(folder)
    else:
        items, classes = _scan_tars(shards), []
    if not items:
        raise FastMAEError(f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files and .tar shards)")

    cache_path = _cache_file(root)
    known = _load_cache(cache_path) if cache else {}
    results: dict[str, list] = {}
    todo = []
    for key, path, offset, size, mtime, _ in items:
        hit = known.get(key)
        if hit is not None and hit[0] == size and hit[1] == mtime:
            results[key] = hit
        else:
            todo.append((key, path, offset, size, mtime))
    if todo:
        logger.info("validating %d image(s) under %s", len(todo), root)
        args = [(path, offset, size) for _, path, offset, size, _ in todo]
        if len(todo) < 256:
            found = [_inspect_item(a) for a in args]
        else:
            n = workers or min(16, os.cpu_count() or 1)
            with concurrent.futures.ProcessPoolExecutor(n) as pool:
                found = list(pool.map(_inspect_item, args, chunksize=64))
        for (key, _, _, size, mtime), res in zip(todo, found, strict=True):
            results[key] = [size, mtime, *res] if isinstance(res, tuple) else [size, mtime, res]
        if cache:
            _save_cache(cache_path, {**known, **results})

    if folder is None:  # webdataset labels: the .cls members (integers), else 0
        labels_of = {it[0]: int(it[5]) if it[5].lstrip("-").isdigit() else 0 for it in items}
    else:
        labels_of = {it[0]: classes.index(it[5]) if classes else 0 for it in items}
    good = [it for it in items if len(results[it[0]]) == 5]
    bad = [(it[0], results[it[0]][2]) for it in items if len(results[it[0]]) != 5]
    if not good:
        raise FastMAEError(f"no images under {root} decode ({len(bad)} broken file(s), e.g. {bad[0][0]})")
    if bad:
        logger.warning(
            "skipping %d file(s) that do not decode, e.g. %s", len(bad), "; ".join(f"{k} ({r})" for k, r in bad[:3])
        )
    return DataIndex(
        root=root,
        keys=[it[0] for it in good],
        paths=[it[1] for it in good],
        offsets=np.array([it[2] for it in good], dtype=np.int64),
        sizes=np.array([it[3] for it in good], dtype=np.int64),
        labels=np.array([labels_of[it[0]] for it in good], dtype=np.int64),
        widths=np.array([results[it[0]][2] for it in good], dtype=np.int64),
        heights=np.array([results[it[0]][3] for it in good], dtype=np.int64),
        native=np.array([results[it[0]][4] for it in good], dtype=bool),
        classes=classes,
        bad=bad,
    )


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class ShardedOrder:
    """Which samples each rank reads, batch by batch, in each epoch.

    Training (``drop_last=True``): every epoch shuffles all N samples with a generator seeded by ``(seed, epoch)``;
    the order is padded by repeating its first samples to a multiple of ``world_size`` (as torch's
    ``DistributedSampler``), rank ``r`` takes every ``world_size``-th sample from position ``r``, and the last
    incomplete batch is dropped. So the ranks' shards are disjoint (up to the < world_size padded repeats) and together
    cover the data set, and every rank runs ``steps_per_epoch`` batches (the collectives of a step need that).

    Evaluation (``shuffle=False, drop_last=False``): file order, no padding, the last batch short. Every sample is
    scored exactly once, so metrics summed over the ranks are those of one process; the ranks' shards differ by at most
    one sample (and their batch counts by at most one), which evaluation, with no collective per batch, allows.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle=True, drop_last=True
    ):
        if not 0 <= rank < world_size:
            raise FastMAEError(f"rank {rank} is outside world size {world_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        if drop_last:
            self.per_rank = math.ceil(n / world_size)
            self.steps_per_epoch = self.per_rank // batch_size
        else:
            self.per_rank = len(range(rank, n, world_size))  # may be 0 on a rank when n < world_size
            self.steps_per_epoch = math.ceil(self.per_rank / batch_size)
        if self.steps_per_epoch == 0 and drop_last:
            raise FastMAEError(
                f"batch size {batch_size} is larger than the {self.per_rank} images each of {world_size} rank(s) "
                f"gets from a data set of {n}; lower --batch-size"
            )

    def shard(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        if not self.drop_last:
            return perm[self.rank :: self.world_size]
        padded = np.concatenate([perm, perm[: self.per_rank * self.world_size - self.n]])
        return padded[self.rank :: self.world_size]

    def batches(self, epoch: int, start_batch: int = 0):
        """Yield index arrays [batch_size] for batches ``start_batch..steps_per_epoch-1`` of ``epoch``."""
        shard = self.shard(epoch)
        for b in range(start_batch, self.steps_per_epoch):
            yield shard[b * self.batch_size : (b + 1) * self.batch_size]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's augmentation in one epoch: independent of batch, rank, worker or loader."""
    return np.random.default_rng([seed, epoch, int(index), 0x6D6165])


def random_resized_crop(
    rng: np.random.Generator, width: int, height: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """A crop box ``(x, y, w, h)`` drawn as torchvision's ``RandomResizedCrop`` draws it: an area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, ten tries, then the centre crop clamped to ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    return (width - w) // 2, (height - h) // 2, w, h


def augment_params(
    index: DataIndex, ids: np.ndarray, seed: int, epoch: int, scale=(0.2, 1.0), hflip: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes ``[B, 4]`` (x, y, w, h) and flips ``[B]`` (probability ``hflip``) for samples ``ids`` of
    ``epoch``."""
    boxes = np.empty((len(ids), 4), dtype=np.int64)
    flips = np.empty(len(ids), dtype=bool)
    for j, i in enumerate(ids):
        rng = sample_rng(seed, epoch, i)
        boxes[j] = random_resized_crop(rng, int(index.widths[i]), int(index.heights[i]), scale)
        flips[j] = rng.random() < hflip
    return boxes, flips
