"""Data: the validated index (folders, tar shards), every image mode, sharding, resumable order, and the DALI
pipelines (CPU form, the same definition that decodes on the GPU) against the torchvision loader."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from fastmae.train.data import decode as decode_mod
from fastmae.train.data.dali import DALILoader, build_pipeline, eval_geometry
from fastmae.train.data.decode import IMAGENET_MEAN, IMAGENET_STD, JPEG, PNG, TORCHVISION, decode, load_rgb
from fastmae.train.data.index import index_data
from fastmae.train.data.index_build import expand_braces
from fastmae.train.data.loaders import ImageFiles, TorchvisionLoader, eval_transform, model_input
from fastmae.train.data.order import ShardedOrder, augment_params, random_resized_crop
from PIL import Image

from fastmae import FastMAEError

CPU = torch.device("cpu")
BROKEN = ["empty.jpg", "garbage.jpg", "truncated.jpg", "truncated.png"]
LO = [(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
HI = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]


def make_mixed_folder(root):
    """Valid images in every mode a data set throws at a loader, broken files, and a file that is no image."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)

    def photo(h, w):  # smooth content, so resampling differences stay small
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x / max(w, 1), y / max(h, 1), (x + y) / max(w + h, 1)], -1) * 200 + 20
        return (base + rng.normal(0, 3, base.shape)).clip(0, 255).astype(np.uint8)

    Image.fromarray(photo(40, 52)).save(root / "rgb.jpg", quality=95)
    Image.fromarray(photo(44, 36)[..., 0]).save(root / "grey.jpg", quality=95)
    Image.fromarray(photo(38, 46)).save(root / "progressive.jpg", quality=95, progressive=True)
    # An EXIF orientation of 6 (rotate 90 to display): TorchCodec applies it by itself, no fastmae route does.
    Image.fromarray(photo(30, 50)).save(root / "exif-rotated.jpg", quality=95, exif=_orientation_exif(6))
    Image.fromarray(photo(36, 48)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    Image.fromarray(np.dstack([photo(30, 34), rng.integers(0, 255, (30, 34), dtype=np.uint8)])).save(root / "rgba.png")
    Image.fromarray(photo(33, 41)).convert("P").save(root / "palette.png")
    Image.fromarray(photo(33, 41)).convert("P").save(root / "palette-alpha.png", transparency=0)
    Image.fromarray(photo(38, 30)[..., 1].astype(np.uint16) * 257).save(root / "deep16.png")
    Image.fromarray(photo(40, 40)[..., 0], "L").convert("LA").save(root / "grey-alpha.png")
    Image.fromarray(photo(1, 1)).save(root / "tiny.png")
    Image.fromarray(photo(1, 1)).save(root / "tiny.jpg")
    Image.fromarray(photo(3, 300)).save(root / "wide.png")
    Image.fromarray(photo(290, 4)).save(root / "tall.jpg")
    Image.fromarray(photo(32, 32)).save(root / "anim.gif")
    Image.fromarray(photo(32, 32)).save(root / "lossless.webp", lossless=True)
    Image.fromarray(photo(32, 32)).save(root / "plain.bmp")
    Image.fromarray(photo(32, 32)).save(root / "scan.tif")
    (root / "empty.jpg").write_bytes(b"")
    (root / "garbage.jpg").write_bytes(rng.bytes(700))
    good = (root / "rgb.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    png = (root / "rgba.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"ignored: hidden")
    return root


VALID = 18
DECODERS = ("torchcodec", "torchvision", "pillow")


def _orientation_exif(value: int, order: str = "MM") -> bytes:
    """An APP1 EXIF block holding only IFD0's orientation tag, in either byte order."""
    if order == "MM":
        exif = Image.Exif()
        exif[0x0112] = value
        return exif.tobytes()
    e = "<"
    import struct

    return b"Exif\x00\x00II*\x00" + struct.pack(e + "IH", 8, 1) + struct.pack(e + "HHIHH", 0x0112, 3, 1, value, 0) + (
        b"\x00" * 4)  # fmt: skip


@pytest.fixture
def mixed(tmp_path):
    return make_mixed_folder(tmp_path / "mixed")


@pytest.fixture(scope="module")
def photos():
    return index_data(None)


def test_index_keeps_every_mode_and_skips_exactly_the_broken_files(mixed):
    index = index_data(mixed)
    assert len(index) == VALID
    assert sorted(k.rsplit("/", 1)[-1] for k, _ in index.bad) == sorted(BROKEN)
    names = [k.rsplit("/", 1)[-1] for k in index.keys]
    assert "notes.txt" not in names and ".hidden.jpg" not in names
    for i in range(len(index)):
        img = load_rgb(index.read(i))
        assert img.mode == "RGB" and img.size == (index.widths[i], index.heights[i]), names[i]
    # Alpha, GIF and 16-bit-in-TIFF-like cases go through PIL; plain JPEG/PNG are DALI-native.
    native = {name: index.native(i) for i, name in enumerate(names)}
    assert native["rgb.jpg"] and native["cmyk.jpg"] and native["deep16.png"] and native["palette.png"]
    assert not native["rgba.png"] and not native["palette-alpha.png"] and not native["anim.gif"]


def test_missing_and_empty_sources_are_one_line_errors(tmp_path):
    with pytest.raises(FastMAEError, match=f"--data {tmp_path / 'nope'} does not exist"):
        index_data(tmp_path / "nope")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.txt").write_text("x")
    with pytest.raises(FastMAEError, match="no images under"):
        index_data(tmp_path / "e")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(FastMAEError, match=r"^the only image under .*b does not decode \(.*x\.jpg: .*\); replace it, "
                       "or point --data at images that decode$"):  # fmt: skip
        index_data(tmp_path / "b")
    (tmp_path / "b" / "y.png").write_bytes(b"junk too")
    with pytest.raises(FastMAEError, match=r"^none of the 2 images under .*b decodes \(e\.g\. .*: .*\); replace them"):
        index_data(tmp_path / "b")
    with pytest.raises(FastMAEError, match=r"2 shard\(s\) do not exist"):
        index_data(str(tmp_path / "s-{0..1}.tar"))


def test_expand_braces():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{train,val}/{8..10}") == ["train/8", "train/9", "train/10", "val/8", "val/9", "val/10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def _write_shards(folder, photos, per_shard=5):
    """webdataset-style shards: key.jpg + key.cls per sample, in folders inside the tar."""
    folder.mkdir()
    labels = {}
    for s in range(2):
        with tarfile.open(folder / f"train-{s:03d}.tar", "w") as tar:
            for j in range(per_shard):
                i = s * per_shard + j
                buf = io.BytesIO()
                load_rgb(photos.read(i)).save(buf, format="JPEG", quality=90)
                for name, data in ((f"part/s{i:04d}.jpg", buf.getvalue()), (f"part/s{i:04d}.cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                labels[f"s{i:04d}"] = i % 3
            bad = tarfile.TarInfo("part/broken.png")
            bad.size = 9
            tar.addfile(bad, io.BytesIO(b"not a png"))
    return labels


def test_webdataset_shards_folder_tar_and_pattern(tmp_path, photos):
    labels = _write_shards(tmp_path / "shards", photos)
    by_pattern = index_data(str(tmp_path / "shards" / "train-{000..001}.tar"))
    by_folder = index_data(tmp_path / "shards")
    one = index_data(tmp_path / "shards" / "train-001.tar")
    assert len(by_pattern) == len(by_folder) == 10 and len(one) == 5
    assert len(by_folder.bad) == 2 and all(k.endswith("broken.png") for k, _ in by_folder.bad)
    assert list(by_pattern.keys) == list(by_folder.keys)
    got = {k.rsplit("/", 1)[-1].split(".")[0]: int(y) for k, y in zip(by_folder.keys, by_folder.labels, strict=True)}
    assert got == labels
    dali = DALILoader(by_folder, 32, 5, seed=0, device=CPU, num_threads=1)
    tv = TorchvisionLoader(by_folder, 32, 5, seed=0)
    for x, y in zip(dali.epoch(0), tv.epoch(0), strict=True):
        assert torch.equal(x.labels, y.labels) and x.images.shape == (5, 3, 32, 32)
        assert (x.images - model_input(y.images)).abs().mean() < 0.02


def test_pretrain_pipeline_matches_torchvision_on_the_bundled_photos(photos):
    """Same crops and flips in both loaders; pixels differ only by decoder/resampler rounding."""
    dali = DALILoader(photos, 64, 4, seed=3, device=CPU, num_threads=2)
    tv = TorchvisionLoader(photos, 64, 4, seed=3)
    seen = 0
    for x, y in zip(dali.epoch(2), tv.epoch(2), strict=True):
        (a, ya), (b, yb) = (x.images, x.labels), (y.images, y.labels)
        assert a.shape == (4, 3, 64, 64) and a.dtype == torch.float32 and a.is_contiguous()
        for c in range(3):
            assert a[:, c].min() >= LO[c] - 1e-4 and a[:, c].max() <= HI[c] + 1e-4
        assert torch.equal(ya, yb) and b.dtype == torch.uint8
        b = model_input(b)
        assert (a - b).abs().mean() < 0.01 and torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.999
        seen += 1
    assert seen == dali.steps_per_epoch == len(photos) // 4


@pytest.mark.parametrize("loader", ["dali", "torchvision", "torchvision-torchvision", "torchvision-pillow"])
def test_every_mode_decodes_the_same_in_both_loaders(mixed, loader):
    """Every mode (greyscale, CMYK, progressive, EXIF-oriented, alpha, 16-bit, ...) against the Pillow reference, in
    DALI and in the torchvision loader with each decoder (TorchCodec by default)."""
    index = index_data(mixed)
    make = {
        "dali": lambda: DALILoader(index, 24, VALID, seed=0, device=CPU, num_threads=1, pipeline="eval"),
        "torchvision": lambda: TorchvisionLoader(index, 24, VALID, seed=0, pipeline="eval"),
    }.get(loader, lambda: TorchvisionLoader(index, 24, VALID, seed=0, pipeline="eval"))
    made = make()
    if loader.startswith("torchvision-"):
        made.dataset.decoder = loader.split("-", 1)[1]
    (batch,) = list(made.epoch(0))
    imgs = model_input(batch.images)
    tf = eval_transform(24)
    expected = torch.stack([tf(load_rgb(index.read(i))) for i in range(len(index))])
    err = (imgs - expected).abs().flatten(1).mean(1)
    assert err.max() < 0.03, dict(zip(index.keys, err.tolist(), strict=True))


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_gives_exactly_what_pillow_decodes(photos, mixed, decoder):
    """The JPEG and 8-bit PNG routes (TorchCodec, torchvision.io, or Pillow itself) give Pillow's pixels bit for bit,
    greyscale and progressive JPEGs included; every other file (CMYK, alpha, 16-bit, ...) goes through Pillow."""
    routes = set()
    for index in (photos, index_data(mixed)):
        for i in range(len(index)):
            data, route = index.read(i), int(index.routes[i])
            routes.add(route)
            want = torch.from_numpy(np.array(load_rgb(data))).permute(2, 0, 1)
            got = decode(data, route, decoder)
            assert got.dtype == torch.uint8 and torch.equal(got, want), (index.key(i), route, decoder)
    assert {JPEG, PNG} <= routes and routes - set(TORCHVISION)  # both fast routes and the Pillow ones exercised


def test_the_default_decoder_is_torchcodec_where_it_loads(monkeypatch, caplog, photos):
    """auto: TorchCodec, else torchvision, else Pillow; FASTMAE_DECODER forces one; one that cannot run is a
    one-line error; the loader names its decoders per route, and make_loader logs them."""
    from fastmae.train.data import make_loader

    assert decode_mod.resolve_decoder() == "torchcodec"  # the dev extra installs it
    monkeypatch.setenv("FASTMAE_DECODER", "pillow")
    assert decode_mod.resolve_decoder() == "pillow"
    monkeypatch.setenv("FASTMAE_DECODER", "fast")
    with pytest.raises(FastMAEError, match=r"^unknown decoder 'fast' \(FASTMAE_DECODER\); choose one of auto, "):
        decode_mod.resolve_decoder()
    monkeypatch.delenv("FASTMAE_DECODER")
    real = decode_mod._fast
    monkeypatch.setattr(decode_mod, "_fast", lambda name: "torchcodec does not import (test)" if name == "torchcodec"
                        else real(name))  # fmt: skip
    assert decode_mod.resolve_decoder() == "torchvision"
    with pytest.raises(FastMAEError, match=r"^decoder torchcodec: torchcodec does not import \(test\)$"):
        decode_mod.resolve_decoder("torchcodec")
    monkeypatch.setattr(decode_mod, "_fast", real)
    loader = TorchvisionLoader(photos, 32, 4, seed=0)
    names = loader.decoders
    assert names["jpeg"].startswith("torchcodec 0.") and names["png"].startswith("torchcodec 0.")
    assert names["jpeg with an EXIF orientation"].startswith("pillow ")
    loader.dataset.decoder = "torchvision"
    assert loader.decoders["jpeg"].startswith("torchvision ") and "jpeg with an EXIF orientation" not in loader.decoders
    assert set(TorchvisionLoader(photos, 32, 4, seed=0, pipeline="finetune").decoders.values()) == {
        decode_mod.pillow_label()}  # fmt: skip
    cfg = type("Cfg", (), {"num_workers": 0, "img_size": 32, "batch_size": 4, "seed": 0})()
    with caplog.at_level("INFO", logger="fastmae.data"):
        make_loader("torchvision", photos, "pretrain", cfg, CPU)
    assert "decoders of the torchvision loader (pretrain): jpeg -> torchcodec 0." in caplog.text


def test_exif_orientation_is_applied_by_no_route(mixed):
    """One behaviour everywhere: a JPEG's EXIF orientation is not applied (as the official MAE's Pillow ImageFolder
    and DALI with adjust_orientation=False): every decoder, in the loader too, gives the pixels as encoded, at the
    index's size, although TorchCodec alone would rotate them."""
    from torchcodec.decoders import decode_jpeg

    index = index_data(mixed)
    i = [k.rsplit("/", 1)[-1] for k in index.keys].index("exif-rotated.jpg")
    data = index.read(i)
    assert decode_mod.exif_orientation(data) == 6 and (index.widths[i], index.heights[i]) == (50, 30)
    assert decode_jpeg(data).shape == (3, 50, 30)  # TorchCodec by itself applies it: what this test guards against
    want = torch.from_numpy(np.array(load_rgb(data))).permute(2, 0, 1)
    assert want.shape == (3, 30, 50)
    for decoder in DECODERS:
        assert torch.equal(decode(data, JPEG, decoder), want), decoder
        files = ImageFiles(index, "eval", 24, seed=0)
        files.decoder = decoder
        ref = eval_transform(24)(load_rgb(data))
        assert (model_input(files.image(0, i)[None])[0] - ref).abs().max() < 0.05, decoder


def test_exif_orientation_reader():
    def jpeg(exif=None):
        buf = io.BytesIO()
        Image.new("RGB", (9, 7), (10, 20, 30)).save(buf, format="JPEG", **({"exif": exif} if exif else {}))
        return buf.getvalue()

    assert decode_mod.exif_orientation(jpeg()) == 1
    assert [decode_mod.exif_orientation(jpeg(_orientation_exif(v))) for v in (1, 3, 8)] == [1, 3, 8]
    assert decode_mod.exif_orientation(jpeg(_orientation_exif(5, "II"))) == 5
    assert Image.open(io.BytesIO(jpeg(_orientation_exif(5, "II")))).getexif()[0x0112] == 5  # Pillow reads it alike
    assert decode_mod.exif_orientation(jpeg(b"Exif\x00\x00XX garbage")) == 0  # unreadable: treated as oriented (Pillow)
    assert decode_mod.exif_orientation(b"\x89PNG\r\n") == 1 and decode_mod.exif_orientation(b"") == 1


def test_what_the_fast_decoder_refuses_pillow_decodes(photos, monkeypatch):
    """Pillow for what the chosen decoder does not decode: the same pixels; a file nothing decodes raises (the
    loaders skip and count it)."""

    def refuse(encoded, mode):
        raise RuntimeError("unsupported JPEG variant")

    monkeypatch.setattr(decode_mod, "_fast", lambda name: {JPEG: refuse, PNG: refuse, "mode": "RGB", "version": "0"})
    i = next(i for i in range(len(photos)) if int(photos.routes[i]) == JPEG)
    data = photos.read(i)
    assert torch.equal(decode(data, JPEG, "torchcodec"), torch.from_numpy(np.array(load_rgb(data))).permute(2, 0, 1))
    with pytest.raises(Exception):  # noqa: B017 - Pillow's own error, whatever it is
        decode(data[: len(data) // 3], JPEG, "torchcodec")


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_file_broken_after_validation_is_skipped_and_counted_by_every_decoder(photos, tmp_path, decoder):
    index = index_data(_copy_photos(photos, tmp_path / "p", 8))
    (tmp_path / "p" / "3.jpg").write_bytes((tmp_path / "p" / "3.jpg").read_bytes()[:300])  # truncated since
    loader = TorchvisionLoader(index, 32, 2, seed=0)
    loader.dataset.decoder = decoder
    batches = list(loader.epoch(0))
    assert loader.skipped == {str(tmp_path / "p" / "3.jpg")}
    assert sum(len(b) for b in batches) == 7


def test_loading_the_bundled_photos_prints_nothing(photos, capfd):
    """Some of scikit-image's PNGs carry an ICC profile that makes libpng warn on stderr at every decode: they take
    the Pillow route (same pixels), so an epoch of the demo data prints nothing."""
    capfd.readouterr()
    for _ in TorchvisionLoader(photos, 32, 4, seed=0).epoch(0):
        pass
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("size", [32, 224])
def test_uint8_pipeline_matches_the_pil_pipeline(photos, mixed, size):
    """Decode, crop, resize and flip on uint8 tensors against torchvision's PIL transforms on the same boxes: within
    3 levels of 255 everywhere, a few hundredths of a level on average; the eval view likewise."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    means = []
    for index in (photos, index_data(mixed)):
        train, evaluate = ImageFiles(index, "pretrain", size, seed=1), ImageFiles(index, "eval", size, seed=1)
        boxes, flips = augment_params(index, np.arange(len(index)), 1, 3, (0.2, 1.0), 0.5)
        for i in range(len(index)):
            img = load_rgb(index.read(i))
            x, y, w, h = (int(v) for v in boxes[i])
            ref = TF.resized_crop(img, y, x, h, w, [size, size], InterpolationMode.BICUBIC)
            ref = torch.from_numpy(np.array(TF.hflip(ref) if flips[i] else ref)).permute(2, 0, 1)
            diff = (train.image(3, i).int() - ref.int()).abs()
            assert diff.max() <= 3, index.key(i)
            means.append(diff.float().mean().item())
            ref_eval = eval_transform(size)(img)
            got_eval = model_input(evaluate.image(0, i)[None])[0]
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            assert ((got_eval - ref_eval).abs() * std * 255).max() <= 2.01, index.key(i)
    assert np.mean(means) < 0.05 and max(means) < 0.3


def test_eval_pipeline_equals_resize_and_centre_crop(photos):
    dali = DALILoader(photos, 48, 5, seed=0, device=CPU, num_threads=2, pipeline="eval")
    tv = TorchvisionLoader(photos, 48, 5, seed=0, pipeline="eval")
    assert dali.steps_per_epoch == -(-len(photos) // 5)  # every image once, last batch short
    batches = list(zip(dali.epoch(0), tv.epoch(0), strict=True))
    assert sum(len(a) for a, _ in batches) == len(photos)
    for a, b in batches:
        assert (a.images - model_input(b.images)).abs().mean() < 0.01
    assert eval_geometry(300, 200, 224)[0].tolist() == [384, 256]


def test_pipeline_flip_and_crop_are_exact():
    """Drive the pipeline definition directly: a crop box selects exactly those pixels; flip mirrors them."""
    h, w = 40, 60
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 4, y * 6, np.full_like(x, 128)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    enc = np.frombuffer(buf.getvalue(), np.uint8)
    box = np.array([10, 5, 16, 16], np.float32)  # x, y, w, h: resized 16 -> 16 is the identity

    def source(info):
        if info.iteration:
            raise StopIteration
        return [enc, enc], [box[:2], box[:2]], [box[2:], box[2:]], [np.int32(0), np.int32(1)]

    pipe = build_pipeline("pretrain", 16, 2, 1, None, 0, source)
    (out,) = pipe.run()
    out = torch.from_numpy(np.array(out.as_tensor()))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    want = (torch.from_numpy(img[5:21, 10:26]).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(out[0], want, atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], want.flip(-1), atol=1e-4, rtol=0)


def test_crop_and_flip_statistics():
    """Crop boxes follow torchvision's RandomResizedCrop distribution (its sampler is the reference)."""
    from torchvision.transforms import RandomResizedCrop

    rng = np.random.default_rng(0)
    boxes = np.array([random_resized_crop(rng, 500, 375) for _ in range(4000)])
    area = boxes[:, 2] * boxes[:, 3] / (500 * 375)
    aspect = boxes[:, 2] / boxes[:, 3]
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(3, 375, 500), [0.2, 1.0], [3 / 4, 4 / 3])
                    for _ in range(4000)])  # fmt: skip  # (top, left, h, w)
    ref_area = ref[:, 2] * ref[:, 3] / (500 * 375)
    assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0
    assert abs(area.mean() - ref_area.mean()) < 0.015 and abs(area.std() - ref_area.std()) < 0.015
    assert abs(np.log(aspect).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.015
    assert aspect.min() >= 0.75 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 500).all()
    assert (boxes[:, 1] + boxes[:, 3] <= 375).all()
    assert random_resized_crop(rng, 300, 3) == (148, 0, 4, 3)  # elongated: falls back to the clamped centre crop
    assert random_resized_crop(rng, 1, 1) == (0, 0, 1, 1)
    index = type("I", (), {"widths": np.full(2000, 64), "heights": np.full(2000, 48)})()
    _, flips = augment_params(index, np.arange(2000), seed=1, epoch=0)
    assert 0.45 < flips.mean() < 0.55


def test_shards_are_disjoint_cover_the_data_and_have_equal_batch_counts():
    n, world, batch = 23, 3, 2
    orders = [ShardedOrder(n, batch, seed=5, rank=r, world_size=world) for r in range(world)]
    assert {o.steps_per_epoch for o in orders} == {4}  # ceil(23 / 3) = 8 per rank -> 4 batches each
    shards = [o.shard(epoch=1) for o in orders]
    assert all(len(s) == 8 for s in shards)
    flat = np.concatenate(shards)
    assert set(flat.tolist()) == set(range(n))  # together they cover the data set
    assert len(flat) - len(set(flat.tolist())) == 1  # 24 slots for 23 samples: exactly one padded repeat
    for r, o in enumerate(orders):
        assert sum(len(b) for b in o.batches(1)) == 8
        assert np.array_equal(np.concatenate(list(o.batches(1))), shards[r])
    assert not np.array_equal(orders[0].shard(1), orders[0].shard(2))  # reshuffled every epoch
    with pytest.raises(FastMAEError, match="batch size 9 is larger than the 8 images each of 3 rank"):
        ShardedOrder(n, 9, seed=0, rank=0, world_size=3)


def test_evaluation_shards_count_every_image_once():
    """Evaluation pads nothing: metrics summed over the ranks are those of one process."""
    n, world, batch = 23, 3, 4
    orders = [ShardedOrder(n, batch, seed=5, rank=r, world_size=world, shuffle=False, drop_last=False)
              for r in range(world)]  # fmt: skip
    shards = [np.concatenate(list(o.batches(0))) for o in orders]
    assert [len(s) for s in shards] == [8, 8, 7]  # differ by at most one image
    assert [o.steps_per_epoch for o in orders] == [2, 2, 2]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))  # each image exactly once
    tiny = [ShardedOrder(2, 4, seed=0, rank=r, world_size=3, shuffle=False, drop_last=False) for r in range(3)]
    assert [t.steps_per_epoch for t in tiny] == [1, 1, 0]  # fewer images than ranks: one rank scores none


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_eval_loaders_cover_the_set_across_ranks(photos, loader):
    def make(rank, world):
        if loader == "dali":
            return DALILoader(photos, 32, 2, seed=0, device=CPU, num_threads=1, pipeline="eval", rank=rank, world=world)
        return TorchvisionLoader(photos, 32, 2, seed=0, pipeline="eval", rank=rank, world=world)

    whole = torch.cat([b.images for b in make(0, 1).epoch(0)])
    world = len(photos) + 1  # one rank more than images: the last one gets nothing and yields no batch
    parts = [list(make(r, world).epoch(0)) for r in range(world)]
    assert parts[-1] == [] and [len(p) for p in parts[:-1]] == [1] * len(photos)
    torch.testing.assert_close(torch.cat([b.images for p in parts for b in p]), whole, rtol=0, atol=0)


def test_loaders_shard_by_the_rank_the_run_context_gives(photos, monkeypatch):
    """make_loader shards by the rank and world size it is given (the run context's); a launcher's variables alone
    do not change a loader."""
    from fastmae.train.data import make_loader

    from fastmae.config import PretrainConfig

    cfg = PretrainConfig(img_size=32, batch_size=2, num_workers=0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank1, rank0 = (make_loader("torchvision", photos, "pretrain", cfg, CPU, rank, 2) for rank in (1, 0))
    assert rank1.order.rank == 1 and rank1.order.world_size == 2 and rank0.order.rank == 0
    assert rank1.steps_per_epoch == rank0.steps_per_epoch == len(photos) // 2 // 2
    assert not set(rank1.order.shard(0)) & set(rank0.order.shard(0))
    alone = make_loader("torchvision", photos, "pretrain", cfg, CPU)
    assert (alone.order.rank, alone.order.world_size) == (0, 1)


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_same_seed_same_batches_and_restart_repeats_them(photos, loader):
    def make(seed):
        if loader == "dali":
            return DALILoader(photos, 32, 3, seed=seed, device=CPU, num_threads=2)
        return TorchvisionLoader(photos, 32, 3, seed=seed)

    first = list(make(7).epoch(4))
    again = make(7)
    second = list(again.epoch(4))
    assert second[-1].position == (4, len(second))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.ids, b.ids)
    # Running on into the next epoch (DALI keeps its pipeline and prefetches across the boundary) = starting there.
    for a, b in zip(again.epoch(5), make(7).epoch(5), strict=True):
        assert torch.equal(a.images, b.images)
    restarted = make(7)
    tail = restarted.epoch(4, start_batch=5)
    for k, a in enumerate(tail, start=5):
        assert torch.equal(a.images, first[k].images)
        assert a.position == (4, k + 1)
    assert not torch.equal(next(make(8).epoch(4)).images, first[0].images)


def test_dali_survives_a_file_that_breaks_after_validation(photos, tmp_path):
    index = index_data(_copy_photos(photos, tmp_path / "p", 8))
    victim = index.keys.index(str(tmp_path / "p" / "3.jpg"))
    (tmp_path / "p" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage now")
    loader = DALILoader(index, 32, 2, seed=0, device=CPU, num_threads=1)
    batches = list(loader.epoch(0))
    assert loader.skipped == {index.keys[victim]}
    assert sum(len(b) for b in batches) == 7 and all(torch.isfinite(b.images).all() for b in batches)


def _copy_photos(photos, folder, n):
    folder.mkdir()
    for i in range(n):
        load_rgb(photos.read(i)).save(folder / f"{i}.jpg", quality=90)
    return folder


def test_finetune_augmentation_depends_only_on_the_sample(photos):
    """RandAugment + random erasing of a sample are the same in any batch, rank or restart, whatever the global
    generators hold (timm draws its RandAugment ops from NumPy's)."""
    whole = TorchvisionLoader(photos, 32, 4, seed=0, pipeline="finetune")
    first = next(whole.epoch(0))
    x, ids = first.images, first.ids.tolist()
    np.random.seed(123)
    torch.manual_seed(9)
    rank1 = TorchvisionLoader(photos, 32, 2, seed=0, pipeline="finetune", rank=1, world=2)
    batch1 = next(rank1.epoch(0))
    x1 = batch1.images
    for j, i in enumerate(batch1.ids.tolist()):  # rank 1's first batch: the 2nd and 4th of the global batch
        assert torch.equal(x1[j], x[ids.index(i)]), i


def test_finetune_pipeline_shapes_and_erasing(photos):
    dali = DALILoader(photos, 32, 4, seed=0, device=CPU, num_threads=2, pipeline="finetune")
    tv = TorchvisionLoader(photos, 32, 4, seed=0, pipeline="finetune")
    for loader in (dali, tv):
        batch = next(loader.epoch(0))
        imgs, labels = batch.images, batch.labels
        assert imgs.shape == (4, 3, 32, 32) and imgs.dtype == torch.float32 and torch.isfinite(imgs).all()
        assert labels.shape == (4,)
    assert dali.erase is not None and dali.erase.probability == 0.25 and dali.erase.mode == "pixel"


def test_dali_float16_output(photos):
    imgs = next(DALILoader(photos, 32, 2, seed=0, device=CPU, num_threads=1, dtype="float16").epoch(0)).images
    assert imgs.dtype == torch.float16


def test_dali_missing_fails_loudly_and_auto_falls_back(monkeypatch):
    from fastmae.train import data
    from fastmae.train.data import dali as dali_mod

    monkeypatch.setattr(data, "dali_unavailable_reason", lambda: "nvidia-dali is not importable (test)")
    with pytest.raises(FastMAEError, match="--loader dali: nvidia-dali is not importable"):
        data.resolve_loader("dali", CPU)
    assert data.resolve_loader("auto", torch.device("cuda")) == "torchvision"
    monkeypatch.undo()
    assert dali_mod.dali_unavailable_reason() is None
    assert data.resolve_loader("auto", CPU) == "torchvision"  # CPU: DALI only when asked for


def test_summary_names_the_loader(tmp_path, photos):
    from importlib.metadata import version

    from fastmae.cli import main

    root = _copy_photos(photos, tmp_path / "p", 6)
    code = main(["pretrain", "--model", "mae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "2",
                 "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "1", "--no-progress", "--loader", "dali",
                 "--data", str(root), "--output-dir", str(tmp_path / "o")])  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["loader"] == "dali" and summary["steps"] == 3 and summary["skipped_files"] == 0
    assert summary["decoders"] == {"jpeg": f"dali {version('nvidia-dali-cuda120')} cpu"}


def test_a_loader_worker_never_finalises_garbage_it_inherited(tmp_path):
    """Garbage in a reference cycle that the parent has not collected yet (a DALI pipeline, whose __del__ waits on
    threads a forked worker does not have) is frozen by the worker's first step, so the worker's collections never
    finalise it; the parent's still do."""
    import gc
    import os

    from fastmae.train.data.loaders import _freeze_inherited

    log = tmp_path / "finalised"

    class Finalised:
        def __del__(self):
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")

    gc.disable()
    try:
        garbage = Finalised()
        garbage.cycle = garbage
        del garbage
        pid = os.fork()
        if pid == 0:  # the worker
            _freeze_inherited(0)
            gc.collect()
            os._exit(0)
        os.waitpid(pid, 0)
        assert not log.exists()  # the worker finalised nothing it inherited
    finally:
        gc.enable()
    gc.collect()
    assert log.read_text().split() == [str(os.getpid())]
