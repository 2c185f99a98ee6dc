"""The MAE model: facebookresearch/mae parameter names, shapes, initialisation and forward semantics.

``MaskedAutoencoderViT`` loads official checkpoints with ``strict=True``. On top of the official model it has a
switchable op layer (:mod:`fastmae.ops`), an attention dispatch (:mod:`fastmae.attention`) and a ``mask_token``
encoder mode (the paper's "[M] in encoder" baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed

from . import attention as attn_dispatch
from . import ops
from .errors import FastMAEError
from .kernels.masked_mse import patchify, unpatchify
from .kernels.visible_embed import visible_embed
from .pos_embed import sincos_2d
from .registry import _MODELS, check_mask_ratio, list_models, model_args  # noqa: F401 (re-exported)

ENCODER_MODES = ("visible", "mask_token")
EMBED_MODES = ("auto", "full", "visible")
LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)  # the official norm layer
NO_WEIGHT_DECAY = ("cls_token", "mask_token", "encoder_mask_token", "pos_embed", "decoder_pos_embed")


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``) and a dispatched core."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise FastMAEError(f"num_heads {num_heads} does not divide the width {dim}")
        self.num_heads = num_heads
        self.backend = attn_dispatch.check_backend_name(backend)
        self.choice: str | None = None  # what ``auto`` runs, set from a measured table (resolve_attention)
        self.backend_used: str | None = None
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, Dh]
        chosen = attn_dispatch.get_backend(self.choice) if self.choice is not None else None
        backend = chosen if chosen is not None and not chosen.unsupported(q, k, v) else attn_dispatch.resolve(
            self.backend, q, k, v)  # fmt: skip
        if not torch.compiler.is_compiling():
            self.backend_used = backend.name
        x = backend(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block; state_dict keys match timm's ``Block`` (norm1, attn, norm2, mlp)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        drop_path: float = 0.0,
        attn_backend: str = "auto",
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True, backend=attn_backend)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a ViT backbone (He et al. 2021), official-compatible.

    ``forward(imgs, mask_ratio=0.75, noise=None) -> (loss, pred, mask)``: ``pred`` is ``[N, L, p*p*C]``, ``mask`` is
    ``[N, L]`` with 1 = removed. Given the same ``noise [N, L]`` the result equals the official model's.

    Keyword-only extras:
        kernels: ``"auto" | "reference" | "triton"`` or a per-op mapping (see :mod:`fastmae.ops`).
        attn_backend: ``"auto" | "xformers" | "sdpa" | "flash" | "cudnn" | "efficient" | "math"``, or per call site
            ``"encoder=flash,decoder=efficient"`` (see :mod:`fastmae.attention`).
        encoder_mode: ``"visible"`` (MAE) or ``"mask_token"`` (encoder sees all patches, removed ones replaced by a
            learned ``encoder_mask_token``; that parameter exists only in this mode).
        embed: ``"auto" | "full" | "visible"``: embed every patch then keep 25% (the official order), or gather the
            kept patches' pixels and embed only them (:mod:`fastmae.kernels.visible_embed`). ``auto``: visible on
            CUDA unless ``kernels`` puts masking on the reference (see :meth:`embed_used`).

    Any ``in_chans`` (1, 4, 13, ...): every op takes the band count from the images. ``bands`` holds the
    :class:`~fastmae.bands.BandSpec` of the data the weights were trained on when it is known (``from_pretrained``
    sets it from the checkpoint), else None; it is not part of the state_dict.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = LayerNorm6,
        norm_pix_loss: bool = False,
        *,
        kernels: str | Mapping[str, str] = "auto",
        attn_backend: str | Mapping[str, str] = "auto",
        encoder_mode: str = "visible",
        drop_path_rate: float = 0.0,
        embed: str = "auto",
    ):
        super().__init__()
        _check_geometry(img_size, patch_size, embed_dim, num_heads, decoder_embed_dim, decoder_num_heads)
        if encoder_mode not in ENCODER_MODES:
            raise FastMAEError(f"unknown encoder_mode {encoder_mode!r}; choose one of {', '.join(ENCODER_MODES)}")
        if embed not in EMBED_MODES:
            raise FastMAEError(f"unknown embed {embed!r}; choose one of {', '.join(EMBED_MODES)}")
        self.embed = embed
        self.kernels = ops.parse_kernels(kernels)
        # Implementation per (device type, op), decided now so forward stays a straight line under torch.compile.
        self._op_impls = {dev: self._choose_impls(torch.device(dev)) for dev in ("cpu", "cuda")}
        # A string as a user writes it, or the {call site: backend} the run spec resolved.
        spec = attn_backend if isinstance(attn_backend, str) else ",".join(f"{k}={v}" for k, v in attn_backend.items())
        sites = attn_dispatch.parse_sites(spec)
        self.attn_backend = attn_backend
        self.encoder_mode = encoder_mode
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = in_chans
        self.bands = None  # the BandSpec (names, per-band statistics) of its data, when known (from_pretrained sets it)

        # --- encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        if encoder_mode == "mask_token":
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth, linear in depth
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, norm_layer, dpr[i], sites["encoder"]) for i in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # --- decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer, 0.0, sites["decoder"])
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """The official initialisation: fixed sin-cos position embeddings, xavier-uniform linears (and patch-embed
        weight viewed as a linear), zero biases, unit LayerNorms, tokens normal(std=0.02)."""
        gh, gw = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], gh, gw, cls_token=True).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_2d(self.decoder_pos_embed.shape[-1], gh, gw, cls_token=True).unsqueeze(0)
        )
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        if self.encoder_mode == "mask_token":
            torch.nn.init.normal_(self.encoder_mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ op layer
    def _choose_impls(self, device: torch.device) -> dict[str, tuple[str, Callable | FastMAEError]]:
        """{op: (implementation name, its function)}; an op forced to Triton that cannot run on this device holds
        the error instead of a function, raised if it is used there (the run spec refuses such a run first)."""
        chosen: dict[str, tuple[str, Callable | FastMAEError]] = {}
        for op, choice in self.kernels.items():
            try:
                impl = ops.select(op, choice, device)
                chosen[op] = (impl, ops.get_impl(op, impl))
            except FastMAEError as exc:
                chosen[op] = (choice, exc)
        return chosen

    def _op(self, op: str, device: torch.device) -> Callable:
        fn = self._op_impls["cuda" if device.type == "cuda" else "cpu"][op][1]
        if isinstance(fn, FastMAEError):
            raise fn
        return fn

    def kernels_used(self, device: torch.device | str = "cpu") -> dict[str, str]:
        """``{op: "triton" | "reference"}`` that runs for inputs on ``device`` (an op forced to Triton that cannot
        run there says ``triton``, and raises when called)."""
        device = torch.device(device)
        return {op: impl for op, (impl, _) in self._op_impls["cuda" if device.type == "cuda" else "cpu"].items()}

    @property
    def attn_backend_used(self) -> str | None:
        """The attention backend that ran in the last eager forward (None before the first)."""
        used = {b.attn.backend_used for b in [*self.blocks, *self.decoder_blocks]} - {None}
        return ",".join(sorted(used)) if used else None

    def resolve_attention(self, device: torch.device | str, dtype: torch.dtype, mask_ratio: float = 0.75,
                          batch: int | None = None) -> str:  # fmt: skip
        """The attention backend(s) the encoder and decoder will use for activations on ``device`` in ``dtype``
        (``sdpa``, or ``encoder=flash,decoder=efficient`` when they differ); raises if an explicit one cannot run.
        A call site on ``auto`` takes the fastest backend a measured table has for this GPU and its shape (head
        dim, tokens: visible ones in the encoder; given the ``batch``, the nearest batch x heads), logging why;
        without an entry, the first in the auto order."""
        device = torch.device(device)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        L = self.patch_embed.num_patches
        tokens = {"encoder": (L if self.encoder_mode == "mask_token" else int(L * (1 - mask_ratio))) + 1,
                  "decoder": L + 1}  # fmt: skip
        names = {}
        for site, blocks in (("encoder", self.blocks), ("decoder", self.decoder_blocks)):
            if len(blocks) == 0:
                continue
            a = blocks[0].attn
            head_dim = a.qkv.in_features // a.num_heads
            q = attn_dispatch.StandIn((1, a.num_heads, tokens[site], head_dim), dtype, device)
            choice = None
            if a.backend == "auto" and gpu is not None:
                found = attn_dispatch.measured_choice(gpu, dtype, head_dim, tokens[site],
                                                      batch_heads=batch * a.num_heads if batch else None)
                if found is not None and not attn_dispatch.get_backend(found[0]).unsupported(q, q, q):
                    choice = found[0]
                    attn_dispatch.log_choice(f"{site} auto -> {choice}: {found[1]}")
                elif found is None:
                    attn_dispatch.log_choice(f"{site} auto: no measured entry for {gpu} {dtype} head dim {head_dim}"
                                             f" ({tokens[site]} tokens); the auto order decides")  # fmt: skip
            for blk in blocks:
                blk.attn.choice = choice
            names[site] = choice or attn_dispatch.resolve(a.backend, q, q, q).name
        if len(set(names.values())) <= 1:
            return next(iter(names.values()), "none")
        return ",".join(f"{site}={name}" for site, name in names.items())

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n in NO_WEIGHT_DECAY}

    # ------------------------------------------------------------------ official helpers
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W] -> [N, L, p*p*C]"""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> imgs [N, C, H, W]"""
        return unpatchify(x, self.patch_size, self.in_chans, tuple(self.patch_embed.grid_size))

    def embed_used(self, device: torch.device | str = "cpu") -> str:
        """``"visible"`` (only the kept patches are embedded) or ``"full"`` (the official conv over every patch, then
        the masking op) for inputs on ``device``. ``auto``: visible on CUDA unless ``kernels`` puts masking on the
        reference; the ``mask_token`` encoder embeds every patch."""
        if self.encoder_mode != "visible" or self.embed == "full":
            return "full"
        if self.embed == "visible":
            return "visible"
        return "visible" if torch.device(device).type == "cuda" and self.kernels["masking"] != "reference" else "full"

    def _noise(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """``noise`` checked against x [N, L, ...] (or drawn when None)."""
        N, L = x.shape[:2]
        if noise is None:
            return torch.rand(N, L, device=x.device)
        if noise.shape != (N, L):
            raise FastMAEError(f"noise must have shape {(N, L)}, got {tuple(noise.shape)}")
        return noise

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Per-sample random masking by argsort of noise. x [N, L, D] -> (x_visible [N, K, D], mask, ids_restore)."""
        check_mask_ratio(mask_ratio)
        L = x.shape[1]
        return self._op("masking", x.device)(x, self._noise(x, noise), int(L * (1 - mask_ratio)))

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        if self.embed_used(imgs.device) == "visible":  # embed only the kept patches
            if tuple(imgs.shape[-2:]) != tuple(self.patch_embed.img_size):
                want = tuple(self.patch_embed.img_size)
                raise FastMAEError(f"images are {tuple(imgs.shape[-2:])} pixels, the model takes {want}")
            L = self.patch_embed.num_patches
            noise = self._noise(imgs.new_empty(imgs.shape[0], L, 0), noise)
            proj = self.patch_embed.proj
            x, mask, ids_restore = visible_embed(imgs, proj.weight, proj.bias, noise, int(L * (1 - mask_ratio)),
                                                 self.pos_embed)  # fmt: skip
            return self._encode(x), mask, ids_restore
        x = self.patch_embed(imgs)  # [N, L, D]
        L = x.shape[1]
        noise = self._noise(x, noise)
        len_keep = int(L * (1 - mask_ratio))
        if self.encoder_mode == "visible":
            x, mask, ids_restore = self._op("masking", x.device)(x, noise, len_keep, self.pos_embed)  # [N, K, D]
        else:
            ids_restore = torch.argsort(torch.argsort(noise, dim=1, stable=True), dim=1, stable=True)
            mask = (ids_restore >= len_keep).to(torch.float32)  # [N, L]
            x = torch.where(mask.unsqueeze(-1).bool(), self.encoder_mask_token.to(x.dtype), x)
            x = x + self.pos_embed[:, 1:, :]  # [N, L, D]
        return self._encode(x), mask, ids_restore

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """The cls token first, then the transformer blocks and the final norm over x [N, T, D]."""
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on every patch in order, no masking: [N, 1+L, D] normed tokens (timm's ``forward_features``)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # [N, L, D]
        cls_token = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_token, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # [N, 1+K, Dd] (visible) or [N, 1+L, Dd] (mask_token)
        if self.encoder_mode == "visible":
            x = self._op("unshuffle", x.device)(x, self.mask_token, ids_restore, self.decoder_pos_embed)
        else:
            x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # [N, L, p*p*C]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over removed patches of the per-patch MSE (targets normalised per patch with ``norm_pix_loss``)."""
        return self._op("masked_mse", pred.device)(pred, imgs, mask, self.patch_size, self.norm_pix_loss)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        check_mask_ratio(mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def _check_geometry(img_size, patch_size, embed_dim, num_heads, decoder_embed_dim, decoder_num_heads) -> None:
    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if patch_size <= 0 or any(s <= 0 or s % patch_size for s in sizes):
        raise FastMAEError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
    for what, dim, heads in (("encoder", embed_dim, num_heads), ("decoder", decoder_embed_dim, decoder_num_heads)):
        if heads <= 0 or dim % heads:
            raise FastMAEError(f"{what} num_heads {heads} does not divide its width {dim}")
        if dim % 4:
            raise FastMAEError(f"{what} width {dim} must be divisible by 4 for the 2-D sin-cos position embedding")


def create_model(name: str, **overrides) -> MaskedAutoencoderViT:
    """Build a named MAE; ``overrides`` replace constructor arguments (``img_size=112``, ``kernels="reference"``)."""
    return MaskedAutoencoderViT(**{**model_args(name), **overrides})


def flops_per_image(model: MaskedAutoencoderViT, mask_ratio: float = 0.75, embed: str = "full") -> dict[str, float]:
    """Forward FLOPs per image (2 per multiply-add) of the encoder and decoder, as counted for MFU: every matmul, the
    attention scores and their weighted sum included. ``embed="visible"``: the patch embedding of the kept patches
    only (what the visible-only embedding computes; the official order embeds every patch)."""
    L = model.patch_embed.num_patches
    p2c = model.patch_size**2 * model.in_chans
    K = L if model.encoder_mode == "mask_token" else int(L * (1 - mask_ratio))
    embedded = K if embed == "visible" and model.encoder_mode == "visible" else L

    def blocks(n_tok: int, blks: nn.ModuleList) -> float:
        if len(blks) == 0:
            return 0.0
        d = blks[0].norm1.normalized_shape[0]
        hidden = blks[0].mlp.fc1.out_features
        per = 2 * n_tok * (3 * d * d + d * d + 2 * d * hidden) + 2 * 2 * n_tok * n_tok * d
        return float(per * len(blks))

    enc = 2 * embedded * p2c * model.patch_embed.proj.out_channels + blocks(K + 1, model.blocks)
    d_in, d_out = model.decoder_embed.in_features, model.decoder_embed.out_features
    dec = 2 * (K + 1) * d_in * d_out + blocks(L + 1, model.decoder_blocks) + 2 * (L + 1) * d_out * p2c
    return {"encoder": enc, "decoder": dec, "total": enc + dec, "mask_ratio": mask_ratio, "tokens_encoded": K + 1}


__all__ = ["MaskedAutoencoderViT", "create_model", "flops_per_image", "list_models", "model_args"]


# ---------------------------------------------------------------------- architectures
# An architecture is the geometry a checkpoint needs to be rebuilt: the constructor arguments below, plus the
# LayerNorm eps. Named models are architectures with a name; checkpoints carry theirs (``config["arch"]``).
ARCH_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
             "decoder_depth", "decoder_num_heads", "mlp_ratio", "norm_eps", "norm_pix_loss")  # fmt: skip


def model_arch(model: MaskedAutoencoderViT) -> dict:
    """The architecture of ``model`` (JSON-friendly: a square ``img_size`` is an int)."""
    h, w = model.patch_embed.img_size
    embed_dim = model.cls_token.shape[-1]
    return {
        "img_size": h if h == w else [h, w], "patch_size": model.patch_size, "in_chans": model.in_chans,
        "embed_dim": embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads,
        "decoder_embed_dim": model.mask_token.shape[-1], "decoder_depth": len(model.decoder_blocks),
        "decoder_num_heads": model.decoder_blocks[0].attn.num_heads if len(model.decoder_blocks) else 1,
        "mlp_ratio": model.blocks[0].mlp.fc1.out_features / embed_dim, "norm_eps": model.norm.eps,
        "norm_pix_loss": model.norm_pix_loss,
    }  # fmt: skip


def named_arch(name: str, **overrides) -> dict:
    """The architecture of a named model at 224 px (``overrides`` replace entries)."""
    arch = {"img_size": 224, "in_chans": 3, "norm_eps": 1e-6, "norm_pix_loss": False, **model_args(name)}
    return {**arch, **overrides}


def arch_name(arch: dict) -> str | None:
    """The named model with the same encoder and decoder geometry (any resolution, eps and loss), or None."""
    keys = ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
            "decoder_num_heads", "mlp_ratio")  # fmt: skip
    for name in _MODELS:
        ref = model_args(name)
        if all(float(ref[k]) == float(arch[k]) for k in keys):
            return name
    return None


def create_from_arch(arch: dict, **kw) -> MaskedAutoencoderViT:
    """An MAE of architecture ``arch``; ``kw`` are the keyword-only options (kernels, attn_backend, ...)."""
    args = {k: arch[k] for k in ARCH_KEYS if k != "norm_eps"}
    if isinstance(args["img_size"], list | tuple):
        args["img_size"] = tuple(args["img_size"])
    return MaskedAutoencoderViT(**args, norm_layer=partial(nn.LayerNorm, eps=arch["norm_eps"]), **kw)
