"""Hugging Face transformers interop: ``ViTMAEForPreTraining`` / ``ViTMAEModel`` folders in and out.

The layout is read from transformers' ``models/vit_mae/modeling_vit_mae.py`` and ``conversion_mapping.py``:

- The Hub layout (what the released facebook/vit-mae-* folders hold, what transformers 4 writes and what 5 still reads
  and writes): ``vit.embeddings.*``, ``vit.encoder.layer.{i}.attention.attention.{query,key,value}``,
  ``...attention.output.dense``, ``...intermediate.dense``, ``...output.dense``, ``...layernorm_{before,after}``,
  ``vit.layernorm``, ``decoder.decoder_layers.{i}.*`` with the same block names, ``decoder.decoder_{embed,norm,pred}``,
  ``decoder.mask_token``, ``decoder.decoder_pos_embed``. ``ViTMAEModel`` alone has no ``vit.`` prefix and no decoder.
- transformers 5 renames the modules in memory (``layers.{i}``, ``attention.{q,k,v,o}_proj``, ``mlp.fc1/fc2``) and
  maps the Hub names onto them when it loads; its ``save_pretrained`` maps them back, writing the decoder blocks as
  ``decoder.decoder_encoder.layer.{i}``. :func:`hub_key` folds every one of these spellings into the Hub layout.

fastmae (= official MAE) fuses query, key and value into one ``qkv`` linear ([3D, D], in that order); the Hub layout
keeps them apart. :data:`BLOCK_KEYS` and :data:`TOP_KEYS` are the whole mapping, used in both directions.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from .bands import HF_FIELD, BandSpec
from .errors import FastMAEError
from .files import load_file, save_safetensors, write_json

logger = logging.getLogger("fastmae.hf")

# fastmae block entry -> Hub block entry (the q/k/v split of qkv is handled apart)
BLOCK_KEYS = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# fastmae top-level entry -> Hub entry without the ``vit.`` prefix of ViTMAEForPreTraining
TOP_KEYS = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}
DECODER_TOP_KEYS = {  # fastmae -> Hub, all under ``decoder.``
    "decoder_embed": "decoder_embed",
    "mask_token": "mask_token",
    "decoder_pos_embed": "decoder_pos_embed",
    "decoder_norm": "decoder_norm",
    "decoder_pred": "decoder_pred",
}
ENCODER_BLOCKS, DECODER_BLOCKS = "encoder.layer", "decoder.decoder_layers"
# transformers 5's in-memory names -> Hub names (applied in this order)
_V5_NAMES = [
    (r"^(vit\.)?layers\.", r"\1encoder.layer."),
    (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
    (r"attention\.q_proj", "attention.attention.query"),
    (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"),
    (r"mlp\.fc2", "output.dense"),
]


def hub_key(key: str) -> str:
    """Any transformers spelling of a ViT-MAE entry in the Hub layout."""
    for pattern, repl in _V5_NAMES:
        key = re.sub(pattern, repl, key)
    return key


def _split_suffix(key: str) -> tuple[str, str]:
    stem, _, suffix = key.rpartition(".")
    return (stem, suffix) if suffix in ("weight", "bias") else (key, "")


def _join(stem: str, suffix: str) -> str:
    return f"{stem}.{suffix}" if suffix else stem


def to_hub(sd: dict[str, torch.Tensor], encoder_only: bool = False) -> dict[str, torch.Tensor]:
    """A fastmae / official MAE state_dict in the Hub layout of ``ViTMAEForPreTraining`` (or, with
    ``encoder_only``, of ``ViTMAEModel``: no ``vit.`` prefix, no decoder)."""
    prefix = "" if encoder_only else "vit."
    out = {}
    for key, value in sd.items():
        stem, suffix = _split_suffix(key)
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)$", stem)
        if m:
            where, i, inner = m.groups()
            if where == "decoder_blocks" and encoder_only:
                continue
            base = f"{prefix}{ENCODER_BLOCKS}.{i}" if where == "blocks" else f"{DECODER_BLOCKS}.{i}"
            if inner == "attn.qkv":
                for name, part in zip(QKV, value.chunk(3, dim=0), strict=True):
                    out[_join(f"{base}.{name}", suffix)] = part.clone()
            elif inner in BLOCK_KEYS:
                out[_join(f"{base}.{BLOCK_KEYS[inner]}", suffix)] = value
            else:
                raise FastMAEError(f"no transformers name for {key}")
        elif stem in TOP_KEYS:
            out[_join(prefix + TOP_KEYS[stem], suffix)] = value
        elif stem in DECODER_TOP_KEYS:
            if not encoder_only:
                out[_join("decoder." + DECODER_TOP_KEYS[stem], suffix)] = value
        elif stem == "encoder_mask_token":
            raise FastMAEError("a mask_token-encoder model has no transformers counterpart; export a visible-mode one")
        else:
            raise FastMAEError(f"no transformers name for {key}")
    return out


def from_hub(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ViT-MAE state_dict (any spelling, with or without ``vit.`` / decoder) in fastmae's names."""
    sd = {hub_key(k): v for k, v in sd.items()}
    top = {v: k for k, v in TOP_KEYS.items()}
    dec_top = {v: k for k, v in DECODER_TOP_KEYS.items()}
    block = {v: k for k, v in BLOCK_KEYS.items()}
    out, qkv = {}, {}
    for key, value in sd.items():
        stem, suffix = _split_suffix(key)
        stem = stem.removeprefix("vit.")
        m = re.match(r"^(encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)$", stem)
        if m:
            where, i, inner = m.groups()
            base = f"{'blocks' if where == ENCODER_BLOCKS else 'decoder_blocks'}.{i}"
            if inner in QKV:
                qkv.setdefault((base, suffix), {})[QKV.index(inner)] = value
            elif inner in block:
                out[_join(f"{base}.{block[inner]}", suffix)] = value
            else:
                raise FastMAEError(f"unknown transformers ViT-MAE entry {key}")
        elif stem in top:
            out[_join(top[stem], suffix)] = value
        elif stem.startswith("decoder.") and stem[8:] in dec_top:
            out[_join(dec_top[stem[8:]], suffix)] = value
        elif stem.startswith("pooler."):  # ViTMAEModel has none; a ViTModel pooler is not ours
            raise FastMAEError(f"unexpected entry {key}: this is a ViT, not a ViT-MAE checkpoint")
        else:
            raise FastMAEError(f"unknown transformers ViT-MAE entry {key}")
    for (base, suffix), parts in qkv.items():
        if len(parts) != 3:
            raise FastMAEError(f"{base}: query, key and value must all be present")
        out[_join(f"{base}.attn.qkv", suffix)] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


# ------------------------------------------------------------------------------------------------- configs
def config_to_arch(config: dict, source: str) -> dict:
    """A transformers ``ViTMAEConfig`` (as ``config.json`` holds it) as a fastmae architecture; a one-line error for
    another model type or for settings fastmae's model does not have."""
    kind = config.get("model_type")
    if kind != "vit_mae":
        raise FastMAEError(f"{source} holds a {kind or 'unknown'!s} model, not ViT-MAE (model_type 'vit_mae')")
    hidden, dec_hidden = config.get("hidden_size", 768), config.get("decoder_hidden_size", 512)
    mlp, dec_mlp = config.get("intermediate_size", 3072) / hidden, config.get("decoder_intermediate_size", 2048)
    problems = []
    if config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {config['hidden_act']!r} (fastmae: exact gelu)")
    if not config.get("qkv_bias", True):
        problems.append("qkv_bias false (fastmae: true)")
    if dec_mlp / dec_hidden != mlp:
        problems.append(f"decoder MLP ratio {dec_mlp / dec_hidden:g} differs from the encoder's {mlp:g}")
    if problems:
        raise FastMAEError(f"{source}: not supported by fastmae's MAE: {'; '.join(problems)}")
    size = config.get("image_size", 224)
    return {
        "img_size": size if isinstance(size, int) else list(size), "patch_size": config.get("patch_size", 16),
        "in_chans": config.get("num_channels", 3), "embed_dim": hidden, "depth": config.get("num_hidden_layers", 12),
        "num_heads": config.get("num_attention_heads", 12), "decoder_embed_dim": dec_hidden,
        "decoder_depth": config.get("decoder_num_hidden_layers", 8),
        "decoder_num_heads": config.get("decoder_num_attention_heads", 16), "mlp_ratio": mlp,
        "norm_eps": config.get("layer_norm_eps", 1e-12), "norm_pix_loss": bool(config.get("norm_pix_loss", False)),
    }  # fmt: skip


def arch_to_config(arch: dict, mask_ratio: float = 0.75, encoder_only: bool = False) -> dict:
    """The ``config.json`` of a ``ViTMAEForPreTraining`` (or ``ViTMAEModel``) with architecture ``arch``."""
    size = arch["img_size"]
    if not isinstance(size, int) and size[0] == size[1]:
        size = size[0]
    return {
        "architectures": ["ViTMAEModel" if encoder_only else "ViTMAEForPreTraining"], "model_type": "vit_mae",
        "image_size": size if isinstance(size, int) else list(size), "patch_size": arch["patch_size"],
        "num_channels": arch["in_chans"], "hidden_size": arch["embed_dim"], "num_hidden_layers": arch["depth"],
        "num_attention_heads": arch["num_heads"], "intermediate_size": round(arch["embed_dim"] * arch["mlp_ratio"]),
        "decoder_hidden_size": arch["decoder_embed_dim"], "decoder_num_hidden_layers": arch["decoder_depth"],
        "decoder_num_attention_heads": arch["decoder_num_heads"],
        "decoder_intermediate_size": round(arch["decoder_embed_dim"] * arch["mlp_ratio"]),
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "layer_norm_eps": arch["norm_eps"], "qkv_bias": True,
        "mask_ratio": mask_ratio, "norm_pix_loss": arch["norm_pix_loss"],
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------- folders
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a transformers folder, or a weight file with a ``config.json`` beside it (one that names a
    ``model_type``: a fastmae output folder has a ``config.json`` too)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file() or not (path.is_dir() or path.name in WEIGHT_FILES
                                                      or path.suffix == ".safetensors"):  # fmt: skip
        return False
    try:
        return "model_type" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return path.is_dir()  # read_config then says what is wrong with it


def read_config(path: str | os.PathLike) -> dict:
    """The architecture in the ``config.json`` of a transformers folder (or beside its weight file)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FastMAEError(f"{folder / 'config.json'} could not be read: {str(exc).splitlines()[0]}") from exc
    return config_to_arch(config, str(path))


def read_bands(path: str | os.PathLike) -> BandSpec | None:
    """The band spec a fastmae export wrote into a transformers ``config.json`` (field ``fastmae_bands``), or None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FastMAEError(f"{folder / 'config.json'} could not be read: {str(exc).splitlines()[0]}") from exc
    found = config.get(HF_FIELD)
    return None if found is None else BandSpec.from_dict(found, f"{folder / 'config.json'} {HF_FIELD}")


def read_hf(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict in fastmae's names, architecture) of a transformers ViT-MAE folder or of its weight file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    arch = read_config(path)
    weights = path if path.is_file() else next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise FastMAEError(f"{folder} has a config.json but no {' or '.join(WEIGHT_FILES)} (sharded folders: not yet)")
    sd, _ = load_file(weights)
    return from_hub(sd), arch


def write_hf(sd: dict[str, torch.Tensor], arch: dict, folder: str | os.PathLike, encoder_only: bool = False,
             mask_ratio: float = 0.75, bands: BandSpec | None = None) -> Path:  # fmt: skip
    """Write ``folder/model.safetensors`` + ``folder/config.json`` that transformers' ``from_pretrained`` loads, each
    file through a temp file and a rename. ``bands`` goes into the config as the extra field ``fastmae_bands``
    (transformers keeps unknown config fields as attributes and writes them back)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FastMAEError(f"{folder} is a file; --to hf writes a folder")
    config = arch_to_config(arch, mask_ratio, encoder_only)
    if bands is not None:
        config[HF_FIELD] = bands.to_dict()
    save_safetensors(to_hub(sd, encoder_only), folder / "model.safetensors", {"format": "pt"})
    write_json(folder / "config.json", config)
    return folder
