"""Labelled data for finetuning and probing: train/val splits of an ImageFolder, and the no-download default
(scikit-learn's 8x8 handwritten digits, written once as one-band uint8 ``.npy`` rasters, so the loaders read them like
any folder of rasters: one channel, with the data's own statistics)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fastmae.errors import FastMAEError

from .index import DataIndex, index_data
from .index_cache import cache_folder

logger = logging.getLogger("fastmae.data")
DIGITS_VAL_FRACTION = 0.2
DIGITS = "digits-v2"  # the cache folder of the digits as written now (one band)


def digits_folder() -> Path:
    """scikit-learn's digits (1797 images, 10 classes) as ``train/<digit>/*.npy`` and ``val/<digit>/*.npy`` (a fixed
    80/20 split) under the fastmae cache folder: each an ``8 x 8`` uint8 array (one band, 0..16 scaled to 0..255),
    read on the raster route, so a model on them has one input channel (``digits-v1`` held them as RGB PNGs, one
    gray band copied three times). Written on first use into a private folder that is then renamed into place, so
    processes starting together (torchrun) never read a half-written copy."""
    root = cache_folder() / DIGITS
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
        np.save(folder / f"{i:04d}.npy", pixels)  # [8, 8]: one band
    (tmp / "done").write_text("ok\n")
    if root.exists() and not (root / "done").is_file():  # an incomplete copy left by an older version
        shutil.rmtree(root, ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process put its copy in place first: use that one
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def is_digits(data) -> bool:
    """Whether a run's ``data`` (``"digits"``, or a split of the digits' folder as config.json records it) is the
    built-in digits."""
    return data == "digits" or (isinstance(data, str) and Path(data).parent.name == DIGITS)


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
