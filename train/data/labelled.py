"""Labelled data for finetuning and probing: train/val splits of an ImageFolder, and the no-download default
(scikit-learn's 8x8 handwritten digits, written once as PNG files so both loaders read them like any folder)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fastmae.errors import FastMAEError

from .index import DataIndex, index_data
from .index_cache import cache_folder

logger = logging.getLogger("fastmae.data")
DIGITS_VAL_FRACTION = 0.2


def digits_folder() -> Path:
    """scikit-learn's digits (1797 images, 10 classes) as ``train/<digit>/*.png`` and ``val/<digit>/*.png`` (a fixed
    80/20 split) under the fastmae cache folder; written on first use into a private folder that is then renamed into
    place, so processes starting together (torchrun) never read a half-written copy."""
    root = cache_folder() / "digits-v1"
    if (root / "done").is_file():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    n_val = round(len(order) * DIGITS_VAL_FRACTION)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        folder = tmp / split / str(int(digits.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    (tmp / "done").write_text("ok\n")
    if root.exists() and not (root / "done").is_file():  # an incomplete copy left by an older version
        shutil.rmtree(root, ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process put its copy in place first: use that one
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def num_classes(index: DataIndex) -> int:
    return len(index.classes) or int(index.labels.max()) + 1


def labelled_data(cfg, group=None) -> tuple[DataIndex, DataIndex, int]:
    """(train, val, number of classes) for a downstream config's ``data``, ``val_split``, ``seed`` and
    ``index_check``; ``group``: a torchrun job's process group (the indexing is split over its ranks)."""
    train, val = labelled_splits(cfg.data, cfg.val_split, cfg.seed, group, cfg.index_check)
    return train, val, num_classes(train)


def labelled_splits(data: str | None, val_split: float, seed: int, group=None,
                    check: str = "listing") -> tuple[DataIndex, DataIndex]:  # fmt: skip
    """(train, val) indexes: ``DIR/train`` and ``DIR/val`` when both exist, else a seeded split of ``DIR``."""
    root = digits_folder() if data in (None, "digits") else Path(data)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = index_data(root / "train", group=group, check=check)
        val = index_data(root / "val", group=group, check=check)
        if (train.bands, train.dtype) != (val.bands, val.dtype):
            raise FastMAEError(f"{root}/train has {train.bands} {train.dtype} band(s) but {root}/val has {val.bands} "
                               f"{val.dtype}: they must match")  # fmt: skip
        if train.classes != val.classes:
            raise FastMAEError(
                f"{root}/train has classes {train.classes[:5]}... but {root}/val has {val.classes[:5]}...; they must "
                "match"
            )
    else:
        whole = index_data(root, group=group, check=check)
        if not whole.classes and not (whole.labels > 0).any():
            raise FastMAEError(f"{root} has no class sub-folders (or .cls labels): labelled images are needed")
        order = np.random.default_rng([seed, 0x5B17]).permutation(len(whole))
        n_val = round(len(whole) * val_split)
        if n_val == 0 or n_val == len(whole):
            raise FastMAEError(f"--val-split {val_split} of {len(whole)} images leaves an empty split")
        train, val = whole.subset(np.sort(order[n_val:])), whole.subset(np.sort(order[:n_val]))
        train.bad = list(whole.bad)
    if num_classes(train) < 2:
        raise FastMAEError(f"{root} has {num_classes(train)} class(es); at least 2 are needed")
    logger.info("labelled data %s: %d train, %d val images, %d classes", root, len(train), len(val), num_classes(train))
    return train, val
