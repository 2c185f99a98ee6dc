"""Reconstruction pictures: one row per image, columns original | masked | reconstruction (visible patches pasted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.decode import IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float, seed: int = 0):
    """(loss, original, masked, reconstruction): the loss on these images and the [N, 3, H, W] pictures in [0, 1],
    with a fixed masking noise so that calls at different steps are comparable."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=g).to(imgs.device)
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
        target = model.patchify(imgs.float())
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    rec = model.unpatchify(pred)
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).float())  # 1 = removed
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    orig = (imgs.float() * std + mean).clamp(0, 1)
    rec = (rec * std + mean).clamp(0, 1)
    masked = orig * (1 - m) + 0.5 * m
    return loss.item(), orig, masked, orig * (1 - m) + rec * m


def write_grid(pictures, path: str | Path, count: int | None = None, scale: int = 1) -> Path:
    """Write (original, masked, reconstruction) [N, 3, H, W] tensors as a PNG grid, one row per image, each pixel
    drawn as a ``scale`` x ``scale`` block (small images readable at a glance)."""
    orig, masked, rec = (p[:count] for p in pictures)
    rows = [torch.cat([o, mk, r], dim=2) for o, mk, r in zip(orig, masked, rec, strict=True)]  # [3, H, 3W] each
    grid = torch.cat(rows, dim=1)
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255 + 0.5).astype(np.uint8)).save(path)
    return path


def save_reconstructions(model, imgs: torch.Tensor, path: str | Path, mask_ratio: float, seed: int = 0,
                         scale: int = 1) -> float:  # fmt: skip
    """Write the picture grid of ``imgs`` as PNG; returns the loss on these images."""
    loss, *pictures = reconstruct(model, imgs, mask_ratio, seed)
    write_grid(pictures, path, scale=scale)
    return loss


def visualize_checkpoint(checkpoint: str | Path, output: str | Path, images: str | None = None, count: int = 8,
                         mask_ratio: float | None = None, seed: int = 0,
                         scale: int | None = None) -> float:  # fmt: skip
    """Reconstructions from any full MAE checkpoint (fastmae, official, transformers; the architecture is read from
    it); returns the loss on them."""
    from fastmae.interop import mae_from_state, read_checkpoint

    from .data.index import index_data
    from .data.loaders import sample_images

    sd, arch, info = read_checkpoint(checkpoint)
    cfg = info.get("config") or {}
    model = mae_from_state(sd, arch, f"checkpoint {checkpoint}", encoder_mode=cfg.get("encoder_mode", "visible"))
    imgs = sample_images(index_data(images), model.patch_embed.img_size[0], count)
    scale = scale or cfg.get("picture_scale", 1)
    return save_reconstructions(model, imgs, output, mask_ratio or cfg.get("mask_ratio", 0.75), seed, scale)


def plot_loss_curve(metrics: str | Path, output: str | Path) -> Path | None:
    """Loss (and lr) against step from ``metrics.jsonl``; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import json

    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("loss") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
    lr_ax.set_ylabel("lr")
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
