"""The image index at ImageNet's scale: how the start of a run grows with the number of files.

For each N (default 10k, 100k and ImageNet-1k's 1,281,167) it writes N tiny JPEGs in 1000 class folders, then, each
in a fresh process:

- ``cold``: the first start: every file found and decoded once (validation), the cache written; the files' pages
  are evicted from the page cache first (``posix_fadvise(DONTNEED)``; folders' metadata stays cached: dropping that
  needs root);
- ``warm``: every later start: the cache read, one ``stat`` per folder;
- ``warm_stat``: the same with ``--index-check stat`` (one ``stat`` per file as well);
- ``pretrain``: a whole ``fastmae pretrain`` up to its first optimizer step (warm cache), against the same command on
  a 1000-file tree, for the time and peak memory the data set adds (the best of two alternating runs of each);
- ``workers``: a torchvision loader with 2 workers reading 80k samples: each worker's proportional set size (PSS)
  after its first batch and at the end (copy-on-read growth shows here).

Time is wall clock; memory is the process's resident set (``VmRSS`` before and after, ``VmHWM`` for the peak).

    python benchmarks/bench_index.py [--sizes 10000,100000,1281167] [--root DIR] [--keep]
    python benchmarks/bench_index.py --report benchmarks/results/index-cpu-<date>.json --readme docs/data.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _harness import env_info, write_results  # noqa: E402

IMAGENET = 1_281_167
CLASSES = 1000


def _tiny_jpegs(count: int = 16) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _write_classes(args: tuple[str, list[int], int]) -> None:
    root, classes, n = args
    blobs = _tiny_jpegs()
    for c in classes:
        folder = os.path.join(root, f"n{c:08d}")
        os.makedirs(folder, exist_ok=True)
        for k in range(c * n // CLASSES, (c + 1) * n // CLASSES):
            fd = os.open(os.path.join(folder, f"n{c:08d}_{k}.JPEG"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, blobs[k % len(blobs)])
            os.close(fd)


def make_tree(root: Path, n: int, workers: int = 2) -> float:
    """``n`` tiny JPEGs in 1000 class folders, ImageNet-style names; returns the seconds it took."""
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    parts = [(str(root), list(range(w, CLASSES, workers)), n) for w in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_classes, parts))
    time.sleep(1.1)  # nothing just written: a real data set is older than the index's one-second window
    return time.perf_counter() - t0


def _write_shards(args: tuple[str, list[int], int, int]) -> None:
    root, ids, n, count = args
    blobs = _tiny_jpegs()
    for s in ids:
        with tarfile.open(os.path.join(root, f"train-{s:04d}.tar"), "w") as tar:
            for k in range(s * n // count, (s + 1) * n // count):
                for name, data in ((f"s{k:07d}.jpg", blobs[k % len(blobs)]), (f"s{k:07d}.cls", str(s).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def make_shards(root: Path, n: int, count: int = CLASSES, workers: int = 2) -> float:
    """``n`` tiny JPEG samples (``key.jpg`` + ``key.cls``) in ``count`` webdataset shards; returns the seconds."""
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_shards, [(str(root), list(range(w, count, workers)), n, count) for w in range(workers)]))
    time.sleep(1.1)
    return time.perf_counter() - t0


def evict(root: Path) -> None:
    """Drop the files' pages from the page cache, so that the cold start reads them from the disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def _status(key: str) -> float:
    """A /proc/self/status field in MB."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pss(pid: int) -> float:
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, root: str, out: str) -> None:
    """One measurement in this (fresh) process; writes a JSON object to ``out``."""
    import torch  # noqa: F401  (imported before the baseline: the index must not be charged for torch)
    from fastmae.train.data.index import index_data

    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    index = index_data(root, check="stat" if mode == "warm_stat" else "listing")
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "images": len(index), "rss_before_mb": rss0, "rss_after_mb": _status("VmRSS"),
              "peak_rss_mb": _status("VmHWM"), "index_mb": _status("VmRSS") - rss0, **index.stats}  # fmt: skip
    if mode == "workers":
        from fastmae.train.data.loaders import TorchvisionLoader

        loader = TorchvisionLoader(index, 32, 64, seed=0, num_workers=2)
        total = min(80_000, loader.steps_per_epoch * 64)
        batches = loader.epoch(0)
        next(batches)
        pids = [w.pid for w in loader.loader._iterator._workers]
        start = [_pss(p) for p in pids]
        t1 = time.perf_counter()
        seen = 64
        for batch in batches:
            seen += len(batch)
            if seen >= total:
                break
        result.update({"samples": seen, "worker_pss_start_mb": start, "worker_pss_end_mb": [_pss(p) for p in pids],
                       "img_per_s": (seen - 64) / (time.perf_counter() - t1)})  # fmt: skip
    Path(out).write_text(json.dumps(result))


def measure(mode: str, root: Path, cache: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = {**os.environ, "FASTMAE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, __file__, "--child", mode, str(root), f.name], check=True, env=env)
        return json.loads(Path(f.name).read_text())


def pretrain_start(root: Path, cache: Path, out: Path) -> dict:
    """``fastmae pretrain`` to its first optimizer step (one step, tiny model and images): wall time and the
    process's peak RSS (from the kernel's accounting of the finished child)."""
    cmd = [sys.executable, "-m", "fastmae.cli", "pretrain", "--data", str(root), "--model", "mae_vit_tiny_patch16",
           "--img-size", "32", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--stop-after-steps", "1",
           "--num-workers", "2", "--picture-every", "0", "--no-progress", "--no-tensorboard", "--output-dir",
           str(out)]  # fmt: skip
    env = {**os.environ, "FASTMAE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, _, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def _mb(x: float) -> str:
    return f"{x:.0f} MB"


def readme_table(saved: dict, json_name: str, png_link: str) -> str:
    """The docs table of results (rows per layout and file count) and the chart, linked as ``png_link``."""
    env = saved["env"]
    lines = [
        f"Measured on **{env.get('cpu', '?')}, {os.cpu_count()} cores** (torch {env.get('torch')}), git "
        f"`{env.get('git_sha')}`, {env.get('date', '')[:10]}; raw JSON in `benchmarks/results/`: "
        f"{json_name}.",
        "",
        "| images | first start (validation) | later start | later start, `--index-check stat` | index in memory "
        "| `fastmae pretrain` start vs 1000 files | DataLoader worker PSS, first batch -> 80k samples |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in saved["rows"]:
        pre = r.get("pretrain")
        pre_text = f"{pre['vs_1000_files_s']:+.2f} s, {pre['vs_1000_files_peak_mb']:+.0f} MB peak" if pre else "n/a"
        w = r.get("workers")
        w_text = (" / ".join(f"{a:.0f} -> {b:.0f} MB" for a, b in zip(w["worker_pss_start_mb"], w["worker_pss_end_mb"],
                                                                      strict=True)) if w else "n/a")  # fmt: skip
        layout = "files in 1000 folders" if r.get("layout", "folders") == "folders" else "in 1000 .tar shards"
        stat = f"{r['warm_stat']['seconds']:.2f} s" if r.get("layout", "folders") == "folders" else "n/a"
        lines.append(f"| {r['files']:,} {layout} | {r['cold']['seconds']:.1f} s | {r['warm']['seconds']:.2f} s | "
                     f"{stat} | {_mb(r['warm']['index_mb'])} | {pre_text} | {w_text} |")
    lines += ["", f"![index start against file count]({png_link})"]
    return "\n".join(lines)


def plot(saved: dict, png: Path) -> Path | None:
    """Start time against file count (log-log), first and later starts."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for layout, style in (("folders", "-"), ("shards", "--")):
        rows = [r for r in saved["rows"] if r.get("layout", "folders") == layout]
        if not rows:
            continue
        files = [r["files"] for r in rows]
        for key, label, color in (("cold", "first start (validates everything)", "tab:blue"),
                                  ("warm_stat", "later start, stat per file", "tab:orange"),
                                  ("warm", "later start (default)", "tab:green")):  # fmt: skip
            if key == "warm_stat" and layout == "shards":
                continue
            ax.plot(files, [r[key]["seconds"] for r in rows], style, marker="o", color=color,
                    label=f"{label}, {layout}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images")
    ax.set_ylabel("seconds to index")
    ax.set_title("fastmae image index: start time against data set size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def report(json_paths: list[Path], readme: Path | None) -> str:
    """Chart (next to the first JSON) and table of one or more results JSONs, merged (folders and shards)."""
    saves = [json.loads(Path(p).read_text()) for p in json_paths]
    shas = dict.fromkeys(str(s["env"].get("git_sha"))[:12] for s in saves)
    saved = {"env": {**saves[0]["env"], "git_sha": "`, `".join(shas)}, "rows": [r for s in saves for r in s["rows"]]}
    png = Path(json_paths[0]).with_suffix(".png")
    plot(saved, png)
    # the link as the page that shows it sees the chart (docs/data.md: ../benchmarks/results/...)
    link = os.path.relpath(png.resolve(), Path(readme).resolve().parent) if readme else f"benchmarks/results/{png.name}"
    table = readme_table(saved, ", ".join(Path(p).name for p in json_paths), Path(link).as_posix())
    if readme is not None:
        from fastmae.files import update_readme

        update_readme(readme, table, "index-bench")
    return table


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=f"10000,100000,{IMAGENET}", help="file counts, comma-separated")
    ap.add_argument("--root", default=None, help="where to write the trees (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated trees")
    ap.add_argument("--no-evict", action="store_true", help="leave the files in the page cache for the cold start")
    ap.add_argument("--skip", default="", help="comma-separated measurements to leave out (pretrain, workers)")
    ap.add_argument("--layout", choices=("folders", "shards"), default="folders",
                    help="1000 class folders of files, or 1000 webdataset .tar shards")  # fmt: skip
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/index-<device>-<date>.json)")
    ap.add_argument("--report", default=None, nargs="+", metavar="JSON",
                    help="only draw the chart and print the table of these JSONs (merged)")  # fmt: skip
    ap.add_argument("--readme", default=None,
                    help="with --report: the page to write (docs/data.md), between its index-bench markers")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "ROOT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return {}
    if args.report:
        table = report([Path(p) for p in args.report], Path(args.readme) if args.readme else None)
        print(table)
        return {"table": table}
    base = Path(args.root or tempfile.mkdtemp(prefix="fastmae-index-"))
    skip = set(args.skip.split(","))
    rows = []
    try:
        reference = None
        if "pretrain" not in skip:
            small, small_cache = base / "n1000", base / "cache-1000"
            make_tree(small, 1000)
            measure("cold", small, small_cache)
            reference = True
        for n in [int(x) for x in args.sizes.split(",") if x.strip()]:
            root, cache = base / f"n{n}", base / f"cache-{n}"
            made = make_tree(root, n) if args.layout == "folders" else make_shards(root, n)
            print(f"N={n}: wrote the {args.layout} in {made:.0f} s", flush=True)
            if not args.no_evict:
                evict(root)
            row = {"name": "index", "files": n, "layout": args.layout, "folders": CLASSES, "generate_s": made,
                   "page_cache": "evicted" if not args.no_evict else "warm"}  # fmt: skip
            for mode in ("cold", "warm", "warm_stat"):
                row[mode] = measure(mode, root, cache)
                print(f"N={n} {mode:10s} {row[mode]['seconds']:8.2f} s  index {row[mode]['index_mb']:7.1f} MB  "
                      f"peak {row[mode]['peak_rss_mb']:7.1f} MB", flush=True)  # fmt: skip
            if reference is not None:  # the best of two runs each, alternating: process start-up is noisy
                runs = [(pretrain_start(small, small_cache, base / "out"), pretrain_start(root, cache, base / "out"))
                        for _ in range(2)]  # fmt: skip
                ref = {k: min(r[0][k] for r in runs) for k in ("seconds", "peak_rss_mb")}
                got = {k: min(r[1][k] for r in runs) for k in ("seconds", "peak_rss_mb")}
                row["pretrain"] = {**got, "vs_1000_files_s": got["seconds"] - ref["seconds"],
                                   "vs_1000_files_peak_mb": got["peak_rss_mb"] - ref["peak_rss_mb"],
                                   "reference": ref}  # fmt: skip
                print(f"N={n} pretrain   +{row['pretrain']['vs_1000_files_s']:.2f} s, "
                      f"+{row['pretrain']['vs_1000_files_peak_mb']:.0f} MB peak over 1000 files", flush=True)
            if "workers" not in skip:
                w = measure("workers", root, cache)
                row["workers"] = w
                print(f"N={n} workers PSS {w['worker_pss_start_mb']} -> {w['worker_pss_end_mb']} MB over "
                      f"{w['samples']} samples", flush=True)  # fmt: skip
            rows.append(row)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    import torch

    path = write_results("index", rows, env_info(torch.device("cpu")), args.out)
    print(f"wrote {path}")
    return {"rows": rows, "path": str(path)}


if __name__ == "__main__":
    main()
