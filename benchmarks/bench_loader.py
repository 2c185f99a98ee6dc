"""Loader throughput: images per second out of the MAE pretrain pipeline (random-resized-crop 0.2-1, bicubic resize,
flip, normalise) at 224 px, in one run, with the same number of worker processes (or DALI threads):

- ``official``: what facebookresearch/mae's main_pretrain.py builds: ``ImageFolder`` + ``RandomResizedCrop(scale=(0.2,
  1), bicubic)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` in a ``DataLoader`` (Pillow decode, float
  batches out of the workers);
- ``fastmae``: fastmae's torchvision loader (torchvision.io decode, uint8 crop / resize / flip in the workers; uint8
  batches, normalised by the step on its device: on a GPU that is in the timed loop, on a CPU it is the step's own
  compute and reported apart, ``normalize_on_device_ms_per_batch``);
- ``decode``: reading and decoding alone in the same workers, nothing else: the limit of any CPU loader;
- ``dali``: fastmae's DALI loader (CPU decode here, nvJPEG on a GPU), when nvidia-dali is installed;
- ``official-finetune`` / ``fastmae-finetune``: the finetune recipe's augmentation (timm's RandAugment and random
  erasing need Pillow, so fastmae keeps Pillow there, seeded per sample): the baseline for that row is
  ``official-finetune``.

Rates are medians of interleaved rounds; ``img_per_s_per_worker`` divides by the workers, and ``vs_official`` is the
ratio to the official loader in the same run. Without ``--data`` it writes ImageNet-like JPEGs (about 520 x 390,
quality 90, cut from scikit-image's photos) to a temporary folder first.

    python benchmarks/bench_loader.py [--data DIR] [--workers 2] [--batch 64] [--batches 20] [--images 1024]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _harness import env_info, median, report, sync, write_results  # noqa: E402
from fastmae.train.data.dali import DALILoader, dali_unavailable_reason  # noqa: E402
from fastmae.train.data.decode import IMAGENET_MEAN, IMAGENET_STD, decode  # noqa: E402
from fastmae.train.data.index import bundled_images_dir, index_data  # noqa: E402
from fastmae.train.data.loaders import TorchvisionLoader, to_device  # noqa: E402
from fastmae.train.run import resolve_device  # noqa: E402


def make_jpegs(folder: Path, count: int, seed: int = 0, classes: int = 4) -> Path:
    """ImageNet-like JPEGs in ``classes`` folders: crops of scikit-image's photos at random places and scales, resized
    to about 520 x 390 (a few pixels either way), quality 90: real photo statistics, so decoding costs what it does
    on ImageNet (~110 KB each)."""
    photos = []
    for p in sorted(bundled_images_dir().iterdir()):
        try:
            img = Image.open(p).convert("RGB")
        except Exception:
            continue
        if min(img.size) >= 256:
            photos.append(img)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = photos[i % len(photos)]
        w, h = int(rng.integers(505, 540)), int(rng.integers(375, 405))
        frac = rng.uniform(0.6, 1.0)
        cw, ch = int(src.width * frac), int(src.height * frac)
        x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        img = src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        img.save(folder / f"class{i % classes}" / f"{i:06d}.jpg", quality=90)
    return folder


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
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=pin,
                                       drop_last=True, persistent_workers=workers > 0)  # fmt: skip


class DecodeOnly(torch.utils.data.Dataset):
    """Read and decode (fastmae's routes), nothing else: what any CPU loader must at least do per image."""

    def __init__(self, index):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> int:
        return decode(self.index.read(i), int(self.index.routes[i])).shape[-1]


def _forever(make_epoch):
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def timed(batches_of, device: torch.device, batches: int, batch: int, settle: float) -> float:
    """Images per second over ``batches`` batches (on a GPU moved there, uint8 ones normalised there), after two
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
            imgs = to_device(imgs, device)
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
        to_device(imgs, device)
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return median(times[1:])


def readme_table(saved: dict, json_name: str) -> str:
    """The README table of a results JSON: one row per loader, ratios to the official loader of the same kind."""
    env, rows = saved["env"], saved["rows"]
    first = rows[0]
    lines = [
        f"Measured on **{env.get('gpu') if env.get('gpu') not in (None, 'cpu') else env.get('cpu', 'cpu')}**, "
        f"{first['workers']} workers, batch {first['batch_size']}, {first['img_size']} px, {first['images']} images "
        f"({first['data']}); torch {env.get('torch')}, git `{str(env.get('git_sha'))[:12]}`, "
        f"{str(env.get('date', ''))[:10]}; raw JSON `benchmarks/results/{json_name}`.",
        "",
        "| loader | augmentation | output | img/s | img/s per worker | vs official (same run) |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['loader']} | {r.get('kind', 'pretrain')} | {r.get('output', 'float32')} | "
                     f"{r['img_per_s']:.0f} | {r['img_per_s_per_worker']:.0f} | {r['vs_official']:.2f}x |")
    norm = next((r["normalize_on_device_ms_per_batch"] for r in rows if r.get("normalize_on_device_ms_per_batch")),
                None)  # fmt: skip
    if norm is not None and first["device"] == "cpu":
        lines += ["", f"fastmae's batches leave the workers as uint8; the step normalises them on its device, here the "
                      f"CPU: {norm:.1f} ms per batch of {first['batch_size']}, outside the loader's time."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="ImageFolder tree (default: generated JPEGs)")
    ap.add_argument("--images", type=int, default=1024, help="how many JPEGs to generate without --data")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on CPU (the recipe's per-GPU batch, 4096 on "
                    "64 GPUs), 256 on GPU")  # fmt: skip
    ap.add_argument("--batches", type=int, default=None, help="batches timed per measurement (default 20 / 50)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of every loader (= DALI threads)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurements per loader (median kept)")
    ap.add_argument("--loaders", default="official,fastmae,decode,dali,official-finetune,fastmae-finetune",
                    help="which to measure; official and official-finetune are the baselines")  # fmt: skip
    ap.add_argument("--settle", type=float, default=1.5, help="seconds of rest after each measurement")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script works (CPU, seconds)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/loader-<device>-<date>.json)")
    ap.add_argument("--report", default=None, metavar="JSON", help="only print the table of a results JSON")
    ap.add_argument("--readme", default=None, help="with --report: write the table between the loader-bench markers")
    args = ap.parse_args(argv)
    if args.report:
        table = report(args.report, readme_table, "loader-bench", args.readme)
        print(table)
        return {"table": table}

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.smoke:
        args.images, args.img_size, args.batch, args.batches, args.rounds, args.settle = 24, 64, 4, 2, 1, 0.0
    batch = args.batch or (256 if gpu else 64)
    batches = args.batches or (50 if gpu else 20)
    workers = args.workers
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else make_jpegs(Path(tmp) / "jpegs", max(args.images, batch * 4))
        index = index_data(root)
        fast = TorchvisionLoader(index, args.img_size, batch, seed=0, num_workers=workers, pin=gpu)
        official = official_loader(root, args.img_size, batch, workers, gpu)
        decode_only = torch.utils.data.DataLoader(DecodeOnly(index), batch_size=batch, shuffle=True,
                                                  num_workers=workers, drop_last=True,
                                                  persistent_workers=workers > 0)  # fmt: skip
        fast_ft = TorchvisionLoader(index, args.img_size, batch, seed=0, num_workers=workers, pin=gpu, kind="finetune")
        official_ft = official_loader(root, args.img_size, batch, workers, gpu, finetune=True)
        sources = {
            "official": _forever(lambda e: (x for x, _ in official)),
            "fastmae": _forever(lambda e: (x for x, _ in fast.epoch(e))),
            "decode": _forever(lambda e: iter(decode_only)),
            "official-finetune": _forever(lambda e: (x for x, _ in official_ft)),
            "fastmae-finetune": _forever(lambda e: (x for x, _ in fast_ft.epoch(e))),
        }
        reason = dali_unavailable_reason()
        if reason is None:
            dali = DALILoader(index, args.img_size, batch, seed=0, device=device, num_threads=max(workers, 1))
            sources["dali"] = _forever(lambda e: (x for x, _ in dali.epoch(e)))
        else:
            print(f"DALI not measured: {reason}")
        sources = {k: v for k, v in sources.items() if k in args.loaders.split(",")}
        rates: dict[str, list[float]] = {k: [] for k in sources}
        for _ in range(args.rounds):
            for name, source in sources.items():
                rates[name].append(timed(source, device, batches, batch, args.settle))

    env = env_info(device)
    rows = []
    normalize_ms = _normalize_ms(device, batch, args.img_size)
    for name, xs in rates.items():
        rate = median(xs)
        base = median(rates["official-finetune" if "finetune" in name else "official"])
        row = {"name": "loader", "loader": name, "kind": "finetune" if "finetune" in name else "pretrain",
               "device": "gpu (mixed decode)" if gpu and name == "dali" else device.type, "workers": workers,
               "img_per_s": rate, "img_per_s_per_worker": rate / max(workers, 1), "vs_official": rate / base,
               "output": "uint8" if name == "fastmae" else "float32", "normalize_on_device_ms_per_batch":
               normalize_ms if name == "fastmae" else None,
               "img_size": args.img_size, "batch_size": batch, "images": len(index),
               "data": str(args.data) if args.data else "generated JPEG ~520x390 q90 (scikit-image photos)",
               "rates": xs}  # fmt: skip
        rows.append(row)
        print(f"{name:10s} {row['device']:20s} {workers:2d} workers  {rate:8.1f} img/s  "
              f"{row['img_per_s_per_worker']:7.1f} per worker  ({row['vs_official']:.2f}x official)")  # fmt: skip
    path = write_results("loader", rows, env, args.out)
    print(f"wrote {path}")
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    main()
