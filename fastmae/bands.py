"""Bands: what the channels of the data are, bound to the weights like the architecture.

A :class:`BandSpec` holds the band count, their names (or None for unnamed bands), the per-band mean and std in the
data's **native units** (what the files hold: 0-255 for uint8, raw counts for uint16; normalised = (x - mean) / std),
the native dtype, an optional nodata value and how the statistics were chosen (``norm``: "imagenet", "auto",
"given"). It travels as ``to_dict()`` in a run's ``config.json`` and every checkpoint (``config["bands"]``, see
:func:`spec_from_config` / :func:`config_with_bands`), beside exported weights (:func:`write_sidecar`), and in a
transformers ``config.json`` (:data:`HF_FIELD`). :data:`IMAGENET` is the one place ImageNet's statistics live.

- :func:`select_bands`: ``--bands B02,B03,B04,B08`` (names of the data's bands, or 0-based indices) -> the subset.
- :func:`match_bands`: which data band feeds each band a checkpoint was trained on; a mismatch names both lists.
- :func:`parse_band_flags`: a run's ``--bands``, ``--nodata``, ``--norm``, ``--mean`` / ``--std`` checked before any
  data is read (the data-dependent rest is ``fastmae.train.data.databands``').
- :func:`plan_transfer` / :func:`transfer_state`: move pretrained weights (patch embedding, decoder output layer)
  to another band set (kept filters by name, new ones from the mean of the pretrained filters; without names,
  timm's ``adapt_input_conv``).

This module imports no torch at import time (the CLI parses ``--bands`` without it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import FastMAEError

DTYPES = ("uint8", "uint16", "int16", "float32")  # what fastmae reads; samples travel in these, cast on the device
NORMS = ("imagenet", "auto", "given")
CONFIG_KEY = "bands"  # config.json / checkpoint["config"] entry
HF_FIELD = "fastmae_bands"  # extra field of an exported transformers config.json
SIDECAR_SUFFIX = ".bands.json"  # beside exported timm / official weights: enc.pth -> enc.bands.json
_DTYPE_ALIASES = {"u8": "uint8", "u16": "uint16", "i16": "int16", "f32": "float32", "float": "float32",
                  "uint8": "uint8", "uint16": "uint16", "int16": "int16", "float32": "float32"}  # fmt: skip


def dtype_name(dtype, source: str = "data") -> str:
    """The canonical name (one of :data:`DTYPES`) of a numpy / torch dtype or a dtype name; anything else (complex,
    int64, float64, bool, ...) is a one-line error naming it and ``source`` (a file, a flag)."""
    text = str(dtype).removeprefix("torch.").removeprefix("<class 'numpy.").removesuffix("'>").lower()
    name = _DTYPE_ALIASES.get(text)
    if name is None:
        try:
            import numpy as np

            name = _DTYPE_ALIASES.get(np.dtype(dtype).name)
            text = np.dtype(dtype).name
        except TypeError:
            pass
    if name is None:
        raise FastMAEError(f"{source}: dtype {text} is not supported (fastmae reads {', '.join(DTYPES)})")
    return name


def _floats(values, what: str, count: int, names) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise FastMAEError(f"band {what} must be a list of numbers, got {values!r}") from exc
    if len(out) != count:
        raise FastMAEError(f"band {what} has {len(out)} values for {count} bands{_listed(names)}")
    for i, v in enumerate(out):
        if not math.isfinite(v):
            raise FastMAEError(f"band {what} of {_band(i, names)} is {v}, not a finite number")
    return out


def _band(i: int, names) -> str:
    return f"band {i} ({names[i]})" if names else f"band {i}"


def _listed(names) -> str:
    return f" ({','.join(names)})" if names else ""


@dataclasses.dataclass(frozen=True)
class BandSpec:
    """The bands of a dataset or of the weights trained on it.

    ``count`` bands; ``names`` (unique, no commas) or None; ``mean`` / ``std`` per band in the native units of
    ``dtype`` (both None while not yet computed); ``nodata``: a value to ignore in the statistics and to fill before
    normalising (NaN allowed); ``norm``: how the statistics were chosen (one of :data:`NORMS`, or None). Invalid
    values are a one-line :class:`FastMAEError` (a zero std names its band)."""

    count: int
    names: tuple[str, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dtype: str = "uint8"
    nodata: float | None = None
    norm: str | None = None

    def __post_init__(self):
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise FastMAEError(f"band count must be a positive integer, got {self.count!r}")
        if self.names is not None:
            names = tuple(self.names) if not isinstance(self.names, str) else (self.names,)
            bad = [n for n in names if not isinstance(n, str) or not n.strip() or "," in n or n != n.strip()]
            if bad:
                raise FastMAEError(f"band names must be non-empty strings without commas or edge spaces, got "
                                   f"{bad[0]!r}")  # fmt: skip
            if len(names) != self.count:
                raise FastMAEError(f"{len(names)} band names ({','.join(names)}) for {self.count} bands")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise FastMAEError(f"band names must be unique: {','.join(dup)} repeated in {','.join(names)}")
            object.__setattr__(self, "names", names)
        if (self.mean is None) != (self.std is None):
            raise FastMAEError("band statistics need both mean and std, or neither")
        if self.mean is not None:
            object.__setattr__(self, "mean", _floats(self.mean, "mean", self.count, self.names))
            std = _floats(self.std, "std", self.count, self.names)
            for i, s in enumerate(std):
                if s <= 0:
                    raise FastMAEError(f"band std of {_band(i, self.names)} is {s:g}: a std must be positive (a "
                                       "constant band cannot be normalised; drop it with --bands)")  # fmt: skip
            object.__setattr__(self, "std", std)
        object.__setattr__(self, "dtype", dtype_name(self.dtype, "bands"))
        if self.nodata is not None:
            try:
                object.__setattr__(self, "nodata", float(self.nodata))
            except (TypeError, ValueError) as exc:
                raise FastMAEError(f"nodata must be a number, got {self.nodata!r}") from exc
        if self.norm is not None and self.norm not in NORMS:
            raise FastMAEError(f"unknown band normalisation {self.norm!r}; choose one of {', '.join(NORMS)}")

    def __eq__(self, other) -> bool:  # a NaN nodata equals itself here (the generated __eq__ would say not)
        return isinstance(other, BandSpec) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    # ------------------------------------------------------------------ views
    @property
    def has_stats(self) -> bool:
        return self.mean is not None

    def label(self, i: int) -> str:
        """Band ``i`` in words: its name, else its index."""
        return self.names[i] if self.names else str(i)

    def describe(self) -> str:
        """One line for logs: ``13 uint16 bands B01..B12, mean ..., std ... (auto)``."""
        what = f"{self.count} {self.dtype} band{'s' if self.count > 1 else ''}{_listed(self.names)}"
        if self.has_stats:
            what += (f", mean {', '.join(f'{m:.4g}' for m in self.mean)}, std "
                     f"{', '.join(f'{s:.4g}' for s in self.std)}")  # fmt: skip
        if self.nodata is not None:
            what += f", nodata {self.nodata:g}"
        return what + (f" ({self.norm})" if self.norm else "")

    def affine(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(scale, bias) per band with ``x * scale + bias == (x - mean) / std`` on native values: the one fused
        affine of the device-side normalisation. For :data:`IMAGENET` these are, to the bit, today's
        ``1 / (255 * std)`` and ``-mean / std`` of the 0-1 statistics."""
        self._need_stats("normalise")
        return tuple(1 / s for s in self.std), tuple(-m / s for m, s in zip(self.mean, self.std, strict=True))

    def _need_stats(self, what: str) -> None:
        if not self.has_stats:
            raise FastMAEError(f"cannot {what}: the bands{_listed(self.names)} have no statistics yet")

    def with_stats(self, mean, std, norm: str | None = "given") -> BandSpec:
        """This spec with statistics (validated)."""
        return dataclasses.replace(self, mean=tuple(mean), std=tuple(std), norm=norm)

    def same_stats(self, other: BandSpec, rel: float = 1e-6) -> bool:
        """Whether ``other`` has these statistics (to ``rel``), band by band."""
        if not (self.has_stats and other.has_stats and self.count == other.count):
            return False
        return all(math.isclose(a, b, rel_tol=rel) for a, b in zip(self.mean + self.std, other.mean + other.std,
                                                                  strict=True))  # fmt: skip

    # ------------------------------------------------------------------ subsets
    def select(self, which, flag: str = "--bands", name_unnamed: bool = True) -> tuple[BandSpec, list[int]]:
        """See :func:`select_bands`."""
        return select_bands(self, which, flag, name_unnamed)

    def subset(self, indices: Sequence[int]) -> BandSpec:
        """The bands at ``indices`` (in that order), statistics included."""
        idx = list(indices)
        for i in idx:
            if not 0 <= i < self.count:
                raise FastMAEError(f"band index {i} is out of range for {self.count} bands{_listed(self.names)}")
        pick = (lambda seq: None if seq is None else tuple(seq[i] for i in idx))  # noqa: E731
        return dataclasses.replace(self, count=len(idx), names=pick(self.names), mean=pick(self.mean),
                                   std=pick(self.std))  # fmt: skip

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """JSON-safe (a NaN nodata is written as the string "nan")."""
        nodata = self.nodata
        if nodata is not None and math.isnan(nodata):
            nodata = "nan"
        return {"count": self.count, "names": list(self.names) if self.names else None,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "dtype": self.dtype, "nodata": nodata, "norm": self.norm}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "band spec") -> BandSpec:
        """The inverse of :meth:`to_dict`; ``source`` names where it was read in a one-line error."""
        if not isinstance(d, Mapping):
            raise FastMAEError(f"{source}: bands must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FastMAEError(f"{source}: unknown band field(s) {', '.join(unknown)}; known: "
                               f"{', '.join(sorted(known))}")  # fmt: skip
        fields = dict(d)
        if fields.get("count") is None:  # a hand-written file may leave the count to the lists
            sized = fields.get("names") or fields.get("mean")
            if not sized:
                raise FastMAEError(f"{source}: bands need a count, names or a mean list")
            fields["count"] = len(sized)
        for key in ("names", "mean", "std"):
            if fields.get(key) is not None and not isinstance(fields[key], list | tuple):
                raise FastMAEError(f"{source}: bands {key} must be a list, got {fields[key]!r}")
        if isinstance(fields.get("nodata"), str):
            fields["nodata"] = float(fields["nodata"]) if fields["nodata"].lower() == "nan" else fields["nodata"]
        try:
            return cls(**fields)
        except FastMAEError as exc:
            raise FastMAEError(f"{source}: {exc}") from None


def imagenet_rgb() -> BandSpec:
    """ImageNet's RGB statistics (torchvision's) in 8-bit units; unnamed bands, so that an RGB checkpoint moves to
    other band sets by timm's rule."""
    return BandSpec(3, mean=tuple(m * 255 for m in (0.485, 0.456, 0.406)),
                    std=tuple(s * 255 for s in (0.229, 0.224, 0.225)), dtype="uint8", norm="imagenet")  # fmt: skip


IMAGENET = imagenet_rgb()


# ------------------------------------------------------------------------------------------ --bands and matching
def parse_band_list(text: str | Sequence, flag: str = "--bands") -> list[int | str]:
    """``"B02,B03,3"`` -> ``["B02", "B03", 3]``: integers are 0-based indices, anything else a name."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    if not items or any(isinstance(t, str) and not t for t in items):
        raise FastMAEError(f"{flag} {text!r}: give comma-separated band names or 0-based indices, e.g. B04,B03,B02")
    return [int(t) if isinstance(t, str) and t.lstrip("-").isdigit() else t for t in items]


def select_bands(spec: BandSpec, which, flag: str = "--bands", name_unnamed: bool = True) -> tuple[BandSpec, list[int]]:
    """(the chosen bands, their indices in ``spec``) for ``which`` (a comma-separated string or a list of names and
    0-based indices). Names must be among ``spec``'s names; where the data's bands have no names, as many names as
    bands *name* them (indices 0..C-1) instead of selecting (unless ``name_unnamed`` is False). Out-of-range indices,
    unknown or repeated bands are a one-line error naming ``flag`` and the data's bands."""
    items = parse_band_list(which, flag)
    names_only = all(isinstance(t, str) for t in items)
    if names_only and spec.names is None and name_unnamed:
        if len(items) != spec.count:
            raise FastMAEError(f"{flag} names {len(items)} bands ({','.join(items)}) but the data's {spec.count} "
                               f"bands have no names: give {spec.count} names to name them, or 0-based indices to "
                               "select")  # fmt: skip
        return dataclasses.replace(spec, names=tuple(items)), list(range(spec.count))
    idx = []
    for t in items:
        if isinstance(t, int):
            if not 0 <= t < spec.count:
                raise FastMAEError(f"{flag}: band index {t} is out of range: the data has {spec.count} bands "
                                   f"(0..{spec.count - 1}){_listed(spec.names)}")  # fmt: skip
            idx.append(t)
        elif spec.names is None or t not in spec.names:
            have = ",".join(spec.names) if spec.names else f"{spec.count} unnamed bands"
            raise FastMAEError(f"{flag}: band {t} is not in the data's bands ({have})")
        else:
            idx.append(spec.names.index(t))
    dup = sorted({spec.label(i) for i in idx if idx.count(i) > 1})
    if dup:
        raise FastMAEError(f"{flag}: band {','.join(dup)} chosen twice")
    return spec.subset(idx), idx


def _names_text(spec: BandSpec) -> str:
    return ",".join(spec.names) if spec.names else f"{spec.count} unnamed bands"


def match_bands(checkpoint: BandSpec, data: BandSpec) -> list[int]:
    """For each band the ``checkpoint``'s weights were trained on, the index of the ``data`` band that feeds it
    (``data_batch[:, idx]`` is in the checkpoint's order). Named on both sides: every checkpoint name must be among
    the data's (a subset is selected, an order is permuted); otherwise the counts must agree. Anything else is a
    one-line error naming both lists."""
    if checkpoint.names and data.names:
        missing = [n for n in checkpoint.names if n not in data.names]
        if missing:
            raise FastMAEError(f"the checkpoint's bands ({_names_text(checkpoint)}) are not the data's "
                               f"({_names_text(data)}): {','.join(missing)} missing; choose the data's bands with "
                               "--bands")  # fmt: skip
        return [data.names.index(n) for n in checkpoint.names]
    if checkpoint.count != data.count:
        raise FastMAEError(f"the checkpoint has {checkpoint.count} bands ({_names_text(checkpoint)}), the data "
                           f"{data.count} ({_names_text(data)}); choose {checkpoint.count} of the data's bands with "
                           "--bands")  # fmt: skip
    return list(range(checkpoint.count))


# ------------------------------------------------------------------------------------------ the run's flags
NORM_CHOICES = ("auto", "imagenet")  # --norm, besides a JSON file


@dataclasses.dataclass(frozen=True)
class BandFlags:
    """``--bands``, ``--nodata``, ``--norm`` and ``--mean`` / ``--std`` as a run gave them, parsed and checked before
    any data is read (:func:`parse_band_flags`). ``bands``: names and 0-based indices; ``norm``: "auto", "imagenet",
    "given" (``stats`` holds them: from ``--mean`` / ``--std`` or a file, ``source`` says which) or None (the data
    decides: imagenet for 3 8-bit bands, else auto)."""

    bands: tuple[int | str, ...] | None = None
    nodata: float | None = None
    norm: str | None = None
    stats: BandSpec | None = None
    source: str | None = None

    @property
    def given(self) -> list[str]:
        """The flags given, in words (``--bands``, ``--nodata``, ``--norm auto``, ...), for messages."""
        out = ["--bands"] if self.bands is not None else []
        out += ["--nodata"] if self.nodata is not None else []
        if self.norm in NORM_CHOICES:
            out.append(f"--norm {self.norm}")
        elif self.norm == "given":
            out.append(self.source)
        return out

    @property
    def default(self) -> bool:
        """Nothing given: the data's bands, as stored, with the statistics the data calls for."""
        return not self.given


def _number_list(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in str(text).split(","))
    except ValueError:
        raise FastMAEError(f"{flag} {text!r}: give comma-separated numbers, one per band") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise FastMAEError(f"{flag} {text!r}: give finite numbers, one per band")
    return values


def read_stats_file(path: str | os.PathLike, flag: str = "--norm") -> BandSpec:
    """The statistics of a JSON file: ``{"mean": [...], "std": [...]}`` (``"names"``, ``"nodata"`` optional), a band
    file beside exported weights, or a run's ``config.json`` (its ``"bands"``). A one-line error for a file that
    does not read, or holds no statistics."""
    where = f"{flag} {path}"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise FastMAEError(f"{where}: {exc.strerror or exc} (give auto, imagenet or a JSON file)") from None
    except ValueError as exc:
        raise FastMAEError(f"{where} is not JSON ({str(exc).splitlines()[0]})") from None
    if isinstance(data, Mapping) and isinstance(data.get(CONFIG_KEY), Mapping):
        data = data[CONFIG_KEY]  # a run's config.json
    spec = BandSpec.from_dict(data, where)
    if not spec.has_stats:
        raise FastMAEError(f"{where} holds no statistics: it needs \"mean\" and \"std\" lists, one value per band")
    return spec


def parse_band_flags(bands=None, nodata=None, norm=None, mean=None, std=None) -> BandFlags:
    """Check the band flags of a run on their own (no data read yet): ``--bands`` parses; ``--norm`` is auto,
    imagenet or a JSON file with statistics; ``--mean`` and ``--std`` come together, as numbers, one per band (std
    positive) and not beside ``--norm``. Anything else is a one-line error naming the flag."""
    picked = tuple(parse_band_list(bands)) if bands is not None else None
    if nodata is not None:
        try:
            nodata = float(nodata)
        except (TypeError, ValueError):
            raise FastMAEError(f"--nodata must be a number (or nan), got {nodata!r}") from None
    if (mean is None) != (std is None):
        one, other = ("--mean", "--std") if mean is not None else ("--std", "--mean")
        raise FastMAEError(f"{one} needs {other} too: per-band means and standard deviations, one each per band")
    stats, source = None, None
    if mean is not None:
        if norm is not None:
            raise FastMAEError(f"--mean/--std and --norm {norm} both give the statistics: use one of them")
        m, s = _number_list(mean, "--mean"), _number_list(std, "--std")
        if len(m) != len(s):
            raise FastMAEError(f"--mean has {len(m)} values and --std {len(s)}: give one of each per band")
        stats, source = BandSpec(len(m), mean=m, std=s, dtype="float32", norm="given"), "--mean/--std"
        norm = "given"
    elif norm is not None and norm not in NORM_CHOICES:
        if not str(norm).lower().endswith(".json"):
            raise FastMAEError(f"--norm {norm}: choose auto, imagenet or a JSON file of per-band mean and std")
        stats, source, norm = read_stats_file(norm), f"--norm {norm}", "given"
        if nodata is None:
            nodata = stats.nodata
    return BandFlags(picked, nodata, norm, stats, source)


def band_flags_of(cfg) -> BandFlags:
    """:func:`parse_band_flags` of a run configuration's fields (``bands``, ``nodata``, ``norm``, ``mean``, ``std``)."""
    return parse_band_flags(*(getattr(cfg, f, None) for f in ("bands", "nodata", "norm", "mean", "std")))


# ------------------------------------------------------------------------------------------ configs and files
def spec_from_config(config: Mapping | None, source: str = "config") -> BandSpec | None:
    """The :class:`BandSpec` a run's config (``config.json``, or a checkpoint's ``config`` entry) holds under
    ``"bands"``, or None (runs before band specs, official files)."""
    if not config or config.get(CONFIG_KEY) is None:
        return None
    return BandSpec.from_dict(config[CONFIG_KEY], f"{source} bands")


def config_with_bands(config: Mapping, spec: BandSpec | None) -> dict:
    """``config`` with the ``"bands"`` entry that :func:`spec_from_config` reads back (removed for None)."""
    out = {k: v for k, v in config.items() if k != CONFIG_KEY}
    if spec is not None:
        out[CONFIG_KEY] = spec.to_dict()
    return out


def sidecar_path(weights: str | os.PathLike) -> Path:
    """The band file beside an exported weight file: ``enc.pth`` -> ``enc.bands.json``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + SIDECAR_SUFFIX)


def write_sidecar(weights: str | os.PathLike, spec: BandSpec | None) -> Path | None:
    """Write ``spec`` beside ``weights`` (atomically); with None, remove a stale band file left by an earlier export
    to the same name. Returns the path written, or None."""
    from .files import write_json

    path = sidecar_path(weights)
    if spec is None:
        path.unlink(missing_ok=True)
        return None
    write_json(path, spec.to_dict())
    return path


def read_sidecar(weights: str | os.PathLike) -> BandSpec | None:
    """The spec beside ``weights`` (see :func:`sidecar_path`), or None when there is no band file."""
    path = sidecar_path(weights)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FastMAEError(f"{path} could not be read: {str(exc).splitlines()[0]}") from exc
    return BandSpec.from_dict(data, str(path))


# ------------------------------------------------------------------------------------------ weights across band sets
@dataclasses.dataclass(frozen=True)
class BandTransfer:
    """How pretrained weights move from ``source`` bands to ``target`` bands (see :func:`plan_transfer`).

    ``rule``: ``"same"`` (nothing to do), ``"names"`` (``sources[i]`` is the source index of target band ``i``, or
    -1 for a new band) or ``"timm"`` (no names to match: timm's ``adapt_input_conv`` from ``source_count`` to
    ``target_count`` bands)."""

    rule: str
    source_count: int
    target_count: int
    source_names: tuple[str, ...] | None = None
    target_names: tuple[str, ...] | None = None
    sources: tuple[int, ...] = ()

    def _target_label(self, i: int) -> str:
        return self.target_names[i] if self.target_names else str(i)

    @property
    def kept(self) -> list[str]:
        """Target bands whose pretrained filters are kept as they are."""
        if self.rule == "same":
            return [self._target_label(i) for i in range(self.target_count)]
        return [self._target_label(i) for i, s in enumerate(self.sources) if s >= 0]

    @property
    def new(self) -> list[str]:
        """Target bands initialised from the mean of the pretrained filters."""
        return [self._target_label(i) for i, s in enumerate(self.sources) if s < 0]

    def describe(self) -> str:
        """One line for the log."""
        if self.rule == "same":
            return f"bands: the checkpoint's {self.source_count}, unchanged"
        if self.rule == "timm":
            how = "summed" if self.target_count == 1 else f"repeated, scaled by {self.source_count}/{self.target_count}"
            return (f"bands: {self.source_count} -> {self.target_count} without names to match: the filters {how} "
                    "(timm's adapt_input_conv); the decoder output follows")  # fmt: skip
        dropped = [n for n in (self.source_names or ()) if n not in (self.target_names or ())]
        return (f"bands kept from the checkpoint: {','.join(self.kept)}; new (mean of the pretrained filters, scaled "
                f"to their RMS norm): {','.join(self.new) or 'none'}; dropped: {','.join(dropped) or 'none'}")

    def to_dict(self) -> dict:
        return {"rule": self.rule, "kept": self.kept, "new": self.new, "source_count": self.source_count,
                "target_count": self.target_count}  # fmt: skip


def _count_names(bands, what: str) -> tuple[int, tuple[str, ...] | None]:
    if isinstance(bands, BandSpec):
        return bands.count, bands.names
    if isinstance(bands, int) and not isinstance(bands, bool):
        return bands, None
    if isinstance(bands, Sequence) and not isinstance(bands, str | bytes):
        spec = BandSpec(len(bands), names=tuple(bands))
        return spec.count, spec.names
    raise FastMAEError(f"{what} bands must be a BandSpec, a list of names or a count, got {bands!r}")


def plan_transfer(source, target) -> BandTransfer:
    """How weights trained on ``source`` bands serve ``target`` bands (each a :class:`BandSpec`, a list of names or
    a count).

    - Named on both sides: bands with the same name keep their filters (any order, any subset); the others are
      new. No name in common is a one-line error naming both lists (a naming slip such as B2 / B02 is likelier than
      a wish to keep nothing).
    - Same count with names missing on a side, or the same names: nothing changes.
    - Otherwise (no names to match): timm's ``adapt_input_conv`` rule (1 band: the filters summed; N: repeated
      cyclically and scaled by source/N).
    """
    sc, sn = _count_names(source, "source")
    tc, tn = _count_names(target, "target")
    if sn and tn:
        if sn == tn:
            return BandTransfer("same", sc, tc, sn, tn, tuple(range(tc)))
        sources = tuple(sn.index(n) if n in sn else -1 for n in tn)
        if all(s < 0 for s in sources):
            raise FastMAEError(f"no band of the data ({','.join(tn)}) is among the checkpoint's bands "
                               f"({','.join(sn)}): name the bands alike (--bands) to keep their filters")  # fmt: skip
        return BandTransfer("names", sc, tc, sn, tn, sources)
    if sc == tc:
        return BandTransfer("same", sc, tc, sn, tn, tuple(range(tc)))
    return BandTransfer("timm", sc, tc, sn, tn)


EMBED_KEY = "patch_embed.proj.weight"  # [D, C, p, p]
PRED_KEYS = ("decoder_pred.weight", "decoder_pred.bias")  # [p*p*C, Dd], [p*p*C]: rows in (row, col, band) order


def transfer_state(sd: Mapping, transfer: BandTransfer) -> dict:
    """``sd`` (official MAE / timm ViT names) with its band-dependent tensors moved by ``transfer``: the patch
    embedding ``patch_embed.proj.weight`` [D, C, p, p] and, when present, the decoder's output layer
    ``decoder_pred.weight`` [p*p*C, Dd] / ``.bias`` (rows flattened as (row, col, band), as patchify lays a patch
    out), so that continued pretraining predicts the new band set. Other entries are returned as they are.

    **Named rule.** A kept band's filter is copied bit for bit. A new band's filter, for each output unit d, is the
    mean M_d of the pretrained filters W_d,c over the source bands c, rescaled to their RMS norm r_d
    (r_d^2 = mean_c ||W_d,c||^2): ``new_d = M_d * r_d / ||M_d||``. Why: on inputs normalised per band (zero mean, unit
    variance, as the per-band statistics make them) and uncorrelated across bands and pixels, band c adds
    ||W_d,c||^2 to the variance of the activation y_d = sum_c W_d,c . x_c + b_d. The mean filter alone would add
    ||M_d||^2, which is ~1/C of a band's share for filters that are not aligned (and it shrinks as C grows); scaled
    to r_d it adds r_d^2, the average share of a pretrained band. So a target of k kept and m new bands has variance
    sum_kept ||W_d,c||^2 + m r_d^2: the source's variance per band, and, for k + m = C, the source's variance itself
    on average over which bands were kept (exactly, when the kept filters have the mean norm). The direction M_d is
    what the pretrained bands agree on, the right guess for a band correlated with them. The decoder's rows follow
    the same rule for each pixel position (a new band's row: the mean of the source bands' rows at that position
    scaled to their RMS norm; its bias: the mean of their biases), so that a new band's prediction starts as the
    bands' consensus at a pretrained band's scale.

    **timm rule** (no names to match). The patch embedding is timm's ``adapt_input_conv(target, w)`` (1 band: the
    filters summed, exact on a gray image standing for equal bands; N bands: repeated and scaled by C/N, exact when
    the bands are equal). The decoder's output follows the same mapping on the output side: a 1-band prediction is
    the mean of the C predictions, N bands repeat the source's predictions in timm's cyclic order (band i predicted
    as band i mod C).
    """
    if transfer.rule == "same":
        return dict(sd)
    if EMBED_KEY not in sd:
        raise FastMAEError(f"state_dict has no {EMBED_KEY}: not a ViT/MAE checkpoint")
    out = dict(sd)
    w = sd[EMBED_KEY]
    if w.shape[1] != transfer.source_count:
        raise FastMAEError(f"the checkpoint's patch embedding takes {w.shape[1]} bands, its band spec says "
                           f"{transfer.source_count}")  # fmt: skip
    out[EMBED_KEY] = _move(w, transfer, conv_scale=True)
    if all(k in sd for k in PRED_KEYS):
        weight, bias = sd[PRED_KEYS[0]], sd[PRED_KEYS[1]]
        rows, dd = weight.shape
        c = transfer.source_count
        if rows % c:
            raise FastMAEError(f"decoder_pred has {rows} rows, not a multiple of {c} bands")
        pp = rows // c
        new_w = _move(weight.reshape(pp, c, dd, 1), transfer, conv_scale=False)
        new_b = _move(bias.reshape(pp, c, 1, 1), transfer, conv_scale=False, is_bias=True)
        out[PRED_KEYS[0]] = new_w.reshape(pp * transfer.target_count, dd).contiguous()
        out[PRED_KEYS[1]] = new_b.reshape(pp * transfer.target_count).contiguous()
    return out


def _move(w, transfer: BandTransfer, conv_scale: bool, is_bias: bool = False):
    """``w`` [O, C, J, K] with bands on dim 1 -> [O, C', J, K] by ``transfer``. ``conv_scale``: an input layer
    (timm's ``adapt_input_conv``); else an output layer (the same band mapping on the output side). ``is_bias``: a
    new band takes the plain mean (no norm to match). New bands are computed in at least fp32."""
    import torch

    C, T = transfer.source_count, transfer.target_count
    wide = torch.promote_types(w.dtype, torch.float32)
    if transfer.rule == "timm":
        from timm.models import adapt_input_conv

        try:
            if conv_scale:
                return adapt_input_conv(T, w) if C == 3 else adapt_input_conv(T, w, base_chans=C)
        except TypeError as exc:  # an older timm: base_chans came later
            raise FastMAEError(f"moving {C} unnamed bands to {T} needs a timm whose adapt_input_conv takes "
                               "base_chans (pip install -U timm), or band names on both sides") from exc
        if T == 1:  # the output side of the same mapping: the mean prediction, or the predictions repeated
            return w.to(wide).mean(dim=1, keepdim=True).to(w.dtype)
        return w.repeat(1, -(-T // C), 1, 1)[:, :T]
    src = w.to(wide)
    parts = []
    new = None
    for s in transfer.sources:
        if s >= 0:
            parts.append(w[:, s : s + 1])  # bit for bit
            continue
        if new is None:
            mean = src.mean(dim=1, keepdim=True)  # [O, 1, J, K]
            if is_bias:
                new = mean.to(w.dtype)
            else:
                rms = src.pow(2).sum(dim=(2, 3), keepdim=True).mean(dim=1, keepdim=True).sqrt()  # r per output unit
                norm = mean.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
                new = torch.where(norm > 0, mean * rms / norm.clamp_min(1e-30), mean).to(w.dtype)
        parts.append(new)
    return torch.cat(parts, dim=1)
