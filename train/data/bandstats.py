"""Per-band mean and standard deviation of a data set, from a seeded sample of its files: what ``--norm auto``
normalises with (in the data's native units), computed once at index time and kept with the run.

- Files: ``min(N, sample)`` of them, chosen by ``numpy.random.default_rng(seed)`` without replacement (the same files
  for the same list and seed, whatever the worker count), read in that order.
- Pixels: all of each file's, or ``pixels`` positions per file drawn from the file's own generator
  (``default_rng([seed, position in the list])``), the same positions in every band.
- Excluded: pixels equal to ``nodata`` (one value, or one per band) and, in float data, NaN; so each band has its own
  count.
- Arithmetic: each file's per-band count, mean and sum of squared deviations in float64 (two passes over the file's
  pixels), merged file by file in sample order with Chan et al.'s pairwise update (the parallel form of Welford's):
  no cancellation from a large sum of squares, and the same numbers for any worker count. The std is the population
  one (``ddof=0``, numpy's default). A band with no valid pixel in the sample has mean and std NaN and count 0 (the
  caller refuses to train on it).

Work is spread over ``workers`` processes (:mod:`.pool`; 0 = in this process); ``read`` must be a module-level function
(it is pickled by reference), :func:`~fastmae.train.data.rasters.read_raster` by default.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fastmae.errors import FastMAEError

from .pool import lost_worker, process_pool
from .rasters import read_raster

DEFAULT_SAMPLE = 512  # files


@dataclass(frozen=True)
class BandStatistics:
    """Per band: ``mean``, ``std`` (float64 ``[C]``, native units), ``count`` (int64 ``[C]``, valid pixels seen);
    ``files``: the positions (in the given list) of the files sampled; ``failed``: ``(position, reason)`` of sampled
    files that did not read (left out)."""

    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    files: np.ndarray
    failed: tuple[tuple[int, str], ...] = ()


def sample_files(n: int, sample: int | None, seed: int) -> np.ndarray:
    """Positions of the files whose pixels count: all ``n`` in order when ``sample`` is None or >= n, else ``sample``
    of them drawn without replacement by ``default_rng(seed)``, sorted."""
    if sample is None or sample >= n:
        return np.arange(n, dtype=np.int64)
    if sample < 1:
        raise FastMAEError(f"the statistics need at least one file, got a sample of {sample}")
    return np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False)).astype(np.int64)


def _partial(pixels: np.ndarray, nodata, pick: np.ndarray | None) -> np.ndarray:
    """``[C, 3]`` float64 (count, mean, M2) of one image ``[C, H, W]``, ``pick``: flat pixel positions or None."""
    c = pixels.shape[0]
    flat = pixels.reshape(c, -1)
    if pick is not None:
        flat = flat[:, pick]
    nd = None if nodata is None else np.broadcast_to(np.asarray(nodata, dtype=np.float64).ravel(), (c,))
    out = np.zeros((c, 3))
    for b in range(c):
        x = flat[b].astype(np.float64)
        keep = None
        if np.issubdtype(flat.dtype, np.floating):
            keep = ~np.isnan(x)
        if nd is not None and not np.isnan(nd[b]):
            eq = x != nd[b]
            keep = eq if keep is None else keep & eq
        if keep is not None:
            x = x[keep]
        n = x.size
        if n:
            mean = x.mean()
            d = x - mean
            out[b] = n, mean, np.dot(d, d)
    return out


def _file_partial(task) -> np.ndarray | str:
    read, source, nodata, pixels, seed, position = task
    try:
        img = read(source)
        arr = img.numpy() if hasattr(img, "numpy") else np.asarray(img)
        if arr.ndim != 3:
            raise FastMAEError(f"expected [C, H, W] pixels, got shape {arr.shape}")
        pick = None
        hw = arr.shape[1] * arr.shape[2]
        if pixels is not None and pixels < hw:
            pick = np.sort(np.random.default_rng([seed, position]).choice(hw, size=pixels, replace=False))
        return _partial(arr, nodata, pick)
    except Exception as exc:  # unreadable now: left out and named, never fatal
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _merge(total: np.ndarray, part: np.ndarray) -> None:
    """Chan et al.'s pairwise update of ``total [C, 3]`` (count, mean, M2) with ``part``, in place."""
    na, ma, qa = total[:, 0], total[:, 1], total[:, 2]
    nb, mb, qb = part[:, 0], part[:, 1], part[:, 2]
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = mb - ma
        frac = np.where(n > 0, nb / n, 0.0)
        total[:, 2] = qa + qb + delta * delta * na * frac
        total[:, 1] = ma + delta * frac
    total[:, 0] = n


def band_statistics(sources: Sequence, *, read: Callable = read_raster, nodata=None,
                    sample: int | None = DEFAULT_SAMPLE, pixels: int | None = None, seed: int = 0,
                    workers: int = 0) -> BandStatistics:  # fmt: skip
    """Per-band mean and std of the files ``sources`` (paths or bytes, as ``read`` takes them), from ``sample`` files
    (None: all) and ``pixels`` pixels per file (None: all), ``nodata`` and NaN excluded; see the module's text. Every
    sampled file must have the band count of the first that reads; files that do not read are left out and listed in
    ``failed``; if none reads, it is an error."""
    chosen = sample_files(len(sources), sample, seed)
    tasks = [(read, sources[int(p)], nodata, pixels, seed, int(p)) for p in chosen]
    if workers and len(tasks) > 1:
        with process_pool(min(workers, len(tasks))) as pool:
            try:
                parts = list(pool.map(_file_partial, tasks, chunksize=max(1, len(tasks) // (4 * workers))))
            except concurrent.futures.process.BrokenProcessPool as err:
                raise lost_worker("band statistics", err) from None
    else:
        parts = [_file_partial(t) for t in tasks]
    total, failed = None, []
    for p, part in zip(chosen.tolist(), parts, strict=True):
        if isinstance(part, str):
            failed.append((p, part))
            continue
        if total is None:
            total = np.zeros_like(part)
        if part.shape != total.shape:
            raise FastMAEError(f"file {p} of the sample has {part.shape[0]} bands, the first one read {total.shape[0]}")
        _merge(total, part)
    if total is None:
        reason = f" (e.g. {failed[0][1]})" if failed else ""
        raise FastMAEError(f"no file of the {len(chosen)} sampled for the band statistics reads{reason}")
    count = total[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total[:, 1], np.nan)
        std = np.where(count > 0, np.sqrt(total[:, 2] / count), np.nan)
    return BandStatistics(mean, std, count.astype(np.int64), chosen, tuple(failed))
