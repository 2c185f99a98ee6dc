"""``--loader gpu``: DataLoader workers only read file bytes; the GPU decodes them in batches (one batched nvJPEG call
per batch: TorchCodec's ``decode_jpeg``, which uses the A100/H100/H200 hardware JPEG engine for baseline files, where
it loads; torchvision's CUDA ``decode_jpeg`` otherwise) and one Triton kernel (:mod:`fastmae.kernels.crop_resize`)
crops, flips, resizes (bicubic, antialiased) and normalises the whole batch, on a side stream, while the step runs.

- Which files go where: baseline 3-channel JPEGs without an EXIF orientation (the index's JPEG route, SOF0/SOF1 with
  3 components, read from the header in the worker) are decoded on the GPU. PNG, CMYK, greyscale, progressive,
  EXIF-oriented and every other file take the CPU route in the worker (decode, crop, resize, flip on uint8, as the
  torchvision loader does) and reach the GPU as finished uint8 crops. A JPEG the GPU cannot decode is decoded on the
  CPU instead; one that nothing decodes is skipped. All three are counted (:attr:`GPULoader.routes`), none is a crash.
- Crop boxes and flips are the torchvision loader's (:func:`~fastmae.train.data.order.augment_params`): same boxes,
  pixels within a few levels (float resampling against uint8 fixed point; ``tests/test_gpu_loader.py``).
- Streams (torchvision issue 9606: ``decode_jpeg`` on CUDA runs on nvJPEG's own stream, and on an H100 it corrupted
  batches by writing memory freed on the caller's stream before the caller's work on it had finished): a producer
  thread decodes and transforms on a side stream, synchronising that stream before each decode, records an event
  after the kernel; the step's stream waits for the event and ``record_stream`` keeps the batch's memory from
  being reused before the step is done with it. Two batches are kept ready ahead.

On a CPU (the tests) the same pipeline runs with the same decoders' CPU form, the kernel under the Triton
interpreter, and no streams; the producer thread with its events and hand-over runs there with a stand-in for the CUDA
calls (:class:`CudaStreams`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading

import numpy as np
import torch

from fastmae.errors import RunFault, one_line

from .decode import JPEG, crop_resize_flip, decode, exif_orientation, normalize, resolve_decoder
from .loaders import RECIPE, Augment, ImageFiles, TorchvisionLoader, batch_tensor
from .order import augment_params

logger = logging.getLogger("fastmae.data")
_SOF_BASELINE = (0xC0, 0xC1)
_SOF_OTHER = (0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def jpeg_kind(data) -> tuple[str, int] | None:
    """(``baseline`` | ``progressive``, components) from a JPEG's frame header, or None when it has none."""
    i, n = 2, len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF_BASELINE or marker in _SOF_OTHER:
            return ("baseline" if marker in _SOF_BASELINE else "progressive"), data[i + 9]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def gpu_decodable(data, route: int) -> bool:
    """Whether nvJPEG gets this file: a baseline JPEG with 3 components and no EXIF orientation (TorchCodec would
    apply it; no route does, :mod:`~.decode`)."""
    return route == JPEG and jpeg_kind(data) == ("baseline", 3) and exif_orientation(data) == 1


class EncodedFiles(ImageFiles):
    """The worker side of the GPU loader: a batch of ``(epoch, i)`` -> ``(payload, labels, ids, failed)`` where the
    payload holds the encoded bytes of the GPU-decodable files and the finished uint8 crops of the others, with every
    sample's crop box and flip."""

    def __getitems__(self, items: list[tuple[int, int]]):
        epoch = items[0][0]
        ids = np.array([i for _, i in items], dtype=np.int64)
        boxes, flips = augment_params(self.index, ids, self.seed, epoch, self.augment.scale(self.pipeline),
                                      self.augment.hflip)  # fmt: skip
        encoded, ready, good, failed = [], [], [], []
        for j, i in enumerate(ids.tolist()):
            try:
                data = self.index.read(i)
                route = int(self.index.routes[i])
                if gpu_decodable(data, route):
                    encoded.append((len(good), data))
                else:
                    img = decode(data, route, self.decoder)
                    ready.append((len(good), crop_resize_flip(img, boxes[j], bool(flips[j]), self.img_size)))
                good.append(j)
            except Exception:  # changed or unreadable since validation: skipped and counted, never fatal
                failed.append(self.index.key(i))
        if not good:
            return None, None, None, failed
        crops = batch_tensor((len(ready), 3, self.img_size, self.img_size))
        for k, (_, img) in enumerate(ready):
            crops[k].copy_(img)
        # The encoded files as one buffer + offsets: one tensor crosses from the worker, not one per file (the transfer
        # alone, 64 files of ~110 KB, 2 workers on a 2-core CPU: 122 batches/s against 26); the consumer slices it into
        # views for the decoder.
        sizes = np.fromiter((len(d) for _, d in encoded), dtype=np.int64, count=len(encoded))
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        buffer = batch_tensor((int(offsets[-1]),))
        view = buffer.numpy()
        for k, (_, data) in enumerate(encoded):
            view[offsets[k] : offsets[k + 1]] = np.frombuffer(data, dtype=np.uint8)
        payload = {
            "encoded": buffer, "encoded_offsets": torch.from_numpy(offsets), "encoded_at": [p for p, _ in encoded],
            "ready": crops, "ready_at": [p for p, _ in ready],
            "boxes": torch.from_numpy(np.asarray(boxes)[good].astype(np.int32)),
            "flips": torch.from_numpy(np.asarray(flips)[good].astype(np.int32)),
        }  # fmt: skip
        return payload, torch.from_numpy(self.index.labels[ids[good]]), torch.from_numpy(ids[good]), failed


def _torchcodec_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchcodec.decoders import decode_jpeg

    return decode_jpeg(data, mode="RGB", device=device)  # one nvJPEG call for the list (hardware engine on H100/H200)


def _torchvision_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


_BATCH_DECODERS = {"torchcodec": _torchcodec_batch, "torchvision": _torchvision_batch}
_CHOSEN: dict[str, tuple[str | None, str]] = {}  # device -> (decoder name or None, what was tried and why not)


def _tiny_jpeg() -> torch.Tensor:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def batch_jpeg_decoder(device: torch.device) -> tuple[str | None, str]:
    """(the library that decodes the GPU route's batches on ``device``, or None; why the others were passed over):
    TorchCodec, then torchvision (``FASTMAE_DECODER`` names one), each tried once on a tiny JPEG there."""
    key = str(device)
    if key not in _CHOSEN:
        forced = os.environ.get("FASTMAE_DECODER", "auto")
        order = [resolve_decoder(forced)] if forced in _BATCH_DECODERS else list(_BATCH_DECODERS)
        skipped = []
        for name in order:
            try:
                _BATCH_DECODERS[name]([_tiny_jpeg()], device)
            except Exception as exc:  # not installed, no nvJPEG in this build, a driver problem, ...
                skipped.append(f"{name}: {one_line(exc, typed=True, limit=120)}")
                continue
            _CHOSEN[key] = (name, "; ".join(skipped))
            break
        else:
            _CHOSEN[key] = (None, "; ".join(skipped))
    return _CHOSEN[key]


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The batch decoded on ``device`` in one call by :func:`batch_jpeg_decoder`'s library."""
    name, why = batch_jpeg_decoder(device)
    if name is None:
        raise RuntimeError(f"no JPEG decoder runs on {device} ({why})")
    return _BATCH_DECODERS[name](data, device)


def gpu_loader_unavailable_reason(device: torch.device) -> str | None:
    """Why ``--loader gpu`` cannot decode on ``device``, or None (a tiny JPEG decoded there once). ``cuda`` with
    no index is the current one; the run context gives every rank its own, ``cuda:LOCAL_RANK``."""
    if device.type != "cuda":
        return f"it decodes on a CUDA device (this run is on {device.type})"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name, why = batch_jpeg_decoder(device)
    if name is None:
        return f"neither TorchCodec nor torchvision decodes JPEGs on {device} ({why})"
    return None


class CudaStreams:
    """The CUDA calls of the GPU loader's pipeline, in one place: a side stream, running the producer on it, an event
    after each batch's kernel, and handing a batch over to the step's stream (it waits for the event; the batch's
    memory is kept from reuse until the step's stream is done with it). The tests put a stand-in here to run
    :meth:`GPULoader._ahead` on a CPU (producer thread, events, ``record_stream``, shutdown, errors)."""

    def side_stream(self, device: torch.device):
        return torch.cuda.Stream(device)

    @contextlib.contextmanager
    def running_on(self, device: torch.device, stream):
        with torch.cuda.device(device), torch.cuda.stream(stream):
            yield

    def event_after(self, stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def hand_over(self, imgs: torch.Tensor, event, device: torch.device) -> None:
        current = torch.cuda.current_stream(device)
        current.wait_event(event)  # the step's stream waits for the kernel, the host does not
        imgs.record_stream(current)  # not reused by the side stream before the step is done with it


class GPULoader(TorchvisionLoader):
    """The pretrain pipeline with decoding and augmentation on the GPU (see the module docstring). Same interface,
    order, boxes and resumability as :class:`TorchvisionLoader`, whose worker handling it keeps; batches are
    normalised float32 on ``device``."""

    name = "gpu"
    AHEAD = 2  # batches transformed ahead of the step
    streams = CudaStreams()

    def __init__(self, index, img_size, batch_size, seed, device: torch.device, num_workers=0, rank=0, world=1,
                 augment: Augment = RECIPE, decoder=_decode_jpegs):  # fmt: skip
        self.device, self.decoder = torch.device(device), decoder
        self.routes = {"gpu": 0, "cpu": 0, "cpu_after_gpu_failed": 0}
        super().__init__(index, img_size, batch_size, seed, num_workers, pin=self.device.type == "cuda",
                         pipeline="pretrain", rank=rank, world=world, augment=augment)  # fmt: skip
        self.dataset = EncodedFiles(index, "pretrain", img_size, seed, augment)
        self.loader = self._data_loader()
        self.stream = self.streams.side_stream(self.device) if self.device.type == "cuda" else None

    @property
    def decoders(self) -> dict[str, str]:
        """``{route: decoder}``: the batched decode of baseline RGB JPEGs on the device, then what the workers use
        for every other file (the torchvision loader's decoders)."""
        if self.decoder is _decode_jpegs:
            name, _ = batch_jpeg_decoder(self.device)
            from importlib.metadata import version

            batch = f"{name} {version(name).split('+')[0]}, batched" if name else "none"
        else:
            batch = getattr(self.decoder, "__name__", type(self.decoder).__name__)
        on = f"jpeg on {self.device} (baseline, 3 channels, no EXIF orientation)"
        return {on: batch, **{f"{k} in the workers": v for k, v in super().decoders.items()}}

    # ------------------------------------------------------------------------------------ on the side stream
    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each file decoded on the device, or None where it could not be (the batch again one by one after a
        batched failure)."""
        try:
            return list(self.decoder(data, self.device))
        except Exception:
            out = []
            for d in data:
                try:
                    out.append(self.decoder([d], self.device)[0])
                except Exception:
                    out.append(None)
            return out

    def transform(self, payload: dict) -> tuple[torch.Tensor, list[int]]:
        """(normalised float32 [n, 3, S, S] on the device, positions kept): decode, crop, flip, resize, normalise."""
        S = self.img_size
        n = len(payload["encoded_at"]) + len(payload["ready_at"])
        out = torch.empty(n, 3, S, S, dtype=torch.float32, device=self.device)
        lost = []
        offsets = payload["encoded_offsets"].tolist()
        files = [payload["encoded"][a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]  # views
        if files:
            if self.stream is not None:
                self.stream.synchronize()  # torchvision#9606: nothing of ours pending when nvJPEG allocates
            decoded = self._decode(files)
            at, imgs = [], []
            for k, (pos, img) in enumerate(zip(payload["encoded_at"], decoded, strict=True)):
                if img is not None and img.shape[0] == 3:
                    at.append(pos)
                    imgs.append(img)
                    continue
                try:  # the CPU decodes what the GPU could not
                    box, flip = payload["boxes"][pos].tolist(), bool(payload["flips"][pos])
                    img = decode(files[k].numpy().tobytes(), JPEG, self.dataset.decoder)
                    cpu = crop_resize_flip(img, box, flip, S)
                    out[pos] = normalize(cpu.to(self.device))
                    self.routes["cpu_after_gpu_failed"] += 1
                except Exception:
                    lost.append(pos)
            if imgs:
                from fastmae.kernels.crop_resize import crop_resize_normalize

                idx = torch.tensor(at)
                out[idx.to(self.device)] = crop_resize_normalize(imgs, payload["boxes"][idx], payload["flips"][idx], S)
                self.routes["gpu"] += len(imgs)
        if payload["ready_at"]:
            ready = payload["ready"].to(self.device, non_blocking=True)
            out[torch.tensor(payload["ready_at"], device=self.device)] = normalize(ready)
            self.routes["cpu"] += len(payload["ready_at"])
        gone = set(lost)
        keep = [p for p in range(n) if p not in gone]
        return (out if not lost else out[torch.tensor(keep, device=self.device)]), keep

    def _transformed(self, epoch: int, start_batch: int):
        """The worker batches of :meth:`TorchvisionLoader._batches`, transformed on the device."""
        for b, payload, labels, ids in super()._batches(epoch, start_batch):
            if payload is None:  # every file of the batch failed in the workers (already counted)
                yield b, None, None, None
                continue
            imgs, keep = self.transform(payload)
            if len(keep) < len(ids):
                self._record_failures([self.index.key(int(ids[p])) for p in range(len(ids)) if p not in keep])
                labels, ids = labels[keep], ids[keep]
            if not len(keep):
                yield b, None, None, None
                continue
            yield b, imgs, labels, ids

    def _batches(self, epoch: int, start_batch: int):
        """The transformed batches (on a GPU from a producer thread, :meth:`_ahead`). A failure of the pipeline is one
        line (:class:`RunFault`: the run saves and says it), not a traceback out of a thread."""
        try:
            yield from (self._transformed(epoch, start_batch) if self.stream is None else
                        self._ahead(epoch, start_batch))  # fmt: skip
        except RunFault:
            raise
        except Exception as exc:
            raise RunFault(f"--loader gpu: the GPU pipeline failed after batch {self.reached[1]} of epoch "
                           f"{self.reached[0]} ({one_line(exc, last=True, typed=True)}); --loader torchvision runs "
                           "without it") from exc  # fmt: skip

    def _ahead(self, epoch: int, start_batch: int):
        ready: queue.Queue = queue.Queue(maxsize=self.AHEAD)
        stop = threading.Event()

        def produce():
            try:
                with self.streams.running_on(self.device, self.stream):
                    for item in self._transformed(epoch, start_batch):
                        event = self.streams.event_after(self.stream)
                        while not stop.is_set():
                            with contextlib.suppress(queue.Full):
                                ready.put((item, event), timeout=0.1)
                                break
                        if stop.is_set():
                            return
                ready.put((None, None))
            except BaseException as exc:  # raised again in the consumer, where the run handles it
                ready.put((exc, None))

        thread = threading.Thread(target=produce, name="fastmae-gpu-loader", daemon=True)
        thread.start()
        try:
            while True:
                item, event = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                b, imgs, labels, ids = item
                if imgs is not None:
                    self.streams.hand_over(imgs, event, self.device)
                yield b, imgs, labels, ids
        finally:
            stop.set()
            while thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    ready.get(timeout=0.1)
            thread.join()
