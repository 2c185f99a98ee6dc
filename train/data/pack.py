"""The packed store (``fastmae pack DATA OUT``): fixed-size tiles decoded once and written into one file that is
memory-mapped to read, with its index inside; the way FFCV stores RGB, for rasters whose decoding (deflate, LZW) would
otherwise be most of a loader's time.

Layout of a pack (little-endian):

- bytes 0-15: :data:`MAGIC`; 16-23: the manifest's offset; 24-31: its length (uint64);
- from byte 4096: the ``N`` tiles, ``[N, C, H, W]`` in their native dtype (band planes, as the resampler reads them:
  ``.npy`` or TIFF data in ``H x W x C`` order costs it a transposing copy; a crop reads only its rows of each plane);
- then the labels (int64 ``[N]``) and the end offsets of the keys (int64 ``[N]``), each at an 8-byte boundary, and
  the keys' bytes (UTF-8, one after the other): no Python object per tile when it is opened;
- last, the manifest (JSON): format and version, count, bands, height, width, dtype, layout, where each array is,
  class names, the source, and the files that were skipped with their reasons.

Writing goes through :func:`fastmae.files.atomic_write`: a temporary file beside ``OUT``, renamed over it when whole,
so no partial pack is ever under the final name; the free space is checked first (one line when it is short), and a
disk that fills up mid-way is the same one line, the temporary file removed. A pack is not resumed: an interrupted one
is written again from the start.

Every file must have the pack's tile shape (``C x H x W`` and dtype: given, or the first file's that reads); one that
does not, or that does not read, is skipped and counted with its reason (:attr:`PackedTiles.skipped`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import shutil
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastmae.errors import FastMAEError, NoRoom
from fastmae.files import atomic_write, mb

from .pool import lost_worker, process_pool
from .rasters import RASTER_EXTENSIONS, check_raster, pread_planes, read_raster

MAGIC = b"FASTMAE-PACK-01\n"
VERSION = 1
TILE_OFFSET = 4096
_HEADER = struct.Struct("<16sQQ")


# ------------------------------------------------------------------------------------------------ sources
def list_rasters(folder: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """``(paths, labels, classes)`` of the rasters under ``folder`` (``.npy .tif .tiff .png``, hidden files and
    folders ignored), sorted; labels by the first sub-folder when every file is in one (ImageFolder's layout, classes
    sorted), else all 0 with no classes."""
    root = Path(folder)
    if not root.is_dir():
        raise FastMAEError(f"{folder} is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(RASTER_EXTENSIONS):
                found.append(Path(dirpath, name).relative_to(root))
    found.sort(key=lambda p: p.as_posix())
    if not found:
        raise FastMAEError(f"no rasters ({' '.join(RASTER_EXTENSIONS)}) under {folder}")
    if all(len(p.parts) > 1 for p in found):
        classes = sorted({p.parts[0] for p in found})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[p.parts[0]] for p in found]
    else:
        classes, labels = [], [0] * len(found)
    return [str(root / p) for p in found], labels, classes


# -------------------------------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class PackResult:
    path: Path
    count: int
    shape: tuple[int, int, int]  # C, H, W
    dtype: str
    bytes: int
    skipped: tuple[tuple[str, str], ...]


def _load(source) -> tuple[np.ndarray | None, str | None]:
    """``(pixels [C, H, W] contiguous, None)`` or ``(None, reason)`` of one source."""
    got = check_raster(source)
    if isinstance(got, str):
        return None, got
    return np.ascontiguousarray(read_raster(source).numpy()), None


def _decoded(sources: Sequence, workers: int):
    """``_load`` of each source, in order, over ``workers`` processes (0: here), a bounded number ahead."""
    if not workers:
        yield from map(_load, sources)
        return
    with process_pool(workers) as pool:
        ahead = 4 * workers
        pending = [pool.submit(_load, s) for s in sources[:ahead]]
        for i in range(len(sources)):
            try:
                result = pending[i].result()
            except concurrent.futures.process.BrokenProcessPool as err:
                raise lost_worker(f"packing {sources[i]}", err) from None
            pending[i] = None
            if i + ahead < len(sources):
                pending.append(pool.submit(_load, sources[i + ahead]))
            yield result


def _align(f, boundary: int = 8) -> int:
    pos = f.tell()
    pad = -pos % boundary
    if pad:
        f.write(b"\0" * pad)
    return pos + pad


def pack(data, out: str | os.PathLike, *, labels: Sequence[int] | None = None, classes: Sequence[str] = (),
         shape: tuple[int, int, int] | None = None, dtype: str | None = None, workers: int = 0,
         progress: bool = False) -> PackResult:  # fmt: skip
    """Pack the rasters of ``data`` (a folder, listed by :func:`list_rasters`, or a list of paths with ``labels``,
    default 0) into the file ``out``. ``shape`` ``(C, H, W)`` and ``dtype`` fix the tile (default: the first file
    that reads); files of another shape or dtype, and files that do not read, are skipped with their reason. Decoding
    runs in ``workers`` processes (0: here). Returns what was written; raises :class:`FastMAEError` (one line) when
    nothing fits, and :class:`~fastmae.errors.NoRoom` when the disk cannot take it."""
    if isinstance(data, str | os.PathLike):
        sources, labels, classes = list_rasters(data)
        source_label = str(data)
    else:
        sources = [str(s) for s in data]
        labels = [0] * len(sources) if labels is None else [int(v) for v in labels]
        if len(labels) != len(sources):
            raise FastMAEError(f"{len(labels)} labels for {len(sources)} files")
        source_label = f"{len(sources)} files"
    if not sources:
        raise FastMAEError("nothing to pack: no files given")
    out = Path(out)
    want = None if shape is None else (tuple(int(v) for v in shape), str(dtype or ""))
    names: tuple[str, ...] = ()
    if want is None:  # the first file that reads sets the tile (and names its bands, when it does)
        for s in sources:
            got = check_raster(s)
            if not isinstance(got, str):
                want, names = (got.shape, got.dtype), got.names
                break
        if want is None:
            raise FastMAEError(f"none of the {len(sources)} files of {source_label} reads (e.g. {sources[0]}: "
                               f"{check_raster(sources[0])})")  # fmt: skip
    (c, h, w), dt = want
    dt = dt or "uint16"
    tile_bytes = c * h * w * np.dtype(dt).itemsize
    estimate = TILE_OFFSET + len(sources) * (tile_bytes + 16) + 64 * 1024
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < estimate:
        raise NoRoom(f"cannot pack {len(sources)} tiles of {c}x{h}x{w} {dt} into {out}: it needs about {mb(estimate)}, "
                     f"{mb(free)} free on that disk")  # fmt: skip
    kept_labels, keys, skipped = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sources), unit="file", desc="pack")

    def write(f) -> None:
        f.write(b"\0" * TILE_OFFSET)
        for source, label, (pixels, reason) in zip(sources, labels, _decoded(sources, workers), strict=True):
            if bar is not None:
                bar.update()
            if reason is None and (pixels.shape != (c, h, w) or pixels.dtype.name != dt):
                reason = (f"tile {'x'.join(map(str, pixels.shape))} {pixels.dtype.name}, not the pack's {c}x{h}x{w} "
                          f"{dt}")  # fmt: skip
            if reason is not None:
                skipped.append((str(source), reason))
                continue
            f.write(memoryview(pixels).cast("B"))
            kept_labels.append(label)
            keys.append(str(source).encode())
        n = len(keys)
        labels_at = _align(f)
        f.write(np.asarray(kept_labels, dtype="<i8").tobytes())
        ends_at = _align(f)
        f.write(np.cumsum([len(k) for k in keys], dtype=np.int64).astype("<i8").tobytes())
        keys_at = f.tell()
        f.write(b"".join(keys))
        manifest = {
            "format": "fastmae-pack", "version": VERSION, "count": n, "bands": c, "height": h, "width": w,
            "dtype": dt, "band_names": list(names) or None, "layout": "NCHW", "tile_offset": TILE_OFFSET,
            "tile_bytes": tile_bytes,
            "labels_offset": labels_at, "key_ends_offset": ends_at, "keys_offset": keys_at, "classes": list(classes),
            "source": source_label, "skipped": skipped, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }  # fmt: skip
        text = json.dumps(manifest).encode()
        at = f.tell()
        f.write(text)
        f.seek(0)
        f.write(_HEADER.pack(MAGIC, at, len(text)))
        f.seek(0, os.SEEK_END)
        if n == 0:
            raise FastMAEError(f"no file of {source_label} fits the tile {c}x{h}x{w} {dt} (e.g. {skipped[0][0]}: "
                               f"{skipped[0][1]})")  # fmt: skip

    try:
        atomic_write(out, write, size=estimate)
    finally:
        if bar is not None:
            bar.close()
    return PackResult(out, len(keys), (c, h, w), dt, out.stat().st_size, tuple(skipped))


# -------------------------------------------------------------------------------------------------- reading
class PackedTiles:
    """A pack opened for reading: :meth:`tile` is a memory-mapped ``[C, H, W]`` tensor (copy on write, so writable
    without touching the file), labels and keys are numpy arrays. Pickles as its path (a spawned DataLoader worker
    maps the file again instead of receiving its bytes)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(_HEADER.size)
                if len(head) < _HEADER.size or not head.startswith(MAGIC):
                    raise FastMAEError(f"{self.path} is not a fastmae pack (no {MAGIC[:-1].decode()} header)")
                _, at, length = _HEADER.unpack(head)
                f.seek(at)
                text = f.read(length)
                self.manifest = json.loads(text)
            size = self.path.stat().st_size
        except OSError as exc:
            raise FastMAEError(f"cannot read pack {self.path}: {exc.strerror or exc}") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise FastMAEError(f"{self.path}: the pack's manifest does not read (truncated? {exc})") from exc
        m = self.manifest
        if m.get("format") != "fastmae-pack" or m.get("version") != VERSION or m.get("layout") != "NCHW":
            raise FastMAEError(f"{self.path}: pack version {m.get('version')} ({m.get('layout')}), this fastmae reads "
                               f"{VERSION} (NCHW): pack the data again")  # fmt: skip
        self.count, self.bands, self.height, self.width = m["count"], m["bands"], m["height"], m["width"]
        self.dtype: str = m["dtype"]
        self.band_names: tuple[str, ...] | None = tuple(m["band_names"]) if m.get("band_names") else None
        self.classes: list[str] = m["classes"]
        self.skipped: list[tuple[str, str]] = [tuple(s) for s in m["skipped"]]
        tiles_end = m["tile_offset"] + self.count * m["tile_bytes"]
        if len(text) < length or tiles_end > m["labels_offset"] or m["keys_offset"] > size:
            raise FastMAEError(f"{self.path}: pack is truncated ({size} bytes)")
        self._open()

    def _open(self) -> None:
        m, n = self.manifest, self.count
        shape = (n, self.bands, self.height, self.width)
        self.tiles = np.memmap(self.path, dtype=np.dtype(self.dtype), mode="c", offset=m["tile_offset"], shape=shape) \
            if n else np.empty(shape, dtype=self.dtype)  # fmt: skip
        self.labels = np.fromfile(self.path, dtype="<i8", count=n, offset=m["labels_offset"]).astype(np.int64)
        self._ends = np.fromfile(self.path, dtype="<i8", count=n, offset=m["key_ends_offset"]).astype(np.int64)
        total = int(self._ends[-1]) if n else 0
        self._keys = np.fromfile(self.path, dtype=np.uint8, count=total, offset=m["keys_offset"])
        if len(self.labels) != n or len(self._keys) != total:
            raise FastMAEError(f"{self.path}: pack is truncated")
        self._fd = None  # opened on first use by rows(); pread takes its offset, so forked processes share it

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.bands, self.height, self.width

    def tile(self, i: int) -> torch.Tensor:
        """Tile ``i``: ``[C, H, W]`` in the pack's dtype, a view of the mapped file (nothing read until used)."""
        return torch.from_numpy(self.tiles[i])

    def rows(self, i: int, y0: int, y1: int) -> torch.Tensor:
        """Rows ``y0:y1`` of tile ``i``, ``[C, y1 - y0, W]``: read (``pread``, one call per band plane) into memory of
        this process, what a crop needs. Not the memory map: a loader over more tiles than stay mapped would pay a
        page fault per 4 KiB of every crop."""
        if not (0 <= i < self.count and 0 <= y0 < y1 <= self.height):
            raise IndexError(f"rows {y0}:{y1} of tile {i} of {self.path} ({self.count} tiles of {self.height} rows)")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        arr = np.empty((self.bands, y1 - y0, self.width), dtype=self.dtype)
        row = self.width * arr.itemsize
        tile_at = self.manifest["tile_offset"] + i * self.manifest["tile_bytes"]
        pread_planes(self._fd, arr, self.bands, tile_at + y0 * row, self.height * row, f"{self.path}: tile {i}")
        return torch.from_numpy(arr)

    def key(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i else 0
        return self._keys[start : int(self._ends[i])].tobytes().decode()


def is_pack(path) -> bool:
    """Whether ``path`` is a file that starts as a fastmae pack does."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@functools.lru_cache(maxsize=8)
def open_pack(path: str) -> PackedTiles:
    """A pack opened once per process (what the band statistics' workers read tiles through)."""
    return PackedTiles(path)


def pack_command(data: str, out: str, workers: int | None = None) -> int:
    """``fastmae pack DATA OUT``: :func:`pack` with a progress bar, then one line of what was written and skipped."""
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)), 8)
    done = pack(data, out, workers=workers if workers > 1 else 0, progress=True)
    c, h, w = done.shape
    print(f"packed {done.count} tiles of {c}x{h}x{w} {done.dtype} into {done.path} ({mb(done.bytes)}); skipped "
          f"{len(done.skipped)}" + (f", e.g. {done.skipped[0][0]}: {done.skipped[0][1]}" if done.skipped else ""))
    return 0
