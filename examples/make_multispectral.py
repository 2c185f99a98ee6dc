"""A SYNTHETIC multispectral data set: a folder of 13-band uint16 GeoTIFF tiles shaped like Sentinel-2 L1C tiles
(264 x 264 px, the SSL4EO-S12 size; bands B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B10 B11 B12, reflectance x 10000),
in one sub-folder per class, so that pretraining has pixels to reconstruct and finetuning labels to learn.

**The data is synthetic**: made here from a seed by the arithmetic below, nothing downloaded, no real place or sensor.
The spectra are rough textbook shapes, the textures simple noise fields. It exercises the 13-band path end to end
(reading, statistics, crops, normalisation, training, export); it says nothing about accuracy on real imagery.

Each tile is a mixture: its class covers most of it, another class a blob of 10-35 %, with per-class textures (water:
smooth swell; forest: canopy blobs; crops: striped parcels at a random angle; soil: dunes; urban: a street grid with
blocks). Every tile has its own illumination (x 0.7-1.3), a haze offset per band, class spectra jittered by 8 % per
band, and sensor noise, so no single band's mean separates the classes; spectra and texture together do.

The files are real GeoTIFFs: deflate with the horizontal predictor by default (``--compression``; ``lzw`` and ``zstd``
need the imagecodecs package), pixel-interleaved as GDAL writes them (``--interleave band`` for planar), with
ModelPixelScale (10 m), ModelTiepoint and a GeoKeyDirectory (WGS 84 / UTM 32N, EPSG:32632), and the band names in
GDAL's metadata tag (what ``rasterio``/``gdalinfo`` show as band descriptions). ``--npy`` writes ``H x W x 13`` arrays
instead. ``bands.json`` beside the class folders lists the bands and says the data is synthetic.

    python examples/make_multispectral.py OUT [--count 400] [--size 264] [--classes 4] [--seed 0]
        [--compression deflate|lzw|zstd|none] [--interleave pixel|band] [--npy] [--nodata-every N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
WAVELENGTH_NM = (443, 490, 560, 665, 705, 740, 783, 842, 865, 945, 1375, 1610, 2190)
# Rough surface reflectances (0-1) per band; B09 (water vapour) and B10 (cirrus) are mostly absorbed.
SPECTRA = {
    "water": (0.090, 0.070, 0.060, 0.040, 0.035, 0.030, 0.028, 0.025, 0.022, 0.010, 0.002, 0.010, 0.008),
    "forest": (0.080, 0.050, 0.070, 0.040, 0.090, 0.220, 0.280, 0.300, 0.320, 0.100, 0.004, 0.150, 0.070),
    "cropland": (0.090, 0.070, 0.100, 0.080, 0.150, 0.280, 0.330, 0.360, 0.370, 0.120, 0.005, 0.240, 0.130),
    "urban": (0.120, 0.110, 0.120, 0.130, 0.140, 0.160, 0.170, 0.180, 0.190, 0.080, 0.006, 0.200, 0.180),
    "soil": (0.120, 0.120, 0.160, 0.220, 0.250, 0.270, 0.290, 0.300, 0.310, 0.120, 0.008, 0.380, 0.320),
    "wetland": (0.085, 0.060, 0.075, 0.060, 0.100, 0.160, 0.190, 0.200, 0.205, 0.070, 0.003, 0.090, 0.050),
}
PIXEL_METRES = 10.0
EPSG = 32632  # WGS 84 / UTM zone 32N
NOTE = "SYNTHETIC data made by fastmae's examples/make_multispectral.py: not real Sentinel-2 imagery"


# ------------------------------------------------------------------------------------------------- textures
def _field(rng: np.random.Generator, size: int, low: float, high: float) -> np.ndarray:
    """Band-pass noise [size, size], zero mean, unit std: white noise kept between ``low`` and ``high`` cycles per
    tile."""
    f = np.fft.rfft2(rng.normal(size=(size, size)))
    fy = np.fft.fftfreq(size)[:, None] * size
    fx = np.fft.rfftfreq(size)[None, :] * size
    r = np.hypot(fy, fx)
    f *= (r >= low) & (r <= high)
    out = np.fft.irfft2(f, s=(size, size))
    return (out - out.mean()) / (out.std() + 1e-12)


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A class's brightness modulation [size, size] around 1."""
    y, x = np.mgrid[0:size, 0:size] / size
    if kind == "water":
        return 1 + 0.05 * _field(rng, size, 1, 4)
    if kind == "forest":
        return 1 + 0.22 * _field(rng, size, 12, 40)
    if kind == "cropland":
        angle = rng.uniform(0, np.pi)
        u = x * np.cos(angle) + y * np.sin(angle)
        v = -x * np.sin(angle) + y * np.cos(angle)
        parcels = np.floor(u * rng.uniform(3, 6)) + 7 * np.floor(v * rng.uniform(3, 6))
        shade = np.random.default_rng(int(rng.integers(2**31))).uniform(0.75, 1.25, 512)[parcels.astype(int) % 512]
        stripes = 1 + 0.12 * np.sin(2 * np.pi * v * rng.uniform(25, 45))
        return shade * stripes
    if kind == "urban":
        period = rng.uniform(0.08, 0.14)
        gx, gy = (x / period) % 1, (y / period) % 1
        road = (gx < 0.12) | (gy < 0.12)
        blocks = 1 + 0.35 * np.sign(_field(rng, size, 20, 60))
        return np.where(road, 1.45, blocks * 0.9)
    if kind == "soil":
        return 1 + 0.10 * np.sin(2 * np.pi * (x * rng.uniform(4, 9) + 0.3 * _field(rng, size, 1, 3)))
    return 1 + 0.15 * _field(rng, size, 4, 16)  # wetland


def make_tile(cls: int, classes: list[str], rng: np.random.Generator, size: int) -> np.ndarray:
    """One tile [size, size, 13] float reflectance x 10000 (before clipping) whose main class is ``cls``."""
    main = classes[cls]
    other = classes[(cls + 1 + int(rng.integers(len(classes) - 1))) % len(classes)]
    blob = _field(rng, size, 1, 3)
    share = rng.uniform(0.10, 0.35)
    weight_other = (blob > np.quantile(blob, 1 - share)).astype(float)
    weight_other = np.clip(weight_other + 0.15 * _field(rng, size, 2, 8), 0, 1)  # soft, ragged edges
    spectra = {k: np.asarray(SPECTRA[k]) * rng.normal(1, 0.08, len(BANDS)) for k in (main, other)}
    pixels = ((1 - weight_other)[..., None] * _texture(main, rng, size)[..., None] * spectra[main]
              + weight_other[..., None] * _texture(other, rng, size)[..., None] * spectra[other])  # fmt: skip
    illumination = rng.uniform(0.7, 1.3)
    haze = rng.uniform(0.0, 0.04) * (np.asarray(WAVELENGTH_NM) / 443.0) ** -1.5  # stronger at short wavelengths
    reflectance = illumination * pixels + haze
    return 10000 * reflectance + rng.normal(0, 25, reflectance.shape)


# ------------------------------------------------------------------------------------------------- writing
def geotiff_tags(size: int, index: int) -> list[tuple]:
    """tifffile ``extratags`` making the tile a GeoTIFF: 10 m pixels, an upper-left corner on a made-up grid in UTM
    zone 32N, and the band names as GDAL band descriptions."""
    east, north = 300000.0 + PIXEL_METRES * size * (index % 100), 5000000.0 - PIXEL_METRES * size * (index // 100)
    keys = [1, 1, 0, 3,  # GeoKeyDirectory version 1.1.0, 3 keys
            1024, 0, 1, 1,  # GTModelType: projected
            1025, 0, 1, 1,  # GTRasterType: pixel is area
            3072, 0, 1, EPSG]  # ProjectedCSType  # fmt: skip
    items = "".join(f'<Item name="DESCRIPTION" sample="{i}" role="description">{b}</Item>' for i, b in enumerate(BANDS))
    gdal = f"<GDALMetadata>{items}</GDALMetadata>"
    return [
        (33550, "d", 3, (PIXEL_METRES, PIXEL_METRES, 0.0), True),  # ModelPixelScale
        (33922, "d", 6, (0.0, 0.0, 0.0, east, north, 0.0), True),  # ModelTiepoint
        (34735, "H", len(keys), tuple(keys), True),  # GeoKeyDirectory
        (42112, "s", 0, gdal, True),  # GDAL_METADATA: band names
    ]


def write_tile(path: Path, pixels: np.ndarray, index: int, compression: str, interleave: str,
               nodata: int | None = None) -> None:  # fmt: skip
    import tifffile

    codec = {"deflate": "zlib", "none": None}.get(compression, compression)
    planar = interleave == "band"
    data = pixels.transpose(2, 0, 1) if planar else pixels
    tags = geotiff_tags(pixels.shape[0], index)
    if nodata is not None:
        tags.append((42113, "s", 0, str(nodata), True))  # GDAL_NODATA
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="separate" if planar else "contig",
                     compression=codec, predictor=codec is not None, extratags=tags, metadata=None,
                     description=NOTE)  # fmt: skip


def generate(out: str | Path, count: int = 400, size: int = 264, classes: int = 4, seed: int = 0,
             compression: str = "deflate", interleave: str = "pixel", npy: bool = False,
             nodata_every: int = 0, threads: int = 1) -> list[Path]:  # fmt: skip
    """Write ``count`` tiles under ``out/<class>/`` (the same files for the same arguments, any ``threads``) and
    ``out/bands.json``; returns their paths. ``nodata_every`` > 0: every such tile has a swath edge of zeros (nodata
    0) on one side. ``threads`` > 1 writes tiles side by side (numpy's FFTs and the compression release the GIL)."""
    names = list(SPECTRA)[: max(2, min(classes, len(SPECTRA)))]
    out = Path(out)
    for name in names[: min(count, len(names))]:
        (out / name).mkdir(parents=True, exist_ok=True)

    def one(i: int) -> Path:
        rng = np.random.default_rng([seed, i])
        cls = i % len(names)
        pixels = np.clip(np.rint(make_tile(cls, names, rng, size)), 1, 65535).astype(np.uint16)  # 0 is nodata
        nodata = None
        if nodata_every and i % nodata_every == nodata_every - 1:
            edge = int(rng.integers(size // 8, size // 3))
            pixels[:, :edge] = 0  # a swath edge: no data on the left
            nodata = 0
        path = out / names[cls] / f"{names[cls]}_{i:05d}.{'npy' if npy else 'tif'}"
        if npy:
            np.save(path, pixels)
        else:
            write_tile(path, pixels, i, compression, interleave, nodata)
        return path

    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            paths = list(pool.map(one, range(count)))
    else:
        paths = [one(i) for i in range(count)]
    (out / "bands.json").write_text(json.dumps({
        "bands": list(BANDS), "wavelength_nm": list(WAVELENGTH_NM), "dtype": "uint16", "scale": "reflectance x 10000",
        "classes": names, "nodata": 0 if nodata_every else None, "synthetic": True, "note": NOTE,
    }, indent=1) + "\n")  # fmt: skip
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write (class sub-folders and bands.json)")
    ap.add_argument("--count", type=int, default=400, help="tiles to write, spread evenly over the classes")
    ap.add_argument("--size", type=int, default=264, help="tile side in pixels (SSL4EO-S12: 264)")
    ap.add_argument("--classes", type=int, default=4, help=f"2 to {len(SPECTRA)}: {', '.join(SPECTRA)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compression", choices=("deflate", "lzw", "zstd", "none"), default="deflate",
                    help="TIFF compression (lzw and zstd need the imagecodecs package)")  # fmt: skip
    ap.add_argument("--interleave", choices=("pixel", "band"), default="pixel",
                    help="pixel: bands together per pixel (GDAL's default); band: planar")  # fmt: skip
    ap.add_argument("--npy", action="store_true", help="write H x W x 13 .npy arrays instead of GeoTIFFs")
    ap.add_argument("--nodata-every", type=int, default=0, help="every N-th tile has a nodata (0) swath edge")
    ap.add_argument("--threads", type=int, default=1, help="tiles written side by side (the same files)")
    args = ap.parse_args(argv)
    try:
        paths = generate(args.out, args.count, args.size, args.classes, args.seed, args.compression, args.interleave,
                         args.npy, args.nodata_every, args.threads)  # fmt: skip
    except (KeyError, ValueError, ModuleNotFoundError) as exc:
        if "imagecodecs" in str(exc) or "compression" in str(exc):
            print(f"make_multispectral: error: --compression {args.compression} needs the imagecodecs package "
                  "(pip install imagecodecs)", file=sys.stderr)  # fmt: skip
            return 2
        raise
    kind = "npy arrays" if args.npy else f"GeoTIFFs ({args.compression}, {args.interleave}-interleaved)"
    print(f"wrote {len(paths)} SYNTHETIC 13-band uint16 {args.size}x{args.size} {kind} under {args.out} "
          f"(generated from seed {args.seed}, not real Sentinel-2 data)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
