"""Loader throughput: images per second out of the MAE pretrain pipeline (random-resized-crop, bicubic resize, flip,
normalise) at 224 px, DALI vs torchvision with the same number of CPU threads, in one run.

On a GPU machine DALI decodes with ``device="mixed"`` (nvJPEG) and both loaders deliver batches on the GPU; on CPU
DALI runs its CPU pipeline (``device_id=None``). Without ``--data`` it writes ImageNet-like JPEGs (500x375, q90) to a
temporary folder first.

    python benchmarks/bench_loader.py [--data DIR] [--threads 16] [--batch 128] [--batches 40] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _harness import env_info, median, sync, write_results  # noqa: E402
from fastmae.train.data.dali import DALILoader, dali_unavailable_reason  # noqa: E402
from fastmae.train.data.loaders import TorchvisionLoader  # noqa: E402
from fastmae.train.data.sources import index_data  # noqa: E402
from fastmae.train.run import resolve_device  # noqa: E402


def make_jpegs(folder: Path, count: int, size=(500, 375), seed: int = 0) -> Path:
    """Photo-like JPEGs: smooth colour fields plus texture, so they compress like real photos (~60-120 KB)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        f = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(x * f[c] + y * f[(c + 1) % 3] + i) for c in range(3)], -1) * 90 + 128
        img = (base + rng.normal(0, 18, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def rate(loader, device: torch.device, batches: int) -> float:
    """Images per second over ``batches`` batches, after one warm-up batch (pipeline build, worker start)."""
    it = iter(_forever(loader))
    next(it)
    sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        imgs, _ = next(it)
        imgs = imgs.to(device, non_blocking=True)
        n += imgs.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def _forever(loader):
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="image folder or shards (default: generated JPEGs)")
    ap.add_argument("--images", type=int, default=512, help="how many JPEGs to generate without --data")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 256 on GPU")
    ap.add_argument("--batches", type=int, default=None, help="batches timed per measurement (default 10 / 50)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DALI threads = torchvision workers")
    ap.add_argument("--rounds", type=int, default=2, help="alternating measurements per loader (median kept)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script works (CPU, seconds)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.smoke:
        args.images, args.img_size, args.batch, args.batches, args.rounds = 24, 64, 4, 2, 1
    batch = args.batch or (256 if gpu else 32)
    batches = args.batches or (50 if gpu else 10)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_jpegs(Path(tmp), max(args.images, batch * 2))
        index = index_data(data)
        loaders = {
            "torchvision": TorchvisionLoader(index, args.img_size, batch, seed=0, num_workers=args.threads, pin=gpu),
        }
        reason = dali_unavailable_reason()
        if reason is None:
            loaders["dali"] = DALILoader(index, args.img_size, batch, seed=0, device=device, num_threads=args.threads)
        else:
            print(f"DALI not measured: {reason}")
        rates: dict[str, list[float]] = {k: [] for k in loaders}
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                rates[name].append(rate(loader, device, batches))

    env = env_info(device)
    base = median(rates["torchvision"])
    rows = []
    for name, xs in rates.items():
        row = {"name": "loader", "loader": name, "device": "gpu (mixed decode)" if gpu and name == "dali" else
               device.type, "threads": args.threads, "img_per_s": median(xs), "img_size": args.img_size,
               "batch_size": batch, "images": len(index), "data": "generated JPEG 500x375 q90" if not args.data else
               str(args.data), "rates": xs, "vs_torchvision": median(xs) / base}  # fmt: skip
        rows.append(row)
        print(f"{name:12s} {row['device']:20s} {args.threads:3d} threads  {row['img_per_s']:8.1f} img/s  "
              f"({row['vs_torchvision']:.2f}x torchvision)")  # fmt: skip
    path = write_results("loader", rows, env, args.out)
    print(f"wrote {path}")
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    main()
