"""Loaders: the torchvision loader (uint8 decode, crop, resize and flip in DataLoader workers; timm's transforms for
finetuning), the DALI loader (``fastmae.train.data.dali``) and a synthetic loader for pure-compute benchmarks, all
behind one interface.

Every loader is a :class:`~fastmae.train.data.batch.Loader`: it reads a validated
:class:`~fastmae.train.data.index.DataIndex` in the :class:`~fastmae.train.data.order.ShardedOrder` of the rank the run
context gives it, and is resumable: ``epoch(e, start_batch)`` yields exactly the batches a run that never stopped would
have seen, each :class:`~fastmae.train.data.batch.Batch` with its ids and position. Files that fail to decode are
skipped, counted in ``skipped`` and reported. Images may be uint8 (normalised on the device by :func:`model_input`, in
the step) or already normalised float32.

Rasters (any band count; uint8, uint16, int16, float32) take the torchvision loader with the run's
:class:`~fastmae.train.data.databands.DataBands` (``bands``): each file read in its own dtype
(:meth:`~fastmae.train.data.index.DataIndex.raster_rows`: a crop reads only its rows from a ``.npy`` or a pack), the
run's bands kept, nodata filled with the band means, cropped, resized and flipped in the native dtype
(:mod:`~fastmae.train.data.resample`) straight into the batch, which leaves the worker in that dtype: per 224 x 224
image ``C x 224 x 224 x itemsize`` bytes cross shared memory and the bus (13 uint16 bands: 1,304,576 B, half of what
float32 would be; 3 uint8 bands: 150,528 B), and become float only on the device (:func:`model_input`). ``bands``
None is the RGB path, unchanged.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import random
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fastmae.bands import BandSpec
from fastmae.errors import FastMAEError, RunFault, one_line

from . import resample
from .batch import Batch
from .databands import TORCH_DTYPES, DataBands
from .decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RASTER,
    ROUTE_NAMES,
    crop_resize_flip,
    decode,
    decoder_names,
    eval_resize_crop,
    load_rgb,
    normalize,
    pillow_label,
)
from .index import DataIndex
from .normalize import normalize_bands
from .order import ShardedOrder, augment_params, sample_rng
from .slots import BatchSlots, fresh_shared, slots_per_worker
from .slots import enabled as slots_enabled

logger = logging.getLogger("fastmae.data")

PIPELINES = ("pretrain", "linprobe", "finetune", "eval")
PRETRAIN_SCALE = (0.2, 1.0)  # MAE pretraining crop scale
FINETUNE_SCALE = (0.08, 1.0)  # timm / DeiT default, used by the MAE finetune and linear-probe recipes
# RandomResizedCrop scale of the training pipelines: pretrain and linprobe crop + flip only, finetune adds RandAugment.
CROP_SCALE = {"pretrain": PRETRAIN_SCALE, "linprobe": FINETUNE_SCALE, "finetune": FINETUNE_SCALE}
FINETUNE_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
RANDOM_ERASE_PROB = 0.25


def model_input(imgs: torch.Tensor, bands: DataBands | BandSpec | None = None) -> torch.Tensor:
    """Images as the model takes them: batches in the data's own dtype (copied to the device as they are: uint8 has
    4x, uint16 2x fewer bytes than float32) are normalised where they are, one affine per band with ``bands``'
    statistics (None: 8-bit RGB with ImageNet's, today's :func:`~.decode.normalize`); a batch in another dtype than
    the data's (finetune's timm transforms, DALI, synthetic: float32 of 8-bit data) is normalised already."""
    if bands is None:
        return normalize(imgs) if imgs.dtype == torch.uint8 else imgs
    spec = bands.spec if isinstance(bands, DataBands) else bands
    if imgs.dtype != TORCH_DTYPES[spec.dtype]:
        return imgs
    return normalize_bands(imgs, spec.mean, spec.std)


def eval_transform(img_size: int):
    """The PIL reference of the evaluation view: resize the shorter side to img_size / 0.875 (bicubic), centre crop,
    normalise. The loaders compute the same on uint8 tensors (:func:`~fastmae.train.data.decode.eval_resize_crop`)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(int(img_size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, with 0 bits kept meaning a black image as Pillow < 12 gave: newer Pillow raises for 0, which
    RandAugment's increasing posterize reaches at magnitude 9 + noise (mstd0.5)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


@dataclass(frozen=True)
class Augment:
    """A training pipeline's augmentation; the defaults are the paper's recipes. ``crop_scale`` is the smallest
    RandomResizedCrop area (None: the pipeline's recipe, :data:`CROP_SCALE`), ``hflip`` the flip probability;
    ``rand_augment`` (``"none"``: off) and ``reprob`` (random erasing) apply to the finetune pipeline."""

    crop_scale: float | None = None
    hflip: float = 0.5
    rand_augment: str = FINETUNE_AUTO_AUGMENT
    reprob: float = RANDOM_ERASE_PROB

    def scale(self, pipeline: str) -> tuple[float, float]:
        return (self.crop_scale, 1.0) if self.crop_scale is not None else CROP_SCALE[pipeline]

    @classmethod
    def of(cls, cfg) -> Augment:
        """The augmentation a run configuration asks for (fields it lacks keep the recipe's)."""
        default = cls()
        return cls(**{f: getattr(cfg, f, getattr(default, f)) for f in ("crop_scale", "hflip", "rand_augment",
                                                                        "reprob")})  # fmt: skip


RECIPE = Augment()  # the paper's augmentation


def finetune_transform(img_size: int, augment: Augment = RECIPE, stats: BandSpec | None = None):
    """The MAE finetune recipe through timm: RandomResizedCrop (0.08, 1) bicubic, flip, RandAugment
    ``rand-m9-mstd0.5-inc1``, normalise (ImageNet's statistics, or ``stats``' 8-bit ones), random erasing 0.25 (pixel
    mode), or what ``augment`` says instead. Mixup/cutmix belong to the step."""
    from timm.data import auto_augment, create_transform

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize

    return create_transform(
        img_size, is_training=True, scale=augment.scale("finetune"), hflip=augment.hflip,
        auto_augment=None if augment.rand_augment == "none" else augment.rand_augment, interpolation="bicubic",
        re_prob=augment.reprob, re_mode="pixel", re_count=1,
        mean=IMAGENET_MEAN if stats is None else tuple(m / 255 for m in stats.mean),
        std=IMAGENET_STD if stats is None else tuple(s / 255 for s in stats.std),
    )  # fmt: skip


@contextlib.contextmanager
def _seeded(rng: np.random.Generator):
    """Run torch's, Python's and NumPy's global generators from ``rng`` inside, restoring them after (timm and
    torchvision transforms draw from all three: timm's RandAugment picks its ops with ``np.random``)."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    seed = int(rng.integers(2**62))
    # The CPU generator only: torch.manual_seed also seeds CUDA, which (CUDA not initialised) records a stack trace
    # per call, 0.9 ms a sample (benchmarks/bench_loader.py, fastmae-finetune row).
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class ImageFiles(torch.utils.data.Dataset):
    """Item ``(epoch, i)`` -> ``((image, label, i), None)``, or ``(None, key)`` when the file does not decode.

    pretrain, linprobe and eval images are uint8 [3, S, S] (decoded by TorchCodec, torchvision.io or Pillow, cropped,
    resized and flipped as uint8); finetune images go through timm's Pillow transforms (RandAugment needs Pillow) and
    come out normalised float32. The augmentation of sample ``i`` in ``epoch`` depends on nothing else, so restarts
    and worker counts do not change it. ``decoder`` (None: the process's, :func:`~.decode.resolve_decoder`) is
    set before the workers start (the benchmarks compare decoders that way).

    With ``bands`` (:class:`~.databands.DataBands`, see the module docstring) images are ``[C, S, S]`` in the data's
    dtype. Finetuning 8-bit RGB keeps timm's transforms (normalised with the bands' statistics); finetuning other
    rasters crops and flips as the linear probe does (RandAugment and random erasing work on 8-bit RGB pictures).
    """

    decoder: str | None = None
    slots: BatchSlots | None = None  # set by the loader before its workers start: batch memory they reuse

    def __init__(self, index: DataIndex, pipeline: str, img_size: int, seed: int, augment: Augment = RECIPE,
                 bands: DataBands | None = None):  # fmt: skip
        if bands is None and (index.bands, index.dtype) != (3, "uint8"):
            raise FastMAEError(f"the data has {index.bands} {index.dtype} bands: its loader needs the run's bands "
                               "(fastmae.train.data.databands.resolve_bands)")  # fmt: skip
        self.index, self.pipeline, self.img_size, self.seed, self.augment = index, pipeline, img_size, seed, augment
        self.bands = bands
        self.channels, self.dtype = (3, torch.uint8) if bands is None else (bands.count, bands.dtype)
        # timm's Pillow transforms: the finetune pipeline of 8-bit RGB pictures (decoded by the RGB routes)
        pictures = index.rgb and (bands is None or (bands.count == 3 and bands.indices is None and
                                                    bands.spec.nodata is None))  # fmt: skip
        self.timm = pipeline == "finetune" and pictures
        self.transform = None
        if self.timm:
            stats = None if bands is None else bands.spec
            self.transform = finetune_transform(img_size, augment, stats)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]):
        epoch, i = item
        try:
            return (self.image(epoch, i), int(self.index.labels[i]), i), None
        except Exception:  # changed or unreadable since validation: skipped and counted, never fatal
            return None, self.index.key(i)

    def __getitems__(self, items: list[tuple[int, int]]):
        """A whole batch at once (the DataLoader calls this when it exists): crop boxes drawn together, images written
        straight into the batch, which lives in shared memory inside a worker (no copy on the way out)."""
        if self.timm:
            return _collate([self[item] for item in items])
        epoch = items[0][0]
        ids = np.array([i for _, i in items], dtype=np.int64)
        boxes = flips = None
        if self.pipeline != "eval":
            boxes, flips = augment_params(self.index, ids, self.seed, epoch, self.augment.scale(self.pipeline),
                                          self.augment.hflip)  # fmt: skip
        shape = (len(items), self.channels, self.img_size, self.img_size)
        if self.slots is None or torch.utils.data.get_worker_info() is None:
            return self._fill(batch_tensor(shape, self.dtype), epoch, ids, boxes, flips)
        out, slot = self.slots.batch(shape, self.dtype)
        try:
            imgs, labels, ids_t, failed = self._fill(out, epoch, ids, boxes, flips)
        except BaseException:
            self.slots.unused(slot)  # nothing leaves in it
            raise
        if imgs is None:
            self.slots.unused(slot)
            return imgs, labels, ids_t, failed
        return self.slots.handed(imgs, slot), labels, ids_t, failed

    def _fill(self, out: torch.Tensor, epoch: int, ids: np.ndarray, boxes, flips):
        """Write the images of ``ids`` into ``out`` (a file that fails is skipped and named in ``failed``): (images,
        labels, ids, failed), images None when every file failed."""
        good, failed = [], []
        for j, i in enumerate(ids.tolist()):
            try:
                crop = None if self.pipeline == "eval" else (boxes[j], bool(flips[j]))
                if self.bands is None:
                    out[len(good)].copy_(self.image(epoch, i, crop))
                else:  # the native-dtype resample writes its result straight into the batch
                    self.image(epoch, i, crop, out=out[len(good)])
                good.append(i)
            except Exception:  # changed or unreadable since validation: skipped and counted, never fatal
                failed.append(self.index.key(i))
        if not good:
            return None, None, None, failed
        return out[: len(good)], torch.from_numpy(self.index.labels[good]), torch.tensor(good), failed

    def image(self, epoch: int, i: int, crop: tuple | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``i``'s image in ``epoch``; ``crop`` = (box, flip) when the caller drew them already (a batch);
        ``out``: a batch's slot to write it into (with bands)."""
        if self.timm:
            with _seeded(sample_rng(self.seed, epoch, i)):
                return self.transform(load_rgb(self.index.read(i)))
        if self.pipeline != "eval" and crop is None:
            scale = self.augment.scale(self.pipeline)
            boxes, flips = augment_params(self.index, np.array([i]), self.seed, epoch, scale, self.augment.hflip)
            crop = boxes[0], bool(flips[0])
        b = self.bands
        if b is None or self.pipeline == "eval":
            img = self.pixels(i)
            if b is None:  # 8-bit RGB: today's uint8 path
                if self.pipeline == "eval":
                    return eval_resize_crop(img, self.img_size)
                return crop_resize_flip(img, crop[0], crop[1], self.img_size)
            res = resample.eval_resize_crop(b.select(img), self.img_size, nodata=b.spec.nodata, fill=b.fill)
            return res if out is None else out.copy_(res)
        x, y, w, h = (int(v) for v in crop[0])
        part = b.select(self.rows(i, y, y + h)[:, :, x : x + w])  # only the box's rows are read, its bands copied
        return resample.crop_resize_flip(part, (0, 0, w, h), crop[1], self.img_size, nodata=b.spec.nodata,
                                         fill=b.fill, out=out)  # fmt: skip

    def rows(self, i: int, y0: int, y1: int) -> torch.Tensor:
        """Rows ``y0:y1`` of raster sample ``i`` ``[C, y1 - y0, W]`` (:meth:`~.index.DataIndex.raster_rows`)."""
        if int(self.index.routes[i]) != RASTER:
            return self.pixels(i)[:, y0:y1]
        return self.index.raster_rows(i, y0, y1)

    def pixels(self, i: int) -> torch.Tensor:
        """Sample ``i``'s pixels ``[C, H, W]``: a raster in its own bands and dtype, else decoded 8-bit RGB."""
        route = int(self.index.routes[i])
        if route == RASTER:
            return self.index.raster(i)
        return decode(self.index.read(i), route, self.decoder)


def batch_tensor(shape: tuple[int, ...], dtype=torch.uint8) -> torch.Tensor:
    """An empty batch; inside a DataLoader worker in shared memory from the start, as torch's default_collate makes
    it, so handing it to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    return fresh_shared(shape, dtype)


def _collate(items):
    if isinstance(items, tuple):  # a batch __getitems__ made
        return items
    good = [x for x, _ in items if x is not None]
    failed = [k for _, k in items if k is not None]
    if not good:
        return None, None, None, failed
    ids = torch.tensor([i for _, _, i in good])
    out = batch_tensor((len(good), *good[0][0].shape), good[0][0].dtype)
    return torch.stack([x for x, _, _ in good], out=out), torch.tensor([y for _, y, _ in good]), ids, failed


class IndexLoader:
    """What every loader over a :class:`DataIndex` shares: this rank's order, skip accounting, and :meth:`epoch`,
    which turns the loader's raw batches into :class:`~fastmae.train.data.batch.Batch` es."""

    name = "base"

    def __init__(self, index: DataIndex, pipeline: str, img_size: int, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, augment: Augment = RECIPE, bands: DataBands | None = None):  # fmt: skip
        if pipeline not in PIPELINES:
            raise FastMAEError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")
        train = pipeline != "eval"
        self.index, self.pipeline, self.img_size, self.batch_size = index, pipeline, img_size, batch_size
        self.seed, self.augment, self.bands = seed, augment, bands
        self.order = ShardedOrder(len(index), batch_size, seed, rank, world, shuffle=train, drop_last=train)
        self.steps_per_epoch = self.order.steps_per_epoch
        self.skipped: set[str] = {key for key, _ in index.bad}
        self.reached = (0, 0)  # (epoch, batches consumed) of the batch last produced, for messages

    def _record_failures(self, failed: list[str]) -> None:
        new = [k for k in failed if k not in self.skipped]
        self.skipped.update(failed)
        if new:
            logger.warning("skipped %d undecodable file(s), e.g. %s", len(new), ", ".join(new[:3]))

    def _batches(self, epoch: int, start_batch: int) -> Iterator[tuple[int, torch.Tensor | None, torch.Tensor, ...]]:
        """``(batch number, images or None when every file failed, labels, ids)`` from ``start_batch`` on."""
        raise NotImplementedError

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch..`` of ``epoch`` (images uint8, or normalised float32); a batch whose every file
        failed is left out (its files are counted in :attr:`skipped`)."""
        self.reached = (epoch, start_batch)
        for b, imgs, labels, ids in self._batches(epoch, start_batch):
            self.reached = (epoch, b + 1)
            if imgs is not None:
                yield Batch(imgs, labels, ids, epoch, (epoch, b + 1))


class _EpochBatches(torch.utils.data.Sampler):
    def __init__(self, order: ShardedOrder):
        self.order, self.epoch, self.start = order, 0, 0

    def __len__(self) -> int:
        return self.order.steps_per_epoch - self.start

    def __iter__(self):
        for ids in self.order.batches(self.epoch, self.start):
            yield [(self.epoch, int(i)) for i in ids]


def _freeze_inherited(_worker_id: int) -> None:
    """A forked DataLoader worker first freezes what it inherited (``gc.freeze``): garbage the parent had not yet
    collected is then never finalised in the worker, where the parent's threads do not exist. (A DALI pipeline left in
    a reference cycle by an earlier loader, collected in a worker, hung it for good in ``Pipeline.__del__``, waiting on
    threads that are not there.) What the worker allocates itself is collected as usual."""
    gc.freeze()


class TorchvisionLoader(IndexLoader):
    """torchvision.io / Pillow decoding and uint8 transforms (timm's for finetuning) in DataLoader worker processes.

    A worker that dies (the out-of-memory killer's usual victim) costs no step: the workers are started again at the
    batch the run had reached, which then continues with exactly the batches it would have seen, at most
    ``MAX_WORKER_RESTARTS`` times per run; after that it is a one-line :class:`RunFault`.
    """

    name = "torchvision"
    MAX_WORKER_RESTARTS = 3

    def __init__(self, index, img_size, batch_size, seed, num_workers=0, pin=False, pipeline="pretrain", rank=0,
                 world=1, augment: Augment = RECIPE, bands: DataBands | None = None):  # fmt: skip
        super().__init__(index, pipeline, img_size, batch_size, seed, rank, world, augment, bands)
        self.sampler = _EpochBatches(self.order)
        self.dataset = ImageFiles(index, pipeline, img_size, seed, augment, bands)
        self.num_workers, self.pin = num_workers, pin
        self.worker_restarts = 0
        self.loader = self._data_loader()

    @property
    def decoders(self) -> dict[str, str]:
        """``{decode route: decoder and version}`` over the routes of this loader's index (finetune: Pillow for all,
        timm's RandAugment works on Pillow images): for ``summary.json`` and the log."""
        routes = np.unique(self.index.routes)
        if self.dataset.timm:
            return {ROUTE_NAMES[int(r)]: pillow_label() for r in routes if int(r) in ROUTE_NAMES}
        names = decoder_names(routes, self.dataset.decoder)
        bands = self.dataset.bands
        if self.index.dtype != "uint8" or (bands is not None and bands.spec.nodata is not None):
            names["crop/resize"] = resample.backend_label()  # what resamples these bands (compiled or torch)
        return names

    def _data_loader(self) -> torch.utils.data.DataLoader:
        # each DataLoader's workers their own batch memory, reused (train/data/slots.py); the timm path collates
        self.dataset.slots = BatchSlots(self.num_workers, slots_per_worker(self.pin)) \
            if self.num_workers and slots_enabled() else None  # fmt: skip
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.pin,
            persistent_workers=self.num_workers > 0,
            # its own generator: a DataLoader iterator otherwise draws its base seed from torch's global generator,
            # which would shift drop path / mixup after a mid-epoch resume (augmentations are seeded per sample)
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=_freeze_inherited,
        )

    def _batches(self, epoch, start_batch):
        b = start_batch
        while True:
            self.sampler.epoch, self.sampler.start = epoch, b
            try:
                for imgs, labels, ids, failed in self.loader:
                    _quiet_sigchld()
                    self._record_failures(failed)
                    yield b, imgs, labels, ids
                    b += 1
                return
            except RuntimeError as exc:
                dead = _dead_workers(self.loader)
                if not dead:
                    raise
                self._restart_workers(dead, epoch, b, exc)

    def _restart_workers(self, dead: list[str], epoch: int, batch: int, exc: Exception) -> None:
        """New workers at ``batch`` of ``epoch`` after ``dead`` ones, or a RunFault once that happened too often."""
        self.worker_restarts += 1
        what = f"DataLoader worker {', '.join(dead)} died at batch {batch} of epoch {epoch}"
        if self.worker_restarts > self.MAX_WORKER_RESTARTS:
            raise RunFault(f"{what}, the {self.worker_restarts}th worker death in this run (out of memory? lower "
                           "--num-workers or --batch-size)") from exc  # fmt: skip
        logger.warning("%s; starting the workers again there (%d/%d)", what, self.worker_restarts,
                       self.MAX_WORKER_RESTARTS)  # fmt: skip
        with contextlib.suppress(Exception):
            self.loader._iterator._shutdown_workers()  # the survivors; a new DataLoader starts fresh ones
        self.loader = self._data_loader()


def _dead_workers(loader: torch.utils.data.DataLoader) -> list[str]:
    """``pid N (SIGKILL)`` for each worker of ``loader``'s iterator that has died."""
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    dead = []
    for w in workers:
        code = w.exitcode
        if code is not None and code != 0:
            dead.append(f"pid {w.pid} ({signal.Signals(-code).name if code < 0 else f'exit {code}'})")
    return dead


def _quiet_sigchld() -> None:
    """torch's DataLoader raises a worker's death from a SIGCHLD handler, i.e. at any line of the main thread (inside a
    step as well). With the default handler back, the death is raised where it can be handled: by the loader's own
    check, at the next batch it waits for (within 5 s)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGCHLD) not in (
            signal.SIG_DFL, None):  # fmt: skip
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


class FallbackLoader:
    """A GPU route (DALI, the GPU loader) that ``--loader auto`` chose, with the torchvision loader behind it: if the
    route fails within its first :attr:`FIRST` batches of the run (a decoder missing on this GPU, a driver library
    that does not load), one warning says so and the torchvision loader continues from the batch the failed one had
    reached: the same order, crop boxes and flips, so the run sees the batches it would have seen. A failure later is
    the run's (one line and a checkpoint). It is a :class:`~fastmae.train.data.batch.Loader` like the others."""

    FIRST = 2

    def __init__(self, primary, make_fallback):
        self.current, self._make_fallback = primary, make_fallback
        self.fell_back: str | None = None  # why, once it has
        self.served = 0

    @property
    def name(self) -> str:
        return self.current.name

    @property
    def steps_per_epoch(self) -> int:
        return self.current.steps_per_epoch

    @property
    def skipped(self) -> set[str]:
        return self.current.skipped

    @property
    def decoders(self) -> dict[str, str]:
        return getattr(self.current, "decoders", {})

    def epoch(self, epoch: int, start_batch: int = 0):
        it, at = self.current.epoch(epoch, start_batch), (epoch, start_batch)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as exc:
                if self.fell_back is not None or self.served >= self.FIRST:
                    raise
                failed = self.current.name
                at = getattr(self.current, "reached", at)
                cause = exc.__cause__ if isinstance(exc, RunFault) and exc.__cause__ is not None else exc
                why = one_line(cause, last=True, typed=True)
                self.fell_back = f"the {failed} loader failed at batch {at[1]} of epoch {at[0]} ({why})"
                logger.warning("--loader auto: %s; the torchvision loader continues from there", self.fell_back)
                skipped = set(self.current.skipped)
                self.current = self._make_fallback()
                self.current.skipped |= skipped
                it = self.current.epoch(at[0], at[1])
                continue
            self.served += 1
            at = batch.position
            yield batch


class SyntheticLoader:
    """Random normalised images made on the device: measures compute with no data loading in the way. Rank ``rank``
    of ``world`` makes its own images (sample ids ``rank * batch_size + ...`` within each global batch)."""

    name = "synthetic"
    decoders: dict[str, str] = {}  # nothing is decoded

    def __init__(self, img_size: int, batch_size: int, images_per_epoch: int, seed: int, device: torch.device,
                 rank: int = 0, world: int = 1):  # fmt: skip
        self.img_size, self.batch_size, self.seed, self.device = img_size, batch_size, seed, device
        self.rank, self.world = rank, world
        self.steps_per_epoch = max(images_per_epoch // (batch_size * self.world), 1)
        self.skipped: set[str] = set()

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        g = torch.Generator(device=self.device)
        shape = (self.batch_size, 3, self.img_size, self.img_size)
        for b in range(start_batch, self.steps_per_epoch):
            first = (b * self.world + self.rank) * self.batch_size
            g.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + first)  # the same batch after a restart
            imgs = torch.randn(shape, generator=g, device=self.device)
            ids = torch.arange(first, first + self.batch_size)
            yield Batch(imgs, torch.zeros(self.batch_size, dtype=torch.long), ids, epoch, (epoch, b + 1))


def sample_images(index: DataIndex, img_size: int, count: int, bands: DataBands | None = None) -> torch.Tensor:
    """``count`` decodable images spread evenly over the index (so over the classes of a sorted ImageFolder), as the
    evaluation view, normalised (with ``bands``' statistics; None: 8-bit RGB, ImageNet's): fixed inputs for
    reconstruction pictures."""
    if bands is not None:
        files = ImageFiles(index, "eval", img_size, 0, bands=bands)
        view = files.image
    out: list[torch.Tensor] = []
    spread = np.unique(np.linspace(0, len(index) - 1, min(count, len(index))).round().astype(int)).tolist()
    chosen = set(spread)
    rest = (i for i in range(len(index)) if i not in chosen)  # they stand in for undecodable ones
    for i in itertools.chain(spread, rest):
        if len(out) == count:
            break
        try:
            if bands is None:
                out.append(eval_resize_crop(decode(index.read(i), int(index.routes[i])), img_size))
            else:
                out.append(view(0, i))
        except Exception:
            continue
    if bands is not None:
        return model_input(torch.stack(out), bands) if out else torch.empty(0, bands.count, img_size, img_size)
    return normalize(torch.stack(out)) if out else torch.empty(0, 3, img_size, img_size)
