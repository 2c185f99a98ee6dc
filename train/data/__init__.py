"""fastmae.train.data: the data layer every recipe reads through.

- :mod:`.index`: find, validate, cache: folders, webdataset shards, brace patterns and packs indexed into numpy arrays,
  broken files counted, a binary cache that makes a later start cost what changed; the work split over torchrun ranks.
- :mod:`.order`: the sharded, resumable sample order, and each sample's crop box and flip drawn from
  (seed, epoch, sample).
- :mod:`.decode`: bytes to uint8 pixels (TorchCodec or torchvision.io for JPEG and PNG, Pillow for the rest),
  crop / resize / flip on uint8 tensors, normalisation on the device.
- :mod:`.loaders`: the torchvision loader (pretrain, linprobe, eval on uint8; finetune through timm), the synthetic
  loader.
- :mod:`.dali`: the same pipelines in NVIDIA DALI (mixed decode on a GPU, CPU decode otherwise).
- :mod:`.gpu_loader`: the pretrain pipeline with nvJPEG decode and one fused Triton kernel on the GPU.
- :mod:`.labelled`: labelled train/val splits and the built-in digits data set.
- :mod:`.batch`: :class:`Batch` (images, labels, sample ids, epoch, position), the :class:`Loader` protocol every
  loader follows, and the one path onto the device ahead of the step.
- Rasters of any band count and dtype: :mod:`.rasters` (``.npy``, TIFF / GeoTIFF, 8/16-bit PNG to native-dtype
  ``[C, H, W]``; the index's raster route), :mod:`.resample` (crop / resize / flip in the native dtype, nodata fill),
  :mod:`.bandstats` (per-band mean and std), :mod:`.normalize` (per-band affine on the device), :mod:`.databands`
  (the run's bands: selection, nodata, statistics; what the torchvision loader and the step read), :mod:`.pack`
  (``fastmae pack``: tiles in one file, decoded once; ``--data`` of a pack indexes it).
- :mod:`.slots`: the shared-memory batches each loader worker writes again once the main process has freed them.

:func:`make_loader` picks the implementation for one rank of the run (the run context says which).
"""

from __future__ import annotations

import logging
import os

import torch

from fastmae.errors import FastMAEError

from .batch import Batch, Loader, epochs, on_device
from .dali import DALILoader, dali_unavailable_reason
from .databands import DataBands, pretrained_bands, resolve_bands
from .gpu_loader import GPULoader, gpu_loader_unavailable_reason
from .index import DataIndex, index_data
from .labelled import digits_folder, labelled_data, labelled_splits, num_classes
from .loaders import Augment, FallbackLoader, SyntheticLoader, TorchvisionLoader, model_input, sample_images

logger = logging.getLogger("fastmae.data")
__all__ = ["Augment", "Batch", "DataBands", "DataIndex", "Loader", "SyntheticLoader", "digits_folder", "epochs",
           "index_data", "labelled_data", "labelled_splits", "make_loader", "model_input", "num_classes", "on_device",
           "pretrain_index", "pretrained_bands", "resolve_bands", "resolve_loader", "sample_images"]  # fmt: skip


def pretrain_index(data: str | None, group=None, check: str = "listing") -> DataIndex:
    """The pretraining data set: a path (see :func:`index_data`), or ``"digits"``, the training split of the
    built-in digits (their validation images are never seen in pretraining)."""
    return index_data(digits_folder() / "train" if data == "digits" else data, group=group, check=check)


# The loaders that have fed a training run on a GPU, with where it is recorded. On CUDA, ``--loader auto`` takes DALI
# only once it is here: until then a route that has never run on a GPU is chosen only when asked for. Add DALI (or
# the GPU loader) with the sitting's results file once one has run it.
RAN_ON_A_GPU = {"torchvision": "benchmarks/results/h200-20261130-demo-summary.json"}


def loader_problem(name: str, device: torch.device, command: str) -> tuple[str, str | None]:
    """(the loader that runs, why the one asked for cannot run here or None). ``auto`` is torchvision on a CPU; on
    CUDA it is DALI when DALI imports *and* has run on a GPU (:data:`RAN_ON_A_GPU`), else torchvision, and it logs
    why. The GPU loader (``gpu``, pretraining only) is chosen only when asked for, until a GPU sitting measures it
    faster than torchvision's (``benchmarks/gpu_sitting.py --stage feed``)."""
    if name == "auto":
        if device.type != "cuda":
            return "torchvision", None
        reason = dali_unavailable_reason()
        if reason is None and "dali" in RAN_ON_A_GPU:
            return "dali", None
        if reason is None:
            reason = "nvidia-dali is installed, but its GPU path has not run on any GPU yet; --loader dali chooses it"
        later = "; --loader gpu (not measured faster yet) decodes on the GPU without DALI" if command == "pretrain" \
            else ""  # fmt: skip
        logger.info("loader auto -> torchvision (skipped dali: %s%s)", reason, later)
        return "torchvision", None
    if name == "dali" and (reason := dali_unavailable_reason()):
        return name, f"--loader dali: {reason}"
    if name == "gpu":
        if command != "pretrain":
            return name, f"--loader gpu has the pretrain pipeline only, not {command}'s"
        if reason := gpu_loader_unavailable_reason(device):
            return name, f"--loader gpu: {reason}"
    return name, None


def resolve_loader(name: str, device: torch.device, command: str = "pretrain") -> str:
    """The loader that runs for ``--loader name`` (see :func:`loader_problem`); one that cannot is a one-line error."""
    chosen, problem = loader_problem(name, device, command)
    if problem:
        raise FastMAEError(problem)
    return chosen


def make_loader(name: str, index: DataIndex, pipeline: str, cfg, device: torch.device, rank: int = 0, world: int = 1,
                fallback: bool = False, bands: DataBands | None = None):  # fmt: skip
    """A ``gpu``, ``dali`` or ``torchvision`` loader of ``pipeline`` (pretrain / linprobe / finetune / eval) over
    ``index`` for rank ``rank`` of ``world``, with the config's img_size, batch_size, seed and num_workers (default
    min(8, CPU count) processes or threads). ``fallback`` (``--loader auto`` chose it): a GPU route that fails in its
    first batches gives way to the torchvision loader, from the batch it had reached, with one logged line
    (:class:`FallbackLoader`). ``bands``: the run's bands (:class:`~.databands.DataBands`, from
    ``DataBands.for_loader()``; None: 8-bit RGB with ImageNet's statistics), which only the torchvision loader reads:
    ``--loader auto`` takes it for them, an explicit ``dali`` or ``gpu`` is a one-line error."""
    workers = cfg.num_workers if cfg.num_workers is not None else min(8, os.cpu_count() or 1)
    augment = Augment.of(cfg)  # the config's crop scale, flip, RandAugment and erasing (the recipe's by default)

    def torchvision_loader():
        return TorchvisionLoader(index, cfg.img_size, cfg.batch_size, cfg.seed, workers, pin=device.type == "cuda",
                                 pipeline=pipeline, rank=rank, world=world, augment=augment, bands=bands)  # fmt: skip

    if (bands is not None or not index.rgb) and name in ("gpu", "dali"):
        what = bands.describe() if bands is not None else f"rasters ({index.bands} {index.dtype} bands)"
        why = f"the {name} loader reads 8-bit RGB pictures with ImageNet's statistics, not {what}"
        if not fallback:
            raise FastMAEError(f"--loader {name}: {why}; use --loader torchvision")
        logger.info("loader auto -> torchvision (%s)", why)
        name = "torchvision"

    if name == "gpu":
        loader = GPULoader(index, cfg.img_size, cfg.batch_size, cfg.seed, device, workers, rank=rank, world=world,
                           augment=augment)  # fmt: skip
    elif name == "dali":
        loader = DALILoader(index, cfg.img_size, cfg.batch_size, cfg.seed, device, num_threads=max(workers, 1),
                            pipeline=pipeline, rank=rank, world=world, augment=augment)  # fmt: skip
    else:
        loader = torchvision_loader()
        if pipeline == "finetune" and not loader.dataset.timm and (augment.rand_augment != "none" or augment.reprob):
            logger.warning("finetuning on %s: RandAugment and random erasing work on 8-bit RGB pictures and are not "
                           "applied; the crops and flips are", bands.describe())  # fmt: skip
    logger.info("decoders of the %s loader (%s): %s", loader.name, pipeline,
                ", ".join(f"{route} -> {dec}" for route, dec in loader.decoders.items()))  # fmt: skip
    return FallbackLoader(loader, torchvision_loader) if fallback and name in ("gpu", "dali") else loader
