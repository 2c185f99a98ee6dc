"""Loader throughput at 13 bands: images per second per DataLoader worker for 13-band uint16 tiles (264 x 264, the
SSL4EO-S12 size; SYNTHETIC tiles from ``examples/make_multispectral.py``) through the MAE pretrain augmentation
(random-resized-crop 0.2-1, bicubic antialiased resize to 224, flip), in one run, at each worker count:

- ``plain-tiff`` / ``plain-npy``: the pipeline a user would write: ``tifffile.imread`` / ``np.load``, a float32 tensor,
  ``torchvision.transforms.v2`` ``RandomResizedCrop(224, scale=(0.2, 1), bicubic, antialias)`` +
  ``RandomHorizontalFlip`` + ``Normalize`` (the data's per-band mean and std) in the workers, torch's default collate:
  float32 batches out of the workers;
- ``fastmae-tiff`` / ``fastmae-npy``: the loader a run uses, :class:`~fastmae.train.data.loaders.TorchvisionLoader`
  over :func:`~fastmae.train.data.index.index_data` of the folder, with the run's
  :class:`~fastmae.train.data.databands.DataBands` from :func:`~fastmae.train.data.databands.resolve_bands` (13 uint16
  bands, ``--norm auto``): each file read in its dtype (a ``.npy``: only the crop's rows, with ``pread``), the crop
  box and flip of :mod:`fastmae.train.data.order`, crop / resize / flip in the native dtype straight into a uint16
  batch in shared memory; uint16 batches out of the workers, normalised on the device by the step;
- ``fastmae-pack``: the same loader over the packed store of the TIFFs (``fastmae pack``; ``--data tiles.pack``):
  the crop's rows of each band plane read from the pack with ``pread``, no decoding.

``--device cuda`` moves every batch to the GPU as the step takes it and normalises the uint16 ones there (the plain
batches were normalised in the workers), inside the timed loop; on a CPU the batches stay where they are and the
normalisation is timed apart (``normalize_on_device_ms_per_batch``).

``vs_plain`` is each fastmae row's rate over the plain row of the same format (the pack: over ``plain-tiff``, the files
it was packed from, and ``vs_plain_npy`` over ``plain-npy``) in the same run at the same worker count. Rates are medians
of interleaved rounds over an endless order. ``--stages`` also times each step of both pipelines on one core in this
process (read, float cast, resize, normalise, collate) and writes them as ``stage`` rows: where the time goes.

    python benchmarks/bench_bands.py [--workers 1,2] [--images 320] [--batch 64] [--rounds 3] [--stages]
    python benchmarks/bench_bands.py --device cuda --workers 4,8,16 --images 2048 --loaders plain-npy,fastmae-npy
    python benchmarks/bench_bands.py --report JSON [--readme docs/data.md]     # the table of a results JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Rows, cli, env_info, median, report, sync  # noqa: E402
from bench_loader import PREFETCH, endless, timed  # noqa: E402
from fastmae.train.context import resolve_device  # noqa: E402
from fastmae.train.data.databands import DataBands, files_spec, resolve_bands  # noqa: E402
from fastmae.train.data.index import index_data  # noqa: E402
from fastmae.train.data.loaders import TorchvisionLoader  # noqa: E402
from fastmae.train.data.normalize import normalize_bands  # noqa: E402
from fastmae.train.data.order import random_resized_crop, sample_rng  # noqa: E402
from fastmae.train.data.pack import PackedTiles, list_rasters, pack  # noqa: E402
from fastmae.train.data.rasters import read_raster, read_raster_rows  # noqa: E402
from fastmae.train.data.resample import backend_label, crop_resize_flip  # noqa: E402
from fastmae.train.data.slots import fresh_shared  # noqa: E402

from fastmae.bands import parse_band_flags  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCALE = (0.2, 1.0)
LOADERS = ("plain-tiff", "fastmae-tiff", "plain-npy", "fastmae-npy", "fastmae-pack")


def _example():
    spec = importlib.util.spec_from_file_location("make_multispectral", ROOT / "examples" / "make_multispectral.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------- the plain pipeline
class PlainTiles(torch.utils.data.Dataset):
    """What a user writes: read the file whole, float32, torchvision v2 transforms, Normalize; default collate."""

    def __init__(self, paths: list[str], labels: list[int], img_size: int, mean, std):
        from torchvision.transforms import v2 as T

        self.paths, self.labels = paths, labels
        self.transform = T.Compose([
            T.RandomResizedCrop(img_size, scale=SCALE, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.RandomHorizontalFlip(),
            T.Normalize(list(mean), list(std)),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        if path.endswith(".npy"):
            arr = np.load(path)  # H x W x C
        else:
            import tifffile

            arr = tifffile.imread(path)  # H x W x C (pixel-interleaved, as GDAL writes)
        x = torch.from_numpy(arr).permute(2, 0, 1).float()
        return self.transform(x), self.labels[i]


def sources(names, data: dict, img_size: int, batch: int, workers: int, bands: dict, pin: bool = False) -> dict:
    """An endless iterator of image batches per loader name, each with ``workers`` worker processes: the plain
    pipeline's DataLoader, or fastmae's loader (``TorchvisionLoader`` over the format's index, a folder's or the pack's,
    with its ``bands``)."""
    out = {}
    mean, std = bands["npy"].spec.mean, bands["npy"].spec.std
    for name in names:
        kind, fmt = name.split("-")
        common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=pin,
                      prefetch_factor=PREFETCH if workers else None)  # fmt: skip
        if kind == "plain":
            paths, labels = data[fmt]
            ds = PlainTiles(paths, labels, img_size, mean, std)
            sampler = torch.utils.data.RandomSampler(range(len(ds)), replacement=True, num_samples=2**40)
            loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=True, **common)
            out[name] = (x for x, _ in loader)
        else:  # the run's loader, as make_loader builds it for a raster run
            out[name] = endless(TorchvisionLoader(data["index"][fmt], img_size, batch, seed=0, num_workers=workers,
                                                  pin=pin, bands=bands[fmt].for_loader()))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ stages
def _ms(fn, reps: int, stat=median) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * stat(times)


def stage_rows(data: dict, img_size: int, mean, std, reps: int = 30) -> list[dict]:
    """Milliseconds per image of each step of both pipelines, one core, this process, over the same boxes."""
    import tifffile
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T
    from torchvision.transforms.v2 import functional as F

    torch.set_num_threads(1)
    tif, npy = data["tiff"][0][0], data["npy"][0][0]
    tiles = PackedTiles(data["pack"])
    arr = tifffile.imread(tif)
    x = torch.from_numpy(arr).permute(2, 0, 1).float()
    boxes = [random_resized_crop(sample_rng(0, 0, i), arr.shape[1], arr.shape[0], SCALE) for i in range(reps + 1)]
    k = iter(range(10**9))

    def box():
        return boxes[next(k) % len(boxes)]

    native = read_raster(npy)
    for b in boxes:  # the resampling matrices of these crop sizes, made once per process (as a warm worker has them)
        crop_resize_flip(native, b, True, img_size)
        crop_resize_flip(native, b, True, img_size, backend="matmul")
    norm = T.Normalize(list(mean), list(std))
    resized = F.resized_crop(x, 0, 0, 200, 200, [img_size, img_size], InterpolationMode.BICUBIC, antialias=True)
    crop_rows = (30, 230)  # 200 rows: a crop of the usual size

    def fresh_batch():  # 16 images of fresh shared memory, written once: what every batch a worker hands over costs
        fresh_shared((16, 13, img_size, img_size), torch.uint16).fill_(1)
    stages = {
        "read tiff (tifffile, deflate)": lambda: tifffile.imread(tif),
        "read npy (np.load)": lambda: np.load(npy),
        "float32 tensor of the tile": lambda: torch.from_numpy(arr).permute(2, 0, 1).float(),
        "plain resized crop (v2, float32)": lambda: F.resized_crop(x, *_yxhw(box()), [img_size, img_size],
                                                                   InterpolationMode.BICUBIC, antialias=True),
        "plain normalize (v2)": lambda: norm(resized),
        "plain collate (stack float32, per image)": lambda: torch.stack([resized] * 16),
        "fastmae read npy, 200 rows (pread)": lambda: read_raster_rows(npy, *crop_rows),
        "fastmae read pack tile, 200 rows (pread)": lambda: tiles.rows(3, *crop_rows),
        "fastmae crop/resize/flip uint16 (H x W x C)": lambda: crop_resize_flip(native, box(), True, img_size),
        "fastmae crop/resize/flip uint16 (C x H x W)": lambda: crop_resize_flip(tiles.tile(3), box(), True, img_size),
        # the switch back, same boxes: torch's matrix products (FASTMAE_RESAMPLE=matmul)
        "torch matmul crop/resize/flip uint16 (H x W x C)": lambda: crop_resize_flip(native, box(), True, img_size,
                                                                                    backend="matmul"),
        "torch matmul crop/resize/flip uint16 (C x H x W)": lambda: crop_resize_flip(tiles.tile(3), box(), True,
                                                                                    img_size, backend="matmul"),
        "fresh shared batch memory, uint16 (per image)": fresh_batch,
    }
    rows = []
    for name, fn in stages.items():
        per = 16 if "collate" in name or "batch memory" in name else 1
        ms = _ms(fn, reps) / per
        fastest = _ms(fn, reps, min) / per  # the least disturbed call: on a shared machine, the cost itself
        rows.append({"name": "stage", "stage": name, "ms_per_image": ms, "ms_min": fastest, "img_size": img_size})
        print(f"  {name:50s} {ms:7.2f} ms per image (median), {fastest:6.2f} (fastest)")
    return rows


def _yxhw(box):
    x, y, w, h = box
    return y, x, h, w


# --------------------------------------------------------------------------------------------------- main
def make_data(folder: Path, images: int, formats: set[str], workers: int = 2) -> dict:
    """The generated tiles: always as ``.npy`` (the statistics are taken from them), as TIFF when a TIFF or pack row
    is asked for, and the pack of the TIFFs; each folder listed and indexed as a run indexes it."""
    ex = _example()
    t0 = time.perf_counter()
    tiff = bool(formats & {"tiff", "pack"})
    if tiff:
        ex.generate(folder / "tiff", count=images, size=264, classes=4, seed=0, threads=workers)
    ex.generate(folder / "npy", count=images, size=264, classes=4, seed=0, npy=True, threads=workers)
    data: dict = {"index": {}}
    if "pack" in formats:
        pack(folder / "tiff", folder / "tiles.pack", workers=workers if workers > 1 else 0)
        data["pack"] = str(folder / "tiles.pack")
        data["index"]["pack"] = index_data(data["pack"])  # the pack's own index: what --data tiles.pack reads
    for fmt in ("tiff", "npy") if tiff else ("npy",):
        paths, labels, _ = list_rasters(folder / fmt)
        data[fmt] = (paths, labels)
        data["index"][fmt] = index_data(folder / fmt, cache=False, workers=workers)
    made = ", ".join(["TIFF"] * tiff + [".npy"] + ["the pack"] * ("pack" in formats))
    print(f"wrote {images} SYNTHETIC 13-band tiles ({made}) and indexed them in {time.perf_counter() - t0:.0f} s")
    return data


def run_bands(data: dict) -> dict:
    """The run's bands per format, as ``fastmae pretrain`` decides them (``--norm auto``: per-band statistics of a
    seeded sample of the ``.npy`` tiles); the TIFFs are the same tiles, with their GDAL band names."""
    npy = resolve_bands(data["index"]["npy"], parse_band_flags(), seed=0)
    bands = {"npy": npy}
    for fmt in ("tiff", "pack"):
        if fmt in data["index"]:
            spec = files_spec(data["index"][fmt]).with_stats(npy.spec.mean, npy.spec.std, "auto")
            bands[fmt] = DataBands(spec)
    return bands


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=320, help="tiles generated (each format)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=12, help="batches timed per measurement")
    ap.add_argument("--workers", default="1,2", help="DataLoader worker counts")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurements per loader (median kept)")
    ap.add_argument("--loaders", default=",".join(LOADERS))
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto: where the batches go (cuda: moved there and "
                    "normalised there, as the step takes them)")  # fmt: skip
    ap.add_argument("--stages", action="store_true", help="also time each step on one core (stage rows)")
    ap.add_argument("--settle", type=float, default=1.0, help="least rest after each measurement (seconds; longer "
                    "when the loader just timed needs longer to refill its prefetch queues)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script works (seconds)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/bands-<device>-<date>.json)")
    ap.add_argument("--report", default=None, metavar="JSON", help="only print the table of a results JSON")
    ap.add_argument("--readme", default=None, help="with --report: the page to write (docs/data.md), between its "
                    "bands-bench markers")  # fmt: skip
    args = ap.parse_args(argv)
    if args.report:
        table = report(args.report, readme_table, "bands-bench", args.readme)
        print(table)
        return {"table": table}
    if args.smoke:
        args.images, args.img_size, args.batch, args.batches, args.rounds, args.settle = 16, 32, 4, 2, 1, 0.0
    counts = [int(w) for w in args.workers.split(",")]
    names = args.loaders.split(",")
    if unknown := [n for n in names if n not in LOADERS]:
        raise SystemExit(f"bench_bands: unknown loader(s) {', '.join(unknown)}; choose from {', '.join(LOADERS)}")
    formats = {n.split("-")[1] for n in names} | ({"tiff", "pack"} if args.stages else set())
    device = resolve_device(args.device)  # first: --device cuda without one stops here, before any data is written
    per_epoch = args.images // args.batch
    if per_epoch < max(counts) * PREFETCH:
        raise SystemExit(f"bench_bands: {per_epoch} batches an epoch, fewer than {max(counts)} workers x "
                         f"{PREFETCH} prefetched; use --images {max(counts) * PREFETCH * args.batch} or more")
    env = env_info(device)
    env["resample"] = backend_label()  # what crops fastmae's rows: the compiled taps, or torch where they are not built
    results = Rows("bands", env, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args.images, formats, max(2, min(max(counts), 16)))
        bands = run_bands(data)
        mean, std = bands["npy"].spec.mean, bands["npy"].spec.std
        batch_u16 = torch.randint(0, 10000, (args.batch, 13, args.img_size, args.img_size)).to(torch.uint16)
        batch_u16 = batch_u16.to(device)
        normalize_ms = _ms(lambda: (normalize_bands(batch_u16, mean, std), sync(device)), 5)
        if args.stages:
            results.rows += stage_rows(data, args.img_size, mean, std, reps=3 if args.smoke else 30)
            results.write()
        for workers in counts:
            loaders = sources(names, data, args.img_size, args.batch, workers, bands, pin=device.type == "cuda")
            rates: dict[str, list[float]] = {k: [] for k in loaders}
            done = len(results.rows)
            for _ in range(args.rounds):
                for name, src in loaders.items():
                    rate = timed(src, device, args.batches, args.batch, bands=bands["npy"])
                    rates[name].append(rate)
                    # the workers of the loader just timed now refill their prefetch queues (PREFETCH batches each),
                    # which must not be charged to the next loader: for the slow ones that is seconds, not a fixed rest
                    time.sleep(max(args.settle, 1.2 * PREFETCH * args.batch * max(workers, 1) / rate))
                    results.rows[done:] = _rows(rates, workers, args, normalize_ms, device)
                    results.write()
            for row in results.rows[done:]:
                vs = "" if row["vs_plain"] is None else f"  {row['vs_plain']:.2f}x plain"
                print(f"{row['loader']:14s} {workers} workers  {row['img_per_s']:7.1f} img/s  "
                      f"{row['img_per_s_per_worker']:7.1f} per worker{vs}")
            del loaders
    print(f"wrote {results.path}")
    return {"rows": results.rows, "path": str(results.path)}


def readme_table(saved: dict, json_name: str) -> str:
    """The docs table of a results JSON: one row per loader and worker count, then where the time goes."""
    env, rows = saved["env"], [r for r in saved["rows"] if r["name"] == "loader"]
    first = rows[0]
    gpu = first.get("device") == "cuda"
    where = f", batches moved to the **{env.get('gpu')}** and the uint16 ones normalised there" if gpu else ""
    lines = [
        f"Measured on **{env.get('cpu', 'cpu')}** ({env.get('cpu_threads')} threads{'' if gpu else ', shared'})"
        f"{where}, batch "
        f"{first['batch_size']}, {first['img_size']} px, {first['images']} tiles per format ({first['data']}); "
        f"fastmae's crops by {env.get('resample', 'torch matmul')}; torch "
        f"{env.get('torch')}, git `{str(env.get('git_sha'))[:12]}`, {str(env.get('date', ''))[:10]}; raw JSON "
        f"`benchmarks/results/{json_name}`.",
        "",
        "| loader | read | output (bytes per image) | workers | img/s | img/s per worker | vs plain, same format "
        "(same run) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    reads = {"tiff": "TIFF, deflate", "npy": ".npy", "pack": "pack (of the TIFFs)"}
    for r in rows:
        vs = "" if r["vs_plain"] is None else f"{r['vs_plain']:.2f}x"
        if r.get("vs_plain_npy"):
            vs += f" (vs plain-npy {r['vs_plain_npy']:.2f}x)"
        lines.append(f"| {r['loader']} | {reads[r['format']]} | {r['output']} ({r['bytes_per_image_out']:,}) | "
                     f"{r['workers']} | {r['img_per_s']:.0f} | {r['img_per_s_per_worker']:.0f} | {vs} |")  # fmt: skip
    paths: dict[str, list[str]] = {}
    for r in rows:
        if r.get("path") and r["loader"] not in paths.setdefault(r["path"], []):
            paths[r["path"]].append(r["loader"])
    if paths:
        lines += ["", "How each row loads: " + "; ".join(f"{' / '.join(v)}: {k}" for k, v in paths.items()) + "."]
    norm = next((r["normalize_on_device_ms_per_batch"] for r in rows if r.get("normalize_on_device_ms_per_batch")),
                None)  # fmt: skip
    if norm is not None and gpu:
        lines += ["", f"fastmae's batches leave the workers as uint16 and are normalised on the GPU inside the timed "
                      f"loop ({norm:.2f} ms per batch of {first['batch_size']} alone)."]
    elif norm is not None:
        lines += ["", f"fastmae's batches leave the workers as uint16; the step normalises them on its device (here "
                      f"the CPU: {norm:.1f} ms per batch of {first['batch_size']}, outside the loader's time)."]
    stages = [r for r in saved["rows"] if r["name"] == "stage"]
    if stages:
        lines += ["", "Where the time goes, per image on one core (`--stages`; median, and the fastest call in "
                      "brackets, which a shared machine disturbs least): " + "; ".join(
            f"{r['stage']} {r['ms_per_image']:.2f} ms ({r.get('ms_min', r['ms_per_image']):.2f})" for r in stages) +
            "."]  # fmt: skip
    return "\n".join(lines)


PATHS = {"plain": "tifffile / np.load, float32, torchvision v2 in the workers",
         "fastmae": "fastmae's loader (TorchvisionLoader, the run's DataBands)",
         "fastmae-pack": "fastmae's loader over the pack (index_data of the .pack file)"}


def _rows(rates: dict[str, list[float]], workers: int, args, normalize_ms: float, device) -> list[dict]:
    rows = []
    for name, xs in rates.items():
        if not xs:
            continue
        kind, fmt = name.split("-")
        rate = median(xs)
        base = rates.get("plain-tiff" if fmt == "pack" else f"plain-{fmt}")
        base_npy = rates.get("plain-npy")
        row = {"name": "loader", "loader": name, "path": PATHS.get(name, PATHS[kind]), "device": device.type,
               "format": fmt, "workers": workers, "img_per_s": rate,
               "img_per_s_per_worker": rate / max(workers, 1),
               "vs_plain": rate / median(base) if kind == "fastmae" and base else None,
               "output": "uint16" if kind == "fastmae" else "float32",
               "bytes_per_image_out": 13 * args.img_size**2 * (2 if kind == "fastmae" else 4),
               "normalize_on_device_ms_per_batch": normalize_ms if kind == "fastmae" else None,
               "img_size": args.img_size, "batch_size": args.batch, "images": args.images, "bands": 13,
               "data": "SYNTHETIC 13-band uint16 264x264 (examples/make_multispectral.py); TIFF deflate+predictor, "
                       "pixel-interleaved; .npy H x W x C; pack of the TIFFs", "rates": list(xs)}  # fmt: skip
        if name == "fastmae-pack" and base_npy:
            row["vs_plain_npy"] = rate / median(base_npy)
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(cli(main))
