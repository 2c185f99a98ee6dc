"""What a loader gives the training loop: :class:`Batch`, the :class:`Loader` protocol every loader follows, and the
one path that brings batches onto the device ahead of the step.

- A batch carries its sample ids (per-sample masks and augmentations), its epoch, and the loader ``position`` once it
  is taken (``(epoch, batches consumed)``): a checkpoint written after the step that used it names exactly where a
  resumed run continues, whatever the loader still holds in flight.
- :func:`epochs` runs a loader's epochs one after the other from a resume position and marks the last batch of each
  epoch (``epoch_end``), also when the epoch's last batches were lost to unreadable files.
- :func:`on_device` copies the next batch to the device on a side stream while the step works on the current one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import torch

from fastmae.errors import FastMAEError


@dataclasses.dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S] uint8 (normalised on the device, in the step) or normalised float32
    labels: torch.Tensor  # [B] int64 (0 where the data has no labels)
    ids: torch.Tensor  # [B] int64: each sample's index in the data set (its masks and augmentations derive from it)
    epoch: int | torch.Tensor  # a device tensor inside a CUDA graph
    position: tuple[int, int]  # (epoch, batches of it consumed) once this batch is taken
    epoch_end: bool = False  # the last batch of its epoch (set by :func:`epochs`)

    def __len__(self) -> int:
        return self.images.shape[0]


class Loader(Protocol):
    """What every loader (torchvision, DALI, the GPU loader, synthetic) offers the loop. Loaders are built for one
    rank of ``world`` (the run context says which) and are resumable: ``epoch(e, start_batch)`` yields exactly the
    batches a run that never stopped would have seen from there."""

    name: str  # the loader that runs (after a fallback: the one it fell back to)
    steps_per_epoch: int  # batches this rank reads per epoch
    skipped: set[str]  # files left out because they do not decode (at indexing and since)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]: ...


def epochs(loader: Loader, epoch: int, start_batch: int, usable: int) -> Iterator[Batch]:
    """``loader``'s batches from batch ``start_batch`` of ``epoch`` on, epoch after epoch, each epoch cut at ``usable``
    batches (the rest cannot fill an accumulation). The last batch of each epoch has ``epoch_end`` set and the
    position at the epoch's usable end (one lookahead: a final batch whose files all failed yields nothing)."""
    while True:
        pending = None
        for batch in loader.epoch(epoch, start_batch):
            if pending is not None:
                yield pending
            pending = batch
            if batch.position[1] >= usable:
                break
        if pending is None:
            raise FastMAEError(f"epoch {epoch} from batch {start_batch} on gave no batch: none of its files could be "
                               "read (changed or removed since they were indexed?)")  # fmt: skip
        pending.epoch_end, pending.position = True, (epoch, usable)
        yield pending
        epoch, start_batch = epoch + 1, 0


def on_device(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """``batches`` with images, labels and ids on ``device``. On a GPU the next batch is pulled and copied
    (non-blocking, from pinned memory, on a side stream) while the current one is in the step, which then waits for
    its copy on the GPU, never on the host."""
    if device.type != "cuda":
        for batch in batches:
            yield _moved(batch, device)
        return
    stream = torch.cuda.Stream(device)

    def ahead(batch: Batch):
        stream.wait_stream(torch.cuda.current_stream(device))  # memory the step freed is free on this stream too
        with torch.cuda.stream(stream):
            batch = _moved(batch, device)
        return batch, stream.record_event()

    pending = None
    for batch in batches:
        ready, pending = pending, ahead(batch)
        if ready is not None:
            yield _on_current_stream(*ready, device)
    if pending is not None:
        yield _on_current_stream(*pending, device)


def _moved(batch: Batch, device: torch.device) -> Batch:
    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == device.type:  # already there (the GPU loader's images, synthetic batches)
            return t
        if device.type == "cuda" and not t.is_pinned():
            t = t.pin_memory()  # a pageable copy would make the host wait
        return t.to(device, non_blocking=True)

    return dataclasses.replace(batch, images=move(batch.images), labels=move(batch.labels), ids=move(batch.ids))


def _on_current_stream(batch: Batch, event, device: torch.device) -> Batch:
    current = torch.cuda.current_stream(device)
    current.wait_event(event)  # the step waits for its copy on the GPU, not on the host
    for t in (batch.images, batch.labels, batch.ids):
        t.record_stream(current)  # not reused by the side stream before the step is done with it
    return batch
