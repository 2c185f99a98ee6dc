"""Checkpoints in and out: official MAE files, fastmae checkpoints, safetensors, timm ViTs, any resolution.

- :func:`read_state_dict` reads ``.pth`` (``weights_only=True``; ``{"model": ...}`` official / fastmae files, or a bare
  state_dict) and ``.safetensors``; :func:`write_state_dict` writes either, atomically.
- :func:`interpolate_pos_embed` moves a position-embedding table to another patch grid (square or not): fixed sin-cos
  tables are regenerated for the new grid, learned ones are resized bicubically; the cls row is kept.
- :func:`create_vit` builds the finetune / probe encoder (timm ``VisionTransformer``, official MAE widths) and
  :func:`load_encoder` fills it from any MAE checkpoint, reporting the missing and unexpected keys.
- :func:`export_encoder` writes the encoder for timm (``vit_*_224``, ``num_classes=0``, strict; a finetuned one with
  its head) or in the official encoder-only format.
- Bands (:mod:`fastmae.bands`): :func:`read_checkpoint` finds a checkpoint's :class:`~fastmae.bands.BandSpec` (its
  config, a transformers ``config.json`` field, or the band file beside an exported weight file); the loaders move
  weights to another band set (:func:`~fastmae.bands.transfer_state`) and exports carry the spec out again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from . import hf
from .bands import BandSpec, plan_transfer, read_sidecar, spec_from_config, transfer_state, write_sidecar
from .errors import FastMAEError
from .files import check_checkpoint_file, load_file, save_safetensors, save_torch
from .models import ARCH_KEYS, MaskedAutoencoderViT, arch_name, create_from_arch, list_models, model_args, named_arch
from .pos_embed import sincos_2d

logger = logging.getLogger("fastmae.interop")
DECODER_KEYS = ("decoder_", "mask_token", "encoder_mask_token")  # key prefixes that belong to pretraining only
TIMM_NAMES = {
    "mae_vit_tiny_patch16": "vit_tiny_patch16_224",
    "mae_vit_small_patch16": "vit_small_patch16_224",
    "mae_vit_base_patch16": "vit_base_patch16_224",
    "mae_vit_large_patch16": "vit_large_patch16_224",
    "mae_vit_huge_patch14": "vit_huge_patch14_224",
}


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, info) from a ``.pth``/``.safetensors`` file. ``info`` holds the fastmae ``config`` (model name,
    img_size) when the file has one. A missing or unreadable file is a one-line :class:`FastMAEError`."""
    path = Path(path)
    obj, meta = load_file(path)
    if path.suffix == ".safetensors":
        info = {"config": {k: _meta_value(v) for k, v in meta.items()}} if meta else {}
        return obj, info
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # official {"model": ...} and fastmae files
        return obj["model"], {k: v for k, v in obj.items() if k != "model"}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    raise FastMAEError(f"checkpoint {path} holds no state_dict (expected a 'model' entry or a name -> tensor dict)")


def _meta_value(text: str):
    """safetensors metadata are strings: "224" -> 224, "224x320" -> (224, 320)."""
    parts = text.split("x")
    if all(p.isdigit() for p in parts) and len(parts) in (1, 2):
        return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    return text


def write_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike, meta: dict | None = None,
                     wrap: str | None = None) -> Path:  # fmt: skip
    """Write ``sd`` as ``.safetensors`` (``meta`` as string metadata) or ``.pth`` (``{wrap: sd}`` when ``wrap``),
    atomically (:mod:`fastmae.files`), so an interrupted write never leaves a half file."""
    if Path(path).suffix == ".safetensors":
        return save_safetensors(sd, path, meta)
    return save_torch({wrap: sd} if wrap else sd, path)


def encoder_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's entries of a full MAE state_dict (the decoder and mask tokens dropped)."""
    return {k: v for k, v in sd.items() if not k.startswith(DECODER_KEYS)}


def describe(sd: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(patch size, width, blocks) of the ViT encoder in ``sd``."""
    if "patch_embed.proj.weight" not in sd:
        raise FastMAEError("state_dict has no patch_embed.proj.weight: not a ViT/MAE checkpoint")
    w = sd["patch_embed.proj.weight"]  # [D, C, p, p]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return int(w.shape[-1]), int(w.shape[0]), depth


def check_model(sd: dict[str, torch.Tensor], name: str, source: str, arch: dict | None = None) -> None:
    """One-line error when the encoder in ``sd`` is not the encoder of model ``name`` (of ``arch`` when given)."""
    a = arch or model_args(name)
    patch, width, depth = describe(sd)
    if (patch, width, depth) != (a["patch_size"], a["embed_dim"], a["depth"]):
        raise FastMAEError(
            f"{source} is a ViT with patch {patch}, width {width}, {depth} blocks, not {name} (patch "
            f"{a['patch_size']}, width {a['embed_dim']}, {a['depth']} blocks)"
        )


def _grid(arch: dict) -> tuple[int, int]:
    h, w = _pair(arch["img_size"])
    return h // arch["patch_size"], w // arch["patch_size"]


def arch_from_shapes(sd: dict[str, torch.Tensor]) -> dict:
    """The architecture of an official / bare MAE state_dict, read from its shapes. Head counts are not in the
    shapes: they come from the named model of the same widths (else width / 64, the ViT convention). An
    encoder-only file gets that model's decoder (or the official 512 x 8, 16 heads)."""
    patch, width, depth = describe(sd)
    proj = sd["patch_embed.proj.weight"]
    grid = sd["pos_embed"].shape[1] - 1 if "pos_embed" in sd else 196
    side = round(grid**0.5)
    if side * side != grid:
        raise FastMAEError(f"position table has {grid} patches, not a square grid: give the architecture")
    arch = {"img_size": side * patch, "patch_size": patch, "in_chans": int(proj.shape[1]), "embed_dim": width,
            "depth": depth, "num_heads": max(width // 64, 1), "decoder_embed_dim": 512, "decoder_depth": 8,
            "decoder_num_heads": 16, "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / width if depth else 4.0,
            "norm_eps": 1e-6, "norm_pix_loss": False}  # fmt: skip
    same_encoder = [n for n in list_models() if (model_args(n)["embed_dim"], model_args(n)["depth"]) == (width, depth)]
    if same_encoder:
        ref = model_args(same_encoder[0])
        arch.update(num_heads=ref["num_heads"], decoder_embed_dim=ref["decoder_embed_dim"],
                    decoder_depth=ref["decoder_depth"], decoder_num_heads=ref["decoder_num_heads"])  # fmt: skip
    if "decoder_embed.weight" in sd:
        dec_dim = int(sd["decoder_embed.weight"].shape[0])
        dec_depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
        heads = [
            model_args(n)["decoder_num_heads"]
            for n in list_models()
            if (model_args(n)["decoder_embed_dim"], model_args(n)["decoder_depth"]) == (dec_dim, dec_depth)
        ]
        arch.update(decoder_embed_dim=dec_dim, decoder_depth=dec_depth,
                    decoder_num_heads=heads[0] if heads else max(dec_dim // 32, 1))  # fmt: skip
    return arch


def checkpoint_arch(sd: dict[str, torch.Tensor], info: dict) -> dict:
    """A checkpoint's architecture: the ``arch`` a fastmae run saved, else its model name and resolution, else its
    shapes (official files)."""
    cfg = info.get("config") or {}
    if isinstance(cfg.get("arch"), dict):
        return dict(cfg["arch"])
    if cfg.get("model") in list_models():
        arch = named_arch(cfg["model"])
        arch.update({k: cfg[k] for k in ("img_size", "patch_size", "norm_pix_loss") if cfg.get(k) is not None})
        return arch
    return arch_from_shapes(sd)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state_dict in official names, architecture, other entries) of any checkpoint fastmae reads: a transformers
    ViT-MAE folder or its ``model.safetensors``, a fastmae pretrain / finetune checkpoint, an official MAE file (full
    or encoder-only), a bare state_dict or a timm export. The other entries include ``"bands"``: the checkpoint's
    :class:`~fastmae.bands.BandSpec` (see :func:`checkpoint_bands`), or None where it has none."""
    if hf.is_hf(path):
        sd, arch = hf.read_hf(path)
        info = {"source": "transformers", "bands": hf.read_bands(path)}
    else:
        sd, info = read_state_dict(path)
        if any(k.startswith(("vit.", "embeddings.", "encoder.layer.", "layers.")) for k in sd):
            raise FastMAEError(f"{path} is in the transformers layout: give its folder, with the config.json beside "
                               "it")  # fmt: skip
        arch = checkpoint_arch(sd, info)
        info = {**info, "bands": checkpoint_bands(path, info)}
    spec = info["bands"]
    if spec is not None and spec.count != arch["in_chans"]:
        raise FastMAEError(f"checkpoint {path} takes {arch['in_chans']} bands but its band spec lists {spec.count}")
    return sd, arch, info


def checkpoint_bands(path: str | os.PathLike, info: dict) -> BandSpec | None:
    """The bands a checkpoint file was trained on: its config's ``"bands"`` (fastmae runs), else the band file
    beside it (fastmae exports, :func:`~fastmae.bands.sidecar_path`), else None."""
    cfg = info.get("config")
    spec = spec_from_config(cfg if isinstance(cfg, dict) else None, f"checkpoint {path}")
    return spec if spec is not None else read_sidecar(path)


def check_pretrained(path: str | os.PathLike, flag: str = "checkpoint") -> None:
    """A quick look (no loading) that ``path`` can be read as a checkpoint: a transformers folder's config says
    ViT-MAE, any other file passes :func:`~fastmae.files.check_checkpoint_file`; else a one-line error."""

    if hf.is_hf(path):
        hf.read_config(path)
    else:
        check_checkpoint_file(path, flag)


def pretrained_fields(path: str | os.PathLike, flag: str = "checkpoint") -> dict:
    """What a ``--pretrained`` checkpoint says of a run's configuration: ``model`` (its architecture's name, or None
    for one that has no name), ``img_size`` (square grids) and ``norm_pix_loss``."""
    check_pretrained(path, flag)
    _, arch, _ = read_checkpoint(path)
    fields = {"model": arch_name(arch), "norm_pix_loss": arch["norm_pix_loss"]}
    if isinstance(arch["img_size"], int):
        fields["img_size"] = arch["img_size"]
    return fields


def encoder_arch(model: str | None, pretrained: str | os.PathLike | None) -> dict:
    """The architecture a finetune / probe builds: the ``pretrained`` checkpoint's, or the named ``model``'s when
    there is none or when an explicit ``model`` disagrees (:func:`load_encoder` then says so in one line)."""
    if pretrained is None:
        return named_arch(model)
    arch = read_checkpoint(pretrained)[1]
    if model is not None and arch_name(arch) != model:
        return named_arch(model)
    return arch


def check_arch_name(arch: dict, model: str | None, source: str) -> None:
    """One-line error naming both when an explicit ``model`` is not the checkpoint's architecture."""
    if model is None:
        return
    found = arch_name(arch)
    if found != model:
        what = found or (f"a ViT with patch {arch['patch_size']}, width {arch['embed_dim']}, {arch['depth']} blocks, "
                         f"decoder {arch['decoder_embed_dim']} x {arch['decoder_depth']}")  # fmt: skip
        raise FastMAEError(f"--model {model} disagrees with {source}, which is {what}; leave --model out to use it")


def from_pretrained(path: str | os.PathLike, model: str | None = None, *, bands: BandSpec | None = None,
                    **overrides) -> MaskedAutoencoderViT:  # fmt: skip
    """An MAE built and filled from a checkpoint, its architecture read from the checkpoint itself (see
    :func:`read_checkpoint`). ``model``, when given, must be that architecture's name. ``overrides``: architecture
    entries (``img_size``: position tables are moved to the new grid; ``in_chans``; ``norm_pix_loss``; ``norm_eps``)
    and the model's keyword options (``kernels``, ``attn_backend``, ``encoder_mode``, ``drop_path_rate``). A full MAE
    loads strictly; an encoder-only file gets a freshly initialised decoder, with a warning.

    Bands: the returned model's ``bands`` attribute is the checkpoint's :class:`~fastmae.bands.BandSpec` (names,
    per-band statistics, dtype; None for a checkpoint without one, such as an official file). ``bands`` (the spec of
    the data to use it on) or ``in_chans`` asks for another band set: the patch embedding and decoder output move to
    it (:func:`~fastmae.bands.transfer_state`: filters kept by name, new bands from the mean of the pretrained
    filters; without names, timm's ``adapt_input_conv``), logged, and ``model.bands`` is then ``bands``."""
    sd, arch, info = read_checkpoint(path)
    return mae_from_state(sd, arch, f"checkpoint {path}", model, bands=bands, source_bands=info["bands"], **overrides)


def mae_from_state(sd: dict[str, torch.Tensor], arch: dict, source: str, model: str | None = None, *,
                   bands: BandSpec | None = None, source_bands: BandSpec | None = None,
                   **overrides) -> MaskedAutoencoderViT:  # fmt: skip
    """:func:`from_pretrained` for a state_dict and architecture already read (``source`` names them in errors;
    ``source_bands`` is the checkpoint's band spec, ``bands`` the one wanted)."""
    check_arch_name(arch, model, source)
    new = {**arch, **{k: v for k, v in overrides.items() if k in ARCH_KEYS and v is not None}}
    if new["patch_size"] != arch["patch_size"]:
        raise FastMAEError(f"{source} has patch size {arch['patch_size']}, not {new['patch_size']}")
    if bands is not None:
        if overrides.get("in_chans") not in (None, bands.count):
            raise FastMAEError(f"in_chans {overrides['in_chans']} disagrees with the {bands.count} bands asked for")
        new["in_chans"] = bands.count
    sd, _ = _move_bands(sd, source_bands or arch["in_chans"], bands or new["in_chans"], source)
    mae = create_from_arch(new, **{k: v for k, v in overrides.items() if k not in ARCH_KEYS})
    mae.bands = bands if bands is not None else (source_bands if new["in_chans"] == arch["in_chans"] else None)
    sd = dict(sd)
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in sd:
            sd[key] = interpolate_pos_embed(sd[key], _grid(new), _grid(arch))
    decoder = [k for k in mae.state_dict() if k.startswith(DECODER_KEYS) and k != "encoder_mask_token"]
    encoder_only = not any(k in sd for k in decoder)
    if encoder_only:
        logger.warning("%s holds an encoder only: the decoder starts from its initialisation", source)
    optional = set(decoder if encoder_only else []) | {"encoder_mask_token"}
    missing, unexpected = mae.load_state_dict(sd, strict=False)
    lacking = [k for k in missing if k not in optional]
    if lacking or unexpected:
        raise FastMAEError(f"{source} does not fit its architecture: missing {lacking[:3]}, unexpected "
                           f"{unexpected[:3]}")  # fmt: skip
    return mae


def _move_bands(sd: dict[str, torch.Tensor], source, target, what: str):
    """``sd`` moved from ``source`` to ``target`` bands (:func:`~fastmae.bands.plan_transfer`), the move logged;
    (state_dict, transfer)."""
    transfer = plan_transfer(source, target)
    if transfer.rule != "same":
        logger.info("%s: %s", what, transfer.describe())
    return transfer_state(sd, transfer), transfer


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid, old_grid=None, num_prefix: int = 1) -> torch.Tensor:
    """[1, P+Ho*Wo, D] -> [1, P+Hn*Wn, D] for the patch grid ``new_grid`` (int or (rows, cols)).

    A table that is exactly the fixed 2-D sin-cos embedding of its grid (MAE pretraining) is regenerated for the new
    grid; any other (learned) table is resized bicubically as an image. The ``num_prefix`` cls rows are kept.
    ``old_grid`` defaults to the square grid that fits the table.
    """
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    n, dim = patches.shape[1], patches.shape[2]
    if old_grid is None:
        side = round(n**0.5)
        if side * side != n:
            raise FastMAEError(f"position table has {n} patches, not a square grid; pass its grid size")
        old_grid = (side, side)
    old_grid, new_grid = _pair(old_grid), _pair(new_grid)
    if old_grid[0] * old_grid[1] != n:
        raise FastMAEError(f"position table has {n} patches, not a {old_grid[0]}x{old_grid[1]} grid")
    if old_grid == new_grid:
        return pos_embed
    if dim % 4 == 0 and torch.allclose(patches[0].float(), sincos_2d(dim, *old_grid), atol=1e-5):
        new = sincos_2d(dim, *new_grid).to(patches.dtype).unsqueeze(0)
    else:
        grid = patches.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()  # [1, D, Ho, Wo]
        grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
        new = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(patches.dtype)
    return torch.cat([prefix, new], dim=1)


def create_vit(model: str | dict, num_classes: int, img_size=224, global_pool: str = "avg",
               drop_path_rate: float = 0.0, **kw) -> torch.nn.Module:  # fmt: skip
    """The encoder of an MAE (a model name, or an architecture from :func:`read_checkpoint`) as a timm
    ``VisionTransformer`` for finetuning or probing.

    ``global_pool="avg"`` is the paper's finetune head (mean of the patch tokens, then ``fc_norm``, then ``head``);
    ``"token"`` uses the normed cls token (the linear probe). ``img_size`` is an int or (H, W).
    """
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    a = named_arch(model) if isinstance(model, str) else model
    return VisionTransformer(
        img_size=_pair(img_size), patch_size=a["patch_size"], in_chans=a["in_chans"], embed_dim=a["embed_dim"],
        depth=a["depth"], num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"], qkv_bias=True, num_classes=num_classes,
        global_pool=global_pool, drop_path_rate=drop_path_rate,
        norm_layer=partial(torch.nn.LayerNorm, eps=a["norm_eps"]), **kw,
    )  # fmt: skip


def load_encoder(vit: torch.nn.Module, path: str | os.PathLike, name: str | None = None,
                 bands: BandSpec | None = None) -> tuple[list[str], list[str]]:  # fmt: skip
    """Fill ``vit`` (from :func:`create_vit`) with the encoder of any checkpoint :func:`read_checkpoint` reads.

    Decoder entries are dropped, a head of another shape is dropped, the position table is moved to ``vit``'s grid.
    A checkpoint of other bands than ``vit`` takes (``bands``, the data's spec, else ``vit``'s input channels) has
    its patch embedding moved to them (:func:`~fastmae.bands.transfer_state`, logged).
    Returns (missing, unexpected) keys; anything missing besides the head and ``fc_norm`` is an error, and so is an
    encoder of another geometry than ``vit`` (``name`` names it in the message).
    """
    return _load_encoder(vit, path, name, bands)[:2]


def _load_encoder(vit, path, name, bands):
    sd, arch, info = read_checkpoint(path)
    in_chans = vit.patch_embed.proj.weight.shape[1]
    if bands is not None and bands.count != in_chans:
        raise FastMAEError(f"the encoder takes {in_chans} bands, the data has {bands.count}")
    sd, transfer = _move_bands(encoder_state(sd), info["bands"] or arch["in_chans"], bands or in_chans,
                               f"checkpoint {path}")  # fmt: skip
    mine = {"patch_size": vit.patch_embed.patch_size[0], "embed_dim": vit.embed_dim, "depth": len(vit.blocks)}
    check_model(sd, name or "this encoder", f"checkpoint {path}", mine)
    head = vit.get_classifier()
    for key in ("head.weight", "head.bias"):
        if key in sd and (not hasattr(head, "weight") or sd[key].shape != vit.state_dict()[key].shape):
            del sd[key]
    if "pos_embed" in sd:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], vit.patch_embed.grid_size, _grid(arch))
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    lacking = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if lacking:
        raise FastMAEError(f"checkpoint {path} lacks encoder weights: {', '.join(lacking[:4])}")
    if "head.weight" in missing and hasattr(head, "weight"):
        torch.nn.init.trunc_normal_(head.weight, std=2e-5)  # the official finetune head init
        torch.nn.init.zeros_(head.bias)
    return list(missing), list(unexpected), transfer


def load_pretrained(vit: torch.nn.Module, path: str | os.PathLike | None, name: str | None,
                    bands: BandSpec | None = None) -> dict:  # fmt: skip
    """:func:`load_encoder` for a recipe's ``--pretrained``, logged; returns what to record in the run's config and
    summary (with ``"band_transfer"`` where the weights moved to other bands). Without a checkpoint the encoder keeps
    its random weights, with a warning."""
    if path is None:
        logger.warning("no --pretrained checkpoint: the encoder starts from random weights")
        return {"pretrained": None}
    missing, unexpected, transfer = _load_encoder(vit, path, name, bands)
    logger.info("loaded %s: missing %s, unexpected %s", path, missing or "none", unexpected or "none")
    done = {"pretrained": str(path), "missing_keys": missing, "unexpected_keys": unexpected}
    return done if transfer.rule == "same" else {**done, "band_transfer": transfer.to_dict()}


EXPORT_TARGETS = ("timm", "official", "hf", "hf-encoder")


def _timm_head(enc: dict[str, torch.Tensor]) -> str:
    """The head arguments of the timm model that loads ``enc`` strictly: ``num_classes=0`` for a pretrained encoder;
    a finetuned one's class count, and ``global_pool="avg"`` where it pools through ``fc_norm`` (the paper's head)."""
    head = enc.get("head.weight")
    classes = f"num_classes={head.shape[0] if head is not None else 0}"
    return classes + (', global_pool="avg"' if "fc_norm.weight" in enc else "")


def _timm_call(arch: dict, size: tuple[int, int], head: str = "num_classes=0") -> str:
    name = arch_name(arch)
    size_arg = size[0] if size[0] == size[1] else size
    if name in TIMM_NAMES and arch["norm_eps"] == 1e-6 and arch["in_chans"] == 3:
        return f'timm.create_model("{TIMM_NAMES[name]}", {head}' + (
            ")" if size == (224, 224) else f", img_size={size_arg})"
        )
    return (f"timm.models.vision_transformer.VisionTransformer(img_size={size_arg}, patch_size={arch['patch_size']}, "
            f"in_chans={arch['in_chans']}, embed_dim={arch['embed_dim']}, depth={arch['depth']}, "
            f"num_heads={arch['num_heads']}, mlp_ratio={arch['mlp_ratio']:g}, {head}"
            + ("" if arch["norm_eps"] == 1e-6 else f", norm_layer=partial(nn.LayerNorm, eps={arch['norm_eps']:g})")
            + ")")  # fmt: skip


def export_encoder(checkpoint: str | os.PathLike, output: str | os.PathLike, to: str = "timm",
                   img_size: int | None = None) -> dict:  # fmt: skip
    """Write ``checkpoint`` (anything :func:`read_checkpoint` reads) for another library; returns a description.

    ``to="timm"``: the encoder as a bare state_dict (``.pth`` or ``.safetensors``) that ``timm.create_model(<timm
    name>, num_classes=0[, img_size=...])`` loads with ``strict=True`` (a finetuned model's with its head:
    ``num_classes=N, global_pool="avg"``). ``to="official"``: ``{"model": encoder}`` as in
    the released ``mae_pretrain_vit_*.pth``. ``to="hf"``: a folder (``config.json`` + ``model.safetensors``) that
    ``transformers.ViTMAEForPreTraining.from_pretrained`` loads, decoder included; ``"hf-encoder"``: the same for
    ``ViTMAEModel``. ``img_size`` moves the position tables to another resolution.

    Any band count is carried (timm ``in_chans``, transformers ``num_channels``); the checkpoint's band spec (names,
    per-band statistics) travels too: in the transformers ``config.json`` (field ``fastmae_bands``) or, for timm /
    official files, in a band file beside the weights (``enc.pth`` -> ``enc.bands.json``), which
    :func:`from_pretrained` reads back. The description's ``"bands"`` is the spec written, or None.
    """
    if to not in EXPORT_TARGETS:
        raise FastMAEError(f"--to must be one of {', '.join(EXPORT_TARGETS)}, got {to!r}")
    sd, arch, info = read_checkpoint(checkpoint)
    spec = info["bands"]
    patch, old = arch["patch_size"], _grid(arch)
    size = _pair(img_size) if img_size is not None else _pair(arch["img_size"])
    if size[0] % patch or size[1] % patch:
        raise FastMAEError(f"--img-size {img_size} is not a multiple of the patch size {patch}")
    arch = {**arch, "img_size": size[0] if size[0] == size[1] else list(size)}
    sd = dict(sd)
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in sd:
            sd[key] = interpolate_pos_embed(sd[key], _grid(arch), old)
    name = arch_name(arch) or "custom"
    enc = encoder_state(sd)
    if to in ("hf", "hf-encoder"):
        if to == "hf" and "decoder_embed.weight" not in sd:
            raise FastMAEError(f"checkpoint {checkpoint} holds an encoder only: export it with --to hf-encoder")
        hf.write_hf(sd if to == "hf" else enc, arch, output, encoder_only=to == "hf-encoder", bands=spec)
        cls = "ViTMAEForPreTraining" if to == "hf" else "ViTMAEModel"
        return {"model": name, "img_size": size, "keys": len(sd if to == "hf" else enc), "output": str(output),
                "load": f'transformers.{cls}.from_pretrained("{output}")', "bands": spec,
                "bands_file": None}  # fmt: skip
    if to == "official" and Path(output).suffix == ".safetensors":
        raise FastMAEError("--to official writes the released .pth format; use a .pth output")
    meta = {"model": name, "img_size": f"{size[0]}x{size[1]}", "patch_size": patch}
    write_state_dict(enc, output, meta=meta, wrap="model" if to == "official" else None)
    side = write_sidecar(output, spec)
    return {"model": name, "img_size": size, "keys": len(enc), "load": _timm_call(arch, size, _timm_head(enc)),
            "output": str(output), "bands": spec, "bands_file": str(side) if side else None}  # fmt: skip
