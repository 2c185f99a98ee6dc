"""The ``fastmae`` command: pretrain, finetune, linprobe, launch (torchrun), export, visualize, bench, models.

Flags are generated from :class:`fastmae.config.PretrainConfig` (``--field-name``); a flag given on the command line
overrides the chosen ``--preset``. Bad input ends with one ``fastmae: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import types
import typing

from .compiling import DEFAULT_VARIANT, VARIANTS
from .config import (
    COMPILE_MODES,
    FINETUNE_PRESETS,
    LINPROBE_PRESETS,
    PRESETS,
    FinetuneConfig,
    LinprobeConfig,
    PretrainConfig,
    preset,
)
from .errors import FastMAEError


def _flag_type(tp):
    """The argparse type of a dataclass field annotation such as ``int | None``."""
    if isinstance(tp, str):
        tp = eval(tp, {"typing": typing}, {})  # annotations are strings under `from __future__ import annotations`
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for flags with a real default; a flag whose default is None says in its own help what
    happens without it, so "(default: None)" is never printed."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _config_flags(p: argparse.ArgumentParser, cls, presets: dict, default_preset: str = "demo") -> None:
    """``--preset`` plus one flag per dataclass field (``--field-name``); booleans get ``--x/--no-x``. The argparse
    default stays None (so that only the flags given override the chosen preset); the help shows the value the default
    preset gives, or nothing where that is None and the help says what None means."""
    p.add_argument("--preset", default=default_preset, choices=list(presets),
                   help="named configuration to start from; the values shown below are this preset's")  # fmt: skip
    base = presets[default_preset]
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = _flag_type(f.type)
        value = getattr(base, f.name)
        text = f.metadata["help"] + ("" if value is None else f" ({default_preset}: {_shown(value)})")
        text = text.replace("%", "%%")
        if tp is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif "const" in f.metadata:  # --compile [VARIANT] / --no-compile
            p.add_argument(flag, dest=f.name, nargs="?", const=f.metadata["const"], choices=f.metadata["choices"],
                           default=None, metavar="VARIANT", help=text)  # fmt: skip
            p.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=f.metadata["negative"],
                           help=f"the same as {flag} {f.metadata['negative']}")  # fmt: skip
        else:
            p.add_argument(flag, dest=f.name, type=tp, default=None, metavar=f.name.upper(), help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmae", description="Fast, verified Masked Autoencoder pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "pretrain",
        help="MAE pretraining (default: a tiny model on the bundled sample photos)",
        description="MAE pretraining. Flags override the preset's values.",
        formatter_class=_HelpFormatter,
    )
    _config_flags(p, PretrainConfig, PRESETS)
    f = sub.add_parser(
        "finetune",
        help="finetune a pretrained encoder with the paper's recipe (default: a tiny ViT on scikit-learn's digits)",
        description="End-to-end finetuning (timm ViT, global pool + fc_norm, layer decay, mixup/cutmix, RandAugment, "
        "random erasing). Flags override the preset's values.",
        formatter_class=_HelpFormatter,
    )
    _config_flags(f, FinetuneConfig, FINETUNE_PRESETS)
    lp = sub.add_parser(
        "linprobe",
        help="linear probes (several lrs in one pass) and kNN on a frozen encoder (default: scikit-learn's digits)",
        description="Linear probing: frozen encoder, BatchNorm without affine + linear head, LARS; several learning "
        "rates trained side by side on the same features, and a kNN evaluation. Flags override the preset's values.",
        formatter_class=_HelpFormatter,
    )
    _config_flags(lp, LinprobeConfig, LINPROBE_PRESETS)
    e = sub.add_parser(
        "export",
        help="write a checkpoint for timm (encoder, strict load into vit_*_224), the official format, or transformers",
        formatter_class=_HelpFormatter,
    )
    e.add_argument("checkpoint", help="fastmae pretrain/finetune checkpoint, official MAE file (.pth/.safetensors) or "
                   "transformers ViT-MAE folder")  # fmt: skip
    e.add_argument("output", help="file to write: .pth, or .safetensors (timm only); a folder for hf / hf-encoder")
    e.add_argument("--to", choices=("timm", "official", "hf", "hf-encoder"), default="timm",
                   help="timm / official: the encoder; hf: a ViTMAEForPreTraining folder (decoder included); "
                   "hf-encoder: a ViTMAEModel folder")  # fmt: skip
    e.add_argument("--img-size", type=int, default=None, help="resample the position table to this resolution")
    sub.add_parser(
        "launch",
        help="torchrun with restarts that work: fastmae launch [TORCHRUN OPTIONS] pretrain|finetune|linprobe [FLAGS]",
        description=LAUNCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    sub.add_parser("models", help="list the model names")
    v = sub.add_parser(
        "visualize",
        help="draw original | masked | reconstruction rows from a pretraining checkpoint",
        formatter_class=_HelpFormatter,
    )
    v.add_argument("--checkpoint", required=True, help="a checkpoint-*.pth written by fastmae pretrain")
    v.add_argument("--images", default=None, help="images to draw (default: scikit-image's bundled photos)")
    v.add_argument("--output", default="reconstructions.png", help="PNG to write")
    v.add_argument("--count", type=int, default=8, help="how many images")
    v.add_argument("--mask-ratio", type=float, default=None, help="default: the checkpoint's")
    v.add_argument("--seed", type=int, default=0, help="seed of the fixed mask")
    v.add_argument("--scale", type=int, default=None, help="draw each pixel as an N x N block (default: the run's)")
    b = sub.add_parser(
        "bench",
        help="pretrain-step benchmark suite (eager vs fastmae vs mask-token encoder), results JSON, chart, table",
        description="Benchmark the pretraining step side by side in one run and write ./fastmae-bench-<gpu>-<date>"
        ".json (or --out); or, with --report, draw the chart and README table from a results JSON.",
        formatter_class=_HelpFormatter,
    )
    b.add_argument("--models", default="mae_vit_base_patch16,mae_vit_large_patch16,mae_vit_huge_patch14")
    b.add_argument("--decoder-depths", default="8,1", help="decoder depths to run for each model")
    b.add_argument("--suite", default="pretrain,kernels,loader,finetune",
                   help="which row kinds: pretrain, kernels, loader, finetune")  # fmt: skip
    b.add_argument("--batch", type=int, default=None, help="default: B 256, L 128, H 64 (fixed per model)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    b.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    b.add_argument("--quick", action="store_true", help="tiny shapes on any device: checks the suite, not a number")
    b.add_argument("--out", default=None, help="results JSON path (default: ./fastmae-bench-<gpu>-<date>.json in the "
                   "current folder)")  # fmt: skip
    b.add_argument("--report", default=None, nargs="+", metavar="JSON",
                   help="chart + table from this results JSON (several: merged, as one sitting's)")  # fmt: skip
    b.add_argument("--profile", action="store_true",
                   help="after timing each configuration, profile 2 steps: top kernels (name, calls, ms, share) in the "
                   "row and a summary line (CPU ops on a CPU)")  # fmt: skip
    b.add_argument("--configs", default="eager,compiled-reference,fastmae,mask-token",
                   help="pretrain configurations to run: eager, compiled-reference, fastmae, mask-token")  # fmt: skip
    b.add_argument("--graphs", action="store_true",
                   help="also time each compiled configuration with the whole step as one CUDA graph (CUDA only)")
    b.add_argument("--batches", default=None, metavar="B,B,...",
                   help="batch sweep of the fastmae rows beside the fixed batch, e.g. 64,256,512 (img/s, peak memory, "
                   "knee)")  # fmt: skip
    b.add_argument("--attn-backend", default=None, metavar="SPEC",
                   help="attention of the fastmae rows: a backend, or per call site encoder=flash,decoder=efficient "
                   "(default: auto, from the measured table)")  # fmt: skip
    b.add_argument("--attn-table", default=None, metavar="JSON", help="the measured attention table auto reads "
                   "(default: fastmae/attention_table.json)")  # fmt: skip
    b.add_argument("--compile", dest="compile", nargs="?", const=DEFAULT_VARIANT, default=DEFAULT_VARIANT,
                   metavar="VARIANTS", help="how the compiled configurations compile (on CUDA): full, regional, or "
                   "both side by side as full,regional; --compile alone: " + DEFAULT_VARIANT)  # fmt: skip
    b.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                   help="no configuration compiles")  # fmt: skip
    b.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode of the "
                   "compiled configurations")  # fmt: skip
    b.add_argument("--optimizer-bench", action="store_true",
                   help="also time one AdamW update per model: fused (the loop's) vs torch.compile'd foreach")
    b.add_argument("--png", default=None, help="chart path for --report (default: JSON path with .png)")
    b.add_argument("--readme", default=None, help="README to update between the markers (--report)")
    b.add_argument("--marker", default="fastmae-bench", help="which README markers hold the table (--report)")
    return parser


LAUNCH_HELP = """\
Start COMMAND under torchrun, one process per GPU, with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's
environment: torchrun otherwise shares its rendezvous store with the workers, and restarted ranks then hang or fail
while joining (pytorch#135712; counted in benchmarks/bench_restarts.py). Everything before COMMAND goes to torchrun
(--nproc-per-node, --max-restarts, --nnodes, --rdzv-*, ...); without a rendezvous option it runs --standalone, and
without --nproc-per-node one process per visible GPU (1 without one). The command it runs is printed first.

  fastmae launch --nproc-per-node 8 --max-restarts 3 pretrain --preset mae_vit_large_patch16 --data DIR --resume auto
"""
LAUNCHABLE = ("pretrain", "finetune", "linprobe")
_RDZV = ("--standalone", "--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend", "--rdzv_backend",
         "--master-addr", "--master_addr")  # fmt: skip


def launch_command(argv: list[str]) -> tuple[list[str], dict]:
    """(command, environment) that ``fastmae launch ARGV`` runs (see :data:`LAUNCH_HELP`)."""
    at = next((i for i, a in enumerate(argv) if a in LAUNCHABLE), None)
    if at is None:
        raise FastMAEError(f"launch: name the command to run ({', '.join(LAUNCHABLE)}) after torchrun's options, "
                           "e.g. fastmae launch --nproc-per-node 8 pretrain --data DIR")  # fmt: skip
    torchrun, command = argv[:at], argv[at:]
    given = {a.split("=", 1)[0] for a in torchrun}
    if not given & set(_RDZV):
        torchrun = ["--standalone", *torchrun]
    if not given & {"--nproc-per-node", "--nproc_per_node"}:
        import torch

        torchrun = [*torchrun, "--nproc-per-node", str(max(1, torch.cuda.device_count()))]
    env = dict(os.environ)
    if env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1") != "1":
        print(f"fastmae launch: keeping TORCH_DISABLE_SHARE_RDZV_TCP_STORE={env['TORCH_DISABLE_SHARE_RDZV_TCP_STORE']}"
              " as set: restarts may hang", file=sys.stderr)  # fmt: skip
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return [sys.executable, "-m", "torch.distributed.run", *torchrun, "-m", "fastmae.cli", *command], env


def run_launch(argv: list[str]) -> int:
    """``fastmae launch``: replaces this process with torchrun (its exit code is the command's)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(LAUNCH_HELP, end="")
        return 0
    cmd, env = launch_command(argv)
    shown = " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])
    print(f"fastmae launch: TORCH_DISABLE_SHARE_RDZV_TCP_STORE={env['TORCH_DISABLE_SHARE_RDZV_TCP_STORE']} {shown}",
          file=sys.stderr, flush=True)  # fmt: skip
    os.execve(sys.executable, cmd, env)
    return 1  # not reached


def run_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.report:
        done = bench.report(args.report, args.png, args.readme, args.marker)
        print(done["table"])
        print(f"chart: {done['png']}" + (f"; table written into {args.readme}" if args.readme else ""))
        return 0
    suites = [x.strip() for x in args.suite.split(",") if x.strip()]
    unknown = set(suites) - {"pretrain", "kernels", "loader", "finetune"}
    if unknown:
        raise FastMAEError(
            f"--suite: unknown {', '.join(sorted(unknown))}; choose from pretrain, kernels, loader, finetune"
        )
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    depths = [int(d) for d in args.decoder_depths.split(",") if d.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]  # none: only --optimizer-bench rows
    if unknown := set(configs) - set(bench.CONFIG_NAMES):
        raise FastMAEError(f"--configs: unknown {', '.join(sorted(unknown))}; choose from "
                           f"{', '.join(bench.CONFIG_NAMES)}")  # fmt: skip
    try:
        batches = tuple(int(b) for b in (args.batches or "").split(",") if b.strip())
    except ValueError:
        raise FastMAEError(f"--batches must be whole numbers separated by commas, got {args.batches!r}") from None
    if args.attn_backend is not None:
        from .attention import parse_sites

        parse_sites(args.attn_backend)  # a bad spec is one line now, not after the first model compiled
    if args.attn_table is not None:
        os.environ["FASTMAE_ATTENTION_TABLE"] = args.attn_table
    variants = tuple(v.strip() for v in args.compile.split(",") if v.strip())
    if not variants or set(variants) - set(VARIANTS):
        raise FastMAEError(f"--compile: {args.compile!r}; give one or more of {', '.join(VARIANTS)}, comma-separated")
    bench.check_graphs_mode(args.graphs, args.compile_mode)  # before any model is built, on any device
    if args.quick:
        models = ["mae_vit_tiny_patch16"]
        depths = depths if args.decoder_depths != "8,1" else [2, 1]  # depths given on the command line are kept
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    from fastmae.train.run import resolve_device

    device = resolve_device(args.device or "auto")
    env = bench.env_info(device)
    results = bench.ResultsFile(args.out or bench.default_results_path(env), env)  # rewritten after every row
    if "pretrain" in suites:
        bench.run_suite(models, depths, device, args.steps, args.warmup, args.quick, args.batch,
                        profile=args.profile, configs=configs, graphs=args.graphs, batches=batches,
                        attn=args.attn_backend, compile_mode=args.compile_mode, optimizer_bench=args.optimizer_bench,
                        compile_variants=variants, on_row=results.add)  # fmt: skip
    for extra in ("kernels", "loader", "finetune"):
        if extra in suites:
            results.extend(bench.extra_rows(extra, args.quick))
    rows, path = results.rows, results.path
    for s in bench.speedups(rows):
        print(f"{s['model']} dec{s['decoder_depth']}: fastmae {bench._fmt(s['fastmae_vs_eager'], '.2f')}x eager, "
              f"{bench._fmt(s['fastmae_vs_compiled_reference'], '.2f')}x compiled-reference, visible "
              f"{bench._fmt(s['visible_vs_mask_token'], '.2f')}x mask-token ({s['best_variant']})")  # fmt: skip
    print(f"wrote {path}; chart and README table: fastmae bench --report {path} --readme README.md")
    return 0


def config_from_args(args: argparse.Namespace, cls=PretrainConfig, presets: dict | None = None):
    """The chosen preset, then what a ``--pretrained`` checkpoint says of the architecture (model; for pretraining
    also image size and norm-pix loss), then every flag given on the command line; validated."""
    cfg = preset(args.preset) if presets is None else dataclasses.replace(presets[args.preset])
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}
    if given.get("pretrained") == "none":  # a preset's checkpoint turned off: random weights
        given["pretrained"] = None
    pretrained = given.get("pretrained", cfg.pretrained)
    if "pretrained" not in given and pretrained is not None and not os.path.exists(pretrained):
        raise FastMAEError(f"--preset {args.preset} starts from {pretrained}, which does not exist yet: run `fastmae "
                           f"pretrain --preset {args.preset}` first (it writes that checkpoint), or add --pretrained "
                           "none to train from random weights")  # fmt: skip
    if pretrained is not None:
        from .interop import pretrained_fields

        fields = pretrained_fields(pretrained, "--pretrained")
        if cls is not PretrainConfig:
            fields = {"model": fields["model"]}
        cfg = dataclasses.replace(cfg, **fields)
    return dataclasses.replace(cfg, **given).validate()


class _BarSafeHandler(logging.StreamHandler):
    """Log lines written with tqdm.write: a line printed while a progress bar is shown goes above the bar instead
    of being glued to it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # a logging failure must not end the run
            self.handleError(record)


def _log_through_progress_bars() -> None:
    """logging.basicConfig with a bar-safe handler: nothing is added when the root logger has handlers already."""
    root = logging.getLogger()
    if not root.handlers:
        handler = _BarSafeHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def _num(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _finished_line(summary: dict, out: str) -> str:
    """What a command says when --resume found its run finished (nothing is done or written)."""
    return (f"already finished at step {summary['steps']}: nothing to do ({out}/summary.json is that run's "
            "summary; a new run needs another --output-dir, or --overwrite)")  # fmt: skip


def _done_line(summary: dict, out: str) -> str:
    """The last line of ``fastmae pretrain``."""
    if summary.get("already_finished"):
        return _finished_line(summary, out)
    stopped = f", stopped by {summary['stopped_by']}" if summary.get("stopped_by") else ""
    loss = f"{_num(summary['first_logged_loss'])} -> {_num(summary['final_loss'])}"
    return (f"done: {summary['steps']} steps{stopped}, {summary['images_seen']} images, loss {loss}, "
            f"{_num(summary['img_per_s'], '.1f')} img/s; outputs in {out}/ (summary.json)")  # fmt: skip


def _main_process() -> bool:
    """True except in the ranks other than 0 of a torchrun or srun job, which stay quiet."""
    from fastmae.train.launch import dist_info

    return dist_info()[0] == 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # torchrun's options are not fastmae's: they pass through unparsed
        try:
            return run_launch(argv[1:])
        except FastMAEError as exc:
            print(f"fastmae: error: {exc}", file=sys.stderr)
            return exc.exit_code
    args = build_parser().parse_args(argv)
    _log_through_progress_bars()
    try:
        if args.command == "models":
            from .models import list_models

            print("\n".join(list_models()))
            return 0
        if args.command == "bench":
            return run_bench(args)
        if args.command == "visualize":
            from fastmae.train.visualize import visualize_checkpoint

            loss = visualize_checkpoint(args.checkpoint, args.output, args.images, args.count, args.mask_ratio,
                                        args.seed, args.scale)  # fmt: skip
            print(f"wrote {args.output} (loss on these images {loss:.4f})")
            return 0
        if args.command == "export":
            from .interop import export_encoder

            done = export_encoder(args.checkpoint, args.output, args.to, args.img_size)
            h, w = done["img_size"]
            print(f"wrote {done['output']}: {done['model']}, {done['keys']} tensors, {h}x{w} px ({args.to})")
            if args.to == "timm":
                out = done["output"]
                read = (f"from safetensors.torch import load_file; state_dict = load_file({out!r})"
                        if out.endswith(".safetensors") else f"state_dict = torch.load({out!r}, weights_only=True)")
                print(f"load it with: import timm, torch; {read}; model = {done['load']}; "
                      "model.load_state_dict(state_dict, strict=True)")  # fmt: skip
            elif args.to.startswith("hf"):
                print(f"load it with: {done['load']}")
            return 0
        if args.command == "finetune":
            from fastmae.train.finetune import finetune

            cfg = config_from_args(args, FinetuneConfig, FINETUNE_PRESETS)
            s = finetune(cfg)
            if _main_process():
                print(_finished_line(s, cfg.output_dir) if s.get("already_finished") else
                      f"done: {s['steps']} steps, val top-1 {s['top1']:.2f}% (best {s['best_top1']:.2f}%), top-5 "
                      f"{s['top5']:.2f}%; outputs in {cfg.output_dir}/ (summary.json)")  # fmt: skip
            return 0
        if args.command == "linprobe":
            from fastmae.train.linprobe import linprobe

            cfg = config_from_args(args, LinprobeConfig, LINPROBE_PRESETS)
            s = linprobe(cfg)
            if _main_process():
                print(_finished_line(s, cfg.output_dir) if s.get("already_finished") else s["table"])
            return 0
        from fastmae.train.pretrain import pretrain

        cfg = config_from_args(args)
        summary = pretrain(cfg)
        if _main_process():
            print(_done_line(summary, cfg.output_dir))
        return 0
    except FastMAEError as exc:
        print(f"fastmae: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fastmae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
