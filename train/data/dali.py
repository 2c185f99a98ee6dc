"""NVIDIA DALI loader: one pipeline definition that decodes on the GPU (``device="mixed"``, nvJPEG, ROI decode of the
crop) when given a CUDA device and on the CPU (``device_id=None``) otherwise.

The pipeline is fed by an external source that reads the encoded bytes of the validated index in this rank's
:class:`~fastmae.train.data.order.ShardedOrder`, with each sample's crop box and flip drawn from
``(seed, epoch, sample)`` exactly as the torchvision loader draws them: both loaders crop the same regions, and a
restart at ``(epoch, batch)`` repeats the same batches. Files DALI cannot turn into the same RGB as PIL (alpha,
GIF, float, ...) are decoded by PIL and passed on as uncompressed BMP. If a file still fails inside DALI (changed
after validation), the pipeline is rebuilt, the batch is retried with PIL decoding and files PIL cannot read are
skipped and counted.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging

import numpy as np
import torch

from fastmae.errors import FastMAEError, one_line

from .decode import DALI_NATIVE, IMAGENET_MEAN, IMAGENET_STD, load_rgb
from .index import DataIndex
from .loaders import RECIPE, Augment, IndexLoader
from .order import augment_params

logger = logging.getLogger("fastmae.data")
PREFETCH = 2  # batches decoded ahead of the training step


def dali_unavailable_reason() -> str | None:
    """Why the DALI loader cannot run here, or None."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA/driver setup inside DALI's import
        return f"nvidia-dali is not importable ({type(exc).__name__}: {exc}); pip install 'fastmae[dali]'"
    return None


def eval_geometry(width: int, height: int, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resized (w, h) and relative crop position of torchvision's Resize(img_size / 0.875) + CenterCrop(img_size)."""
    short = int(img_size / 0.875)
    if width <= height:
        w, h = short, int(short * height / width)
    else:
        w, h = int(short * width / height), short
    pos = [int(round((n - img_size) / 2.0)) / (n - img_size) if n > img_size else 0.5 for n in (w, h)]
    return np.array([w, h], dtype=np.float32), np.array(pos, dtype=np.float32)


def _to_bmp(data: bytes) -> bytes:
    buf = io.BytesIO()
    load_rgb(data).save(buf, format="BMP")
    return buf.getvalue()


def build_pipeline(pipeline: str, img_size: int, batch_size: int, num_threads: int, device_id: int | None, seed: int,
                   source, dtype: str = "float32"):  # fmt: skip
    """The DALI pipeline of the MAE input ``pipeline`` (pretrain | linprobe | finetune | eval) for a GPU
    (``device_id``) or the CPU (None).

    ``source(batch_info)`` returns the batch: encoded bytes, and for the training pipelines also crop anchors (x, y) and
    shapes (w, h) in pixels and flips. Output: NCHW images normalised with the ImageNet mean/std.
    """
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    decode_device = "mixed" if gpu else "cpu"
    out_type = {"float32": types.FLOAT, "float16": types.FLOAT16}[dtype]
    mean = [255 * m for m in IMAGENET_MEAN]
    std = [255 * s for s in IMAGENET_STD]

    @pipeline_def(enable_conditionals=pipeline == "finetune")
    def mae_pipeline():
        if pipeline == "eval":
            # Sizes and crop position come from the source, computed as torchvision computes them (same pixels).
            encoded, size, crop_pos = fn.external_source(
                source, num_outputs=3, batch=True, batch_info=True, dtype=[types.UINT8, types.FLOAT, types.FLOAT]
            )
            images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, adjust_orientation=False)
            images = fn.resize(images, resize_x=size[0], resize_y=size[1], interp_type=types.INTERP_CUBIC)
            return fn.crop_mirror_normalize(
                images, crop=(img_size, img_size), crop_pos_x=crop_pos[0], crop_pos_y=crop_pos[1], mean=mean,
                std=std, dtype=out_type, output_layout="CHW",
            )  # fmt: skip
        encoded, anchor, shape, flip = fn.external_source(
            source, num_outputs=4, batch=True, batch_info=True, dtype=[types.UINT8, types.FLOAT, types.FLOAT,
                                                                      types.INT32]
        )  # fmt: skip
        # The crop is decoded directly (ROI decode on nvJPEG), then resized bicubic with antialiasing, as PIL does.
        images = fn.decoders.image_slice(
            encoded, anchor, shape, device=decode_device, output_type=types.RGB, axis_names="WH",
            normalized_anchor=False, normalized_shape=False, adjust_orientation=False,
        )  # fmt: skip
        images = fn.resize(images, resize_x=img_size, resize_y=img_size, interp_type=types.INTERP_CUBIC, antialias=True)
        if pipeline == "finetune":
            from nvidia.dali.auto_aug import rand_augment

            # rand-m9 with increasing magnitudes (inc1); DALI has no magnitude noise (mstd0.5).
            images = rand_augment.rand_augment(images, n=2, m=9, monotonic_mag=True)
        # flip stays a CPU node: DALI takes per-sample named arguments from the CPU, also for GPU operators.
        return fn.crop_mirror_normalize(images, mirror=flip, mean=mean, std=std, dtype=out_type, output_layout="CHW")

    pipe = mae_pipeline(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed & 0x7FFFFFFF,
        prefetch_queue_depth=PREFETCH,
    )  # fmt: skip
    pipe.build()
    return pipe


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out


class DALILoader(IndexLoader):
    """DALI decode + augmentation, on the GPU given a CUDA ``device``, else on CPU threads."""

    name = "dali"

    def __init__(self, index: DataIndex, img_size: int, batch_size: int, seed: int, device: torch.device,
                 num_threads: int = 4, pipeline: str = "pretrain", rank=0, world=1, dtype="float32",
                 augment: Augment = RECIPE):  # fmt: skip
        reason = dali_unavailable_reason()
        if reason:
            raise FastMAEError(f"--loader dali: {reason}")
        if pipeline == "finetune" and augment.rand_augment != RECIPE.rand_augment:
            raise FastMAEError(f"--loader dali runs RandAugment {RECIPE.rand_augment} only, not "
                               f"{augment.rand_augment!r}; use --loader torchvision")  # fmt: skip
        super().__init__(index, pipeline, img_size, batch_size, seed, rank, world, augment)
        self.device = torch.device(device)
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self.num_threads, self.dtype = num_threads, dtype
        self.via_pil: set[int] = set()  # samples DALI failed on at run time: decoded by PIL from then on
        self._pipe, self._pending, self._next = None, collections.deque(), (0, 0)
        self.erase = None
        if pipeline == "finetune":
            from timm.data.random_erasing import RandomErasing

            # Random erasing runs on the normalised batch on its device (timm, pixel mode), like mixup/cutmix.
            self.erase = RandomErasing(augment.reprob, mode="pixel", device=str(self.device))

    @property
    def decoders(self) -> dict[str, str]:
        """``{decode route: decoder}``: DALI's own decoders (nvJPEG / nvImageCodec, mixed on a GPU) for the routes
        whose pixels are Pillow's, Pillow (passed on to DALI as BMP) for the rest."""
        from importlib.metadata import PackageNotFoundError, version

        from .decode import ROUTE_NAMES, pillow_label

        dali = "dali"
        for dist in ("nvidia-dali-cuda120", "nvidia-dali-cuda130"):
            with contextlib.suppress(PackageNotFoundError):
                dali = f"dali {version(dist)}"
        where = "mixed (GPU)" if self.device_id is not None else "cpu"
        return {ROUTE_NAMES[int(r)]: (f"{dali} {where}" if int(r) in DALI_NATIVE else f"{pillow_label()} -> BMP")
                for r in np.unique(self.index.routes) if int(r) in ROUTE_NAMES}  # fmt: skip

    def _encoded(self, i: int) -> bytes | None:
        try:
            data = self.index.read(i)
            return data if self.index.native(i) and i not in self.via_pil else _to_bmp(data)
        except Exception:  # unreadable now, or PIL cannot decode it: skipped and counted
            return None

    def _plan(self, epoch: int, start_batch: int):
        """(epoch, batch, sample ids) from ``(epoch, start_batch)`` on, running on into the following epochs."""
        while True:
            for b, ids in enumerate(self.order.batches(epoch, start_batch), start=start_batch):
                yield epoch, b, ids
            epoch, start_batch = epoch + 1, 0

    def _start(self, epoch: int, start_batch: int) -> None:
        """(Re)build the pipeline so that its next output is batch ``start_batch`` of ``epoch``.

        The pipeline then lives across epochs (its source runs on into the next epoch, so prefetching never stalls at
        an epoch boundary); it is rebuilt only when asked for a position that is not the next one.
        """
        scale = self.augment.scale(self.pipeline) if self.pipeline != "eval" else None
        plan = self._plan(epoch, start_batch)
        pending: collections.deque = collections.deque()  # (epoch, batch, ids fed) of batches not yet returned

        def source(info):
            e, b, batch = next(plan)
            ids, data = [], []
            for i in batch:
                enc = self._encoded(int(i))
                if enc is None:
                    self._record_failures([self.index.key(i)])
                else:
                    ids.append(int(i))
                    data.append(np.frombuffer(enc, dtype=np.uint8))
            if not ids:
                raise FastMAEError(f"no sample of batch {b} of epoch {e} can be read any more (files changed?)")
            ids = np.array(ids)
            pending.append((e, b, ids))
            if self.pipeline == "eval":
                geometry = [eval_geometry(int(self.index.widths[i]), int(self.index.heights[i]), self.img_size)
                            for i in ids]  # fmt: skip
                return data, [g[0] for g in geometry], [g[1] for g in geometry]
            boxes, flips = augment_params(self.index, ids, self.seed, e, scale, self.augment.hflip)
            anchors = [box[:2].astype(np.float32) for box in boxes]
            shapes = [box[2:].astype(np.float32) for box in boxes]
            return data, anchors, shapes, [np.array(f, dtype=np.int32) for f in flips]

        # DALI's own randomness (finetune RandAugment) is seeded by the start position.
        self._pipe = build_pipeline(self.pipeline, self.img_size, self.batch_size, self.num_threads, self.device_id,
                                    hash((self.seed, epoch, start_batch)), source, self.dtype)  # fmt: skip
        self._pending, self._next = pending, (epoch, start_batch)

    def _batches(self, epoch, start_batch):
        if start_batch >= self.steps_per_epoch:  # nothing left (or an empty evaluation shard, n < world size)
            return
        if self._pipe is None or self._next != (epoch, start_batch):
            self._start(epoch, start_batch)
        while self._next[0] == epoch:
            try:
                (images,) = self._pipe.run()
            except Exception as exc:  # a file DALI cannot decode: retry from here with PIL for the fed batches
                retry = {int(i) for _, _, ids in self._pending for i in ids}
                logger.warning("DALI failed on batch %d of epoch %d (%s); retrying it with PIL decoding",
                               self._next[1], epoch, one_line(exc, limit=120))  # fmt: skip
                self._pipe = None
                if not retry or retry <= self.via_pil:
                    raise
                self.via_pil |= retry
                self._start(*self._next)
                continue
            e, b, ids = self._pending.popleft()
            assert (e, b) == self._next, f"DALI returned batch {(e, b)}, expected {self._next}"
            self._next = (e, b + 1) if b + 1 < self.steps_per_epoch else (e + 1, 0)
            imgs = _to_torch(images, self.device)
            if self.erase is not None:
                imgs = self.erase(imgs)
            yield b, imgs, torch.from_numpy(self.index.labels[ids]), torch.from_numpy(ids)
