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

The index holds numpy arrays only (names in one byte buffer with offsets, :class:`StringTable`), so forked DataLoader
workers share it without copy-on-read growth.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import tarfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from fastmae.errors import FastMAEError, NoRoom
from fastmae.files import atomic_write

from ..job import local_world_size, usable_cpus
from .decode import BAD, DALI_NATIVE, IMAGE_EXTENSIONS, UNKNOWN, probe

logger = logging.getLogger("fastmae.data")

CHECKS = ("listing", "stat")
_MAGIC = b"FASTMAE-INDEX-2\n"
_VERSION = 3  # of what the cache's entries mean (routes, reasons): a cache of another version is validated anew
_RACY_NS = 1_000_000_000  # a folder changed this recently is listed again next time
_EXTENSIONS = tuple(e.encode() for e in IMAGE_EXTENSIONS)
_CHUNK = 256  # files per validation task


# ------------------------------------------------------------------------------------------------- string tables
class StringTable:
    """Many byte strings in one buffer: string ``i`` is ``blob[starts[i]:ends[i]]``. No Python object per string, and
    a subset is two index operations."""

    __slots__ = ("blob", "starts", "ends")

    def __init__(self, blob: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.blob, self.starts, self.ends = blob, starts, ends

    @classmethod
    def of(cls, items: Iterable[bytes]) -> StringTable:
        items = list(items)
        lengths = np.fromiter(map(len, items), np.int64, len(items))
        ends = np.cumsum(lengths)
        return cls(np.frombuffer(b"".join(items), np.uint8), ends - lengths, ends)

    @classmethod
    def concat(cls, tables: Sequence[StringTable]) -> StringTable:
        """One table of ``tables`` in order; each must be compact (its strings adjacent in its blob, as :meth:`of`
        makes them and any contiguous slice of such a table keeps them)."""
        parts = [t for t in tables if len(t)]
        for t in parts:
            if not np.array_equal(t.starts[1:], t.ends[:-1]):
                raise ValueError("StringTable.concat needs compact tables")
        blob = np.concatenate([t.blob[t.starts[0] : t.ends[-1]] for t in parts]) if parts else np.empty(0, np.uint8)
        lengths = np.concatenate([t.ends - t.starts for t in parts]) if parts else np.empty(0, np.int64)
        ends = np.cumsum(lengths)
        return cls(blob, ends - lengths, ends)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> bytes:
        return self.blob[self.starts[i] : self.ends[i]].tobytes()

    def __iter__(self) -> Iterator[bytes]:
        for i in range(len(self)):
            yield self[i]

    def take(self, ids) -> StringTable:
        return StringTable(self.blob, self.starts[ids], self.ends[ids])

    def slice(self, a: int, b: int) -> StringTable:
        return StringTable(self.blob, self.starts[a:b], self.ends[a:b])

    def digest(self) -> bytes:
        h = hashlib.sha1(np.ascontiguousarray(self.ends - self.starts).tobytes())
        for a, b in _runs(self.starts, self.ends):
            h.update(memoryview(self.blob[a:b]))
        return h.digest()


def _runs(starts: np.ndarray, ends: np.ndarray) -> Iterator[tuple[int, int]]:
    """Maximal byte ranges covered by adjacent strings (one range for a compact table)."""
    if not len(starts):
        return
    breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(starts)], strict=True):
        yield int(starts[a]), int(ends[b - 1])


# --------------------------------------------------------------------------------------------------- the index
@dataclass(eq=False)
class DataIndex:
    """The decodable images of a data set: where their bytes are, labels, sizes and decode routes, as numpy arrays;
    and which files were skipped."""

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
        """Sample ``i``'s name in messages: its file path, or ``shard.tar/member``."""
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

    def subset(self, ids) -> DataIndex:
        """The samples at positions ``ids`` (a split); classes kept, bad files stay with the whole."""
        ids = np.asarray(ids, dtype=np.int64)
        return DataIndex(
            self.root, self.tar, self.units, self.unit_of[ids], self.names.take(ids), self.offsets[ids],
            self.sizes[ids], self.labels[ids], self.widths[ids], self.heights[ids], self.routes[ids],
            list(self.classes), [],
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


# ------------------------------------------------------------------------------------------- the cache's content
@dataclass
class _Table:
    """What the cache holds for a data set: its units (folders in walk order, or shards) and their entries (image files
    or shard samples, good and bad) in order. Entries of unit ``u`` are ``unit_start[u]:unit_start[u + 1]``."""

    units: StringTable
    unit_time: np.ndarray  # [U] int64 mtime_ns; -1: look again next time
    unit_size: np.ndarray  # [U] int64 (shards; 0 for folders)
    unit_parent: np.ndarray  # [U] int32 (folders; -1 for the root and for shards)
    unit_start: np.ndarray  # [U + 1] int64
    names: StringTable  # [E]
    offset: np.ndarray  # [E] int64, -1 for files
    size: np.ndarray  # [E] int64
    time: np.ndarray  # [E] int64 mtime_ns (files; 0 for shard members)
    label: np.ndarray  # [E] int64 (.cls of shard samples; -1 none)
    width: np.ndarray  # [E] int32
    height: np.ndarray  # [E] int32
    route: np.ndarray  # [E] uint8; BAD for files that do not decode, UNKNOWN before validation
    err_pos: np.ndarray  # [K] int64 entries with a recorded reason
    err_text: StringTable  # [K]

    ENTRY_FIELDS = ("offset", "size", "time", "label", "width", "height", "route")

    def unit_entries(self, u: int) -> tuple[int, int]:
        return int(self.unit_start[u]), int(self.unit_start[u + 1])

    def errors(self) -> dict[int, str]:
        return {int(p): self.err_text[k].decode(errors="replace") for k, p in enumerate(self.err_pos)}


def _entries(names: list[bytes], **columns) -> dict:
    """A unit's entries as arrays (the dtypes of :class:`_Table`)."""
    n = len(names)
    dtypes = {"offset": np.int64, "size": np.int64, "time": np.int64, "label": np.int64, "width": np.int32,
              "height": np.int32, "route": np.uint8}  # fmt: skip
    defaults = {"offset": -1, "label": -1, "route": UNKNOWN}
    out = {"names": StringTable.of(names)}
    for name, dtype in dtypes.items():
        values = columns.get(name)
        out[name] = np.full(n, defaults.get(name, 0), dtype) if values is None else np.asarray(values, dtype)
    return out


class _Builder:
    """Assembles a :class:`_Table` unit by unit: entries reused from the cached table, or new ones."""

    def __init__(self):
        self.unit_rows: list[tuple[bytes, int, int, int]] = []
        self.parts: list[dict] = []
        self.errors: dict[int, str] = {}
        self.count = 0

    def add(self, name: bytes, mtime: int, size: int, parent: int, entries: dict, errors: dict[int, str]) -> int:
        """A unit with its entries (arrays, see :func:`_entries`) and the reasons of its bad ones (by position in
        the unit); returns the unit's number."""
        self.unit_rows.append((name, mtime, size, parent))
        n = len(entries["names"])
        self.parts.append(entries)
        for p, text in errors.items():
            self.errors[self.count + p] = text
        self.count += n
        return len(self.unit_rows) - 1

    def table(self) -> _Table:
        rows = self.unit_rows
        counts = np.array([len(p["names"]) for p in self.parts], np.int64)
        cat = {f: (np.concatenate([p[f] for p in self.parts]) if self.parts else np.empty(0, dt))
               for f, dt in (("offset", np.int64), ("size", np.int64), ("time", np.int64), ("label", np.int64),
                             ("width", np.int32), ("height", np.int32), ("route", np.uint8))}  # fmt: skip
        err = sorted(self.errors.items())
        return _Table(
            units=StringTable.of(r[0] for r in rows),
            unit_time=np.array([r[1] for r in rows], np.int64), unit_size=np.array([r[2] for r in rows], np.int64),
            unit_parent=np.array([r[3] for r in rows], np.int32),
            unit_start=np.r_[0, np.cumsum(counts)].astype(np.int64),
            names=StringTable.concat([p["names"] for p in self.parts]), **cat,
            err_pos=np.array([p for p, _ in err], np.int64), err_text=StringTable.of(t.encode() for _, t in err),
        )  # fmt: skip


def _reuse(old: _Table, u: int) -> tuple[dict, dict[int, str]]:
    """Unit ``u``'s entries of the cached table (views) and their reasons (by position in the unit)."""
    a, b = old.unit_entries(u)
    entries = {"names": old.names.slice(a, b), **{f: getattr(old, f)[a:b] for f in _Table.ENTRY_FIELDS}}
    lo, hi = np.searchsorted(old.err_pos, [a, b])
    errors = {int(old.err_pos[k]) - a: old.err_text[k].decode(errors="replace") for k in range(lo, hi)}
    return entries, errors


# ---------------------------------------------------------------------------------------------- the cache file
def cache_folder() -> Path:
    return Path(os.environ.get("FASTMAE_CACHE", Path.home() / ".cache" / "fastmae"))


def _cache_file(root: str) -> Path:
    return cache_folder() / f"index-{hashlib.sha1(root.encode()).hexdigest()[:16]}.bin"


def _arrays(table: _Table) -> dict[str, np.ndarray]:
    out = {}
    for f in fields(table):
        value = getattr(table, f.name)
        if isinstance(value, StringTable):
            out.update({f"{f.name}.blob": value.blob, f"{f.name}.starts": value.starts, f"{f.name}.ends": value.ends})
        else:
            out[f.name] = value
    return out


def _save_cache(path: Path, table: _Table, meta: dict) -> bool:
    """Write the cache atomically (temp file + rename); a folder that cannot take it costs a warning only."""
    arrays = {k: np.ascontiguousarray(v) for k, v in _arrays(table).items()}
    specs, offset = [], 0
    for name, a in arrays.items():
        specs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
        offset += -(-a.nbytes // 64) * 64
    header = json.dumps({**meta, "arrays": specs}).encode()
    start = -(-(len(_MAGIC) + 8 + len(header)) // 64) * 64

    def write(f) -> None:
        f.write(_MAGIC + len(header).to_bytes(8, "little") + header)
        for spec, a in zip(specs, arrays.values(), strict=True):
            f.seek(start + spec["offset"])
            f.write(memoryview(a).cast("B") if a.nbytes else b"")
        f.truncate(start + offset)

    try:
        atomic_write(path, write, size=start + offset)
        return True
    except OSError as exc:  # read-only or full (NoRoom is not an OSError): the next start validates again
        logger.warning("could not write the image index cache %s: %s", path, exc)
        return False
    except NoRoom as exc:
        logger.warning("could not write the image index cache: %s", exc)
        return False


def _read_header(f) -> dict:
    head = f.read(len(_MAGIC) + 8)
    if head[: len(_MAGIC)] != _MAGIC:
        raise ValueError("not a fastmae index cache")
    return json.loads(f.read(int.from_bytes(head[len(_MAGIC) :], "little")))


def _cache_token(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return _read_header(f).get("token")
    except (OSError, ValueError):
        return None


def _load_cache(path: Path, root: str, kind: str) -> tuple[_Table | None, str | None]:
    """(table, token) of a cache file made for ``root``, or (None, None)."""
    try:
        buf = np.fromfile(path, dtype=np.uint8)
        with io.BytesIO(buf[:65536].tobytes()) as f:
            header = _read_header(f)
        if header.get("root") != root or header.get("kind") != kind or header.get("version") != _VERSION:
            return None, None
        hlen = int.from_bytes(buf[len(_MAGIC) : len(_MAGIC) + 8].tobytes(), "little")
        start = -(-(len(_MAGIC) + 8 + hlen) // 64) * 64
        if start > 65536:  # a header this long is not ours
            return None, None
        arrays = {}
        for spec in header["arrays"]:
            dtype = np.dtype(spec["dtype"])
            count = int(np.prod(spec["shape"]))
            arrays[spec["name"]] = np.frombuffer(buf, dtype, count, start + spec["offset"]).reshape(spec["shape"])
        values = {}
        for f in fields(_Table):
            if f"{f.name}.blob" in arrays:
                values[f.name] = StringTable(*(arrays[f"{f.name}.{p}"] for p in ("blob", "starts", "ends")))
            else:
                values[f.name] = arrays[f.name]
        return _Table(**values), header.get("token")
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring the unreadable image index cache %s (%s)", path, exc)
        return None, None


# ---------------------------------------------------------------------------------------------------- sources
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


def _is_image(name: bytes) -> bool:
    return name.lower().endswith(_EXTENSIONS)


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


def _walk(root: bytes, old: _Table | None, check: str) -> tuple[_Table, dict]:
    """Every folder under ``root`` in depth-first order (sub-folders by name), each with its image files by name;
    folders whose time is the cached one keep the cached listing and validation (``check="listing"``)."""
    now = time.time_ns()
    lookup, children = {}, {}
    if old is not None:
        lookup = {name: u for u, name in enumerate(old.units)}
        for u, parent in enumerate(old.unit_parent.tolist()):
            children.setdefault(parent, []).append(u)
    built, seen = _Builder(), set()
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
            entries, errors = _reuse(old, u_old)
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


def _fresh_entries(files: list[tuple[bytes, int, int]], old: _Table | None, u_old: int | None):
    """Entries of a listed folder: validation kept for files with their cached size and time."""
    names = [f[0] for f in files]
    entries = _entries(names, size=[f[1] for f in files], time=[f[2] for f in files])
    errors = {}
    if old is not None and u_old is not None and files:
        prev, prev_errors = _reuse(old, u_old)
        where = {name: k for k, name in enumerate(prev["names"])}
        for j, (name, size, mtime) in enumerate(files):
            k = where.get(name)
            if k is not None and prev["size"][k] == size and prev["time"][k] == mtime:
                for f in ("width", "height", "route"):
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


def _probe_file(item: tuple[bytes, int, int]) -> tuple[int, int, int] | str:
    path, offset, size = item
    try:
        return probe(read_bytes(path, offset, size))
    except Exception as exc:  # any decode failure: recorded and skipped, never fatal
        return _reason(exc)


def _probe_chunk(items: list[tuple[bytes, int, int]]) -> list:
    return [_probe_file(item) for item in items]


def _scan_shard(path: bytes) -> tuple[dict, dict[int, str]]:
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
    found = _probe_chunk([(path, off, size) for _, off, size, _ in rows])
    entries = _entries([r[0] for r in rows], offset=[r[1] for r in rows], size=[r[2] for r in rows],
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
            entries["width"][p], entries["height"][p], entries["route"][p] = res
    return errors


def _pool_run(fn, tasks: list, workers: int, show: bool, unit: str, sizes: list[int] | None = None) -> list:
    """``[fn(t) for t in tasks]`` over ``workers`` processes (forked: they inherit nothing they must re-import), a
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
        ctx = multiprocessing.get_context("fork")
        out: list = [None] * len(tasks)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            pending, nxt = {}, 0
            while nxt < len(tasks) or pending:
                while nxt < len(tasks) and len(pending) < 4 * workers:
                    pending[pool.submit(fn, tasks[nxt])] = nxt
                    nxt += 1
                done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in done:
                    k = pending.pop(fut)
                    out[k] = fut.result()
                    bar.update(sizes[k])
        return out
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------- building
def _workers(workers: int | None) -> int:
    """Validation processes: this rank's share of the cores it may use (at most 16)."""
    return workers or max(1, min(16, usable_cpus() // local_world_size()))


class _Solo:
    """The group of a one-process run."""

    rank, world_size, local_rank = 0, 1, 0

    def gather_objects(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass


def index_data(data: str | os.PathLike | None, cache: bool = True, workers: int | None = None, group=None,
               check: str = "listing") -> DataIndex:  # fmt: skip
    """Find and validate every image of a data set; what was learned is cached (see the module's notes).

    ``group``: the process group of a torchrun job (anything with ``rank``, ``world_size``, ``local_rank``,
    ``gather_objects`` and ``barrier``, such as :class:`fastmae.train.distributed.DistContext`); every rank must call
    this together, and the validation of new files is split between them. Files that do not decode are left out and
    listed in ``DataIndex.bad``; a missing path or no images at all is a one-line :class:`FastMAEError`.
    """
    if check not in CHECKS:
        raise FastMAEError(f"--index-check must be one of {', '.join(CHECKS)}, got {check!r}")
    t0 = time.perf_counter()
    group = group if group is not None and group.world_size > 1 else _Solo()
    root, shards, folder = _resolve_sources(bundled_images_dir() if data is None else data)
    kind = "tar" if folder is None else "folder"
    cache_path = _cache_file(root)
    old, token = _load_cache(cache_path, root, kind) if cache else (None, None)
    builder = _FolderBuild(os.fsencode(str(folder)), old, check) if folder is not None else _ShardBuild(shards, old)
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
    results = builder.work(mine, _workers(workers), show)
    if group.world_size > 1 and len(todo):
        for part in group.gather_objects(results):
            builder.merge(part)
    else:
        builder.merge(results)
    table = builder.table()

    # One writer per cache folder: rank 0, then the first rank of each machine that does not share rank 0's folder.
    stale = [i[2] for i in infos]
    token = infos[0][3]
    wrote, meta = False, {"version": _VERSION, "root": root, "kind": kind, "token": token}
    if cache and any(stale):
        if group.rank == 0 and fresh:
            wrote = _save_cache(cache_path, table, meta)
        group.barrier()
        if group.rank != 0 and group.local_rank == 0 and fresh and _cache_token(cache_path) != token:
            wrote = _save_cache(cache_path, table, meta)
    index = _index_of(table, root, kind)
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
    if index.bad:
        n = len(index.bad)
        listed = "; ".join(f"{k} ({r})" for k, r in index.bad[:3]) + ("; ..." if n > 3 else "")
        logger.warning("skipped %s that %s not decode: %s", f"{n} file" + ("s" if n > 1 else ""),
                       "do" if n > 1 else "does", listed)  # fmt: skip
    logger.info("indexed %d images under %s in %.1f s (cache %s)", len(index), root, index.stats["seconds"],
                index.stats["cache"])  # fmt: skip
    return index


class _FolderBuild:
    """A folder source: walked by every rank (one stat per folder when cached); files validated in chunks."""

    what = "files"

    def __init__(self, root: bytes, old: _Table | None, check: str):
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
        self.errors.update(_fill({"width": t.width, "height": t.height, "route": t.route}, positions, found))

    def table(self) -> _Table:
        t = self.table_
        err = sorted(self.errors.items())
        t.err_pos = np.array([p for p, _ in err], np.int64)
        t.err_text = StringTable.of(text.encode() for _, text in err)
        return t


class _ShardBuild:
    """A shard source: one stat per shard; a new or changed shard is parsed and validated by one process."""

    what = "shards"

    def __init__(self, shards: list[Path], old: _Table | None):
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
        found = _pool_run(_scan_shard, [self.shards[int(s)] for s in positions], workers, show, "shard")
        return dict(zip(positions.tolist(), found, strict=True))

    def merge(self, results: dict) -> None:
        self.done.update(results)

    def table(self) -> _Table:
        now = time.time_ns()
        built = _Builder()
        for s, path in enumerate(self.shards):
            mtime, size = self.stamps[s]
            entries, errors = self.done[s] if s in self.done else _reuse(self.old, self.reuse[s])
            built.add(path, -1 if mtime >= now - _RACY_NS else mtime, size, -1, entries, errors)
        return built.table()


def _index_of(table: _Table, root: str, kind: str) -> DataIndex:
    """The decodable entries of ``table`` as a :class:`DataIndex` (labels: ImageFolder classes, or ``.cls``)."""
    counts = np.diff(table.unit_start)
    unit_of = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    classes: list[str] = []
    if kind == "tar":
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
    good = table.route != BAD
    ids = None if good.all() else np.flatnonzero(good)
    pick = (lambda a: a) if ids is None else (lambda a: a[ids])
    index = DataIndex(
        root=root, tar=kind == "tar", units=table.units, unit_of=pick(unit_of),
        names=table.names if ids is None else table.names.take(ids), offsets=pick(table.offset),
        sizes=pick(table.size), labels=pick(labels).astype(np.int64, copy=False), widths=pick(table.width),
        heights=pick(table.height), routes=pick(table.route), classes=classes,
    )  # fmt: skip
    if ids is not None:
        errors = table.errors()
        whole = DataIndex(root, kind == "tar", table.units, unit_of, table.names, table.offset, table.size, labels,
                          table.width, table.height, table.route)  # fmt: skip
        index.bad = [(whole.key(p), errors.get(int(p), "does not decode")) for p in np.flatnonzero(~good)]
    return index
