"""Masked reconstruction loss: patchify the images, optional per-patch normalisation, MSE averaged over removed patches.

Official semantics (facebookresearch/mae ``forward_loss``): target = patchify(imgs) with patch layout (p, q, c);
with ``norm_pix`` each patch becomes ``(x - mean) / sqrt(var + 1e-6)`` (unbiased var); loss = mean over the patch of
the squared error, summed over removed patches (mask = 1) and divided by their count.
"""

import torch

NORM_PIX_EPS = 1e-6


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)*(W/p), p*p*C], each patch flattened as (row-in-patch, col-in-patch, channel)."""
    N, C, H, W = imgs.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(N, h * w, p * p * C)


def unpatchify(
    x: torch.Tensor, patch_size: int, channels: int = 3, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W]; the grid is square unless given as (rows, cols)."""
    N, L, _ = x.shape
    p = patch_size
    if grid is None:
        h = w = int(round(L**0.5))
        if h * w != L:
            raise ValueError(f"{L} patches do not form a square grid; pass grid=(rows, cols)")
    else:
        h, w = grid
    x = x.reshape(N, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(N, channels, h * p, w * p)


def masked_mse_reference(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool = False
) -> torch.Tensor:
    """pred [N, L, p*p*C], imgs [N, C, H, W], mask [N, L] (1 = removed) -> scalar fp32 loss."""
    target = patchify(imgs, patch_size).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [N, L] per-patch MSE
    mask = mask.float()
    return (loss * mask).sum() / mask.sum()
