"""The image index's build: sources resolved, folders walked (one ``stat`` per folder when cached), new or changed
files and shards validated (fully decoded) in a pool of processes, split over the ranks of a torchrun job, and the
:class:`~fastmae.train.data.index_cache.Table` assembled from what was reused and what was found.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import re
import sys
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fastmae.errors import FastMAEError

from ..job import local_world_size, usable_cpus
from .decode import BAD, IMAGE_EXTENSIONS, RASTER, UNKNOWN, probe
from .index_cache import StringTable, Table, TableBuilder, entries_of, reuse
from .pool import lost_worker, process_pool
from .rasters import DTYPES, check_raster

logger = logging.getLogger("fastmae.data")

_RACY_NS = 1_000_000_000  # a folder changed this recently is listed again next time
_EXTENSIONS = tuple(e.encode() for e in IMAGE_EXTENSIONS)
_CHUNK = 256  # files per validation task


# ------------------------------------------------------------------------------------------------------ reading
def read_bytes(path: bytes | str, offset: int, size: int) -> bytearray:
    """The bytes of a file (``offset`` -1), or ``size`` bytes at ``offset`` in it (a shard member)."""
    with open(path, "rb", buffering=0) as f:
        if offset >= 0:
            f.seek(offset)
        else:
            size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:  # shorter than recorded: changed since it was indexed
                del view
                del buf[got:]
                break
            got += n
        return buf


# ---------------------------------------------------------------------------------------------------- sources
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


def _is_image(name: bytes) -> bool:
    return name.lower().endswith(_EXTENSIONS)


def resolve_sources(data: str | os.PathLike) -> tuple[str, list[Path], Path | None]:
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
            raise FastMAEError(f"--data {path} is a file; give a folder of images, .tar shards, a brace pattern or a "
                               "pack (fastmae pack)")  # fmt: skip
        return str(path.resolve()), [path], None
    with os.scandir(path) as it:
        top = [(e.name, e.is_dir()) for e in it if not e.name.startswith(".")]
    shards = sorted(path / n for n, is_dir in top if n.endswith(".tar") and not is_dir)
    if shards and not any(is_dir or _is_image(os.fsencode(n)) for n, is_dir in top):
        return str(path.resolve()), [p for p in shards if p.is_file()], None
    return str(path.resolve()), [], path


# ------------------------------------------------------------------------------------------------ folder walking
def _list_folder(full: bytes) -> tuple[list[tuple[bytes, int, int]], list[bytes]]:
    """(image files as (name, size, mtime_ns), sub-folders) of one folder, both sorted; hidden names left out."""
    files, subdirs = [], []
    with os.scandir(full) as it:
        for e in it:
            name = e.name
            if name.startswith(b"."):
                continue
            try:
                if e.is_dir():
                    subdirs.append(name)
                    continue
                if not _is_image(name) or not e.is_file():
                    continue
                st = e.stat()
            except OSError:  # vanished, or a dangling link
                continue
            files.append((name, st.st_size, st.st_mtime_ns))
    files.sort()
    subdirs.sort()
    return files, subdirs


def _walk(root: bytes, old: Table | None, check: str) -> tuple[Table, dict]:
    """Every folder under ``root`` in depth-first order (sub-folders by name), each with its image files by name;
    folders whose time is the cached one keep the cached listing and validation (``check="listing"``)."""
    now = time.time_ns()
    lookup, children = {}, {}
    if old is not None:
        lookup = {name: u for u, name in enumerate(old.units)}
        for u, parent in enumerate(old.unit_parent.tolist()):
            children.setdefault(parent, []).append(u)
    built, seen = TableBuilder(), set()
    stats = {"folders": 0, "listed": 0}
    same = old is not None  # every folder as cached, in the cached order: the cached table is the answer
    stack: list[tuple[bytes, int]] = [(b"", -1)]
    while stack:
        rel, parent = stack.pop()
        full = root + b"/" + rel if rel else root
        try:
            st = os.stat(full)
        except OSError as exc:
            logger.warning("cannot read folder %s: %s", os.fsdecode(full), exc)
            continue
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree
            continue
        seen.add((st.st_dev, st.st_ino))
        stats["folders"] += 1
        u_old = lookup.get(rel)
        mtime = -1 if st.st_mtime_ns >= now - _RACY_NS else st.st_mtime_ns
        if check == "listing" and u_old is not None and int(old.unit_time[u_old]) == st.st_mtime_ns:
            entries, errors = reuse(old, u_old)
            subdirs = [old.units[c].rpartition(b"/")[2] for c in children.get(u_old, [])]
            same = same and u_old == len(built.unit_rows)
        else:
            stats["listed"] += 1
            same = False
            try:
                files, subdirs = _list_folder(full)
            except OSError as exc:
                logger.warning("cannot list folder %s: %s", os.fsdecode(full), exc)
                continue
            entries, errors = _fresh_entries(files, old, u_old)
        me = built.add(rel, mtime, 0, parent, entries, errors)
        stack.extend((rel + b"/" + s if rel else s, me) for s in reversed(subdirs))
    if same and len(built.unit_rows) == len(old.units):
        return old, stats
    return built.table(), stats


def _fresh_entries(files: list[tuple[bytes, int, int]], old: Table | None, u_old: int | None):
    """Entries of a listed folder: validation kept for files with their cached size and time."""
    names = [f[0] for f in files]
    entries = entries_of(names, size=[f[1] for f in files], time=[f[2] for f in files])
    errors = {}
    if old is not None and u_old is not None and files:
        prev, prev_errors = reuse(old, u_old)
        where = {name: k for k, name in enumerate(prev["names"])}
        for j, (name, size, mtime) in enumerate(files):
            k = where.get(name)
            if k is not None and prev["size"][k] == size and prev["time"][k] == mtime:
                for f in Table.PROBED:
                    entries[f][j] = prev[f][k]
                if k in prev_errors:
                    errors[j] = prev_errors[k]
    return entries, errors


# ------------------------------------------------------------------------------------------------- validation
def _reason(exc: Exception) -> str:
    """Why a file does not decode, in a few words (no object reprs)."""
    if type(exc).__name__ == "UnidentifiedImageError":
        return "not an image Pillow can read"
    text = re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


RGB = (3, DTYPES.index("uint8"))  # what the RGB routes give: 3 bands of uint8


def _raster_first(data, name: bytes) -> bool:
    """Whether a file is read as a raster when it reads as one: ``.npy``, TIFF, and PNG of 16 bits (IHDR bit depth)."""
    ext = name.rpartition(b".")[2].lower()
    return ext in (b"npy", b"tif", b"tiff") or (ext == b"png" and len(data) > 24 and data[24] == 16)


def validate(data, name: bytes) -> tuple[int, int, int, int, int, int] | str:
    """(width, height, route, bands, dtype code, alternative RGB route) of one file's bytes (``name``: its file or
    member name, for its extension), or the one-line reason it does not read.

    ``.npy`` is a raster only (:func:`~.rasters.check_raster`). TIFF and 16-bit PNG are rasters when they read as one
    (their own bands and dtype), with Pillow's RGB route beside it when Pillow reads them too: in a data set of 8-bit
    RGB pictures they keep that route, read as before rasters (converted to 8-bit RGB), instead of being skipped. A
    TIFF that reads only through Pillow takes Pillow's route; one that reads neither way gives the raster reason.
    Every other file: Pillow's probe and route, as before rasters (3 bands of uint8)."""
    if not _raster_first(data, name):
        return (*probe(data), *RGB, BAD)
    info = check_raster(data)
    if name.lower().endswith(b".npy"):
        return info if isinstance(info, str) else (info.width, info.height, RASTER, info.bands,
                                                    DTYPES.index(info.dtype), BAD)  # fmt: skip
    quiet = logging.getLogger("PIL.TiffImagePlugin")
    if quiet.level == logging.NOTSET:  # its error line about a 13-band TIFF is no news: the raster route reads it
        quiet.setLevel(logging.CRITICAL)
    try:
        rgb = probe(data)
    except Exception:  # noqa: BLE001 (Pillow does not read it: the raster reading alone counts)
        rgb = None
    if isinstance(info, str):
        return info if rgb is None else (*rgb, *RGB, BAD)
    return info.width, info.height, RASTER, info.bands, DTYPES.index(info.dtype), BAD if rgb is None else rgb[2]


def probe_file(item: tuple) -> tuple[int, int, int, int, int, int] | str:
    """:func:`validate` of a file ``(path, -1, 0)`` or a shard member ``(shard path, offset, size, member name)``."""
    path, offset, size = item[:3]
    try:
        return validate(read_bytes(path, offset, size), item[3] if len(item) > 3 else path)
    except Exception as exc:  # any decode failure: recorded and skipped, never fatal
        return _reason(exc)


def _probe_chunk(items: list[tuple]) -> list:
    return [probe_file(item) for item in items]


def scan_shard(path: bytes) -> tuple[dict, dict[int, str]]:
    """A webdataset shard's samples (members sharing a key, the name up to the first dot; ``.cls`` holds the label),
    each image validated."""
    try:
        with tarfile.open(os.fsdecode(path)) as tar:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in tar.getmembers():
                if m.isfile():
                    folder, _, base = m.name.rpartition("/")
                    key, _, ext = base.partition(".")
                    groups.setdefault(f"{folder}/{key}", {})[ext.lower()] = m
            rows = []
            for exts in groups.values():
                image = next((exts[e] for e in exts if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
                if image is None:
                    continue
                label = -1
                if "cls" in exts:
                    text = tar.extractfile(exts["cls"]).read().decode(errors="replace").strip()
                    label = int(text) if text.lstrip("-").isdigit() else 0
                rows.append((image.name.encode(), image.offset_data, image.size, label))
    except (OSError, tarfile.TarError) as exc:
        raise FastMAEError(f"cannot read tar shard {os.fsdecode(path)}: {exc}") from exc
    found = _probe_chunk([(path, off, size, name) for name, off, size, _ in rows])
    entries = entries_of([r[0] for r in rows], offset=[r[1] for r in rows], size=[r[2] for r in rows],
                       label=[r[3] for r in rows])  # fmt: skip
    errors = _fill(entries, range(len(rows)), found)
    return entries, errors


def _fill(entries: dict, positions: Iterable[int], found: list) -> dict[int, str]:
    """Write probe results into ``entries`` at ``positions``; returns the reasons of the bad ones."""
    errors = {}
    for p, res in zip(positions, found, strict=True):
        if isinstance(res, str):
            entries["route"][p], errors[int(p)] = BAD, res
        else:
            for f, value in zip(Table.PROBED, res, strict=True):
                entries[f][p] = value
    return errors


def _pool_run(fn, tasks: list, workers: int, show: bool, unit: str, sizes: list[int] | None = None) -> list:
    """``[fn(t) for t in tasks]`` over ``workers`` processes (:mod:`.pool`: forked from a forkserver), a
    bounded number of tasks in flight, with a progress bar on the main rank."""
    from tqdm import tqdm

    sizes = sizes or [1] * len(tasks)
    bar = tqdm(total=sum(sizes), unit=unit, disable=not show, desc="validating", dynamic_ncols=True, delay=2.0,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)  # a log file gets a line every 30 s
    try:
        if workers <= 1 or len(tasks) <= 1:
            out = []
            for t, n in zip(tasks, sizes, strict=True):
                out.append(fn(t))
                bar.update(n)
            return out
        out: list = [None] * len(tasks)
        with process_pool(workers) as pool:
            pending, nxt = {}, 0
            while nxt < len(tasks) or pending:
                while nxt < len(tasks) and len(pending) < 4 * workers:
                    pending[pool.submit(fn, tasks[nxt])] = nxt
                    nxt += 1
                done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in done:
                    k = pending.pop(fut)
                    try:
                        out[k] = fut.result()
                    except concurrent.futures.process.BrokenProcessPool as err:
                        raise lost_worker("validating the data", err) from None
                    bar.update(sizes[k])
        return out
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------- building
def validation_workers(workers: int | None) -> int:
    """Validation processes: this rank's share of the cores it may use (at most 16)."""
    return workers or max(1, min(16, usable_cpus() // local_world_size()))


class Solo:
    """The group of a one-process run."""

    rank, world_size, local_rank = 0, 1, 0

    def gather_objects(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass


class FolderBuild:
    """A folder source: walked by every rank (one stat per folder when cached); files validated in chunks."""

    what = "files"

    def __init__(self, root: bytes, old: Table | None, check: str):
        self.root = root
        self.table_, self.stats = _walk(root, old, check)
        routes = self.table_.route
        self.stale = old is None or self.stats["listed"] > 0 or len(routes) != len(old.route)
        self.errors = self.table_.errors()

    def fingerprint(self) -> bytes:
        t = self.table_
        return t.units.digest() + t.names.digest()

    def todo(self) -> np.ndarray:
        return np.flatnonzero(self.table_.route == UNKNOWN)

    def _item(self, p: int) -> tuple[bytes, int, int]:
        t = self.table_
        u = int(np.searchsorted(t.unit_start, p, side="right")) - 1
        unit = t.units[u]
        folder = self.root + b"/" + unit if unit else self.root
        return folder + b"/" + t.names[p], -1, 0

    def work(self, positions: np.ndarray, workers: int, show: bool) -> tuple[np.ndarray, list]:
        chunks = [positions[a : a + _CHUNK] for a in range(0, len(positions), _CHUNK)]
        found = _pool_run(_probe_chunk, [[self._item(int(p)) for p in c] for c in chunks], workers, show, "file",
                          [len(c) for c in chunks])  # fmt: skip
        return positions, [r for part in found for r in part]

    def merge(self, results: tuple[np.ndarray, list]) -> None:
        positions, found = results
        t = self.table_
        self.errors.update(_fill({f: getattr(t, f) for f in Table.PROBED}, positions, found))

    def table(self) -> Table:
        t = self.table_
        err = sorted(self.errors.items())
        t.err_pos = np.array([p for p, _ in err], np.int64)
        t.err_text = StringTable.of(text.encode() for _, text in err)
        return t


class ShardBuild:
    """A shard source: one stat per shard; a new or changed shard is parsed and validated by one process."""

    what = "shards"

    def __init__(self, shards: list[Path], old: Table | None):
        self.shards = [os.fsencode(str(s)) for s in shards]
        self.old = old
        lookup = {name: u for u, name in enumerate(old.units)} if old is not None else {}
        self.stamps, self.reuse = [], {}
        for s, path in enumerate(self.shards):
            st = os.stat(path)
            self.stamps.append((st.st_mtime_ns, st.st_size))
            u = lookup.get(path)
            if u is not None and (int(old.unit_time[u]), int(old.unit_size[u])) == (st.st_mtime_ns, st.st_size):
                self.reuse[s] = u
        self.done: dict[int, tuple[dict, dict]] = {}
        self.stale = old is None or len(self.reuse) != len(self.shards) or len(old.units) != len(self.shards)
        self.stats = {"shards": len(self.shards), "parsed": len(self.shards) - len(self.reuse)}

    def fingerprint(self) -> bytes:
        return hashlib.sha1(b"\0".join(self.shards)).digest()

    def todo(self) -> np.ndarray:
        return np.array([s for s in range(len(self.shards)) if s not in self.reuse], np.int64)

    def work(self, positions: np.ndarray, workers: int, show: bool) -> dict:
        found = _pool_run(scan_shard, [self.shards[int(s)] for s in positions], workers, show, "shard")
        return dict(zip(positions.tolist(), found, strict=True))

    def merge(self, results: dict) -> None:
        self.done.update(results)

    def table(self) -> Table:
        now = time.time_ns()
        built = TableBuilder()
        for s, path in enumerate(self.shards):
            mtime, size = self.stamps[s]
            entries, errors = self.done[s] if s in self.done else reuse(self.old, self.reuse[s])
            built.add(path, -1 if mtime >= now - _RACY_NS else mtime, size, -1, entries, errors)
        return built.table()
