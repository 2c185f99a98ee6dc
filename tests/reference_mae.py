"""An independent reference MAE, written from the paper and the official semantics, for tests only.

Deliberately different code paths from fastmae: patchify through ``F.unfold``, masking with a per-sample loop over a
stable sort, decoder tokens placed by scatter instead of gather, explicit attention, the loss with explicit sums.
Parameter names follow facebookresearch/mae so that a fastmae state_dict loads with ``strict=True``. Run it in
float64 to get a reference that float32 results are compared against.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def official_sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> np.ndarray:
    """The official construction: meshgrid(w, h), first half from grid[0], sin then cos, in float32 NumPy."""
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float32) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        dh = C // self.heads
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.reshape(B, N, self.heads, dh).transpose(1, 2) for t in (q, k, v))
        w = torch.einsum("bhnd,bhmd->bhnm", q, k) / dh**0.5
        w = torch.exp(w - w.amax(dim=-1, keepdim=True))
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.einsum("bhnm,bhmd->bhnd", w, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch, chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, patch, patch)


class RefMAE(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim, decoder_depth,
                 decoder_num_heads, mlp_ratio=4.0, norm_pix_loss=False, encoder_mode="visible"):  # fmt: skip
        super().__init__()
        self.p, self.c, self.norm_pix_loss, self.encoder_mode = patch_size, in_chans, norm_pix_loss, encoder_mode
        L = (img_size // patch_size) ** 2
        self.patch_embed = RefPatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        if encoder_mode == "mask_token":
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([RefBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [RefBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

    def patchify(self, imgs):
        N, C = imgs.shape[:2]
        cols = F.unfold(imgs, kernel_size=self.p, stride=self.p)  # [N, C*p*p, L], column order (c, kh, kw)
        L = cols.shape[-1]
        return cols.reshape(N, C, self.p, self.p, L).permute(0, 4, 2, 3, 1).reshape(N, L, self.p * self.p * C)

    def masking(self, noise, len_keep):
        N, L = noise.shape
        keep = torch.empty(N, len_keep, dtype=torch.long)
        mask = torch.ones(N, L, dtype=noise.dtype)
        for i in range(N):
            order = torch.sort(noise[i], stable=True).indices
            keep[i] = order[:len_keep]
            mask[i, order[:len_keep]] = 0
        return keep, mask

    def forward(self, imgs, mask_ratio, noise):
        N = imgs.shape[0]
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # [N, L, D]
        L, D = x.shape[1], x.shape[2]
        len_keep = int(L * (1 - mask_ratio))
        keep, mask = self.masking(noise, len_keep)
        if self.encoder_mode == "visible":
            x = x + self.pos_embed[:, 1:]
            x = torch.stack([x[i, keep[i]] for i in range(N)])  # [N, K, D]
        else:
            m = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - m) + self.encoder_mask_token * m + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(N, 1, D), x], dim=1)
        for b in self.blocks:
            x = b(x)
        x = self.decoder_embed(self.norm(x))
        Dd = x.shape[-1]
        if self.encoder_mode == "visible":
            full = self.mask_token.expand(N, L, Dd).clone()
            full = full.scatter(1, keep.unsqueeze(-1).expand(N, len_keep, Dd), x[:, 1:])
            x = torch.cat([x[:, :1], full], dim=1)
        x = x + self.decoder_pos_embed
        for b in self.decoder_blocks:
            x = b(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]

        target = self.patchify(imgs)
        if self.norm_pix_loss:
            n = target.shape[-1]
            mean = target.sum(-1, keepdim=True) / n
            var = ((target - mean) ** 2).sum(-1, keepdim=True) / (n - 1)
            target = (target - mean) / torch.sqrt(var + 1e-6)
        per_patch = ((pred - target) ** 2).sum(-1) / target.shape[-1]
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, pred, mask
