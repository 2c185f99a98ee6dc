"""Batched JPEG decode, decoder against decoder: images per second of one call per batch over the same ImageNet-like
JPEGs (about 520 x 390, quality 90, baseline, one in 32 about 2000 x 1500; ``bench_loader.make_jpegs``), in one run,
each decoder's pixels checked against Pillow's before it is timed.

- ``torchcodec-cuda``: ``torchcodec.decoders.decode_jpeg(files, device="cuda")``, one nvJPEG call per batch; on
  A100/H100/H200 nvJPEG decodes baseline JPEGs with the hardware JPEG engine, beside the SMs (progressive ones fall
  back to its CUDA decode). What ``--loader gpu`` uses where TorchCodec loads.
- ``torchvision-cuda``: ``torchvision.io.decode_jpeg(files, device="cuda")``, nvJPEG's CUDA decode on the SMs (what
  ``--loader gpu`` used before; torchvision 0.29 deprecates it).
- ``torchcodec-cpu``, ``torchvision-cpu``, ``pillow``: one CPU thread each (libjpeg-turbo), for scale.

    python benchmarks/bench_decode.py --device cuda --images 256          # the feed stage of the GPU sitting
    python benchmarks/bench_decode.py --smoke                              # tiny, any device: checks the script

Rows: {"name": "decode", "decoder", "device", "images", "batch", "megapixels", "img_per_s", "mpix_per_s",
"ms_per_batch", "levels" (|decoded - Pillow| in 8-bit levels: mean, 99.9th percentile, largest), "error" or
"reasons"}. The results file is rewritten after every row; a decoder that cannot run here is a row with its reason.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Rows, cli, env_info, median, one_line, sync  # noqa: E402
from bench_loader import make_jpegs  # noqa: E402
from fastmae.train.context import resolve_device  # noqa: E402

DECODERS = ("torchcodec-cuda", "torchvision-cuda", "torchcodec-cpu", "torchvision-cpu", "pillow")
# |decoded - Pillow| bounds in 8-bit levels: the CPU decoders are libjpeg-turbo like Pillow (exact); nvJPEG's IDCT and
# chroma upsampling differ at some pixels (gpu_smoke.py's bounds).
BOUNDS = {"cuda": {"mean": 2.0, "p999": 24.0, "max": 64.0}, "cpu": {"mean": 0.0, "p999": 0.0, "max": 0.0}}


def _decoder(name: str):
    """``fn(list of encoded uint8 tensors) -> list of [3, H, W] uint8``, or raises why it cannot run."""
    lib, _, where = name.partition("-")
    if name == "pillow":
        return lambda files: [torch.from_numpy(np.array(Image.open(_bytes(f)).convert("RGB"))).permute(2, 0, 1)
                              for f in files]  # fmt: skip
    if where == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("needs CUDA (torch.cuda.is_available() is False)")
    device = torch.device(where)
    if lib == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        return lambda files: decode_jpeg(files, mode="RGB", device=device)
    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)  # fmt: skip
    return lambda files: decode_jpeg(files, mode=ImageReadMode.RGB, device=device)


def _version(lib: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(lib)
    except PackageNotFoundError:
        return None


def _bytes(f: torch.Tensor):
    import io

    return io.BytesIO(f.numpy().tobytes())


def _levels(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict:
    d = torch.cat([(a.cpu().float() - b.float()).abs().flatten() for a, b in zip(got, want, strict=True)])
    sample = d[:: max(1, d.numel() // 2_000_000)]
    return {"mean": d.mean().item(), "p999": torch.quantile(sample, 0.999).item(), "max": d.max().item()}


def measure(name: str, files: list[torch.Tensor], reference: list[torch.Tensor], batch: int, reps: int) -> dict:
    """One decoder: its pixels against Pillow's (within :data:`BOUNDS` or not timed), then the median seconds of
    decoding every batch of ``files`` (one call each), after one untimed pass."""
    row = {"name": "decode", "decoder": name, "device": "cuda" if name.endswith("cuda") else "cpu",
           "images": len(files), "batch": batch, "megapixels": sum(r.shape[1] * r.shape[2] for r in reference) / 1e6,
           "img_per_s": None, "version": _version(name.partition("-")[0])}  # fmt: skip
    try:
        fn = _decoder(name)
        got = fn(files)
    except Exception as exc:  # not installed, no nvJPEG, no CUDA: the row says so
        return {**row, "reasons": [one_line(exc, typed=True)]}
    row["levels"] = _levels(got, reference)
    bounds = BOUNDS[row["device"]]
    if over := [f"{k} {row['levels'][k]:.2f} > {bounds[k]:g}" for k in bounds if not row["levels"][k] <= bounds[k]]:
        return {**row, "error": f"pixels off Pillow's: {', '.join(over)} levels: not timed"}
    device = torch.device(row["device"])
    batches = [files[i : i + batch] for i in range(0, len(files), batch)]
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = median(times)
    return {**row, "img_per_s": len(files) / seconds, "mpix_per_s": row["megapixels"] / seconds,
            "ms_per_batch": 1e3 * seconds / len(batches), "seconds": times}  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None, help="files per call (default: all of them, one call)")
    ap.add_argument("--large-every", type=int, default=32, help="one JPEG in N is ~2000 x 1500 (0: none)")
    ap.add_argument("--decoders", default=",".join(DECODERS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="auto", help="cuda: the machine must have it (the CUDA rows); cpu: CPU rows")
    ap.add_argument("--smoke", action="store_true", help="16 images, 2 reps: checks the script on any machine")
    ap.add_argument("--out", default=None, help="JSON (default: benchmarks/results/decode-<device>-<date>.json)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)  # --device cuda without one stops here, before any file is written
    if args.smoke:
        args.images, args.reps, args.large_every = 16, 2, 8
    names = [n for n in args.decoders.split(",") if n]
    if unknown := [n for n in names if n not in DECODERS]:
        ap.error(f"unknown decoders {', '.join(unknown)}; choose from {', '.join(DECODERS)}")
    results = Rows("decode", env_info(device), args.out)
    with tempfile.TemporaryDirectory() as tmp:
        paths = sorted(make_jpegs(Path(tmp), args.images, seed=7, classes=1, large_every=args.large_every).rglob(
            "*.jpg"))  # fmt: skip
        files = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    reference = _decoder("pillow")(files)
    for name in names:
        row = results.add(measure(name, files, reference, args.batch or len(files), args.reps))
        took = (f"{row['img_per_s']:8.1f} img/s {row['mpix_per_s']:7.1f} Mpx/s" if row["img_per_s"] else
                row.get("error") or "; ".join(row["reasons"]))  # fmt: skip
        print(f"{name:18s} {took[:140]}", flush=True)
    print(f"wrote {results.path}")
    return {"rows": results.rows, "path": str(results.path)}


if __name__ == "__main__":
    sys.exit(cli(main))
