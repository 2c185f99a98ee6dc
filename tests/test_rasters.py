"""Multi-band rasters: the readers (.npy, TIFF / GeoTIFF, PNG 8 and 16 bits) against numpy / tifffile / hand-built
files, from paths and from bytes; the reasons for what is not read; the synthetic GeoTIFF generator; the pack store."""

import errno
import importlib.util
import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from fastmae.train.data import pack as pack_mod
from fastmae.train.data import rasters
from fastmae.train.data.pack import PackedTiles, list_rasters, pack
from fastmae.train.data.rasters import (
    RasterError,
    check_raster,
    probe_raster,
    raster_format,
    read_raster,
    read_raster_rows,
)

from fastmae import FastMAEError

DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "float32": np.float32}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "make_multispectral.py"


def _pixels(dtype, shape, seed=0):
    """Values spanning the dtype's range (floats: negative, large, fractional)."""
    rng = np.random.default_rng(seed)
    if dtype == np.float32:
        return (rng.normal(0, 1000, shape)).astype(np.float32)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)


def _chw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy()


def _sources(path: Path):
    """The same file as a path and as bytes (what a webdataset member is)."""
    return [path, path.read_bytes(), bytearray(path.read_bytes())]


def _has_imagecodecs() -> bool:
    return importlib.util.find_spec("imagecodecs") is not None


# --------------------------------------------------------------------------------------------------- .npy
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["hw", "hwc", "chw", "hwc-fortran", "chw-bigendian"])
def test_npy_round_trip_every_dtype_and_layout(tmp_path, dtype, layout):
    h, w, c = 7, 11, 5
    chw = _pixels(DTYPES[dtype], (c, h, w))
    arr = {"hw": chw[0], "hwc": chw.transpose(1, 2, 0), "chw": chw,
           "hwc-fortran": np.asfortranarray(chw.transpose(1, 2, 0)),
           "chw-bigendian": chw.astype(np.dtype(DTYPES[dtype]).newbyteorder(">"))}[layout]  # fmt: skip
    want = chw[:1] if layout == "hw" else chw
    path = tmp_path / "a.npy"
    np.save(path, arr)
    for source in _sources(path):
        info = probe_raster(source)
        assert (info.format, info.shape, info.dtype) == ("npy", want.shape, dtype)
        got = read_raster(source)
        assert str(got.dtype) == f"torch.{dtype}"
        np.testing.assert_array_equal(_chw(got), want)
        assert check_raster(source) == info
        for y0, y1 in ((0, h), (2, 5), (6, 7)):  # a crop's rows: read alone (pread) from a file, sliced otherwise
            rows = read_raster_rows(source, y0, y1)
            assert rows.dtype == got.dtype and rows.shape == (want.shape[0], y1 - y0, w)
            np.testing.assert_array_equal(_chw(rows), want[:, y0:y1])


def test_npy_rows_of_a_truncated_file_are_a_raster_error(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, _pixels(np.uint16, (20, 30, 13)))
    path.write_bytes(path.read_bytes()[:-30 * 13 * 2 * 3])  # the last three rows gone
    whole = _pixels(np.uint16, (20, 30, 13)).transpose(2, 0, 1)
    np.testing.assert_array_equal(_chw(read_raster_rows(path, 0, 17)), whole[:, :17])  # the rows that are there
    with pytest.raises(RasterError, match=r"\.npy data is truncated \(rows 10-20 of band 0: 5460 of 7800 bytes\)"):
        read_raster_rows(path, 10, 20)


def test_npy_from_a_path_is_memory_mapped_and_the_file_untouched(tmp_path):
    arr = _pixels(np.uint16, (20, 30, 13))
    path = tmp_path / "tile.npy"
    np.save(path, arr)
    t = read_raster(path)
    assert t.shape == (13, 20, 30) and t.stride() == (1, 30 * 13, 13)  # a view of H x W x C memory
    t[0, 0, 0] = 7  # copy on write: writable, the file keeps its bytes
    np.testing.assert_array_equal(np.load(path), arr)


def test_npy_layout_rule_first_axis_smaller_than_last_is_bands_first(tmp_path):
    for shape, want in [((3, 5, 7), (3, 5, 7)), ((5, 7, 3), (3, 5, 7)), ((4, 4, 4), (4, 4, 4))]:
        np.save(tmp_path / "x.npy", np.zeros(shape, np.uint8))
        assert probe_raster(tmp_path / "x.npy").shape == want


# --------------------------------------------------------------------------------------------------- TIFF
def _tiff(path, chw, compression=None, planar=True, predictor=False, **kw):
    """``chw`` [C, H, W] (or [H, W]: one band) as a TIFF, bands planar or contiguous (chunky)."""
    data = chw if planar or chw.ndim == 2 else chw.transpose(1, 2, 0)
    config = None if chw.ndim == 2 else "separate" if planar else "contig"
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig=config, compression=compression,
                     predictor=predictor if compression else None, metadata=None, **kw)
    return path


COMPRESSIONS = [None, "zlib", "lzma", pytest.param("lzw", marks=pytest.mark.skipif(
    not _has_imagecodecs(), reason="LZW needs imagecodecs")), pytest.param("zstd", marks=pytest.mark.skipif(
    not _has_imagecodecs(), reason="zstd needs imagecodecs"))]  # fmt: skip


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("planar", [True, False], ids=["planar", "contig"])
def test_tiff_round_trip_compressions_and_layouts(tmp_path, compression, planar):
    chw = _pixels(np.uint16, (13, 19, 23))
    path = _tiff(tmp_path / "t.tif", chw, compression, planar, predictor=compression is not None)
    for source in _sources(path):
        info = probe_raster(source)
        assert (info.format, info.shape, info.dtype, info.geo) == ("tiff", (13, 19, 23), "uint16", False)
        np.testing.assert_array_equal(_chw(read_raster(source)), tifffile.imread(path).reshape(chw.shape)
                                      if planar else tifffile.imread(path).transpose(2, 0, 1))  # fmt: skip
        np.testing.assert_array_equal(_chw(read_raster(source)), chw)
        assert check_raster(source) == info


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bands", [1, 2, 4])
def test_tiff_every_dtype_and_band_count(tmp_path, dtype, bands):
    chw = _pixels(DTYPES[dtype], (bands, 9, 14), seed=bands)
    path = _tiff(tmp_path / "t.tif", chw if bands > 1 else chw[0], "zlib", planar=bands > 1)
    got = read_raster(path.read_bytes())
    assert got.shape == (bands, 9, 14) and str(got.dtype) == f"torch.{dtype}"
    np.testing.assert_array_equal(_chw(got), chw)


def test_tiff_bands_as_pages_and_big_endian(tmp_path):
    chw = _pixels(np.int16, (3, 8, 10))
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tw:
        for band in chw:
            tw.write(band, photometric="minisblack", metadata=None)
    assert probe_raster(tmp_path / "pages.tif").shape == (3, 8, 10)
    np.testing.assert_array_equal(_chw(read_raster(tmp_path / "pages.tif")), chw)
    tifffile.imwrite(tmp_path / "be.tif", chw, byteorder=">", photometric="minisblack", planarconfig="separate")
    np.testing.assert_array_equal(_chw(read_raster(tmp_path / "be.tif")), chw)


def test_geotiff_reads_as_plain_pixels_with_its_keys_seen(tmp_path):
    chw = _pixels(np.uint16, (4, 12, 12))
    tags = [(33550, "d", 3, (10.0, 10.0, 0.0), True), (33922, "d", 6, (0, 0, 0, 5e5, 4e6, 0), True),
            (34735, "H", 8, (1, 1, 0, 1, 1024, 0, 1, 1), True)]  # fmt: skip
    path = _tiff(tmp_path / "geo.tif", chw, "zlib", extratags=tags)
    info = probe_raster(path)
    assert info.geo and info.names == ()
    np.testing.assert_array_equal(_chw(read_raster(path)), chw)


def test_tiff_refusals_name_the_reason(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "ts.tif", np.zeros((2, 3, 8, 8), np.uint8), photometric="minisblack",
                     metadata={"axes": "TCYX"}, imagej=False)  # fmt: skip
    reason = check_raster(tmp_path / "ts.tif")
    assert isinstance(reason, str) and "more than one axis besides Y and X" in reason
    # a compression whose codec is missing: the reason names it and the package
    path = _tiff(tmp_path / "z.tif", _pixels(np.uint16, (2, 8, 8)), "zlib")

    def no_codec(*a, **k):
        raise KeyError("<COMPRESSION.ADOBE_DEFLATE: 8> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", no_codec)
    reason = check_raster(path)
    assert "ADOBE_DEFLATE needs the imagecodecs package" in reason and "fastmae[tiff]" in reason


# ---------------------------------------------------------------------------------------------------- PNG
def png_bytes(arr: np.ndarray) -> bytes:
    """A PNG written by hand (IHDR, one zlib IDAT, IEND): grey, grey+alpha, RGB or RGBA, 8 or 16 bits."""
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    depth = 16 if arr.dtype == np.uint16 else 8
    raw = arr.astype(">u2" if depth == 16 else "u1").reshape(h, -1).view(np.uint8)
    body = b"".join(b"\x00" + raw[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


PNG_DECODERS = ("torchcodec", "torchvision", "pillow")


@pytest.mark.parametrize("decoder", PNG_DECODERS)
@pytest.mark.parametrize("bands", [1, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
def test_png_keeps_16_bits_with_every_decoder(tmp_path, monkeypatch, decoder, bands, dtype):
    from fastmae.train.data import decode

    if decode.decoder_unavailable_reason(decoder):
        pytest.skip(decode.decoder_unavailable_reason(decoder))
    monkeypatch.setenv("FASTMAE_DECODER", decoder)
    hwc = _pixels(dtype, (6, 9, bands), seed=bands)
    data = png_bytes(hwc[..., 0] if bands == 1 else hwc)
    (tmp_path / "x.png").write_bytes(data)
    for source in (data, tmp_path / "x.png"):
        assert probe_raster(source) == rasters.RasterInfo("png", bands, 6, 9, np.dtype(dtype).name)
        if decoder == "pillow" and dtype == np.uint16 and bands > 1:  # Pillow would keep 8 of the 16 bits
            assert "16-bit colour PNG needs TorchCodec or torchvision.io" in check_raster(source)
            continue
        got = read_raster(source)
        assert got.dtype == (torch.uint16 if dtype == np.uint16 else torch.uint8)
        np.testing.assert_array_equal(_chw(got), hwc.transpose(2, 0, 1))


def test_palette_png_is_left_to_the_rgb_route(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).convert("P").save(tmp_path / "p.png")
    assert "palette PNG" in check_raster(tmp_path / "p.png")


# -------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("dtype", ["complex64", "int64", "bool", "float64", "int32", "int8"])
def test_unsupported_dtypes_are_refused_naming_the_dtype(tmp_path, dtype):
    arr = np.zeros((5, 6, 3), dtype=dtype)
    np.save(tmp_path / "a.npy", arr)
    for source in (tmp_path / "a.npy", (tmp_path / "a.npy").read_bytes()):
        reason = check_raster(source)
        assert isinstance(reason, str) and f"dtype {dtype}" in reason and "uint16" in reason
        with pytest.raises(RasterError, match=f"dtype {dtype}"):
            probe_raster(source)
    if dtype not in ("bool",):
        tifffile.imwrite(tmp_path / "a.tif", arr.transpose(2, 0, 1), photometric="minisblack", planarconfig="separate")
        assert f"dtype {dtype}" in check_raster(tmp_path / "a.tif")


def test_a_nan_only_band_is_refused_and_some_nans_are_not(tmp_path):
    arr = _pixels(np.float32, (4, 8, 8))
    arr[2] = np.nan
    np.save(tmp_path / "nan.npy", arr)
    assert check_raster(tmp_path / "nan.npy") == "band 2 (from 0) is NaN everywhere"
    arr[2] = 1.0
    arr[1, :3] = np.nan
    np.save(tmp_path / "some.npy", arr)
    assert check_raster(tmp_path / "some.npy") == probe_raster(tmp_path / "some.npy")


def test_broken_files_give_reasons_never_exceptions(tmp_path):
    good = tmp_path / "good.tif"
    _tiff(good, _pixels(np.uint16, (13, 40, 40)), "zlib")
    np.save(tmp_path / "good.npy", _pixels(np.uint16, (40, 40, 13)))
    cases = {
        "empty.tif": b"",
        "garbage.tif": np.random.default_rng(0).bytes(600),
        "truncated.tif": good.read_bytes()[: len(good.read_bytes()) // 2],
        "truncated.npy": (tmp_path / "good.npy").read_bytes()[:-100],
        "header-only.npy": (tmp_path / "good.npy").read_bytes()[:128],
        "4d.npy": _npy_bytes(np.zeros((2, 3, 4, 5), np.uint8)),
        "truncated.png": png_bytes(_pixels(np.uint16, (20, 20)))[:-30],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        for source in (tmp_path / name, data):
            reason = check_raster(source)
            assert isinstance(reason, str) and reason and "\n" not in reason, (name, reason)
    assert check_raster(tmp_path / "empty.tif") == "empty file"
    assert "truncated" in check_raster(tmp_path / "truncated.npy")
    assert "H x W, H x W x C or C x H x W" in check_raster(tmp_path / "4d.npy")
    assert raster_format(tmp_path / "garbage.tif") is None


def _npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ the example
def _example():
    spec = importlib.util.spec_from_file_location("make_multispectral", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_multispectral_writes_real_geotiffs_the_readers_read(tmp_path, capsys):
    ex = _example()
    assert ex.main([str(tmp_path / "tif"), "--count", "6", "--size", "48", "--classes", "3"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert "synthetic" in ex.__doc__.lower() and "nothing downloaded" in ex.__doc__
    paths, labels, classes = list_rasters(tmp_path / "tif")
    assert classes == ["cropland", "forest", "water"] and labels == [0, 0, 1, 1, 2, 2]
    meta = json.loads((tmp_path / "tif" / "bands.json").read_text())
    assert meta["synthetic"] is True and meta["bands"] == list(ex.BANDS) and "B8A" in meta["bands"]
    for p in paths:
        info = check_raster(p)
        assert info == rasters.RasterInfo("tiff", 13, 48, 48, "uint16", True, ex.BANDS)
        with tifffile.TiffFile(p) as tif:
            page = tif.pages[0]
            assert page.compression.name == "ADOBE_DEFLATE" and page.predictor == 2 and tif.is_geotiff
            assert page.tags["ModelPixelScaleTag"].value == (10.0, 10.0, 0.0)
            assert page.tags["GeoKeyDirectoryTag"].value[-1] == ex.EPSG
            assert "SYNTHETIC" in page.description
            np.testing.assert_array_equal(_chw(read_raster(p)), tif.asarray().transpose(2, 0, 1))
    # the same files for the same seed, npy and planar alike
    ex.generate(tmp_path / "npy", count=2, size=48, classes=3, npy=True)
    ex.generate(tmp_path / "band", count=2, size=48, classes=3, interleave="band")
    for name in ("water/water_00000", "forest/forest_00001"):
        a = read_raster(tmp_path / "tif" / f"{name}.tif")
        np.testing.assert_array_equal(_chw(a), _chw(read_raster(tmp_path / "npy" / f"{name}.npy")))
        np.testing.assert_array_equal(_chw(a), _chw(read_raster(tmp_path / "band" / f"{name}.tif")))
        with tifffile.TiffFile(tmp_path / "band" / f"{name}.tif") as tif:
            assert tif.pages[0].planarconfig == 2


def test_make_multispectral_nodata_edges(tmp_path):
    ex = _example()
    ex.generate(tmp_path, count=4, size=40, classes=2, nodata_every=2)
    paths = list_rasters(tmp_path)[0]
    zeros = [int((_chw(read_raster(p)) == 0).all(0).sum()) for p in paths]
    assert sum(z > 0 for z in zeros) == 2  # tiles 1 and 3
    with tifffile.TiffFile(next(p for p, z in zip(paths, zeros, strict=True) if z)) as tif:
        assert tif.pages[0].tags[42113].value == "0"


# ------------------------------------------------------------------------------------------- the pack store
@pytest.fixture
def tile_folder(tmp_path):
    """Two classes of 13-band uint16 tiles, TIFF (deflate, planar and contiguous) and .npy, plus three misfits."""
    root = tmp_path / "data"
    for k, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        _tiff(root / cls / "t0.tif", _pixels(np.uint16, (13, 16, 20), 10 * k), "zlib", planar=True, predictor=True)
        _tiff(root / cls / "t1.tif", _pixels(np.uint16, (13, 16, 20), 10 * k + 1), "zlib", planar=False)
        np.save(root / cls / "t2.npy", _pixels(np.uint16, (16, 20, 13), 10 * k + 2))
    good = (root / "a" / "t0.tif").read_bytes()
    (root / "a" / "broken.tif").write_bytes(good[: len(good) // 3])
    np.save(root / "b" / "small.npy", _pixels(np.uint16, (12, 20, 13)))
    np.save(root / "b" / "float.npy", _pixels(np.float32, (16, 20, 13)))
    return root


def test_pack_reads_back_what_tifffile_and_numpy_read(tile_folder, tmp_path):
    done = pack(tile_folder, tmp_path / "p.pack")
    paths, labels, classes = list_rasters(tile_folder)
    assert done.count == 6 and done.shape == (13, 16, 20) and done.dtype == "uint16"
    assert {Path(k).name for k, _ in done.skipped} == {"broken.tif", "small.npy", "float.npy"}
    reasons = dict((Path(k).name, r) for k, r in done.skipped)
    assert "not the pack's 13x16x20 uint16" in reasons["small.npy"] and "float32" in reasons["float.npy"]
    packed = PackedTiles(tmp_path / "p.pack")
    assert len(packed) == 6 and packed.classes == ["a", "b"] and packed.shape == (13, 16, 20)
    kept = [(p, lab) for p, lab in zip(paths, labels, strict=True) if Path(p).name.startswith("t")]
    assert [packed.key(i) for i in range(6)] == [p for p, _ in kept]
    np.testing.assert_array_equal(packed.labels, [lab for _, lab in kept])
    for i, (p, _) in enumerate(kept):
        ref = np.load(p).transpose(2, 0, 1) if p.endswith(".npy") else tifffile.imread(p)
        ref = ref if ref.shape[0] == 13 else ref.transpose(2, 0, 1)
        tile = packed.tile(i)
        assert tile.dtype == torch.uint16 and tile.shape == (13, 16, 20)
        np.testing.assert_array_equal(_chw(tile), ref)
    assert [tuple(s) for s in packed.skipped] == [tuple(s) for s in done.skipped]
    for i, (y0, y1) in enumerate([(0, 16), (3, 9), (15, 16), (0, 1), (7, 12), (1, 15)]):  # a crop's rows (pread)
        rows = packed.rows(i, y0, y1)
        assert rows.dtype == torch.uint16 and rows.shape == (13, y1 - y0, 20)
        np.testing.assert_array_equal(_chw(rows), _chw(packed.tile(i))[:, y0:y1])
    for bad in ((6, 0, 1), (0, 0, 17), (0, 5, 5)):
        with pytest.raises(IndexError):
            packed.rows(*bad)
    again = pickle.loads(pickle.dumps(packed))  # a spawned worker maps the file again
    np.testing.assert_array_equal(_chw(again.tile(5)), _chw(packed.tile(5)))


def test_pack_in_worker_processes_writes_the_same_tiles(tile_folder, tmp_path):
    pack(tile_folder, tmp_path / "a.pack")
    pack(tile_folder, tmp_path / "b.pack", workers=2)
    a, b = PackedTiles(tmp_path / "a.pack"), PackedTiles(tmp_path / "b.pack")
    np.testing.assert_array_equal(np.asarray(a.tiles), np.asarray(b.tiles))
    np.testing.assert_array_equal(a.labels, b.labels)


def test_pack_never_leaves_a_partial_file(tile_folder, tmp_path, monkeypatch):
    out = tmp_path / "p.pack"
    out.write_bytes(b"the previous pack")
    real, seen = pack_mod._load, []

    def fills_the_disk(source):
        seen.append(source)
        if len(seen) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source)

    monkeypatch.setattr(pack_mod, "_load", fills_the_disk)
    with pytest.raises(FastMAEError, match="the disk is full") as err:
        pack(tile_folder, out)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"the previous pack" and sorted(p.name for p in tmp_path.iterdir()) == ["data",
                                                                                                        "p.pack"]
    monkeypatch.setattr(pack_mod, "_load", real)
    monkeypatch.setattr(pack_mod.shutil, "disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(FastMAEError, match="needs about .* free on that disk"):
        pack(tile_folder, tmp_path / "new.pack")
    assert not (tmp_path / "new.pack").exists()


def test_pack_refusals(tmp_path, tile_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastMAEError, match="no rasters"):
        pack(tmp_path / "empty", tmp_path / "x.pack")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.tif").write_bytes(b"II*\x00junk")
    with pytest.raises(FastMAEError, match="none of the 1 files"):
        pack(tmp_path / "bad", tmp_path / "x.pack")
    assert not (tmp_path / "x.pack").exists()
    (tmp_path / "notpack").write_bytes(b"hello")
    with pytest.raises(FastMAEError, match="not a fastmae pack"):
        PackedTiles(tmp_path / "notpack")
    whole = pack(tile_folder, tmp_path / "whole.pack").path.read_bytes()
    (tmp_path / "cut.pack").write_bytes(whole[: len(whole) // 2])  # a copy that stopped half way
    with pytest.raises(FastMAEError, match="truncated"):
        PackedTiles(tmp_path / "cut.pack")


def test_fastmae_pack_command(tile_folder, tmp_path, capsys):
    from fastmae.cli import main

    assert main(["pack", str(tile_folder), str(tmp_path / "cli.pack")]) == 0
    out = capsys.readouterr().out
    assert "packed 6 tiles of 13x16x20 uint16" in out and "skipped 3" in out
    assert len(PackedTiles(tmp_path / "cli.pack")) == 6
    assert main(["pack", str(tmp_path / "nowhere"), str(tmp_path / "x.pack")]) == 2
    assert capsys.readouterr().err.startswith("fastmae: error: ")
