"""Reconstruction pictures: one row per image, columns original | masked | reconstruction (visible patches pasted).

Any band count: 3-band 8-bit images (RGB) are drawn with their normalisation undone, as they were; other data (1, 2,
4, 13 bands; 16-bit or float) shows a chosen band triple (``show_bands``, default the first three) or one band in
gray, each band stretched between its 2nd and 98th percentile on the picture's originals, and its reconstructions
with the same stretch, so that a band's colours mean the same in every column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastmae.bands import IMAGENET, BandSpec, select_bands
from fastmae.errors import FastMAEError

STRETCH = (0.02, 0.98)  # percentiles of the per-band display stretch


def picture_bands(bands: BandSpec | int, show_bands=None, flag: str = "--show-bands") -> list[int]:
    """The bands a picture shows: ``show_bands`` (names or 0-based indices, "3,2,1" or a list; 1 band is drawn in
    gray, 3 as red, green, blue), else the first three (the first one in gray for 1 or 2 bands). Out of range,
    unknown or a count other than 1 or 3 is a one-line error naming ``flag``."""
    spec = bands if isinstance(bands, BandSpec) else BandSpec(int(bands))
    if show_bands is None:
        return [0, 1, 2] if spec.count >= 3 else [0]
    _, idx = select_bands(spec, show_bands, flag, name_unnamed=False)
    if len(idx) not in (1, 3):
        raise FastMAEError(f"{flag} takes 1 band (drawn in gray) or 3 (red, green, blue), got {len(idx)}")
    return idx


def stretch(originals: torch.Tensor, *others: torch.Tensor, q=STRETCH) -> list[torch.Tensor]:
    """[N, B, H, W] pictures to [0, 1], band by band: ``(x - lo) / (hi - lo)`` clipped, with lo / hi the ``q``
    quantiles of that band over all of ``originals`` (a constant band maps to 0). ``others`` (the reconstructions)
    get the originals' stretch."""
    flat = originals.float().transpose(0, 1).reshape(originals.shape[1], -1)  # [B, N*H*W]
    lo, hi = (torch.quantile(flat, v, dim=1).view(1, -1, 1, 1) for v in q)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return [((x.float() - lo) / span).clamp(0, 1) for x in (originals, *others)]


def _natural(bands: BandSpec | None, count: int, show_bands) -> BandSpec | None:
    """The spec whose normalisation a picture undoes (3-band 8-bit data shown as it is), or None to stretch."""
    if count != 3 or show_bands is not None:
        return None
    spec = IMAGENET if bands is None else bands
    return spec if spec.dtype == "uint8" and spec.has_stats else None


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float, seed: int = 0, bands: BandSpec | None = None,
                show_bands=None):  # fmt: skip
    """(loss, original, masked, reconstruction): the loss on these images and the [N, 3, H, W] pictures in [0, 1],
    with a fixed masking noise so that calls at different steps are comparable. ``bands`` (default: the model's
    ``bands``, else ImageNet RGB for 3 bands) and ``show_bands`` choose the drawing (see the module docstring)."""
    bands = bands if bands is not None else getattr(model, "bands", None)
    if imgs.shape[1] != model.in_chans:
        raise FastMAEError(f"the images have {imgs.shape[1]} bands, the model takes {model.in_chans}")
    shown = picture_bands(bands or model.in_chans, show_bands)
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
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).float())[:, :1]  # 1 = removed
    natural = _natural(bands, imgs.shape[1], show_bands)
    if natural is not None:  # 8-bit RGB: the normalisation undone, as it was drawn before band specs
        mean = torch.tensor([v / 255 for v in natural.mean], device=imgs.device).view(1, 3, 1, 1)
        std = torch.tensor([v / 255 for v in natural.std], device=imgs.device).view(1, 3, 1, 1)
        orig = (imgs.float() * std + mean).clamp(0, 1)
        rec = (rec * std + mean).clamp(0, 1)
    else:
        orig, rec = stretch(imgs[:, shown], rec[:, shown])
        if len(shown) == 1:  # gray
            orig, rec = orig.expand(-1, 3, -1, -1), rec.expand(-1, 3, -1, -1)
    masked = orig * (1 - m) + 0.5 * m
    return loss.item(), orig, masked, orig * (1 - m) + rec * m


COLUMNS = ("original", "masked", "reconstruction")
MIN_SIDE = 96  # pictures are drawn at least this many pixels high per image (auto --picture-scale)


def auto_scale(img_size: int, scale: int | None) -> int:
    """``scale``, or the smallest whole scale that draws an image at least :data:`MIN_SIDE` pixels high."""
    return scale if scale else max(1, -(-MIN_SIDE // img_size))


def write_grid(pictures, path: str | Path, count: int | None = None, scale: int = 1, title: str | None = None) -> Path:
    """Write (original, masked, reconstruction) [N, 3, H, W] tensors as a PNG grid, one row per image, each pixel
    drawn as a ``scale`` x ``scale`` block, under a header: ``title`` and the column labels. Both are also stored in
    the PNG's text chunks (``Title``, ``Description``)."""
    from PIL import ImageDraw, PngImagePlugin

    orig, masked, rec = (p[:count] for p in pictures)
    rows = [torch.cat([o, mk, r], dim=2) for o, mk, r in zip(orig, masked, rec, strict=True)]  # [3, H, 3W] each
    grid = torch.cat(rows, dim=1)
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).permute(1, 2, 0).cpu().numpy()
    body = Image.fromarray((grid * 255 + 0.5).astype(np.uint8))
    line = 14
    header = line * (2 if title else 1) + 6
    canvas = Image.new("RGB", (body.width, body.height + header), (255, 255, 255))
    canvas.paste(body, (0, header))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0))
    column = body.width // 3
    for k, label in enumerate(COLUMNS):
        width = draw.textlength(label)
        draw.text((k * column + max(2, (column - width) / 2), header - line - 2), label, fill=(60, 60, 60))
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title or "")
    info.add_text("Description", "columns: " + " | ".join(COLUMNS))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, pnginfo=info)
    return path


def save_reconstructions(model, imgs: torch.Tensor, path: str | Path, mask_ratio: float, seed: int = 0,
                         scale: int = 1, title: str = "", bands: BandSpec | None = None,
                         show_bands=None) -> float:  # fmt: skip
    """Write the picture grid of ``imgs`` as PNG (``title`` and the loss in its header); returns the loss."""
    loss, *pictures = reconstruct(model, imgs, mask_ratio, seed, bands, show_bands)
    write_grid(pictures, path, scale=scale, title=f"{title}{', ' if title else ''}loss {loss:.4f}")
    return loss


def visualize_checkpoint(checkpoint: str | Path, output: str | Path, images: str | None = None, count: int = 8,
                         mask_ratio: float | None = None, seed: int = 0, scale: int | None = None,
                         show_bands=None, bands=None) -> float:  # fmt: skip
    """Reconstructions from any full MAE checkpoint (fastmae, official, transformers; the architecture and bands are
    read from it); returns the loss on them. ``show_bands``: see :func:`picture_bands`. The images are read as the
    checkpoint's bands with its statistics: their bands are matched to its by name (or count), or chosen with
    ``bands`` (``--bands``: names or 0-based indices of the images' bands, in the checkpoint's order); images whose
    bands are not the checkpoint's are a one-line error naming both lists. ``images`` None: the bundled photos, or for
    a checkpoint pretrained on the digits (one band) their validation split, which pretraining never saw."""
    from fastmae.bands import parse_band_flags
    from fastmae.interop import DECODER_KEYS, mae_from_state, read_checkpoint

    from .data.databands import downstream_bands
    from .data.index import index_data
    from .data.labelled import digits_folder, is_digits
    from .data.loaders import sample_images

    sd, arch, info = read_checkpoint(checkpoint)
    if not any(k.startswith(DECODER_KEYS) for k in sd):
        raise FastMAEError(f"checkpoint {checkpoint} holds no MAE decoder (a finetuned or encoder-only checkpoint): "
                           "reconstructions need the decoder of a pretraining checkpoint (fastmae pretrain's "
                           "checkpoint-last.pth, an official full MAE .pth or a ViTMAEForPreTraining "
                           "folder)")  # fmt: skip
    cfg = info.get("config") or {}
    model = mae_from_state(sd, arch, f"checkpoint {checkpoint}", encoder_mode=cfg.get("encoder_mode", "visible"),
                           source_bands=info["bands"])  # fmt: skip
    picture_bands(model.bands or model.in_chans, show_bands)  # a bad --show-bands ends here, before any image is read
    flags = parse_band_flags(bands)
    if images is None and is_digits(cfg.get("data")):
        images = digits_folder() / "val"
    index = index_data(images)
    what = f"checkpoint {checkpoint}"
    data = downstream_bands(index, flags, info["bands"], model.in_chans, what=what)
    mine = model.bands or BandSpec(model.in_chans)
    if data.count != model.in_chans or (mine.names and data.spec.names and mine.names != data.spec.names):
        have = ",".join(data.spec.names) if data.spec.names else f"{data.count} unnamed bands"
        want = ",".join(mine.names) if mine.names else f"{model.in_chans} unnamed bands"
        raise FastMAEError(f"{what} reconstructs its own bands ({want}), the images give {have}: choose the images' "
                           "bands in the checkpoint's order with --bands")  # fmt: skip
    model.bands = data.spec  # drawn and un-normalised with the statistics the images were normalised with
    size = model.patch_embed.img_size[0]
    imgs = sample_images(index, size, count, data.for_loader())
    scale = auto_scale(size, scale or cfg.get("picture_scale"))
    step = f", step {info['step']}" if info.get("step") is not None else ""
    return save_reconstructions(model, imgs, output, mask_ratio or cfg.get("mask_ratio", 0.75), seed, scale,
                                f"{Path(checkpoint).name}{step}", show_bands=show_bands)  # fmt: skip


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
    train = [r for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if r.get("eval_loss") is not None]
    if not train:
        return None
    fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(6.5, 5), sharex=True, height_ratios=(3, 1))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss (mean over ranks)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=3,
                label="eval loss (fixed images and mask)")  # fmt: skip
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{Path(metrics).parent.name}: loss and learning rate")
    lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange", label="learning rate")
    lr_ax.set_ylabel("lr")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.legend(loc="upper right")
    lr_ax.grid(True, alpha=0.3)
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=100, metadata={"Title": "loss and learning rate",
                                           "Description": "top: training loss, eval loss; bottom: learning rate"})
    plt.close(fig)
    return output
