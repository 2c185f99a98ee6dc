"""The payoff of MAE pretraining on small images, end to end: digits, pretrained vs from scratch, several seeds.

One command runs the whole flow with the `digits` presets and records it:

1. `fastmae pretrain --preset digits`: MAE on the 1438 training digits only (labels unused), 32 px, patch 4.
2. For each seed: `fastmae finetune --preset digits` from that checkpoint and from scratch (`--pretrained none`, the
   same recipe), and `fastmae linprobe --preset digits` (probes + kNN) of both encoders (pretrained / random).
3. JSON under benchmarks/results/ (every run's summary, val top-1 per epoch, minutes) and a PNG: top-1 per epoch, MAE
   vs scratch, beside the reconstructions of the digits pretraining.

    python benchmarks/digits_payoff.py [--seeds 0,1,2] [--work output/payoff] [--quick]

`--quick` runs 2 steps of everything (the test uses it): it checks the flow, not a number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fastmae.train.finetune  # noqa: E402, F401  (imported now: the whole run uses the code it started with)
import fastmae.train.linprobe  # noqa: E402, F401
import fastmae.train.pretrain  # noqa: E402, F401
from _harness import RESULTS, env_info  # noqa: E402

from fastmae.cli import main as fastmae  # noqa: E402

TARGET_TOP1, TARGET_GAIN = 75.0, 15.0  # issue 16: MAE finetune >= 75% top-1 and >= 15 points over scratch


def _run(args: list[str], out: Path, quick: bool) -> tuple[dict, float]:
    """Run one fastmae command into ``out``; returns its summary and minutes."""
    # quick: in-process loading (no forked workers: the test process has run the profiler and compilers before)
    extra = ["--stop-after-steps", "2", "--log-every", "1", "--num-workers", "0"] if quick else []
    t0 = time.perf_counter()
    code = fastmae([*args, "--output-dir", str(out), "--no-progress", "--overwrite", *extra])  # a measurement: anew
    if code != 0:
        raise SystemExit(f"fastmae {' '.join(args)} failed with exit code {code}")
    return json.loads((out / "summary.json").read_text()), (time.perf_counter() - t0) / 60


def _epochs(out: Path) -> list[float]:
    """Val top-1 after each finetune epoch, from metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["top1"] for r in rows if "top1" in r]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run(seeds: list[int], work: Path, quick: bool, pretrain_only: bool = False) -> dict:
    pre = work / "pretrain"
    pre_summary, pre_min = _run(["pretrain", "--preset", "digits"], pre, quick)
    ckpt = str(pre / "checkpoint-last.pth")
    rows = [{"kind": "pretrain", "seed": 0, "minutes": pre_min, "summary": pre_summary}]
    if pretrain_only:
        return {"pretrain_only": True, "quick": quick, "pretrain_minutes": pre_min, "rows": rows}
    for seed in seeds:
        for init, pretrained in (("mae", ckpt), ("scratch", "none")):
            common = ["--preset", "digits", "--pretrained", pretrained, "--seed", str(seed)]
            out = work / f"finetune-{init}-{seed}"
            summary, minutes = _run(["finetune", *common], out, quick)
            rows.append({"kind": "finetune", "init": init, "seed": seed, "minutes": minutes, "top1": summary["top1"],
                         "best_top1": summary["best_top1"], "per_epoch_top1": _epochs(out),
                         "summary": summary})  # fmt: skip
            out = work / f"linprobe-{init}-{seed}"
            summary, minutes = _run(["linprobe", *common], out, quick)
            rows.append({"kind": "linprobe", "init": init, "seed": seed, "minutes": minutes, "top1": summary["top1"],
                         "knn_top1": (summary["knn"] or {}).get("top1"), "summary": summary})  # fmt: skip

    def pick(kind: str, init: str, key: str = "top1") -> list[float]:
        return [r[key] for r in rows if r["kind"] == kind and r.get("init") == init]

    ft_mae, ft_scratch = _mean(pick("finetune", "mae")), _mean(pick("finetune", "scratch"))
    result = {
        "seeds": seeds, "quick": quick, "pretrain_minutes": pre_min,
        "finetune_top1": {"mae": pick("finetune", "mae"), "scratch": pick("finetune", "scratch")},
        "finetune_top1_mean": {"mae": ft_mae, "scratch": ft_scratch}, "gain": ft_mae - ft_scratch,
        "linprobe_top1_mean": {"mae": _mean(pick("linprobe", "mae")), "scratch": _mean(pick("linprobe", "scratch"))},
        "knn_top1_mean": {"mae": _mean(pick("linprobe", "mae", "knn_top1")),
                          "scratch": _mean(pick("linprobe", "scratch", "knn_top1"))},
        "targets": {"top1": TARGET_TOP1, "gain": TARGET_GAIN},
        "meets_targets": ft_mae >= TARGET_TOP1 and ft_mae - ft_scratch >= TARGET_GAIN,
        "rows": rows,
    }  # fmt: skip
    return result


def plot(result: dict, pictures: Path, png: Path) -> Path | None:
    """Val top-1 per finetune epoch (MAE solid, scratch dashed, one line per seed) beside the last reconstruction
    picture of the digits pretraining."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image
    except ImportError:
        return None
    fig, (ax, pic) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    for row in result["rows"]:
        if row["kind"] != "finetune" or not row["per_epoch_top1"]:
            continue
        mae = row["init"] == "mae"
        epochs = range(1, len(row["per_epoch_top1"]) + 1)
        ax.plot(epochs, row["per_epoch_top1"], "-" if mae else "--", color="tab:blue" if mae else "tab:gray",
                label=f"{'MAE-pretrained' if mae else 'from scratch'}, seed {row['seed']}")  # fmt: skip
    means = result["finetune_top1_mean"]
    ax.set_title(f"digits finetune: MAE {means['mae']:.1f}% vs scratch {means['scratch']:.1f}% (mean top-1)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    last = sorted(pictures.glob("step*.png"))
    if last:
        with Image.open(last[-1]) as im:
            pic.imshow(im)
        pic.set_title("pretraining: original | masked 75% | reconstruction", fontsize=9)
    pic.axis("off")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def readme_table(saved: dict, json_name: str) -> str:
    """The README block for a results JSON: what ran, where, how long, and the table (generated, never typed)."""
    env, seeds = saved["env"], saved["seeds"]
    pre = next(r for r in saved["rows"] if r["kind"] == "pretrain")

    def cell(kind: str, init: str, key: str = "top1") -> str:
        vals = [r[key] for r in saved["rows"] if r["kind"] == kind and r.get("init") == init]
        return f"{_mean(vals):.1f} ({', '.join(f'{v:.1f}' for v in vals)})"

    def minutes(kind: str) -> str:
        return f"{_mean([r['minutes'] for r in saved['rows'] if r['kind'] == kind]):.1f}"

    lines = [
        f"Measured on **{env.get('cpu') or 'cpu'}, {env['threads']} threads** (torch {env['torch']}), git "
        f"`{str(env.get('git_sha'))[:12]}`, {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
        f"({', '.join(map(str, seeds))}); raw JSON "
        f"`benchmarks/results/{json_name}`. Pretraining {pre['minutes']:.1f} min ({pre['summary']['steps']} steps, "
        f"loss {pre['summary']['first_logged_loss']:.3f} -> {pre['summary']['final_loss']:.3f}); each finetune "
        f"{minutes('finetune')} min, each probe {minutes('linprobe')} min; {saved['total_minutes']:.0f} min in all.",
        "",
        "| val top-1 (%), mean (per seed) | MAE-pretrained | from scratch |",
        "| --- | ---: | ---: |",
        f"| finetune, 15 epochs (last epoch) | {cell('finetune', 'mae')} | {cell('finetune', 'scratch')} |",
        f"| finetune, best epoch | {cell('finetune', 'mae', 'best_top1')} | "
        f"{cell('finetune', 'scratch', 'best_top1')} |",
        f"| linear probe (best of 3 lrs) | {cell('linprobe', 'mae')} | {cell('linprobe', 'scratch')} |",
        f"| kNN (k=20) | {cell('linprobe', 'mae', 'knn_top1')} | {cell('linprobe', 'scratch', 'knn_top1')} |",
        "",
        f"Finetuning gains **{saved['gain']:+.1f} points** from MAE pretraining (target: >= {TARGET_GAIN:g} points and "
        f">= {TARGET_TOP1:g}% top-1; {'met' if saved['meets_targets'] else 'NOT met'}). 'From scratch' is the same "
        "finetune recipe from random weights; its probe and kNN rows use the randomly initialised encoder.",
        "",
        f"![digits payoff](benchmarks/results/{Path(json_name).with_suffix('.png')})",
    ]  # fmt: skip
    return "\n".join(lines)


def write_readme(json_path: Path, readme: Path) -> None:
    from fastmae.files import update_readme

    update_readme(readme, readme_table(json.loads(json_path.read_text()), json_path.name), "digits-payoff")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="finetune / probe seeds")
    ap.add_argument("--work", default="output/payoff", help="where the runs' output folders go")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/digits-payoff-<date>.json)")
    ap.add_argument("--quick", action="store_true", help="2 steps of everything: checks the flow, not a number")
    ap.add_argument("--pretrain-only", action="store_true",
                    help="time the digits pretraining alone (nothing else running), JSON digits-pretrain-<date>.json")
    ap.add_argument("--readme", default=None, help="write the table into this README between the digits-payoff markers")
    ap.add_argument("--report", default=None, metavar="JSON", help="only write --readme from this results JSON")
    args = ap.parse_args(argv)
    if args.report:
        write_readme(Path(args.report), Path(args.readme or "README.md"))
        return json.loads(Path(args.report).read_text())
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = Path(args.work)
    env = env_info(torch.device("cpu"))  # at the start: the git sha of the code that runs
    env["threads"] = torch.get_num_threads()
    t0 = time.perf_counter()
    result = run(seeds, work, args.quick, args.pretrain_only)
    result["total_minutes"] = (time.perf_counter() - t0) / 60
    if args.pretrain_only:
        path = Path(args.out) if args.out else RESULTS / f"digits-pretrain-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({"env": env, **result}, indent=2, default=str) + "\n")
        print(f"digits pretraining: {result['pretrain_minutes']:.1f} min; wrote {path}")
        return result
    path = Path(args.out) if args.out else RESULTS / f"digits-payoff-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env, **result}, indent=2, default=str) + "\n")
    png = plot(result, work / "pretrain" / "reconstructions", path.with_suffix(".png"))
    m, s = result["finetune_top1_mean"]["mae"], result["finetune_top1_mean"]["scratch"]
    lp, knn = result["linprobe_top1_mean"], result["knn_top1_mean"]
    print(f"finetune top-1, mean of {len(seeds)} seed(s): MAE {m:.2f}%, scratch {s:.2f}% ({m - s:+.2f} points); "
          f"linear probe MAE {lp['mae']:.2f}% vs {lp['scratch']:.2f}%; kNN {knn['mae']:.2f}% vs {knn['scratch']:.2f}%; "
          f"{result['total_minutes']:.1f} min in all")  # fmt: skip
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    if args.readme:
        write_readme(path, Path(args.readme))
    return result


if __name__ == "__main__":
    main()
