"""Which samples each rank reads in each epoch, and each sample's crop box and flip.

Everything random about a sample (its place in the epoch, its crop, its flip) is a function of
``(seed, epoch, sample index)``, so the torchvision and DALI loaders cut the same boxes, and a run restarted at
``(epoch, batch)`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math

import numpy as np

from fastmae.errors import FastMAEError


class ShardedOrder:
    """Which samples each rank reads, batch by batch, in each epoch.

    Training (``drop_last=True``): every epoch shuffles all N samples with a generator seeded by ``(seed, epoch)``;
    the order is padded by repeating its first samples to a multiple of ``world_size`` (as torch's
    ``DistributedSampler``), rank ``r`` takes every ``world_size``-th sample from position ``r``, and the last
    incomplete batch is dropped. So the ranks' shards are disjoint (up to the < world_size padded repeats) and together
    cover the data set, and every rank runs ``steps_per_epoch`` batches (the collectives of a step need that).

    Evaluation (``shuffle=False, drop_last=False``): file order, no padding, the last batch short. Every sample is
    scored exactly once, so metrics summed over the ranks are those of one process; the ranks' shards differ by at most
    one sample (and their batch counts by at most one), which evaluation, with no collective per batch, allows.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle=True, drop_last=True
    ):
        if not 0 <= rank < world_size:
            raise FastMAEError(f"rank {rank} is outside world size {world_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last
        if drop_last:
            self.per_rank = math.ceil(n / world_size)
            self.steps_per_epoch = self.per_rank // batch_size
        else:
            self.per_rank = len(range(rank, n, world_size))  # may be 0 on a rank when n < world_size
            self.steps_per_epoch = math.ceil(self.per_rank / batch_size)
        if self.steps_per_epoch == 0 and drop_last:
            raise FastMAEError(
                f"batch size {batch_size} is larger than the {self.per_rank} images each of {world_size} rank(s) "
                f"gets from a data set of {n}; lower --batch-size"
            )

    def shard(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        if not self.drop_last:
            return perm[self.rank :: self.world_size]
        padded = np.concatenate([perm, perm[: self.per_rank * self.world_size - self.n]])
        return padded[self.rank :: self.world_size]

    def batches(self, epoch: int, start_batch: int = 0):
        """Yield index arrays [batch_size] for batches ``start_batch..steps_per_epoch-1`` of ``epoch``."""
        shard = self.shard(epoch)
        for b in range(start_batch, self.steps_per_epoch):
            yield shard[b * self.batch_size : (b + 1) * self.batch_size]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample's augmentation in one epoch: independent of batch, rank, worker or loader."""
    return np.random.default_rng([seed, epoch, int(index), 0x6D6165])


def random_resized_crop(
    rng: np.random.Generator, width: int, height: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """A crop box ``(x, y, w, h)`` drawn as torchvision's ``RandomResizedCrop`` draws it: an area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, ten tries, then the centre crop clamped to ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    return (width - w) // 2, (height - h) // 2, w, h


def augment_params(
    index, ids: np.ndarray, seed: int, epoch: int, scale=(0.2, 1.0), hflip: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes ``[B, 4]`` (x, y, w, h) and flips ``[B]`` (probability ``hflip``) for samples ``ids`` of
    ``epoch``."""
    boxes = np.empty((len(ids), 4), dtype=np.int64)
    flips = np.empty(len(ids), dtype=bool)
    for j, i in enumerate(ids):
        rng = sample_rng(seed, epoch, i)
        boxes[j] = random_resized_crop(rng, int(index.widths[i]), int(index.heights[i]), scale)
        flips[j] = rng.random() < hflip
    return boxes, flips
