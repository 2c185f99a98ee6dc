"""The run's bands: which of the files' bands the model takes, in what order, with which per-band statistics and
nodata value; decided once, after indexing, and then what every loader, the step and the pictures read.

:class:`DataBands` is a :class:`~fastmae.bands.BandSpec` (names, per-band mean and std in the data's native units,
dtype, nodata, how the statistics were chosen) plus the indices of the selected bands among the files' own. The
loaders read each file in its dtype, keep the selected bands, fill nodata with the band means, crop / resize / flip in
the native dtype and batch it so (:mod:`.loaders`); the step normalises on the device, one affine per band
(:func:`~fastmae.train.data.loaders.model_input`). ``for_loader()`` is None for the plain case (3 8-bit bands with
ImageNet's statistics, all of them, no nodata): the loaders and the step then run today's RGB code, bit for bit.

:func:`resolve_bands` makes it for pretraining (``--bands``, ``--nodata``, ``--norm``, ``--mean`` / ``--std``);
``--norm auto`` computes the statistics with :func:`~fastmae.train.data.bandstats.band_statistics` from a seeded
sample of the indexed files (all their bands; nodata and NaN left out), cached as JSON beside the index cache
(``$FASTMAE_CACHE/bandstats-<hash>.json``), keyed by the index's files and sizes, the nodata value and the seed.
Downstream commands start from the checkpoint's bands instead (:func:`downstream_bands`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os

import numpy as np
import torch

from fastmae.bands import IMAGENET, BandFlags, BandSpec, band_flags_of, match_bands, select_bands, spec_from_config
from fastmae.errors import FastMAEError
from fastmae.files import write_json
from fastmae.interop import read_checkpoint

from .bandstats import DEFAULT_SAMPLE, band_statistics
from .decode import RASTER, decode
from .index import DataIndex
from .index_build import Solo, read_bytes, validation_workers
from .index_cache import cache_folder
from .pack import open_pack
from .rasters import read_raster

logger = logging.getLogger("fastmae.data")
TORCH_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "int16": torch.int16, "float32": torch.float32}
STATS_VERSION = 1  # of the cached statistics' meaning


@dataclasses.dataclass(frozen=True)
class DataBands:
    """The bands a run's model takes (``spec``, with statistics) and where they are in the files: ``indices`` (the
    files' band numbers in the model's order; None: all, as stored). See the module docstring."""

    spec: BandSpec
    indices: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.spec.has_stats:
            raise FastMAEError(f"the run's bands ({self.spec.describe()}) have no statistics")
        if self.indices is not None:
            idx = tuple(int(i) for i in self.indices)
            if len(idx) != self.spec.count:
                raise FastMAEError(f"{len(idx)} band indices for {self.spec.count} bands")
            object.__setattr__(self, "indices", idx)

    @property
    def count(self) -> int:
        return self.spec.count

    @property
    def dtype(self) -> torch.dtype:
        """The batches' dtype: the files' own."""
        return TORCH_DTYPES[self.spec.dtype]

    @property
    def fill(self) -> tuple[float, ...] | None:
        """What nodata pixels become (the band means: they normalise to 0), or None without nodata."""
        return None if self.spec.nodata is None else self.spec.mean

    @property
    def plain(self) -> bool:
        """3 8-bit bands with ImageNet's statistics, as stored, no nodata: today's RGB path serves it exactly."""
        s = self.spec
        return (self.indices is None and s.nodata is None and s.dtype == "uint8" and s.count == 3
                and s.same_stats(IMAGENET, rel=0))  # fmt: skip

    def for_loader(self) -> DataBands | None:
        """What the loaders and the step take: None for :attr:`plain` bands (today's RGB code), else this."""
        return None if self.plain else self

    @property
    def index_list(self) -> list[int] | None:
        """:attr:`indices` as a list (``config.json``'s ``band_indices``), or None."""
        return None if self.indices is None else list(self.indices)

    def select(self, img: torch.Tensor) -> torch.Tensor:
        """``img [C_file, ...]`` -> the run's bands ``[C, ...]`` (a copy of those bands only; ``img`` itself when all
        are taken as stored)."""
        if self.indices is None:
            return img
        if img.shape[0] <= max(self.indices):
            raise FastMAEError(f"an image of {img.shape[0]} bands, the run takes band {max(self.indices)}")
        return img[list(self.indices)]

    def describe(self) -> str:
        taken = "" if self.indices is None else f" (the files' bands {','.join(map(str, self.indices))})"
        return self.spec.describe() + taken


def recorded(bands: DataBands | None) -> dict:
    """What ``config.json`` and every checkpoint record of a run's bands: ``bands`` (the spec) and ``band_indices``;
    None for both where the run has none (synthetic batches)."""
    if bands is None:
        return {"bands": None, "band_indices": None}
    return {"bands": bands.spec.to_dict(), "band_indices": bands.index_list}


def check_resumed(config: dict, bands: DataBands | None, what: str) -> None:
    """A resumed run's bands must be those ``config`` (its checkpoint's) recorded: the same names, statistics and
    nodata; anything else is one line naming both."""
    saved, now = spec_from_config(config, what), bands.spec if bands is not None else None
    if saved is not None and now is not None and (saved.names != now.names or not saved.same_stats(now, 1e-12)
                                                  or saved.to_dict()["nodata"] != now.to_dict()["nodata"]):
        raise FastMAEError(f"{what} was trained on {saved.describe()}; this run has {now.describe()}: resume "
                           "with the flags of the run that wrote it (its config.json)")  # fmt: skip


# ------------------------------------------------------------------------------------------- the files' bands
def files_spec(index: DataIndex, nodata: float | None = None) -> BandSpec:
    """The bands of the indexed files, as stored: count, dtype, names (a raster's GDAL band descriptions) and
    ``nodata``; no statistics yet."""
    return BandSpec(int(index.bands), names=index.band_names, dtype=index.dtype, nodata=nodata)


PACKED = -1  # the route of an item that is a pack's tile: (pack path, tile, size, PACKED)


def read_pixels(item) -> torch.Tensor:
    """``[C, H, W]`` pixels of one indexed sample ``(path, offset, size, route)`` in the files' dtype (the RGB routes:
    uint8 RGB): module-level, so that :func:`~.bandstats.band_statistics` can send it to its worker processes."""
    path, offset, size, route = item
    if route == PACKED:
        return open_pack(path).tile(offset)
    if route == RASTER:
        return read_raster(read_bytes(path, offset, size) if offset >= 0 else os.fsdecode(path))
    return decode(read_bytes(path, offset, size), route)


def _stats_key(index: DataIndex, nodata, seed: int, sample: int | None) -> str:
    h = hashlib.sha1()
    head = {"v": STATS_VERSION, "root": index.root, "n": len(index), "bands": index.bands, "dtype": index.dtype,
            "nodata": None if nodata is None else repr(float(nodata)), "seed": seed, "sample": sample}  # fmt: skip
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(index.units.digest() + index.names.digest())
    h.update(np.ascontiguousarray(index.unit_of).tobytes() + np.ascontiguousarray(index.sizes).tobytes())
    return h.hexdigest()[:20]


def data_statistics(index: DataIndex, nodata=None, seed: int = 0, sample: int | None = DEFAULT_SAMPLE,
                    group=None, workers: int | None = None, cache: bool = True) -> tuple[list, list, int]:  # fmt: skip
    """(mean, std, files sampled) per band of every band of the indexed files (native units), from ``sample`` files
    drawn with ``seed`` (nodata and NaN left out), cached beside the index cache. Under torchrun rank 0 computes (or
    reads the cache) and sends the numbers to the others."""
    group = group if group is not None and group.world_size > 1 else Solo()
    path = cache_folder() / f"bandstats-{_stats_key(index, nodata, seed, sample)}.json"
    found = None
    if group.rank == 0:
        found = _cached(path) if cache else None
        if found is None:
            found = _compute(index, nodata, seed, sample, workers)
            if cache:
                try:
                    write_json(path, {"version": STATS_VERSION, "root": index.root, **found})
                except Exception as exc:  # noqa: BLE001 (a read-only cache folder costs a recomputation)
                    logger.warning("could not write the band statistics cache %s: %s", path, exc)
        else:
            logger.info("band statistics from the cache %s", path)
    found = group.gather_objects(found)[0]
    return found["mean"], found["std"], found["files"]


def _cached(path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        if data.get("version") == STATS_VERSION and {"mean", "std", "count", "files"} <= set(data):
            return data
    except (OSError, ValueError):
        pass
    return None


def _compute(index: DataIndex, nodata, seed: int, sample: int | None, workers: int | None) -> dict:
    items = _Items(index)
    n = len(index) if sample is None else min(sample, len(index))
    procs = validation_workers(workers) if n >= 64 else 0  # a pool costs more than a few files
    stats = band_statistics(items, read=read_pixels, nodata=nodata, sample=sample, seed=seed, workers=procs)
    if stats.failed:
        logger.warning("band statistics: %d sampled file(s) did not read and were left out, e.g. %s (%s)",
                       len(stats.failed), index.key(stats.failed[0][0]), stats.failed[0][1])  # fmt: skip
    return {"mean": stats.mean.tolist(), "std": stats.std.tolist(), "count": stats.count.tolist(),
            "files": len(stats.files) - len(stats.failed)}  # fmt: skip


class _Items:
    """The index's samples as ``(path, offset, size, route)`` items, made on access (no list of a million)."""

    def __init__(self, index: DataIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        ix = self.index
        if ix.pack is not None:
            return str(ix.pack.path), int(ix.offsets[i]), int(ix.sizes[i]), PACKED
        return ix.path(i), int(ix.offsets[i]), int(ix.sizes[i]), int(ix.routes[i])


def _checked_stats(spec: BandSpec, mean, std, what: str) -> BandSpec:
    """``spec`` with ``mean`` / ``std``; a band without valid pixels or with a constant value is one line."""
    for i, (m, s) in enumerate(zip(mean, std, strict=True)):
        if not (math.isfinite(m) and math.isfinite(s)):
            raise FastMAEError(f"{what}: band {spec.label(i)} has no valid pixel in the sampled files (all nodata or "
                               "NaN?); drop it with --bands or check --nodata")  # fmt: skip
    return spec.with_stats(mean, std, "auto")


# ------------------------------------------------------------------------------------------------- the decision
def select(files: BandSpec, flags: BandFlags) -> tuple[BandSpec, tuple[int, ...] | None]:
    """(the chosen bands, their indices among the files' bands or None for all as stored) for ``--bands``."""
    if flags.bands is None:
        return files, None
    spec, idx = select_bands(files, list(flags.bands))
    return spec, (None if idx == list(range(files.count)) else tuple(idx))


def given_stats(spec: BandSpec, stats: BandSpec, source: str) -> BandSpec:
    """``spec`` with the statistics of ``--mean`` / ``--std`` or a file (``source``): matched by name where both have
    names, else by position (the counts must agree). A mismatch names both lists."""
    if stats.names and spec.names:
        missing = [n for n in spec.names if n not in stats.names]
        if missing:
            raise FastMAEError(f"{source} has statistics for {','.join(stats.names)}, not for the data's "
                               f"{','.join(missing)}")  # fmt: skip
        pick = [stats.names.index(n) for n in spec.names]
        return spec.with_stats([stats.mean[i] for i in pick], [stats.std[i] for i in pick], "given")
    if stats.count != spec.count:
        have = f" ({','.join(spec.names)})" if spec.names else ""
        raise FastMAEError(f"{source} gives {stats.count} band statistics, the run has {spec.count} bands{have}")
    return spec.with_stats(stats.mean, stats.std, "given")


def imagenet_stats(spec: BandSpec) -> BandSpec:
    """``spec`` with ImageNet's statistics, which are for 3 8-bit bands only."""
    if (spec.count, spec.dtype) != (3, "uint8"):
        raise FastMAEError(f"--norm imagenet is for 3 8-bit bands (RGB); the run's are {spec.count} {spec.dtype} "
                           "band(s): use --norm auto or give the statistics")  # fmt: skip
    return spec.with_stats(IMAGENET.mean, IMAGENET.std, "imagenet")


def auto_stats(index: DataIndex, spec: BandSpec, indices, seed: int, group=None, workers=None) -> BandSpec:
    """``spec`` with the statistics of its bands (``indices`` among the files', None: all), from the data."""
    mean, std, files = data_statistics(index, spec.nodata, seed, group=group, workers=workers)
    idx = list(range(len(mean))) if indices is None else list(indices)
    out = _checked_stats(spec, [mean[i] for i in idx], [std[i] for i in idx], "--norm auto")
    logger.info("band statistics (--norm auto) from %d file(s), seed %d: %s", files, seed, out.describe())
    return out


def resolve_bands(index: DataIndex, flags: BandFlags, seed: int = 0, group=None, workers: int | None = None,
                  ) -> DataBands:  # fmt: skip
    """The bands of a run on ``index`` as its flags ask: ``--bands`` chooses (or names), ``--nodata``, then the
    statistics: ``--mean`` / ``--std`` or ``--norm FILE``, else ``--norm imagenet`` / ``auto``; without ``--norm``,
    imagenet for 3 8-bit bands and auto for anything else. Logged once."""
    files = files_spec(index, flags.nodata)
    spec, idx = select(files, flags)
    norm = flags.norm or ("imagenet" if (spec.count, spec.dtype) == (3, "uint8") else "auto")
    if norm == "given":
        spec = given_stats(spec, flags.stats, flags.source)
    elif norm == "imagenet":
        spec = imagenet_stats(spec)
    else:
        spec = auto_stats(index, spec, idx, seed, group, workers)
    bands = DataBands(spec, idx)
    if not bands.plain and norm != "auto":  # auto logged its statistics already
        logger.info("bands: %s", bands.describe())
    return bands


# ------------------------------------------------------------------------------------------------- downstream
def checkpoint_spec(spec: BandSpec | None, in_chans: int) -> BandSpec:
    """The bands a checkpoint was trained on: its spec, or for a checkpoint without one (an official MAE file, a run
    before band specs) 3 bands are ImageNet's RGB and any other count is unnamed, without statistics."""
    if spec is not None:
        return spec
    return IMAGENET if in_chans == 3 else BandSpec(in_chans)


def _rgb_imagenet(spec: BandSpec) -> bool:
    return spec.count == 3 and not spec.names and spec.dtype == "uint8" and spec.norm == "imagenet"


def downstream_bands(index: DataIndex, flags: BandFlags, checkpoint: BandSpec | None, in_chans: int | None,
                     seed: int = 0, group=None, what: str = "the checkpoint") -> DataBands:  # fmt: skip
    """The bands of a finetune or probe on ``index`` from a checkpoint trained on ``checkpoint`` bands (None and
    ``in_chans`` None: no checkpoint, decided as for pretraining by :func:`resolve_bands`).

    Without ``--bands`` the model takes the checkpoint's bands: the data's are matched to them
    (:func:`~fastmae.bands.match_bands`: by name, any order, a subset chosen; unnamed by count), and a mismatch is
    one line naming both lists. One exception: a checkpoint of 3 RGB bands with ImageNet's statistics (an official
    MAE, a run on photos) on other bands is adapted to them (the filters moved by timm's rule), with a warning.
    With ``--bands`` the model takes the chosen bands and the weights move to them (by name, else timm's rule).

    Statistics: ``--mean`` / ``--std`` or ``--norm`` when given (a warning where they replace the checkpoint's),
    else the checkpoint's for each band it has (same dtype), else the data's own (``--norm auto``). ImageNet's
    statistics on 3 bands that are not 8-bit RGB pictures are allowed, with a warning."""
    if checkpoint is None and in_chans is None:
        return resolve_bands(index, flags, seed, group)
    ck = checkpoint_spec(checkpoint, in_chans)
    files = files_spec(index, flags.nodata if flags.nodata is not None else ck.nodata)
    if flags.bands is not None:
        spec, idx = select(files, flags)
    else:
        try:
            picked = match_bands(ck, files)
        except FastMAEError as exc:
            if not _rgb_imagenet(ck):
                raise FastMAEError(f"{what}: {exc}") from None
            logger.warning("%s was trained on 3 RGB bands with ImageNet's statistics; the data has %s: its patch "
                           "embedding is adapted to them (timm's rule) and the data's own statistics are used", what,
                           files.describe())  # fmt: skip
            picked = list(range(files.count))
            ck = BandSpec(files.count, dtype=files.dtype)  # nothing to take over but the weights
        spec = files.subset(picked)
        if ck.names and not spec.names:  # unnamed data matched by count: the bands are the checkpoint's
            spec = dataclasses.replace(spec, names=ck.names)
        idx = None if picked == list(range(files.count)) else tuple(picked)
    spec = _downstream_stats(index, spec, idx, ck, flags, seed, group, what)
    bands = DataBands(spec, idx)
    logger.info("bands: %s", bands.describe())
    return bands


def _downstream_stats(index, spec: BandSpec, idx, ck: BandSpec, flags: BandFlags, seed, group, what) -> BandSpec:
    if flags.norm is not None:  # given on the command line: it rules
        if ck.has_stats:
            logger.warning("%s replaces the statistics %s was trained with", flags.source or f"--norm {flags.norm}",
                           what)  # fmt: skip
        if flags.norm == "given":
            return given_stats(spec, flags.stats, flags.source)
        return imagenet_stats(spec) if flags.norm == "imagenet" else auto_stats(index, spec, idx, seed, group)
    if _rgb_imagenet(ck) and spec.count == 3:
        if spec.dtype != "uint8":
            logger.warning("%s has ImageNet's statistics for 8-bit RGB, the data is %s: its own statistics are used",
                           what, spec.describe())  # fmt: skip
            return auto_stats(index, spec, idx, seed, group)
        if not index.rgb:
            logger.warning("%s has ImageNet's statistics for RGB photos; the data is %s rasters: they are used as they "
                           "are", what, spec.describe())  # fmt: skip
        return imagenet_stats(spec)
    own = {}
    if ck.has_stats and ck.dtype == spec.dtype:
        if ck.names and spec.names:
            own = {i: ck.names.index(n) for i, n in enumerate(spec.names) if n in ck.names}
        elif not ck.names and ck.count == spec.count:
            own = {i: i for i in range(spec.count)}
    if len(own) == spec.count:
        return spec.with_stats([ck.mean[own[i]] for i in range(spec.count)], [ck.std[own[i]] for i in
                                                                              range(spec.count)], ck.norm)  # fmt: skip
    data = auto_stats(index, spec, idx, seed, group)
    if not own:
        return data
    logger.info("bands %s: the checkpoint's statistics; bands %s: the data's", ",".join(spec.label(i) for i in own),
                ",".join(spec.label(i) for i in range(spec.count) if i not in own))  # fmt: skip
    mean = [ck.mean[own[i]] if i in own else data.mean[i] for i in range(spec.count)]
    std = [ck.std[own[i]] if i in own else data.std[i] for i in range(spec.count)]
    return spec.with_stats(mean, std, "auto")


def pretrained_bands(cfg, index: DataIndex, group=None) -> DataBands:
    """The run's :class:`~fastmae.train.data.DataBands`: the ``--pretrained`` checkpoint's bands and statistics,
    matched to ``index``'s (``--bands`` maps others; see :func:`~fastmae.train.data.databands.downstream_bands`);
    without a checkpoint, the data's own, as pretraining decides them."""
    flags = band_flags_of(cfg)
    if cfg.pretrained is None:
        return downstream_bands(index, flags, None, None, cfg.seed, group)
    _, arch, info = read_checkpoint(cfg.pretrained)
    return downstream_bands(index, flags, info["bands"], arch["in_chans"], cfg.seed, group,
                            f"--pretrained {cfg.pretrained}")  # fmt: skip
