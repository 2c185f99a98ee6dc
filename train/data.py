"""Image sources and loaders: a recursive image folder (ImageFolder layout gives labels), the torchvision/PIL loader
with the MAE pretrain augmentation, and a synthetic loader for pure-compute benchmarks.

Loaders are resumable: batches come from a seeded per-epoch permutation, so a run restarted at (epoch, batch) sees
the same samples it would have seen. Files that fail to decode are skipped, counted and reported; never fatal.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastmae.errors import FastMAEError

logger = logging.getLogger("fastmae.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def bundled_images_dir() -> Path:
    """scikit-image's bundled sample photos: the default data set, so a first run needs no download."""
    import skimage

    return Path(skimage.__file__).parent / "data"


@dataclass
class ImageIndex:
    """The files of a data set and their labels (ImageFolder layout: the first sub-folder names the class)."""

    root: Path
    files: list[Path]
    labels: list[int]
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


def index_images(root: str | os.PathLike | None) -> ImageIndex:
    """Find images under ``root`` recursively (sorted, so every process agrees). Missing or empty: one-line error."""
    root = bundled_images_dir() if root is None else Path(root)
    if not root.exists():
        raise FastMAEError(f"--data {root} does not exist")
    if root.is_file():
        raise FastMAEError(f"--data {root} is a file; give a folder of images")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )
    if not files:
        raise FastMAEError(f"no images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    top = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "" for p in files]
    classes = sorted(set(top) - {""}) if all(top) else []
    labels = [classes.index(t) for t in top] if classes else [0] * len(files)
    return ImageIndex(root, files, labels, classes)


def load_rgb(path: Path) -> Image.Image:
    """Decode any image mode to 8-bit RGB (16-bit and float images are rescaled, alpha composited on white)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
        elif img.mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def pretrain_transform(img_size: int):
    """RandomResizedCrop(scale=(0.2, 1), bicubic) + horizontal flip + ImageNet normalisation (the MAE recipe)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(img_size: int):
    """Resize the shorter side to img_size / 0.875, centre crop, normalise."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(int(img_size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageFiles(torch.utils.data.Dataset):
    """(image tensor, label) per file, or ``None`` (with the path recorded) when the file cannot be decoded."""

    def __init__(self, index: ImageIndex, transform):
        self.index, self.transform = index, transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        path = self.index.files[i]
        try:
            img = load_rgb(path)
        except Exception:  # corrupt, truncated, unsupported: skipped and counted, never fatal
            return None, str(path)
        return (self.transform(img), self.index.labels[i]), None


def _collate(items):
    good = [x for x, _ in items if x is not None]
    failed = [p for _, p in items if p is not None]
    if not good:
        return None, None, failed
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), failed


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Batches of a seeded per-epoch permutation (drop_last), started at any (epoch, batch)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, self.n // self.batch_size):
            yield perm[b * self.batch_size : (b + 1) * self.batch_size]


class TorchvisionLoader:
    """PIL decode + torchvision transforms in DataLoader worker processes."""

    name = "torchvision"

    def __init__(self, index: ImageIndex, img_size: int, batch_size: int, seed: int, num_workers: int, pin: bool):
        if len(index) < batch_size:
            raise FastMAEError(
                f"batch size {batch_size} is larger than the data set ({len(index)} images under {index.root}); "
                "lower --batch-size"
            )
        self.index = index
        self.sampler = ResumableBatchSampler(len(index), batch_size, seed)
        self.loader = torch.utils.data.DataLoader(
            ImageFiles(index, pretrain_transform(img_size)),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=pin,
            persistent_workers=num_workers > 0,
        )
        self.steps_per_epoch = len(index) // batch_size
        self.skipped: set[str] = set()

    def epoch(self, epoch: int, start_batch: int = 0):
        """Yield ``(images [B, 3, S, S], labels [B])`` for the rest of ``epoch``; bad files are skipped."""
        self.sampler.set_position(epoch, start_batch)
        for imgs, labels, failed in self.loader:
            if failed:
                new = [p for p in failed if p not in self.skipped]
                self.skipped.update(failed)
                if new:
                    logger.warning("skipped %d undecodable file(s), e.g. %s", len(new), ", ".join(new[:3]))
            if imgs is None:
                continue
            yield imgs, labels


class SyntheticLoader:
    """Random normalised images made on the device: measures compute with no data loading in the way."""

    name = "synthetic"

    def __init__(self, img_size: int, batch_size: int, images_per_epoch: int, seed: int, device: torch.device):
        self.img_size, self.batch_size, self.seed, self.device = img_size, batch_size, seed, device
        self.steps_per_epoch = max(images_per_epoch // batch_size, 1)
        self.skipped: set[str] = set()

    def epoch(self, epoch: int, start_batch: int = 0):
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
        shape = (self.batch_size, 3, self.img_size, self.img_size)
        for _ in range(start_batch, self.steps_per_epoch):
            yield torch.randn(shape, generator=g, device=self.device), torch.zeros(self.batch_size, dtype=torch.long)


def sample_images(index: ImageIndex, img_size: int, count: int) -> torch.Tensor:
    """The first ``count`` decodable images, centre-cropped: fixed inputs for reconstruction pictures."""
    tf, out = eval_transform(img_size), []
    for path in index.files:
        if len(out) == count:
            break
        try:
            out.append(tf(load_rgb(path)))
        except Exception:
            continue
    return torch.stack(out) if out else torch.empty(0, 3, img_size, img_size)
