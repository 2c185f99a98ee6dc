"""Batch memory that DataLoader workers write again: a fixed set of shared-memory batches per worker, each reused once
the main process has let go of it, instead of fresh shared memory for every batch.

Why: a worker hands a batch over without a copy by writing it into shared memory, and fresh shared memory costs a page
fault and a zeroed page per 4 KiB the first time it is written. For a 64 x 13 x 224 x 224 uint16 batch (83 MB) that was
0.9 ms per image on one core of the 2-core development machine (``benchmarks/bench_bands.py --stages``, "fresh shared
batch memory"), a third of the loader's whole time per image there. Memory written before costs none of that.

How a slot goes round (:func:`slots_per_worker` per worker: 3 when the batches are pinned, else 4; ``busy``: one
shared int32 per slot, made by the main process before the workers start, so they share it):

1. the worker takes one of its slots whose ``busy`` is 0 (its memory allocated on first use, or again when a batch is
   larger), sets ``busy`` to 1 and writes the batch into it; when none is free it takes fresh shared memory as before,
   so a consumer that keeps batches never makes it wait;
2. the batch leaves the worker wrapped (:meth:`BatchSlots.handed`), so that unpickling it in the main process (in the
   main thread, or in ``pin_memory``'s thread) ties the slot to the storage it arrives on: ``busy`` goes back to 0 when
   that storage is freed (``weakref.finalize``; torch keeps one Python object per storage while any tensor or view of
   it lives). A batch copied into pinned memory frees it at once; one kept, or a slice of it kept, holds the slot; one
   a DataLoader drops (a reset, the end of a run) frees it.

So a batch the main process still holds is never written over. ``FASTMAE_BATCH_SLOTS=0`` turns it off (fresh memory
for every batch, as before). It costs 3 or 4 batches of shared memory per worker for as long as the workers live (a
13-band uint16 batch of 64 at 224 px: 83 MB; an RGB uint8 one: 9.6 MB).
"""

from __future__ import annotations

import os
import weakref

import numpy as np
import torch

PREFETCH = 2  # batches per worker the DataLoader asks for ahead (its default prefetch_factor)


def slots_per_worker(pin: bool) -> int:
    """The DataLoader's prefetch, plus the batch the main process is using (copied to pinned memory at once when
    ``pin``), plus, without pinning, the previous one, which the loader's generators hold until the next arrives."""
    return PREFETCH + (1 if pin else 2)


def enabled() -> bool:
    return os.environ.get("FASTMAE_BATCH_SLOTS", "1") != "0"


def fresh_shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor in fresh shared memory (what torch's default_collate makes in a worker)."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)


class BatchSlots:
    """The slots of one DataLoader's workers (see the module's notes). Made in the main process; pickles with its
    shared ``busy`` flags, so that spawned workers see the same ones."""

    def __init__(self, workers: int, per_worker: int):
        self.per_worker = per_worker
        self.busy = torch.zeros(max(workers, 1) * per_worker, dtype=torch.int32).share_memory_()
        self._mine: dict[int, torch.UntypedStorage] = {}  # in a worker: its slots' memory, by slot number

    def __getstate__(self):
        return {"per_worker": self.per_worker, "busy": self.busy}

    def __setstate__(self, state):
        self.per_worker, self.busy, self._mine = state["per_worker"], state["busy"], {}

    def batch(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """(an empty batch in shared memory, its slot or -1 for fresh memory) for the calling worker."""
        info = torch.utils.data.get_worker_info()
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        first = info.id * self.per_worker
        for slot in range(first, first + self.per_worker):
            if int(self.busy[slot]):
                continue
            storage = self._mine.get(slot)
            if storage is None or storage.nbytes() < nbytes:
                storage = self._mine[slot] = torch.UntypedStorage._new_shared(nbytes)
            self.busy[slot] = 1
            view = torch.empty(0, dtype=dtype).set_(storage, 0, (int(np.prod(shape)),))
            return view.view(shape), slot
        return fresh_shared(shape, dtype), -1

    def unused(self, slot: int) -> None:
        """The worker wrote nothing it sends in ``slot`` (every file of the batch failed): free it."""
        self.busy[slot] = 0

    def handed(self, imgs: torch.Tensor, slot: int):
        """What the worker returns for a batch written in ``slot``: ``imgs`` itself for fresh memory (slot -1), else
        a wrapper that unpickles as ``imgs`` and frees the slot once its storage is freed (see the module's notes)."""
        return imgs if slot < 0 else _Handed(imgs, slot, self.busy)


class _Handed:
    __slots__ = ("imgs", "slot", "busy")

    def __init__(self, imgs: torch.Tensor, slot: int, busy: torch.Tensor):
        self.imgs, self.slot, self.busy = imgs, slot, busy

    def __reduce__(self):
        return _arrived, (self.imgs, self.slot, self.busy)


def _arrived(imgs: torch.Tensor, slot: int, busy: torch.Tensor) -> torch.Tensor:
    weakref.finalize(imgs.untyped_storage(), _release, busy, slot).atexit = False  # nothing to free at exit
    return imgs


def _release(busy: torch.Tensor, slot: int) -> None:
    busy[slot] = 0
