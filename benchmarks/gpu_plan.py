"""What an 8-GPU pretraining run of ViT-B/L/H can expect: the step rate per GPU, memory per image, the largest batch
per GPU, the batch and accumulation that keep the recipe's 4096, and the time for 800 epochs of ImageNet-1k. Every
number is marked: measured (which results file, when) or derived (from what). Nothing is measured here: the table is
generated from the GPU sittings' results JSONs and the models' own counts (parameters, FLOPs), and written between the
``gpu-plan`` markers of docs/pretraining.md.

    python benchmarks/gpu_plan.py [--results JSON ...] [--readme docs/pretraining.md] [--table]

``--table`` also writes ``fastmae/batch_table.json``: the same state and activation bytes per model, which
``fastmae.batching`` reads to choose a preset's batch per process and gradient accumulation at any GPU count; and the
same for finetuning and linear probing, derived from pretraining's (nothing downstream is measured on a GPU):
- finetuning: the encoder over every token (197 for ViT-B/L, 257 for ViT-H/14), no decoder; activations per image =
  this model's pretraining activations x finetuning's sum over its blocks of tokens x width / pretraining's (d2's rule).
- linear probing: the encoder frozen under ``no_grad``, so a block's activations are freed once the next has run;
  activations per image = one block's share of the same (tokens x width of one block); the state is the fp32 weights.

How each derived number is made (also stated under the table):
- memory: a step's peak = the fixed state + batch x activations per image. Fixed state, from the parameter count:
  fp32 weights (4 B per parameter), gradients and AdamW's two moments (12 B per trained parameter), and under DDP its
  gradient buckets (4 B more). Activations per image = (measured peak - the one-process fixed state) / batch.
- ViT-H's activations: ViT-L's scaled by the sum over the encoder's and decoder's blocks of tokens x width (the rule
  is checked by predicting ViT-B's from ViT-L's, and the error is printed under the table).
- a rate not measured: ViT-L's measured model-FLOP rate over the model's FLOPs per image (the same MFU as ViT-L).
- the largest batch: (a usable 90% of the card's memory - the DDP fixed state) / activations per image.
- 800 epochs: 800 x 1,281,167 images / (8 x the rate per GPU): linear scaling and a loader that keeps up, neither
  measured.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from fastmae.files import update_readme
from fastmae.models import create_model, flops_per_image, model_args

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "fastmae" / "batch_table.json"  # --table: what fastmae.batching reads
MODELS = ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")
SHORT = {"mae_vit_base_patch16": "ViT-B/16", "mae_vit_large_patch16": "ViT-L/16", "mae_vit_huge_patch14": "ViT-H/14"}
DEFAULT_RESULTS = ("h200-20261130-pretrain-vit-b-dec8.json", "h200-20261130-pretrain-vit-l-dec8.json")
SMI = "h200-20261130-nvidia-smi.txt"  # the H200's memory as nvidia-smi reported it at that sitting
LOADER = "loader-cpu-20261203-025324.json"  # the CPU loader's rate per worker (benchmarks/bench_loader.py)
IMAGENET = 1_281_167  # ImageNet-1k training images
CLASSES = 1000  # ImageNet-1k classes: the finetuning head the batch table counts
EPOCHS, GPUS, RECIPE_BATCH = 800, 8, 4096
USABLE = 0.9  # of a card's memory: the CUDA context, the allocator's fragmentation and workspaces take the rest
H100_BYTES = 80 * 2**30  # an H100 80 GB (its datasheet's 80 GB, taken as GiB)


def counts(name: str) -> dict:
    """Parameters (all, trained), forward FLOPs per image (visible-only encoder, mask ratio 0.75) and the sum of
    tokens x width over the blocks, for ``name``; built on the meta device."""
    with torch.device("meta"):
        model = create_model(name)
    a = model_args(name)
    patches = model.patch_embed.num_patches  # at 224 px
    kept = int(patches * 0.25)
    return {"params": sum(p.numel() for p in model.parameters()),
            "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "flops": flops_per_image(model, 0.75, "visible")["total"],
            "token_width": a["depth"] * (kept + 1) * a["embed_dim"]
            + a["decoder_depth"] * (patches + 1) * a["decoder_embed_dim"]}  # fmt: skip


def downstream_counts(name: str) -> dict:
    """Parameters of the finetuned ViT (a ``CLASSES``-way head, all trained) and of the probed encoder (no head,
    frozen), and the sums of tokens x width over the blocks that a finetuning step keeps for its backward (every
    block, every token, cls included) and that a frozen forward holds at once (one block), at 224 px; built on the
    meta device."""
    from fastmae.interop import create_vit

    with torch.device("meta"):
        ft, lp = create_vit(name, CLASSES, 224, "avg"), create_vit(name, 0, 224, "token")
    a = model_args(name)
    tokens = ft.patch_embed.num_patches + 1
    return {"ft_params": sum(p.numel() for p in ft.parameters()), "lp_params": sum(p.numel() for p in lp.parameters()),
            "tokens": tokens, "ft_token_width": a["depth"] * tokens * a["embed_dim"],
            "lp_token_width": tokens * a["embed_dim"], "depth": a["depth"], "width": a["embed_dim"]}  # fmt: skip


def state_bytes(c: dict, ddp: bool) -> float:
    """Weights (4 B), gradients + AdamW moments (12 B per trained parameter), DDP's gradient buckets (4 B)."""
    return 4 * c["params"] + (16 if ddp else 12) * c["trained"]


def measured_rows(paths: list[Path]) -> dict[str, dict]:
    """The fastmae visible-encoder row of each model (the fastest where there are several), with its file and date."""
    best: dict[str, dict] = {}
    for path in paths:
        saved = json.loads(path.read_text())
        for row in saved["rows"]:
            if (row.get("name") != "pretrain_step" or row.get("config") != "fastmae" or row.get("error")
                    or row.get("encoder_mode") != "visible" or row.get("img_per_s") is None):  # fmt: skip
                continue
            if row["model"] not in best or row["img_per_s"] > best[row["model"]]["img_per_s"]:
                best[row["model"]] = {**row, "file": path.name, "gpu": saved["env"].get("gpu"),
                                      "date": str(saved["env"].get("date", ""))[:10]}  # fmt: skip
    return best


def card_bytes(smi: Path) -> float:
    """The card's memory from an ``nvidia-smi`` listing (``0MiB / 143771MiB``)."""
    m = re.search(r"/\s*(\d+)MiB", smi.read_text())
    if not m:
        raise SystemExit(f"no memory total in {smi}")
    return int(m.group(1)) * 2**20


def loader_rate(path: Path) -> tuple[float, str] | None:
    """The fastmae loader's img/s per worker in a CPU loader benchmark (at its most workers), and the file's name."""
    rows = [r for r in json.loads(path.read_text())["rows"] if r.get("loader") == "fastmae"
            and r.get("kind") == "pretrain"]  # fmt: skip
    if not rows:
        return None
    return max(rows, key=lambda r: r["workers"])["img_per_s_per_worker"], path.name


def largest(capacity: float, state: float, per_image: float) -> int:
    return max(int((USABLE * capacity - state) / per_image) // 8 * 8, 0)


def recipe_split(batch: int) -> str:
    """Per-GPU batch x accumulation that makes the recipe's 4096 on 8 GPUs with at most ``batch`` per step."""
    want = RECIPE_BATCH // GPUS
    if batch >= want:
        return f"{want} x 1"
    if batch < 1:
        return "does not fit"
    b = 2 ** int(math.log2(batch))
    return f"{b} x {want // b}"


def derive(paths: list[Path]) -> tuple[dict, dict, dict]:
    """(the measured rows, each model's counts, each model's derived cells: rate, activations per image, their marks,
    the DDP state) from the results JSONs: the numbers the table and the batch table share."""
    rows = measured_rows(paths)
    if "mae_vit_large_patch16" not in rows:
        raise SystemExit("the derivations start from a measured ViT-L/16 row; give its results JSON")
    c = {m: counts(m) for m in MODELS}
    ref = rows["mae_vit_large_patch16"]
    ref_act = (ref["peak_mem_gb"] * 1e9 - state_bytes(c[ref["model"]], False)) / ref["batch_size"]
    ref_flop_rate = ref["img_per_s"] * c[ref["model"]]["flops"]
    cells: dict[str, dict] = {}
    for m in MODELS:
        r, cm = rows.get(m), c[m]
        if r is not None:
            rate, rate_mark = r["img_per_s"], "m"
            act = (r["peak_mem_gb"] * 1e9 - state_bytes(cm, False)) / r["batch_size"]
            act_mark = "d1"
            peak = f"{r['peak_mem_gb'] / r['batch_size']:.3f} (m, batch {r['batch_size']})"
        else:
            rate, rate_mark = ref_flop_rate / cm["flops"], "d3"
            act, act_mark = ref_act * cm["token_width"] / c[ref["model"]]["token_width"], "d2"
            peak = "-"
        cells[m] = {"rate": rate, "rate_mark": rate_mark, "act": act, "act_mark": act_mark, "peak": peak,
                    "ddp": state_bytes(cm, True)}  # fmt: skip
    return rows, c, cells


def table(paths: list[Path], smi: Path, loader: Path | None = None) -> str:
    rows, c, cells = derive(paths)
    h200 = card_bytes(smi)
    ref = rows["mae_vit_large_patch16"]
    ref_act = cells[ref["model"]]["act"]
    for cell in cells.values():
        cell.update(h100=largest(H100_BYTES, cell["ddp"], cell["act"]), h200=largest(h200, cell["ddp"], cell["act"]))
    check = ""
    if "mae_vit_base_patch16" in rows:
        b = cells["mae_vit_base_patch16"]["act"]
        predicted = ref_act * c["mae_vit_base_patch16"]["token_width"] / c[ref["model"]]["token_width"]
        check = (f" The same rule predicts ViT-B/16's activations from ViT-L/16's as {predicted / 1e9:.4f} GB per "
                 f"image, {100 * (predicted / b - 1):+.0f}% off its measured {b / 1e9:.4f}.")
    workers = loader_rate(loader) if loader is not None else None
    head = "| | " + " | ".join(SHORT[m] for m in MODELS) + " |"
    out = [head, "| --- | " + " | ".join("---:" for _ in MODELS) + " |"]

    def line(label: str, fn) -> None:
        out.append(f"| {label} | " + " | ".join(fn(m) for m in MODELS) + " |")

    line("parameters, encoder + decoder (counted)", lambda m: f"{c[m]['params'] / 1e6:.1f} M")
    line("step rate per H200, img/s", lambda m: f"{cells[m]['rate']:.0f} ({cells[m]['rate_mark']})")
    line("peak memory per image, GB", lambda m: cells[m]["peak"])
    line("activations per image, GB", lambda m: f"{cells[m]['act'] / 1e9:.4f} ({cells[m]['act_mark']})")
    line("weights, gradients, AdamW, DDP buckets, GB (d4)", lambda m: f"{cells[m]['ddp'] / 1e9:.1f}")
    line("largest batch per GPU, H100 80 GB (d5)", lambda m: f"{cells[m]['h100']}")
    line(f"largest batch per GPU, H200 {h200 / 2**30:.0f} GiB (d5)", lambda m: f"{cells[m]['h200']}")
    line("batch x accum-iter for 4096 on 8 H100 (d5)", lambda m: recipe_split(cells[m]["h100"]))
    line("batch x accum-iter for 4096 on 8 H200 (d5)", lambda m: recipe_split(cells[m]["h200"]))
    line("800 epochs of ImageNet-1k on 8 H200, hours (d6)",
         lambda m: f"{EPOCHS * IMAGENET / (GPUS * cells[m]['rate']) / 3600:.1f}")
    if workers:
        line("CPU loader workers per GPU to keep up (d7)", lambda m: f"{math.ceil(cells[m]['rate'] / workers[0])}")
    files = sorted({r["file"] for r in rows.values()})
    dates = sorted({r["date"] for r in rows.values()})
    legend = [
        "",
        f"- **m**: measured on one {ref['gpu']}, {', '.join(dates)}: `fastmae bench --suite pretrain`, the `fastmae` "
        "configuration (Triton ops, visible-only encoder, bf16, torch.compile), decoder depth 8, one process, "
        f"synthetic images on the device; `benchmarks/results/{'`, `benchmarks/results/'.join(files)}`.",
        "- **d1** (derived): (the measured peak - 16 B per parameter for fp32 weights, gradients and AdamW's two "
        "moments) / the batch; assumes memory grows linearly with the batch.",
        "- **d2** (derived): ViT-L/16's d1 scaled by the sum over the encoder's and decoder's blocks of tokens x width "
        f"({c['mae_vit_huge_patch14']['token_width'] / c[ref['model']]['token_width']:.2f}x for ViT-H/14).{check}",
        "- **d3** (derived, not measured): ViT-L/16's measured rate x its FLOPs per image / this model's "
        f"(`fastmae.flops_per_image`: {c[ref['model']]['flops'] / 1e9:.1f} and "
        f"{c['mae_vit_huge_patch14']['flops'] / 1e9:.1f} GFLOPs forward for ViT-L/16 and ViT-H/14): the same FLOP "
        "rate, so the same MFU, as ViT-L/16.",
        "- **d4** (derived): 20 B per parameter: fp32 weights, gradients, AdamW's two moments, and DDP's gradient "
        "buckets (a copy of the gradients; not in the one-process measurement).",
        f"- **d5** (derived): ({USABLE:.0%} of the card's memory - d4) / the activations per image, rounded down to a "
        f"multiple of 8; the H200's memory as its `nvidia-smi` reported it (`benchmarks/results/{smi.name}`), the "
        "H100's as 80 GiB. The recipe's effective batch of 4096 is 512 per GPU on 8 GPUs: `--batch-size B "
        "--accum-iter A`.",
        f"- **d6** (derived): {EPOCHS} x {IMAGENET:,} images / (8 x the step rate per GPU), at the measured batch; "
        "assumes 8 GPUs scale linearly (DDP's all-reduce is not measured) and a loader that keeps up (not measured "
        "on a GPU).",
    ]
    if workers:
        legend.append(f"- **d7** (derived): the step rate / the fastmae loader's {workers[0]:.0f} img/s per worker "
                      f"on the 2-core CPU machine (`benchmarks/results/{workers[1]}`); a server's cores may differ.")
    return "\n".join(out + legend)


def batch_table(paths: list[Path]) -> dict:
    """What ``fastmae.batching`` sizes a per-process batch with (``fastmae/batch_table.json``): per command and model,
    the bytes of state a process holds whatever its batch (weights, gradients, AdamW; DDP's buckets and the EMA apart)
    and the bytes of activations per image, each marked measured (file, date) or derived (from what). Pretraining's
    are the table's numbers; finetuning's and linear probing's are derived from them (see the module docstring)."""
    rows, c, cells = derive(paths)
    ref = rows["mae_vit_large_patch16"]
    pretrain, finetune, linprobe = {}, {}, {}
    for m in MODELS:
        cm, r, d = c[m], rows.get(m), downstream_counts(m)
        if r is not None:
            act = {"mark": "derived", "from": f"(the peak {r['peak_mem_gb']:g} GB measured at batch {r['batch_size']}"
                   " - state_bytes) / the batch (d1)", "file": f"benchmarks/results/{r['file']}", "date": r["date"],
                   "gpu": r["gpu"]}  # fmt: skip
        else:
            act = {"mark": "derived", "from": f"{SHORT[ref['model']]}'s bytes_per_image x "
                   f"{cm['token_width'] / c[ref['model']]['token_width']:.3f}, the ratio of the sums over the encoder's"
                   " and decoder's blocks of tokens x width (d2); not measured"}  # fmt: skip
        pretrain[m] = {
            "state_bytes": {"value": int(state_bytes(cm, False)), "mark": "derived",
                            "from": "4 B per parameter (fp32 weights) + 12 B per trained parameter (gradients, "
                            f"AdamW's two moments), counted: {cm['params']:,} parameters, {cm['trained']:,} trained"},
            "ddp_bytes": {"value": int(state_bytes(cm, True) - state_bytes(cm, False)), "mark": "derived",
                          "from": "DDP's gradient buckets, 4 B per trained parameter (more than one process only)"},
            "bytes_per_image": {"value": round(cells[m]["act"]), **act},
        }  # fmt: skip
        per_unit = cells[m]["act"] / cm["token_width"]  # pretraining's activation bytes per token x width
        blocks = f"{d['depth']} x {d['tokens']} x {d['width']}"
        finetune[m] = {
            "state_bytes": {"value": 16 * d["ft_params"], "mark": "derived",
                            "from": "16 B per parameter (fp32 weights, gradients, AdamW's two moments; every "
                            f"parameter trained), counted: {d['ft_params']:,} with a {CLASSES}-class head"},
            "ddp_bytes": {"value": 4 * d["ft_params"], "mark": "derived",
                          "from": "DDP's gradient buckets, 4 B per parameter (more than one process only)"},
            "ema_bytes": {"value": 4 * d["ft_params"], "mark": "derived",
                          "from": "--ema's fp32 copy of the weights, 4 B per parameter (with --ema only)"},
            "bytes_per_image": {"value": round(per_unit * d["ft_token_width"]), "mark": "derived",
                                "from": f"pretraining's bytes_per_image x {d['ft_token_width'] / cm['token_width']:.3f}"
                                f", finetuning's sum over its blocks of tokens x width ({blocks}: the encoder over "
                                "every token, no decoder) over pretraining's (d2's rule); not measured"},
        }  # fmt: skip
        linprobe[m] = {
            "state_bytes": {"value": 4 * d["lp_params"], "mark": "derived",
                            "from": f"4 B per parameter (fp32 weights, frozen: no gradients or optimizer state), "
                            f"counted: {d['lp_params']:,}; the probes (a few MB) are not counted"},
            "bytes_per_image": {"value": round(per_unit * d["lp_token_width"]), "mark": "derived",
                                "from": f"pretraining's bytes_per_image x {d['lp_token_width'] / cm['token_width']:.4f}"
                                f", one block's tokens x width ({d['tokens']} x {d['width']}) over pretraining's sum "
                                "(d2's rule): the encoder runs frozen under no_grad, so a block's activations are "
                                "freed once the next block has run; not measured"},
        }  # fmt: skip
    check = ""
    if "mae_vit_base_patch16" in rows:  # how far d2's rule is from a measurement it was not made from
        base, large = c["mae_vit_base_patch16"]["token_width"], c[ref["model"]]["token_width"]
        off = cells[ref["model"]]["act"] * base / large / cells["mae_vit_base_patch16"]["act"] - 1
        check = (f" d2's rule predicts ViT-B/16's measured pretraining activations from ViT-L/16's {100 * off:+.0f}% "
                 "off; it has not been checked on this command's step.")  # fmt: skip
    step = "bf16, torch.compile, at img_size pixels"
    return {"about": "Memory per process of a training step, per command and model; generated by `python "
            "benchmarks/gpu_plan.py --table`, never edited by hand. fastmae.batching: the largest batch per process = "
            "(usable x the GPU's memory - state_bytes - ddp_bytes (more than one process) - ema_bytes (--ema)) / "
            "bytes_per_image, rounded down to a multiple of 8.",
            "usable": USABLE, "img_size": 224,
            "commands": {
                "pretrain": {"about": f"a pretraining step ({step}, Triton ops, visible-only encoder, mask ratio 0.75, "
                             "decoder depth 8)", "state": "weights, gradients, AdamW", "models": pretrain},
                "finetune": {"about": f"a finetuning step ({step}, timm's ViT: every token through the encoder, no "
                             "decoder), derived from pretraining's; nothing here is measured." + check,
                             "state": "weights, gradients, AdamW", "models": finetune},
                "linprobe": {"about": f"a linear-probing step ({step}, the encoder frozen under no_grad), derived from "
                             "pretraining's; nothing here is measured." + check, "state": "frozen weights",
                             "models": linprobe},
            }}  # fmt: skip


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", nargs="+", default=[str(RESULTS / f) for f in DEFAULT_RESULTS],
                    help="GPU results JSONs of `fastmae bench --suite pretrain` (one GPU model)")  # fmt: skip
    ap.add_argument("--smi", default=str(RESULTS / SMI), help="that GPU's nvidia-smi listing (its memory)")
    ap.add_argument("--loader-results", default=str(RESULTS / LOADER),
                    help="a CPU loader benchmark's JSON (benchmarks/bench_loader.py): workers per GPU to keep up")
    ap.add_argument("--readme", default=None, help="the page to write (docs/pretraining.md), between gpu-plan markers")
    ap.add_argument("--table", nargs="?", const=str(TABLE), default=None, metavar="JSON",
                    help=f"also write the batch table fastmae sizes batches with (default: {TABLE.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    if args.table:
        Path(args.table).write_text(json.dumps(batch_table([Path(p) for p in args.results]), indent=2) + "\n")
    text = table([Path(p) for p in args.results], Path(args.smi), Path(args.loader_results))
    if args.readme:
        update_readme(Path(args.readme), text, "gpu-plan")
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
