"""The ``fastmae`` command: pretrain, finetune, linprobe, launch (torchrun), export, visualize, bench, models.

Flags are generated from the configs of :mod:`fastmae.config` (``--field-name``); a flag given on the command line
overrides the chosen ``--preset``. This module parses and dispatches: the training commands, the launcher and the
benchmark live in the training package (``train/``), imported only when chosen (``--help`` loads no torch). Bad input
ends with one ``fastmae: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import types
import typing

from .config import (
    FINETUNE_PRESETS,
    LINPROBE_PRESETS,
    PRESETS,
    BenchConfig,
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


# argparse's message for a value outside an argument's choices (quoting differs between Python versions)
_INVALID_CHOICE = re.compile(
    r"argument (?P<arg>[^:]+): invalid choice: '?(?P<value>.*?)'? \(choose from (?P<choices>.*)\)$"
)


def _did_you_mean(word: str, candidates) -> str:
    """``; did you mean X?`` for the closest of ``candidates``, or nothing."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse with errors a user can act on: a wrong choice (a misspelt ``--preset`` or command) is one line naming
    the choices and the closest one; any other error shows a short usage (a command's full usage runs to 37 lines)
    and the error; an unknown flag is reported by its command's parser with the closest flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}  # the top-level parser's: its commands' parsers

    def error(self, message: str):
        if m := _INVALID_CHOICE.match(message):
            choices = [c.strip().strip("'") for c in m["choices"].split(",")]
            arg, value = m["arg"], m["value"]
            what = f"{value}: no such command" if arg == "command" else f"{arg} {value}: no such choice"
            self.exit(2, f"{self.prog}: error: {what}{_did_you_mean(value, choices)} (choose from "
                         f"{', '.join(choices)})\n")  # fmt: skip
        usage = self.format_usage()
        if usage.count("\n") > 3:
            usage = f"usage: {self.prog} [FLAGS]  (`{self.prog} --help` lists them)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        args, extra = self.parse_known_args(args, namespace)
        if extra:  # reported by the command's parser (its usage, its flags), not the top-level one
            parser = self.commands.get(getattr(args, "command", None), self)
            flags = [s for action in parser._actions for s in action.option_strings]
            unknown = [a.split("=")[0] for a in extra if a.startswith("-")] or extra
            hint = _did_you_mean(unknown[0], flags) if unknown[0].startswith("-") else ""
            parser.error(f"unrecognized argument{'s' if len(unknown) > 1 else ''} {' '.join(unknown)}{hint}")
        return args


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


def _config_flags(p: argparse.ArgumentParser, cls, presets: dict | None = None, default_preset: str = "demo",
                  shown: str | None = None) -> None:  # fmt: skip
    """One flag per dataclass field (``--field-name``), and ``--preset`` when the command has presets; booleans get
    ``--x/--no-x``. The argparse default stays None (so that only the flags given override the chosen preset or the
    dataclass's defaults); the help shows the value the preset ``shown`` (the one on the command line, else the
    default preset, or the dataclass) gives, or nothing where that is None and the help says what None means."""
    shown = shown if presets is not None and shown in presets else default_preset
    if presets is not None:
        p.add_argument("--preset", default=default_preset, choices=list(presets),
                       help=f"named configuration to start from; the values shown below are {shown}'s (`--preset "
                       "NAME --help` shows another's)")  # fmt: skip
    base = presets[shown] if presets is not None else cls()
    shown_as = shown if presets is not None else "default"
    for f in cls.flags():
        flag = "--" + f.name.replace("_", "-")
        tp = _flag_type(f.type)
        value = getattr(base, f.name)
        text = f.help + ("" if value is None else f" ({shown_as}: {_shown(value)})")
        text = text.replace("%", "%%")
        if tp is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif "const" in f.metadata:  # --compile [VARIANT] / --no-compile
            p.add_argument(flag, dest=f.name, nargs="?", const=f.metadata["const"], choices=f.metadata.get("choices"),
                           default=None, metavar="VARIANT", help=text)  # fmt: skip
            p.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const=f.metadata["negative"],
                           help=f"the same as {flag} {f.metadata['negative']}")  # fmt: skip
        elif "nargs" in f.metadata:
            p.add_argument(flag, dest=f.name, nargs=f.metadata["nargs"], default=None, metavar=f.name.upper(),
                           help=text)  # fmt: skip
        else:
            p.add_argument(flag, dest=f.name, type=tp, default=None, metavar=f.name.upper(), help=text)


def asked_preset(argv: list[str]) -> str | None:
    """The name after ``--preset`` (or in ``--preset=NAME``) in ``argv``, read before the parser is built so that
    ``--help`` shows that preset's values; None when there is none."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return None


PRINT_CONFIG = ("print the resolved configuration as JSON, with the batch x accum-iter chosen for --world-size and "
                "--gpu-mem and why, and exit (nothing is indexed, written or started on a GPU)")  # fmt: skip


def build_parser(preset_shown: str | None = None) -> argparse.ArgumentParser:
    """The ``fastmae`` parser; the training commands' help shows the values of preset ``preset_shown`` (when it is
    one of theirs) instead of the default preset's."""
    parser = _Parser(prog="fastmae", description="Fast, verified Masked Autoencoder pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices
    p = sub.add_parser(
        "pretrain",
        help="MAE pretraining (default: a tiny model on the bundled sample photos)",
        description="MAE pretraining. Flags override the preset's values.",
        formatter_class=_HelpFormatter,
    )
    _config_flags(p, PretrainConfig, PRESETS, shown=preset_shown)
    p.add_argument("--print-config", action="store_true", help=PRINT_CONFIG)
    f = sub.add_parser(
        "finetune",
        help="finetune a pretrained encoder with the paper's recipe (default: a tiny ViT on scikit-learn's digits)",
        description="End-to-end finetuning (timm ViT, global pool + fc_norm, layer decay, mixup/cutmix, RandAugment, "
        "random erasing). Flags override the preset's values.",
        formatter_class=_HelpFormatter,
    )
    _config_flags(f, FinetuneConfig, FINETUNE_PRESETS, shown=preset_shown)
    f.add_argument("--print-config", action="store_true", help=PRINT_CONFIG)
    lp = sub.add_parser(
        "linprobe",
        help="linear probes (several lrs in one pass) and kNN on a frozen encoder (default: scikit-learn's digits)",
        description="Linear probing: frozen encoder, BatchNorm without affine + linear head, LARS; several learning "
        "rates trained side by side on the same features, and a kNN evaluation. Flags override the preset's values.",
        formatter_class=_HelpFormatter,
    )
    _config_flags(lp, LinprobeConfig, LINPROBE_PRESETS, shown=preset_shown)
    lp.add_argument("--print-config", action="store_true", help=PRINT_CONFIG)
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
    v.add_argument("--images", default=None, help="images to draw (default: scikit-image's bundled photos; for a "
                   "checkpoint pretrained on the digits, their validation split)")  # fmt: skip
    v.add_argument("--output", default="reconstructions.png", help="PNG to write")
    v.add_argument("--count", type=int, default=8, help="how many images")
    v.add_argument("--mask-ratio", type=float, default=None, help="default: the checkpoint's")
    v.add_argument("--seed", type=int, default=0, help="seed of the fixed mask")
    v.add_argument("--scale", type=int, default=None, help="draw each pixel as an N x N block (default: the run's)")
    v.add_argument("--show-bands", default=None, metavar="BANDS",
                   help="bands to draw, names or 0-based indices: 3 as red,green,blue (e.g. 3,2,1) or 1 in gray "
                   "(default: RGB as it is; the first three bands, or the first in gray, stretched 2-98%%)")
    v.add_argument("--bands", default=None, metavar="BANDS",
                   help="the images' bands that feed the checkpoint's, in its order: names or 0-based indices "
                   "(default: matched by name, or all of them when unnamed)")  # fmt: skip
    b = sub.add_parser(
        "bench",
        help="pretrain-step benchmark (eager, compiled-reference, fastmae, mask-token encoder): JSON, chart, table",
        description="Benchmark the pretraining step side by side in one run and write ./fastmae-bench-<gpu>-<date>"
        ".json (or --out), rewritten after every row; or, with --report, draw the chart and docs table from results "
        "JSONs. The kernel, loader and finetune benchmarks are scripts of their own in benchmarks/.",
        formatter_class=_HelpFormatter,
    )
    _config_flags(b, BenchConfig)
    k = sub.add_parser(
        "pack",
        help="pack fixed-size rasters (.npy, TIFF / GeoTIFF, PNG) into one memory-mapped file, index included",
        description="Decode every raster under DATA once (class sub-folders give labels) and write the tiles, labels "
        "and names into the file OUT (written whole or not at all). Files of another shape or dtype than the first "
        "one, and files that do not read, are skipped and counted.",
        formatter_class=_HelpFormatter,
    )
    k.add_argument("data", help="folder of rasters (DATA/<class>/... gives labels)")
    k.add_argument("out", help="the pack file to write")
    k.add_argument("--workers", type=int, default=None, help="decoding processes (default: the usable cores)")
    return parser


LAUNCH_HELP = """\
Start COMMAND under torchrun, one process per GPU, with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's
environment: torchrun otherwise shares its rendezvous store with the workers, and restarted ranks then hang or fail
while joining (pytorch#135712; counted in benchmarks/bench_restarts.py). Everything before COMMAND goes to torchrun
(--nproc-per-node, --max-restarts, --nnodes, --rdzv-*, ...); without a rendezvous option it runs --standalone, and
without --nproc-per-node one process per visible GPU (1 without one). The command it runs is printed first.

  fastmae launch --nproc-per-node 8 --max-restarts 3 pretrain --preset mae_vit_large_patch16 --data DIR --resume auto
"""
def config_from_args(args: argparse.Namespace, cls=PretrainConfig, presets: dict | None = PRESETS):
    """The chosen preset (or, for a command without presets, the dataclass's defaults), then what a ``--pretrained``
    checkpoint says of the architecture (model; for pretraining also image size and norm-pix loss), then every flag
    given on the command line; validated."""
    given = {name: getattr(args, name) for name in cls.field_names() if getattr(args, name) is not None}
    if presets is None:
        return cls(**given).validate()
    cfg = preset(args.preset) if presets is PRESETS else presets[args.preset].replace()
    given = _batch_given(given, cfg.recipe_batch)
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
        cfg = cfg.replace(**fields)
    return cfg.replace(**given).validate()


def _batch_given(given: dict, preset_recipe: int | None) -> dict:
    """The batch flags as a run reads them: ``--batch-size`` alone keeps its per-process meaning (accumulation 1
    unless ``--accum-iter``; the preset's recipe batch is dropped); with a recipe batch (``--recipe-batch``, or the
    preset's), the batch and accumulation not given on the command line are chosen at the start (the preset's are
    not kept)."""
    if "batch_size" in given and "recipe_batch" not in given:
        return {"accum_iter": 1, **given, "recipe_batch": None}
    if given.get("recipe_batch", preset_recipe) is not None:
        return {"batch_size": None, "accum_iter": None, **given}
    return given


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


COMMANDS = {"pretrain": (PretrainConfig, PRESETS), "finetune": (FinetuneConfig, FINETUNE_PRESETS),
            "linprobe": (LinprobeConfig, LINPROBE_PRESETS), "bench": (BenchConfig, None)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse, then dispatch: the training commands and the benchmark run in the training package."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["launch"]:  # torchrun's options are not fastmae's: they pass through unparsed
            from fastmae.train.launch import run_launch

            return run_launch(argv[1:], LAUNCH_HELP)
        args = build_parser(asked_preset(argv)).parse_args(argv)
        _log_through_progress_bars()
        if args.command == "models":
            from .models import list_models

            print("\n".join(list_models()))
            return 0
        if args.command == "export":
            return _export(args)
        if args.command == "pack":
            from fastmae.train.data.pack import pack_command

            return pack_command(args.data, args.out, args.workers)
        if args.command == "visualize":
            from fastmae.train.visualize import visualize_checkpoint

            loss = visualize_checkpoint(args.checkpoint, args.output, args.images, args.count, args.mask_ratio,
                                        args.seed, args.scale, args.show_bands, args.bands)  # fmt: skip
            print(f"wrote {args.output} (loss on these images {loss:.4f})")
            return 0
        cfg = config_from_args(args, *COMMANDS[args.command])
        if getattr(args, "print_config", False):
            return _print_config(args.command, cfg)
        from fastmae.train.commands import run

        return run(args.command, cfg)
    except FastMAEError as exc:
        print(f"fastmae: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fastmae: interrupted", file=sys.stderr)
        return 130


def _print_config(command: str, cfg) -> int:
    """``--print-config``: the configuration as a run would resolve it (the batch per process and the accumulation
    chosen for ``--world-size``, else the launcher's, and ``--gpu-mem``), as JSON on rank 0; no torch is imported."""
    import json

    from fastmae.train.job import dist_info  # the launcher's variables (no torch)

    from .batching import choose_batch

    rank, launched, _ = dist_info()
    world = cfg.world_size or launched
    reasons = choose_batch(cfg, world, cfg.gpu_mem, command, "--print-config does not look at a GPU: a run on one "
                           "sizes the batch for its memory; --gpu-mem GIB shows that choice")  # fmt: skip
    cfg.validate()
    if rank == 0:
        print(json.dumps({"command": command, **cfg.to_dict(), "world_size": world,
                          "effective_batch": cfg.effective_batch(world), "lr": cfg.effective_lr(world),
                          "batch_choice": reasons}, indent=2))  # fmt: skip
    return 0


def _export(args: argparse.Namespace) -> int:
    from .interop import export_encoder

    done = export_encoder(args.checkpoint, args.output, args.to, args.img_size)
    h, w = done["img_size"]
    print(f"wrote {done['output']}: {done['model']}, {done['keys']} tensors, {h}x{w} px ({args.to})")
    if done["bands"] is not None:
        where = done["bands_file"] or "its config.json (fastmae_bands)"
        print(f"bands: {done['bands'].describe()}; written to {where}")
    if args.to == "timm":
        out = done["output"]
        read = (f"from safetensors.torch import load_file; state_dict = load_file({out!r})"
                if out.endswith(".safetensors") else f"state_dict = torch.load({out!r}, weights_only=True)")
        print(f"load it with: import timm, torch; {read}; model = {done['load']}; "
              "model.load_state_dict(state_dict, strict=True)")  # fmt: skip
    elif args.to.startswith("hf"):
        print(f"load it with: {done['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
