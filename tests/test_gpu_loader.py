"""--loader gpu on a CPU: the fused crop / flip / resize / normalise kernel under the Triton interpreter against its
float64 reference and the CPU pipeline on the same boxes, and the whole loader (byte-reading workers, the decode,
the kernel, the CPU route for PNG / CMYK / greyscale / progressive / broken files) against the torchvision loader."""

import io
import json
import logging
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from fastmae.kernels.crop_resize import crop_resize_normalize, crop_resize_normalize_reference
from fastmae.train.data import index_data
from fastmae.train.data.decode import IMAGENET_STD, JPEG, crop_resize_flip, normalize
from fastmae.train.data.gpu_loader import GPULoader, gpu_decodable, gpu_loader_unavailable_reason, jpeg_kind
from fastmae.train.data.loaders import TorchvisionLoader
from PIL import Image

from fastmae import FastMAEError

STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _levels(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two normalised batches in 8-bit levels."""
    return ((a - b) * STD * 255).abs().max().item()


def _cpu(imgs, boxes, flips, size):
    """The torchvision loader's uint8 crop / resize / flip on the same boxes, normalised."""
    return torch.stack([normalize(crop_resize_flip(i, b, bool(f), size)) for i, b, f in zip(imgs, boxes, flips,
                                                                                            strict=True)])


def _photo(h: int, w: int, seed: int) -> torch.Tensor:
    """A smooth random image (photo-like: neighbouring pixels correlate), uint8 [3, h, w]."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(h // 4, 2), max(w // 4, 2), generator=g) * 255
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear")[0].round().to(torch.uint8)


# (height, width, box (x, y, w, h), flip): shrink, enlarge, a 1-pixel-wide crop, odd sizes, the whole image
CASES = [(40, 30, (2, 3, 25, 30), 0), (23, 50, (0, 0, 50, 23), 1), (17, 17, (1, 1, 5, 7), 1),
         (64, 48, (0, 0, 48, 64), 0), (31, 97, (60, 2, 1, 29), 0), (50, 50, (7, 9, 33, 21), 1)]  # fmt: skip


@pytest.mark.parametrize("size", [16, 13])
def test_kernel_matches_its_reference_and_the_cpu_pipeline(size):
    imgs = [_photo(h, w, k) for k, (h, w, _, _) in enumerate(CASES)]
    boxes, flips = [c[2] for c in CASES], [c[3] for c in CASES]
    out = crop_resize_normalize(imgs, boxes, flips, size)
    assert out.shape == (len(CASES), 3, size, size) and out.dtype == torch.float32
    ref = crop_resize_normalize_reference(imgs, boxes, flips, size)
    assert _levels(out, ref) < 1e-3  # the same arithmetic in float32 vs float64
    cpu = _cpu(imgs, boxes, flips, size)
    assert _levels(out, cpu) <= 3  # Pillow's fixed-point uint8 passes vs float
    assert torch.equal(out, crop_resize_normalize(imgs, boxes, flips, size))  # deterministic


def test_kernel_on_noise_stays_within_a_few_levels():
    """The hardest input for the rounding difference: pure noise, strongly shrunk and enlarged."""
    g = torch.Generator().manual_seed(3)
    imgs = [torch.randint(0, 256, (3, 60, 45), dtype=torch.uint8, generator=g) for _ in range(2)]
    boxes, flips = [(0, 0, 45, 60), (10, 10, 6, 5)], [1, 0]
    out = crop_resize_normalize(imgs, boxes, flips, 12)
    cpu = _cpu(imgs, boxes, flips, 12)
    assert _levels(out, cpu) <= 3


def test_kernel_input_checks_are_one_line():
    img = torch.zeros(3, 10, 10, dtype=torch.uint8)
    with pytest.raises(FastMAEError, match="a crop box lies outside its image"):
        crop_resize_normalize([img], [(5, 5, 6, 2)], [0], 8)
    with pytest.raises(FastMAEError, match=r"images must be uint8 \[3, H, W\]"):
        crop_resize_normalize([img.float()], [(0, 0, 4, 4)], [0], 8)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder of 16 small photos-like images: baseline RGB JPEGs, and one each of PNG, CMYK JPEG, greyscale JPEG,
    progressive JPEG and a baseline RGB JPEG with an EXIF orientation; returns (folder, {name: kind})."""
    root = tmp_path_factory.mktemp("mixed")
    kinds = {}
    for k in range(16):
        arr = _photo(36 + 3 * k, 48 - k, k).permute(1, 2, 0).numpy()
        img = Image.fromarray(arr)
        name, data = f"{k:02d}.jpg", _jpeg(img)
        if k == 3:
            name, buf = f"{k:02d}.png", io.BytesIO()
            img.save(buf, format="PNG")
            data = buf.getvalue()
        elif k == 5:
            data = _jpeg(img.convert("CMYK"))
        elif k == 7:
            data = _jpeg(img.convert("L"))
        elif k == 9:
            data = _jpeg(img, progressive=True)
        elif k == 11:
            exif = Image.Exif()
            exif[0x0112] = 8
            data = _jpeg(img, exif=exif.tobytes())
        (root / name).write_bytes(data)
        kinds[name] = {3: "png", 5: "cmyk", 7: "grey", 9: "progressive", 11: "exif"}.get(k, "baseline")
    return root, kinds


def test_jpeg_headers_tell_baseline_rgb_from_the_rest(mixed):
    root, kinds = mixed
    for name, kind in kinds.items():
        got = jpeg_kind((root / name).read_bytes())
        expected = {"baseline": ("baseline", 3), "cmyk": ("baseline", 4), "grey": ("baseline", 1),
                    "progressive": ("progressive", 3), "png": None, "exif": ("baseline", 3)}[kind]  # fmt: skip
        assert got == expected, name
        assert gpu_decodable((root / name).read_bytes(), JPEG) == (kind == "baseline"), name
    assert jpeg_kind(b"\xff\xd8\xff") is None and jpeg_kind(b"") is None


def _cpu_decoder(data, device):
    from torchvision.io import ImageReadMode, decode_jpeg

    return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_loader_gives_the_torchvision_loaders_batches(mixed, workers):
    """Two epochs, batch 4, 24 px: the same samples in the same order with the same boxes as the torchvision loader,
    pixels within 3 levels; the baseline JPEGs went through the batched decode (TorchCodec's, its CPU form here) and
    the kernel, the 5 others (the EXIF-oriented one too) through the CPU route, counted."""
    root, _ = mixed
    index = index_data(root)
    ref = TorchvisionLoader(index, 24, 4, seed=1, num_workers=0)
    gpu = GPULoader(index, 24, 4, seed=1, device=torch.device("cpu"), num_workers=workers)
    assert list(gpu.decoders.items())[0] == ("jpeg on cpu (baseline, 3 channels, no EXIF orientation)",
                                             f"torchcodec {version('torchcodec').split('+')[0]}, batched")
    for epoch in (0, 1):
        for a, b in zip(ref.epoch(epoch), gpu.epoch(epoch), strict=True):
            assert b.images.dtype == torch.float32 and torch.equal(a.labels, b.labels)
            assert torch.equal(a.ids, b.ids) and a.position == b.position
            assert _levels(b.images, normalize(a.images)) <= 3
        assert b.position == a.position == (epoch, 4)
    assert gpu.routes == {"gpu": 2 * 11, "cpu": 2 * 5, "cpu_after_gpu_failed": 0}
    resumed = list(gpu.epoch(1, start_batch=2))  # resumable like the others
    assert len(resumed) == 2 and resumed[-1].position == (1, 4)


def test_files_the_device_cannot_decode_go_to_the_cpu_or_are_skipped(mixed, tmp_path):
    """A decoder that fails on some files (as nvJPEG on an odd JPEG): those are decoded on the CPU instead; a file
    broken after validation is skipped and counted; nothing raises."""
    root, _ = mixed
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(root.iterdir()):
        (folder / p.name).write_bytes(p.read_bytes())
    index = index_data(folder)
    (folder / "00.jpg").write_bytes((folder / "00.jpg").read_bytes()[:200])  # broken since validation
    refuse = (folder / "01.jpg").read_bytes()

    def picky(data, device):
        if any(d.numpy().tobytes() == refuse for d in data):
            raise RuntimeError("nvjpeg: unsupported")
        return _cpu_decoder(data, device)

    gpu = GPULoader(index, 16, 4, seed=0, device=torch.device("cpu"), num_workers=0, decoder=picky)
    seen = sum(len(batch.ids) for batch in gpu.epoch(0))
    assert seen == 15 and any("00.jpg" in k for k in gpu.skipped)
    assert gpu.routes["cpu_after_gpu_failed"] == 1 and gpu.routes["cpu"] == 5 and gpu.routes["gpu"] == 9


def test_explicit_gpu_loader_on_a_cpu_says_why():
    assert gpu_loader_unavailable_reason(torch.device("cpu")) == "it decodes on a CUDA device (this run is on cpu)"


def test_batch_decoder_choice_falls_back_and_says_why(monkeypatch):
    """TorchCodec first, torchvision when TorchCodec cannot decode on the device, none (with both reasons) when
    neither can; FASTMAE_DECODER=torchvision forces torchvision."""
    from fastmae.train.data import gpu_loader as gl

    def broken(data, device):
        raise RuntimeError("nvjpeg: not in this build")

    cpu = torch.device("cpu")
    monkeypatch.setattr(gl, "_CHOSEN", {})
    assert gl.batch_jpeg_decoder(cpu) == ("torchcodec", "")
    monkeypatch.setattr(gl, "_CHOSEN", {})
    monkeypatch.setitem(gl._BATCH_DECODERS, "torchcodec", broken)
    assert gl.batch_jpeg_decoder(cpu) == ("torchvision", "torchcodec: RuntimeError: nvjpeg: not in this build")
    monkeypatch.setattr(gl, "_CHOSEN", {})
    monkeypatch.setitem(gl._BATCH_DECODERS, "torchvision", broken)
    name, why = gl.batch_jpeg_decoder(cpu)
    assert name is None and why.count("nvjpeg: not in this build") == 2
    with pytest.raises(RuntimeError, match="no JPEG decoder runs on cpu"):
        gl._decode_jpegs([gl._tiny_jpeg()], cpu)
    monkeypatch.undo()
    monkeypatch.setattr(gl, "_CHOSEN", {})
    monkeypatch.setenv("FASTMAE_DECODER", "torchvision")
    assert gl.batch_jpeg_decoder(cpu) == ("torchvision", "")


def test_loader_gpu_where_it_cannot_run_is_one_line(tmp_path, capsys):
    from fastmae.train.data import resolve_loader

    from fastmae.cli import main

    code = main(["pretrain", "--loader", "gpu", "--device", "cpu", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["fastmae: error: --loader gpu: it decodes on a CUDA device (this run is on cpu)"]
    assert resolve_loader("auto", torch.device("cpu")) == "torchvision"
    assert not (tmp_path / "run").exists()


def test_a_batch_whose_every_file_broke_is_skipped_not_a_crash(mixed, tmp_path):
    root, _ = mixed
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(root.iterdir()):
        (folder / p.name).write_bytes(p.read_bytes())
    index = index_data(folder)
    for p in folder.iterdir():
        p.write_bytes(b"")  # every file unreadable since validation
    gpu = GPULoader(index, 16, 4, seed=0, device=torch.device("cpu"), num_workers=0, decoder=_cpu_decoder)
    assert list(gpu.epoch(0)) == [] and len(gpu.skipped) == 16 and gpu.reached == (0, 4)


def test_a_failing_gpu_pipeline_is_one_line(mixed, monkeypatch):
    """An error inside the pipeline (here: the kernel step raising what a broken GPU raises) reaches the loop as one
    RunFault line naming the loader and where it stopped, not a traceback out of the producer thread."""
    from fastmae.errors import RunFault

    index = index_data(mixed[0])
    gpu = GPULoader(index, 16, 4, seed=0, device=torch.device("cpu"), num_workers=0, decoder=_cpu_decoder)

    def broken(payload):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")

    monkeypatch.setattr(gpu, "transform", broken)
    with pytest.raises(RunFault) as err:
        list(gpu.epoch(0))
    assert str(err.value) == ("--loader gpu: the GPU pipeline failed after batch 0 of epoch 0 (RuntimeError: Compile "
                              "with TORCH_USE_CUDA_DSA); --loader torchvision runs without it")  # fmt: skip


def test_auto_falls_back_to_torchvision_when_the_gpu_route_fails_in_its_first_batches(mixed, monkeypatch, caplog):
    """--loader auto's GPU route failing at its second batch: one warning, and the torchvision loader continues from
    that batch, so the epoch has the plain torchvision loader's samples in its order; a failure after the first
    batches is the run's."""
    from fastmae.train.data.loaders import FallbackLoader

    index = index_data(mixed[0])
    plain = TorchvisionLoader(index, 16, 4, seed=1, num_workers=0)
    expected = [(b.ids.clone(), b.position) for b in plain.epoch(0)]

    def loader(fail_at: int):
        gpu = GPULoader(index, 16, 4, seed=1, device=torch.device("cpu"), num_workers=0, decoder=_cpu_decoder)
        real, calls = gpu.transform, []

        def transform(payload):
            calls.append(1)
            if len(calls) == fail_at:
                raise RuntimeError("nvjpeg: NVJPEG_STATUS_EXECUTION_FAILED")
            return real(payload)

        monkeypatch.setattr(gpu, "transform", transform)
        return FallbackLoader(gpu, lambda: TorchvisionLoader(index, 16, 4, seed=1, num_workers=0))

    auto = loader(fail_at=2)
    with caplog.at_level("WARNING", logger="fastmae.data"):
        got = [(b.ids.clone(), b.position) for b in auto.epoch(0)]
    assert [(i.tolist(), p) for i, p in got] == [(i.tolist(), p) for i, p in expected]
    assert auto.name == "torchvision"
    assert auto.fell_back == (
        "the gpu loader failed at batch 1 of epoch 0 (RuntimeError: nvjpeg: NVJPEG_STATUS_EXECUTION_FAILED)"
    )
    assert [r.message for r in caplog.records if "--loader auto" in r.message] == [
        f"--loader auto: {auto.fell_back}; the torchvision loader continues from there"]  # fmt: skip
    late = loader(fail_at=3)
    from fastmae.errors import RunFault

    with pytest.raises(RunFault, match="the GPU pipeline failed after batch 2 of epoch 0"):
        list(late.epoch(0))


def test_loader_auto_prefers_a_loader_that_has_run_on_a_gpu(monkeypatch, caplog):
    """On CUDA, auto never picks a route that has not run on a GPU (DALI's, the GPU loader), and says so; DALI comes
    first once a sitting has run it. Availability is faked, so this runs on a CPU."""
    import fastmae.train.data as data

    cuda = torch.device("cuda")
    monkeypatch.setattr(data, "dali_unavailable_reason", lambda: "nvidia-dali is not installed")
    assert data.resolve_loader("auto", cuda) == "torchvision"
    monkeypatch.setattr(data, "dali_unavailable_reason", lambda: None)  # DALI installed and importable
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastmae.data"):
        assert data.resolve_loader("auto", cuda) == "torchvision"
        assert data.resolve_loader("auto", cuda, "finetune") == "torchvision"
    assert [r.message for r in caplog.records] == [
        "loader auto -> torchvision (skipped dali: nvidia-dali is installed, but its GPU path has not run on any GPU "
        f"yet; --loader dali chooses it{later})" for later in ("; --loader gpu (not measured faster yet) decodes on "
                                                              "the GPU without DALI", "")]  # fmt: skip
    assert data.resolve_loader("dali", cuda) == "dali"  # when asked for
    assert data.resolve_loader("auto", torch.device("cpu")) == "torchvision"
    monkeypatch.setitem(data.RAN_ON_A_GPU, "dali", "benchmarks/results/a-sitting-that-ran-it.json")
    assert data.resolve_loader("auto", cuda) == "dali"
    assert data.resolve_loader("auto", torch.device("cpu")) == "torchvision"
    assert set(data.RAN_ON_A_GPU) <= {"torchvision", "dali", "gpu"}
    for name, where in data.RAN_ON_A_GPU.items():  # each entry names a results file that exists and ran that loader
        if "a-sitting" not in where:
            assert json.loads((Path(__file__).parent.parent / where).read_text())["loader"] == name



class StandInStreams:
    """The GPU loader's CUDA calls (:class:`~fastmae.train.data.gpu_loader.CudaStreams`) on a CPU: each logged with the
    thread that made it and the stream that thread was running on."""

    def __init__(self):
        import threading

        self.log, self.lock, self.local, self.events = [], threading.Lock(), threading.local(), 0

    def _add(self, *entry):
        import threading

        with self.lock:
            self.log.append((threading.current_thread().name, *entry))

    def side_stream(self, device):
        streams = self

        class Stream:
            def synchronize(self):
                streams._add("synchronize", getattr(streams.local, "stream", None) is self)

        return Stream()

    def running_on(self, device, stream):
        import contextlib

        @contextlib.contextmanager
        def on():
            self.local.stream = stream
            self._add("running_on")
            try:
                yield
            finally:
                self.local.stream = None
                self._add("left")

        return on()

    def event_after(self, stream):
        with self.lock:
            self.events += 1
            event = self.events
        self._add("event", event, getattr(self.local, "stream", None) is stream)
        return event

    def hand_over(self, imgs, event, device):
        self._add("hand_over", event, imgs.data_ptr())


def _producer_alive() -> bool:
    import threading

    return any(t.name == "fastmae-gpu-loader" and t.is_alive() for t in threading.enumerate())


def _ahead_loader(index, streams):
    gpu = GPULoader(index, 16, 4, seed=0, device=torch.device("cpu"), num_workers=0, decoder=_cpu_decoder)
    gpu.streams, gpu.stream = streams, streams.side_stream(gpu.device)  # the CUDA path: a producer thread, ahead
    return gpu


def test_the_producer_thread_hands_each_batch_over_after_its_event(mixed):
    """GPULoader._ahead with the CUDA calls stood in: the same batches as without it, transformed in a producer
    thread running on the side stream (each decode after the side stream's synchronize), an event recorded there after
    each batch, and each batch handed over to the consumer's stream (wait on its own event, record_stream on its
    own memory) before the loop gets it; the thread is gone at the epoch's end."""
    index = index_data(mixed[0])
    plain = list(GPULoader(index, 16, 4, seed=0, device=torch.device("cpu"), num_workers=0,
                           decoder=_cpu_decoder).epoch(0))  # fmt: skip
    streams = StandInStreams()
    got = []
    for batch in _ahead_loader(index, streams).epoch(0):
        got.append((batch, batch.images.data_ptr()))
    assert len(got) == len(plain) == 4 and not _producer_alive()
    for a, (b, _) in zip(plain, got, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.ids, b.ids) and a.position == b.position
    log = streams.log
    producer = {who for who, *_ in log if who != "MainThread"}
    assert producer == {"fastmae-gpu-loader"}
    events = [(i, e) for i, (who, what, *e) in enumerate(log) if what == "event"]
    handed = [(i, e) for i, (who, what, *e) in enumerate(log) if what == "hand_over"]
    assert [e[0] for _, e in events] == [1, 2, 3, 4] and all(on_side for _, (_, on_side) in events)
    assert all(log[i][0] == "fastmae-gpu-loader" for i, _ in events)
    assert [e for _, (e, _) in handed] == [1, 2, 3, 4] and all(log[i][0] == "MainThread" for i, _ in handed)
    assert [ptr for _, (_, ptr) in handed] == [ptr for _, ptr in got]  # record_stream on the batch the loop got
    for (ie, _), (ih, _) in zip(events, handed, strict=True):
        assert ie < ih  # recorded before it is waited on
    syncs = [(i, on_side) for i, (who, what, *rest) in enumerate(log) if what == "synchronize"
             for on_side in rest]  # fmt: skip
    assert len(syncs) == 4 and all(on_side and log[i][0] == "fastmae-gpu-loader" for i, on_side in syncs)
    assert all(s < e for (s, _), (e, _) in zip(syncs, events, strict=True))  # each event after its batch's work
    assert log[0][1] == "running_on" and log[-1][1] in ("left", "hand_over")


def test_the_producer_stops_when_the_loop_stops_early_or_the_pipeline_fails(mixed, monkeypatch):
    """A consumer that stops after one batch (the producer blocked on a full queue, AHEAD batches ready) ends the
    producer thread, which leaves the side stream; an error in the producer reaches the loop as one RunFault line
    after the batches before it, and the thread is gone."""
    import time

    from fastmae.errors import RunFault

    index = index_data(mixed[0])
    streams = StandInStreams()
    gpu = _ahead_loader(index, streams)
    epoch = gpu.epoch(0)
    next(epoch)
    time.sleep(0.3)  # the producer fills the queue and waits
    t0 = time.monotonic()
    epoch.close()
    assert time.monotonic() - t0 < 5 and not _producer_alive()
    assert [what for _, what, *_ in streams.log].count("hand_over") == 1 and streams.log[-1][1] == "left"

    streams = StandInStreams()
    gpu = _ahead_loader(index, streams)
    transform, calls = gpu.transform, []

    def fails_second(payload):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return transform(payload)

    monkeypatch.setattr(gpu, "transform", fails_second)
    got = []
    with pytest.raises(RunFault, match=r"^--loader gpu: the GPU pipeline failed after batch 1 of epoch 0 "
                                       r"\(RuntimeError: CUDA error: an illegal memory access"):  # fmt: skip
        for batch in gpu.epoch(0):
            got.append(batch)
    assert len(got) == 1 and not _producer_alive()
    assert [what for _, what, *_ in streams.log].count("hand_over") == 1
