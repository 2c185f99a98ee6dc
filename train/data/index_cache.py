"""The image index's cache: what a start learned about a data set (its folders or shards, their files or samples,
each one's size, time, label, pixel size, decode route, band count and dtype, and why the bad ones fail), as numpy
arrays in one binary file per data set (``$FASTMAE_CACHE/index-<hash>.bin``, default ``~/.cache/fastmae``), written
atomically and loaded in one read. :mod:`.index_build` makes and reuses the :class:`Table`; :mod:`.index` turns it
into a ``DataIndex``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from fastmae.errors import NoRoom
from fastmae.files import atomic_write

from .decode import BAD, UNKNOWN

logger = logging.getLogger("fastmae.data")

MAGIC = b"FASTMAE-INDEX-2\n"
VERSION = 4  # of what the cache's entries mean (routes, bands, reasons): a cache of another version is validated anew
NO_DTYPE = 255  # the dtype code of an entry that is not (yet) a readable image


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


# ------------------------------------------------------------------------------------------- the cache's content
@dataclass
class Table:
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
    bands: np.ndarray  # [E] int32 bands as the route reads them (3 for the RGB routes)
    dtype: np.ndarray  # [E] uint8 code of the pixels' dtype (rasters.DTYPES; uint8 for the RGB routes)
    alt_route: np.ndarray  # [E] uint8 the RGB route of a raster that Pillow also reads (16-bit PNG, TIFF), else BAD
    err_pos: np.ndarray  # [K] int64 entries with a recorded reason
    err_text: StringTable  # [K]

    ENTRY_FIELDS = ("offset", "size", "time", "label", "width", "height", "route", "bands", "dtype", "alt_route")
    PROBED = ("width", "height", "route", "bands", "dtype", "alt_route")  # what validation finds

    def unit_entries(self, u: int) -> tuple[int, int]:
        return int(self.unit_start[u]), int(self.unit_start[u + 1])

    def errors(self) -> dict[int, str]:
        return {int(p): self.err_text[k].decode(errors="replace") for k, p in enumerate(self.err_pos)}


ENTRY_DTYPES = {"offset": np.int64, "size": np.int64, "time": np.int64, "label": np.int64, "width": np.int32,
                "height": np.int32, "route": np.uint8, "bands": np.int32, "dtype": np.uint8,
                "alt_route": np.uint8}  # fmt: skip


def entries_of(names: list[bytes], **columns) -> dict:
    """A unit's entries as arrays (the dtypes of :class:`Table`)."""
    n = len(names)
    defaults = {"offset": -1, "label": -1, "route": UNKNOWN, "dtype": NO_DTYPE, "alt_route": BAD}
    out = {"names": StringTable.of(names)}
    for name, dtype in ENTRY_DTYPES.items():
        values = columns.get(name)
        out[name] = np.full(n, defaults.get(name, 0), dtype) if values is None else np.asarray(values, dtype)
    return out


class TableBuilder:
    """Assembles a :class:`Table` unit by unit: entries reused from the cached table, or new ones."""

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

    def table(self) -> Table:
        rows = self.unit_rows
        counts = np.array([len(p["names"]) for p in self.parts], np.int64)
        cat = {f: (np.concatenate([p[f] for p in self.parts]) if self.parts else np.empty(0, dt))
               for f, dt in ENTRY_DTYPES.items()}  # fmt: skip
        err = sorted(self.errors.items())
        return Table(
            units=StringTable.of(r[0] for r in rows),
            unit_time=np.array([r[1] for r in rows], np.int64), unit_size=np.array([r[2] for r in rows], np.int64),
            unit_parent=np.array([r[3] for r in rows], np.int32),
            unit_start=np.r_[0, np.cumsum(counts)].astype(np.int64),
            names=StringTable.concat([p["names"] for p in self.parts]), **cat,
            err_pos=np.array([p for p, _ in err], np.int64), err_text=StringTable.of(t.encode() for _, t in err),
        )  # fmt: skip


def reuse(old: Table, u: int) -> tuple[dict, dict[int, str]]:
    """Unit ``u``'s entries of the cached table (views) and their reasons (by position in the unit)."""
    a, b = old.unit_entries(u)
    entries = {"names": old.names.slice(a, b), **{f: getattr(old, f)[a:b] for f in Table.ENTRY_FIELDS}}
    lo, hi = np.searchsorted(old.err_pos, [a, b])
    errors = {int(old.err_pos[k]) - a: old.err_text[k].decode(errors="replace") for k in range(lo, hi)}
    return entries, errors


# ---------------------------------------------------------------------------------------------- the cache file
def cache_folder() -> Path:
    return Path(os.environ.get("FASTMAE_CACHE", Path.home() / ".cache" / "fastmae"))


def cache_file(root: str) -> Path:
    return cache_folder() / f"index-{hashlib.sha1(root.encode()).hexdigest()[:16]}.bin"


def _arrays(table: Table) -> dict[str, np.ndarray]:
    out = {}
    for f in fields(table):
        value = getattr(table, f.name)
        if isinstance(value, StringTable):
            out.update({f"{f.name}.blob": value.blob, f"{f.name}.starts": value.starts, f"{f.name}.ends": value.ends})
        else:
            out[f.name] = value
    return out


def save_cache(path: Path, table: Table, meta: dict) -> bool:
    """Write the cache atomically (temp file + rename); a folder that cannot take it costs a warning only."""
    arrays = {k: np.ascontiguousarray(v) for k, v in _arrays(table).items()}
    specs, offset = [], 0
    for name, a in arrays.items():
        specs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
        offset += -(-a.nbytes // 64) * 64
    header = json.dumps({**meta, "arrays": specs}).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // 64) * 64

    def write(f) -> None:
        f.write(MAGIC + len(header).to_bytes(8, "little") + header)
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
    head = f.read(len(MAGIC) + 8)
    if head[: len(MAGIC)] != MAGIC:
        raise ValueError("not a fastmae index cache")
    return json.loads(f.read(int.from_bytes(head[len(MAGIC) :], "little")))


def cache_token(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return _read_header(f).get("token")
    except (OSError, ValueError):
        return None


def load_cache(path: Path, root: str, source: str) -> tuple[Table | None, str | None]:
    """(table, token) of a cache file made for ``root``, or (None, None)."""
    try:
        buf = np.fromfile(path, dtype=np.uint8)
        with io.BytesIO(buf[:65536].tobytes()) as f:
            header = _read_header(f)
        if header.get("root") != root or header.get("kind") != source or header.get("version") != VERSION:
            return None, None
        hlen = int.from_bytes(buf[len(MAGIC) : len(MAGIC) + 8].tobytes(), "little")
        start = -(-(len(MAGIC) + 8 + hlen) // 64) * 64
        if start > 65536:  # a header this long is not ours
            return None, None
        arrays = {}
        for spec in header["arrays"]:
            dtype = np.dtype(spec["dtype"])
            count = int(np.prod(spec["shape"]))
            arrays[spec["name"]] = np.frombuffer(buf, dtype, count, start + spec["offset"]).reshape(spec["shape"])
        values = {}
        for f in fields(Table):
            if f"{f.name}.blob" in arrays:
                values[f.name] = StringTable(*(arrays[f"{f.name}.{p}"] for p in ("blob", "starts", "ends")))
            else:
                values[f.name] = arrays[f.name]
        return Table(**values), header.get("token")
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring the unreadable image index cache %s (%s)", path, exc)
        return None, None
