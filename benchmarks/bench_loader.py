"""Loader throughput: images per second out of the MAE pretrain pipeline (random-resized-crop 0.2-1, bicubic resize,
flip, normalise) at 224 px, in one run, at each worker count (``--workers 4,8,16``; DALI: threads):

- ``official``: what facebookresearch/mae's main_pretrain.py builds: ``ImageFolder`` + ``RandomResizedCrop(scale=(0.2,
  1), bicubic)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` in a ``DataLoader`` (Pillow decode, float
  batches out of the workers);
- ``fastmae``: fastmae's torchvision loader (torchvision.io decode, uint8 crop / resize / flip in the workers; uint8
  batches, normalised by the step on its device: on a GPU that is in the timed loop, on a CPU it is the step's own
  compute and reported apart, ``normalize_on_device_ms_per_batch``);
- ``decode``: reading and decoding alone in the same workers, nothing else: the limit of any CPU loader;
- ``decode-torchcodec`` / ``decode-torchvision`` / ``decode-pillow`` and ``fastmae-torchcodec`` / ... : the same with
  the JPEG and PNG routes forced to one decoder (``decode`` and ``fastmae`` use the default, TorchCodec where it
  loads): the decoders side by side on the same images in the same run;
- ``gpu``: ``--loader gpu``: workers read bytes, nvJPEG decodes and one Triton kernel augments on the GPU (CUDA only);
- ``dali``: fastmae's DALI loader (CPU decode here, nvJPEG on a GPU), when nvidia-dali is installed;
- ``official-finetune`` / ``fastmae-finetune``: the finetune recipe's augmentation (timm's RandAugment and random
  erasing need Pillow, so fastmae keeps Pillow there, seeded per sample): the baseline for that row is
  ``official-finetune``.

Every loader reads an endless order (epoch after epoch, no restart at an epoch's end), so every worker is busy for
the whole measurement; and a setting with fewer batches per epoch than workers x prefetch (the real loop would leave
workers idle at each epoch's end) is refused. Rates are medians of interleaved rounds; ``img_per_s_per_worker``
divides by the workers, and ``vs_official`` is the ratio to the official loader in the same run at the same worker
count. Without ``--data`` it writes ImageNet-like JPEGs (about 520 x 390, quality 90, cut from scikit-image's photos,
in parallel; one in ``--large-every`` about 2000 x 1500) to a temporary folder first, or to ``--make-data DIR`` to
keep them.

    python benchmarks/bench_loader.py [--data DIR] [--workers 4,8,16] [--batch 256] [--batches 30] [--images N]
    python benchmarks/bench_loader.py --make-data DIR --images 20480      # only write the JPEGs
    python benchmarks/bench_loader.py --bands [--workers 1,2] [--stages]  # 13-band tiles (bench_bands.py)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Rows, cli, env_info, median, report, sync  # noqa: E402
from fastmae.train.context import resolve_device  # noqa: E402
from fastmae.train.data.dali import DALILoader, dali_unavailable_reason  # noqa: E402
from fastmae.train.data.decode import IMAGENET_MEAN, IMAGENET_STD, decode, resolve_decoder  # noqa: E402
from fastmae.train.data.gpu_loader import GPULoader, gpu_loader_unavailable_reason  # noqa: E402
from fastmae.train.data.index import index_data  # noqa: E402
from fastmae.train.data.loaders import TorchvisionLoader, model_input  # noqa: E402
from fastmae.train.samples import LARGE_EVERY, make_jpegs  # noqa: E402

PREFETCH = 2  # batches each DataLoader worker keeps ready (torch's default prefetch_factor)
DECODER_NAMES = ("torchcodec", "torchvision", "pillow")  # the decoder variants: decode-<name>, fastmae-<name>




def official_loader(root: Path, img_size: int, batch: int, workers: int, pin: bool, finetune: bool = False):
    """facebookresearch/mae's training data: ImageFolder + the transform of main_pretrain.py (or, with ``finetune``,
    of main_finetune.py: timm's create_transform with RandAugment and random erasing), in a DataLoader."""
    from torchvision import datasets
    from torchvision import transforms as T

    if finetune:
        from timm.data import create_transform

        transform = create_transform(img_size, is_training=True, color_jitter=None, auto_augment="rand-m9-mstd0.5-inc1",
                                     interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1,
                                     mean=IMAGENET_MEAN, std=IMAGENET_STD)  # fmt: skip
    else:
        transform = T.Compose([
            T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])  # fmt: skip
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=_endless_random(len(dataset)),
                                       num_workers=workers, pin_memory=pin, drop_last=True,
                                       persistent_workers=workers > 0)  # fmt: skip


def _endless_random(n: int) -> torch.utils.data.Sampler:
    """Random indices without end (with replacement): no epoch boundary stalls the workers."""
    return torch.utils.data.RandomSampler(range(n), replacement=True, num_samples=2**40)


class EndlessBatches(torch.utils.data.Sampler):
    """fastmae's batch order, epoch after epoch without end (``(epoch, sample)`` items, as the loaders read them)."""

    def __init__(self, order):
        self.order = order

    def __iter__(self):
        epoch = 0
        while True:
            for ids in self.order.batches(epoch):
                yield [(epoch, int(i)) for i in ids]
            epoch += 1


def endless(loader):
    """A fastmae loader (torchvision or gpu) reading :class:`EndlessBatches`: its batches, forever."""
    loader.sampler = EndlessBatches(loader.order)
    loader.loader = loader._data_loader()
    return (b.images for b in loader.epoch(0))


def check_setting(images: int, batch: int, workers: int) -> None:
    """Refuse a data set too small to keep ``workers`` busy in the real loop."""
    per_epoch = images // batch
    if per_epoch < workers * PREFETCH:
        raise SystemExit(f"bench_loader: {images} images at batch {batch} are {per_epoch} batches an epoch, fewer "
                         f"than {workers} workers x {PREFETCH} prefetched: most workers would wait at every epoch's "
                         f"end; use --images {workers * PREFETCH * batch} or more")  # fmt: skip


class DecodeOnly(torch.utils.data.Dataset):
    """Read and decode (fastmae's routes, the JPEG and PNG ones by ``decoder``: None = the default), nothing else:
    what any CPU loader must at least do per image."""

    def __init__(self, index, decoder: str | None = None):
        self.index, self.decoder = index, decoder

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> int:
        return decode(self.index.read(i), int(self.index.routes[i]), self.decoder).shape[-1]


def _forever(make_epoch):
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def timed(batches_of, device: torch.device, batches: int, batch: int, settle: float = 0.0, bands=None) -> float:
    """Images per second over ``batches`` batches (on a GPU moved there and normalised there as the step does: 8-bit
    RGB, or a batch in ``bands``' dtype with their statistics; a float32 one is normalised already), after two
    warm-up batches (worker start). Then ``settle`` seconds of rest: the workers of the loader just timed fill their
    prefetch queues in the background, which must not be charged to the next loader."""
    it = iter(batches_of)
    for _ in range(2):
        next(it)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        imgs = next(it)
        if device.type == "cuda":  # as the step takes them; on a CPU the step normalises in its own time
            imgs = model_input(imgs.to(device, non_blocking=True), bands)
    sync(device)
    rate = batches * batch / (time.perf_counter() - t0)
    time.sleep(settle)
    return rate


def _normalize_ms(device: torch.device, batch: int, img_size: int) -> float:
    """Milliseconds to normalise one uint8 batch where the step does it, on ``device`` (median of 10)."""
    imgs = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, device=device)
    times = []
    for _ in range(11):
        sync(device)
        t0 = time.perf_counter()
        model_input(imgs)
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return median(times[1:])


def readme_table(saved: dict, json_name: str) -> str:
    """The docs table of a results JSON: one row per loader, ratios to the official loader of the same kind."""
    env, rows = saved["env"], saved["rows"]
    first = rows[0]
    lines = [
        f"Measured on **{env.get('gpu') if env.get('gpu') not in (None, 'cpu') else env.get('cpu', 'cpu')}**, "
        f"batch {first['batch_size']}, {first['img_size']} px, {first['images']} images "
        f"({first['data']}); torch {env.get('torch')}, git `{str(env.get('git_sha'))[:12]}`, "
        f"{str(env.get('date', ''))[:10]}; raw JSON `benchmarks/results/{json_name}`.",
        "",
        "| loader | decoder (JPEG, PNG) | augmentation | output | workers | img/s | img/s per worker | vs official "
        "(same run) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['loader']} | {r.get('decoder', 'n/a')} | {r.get('kind', 'pretrain')} | "
                     f"{r.get('output', 'float32')} | {r['workers']} | {r['img_per_s']:.0f} | "
                     f"{r['img_per_s_per_worker']:.0f} | {_ratio(r['vs_official'])} |")  # fmt: skip
    norm = next((r["normalize_on_device_ms_per_batch"] for r in rows if r.get("normalize_on_device_ms_per_batch")),
                None)  # fmt: skip
    if norm is not None and first["device"] == "cpu":
        lines += ["", f"fastmae's batches leave the workers as uint8; the step normalises them on its device, here the "
                      f"CPU: {norm:.1f} ms per batch of {first['batch_size']}, outside the loader's time."]
    return "\n".join(lines)


def sources_for(index, root: Path, args, device: torch.device, workers: int, batch: int) -> dict:
    """Every loader asked for, at ``workers`` workers, each an endless iterator of image batches."""
    gpu = device.type == "cuda"
    chosen = args.loaders.split(",")
    out = {}
    if "official" in chosen:
        out["official"] = (x for x, _ in official_loader(root, args.img_size, batch, workers, gpu))
    if "fastmae" in chosen:
        out["fastmae"] = endless(TorchvisionLoader(index, args.img_size, batch, seed=0, num_workers=workers, pin=gpu))
    for name in chosen:
        kind, _, decoder = name.partition("-")
        if kind == "decode" and decoder in ("", *DECODER_NAMES):
            out[name] = iter(torch.utils.data.DataLoader(DecodeOnly(index, decoder or None), batch_size=batch,
                                                         num_workers=workers, sampler=_endless_random(len(index)),
                                                         drop_last=True, persistent_workers=workers > 0))  # fmt: skip
        elif kind == "fastmae" and decoder in DECODER_NAMES:
            tv = TorchvisionLoader(index, args.img_size, batch, seed=0, num_workers=workers, pin=gpu)
            tv.dataset.decoder = decoder  # before the workers start: they inherit it
            out[name] = endless(tv)
    if "gpu" in chosen:
        if (reason := gpu_loader_unavailable_reason(device)) is None:
            out["gpu"] = endless(GPULoader(index, args.img_size, batch, seed=0, device=device, num_workers=workers))
        else:
            print(f"gpu loader not measured: {reason}")
    if "dali" in chosen:
        if (reason := dali_unavailable_reason()) is None:
            dali = DALILoader(index, args.img_size, batch, seed=0, device=device, num_threads=max(workers, 1))
            out["dali"] = _forever(lambda e: (b.images for b in dali.epoch(e)))
        else:
            print(f"DALI not measured: {reason}")
    if "official-finetune" in chosen:
        out["official-finetune"] = (x for x, _ in official_loader(root, args.img_size, batch, workers, gpu, True))
    if "fastmae-finetune" in chosen:
        out["fastmae-finetune"] = endless(TorchvisionLoader(index, args.img_size, batch, seed=0, num_workers=workers,
                                                            pin=gpu, pipeline="finetune"))  # fmt: skip
    return out


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--bands" in argv:  # the 13-band row set: benchmarks/bench_bands.py, given the other arguments
        import bench_bands

        return bench_bands.main([a for a in argv if a != "--bands"])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bands", action="store_true", help="the 13-band uint16 rows instead (benchmarks/bench_bands.py "
                    "with the other arguments; its --help lists them)")
    ap.add_argument("--data", default=None, help="ImageFolder tree (default: generated JPEGs)")
    ap.add_argument("--make-data", default=None, metavar="DIR", help="write --images JPEGs to DIR, then stop; with "
                    "--data DIR as well: write them only when DIR does not exist, then measure on them")
    ap.add_argument("--images", type=int, default=None, help="how many JPEGs to generate without --data (default: "
                    "enough for every worker count: 1.25 x workers x prefetch x batch, at least 1024)")  # fmt: skip
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on CPU (the recipe's per-GPU batch, 4096 on "
                    "64 GPUs), 256 on GPU")  # fmt: skip
    ap.add_argument("--batches", type=int, default=None, help="batches timed per measurement (default 20 / 30)")
    ap.add_argument("--workers", default="2", help="DataLoader workers of every loader (= DALI threads); several "
                    "counts: 4,8,16")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurements per loader (median kept)")
    ap.add_argument("--loaders", default="official,fastmae,decode,gpu,dali,official-finetune,fastmae-finetune",
                    help="which to measure; official and official-finetune are the baselines; decode-<decoder> and "
                    "fastmae-<decoder> (torchcodec, torchvision, pillow) force the JPEG and PNG decoder")  # fmt: skip
    ap.add_argument("--data-label", default=None, help=argparse.SUPPRESS)  # what the rows call --data
    ap.add_argument("--large-every", type=int, default=LARGE_EVERY, help="one generated JPEG in N is ~2000 x 1500 "
                    "(0: none)")  # fmt: skip
    ap.add_argument("--settle", type=float, default=1.5, help="seconds of rest after each measurement")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script works (CPU, seconds)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/loader-<device>-<date>.json)")
    ap.add_argument("--report", default=None, metavar="JSON", help="only print the table of a results JSON")
    ap.add_argument("--readme", default=None,
                    help="with --report: the page to write (docs/data.md), between its loader-bench markers")
    args = ap.parse_args(argv)
    if args.report:
        table = report(args.report, readme_table, "loader-bench", args.readme)
        print(table)
        return {"table": table}

    device = resolve_device(args.device)  # first: --device cuda without one stops here, before any data is written
    gpu = device.type == "cuda"
    counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    if args.smoke:
        args.images, args.img_size, args.batch, args.batches, args.rounds, args.settle = 24, 64, 4, 2, 1, 0.0
    batch = args.batch or (256 if gpu else 64)
    batches = args.batches or (30 if gpu else 20)
    needed = max(w * PREFETCH * batch for w in counts)
    if args.make_data:
        n = args.images or max(1024, needed * 5 // 4)
        if args.data is None or not Path(args.make_data).exists():
            make_jpegs(Path(args.make_data), n, large_every=args.large_every)
            print(f"wrote {n} JPEGs under {args.make_data}")
        if args.data is None:
            return {"images": n}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else make_jpegs(Path(tmp) / "jpegs", args.images or max(
            1024, needed * 5 // 4), large_every=args.large_every)  # fmt: skip
        index = index_data(root)
        for workers in counts:
            check_setting(len(index), batch, workers)
        if len(counts) > 1:  # one process per worker count, as a run has: nothing left over from the previous count
            return _per_count(argv, counts, root, args.out, None if args.data else _generated(args.large_every))
        normalize_ms = _normalize_ms(device, batch, args.img_size)
        results = Rows("loader", env_info(device), args.out)
        for workers in counts:
            sources = sources_for(index, root, args, device, workers, batch)
            rates: dict[str, list[float]] = {k: [] for k in sources}
            done = len(results.rows)
            for _ in range(args.rounds):
                for name, source in sources.items():
                    rates[name].append(timed(source, device, batches, batch, args.settle))
                    # the rows so far (medians of the rounds measured), rewritten: a run stopped now keeps them
                    results.rows[done:] = _rows(rates, workers, gpu, device, normalize_ms, args, batch, len(index))
                    results.write()
            for row in results.rows[done:]:
                print(f"{row['loader']:18s} {row['device']:20s} {workers:2d} workers  {row['img_per_s']:8.1f} img/s  "
                      f"{row['img_per_s_per_worker']:7.1f} per worker  ({_ratio(row['vs_official'])} official)")
            del sources  # their workers end before the next count's start
    print(f"wrote {results.path}")
    return {"rows": results.rows, "path": str(results.path)}


def _rows(rates: dict[str, list[float]], workers: int, gpu: bool, device: torch.device, normalize_ms: float, args,
          batch: int, images: int) -> list[dict]:  # fmt: skip
    """One row per loader with rates so far: the median, per worker, and the ratio to the official loader's median."""
    rows = []
    for name, xs in rates.items():
        if not xs:
            continue
        rate = median(xs)
        base_name = "official-finetune" if "finetune" in name else "official"
        base = median(rates[base_name]) if rates.get(base_name) else None
        rows.append({"name": "loader", "loader": name, "kind": "finetune" if "finetune" in name else "pretrain",
                     "device": "gpu (mixed decode)" if gpu and name in ("dali", "gpu") else device.type,
                     "workers": workers, "img_per_s": rate, "img_per_s_per_worker": rate / max(workers, 1),
                     "vs_official": rate / base if base else None,
                     "output": ("uint8" if name.startswith("fastmae") and "finetune" not in name else
                                {"gpu": "float32 on the GPU"}.get(name, "float32")),  # fmt: skip
                     "normalize_on_device_ms_per_batch": normalize_ms if name == "fastmae" else None,
                     "img_size": args.img_size, "batch_size": batch, "images": images,
                     "decoder": _decoder_of(name),
                     "data": args.data_label or (str(args.data) if args.data else _generated(args.large_every)),
                     "rates": list(xs)})  # fmt: skip
    return rows


def _per_count(argv, counts: list[int], root: Path, out: str | None, label: str | None = None) -> dict:
    """This script once per worker count in a child process (on ``root``), the rows merged into one results JSON,
    rewritten after each child (and each child writes its own as it goes)."""
    import json
    import subprocess

    argv = list(sys.argv[1:] if argv is None else argv)
    results = None
    with tempfile.TemporaryDirectory() as tmp:
        for workers in counts:
            part = Path(tmp) / f"w{workers}.json"
            keep = [a for i, a in enumerate(argv) if a not in ("--workers", "--out", "--data", "--make-data") and (
                    i == 0 or argv[i - 1] not in ("--workers", "--out", "--data", "--make-data"))]  # fmt: skip
            cmd = [sys.executable, __file__, *keep, "--workers", str(workers), "--data", str(root), "--out", str(part),
                   *(["--data-label", label] if label else [])]  # fmt: skip
            code = subprocess.run(cmd).returncode
            if not part.exists():
                print(f"bench_loader: {workers} workers: exit {code}, no rows")
                continue
            saved = json.loads(part.read_text())
            if results is None:
                results = Rows("loader", saved["env"], out)
            results.rows += saved["rows"]
            results.write()
    if results is None:
        raise SystemExit("bench_loader: no worker count gave rows")
    print(f"wrote {results.path}")
    return {"rows": results.rows, "path": str(results.path)}


def _generated(large_every: int) -> str:
    return "generated JPEG ~520x390 q90 (scikit-image photos)" + (f", 1 in {large_every} ~2000x1500" if large_every
                                                                   else "")  # fmt: skip


def _decoder_of(loader: str) -> str:
    """What decodes the JPEG and PNG files in ``loader``'s rows."""
    kind, _, decoder = loader.partition("-")
    if decoder in DECODER_NAMES:
        return decoder
    if loader.startswith("official") or loader == "fastmae-finetune":
        return "pillow"
    if loader == "dali":
        return "dali"
    if loader == "gpu":
        return "gpu: batched nvJPEG; cpu route: " + resolve_decoder()
    return resolve_decoder()


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


if __name__ == "__main__":
    sys.exit(cli(main))
