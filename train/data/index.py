"""The image index: every image of a data set found, validated once (fully decoded), and what was learned cached, so
that a later start costs what changed, not what exists.

Sources: a folder searched recursively (``DIR/<class>/*`` gives ImageFolder labels), a folder of webdataset ``.tar``
shards, one ``.tar``, or a brace pattern ``shards/train-{0000..0146}.tar``.

What a start reads. The cache is one binary file per data set (``$FASTMAE_CACHE/index-<hash>.bin``, default
``~/.cache/fastmae``), loaded in one read:

- folders: one ``stat`` per folder. A folder whose modification time is the cached one has the cached listing (adding,
  removing or renaming a file changes its folder's time), so only changed folders are listed again (``os.scandir``),
  with their files' sizes and times; a file with its cached size and time keeps its validation. Not seen this way: a
  file rewritten in place under the same name, which leaves its folder's listing alone. ``check="stat"``
  (``--index-check stat``) also compares every file's size and time, at one ``stat`` per file; and the loaders skip
  and count a file that fails to decode in any case. A folder changed within a second of the scan is listed again
  at the next start too (a change in the same clock tick would not show in its time).
- shards: one ``stat`` per shard; a shard with its cached size and time is not parsed again.

New or changed files are validated in a pool of processes. Under torchrun the work is split over the ranks (each
with its share of the machine's cores), the results are exchanged, and each cache folder is written by one process;
ranks whose cache folder is not shared with rank 0 (other machines) write their own.

The index holds numpy arrays only (names in one byte buffer with offsets, a
:class:`~fastmae.train.data.index_cache.StringTable`), so forked DataLoader workers share it without copy-on-read
growth. Three modules: this one (the index and :func:`index_data`, the one call that gets it), :mod:`.index_cache`
(the cache file and what it holds) and :mod:`.index_build` (walking, validating, splitting the work over ranks).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastmae.config import INDEX_CHECKS
from fastmae.errors import FastMAEError

from .decode import BAD, DALI_NATIVE, IMAGE_EXTENSIONS, RASTER
from .index_build import RGB, FolderBuild, ShardBuild, Solo, read_bytes, resolve_sources, validation_workers
from .index_cache import VERSION, StringTable, Table, cache_file, cache_token, load_cache, save_cache
from .pack import PackedTiles, is_pack
from .rasters import DTYPES, probe_raster, read_raster, read_raster_rows

logger = logging.getLogger("fastmae.data")


# --------------------------------------------------------------------------------------------------- the index
@dataclass(eq=False)
class DataIndex:
    """The decodable images of a data set: where their bytes are, labels, sizes and decode routes, as numpy arrays;
    and which files were skipped. Every sample has the data's ``bands`` and ``dtype`` (the first valid file's: 3 and
    uint8 for images on the RGB routes); ``band_names``: the names that file carries (GDAL band descriptions), or
    None."""

    root: str
    tar: bool  # samples are members of .tar shards (else files in folders)
    units: StringTable  # folders relative to the root (b"" is the root itself), or shard paths
    unit_of: np.ndarray  # [N] int32: the folder / shard holding each sample
    names: StringTable  # [N] file name in its folder, or member name in its shard
    offsets: np.ndarray  # [N] int64 byte offset inside the shard; -1 for plain files
    sizes: np.ndarray  # [N] int64 bytes
    labels: np.ndarray  # [N] int64
    widths: np.ndarray  # [N] int32 as decoded (no EXIF rotation, like every loader)
    heights: np.ndarray  # [N] int32
    routes: np.ndarray  # [N] uint8 decode route (fastmae.train.data.decode.JPEG, ...)
    classes: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of files that do not decode
    stats: dict = field(default_factory=dict)  # how this index was built (cache use, files validated here)
    bands: int = 3  # per sample, as its route reads it
    dtype: str = "uint8"  # of the pixels as read (fastmae.train.data.rasters.DTYPES)
    band_names: tuple[str, ...] | None = None
    pack: PackedTiles | None = field(default=None, repr=False)  # the samples are tiles of this pack (offsets: tile)

    @property
    def rgb(self) -> bool:
        """Whether every sample is an 8-bit RGB image read by the decoders (none on the raster route)."""
        return (self.bands, self.dtype) == (3, "uint8") and not (self.routes == RASTER).any()

    def __post_init__(self):
        self._root_b = os.fsencode(self.root)

    def __len__(self) -> int:
        return len(self.unit_of)

    def path(self, i: int) -> bytes:
        """The file holding sample ``i``'s bytes (its image file, or its shard)."""
        unit = self.units[self.unit_of[i]]
        if self.tar:
            return unit
        return b"/".join((self._root_b, unit, self.names[i])) if unit else self._root_b + b"/" + self.names[i]

    def key(self, i: int) -> str:
        """Sample ``i``'s name in messages: its file path, ``shard.tar/member``, or ``data.pack:source`` (a tile)."""
        if self.pack is not None:
            return f"{self.root}:{os.fsdecode(self.names[i])}"
        if self.tar:
            return os.fsdecode(self.units[self.unit_of[i]] + b"/" + self.names[i])
        return os.fsdecode(self.path(i))

    @property
    def keys(self) -> Sequence[str]:
        """Every sample's :meth:`key`, made on access (a sequence view, not a list)."""
        return _Keys(self)

    def native(self, i: int) -> bool:
        """Whether DALI's decoders give sample ``i`` the same RGB pixels as Pillow."""
        return int(self.routes[i]) in DALI_NATIVE

    def read(self, i: int) -> bytearray:
        return read_bytes(self.path(i), int(self.offsets[i]), int(self.sizes[i]))

    def source(self, i: int) -> str | bytearray:
        """What :func:`~fastmae.train.data.rasters.read_raster` reads sample ``i`` from: its file's path (a ``.npy``
        is then memory-mapped, so a crop reads only its rows), or its bytes (a shard member)."""
        return self.read(i) if self.tar else os.fsdecode(self.path(i))

    def raster(self, i: int) -> torch.Tensor:
        """Raster sample ``i``'s pixels ``[C, H, W]`` in the data's dtype (a tile of the pack, or the file read)."""
        if self.pack is not None:
            return self.pack.tile(int(self.offsets[i]))
        return read_raster(self.source(i))

    def raster_rows(self, i: int, y0: int, y1: int) -> torch.Tensor:
        """Rows ``y0:y1`` of raster sample ``i`` (``[C, y1 - y0, W]``), read without the rest where the format
        allows (a pack's tile, a ``.npy`` file)."""
        if self.pack is not None:
            return self.pack.rows(int(self.offsets[i]), y0, y1)
        return read_raster_rows(self.source(i), y0, y1)

    def subset(self, ids) -> DataIndex:
        """The samples at positions ``ids`` (a split); classes kept, bad files stay with the whole."""
        ids = np.asarray(ids, dtype=np.int64)
        return DataIndex(
            self.root, self.tar, self.units, self.unit_of[ids], self.names.take(ids), self.offsets[ids],
            self.sizes[ids], self.labels[ids], self.widths[ids], self.heights[ids], self.routes[ids],
            list(self.classes), [], bands=self.bands, dtype=self.dtype, band_names=self.band_names, pack=self.pack,
        )  # fmt: skip


class _Keys(Sequence):
    def __init__(self, of: DataIndex):
        self._of = of

    def __len__(self) -> int:
        return len(self._of)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._of.key(j) for j in range(*i.indices(len(self)))]
        return self._of.key(i)


# ------------------------------------------------------------------------------------------------- the one call
def bundled_images_dir() -> Path:
    """scikit-image's bundled sample photos: the default data set, so a first run needs no download."""
    import skimage

    return Path(skimage.__file__).parent / "data"


def index_data(data: str | os.PathLike | None, cache: bool = True, workers: int | None = None, group=None,
               check: str = "listing") -> DataIndex:  # fmt: skip
    """Find and validate every image of a data set; what was learned is cached (see the module's notes).

    ``group``: the process group of a torchrun job (anything with ``rank``, ``world_size``, ``local_rank``,
    ``gather_objects`` and ``barrier``, such as :class:`fastmae.train.distributed.DistContext`); every rank must call
    this together, and the validation of new files is split between them. Files that do not decode are left out and
    listed in ``DataIndex.bad``; a missing path or no images at all is a one-line :class:`FastMAEError`.
    """
    if check not in INDEX_CHECKS:
        raise FastMAEError(f"--index-check must be one of {', '.join(INDEX_CHECKS)}, got {check!r}")
    t0 = time.perf_counter()
    if data is not None and os.path.isfile(data) and is_pack(data):
        return pack_index(data)
    group = group if group is not None and group.world_size > 1 else Solo()
    root, shards, folder = resolve_sources(bundled_images_dir() if data is None else data)
    source = "tar" if folder is None else "folder"
    cache_path = cache_file(root)
    old, token = load_cache(cache_path, root, source) if cache else (None, None)
    builder = FolderBuild(os.fsencode(str(folder)), old, check) if folder is not None else ShardBuild(shards, old)
    fresh = builder.stale  # this rank's cache is missing or out of date

    # Every rank says what it needs; the union is split between them (one process: all of it is ours).
    new_token = uuid.uuid4().hex if fresh and group.rank == 0 else token
    infos = group.gather_objects((builder.fingerprint() if group.world_size > 1 else b"", builder.todo(), fresh,
                                  new_token))  # fmt: skip
    if len({i[0] for i in infos}) > 1:
        raise FastMAEError(f"--data {root}: the ranks see different files (is the data set being written to, or not "
                           "the same on every machine?)")  # fmt: skip
    todo = np.unique(np.concatenate([np.asarray(i[1], np.int64) for i in infos]))
    mine = todo[group.rank :: group.world_size]
    show = group.rank == 0 and len(todo) >= 1000
    if len(todo):
        logger.info("validating %d new or changed %s under %s%s", len(todo), builder.what, root,
                    f" (split over {group.world_size} ranks)" if group.world_size > 1 else "")  # fmt: skip
    results = builder.work(mine, validation_workers(workers), show)
    if group.world_size > 1 and len(todo):
        for part in group.gather_objects(results):
            builder.merge(part)
    else:
        builder.merge(results)
    table = builder.table()

    # One writer per cache folder: rank 0, then the first rank of each machine that does not share rank 0's folder.
    stale = [i[2] for i in infos]
    token = infos[0][3]
    wrote, meta = False, {"version": VERSION, "root": root, "kind": source, "token": token}
    if cache and any(stale):
        if group.rank == 0 and fresh:
            wrote = save_cache(cache_path, table, meta)
        group.barrier()
        if group.rank != 0 and group.local_rank == 0 and fresh and cache_token(cache_path) != token:
            wrote = save_cache(cache_path, table, meta)
    index = _index_of(table, root, source)
    if len(index):
        index.band_names = _band_names(index)
    index.stats = {
        "entries": len(table.route), "validated": int(len(todo)), "validated_here": int(len(mine)),
        "cache": "none" if old is None else "stale" if fresh else "hit", "wrote_cache": wrote,
        "ranks": group.world_size, "seconds": time.perf_counter() - t0, **builder.stats,
    }  # fmt: skip
    if not len(index):
        if index.bad:
            (path, reason), n = index.bad[0], len(index.bad)
            what = (f"the only image under {root} does not decode ({path}: {reason}); replace it" if n == 1 else
                    f"none of the {n} images under {root} decodes (e.g. {path}: {reason}); replace them")  # fmt: skip
            raise FastMAEError(f"{what}, or point --data at images that decode")
        raise FastMAEError(f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files and .tar shards)")
    broken = [(k, r) for k, r in index.bad if not r.startswith(MISFIT)]
    if broken:
        n = len(broken)
        listed = "; ".join(f"{k} ({r})" for k, r in broken[:3]) + ("; ..." if n > 3 else "")
        logger.warning("skipped %s that %s not decode: %s", f"{n} file" + ("s" if n > 1 else ""),
                       "do" if n > 1 else "does", listed)  # fmt: skip
    if misfits := [(k, r.removeprefix(MISFIT)) for k, r in index.bad if r.startswith(MISFIT)]:
        n = len(misfits)
        listed = "; ".join(f"{k} ({r})" for k, r in misfits[:3]) + ("; ..." if n > 3 else "")
        logger.warning("skipped %s whose bands differ from the data's (%s, as in %s): %s",
                       f"{n} file" + ("s" if n > 1 else ""), _kind(index.bands, index.dtype), index.key(0),
                       listed)  # fmt: skip
    what = "" if index.rgb else f" ({_kind(index.bands, index.dtype)})"
    logger.info("indexed %d images%s under %s in %.1f s (cache %s)", len(index), what, root, index.stats["seconds"],
                index.stats["cache"])  # fmt: skip
    return index


def pack_index(path: str | os.PathLike) -> DataIndex:
    """The index of a pack (``fastmae pack``): its tiles in order, labels and classes as packed, the files the pack
    skipped as ``bad``; nothing validated or cached (the pack checked every tile when it was written)."""
    t0 = time.perf_counter()
    tiles = PackedTiles(path)
    n = tiles.count
    if not n:
        raise FastMAEError(f"the pack {path} holds no tiles")
    c, h, w = tiles.shape
    index = DataIndex(
        root=str(path), tar=False, units=StringTable.of([b""]), unit_of=np.zeros(n, np.int32),
        names=StringTable.of(os.fsencode(tiles.key(i)) for i in range(n)), offsets=np.arange(n, dtype=np.int64),
        sizes=np.full(n, c * h * w * np.dtype(tiles.dtype).itemsize, np.int64), labels=tiles.labels.copy(),
        widths=np.full(n, w, np.int32), heights=np.full(n, h, np.int32), routes=np.full(n, RASTER, np.uint8),
        classes=list(tiles.classes), bad=[tuple(b) for b in tiles.skipped], bands=c, dtype=tiles.dtype,
        band_names=tiles.band_names, pack=tiles,
    )  # fmt: skip
    index.stats = {"entries": n, "validated": 0, "cache": "pack", "seconds": time.perf_counter() - t0}
    if index.bad:
        logger.warning("the pack %s left out %d file(s) when it was written, e.g. %s (%s)", path, len(index.bad),
                       *index.bad[0])  # fmt: skip
    logger.info("indexed %d tiles (%s) of the pack %s", n, _kind(c, tiles.dtype), path)
    return index


MISFIT = "other bands: "  # the reason of a file whose bands or dtype are not the data's


def _kind(bands: int, dtype: str) -> str:
    return f"{bands} {dtype} band{'s' if bands != 1 else ''}"


def _band_names(index: DataIndex) -> tuple[str, ...] | None:
    """The band names the data's first file carries (a raster's GDAL band descriptions), or None."""
    if int(index.routes[0]) != RASTER:
        return None
    if index.pack is not None:
        return index.pack.band_names
    try:
        return probe_raster(index.source(0)).names or None
    except Exception:  # noqa: BLE001 (changed since it was validated: the loaders will count it)
        return None


def _data_kind(table: Table, readable: np.ndarray) -> tuple[int, int]:
    """(bands, dtype code) of the data: the first valid file's; but when that file also reads as an RGB picture (a
    16-bit PNG, a TIFF Pillow reads) and some file reads only as one (a JPEG), the data is RGB pictures, as it was
    before rasters."""
    first = int(np.argmax(readable))
    kind = (int(table.bands[first]), int(table.dtype[first]))
    if kind != RGB and table.route[first] == RASTER and table.alt_route[first] != BAD:
        if (readable & (table.route != RASTER)).any():
            return RGB
    return kind


def _index_of(table: Table, root: str, source: str) -> DataIndex:
    """The decodable entries of ``table`` as a :class:`DataIndex` (labels: ImageFolder classes, or ``.cls``)."""
    counts = np.diff(table.unit_start)
    unit_of = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    classes: list[str] = []
    if source == "tar":
        labels = np.maximum(table.label, 0)
    else:  # the first folder under the root names the class, when every image lies in one
        firsts = [table.units[u].partition(b"/")[0] for u in range(len(counts))]
        used = [f for f, n in zip(firsts, counts.tolist(), strict=True) if n]
        if used and all(used):
            names = sorted(set(used))
            classes = [os.fsdecode(n) for n in names]
            number = {n: k for k, n in enumerate(names)}
            unit_label = np.array([number.get(f, 0) for f in firsts], np.int64)
            labels = unit_label[unit_of]
        else:
            labels = np.zeros(len(unit_of), np.int64)
    readable = table.route != BAD
    routes, good, kind = table.route, readable, RGB
    if readable.any():  # the data's bands and dtype: the first valid file's (see _data_kind)
        kind = _data_kind(table, readable)
        fits = (table.bands == kind[0]) & (table.dtype == kind[1])
        if kind == RGB:  # a raster that Pillow reads too keeps its RGB reading (as before rasters) in an RGB data set
            alt = readable & (table.route == RASTER) & (table.alt_route != BAD)
            if alt.any():
                routes, fits = np.where(alt, table.alt_route, table.route).astype(np.uint8), fits | alt
        good = readable & fits
    ids = None if good.all() else np.flatnonzero(good)
    pick = (lambda a: a) if ids is None else (lambda a: a[ids])
    index = DataIndex(
        root=root, tar=source == "tar", units=table.units, unit_of=pick(unit_of),
        names=table.names if ids is None else table.names.take(ids), offsets=pick(table.offset),
        sizes=pick(table.size), labels=pick(labels).astype(np.int64, copy=False), widths=pick(table.width),
        heights=pick(table.height), routes=pick(routes), classes=classes, bands=kind[0], dtype=DTYPES[kind[1]],
    )  # fmt: skip
    if ids is not None:
        errors = table.errors()
        whole = DataIndex(root, source == "tar", table.units, unit_of, table.names, table.offset, table.size, labels,
                          table.width, table.height, table.route)  # fmt: skip

        def reason(p: int) -> str:
            if readable[p]:
                return MISFIT + _kind(int(table.bands[p]), DTYPES[int(table.dtype[p])])
            return errors.get(p, "does not decode")

        index.bad = [(whole.key(p), reason(int(p))) for p in np.flatnonzero(~good)]
    return index
