"""The ``fastmae`` command: ``fastmae pretrain [flags]``, ``fastmae models``.

Flags are generated from :class:`fastmae.config.PretrainConfig` (``--field-name``); a flag given on the command line
overrides the chosen ``--preset``. Bad input ends with one ``fastmae: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing

from .config import PRESETS, PretrainConfig, preset
from .errors import FastMAEError


def _flag_type(tp):
    """The argparse type of a dataclass field annotation such as ``int | None``."""
    if isinstance(tp, str):
        tp = eval(tp, {"typing": typing}, {})  # annotations are strings under `from __future__ import annotations`
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmae", description="Fast, verified Masked Autoencoder pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "pretrain",
        help="MAE pretraining (default: a tiny model on the bundled sample photos)",
        description="MAE pretraining. Flags override the preset's values.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="demo", choices=list(PRESETS), help="named configuration to start from")
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _flag_type(f.type)
        if tp is bool:
            p.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"]
            )
        else:
            p.add_argument(flag, dest=f.name, type=tp, default=None, metavar=f.name.upper(), help=f.metadata["help"])
    sub.add_parser("models", help="list the model names")
    return parser


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    cfg = preset(args.preset)
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig) if getattr(args, f.name) is not None
    }
    return dataclasses.replace(cfg, **given).validate()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "models":
            from .models import list_models

            print("\n".join(list_models()))
            return 0
        from fastmae.train.pretrain import pretrain

        summary = pretrain(config_from_args(args))
        print(
            f"done: {summary['steps']} steps, {summary['images_seen']} images, loss {summary['first_logged_loss']:.4f} "
            f"-> {summary['final_loss']:.4f}, {summary['img_per_s']:.1f} img/s; outputs in {args.output_dir or 'the'} "
            "output folder (summary.json)"
        )
        return 0
    except FastMAEError as exc:
        print(f"fastmae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastmae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
