"""Checkpoints in and out: official MAE files, fastmae checkpoints, safetensors, timm ViTs, any resolution.

- :func:`read_state_dict` reads ``.pth`` (``weights_only=True``; ``{"model": ...}`` official / fastmae files, or a bare
  state_dict) and ``.safetensors``; :func:`write_state_dict` writes either, atomically.
- :func:`interpolate_pos_embed` moves a position-embedding table to another patch grid (square or not): fixed sin-cos
  tables are regenerated for the new grid, learned ones are resized bicubically; the cls row is kept.
- :func:`create_vit` builds the finetune / probe encoder (timm ``VisionTransformer``, official MAE widths) and
  :func:`load_encoder` fills it from any MAE checkpoint, reporting the missing and unexpected keys.
- :func:`export_encoder` writes the encoder for timm (``vit_*_224``, ``num_classes=0``, strict) or in the official
  encoder-only format.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import FastMAEError
from .models import list_models, model_args
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
    from fastmae.train.checkpoint import check_checkpoint_file

    path = Path(path)
    check_checkpoint_file(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
        except Exception as exc:
            raise FastMAEError(f"checkpoint {path} could not be read: {str(exc).splitlines()[0]}") from exc
        info = {"config": {k: _meta_value(v) for k, v in meta.items()}} if meta else {}
        return sd, info
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FastMAEError(f"checkpoint {path} could not be read: {str(exc).splitlines()[0]}") from exc
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
    through a temp file and a rename, so an interrupted write never leaves a half file."""
    from fastmae.train.checkpoint import save_checkpoint

    path = Path(path)
    if path.suffix != ".safetensors":
        return save_checkpoint({wrap: sd} if wrap else sd, path)
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (meta or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def infer_model(sd: dict[str, torch.Tensor]) -> str:
    """The fastmae model name whose encoder has the geometry of ``sd``."""
    patch, width, depth = describe(sd)
    for name in list_models():
        a = model_args(name)
        if (a["patch_size"], a["embed_dim"], a["depth"]) == (patch, width, depth):
            return name
    raise FastMAEError(f"no known model has patch {patch}, width {width} and {depth} blocks")


def check_model(sd: dict[str, torch.Tensor], name: str, source: str) -> None:
    """One-line error when the encoder in ``sd`` is not the encoder of model ``name``."""
    a = model_args(name)
    patch, width, depth = describe(sd)
    if (patch, width, depth) != (a["patch_size"], a["embed_dim"], a["depth"]):
        raise FastMAEError(
            f"{source} is a ViT with patch {patch}, width {width}, {depth} blocks, not {name} (patch "
            f"{a['patch_size']}, width {a['embed_dim']}, {a['depth']} blocks)"
        )


def _saved_grid(sd: dict[str, torch.Tensor], info: dict) -> tuple[int, int]:
    """The patch grid the checkpoint's position table was made for: from its config's img_size, else square."""
    cfg = info.get("config") or {}
    if "img_size" in cfg:
        patch = describe(sd)[0]
        return tuple(s // patch for s in _pair(cfg["img_size"]))
    side = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    return side, side


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


def create_vit(name: str, num_classes: int, img_size=224, global_pool: str = "avg", drop_path_rate: float = 0.0,
               **kw) -> torch.nn.Module:  # fmt: skip
    """The encoder of MAE model ``name`` as a timm ``VisionTransformer`` for finetuning or probing.

    ``global_pool="avg"`` is the paper's finetune head (mean of the patch tokens, then ``fc_norm``, then ``head``);
    ``"token"`` uses the normed cls token (the linear probe). ``img_size`` is an int or (H, W).
    """
    from timm.models.vision_transformer import VisionTransformer

    a = model_args(name)
    return VisionTransformer(
        img_size=_pair(img_size), patch_size=a["patch_size"], embed_dim=a["embed_dim"], depth=a["depth"],
        num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"], qkv_bias=True, num_classes=num_classes,
        global_pool=global_pool, drop_path_rate=drop_path_rate, **kw,
    )  # fmt: skip


def load_encoder(vit: torch.nn.Module, path: str | os.PathLike, name: str) -> tuple[list[str], list[str]]:
    """Fill ``vit`` (from :func:`create_vit`) with the encoder of a pretraining / official / finetuned checkpoint.

    Decoder entries are dropped, a head of another shape is dropped, the position table is moved to ``vit``'s grid.
    Returns (missing, unexpected) keys; anything missing besides the head and ``fc_norm`` is an error.
    """
    sd, info = read_state_dict(path)
    sd = encoder_state(sd)
    check_model(sd, name, f"checkpoint {path}")
    head = vit.get_classifier()
    for key in ("head.weight", "head.bias"):
        if key in sd and (not hasattr(head, "weight") or sd[key].shape != vit.state_dict()[key].shape):
            del sd[key]
    if "pos_embed" in sd:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], vit.patch_embed.grid_size, _saved_grid(sd, info))
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    lacking = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if lacking:
        raise FastMAEError(f"checkpoint {path} lacks encoder weights: {', '.join(lacking[:4])}")
    if "head.weight" in missing and hasattr(head, "weight"):
        torch.nn.init.trunc_normal_(head.weight, std=2e-5)  # the official finetune head init
        torch.nn.init.zeros_(head.bias)
    return list(missing), list(unexpected)


def load_pretrained(vit: torch.nn.Module, path: str | os.PathLike | None, name: str) -> dict:
    """:func:`load_encoder` for a recipe's ``--pretrained``, logged; returns what to record in the run's config and
    summary. Without a checkpoint the encoder keeps its random weights, with a warning."""
    if path is None:
        logger.warning("no --pretrained checkpoint: the encoder starts from random weights")
        return {"pretrained": None}
    missing, unexpected = load_encoder(vit, path, name)
    logger.info("loaded %s: missing %s, unexpected %s", path, missing or "none", unexpected or "none")
    return {"pretrained": str(path), "missing_keys": missing, "unexpected_keys": unexpected}


def export_encoder(checkpoint: str | os.PathLike, output: str | os.PathLike, to: str = "timm",
                   img_size: int | None = None) -> dict:  # fmt: skip
    """Write the encoder of ``checkpoint`` for timm or in the official encoder-only format; returns a description.

    ``to="timm"``: a bare state_dict (``.pth`` or ``.safetensors``) that ``timm.create_model(<timm name>,
    num_classes=0[, img_size=...])`` loads with ``strict=True``. ``to="official"``: ``{"model": encoder}`` as in the
    released ``mae_pretrain_vit_*.pth``. ``img_size`` resamples the position table to another resolution.
    """
    if to not in ("timm", "official"):
        raise FastMAEError(f"--to must be timm or official, got {to!r}")
    sd, info = read_state_dict(checkpoint)
    enc = encoder_state(sd)
    name = infer_model(enc)
    patch = describe(enc)[0]
    old = _saved_grid(enc, info)
    size = tuple(g * patch for g in old)
    if img_size is not None:
        size = _pair(img_size)
        if size[0] % patch or size[1] % patch:
            raise FastMAEError(f"--img-size {img_size} is not a multiple of the patch size {patch}")
        enc["pos_embed"] = interpolate_pos_embed(enc["pos_embed"], (size[0] // patch, size[1] // patch), old)
    if to == "official" and Path(output).suffix == ".safetensors":
        raise FastMAEError("--to official writes the released .pth format; use a .pth output")
    write_state_dict(enc, output, meta={"model": name, "img_size": f"{size[0]}x{size[1]}"},
                     wrap="model" if to == "official" else None)  # fmt: skip
    timm_call = f'timm.create_model("{TIMM_NAMES[name]}", num_classes=0' + (
        ")" if size == (224, 224) else f", img_size={size[0] if size[0] == size[1] else size})"
    )
    return {"model": name, "img_size": size, "keys": len(enc), "timm": timm_call, "output": str(output)}
