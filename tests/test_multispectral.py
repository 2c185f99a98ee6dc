"""Multispectral data end to end: the index routes rasters (.npy, TIFF, 16-bit PNG) with their bands and dtype, the
loaders read them in their own dtype, the run's bands (selection, nodata, per-band statistics) are decided once and
bound to the checkpoint, and the downstream commands enforce them."""

import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from fastmae.train.data.decode import PNG16, RASTER
from fastmae.train.data.index import index_data
from PIL import Image

from fastmae.cli import main

from ._util import noise_pngs, resumed_run_is_bit_identical

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "make_multispectral.py"


def _example():
    spec = importlib.util.spec_from_file_location("make_multispectral", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ex():
    return _example()


def _tiles(root: Path, count: int = 8, size: int = 24, classes: int = 2, **kw) -> Path:
    """SYNTHETIC 13-band uint16 GeoTIFF tiles (examples/make_multispectral.py), ``classes`` class folders."""
    _example().generate(root, count=count, size=size, classes=classes, **kw)
    return root


# ----------------------------------------------------------------------------------------------------- the index
def test_index_routes_rasters_with_their_bands_and_skips_misfits_with_one_line(tmp_path, ex, caplog):
    root = _tiles(tmp_path / "s2", count=6)
    four = root / "water" / "zz_four.tif"
    tifffile.imwrite(four, np.ones((24, 24, 4), np.uint16), photometric="minisblack", planarconfig="contig")
    nan = root / "water" / "zz_nan.npy"
    np.save(nan, np.full((24, 24, 13), np.nan, np.float32))  # another dtype too: counted as broken (NaN-only band)
    byte = root / "water" / "zz_byte.npy"
    np.save(byte, np.ones((24, 24, 13), np.uint8))
    for folder in (root, root / "water", root / "forest"):  # written long before the run (not listed again)
        os.utime(folder, (1.6e9, 1.6e9))
    caplog.set_level(logging.INFO, "fastmae.data")
    index = index_data(root)
    assert len(index) == 6 and (index.routes == RASTER).all() and not index.rgb
    assert (index.bands, index.dtype, index.band_names) == (13, "uint16", ex.BANDS)
    assert sorted(index.bad) == sorted([
        (str(byte), "other bands: 13 uint8 bands"), (str(four), "other bands: 4 uint16 bands"),
        (str(nan), "band 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 (from 0) is NaN everywhere"),
    ])  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2 and lines[0].startswith("skipped 1 file that does not decode: ")
    assert lines[1].startswith("skipped 2 files whose bands differ from the data's (13 uint16 bands, as in ")
    assert "zz_four.tif (4 uint16 bands)" in lines[1] and "zz_byte.npy (13 uint8 bands)" in lines[1]
    assert any("indexed 6 images (13 uint16 bands)" in r.getMessage() for r in caplog.records)
    # cached: the second start validates nothing and knows the same
    again = index_data(root)
    assert again.stats["cache"] == "hit" and again.stats["validated"] == 0
    assert (again.bands, again.dtype, again.band_names) == (13, "uint16", ex.BANDS)
    assert sorted(again.bad) == sorted(index.bad)


def test_index_npy_and_16_bit_png_data_sets(tmp_path):
    npy = tmp_path / "npy"
    npy.mkdir()
    for k in range(3):
        np.save(npy / f"{k}.npy", np.full((5, 10, 12), k, np.float32))  # C x H x W (first axis smaller)
    index = index_data(npy)
    assert (index.bands, index.dtype, index.band_names, len(index)) == (5, "float32", None, 3)
    assert index.widths.tolist() == [12] * 3 and index.heights.tolist() == [10] * 3
    png = tmp_path / "png"
    png.mkdir()
    for k in range(2):
        Image.fromarray(np.full((9, 7), 1000 * k, np.uint16)).save(png / f"{k}.png")
    index = index_data(png)
    assert (index.bands, index.dtype, len(index)) == (1, "uint16", 2) and (index.routes == RASTER).all()


def test_rgb_data_keeps_its_routes_and_a_16_bit_png_among_it_its_rgb_reading(tmp_path):
    root = noise_pngs(tmp_path / "rgb", 4, seed=0)
    Image.fromarray(np.full((9, 7), 1000, np.uint16)).save(root / "zz16.png")
    index = index_data(root)
    assert index.rgb and (index.bands, index.dtype) == (3, "uint8") and len(index) == 5 and not index.bad
    assert int(index.routes[-1]) == PNG16  # as before rasters: converted to 8-bit RGB
    assert RASTER not in index.routes.tolist()
    Image.fromarray(np.full((9, 7), 7, np.uint8)).save(root / "a-gray.tif")  # first, and Pillow reads it: still RGB
    index = index_data(root)
    assert index.rgb and len(index) == 6 and not index.bad and RASTER not in index.routes.tolist()


def test_shard_members_are_rasters_too(tmp_path):
    import io
    import tarfile

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for k in range(3):
            buf = io.BytesIO()
            np.save(buf, np.full((8, 8, 4), k, np.int16))
            for name, data in ((f"s{k}.npy", buf.getvalue()), (f"s{k}.cls", str(k % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index = index_data(tmp_path / "s.tar")
    assert (index.bands, index.dtype, len(index)) == (4, "int16", 3) and index.labels.tolist() == [0, 1, 0]
    assert torch.equal(torch.as_tensor(np.load(io.BytesIO(index.read(1)))), torch.full((8, 8, 4), 1, dtype=torch.int16))
    from fastmae.train.data.loaders import TorchvisionLoader

    batch = next(TorchvisionLoader(index, 8, 3, seed=0, pipeline="eval", bands=_bands(index, [2, 0])).epoch(0))
    assert batch.images.dtype == torch.int16 and batch.images.shape == (3, 2, 8, 8)
    assert (batch.images == torch.arange(3, dtype=torch.int16).view(3, 1, 1, 1)).all()  # constant tiles stay so


# --------------------------------------------------------------------------------------------------- the loaders
def _bands(index, indices=None, nodata=None, norm="given"):
    """DataBands of ``index`` with made-up statistics (mean 1000 + 10 b, std 500 + b per file band b)."""
    from fastmae.train.data.databands import DataBands

    from fastmae.bands import BandSpec

    files = BandSpec(index.bands, names=index.band_names, dtype=index.dtype, nodata=nodata)
    idx = list(range(index.bands)) if indices is None else list(indices)
    spec = files.subset(idx).with_stats([1000.0 + 10 * b for b in idx], [500.0 + b for b in idx], norm)
    return DataBands(spec, None if indices is None else tuple(indices))


def test_loader_batches_rasters_in_their_dtype_as_the_reference_crops_them(tmp_path):
    from fastmae.train.data import resample
    from fastmae.train.data.loaders import ImageFiles, TorchvisionLoader, model_input, sample_images
    from fastmae.train.data.normalize import normalize_bands
    from fastmae.train.data.order import augment_params
    from fastmae.train.data.resample import crop_resize_flip_reference, eval_resize_crop, fill_nodata

    root = _tiles(tmp_path / "s2", count=5, size=20, nodata_every=2)  # tiles 1 and 3: a nodata (0) edge
    index = index_data(root)
    with pytest.raises(Exception, match="its loader needs the run's bands"):
        TorchvisionLoader(index, 16, 2, seed=0)
    bands = _bands(index, indices=[3, 2, 1, 7], nodata=0)  # B04, B03, B02, B08
    loader = TorchvisionLoader(index, 16, 2, seed=3, pipeline="pretrain", bands=bands)
    assert loader.decoders["crop/resize"] == resample.backend_label()  # logged and in summary.json
    assert loader.decoders["crop/resize"].startswith("compiled taps")
    batch = next(loader.epoch(1))
    assert batch.images.dtype == torch.uint16 and batch.images.shape == (2, 4, 16, 16)
    boxes, flips = augment_params(index, batch.ids.numpy(), 3, 1, (0.2, 1.0), 0.5)
    for j, i in enumerate(batch.ids.tolist()):
        full = torch.from_numpy(tifffile.imread(index.key(i)).transpose(2, 0, 1).astype(np.int32)).to(torch.uint16)
        chosen = fill_nodata(full[[3, 2, 1, 7]], 0, bands.spec.mean)
        want = crop_resize_flip_reference(chosen, boxes[j], bool(flips[j]), 16)
        assert (batch.images[j].int() - want.int()).abs().max() <= 1, index.key(i)  # float32 vs float64: 1 level
    # the step's normalisation: one affine per band with the run's statistics
    norm = model_input(batch.images, bands)
    assert norm.dtype == torch.float32 and torch.equal(norm, normalize_bands(batch.images, bands.spec.mean,
                                                                             bands.spec.std))  # fmt: skip
    # eval view and the pictures' fixed images
    ev = next(TorchvisionLoader(index, 16, 5, seed=0, pipeline="eval", bands=bands).epoch(0))
    first = torch.from_numpy(tifffile.imread(index.key(0)).transpose(2, 0, 1).astype(np.int32)).to(torch.uint16)
    want = eval_resize_crop(fill_nodata(first[[3, 2, 1, 7]], 0, bands.spec.mean), 16)
    assert torch.equal(ev.images[0], want)
    pics = sample_images(index, 16, 2, bands)
    assert pics.shape == (2, 4, 16, 16) and torch.equal(pics[0], model_input(want[None], bands)[0])
    # finetuning rasters: crops and flips in the native dtype (RandAugment needs 8-bit pictures)
    ft = ImageFiles(index, "finetune", 16, 0, bands=bands)
    assert not ft.timm and ft.image(0, 0).dtype == torch.uint16


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")  # Pillow's, probing the broken file
def test_a_pack_is_data_the_loader_reads_as_it_reads_the_files(tmp_path, caplog):
    """``--data tiles.pack``: the pack's index has the folder's samples, labels, classes and band names; the loader
    crops each tile as it crops the file; the statistics are the files'."""
    from fastmae.train.data.databands import resolve_bands
    from fastmae.train.data.loaders import ImageFiles, TorchvisionLoader
    from fastmae.train.data.order import augment_params
    from fastmae.train.data.pack import pack

    from fastmae.bands import parse_band_flags

    root = _tiles(tmp_path / "s2", count=6, size=40, nodata_every=3)
    (root / "forest" / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    pack(root, tmp_path / "tiles.pack")
    caplog.set_level(logging.INFO)
    folder, packed = index_data(root), index_data(tmp_path / "tiles.pack")
    assert packed.pack is not None and "indexed 6 tiles (13 uint16 bands) of the pack" in caplog.text
    assert "the pack " in caplog.text and "left out 1 file(s) when it was written, e.g. " in caplog.text
    assert [k.split(".pack:", 1)[1] for k in packed.keys] == list(folder.keys)
    np.testing.assert_array_equal(packed.labels, folder.labels)
    assert packed.classes == folder.classes and packed.band_names == folder.band_names
    assert (packed.bands, packed.dtype, packed.band_names[8]) == (13, "uint16", "B8A") and not packed.rgb
    flags = parse_band_flags(bands="B04,B03,B02,B08", nodata=0)
    a, b = resolve_bands(folder, flags), resolve_bands(packed, flags)
    np.testing.assert_allclose(b.spec.mean, a.spec.mean, rtol=1e-12)
    np.testing.assert_allclose(b.spec.std, a.spec.std, rtol=1e-12)
    ids = np.arange(6)
    boxes, flips = augment_params(folder, ids, 5, 2, (0.2, 1.0), 0.5)  # every tile has the folder's size: same boxes
    from_files = ImageFiles(folder, "pretrain", 16, 5, bands=a)
    from_pack = ImageFiles(packed, "pretrain", 16, 5, bands=a)
    for i in ids.tolist():
        crop = (boxes[i], bool(flips[i]))
        assert torch.equal(from_pack.image(2, i, crop), from_files.image(2, i, crop))
    # a subset (a finetuning split) reads the pack's tiles by their number, through worker processes
    part = packed.subset([4, 1, 5])
    batch = next(TorchvisionLoader(part, 16, 3, seed=0, num_workers=2, pipeline="eval", bands=a).epoch(0))
    whole = next(TorchvisionLoader(folder.subset([4, 1, 5]), 16, 3, seed=0, pipeline="eval", bands=a).epoch(0))
    assert torch.equal(batch.images, whole.images) and torch.equal(batch.labels, whole.labels)


def test_batch_memory_reused_by_the_workers_never_overwrites_a_batch_still_held(tmp_path, monkeypatch):
    """Workers write batches into their slots again once the main process has freed them (train/data/slots.py):
    every batch, held or not, keeps the pixels it arrived with; a held batch keeps its slot (the worker takes fresh
    memory)."""
    from fastmae.train.data import slots
    from fastmae.train.data.loaders import TorchvisionLoader

    root = _tiles(tmp_path / "s2", count=12, size=20, npy=True)
    index = index_data(root)
    bands = _bands(index)
    want = [b.images.clone() for e in range(4) for b in TorchvisionLoader(index, 16, 2, 0, bands=bands).epoch(e)]
    freed = []  # the slots the main process gave back, one entry per batch that came in a slot
    real = slots._release
    monkeypatch.setattr(slots, "_release", lambda busy, slot: freed.append(slot) or real(busy, slot))
    loader = TorchvisionLoader(index, 16, 2, 0, num_workers=2, bands=bands)
    busy = loader.dataset.slots.busy
    held, seen = [], []
    for e in range(4):
        for b in loader.epoch(e):
            seen.append(b.images.clone())
            if e in (1, 2):  # 6 batches per worker held: more than its slots
                held.append(b.images[:1])  # a slice holds the whole slot
    assert len(seen) == len(want) == 24 and all(torch.equal(a, b) for a, b in zip(seen, want, strict=True))
    assert all(torch.equal(h, want[6 + k][:1]) for k, h in enumerate(held))  # written over by nothing since
    assert int(busy.sum()) >= 1
    del held, b
    import gc

    gc.collect()
    assert int(busy.sum()) == 0  # every slot free once nothing of its batch is left
    per_worker = slots.slots_per_worker(pin=False)
    assert per_worker == 4 and set(freed) == set(range(2 * per_worker))
    assert 2 * per_worker < len(freed) < 24  # slots went round; held ones made the workers take fresh memory
    for f in root.rglob("*.npy"):  # every file gone: no batch leaves a worker, and no slot stays taken
        f.unlink()
    gone = TorchvisionLoader(index, 16, 2, 0, num_workers=2, bands=bands)
    assert list(gone.epoch(0)) == [] and len(gone.skipped) == 12 and int(gone.dataset.slots.busy.sum()) == 0
    monkeypatch.setenv("FASTMAE_BATCH_SLOTS", "0")  # the switch back: fresh memory for every batch
    assert TorchvisionLoader(index, 16, 2, 0, num_workers=2, bands=bands).dataset.slots is None


# ------------------------------------------------------------------------------------------------ fastmae pretrain
TINY = ["--model", "mae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "2", "--warmup-epochs", "1",
        "--num-workers", "0", "--no-progress", "--log-every", "1", "--blr", "1e-2", "--num-reconstructions", "2",
        "--no-tensorboard"]  # fmt: skip


@pytest.fixture(scope="module")
def s2(tmp_path_factory):
    """6 SYNTHETIC 13-band uint16 GeoTIFF tiles of 40 px, 2 classes, tiles 1, 3, 5 with a nodata (0) edge."""
    return _tiles(tmp_path_factory.mktemp("s2") / "data", count=6, size=40, nodata_every=2)


def test_a_resumed_13_band_run_is_bit_identical_and_keeps_its_bands(s2, tmp_path, capsys):
    """4 of the 13 bands by name, nodata 0 filled with their means: 5 steps straight == 2 steps, stop, resume to 5
    (a mid-epoch restart and an epoch end between). Resuming with other bands is one line."""
    base = [*TINY, "--data", str(s2), "--epochs", "4", "--bands", "B04,B03,B02,B08", "--nodata", "0"]
    a = resumed_run_is_bit_identical(main, base, tmp_path)
    bands = a["config"]["bands"]
    assert bands["names"] == ["B04", "B03", "B02", "B08"] and bands["nodata"] == 0 and a["config"]["band_indices"] == [
        3, 2, 1, 7]  # fmt: skip
    assert a["model"]["patch_embed.proj.weight"].shape[1] == 4
    capsys.readouterr()
    other = [*TINY, "--data", str(s2), "--epochs", "4", "--bands", "B04,B03,B02,B8A", "--nodata", "0"]
    split = tmp_path / "split"
    assert main(["pretrain", *other, "--output-dir", str(split), "--stop-after-steps", "6", "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastmae: error: --resume ") and "was trained on 4 uint16 bands (B04,B03,B02,B08)" in err
    assert "this run has 4 uint16 bands (B04,B03,B02,B8A)" in err and err.count("\n") == 0


def test_pretrain_and_finetune_on_a_pack(s2, tmp_path, capsys):
    from fastmae.train.data.pack import pack

    pack(s2, tmp_path / "s2.pack")
    data = str(tmp_path / "s2.pack")
    pre = tmp_path / "pre"
    assert main(["pretrain", *TINY, "--data", data, "--epochs", "1", "--nodata", "0", "--output-dir", str(pre)]) == 0
    config = json.loads((pre / "config.json").read_text())
    assert config["data"] == data and config["bands"]["names"][8] == "B8A" and config["bands"]["nodata"] == 0
    ft = tmp_path / "ft"
    assert main(["finetune", *FT, "--data", data, "--pretrained", str(pre / "checkpoint-last.pth"), "--bands",
                 "B02,B03,B04,B08", "--output-dir", str(ft)]) == 0  # fmt: skip
    summary = json.loads((ft / "summary.json").read_text())
    assert json.loads((ft / "config.json").read_text())["arch"]["in_chans"] == 4 and summary["steps"] >= 1
    capsys.readouterr()
    whole = (tmp_path / "s2.pack").read_bytes()
    (tmp_path / "cut.pack").write_bytes(whole[: len(whole) // 2])  # a copy that stopped half way
    (tmp_path / "other.bin").write_bytes(b"not a pack")
    for bad, message in (("cut.pack", "the pack's manifest does not read (truncated?"),
                         ("other.bin", "is a file; give a folder of images, .tar shards, a brace pattern or a pack")):
        assert main(["pretrain", *TINY, "--data", str(tmp_path / bad), "--epochs", "1", "--output-dir",
                     str(tmp_path / "bad")]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert err.startswith("fastmae: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(("flags", "message"), [
    (["--bands", "B02,B99"], "--bands: band B99 is not in the data's bands (B01,B02,B03,B04,B05,B06,B07,B08,B8A,B09,"
                             "B10,B11,B12)"),
    (["--bands", "B02,B02"], "--bands: band B02 chosen twice"),
    (["--bands", "13"], "--bands: band index 13 is out of range: the data has 13 bands (0..12)"),
    (["--mean", "1,2"], "--mean needs --std too"),
    (["--mean", "1,2", "--std", "1,0"], "band std of band 1 is 0"),
    (["--mean", "1,2", "--std", "1,2"], "--mean/--std gives 2 band statistics, the run has 13 bands"),
    (["--norm", "imagenet"], "--norm imagenet is for 3 8-bit bands (RGB); the run's are 13 uint16 band(s)"),
    (["--norm", "fancy"], "--norm fancy: choose auto, imagenet or a JSON file"),
    (["--norm", "missing.json"], "--norm missing.json: No such file or directory"),
    (["--loader", "dali", "--bands", "B02"], "--loader dali reads 8-bit RGB with ImageNet's statistics: --bands need "
                                             "--loader torchvision (or auto)"),
])  # fmt: skip
def test_band_flag_errors_are_one_line(s2, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(s2), "--epochs", "1", "--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmae: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------------- downstream
FT = ["--img-size", "32", "--batch-size", "2", "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "0",
      "--no-progress", "--log-every", "1", "--no-tensorboard"]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt13(s2, tmp_path_factory):
    """A 13-band pretraining checkpoint of the s2 tiles (--norm auto)."""
    out = tmp_path_factory.mktemp("ckpt13") / "run"
    assert main(["pretrain", *TINY, "--data", str(s2), "--epochs", "1", "--output-dir", str(out)]) == 0
    return out / "checkpoint-last.pth"


def _named_tiles(root: Path, names, count: int = 4, size: int = 40) -> Path:
    """uint16 tiles whose GDAL band descriptions are ``names``, in 2 class folders."""
    items = "".join(f'<Item name="DESCRIPTION" sample="{i}" role="description">{n}</Item>' for i, n in enumerate(names))
    rng = np.random.default_rng(0)
    for k in range(count):
        folder = root / f"c{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / f"t{k}.tif", rng.integers(1, 4000, (size, size, len(names)), dtype=np.uint16),
                         photometric="minisblack", planarconfig="contig",
                         extratags=[(42112, "s", 0, f"<GDALMetadata>{items}</GDALMetadata>", True)])  # fmt: skip
    return root


def test_finetune_a_4_band_subset_from_the_13_band_checkpoint(s2, ckpt13, tmp_path, capsys):
    pre = torch.load(ckpt13, weights_only=True)
    out = tmp_path / "ft"
    assert main(["finetune", *FT, "--data", str(s2), "--pretrained", str(ckpt13), "--bands", "B02,B03,B04,B08",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    pick = [1, 2, 3, 7]
    saved = pre["config"]["bands"]
    assert config["bands"] == {"count": 4, "names": ["B02", "B03", "B04", "B08"],
                               "mean": [saved["mean"][i] for i in pick], "std": [saved["std"][i] for i in pick],
                               "dtype": "uint16", "nodata": None, "norm": "auto"}  # fmt: skip
    assert config["band_indices"] == pick and config["arch"]["in_chans"] == 4
    assert config["band_transfer"] == {"rule": "names", "kept": ["B02", "B03", "B04", "B08"], "new": [],
                                       "source_count": 13, "target_count": 4}  # fmt: skip
    ft = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ft["model"]["patch_embed.proj.weight"].shape[1] == 4 and ft["config"]["bands"] == config["bands"]
    # without --bands the model takes the checkpoint's 13 bands, its statistics as they are
    probe = tmp_path / "lp"
    assert main(["linprobe", *FT, "--data", str(s2), "--pretrained", str(ckpt13), "--output-dir", str(probe),
                 "--knn-k", "2"]) == 0  # fmt: skip
    lp = json.loads((probe / "config.json").read_text())
    assert lp["bands"] == saved and lp["band_indices"] is None and "band_transfer" not in lp
    capsys.readouterr()


def test_an_rgb_checkpoint_finetuned_on_1_band_data(tmp_path, caplog, capsys):
    from fastmae.train.data.bandstats import band_statistics
    from fastmae.train.data.labelled import labelled_splits
    from fastmae.train.data.rasters import read_raster

    import fastmae

    torch.manual_seed(0)
    rgb = tmp_path / "mae_rgb.pth"  # an official-format MAE: no band spec, 3 bands (ImageNet's RGB)
    torch.save({"model": fastmae.create_model("mae_vit_tiny_patch16", kernels="reference").state_dict()}, rgb)
    data = tmp_path / "gray"
    rng = np.random.default_rng(1)
    for k in range(6):
        (data / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 60000, (36, 36), dtype=np.uint16)).save(data / f"c{k % 2}" / f"{k}.png")
    out = tmp_path / "ft"
    caplog.set_level(logging.INFO)
    assert main(["finetune", *FT, "--data", str(data), "--pretrained", str(rgb), "--output-dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    train, _ = labelled_splits(str(data), 0.2, 0)  # the statistics are the training split's
    want = band_statistics([train.key(i) for i in range(len(train))], read=read_raster, seed=0)
    assert config["bands"] == {"count": 1, "names": None, "mean": want.mean.tolist(), "std": want.std.tolist(),
                               "dtype": "uint16", "nodata": None, "norm": "auto"}  # fmt: skip
    assert config["band_transfer"]["rule"] == "timm" and config["arch"]["in_chans"] == 1
    assert any("trained on 3 RGB bands with ImageNet's statistics; the data has 1 uint16 band" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    # the finetuned patch embedding started as the RGB filters summed (timm's adapt_input_conv)
    from fastmae.interop import create_vit, load_pretrained

    vit = create_vit({**fastmae.interop.read_checkpoint(rgb)[1], "in_chans": 1}, 2, 32)
    load_pretrained(vit, rgb, None, bands=fastmae.BandSpec(1, dtype="uint16"))
    sd = torch.load(rgb, weights_only=True)["model"]["patch_embed.proj.weight"]
    assert torch.allclose(vit.patch_embed.proj.weight, sd.sum(1, keepdim=True))
    capsys.readouterr()


def test_downstream_band_mismatches_are_one_line_errors(s2, ckpt13, tmp_path, capsys):
    other = _named_tiles(tmp_path / "other", [f"b{i}" for i in range(1, 14)])
    four = tmp_path / "four"
    for k in range(4):
        (four / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        np.save(four / f"c{k % 2}" / f"{k}.npy", np.full((36, 36, 4), k, np.uint16))
    s2_names = "B01,B02,B03,B04,B05,B06,B07,B08,B8A,B09,B10,B11,B12"
    cases = [
        (other, [], f"--pretrained {ckpt13}: the checkpoint's bands ({s2_names}) are not the data's "
                    "(b1,b2,b3,b4,b5,b6,b7,b8,b9,b10,b11,b12,b13): B01,B02,B03,B04,B05,B06,B07,B08,B8A,B09,B10,B11,B12 "
                    "missing; choose the data's bands with --bands"),
        (four, [], f"--pretrained {ckpt13}: the checkpoint has 13 bands ({s2_names}), the data 4 (4 unnamed bands); "
                   "choose 13 of the data's bands with --bands"),
        (s2, ["--bands", "B02,B99"], f"--bands: band B99 is not in the data's bands ({s2_names})"),
    ]  # fmt: skip
    for data, flags, message in cases:
        assert main(["finetune", *FT, "--data", str(data), "--pretrained", str(ckpt13), "--output-dir",
                     str(tmp_path / "x"), *flags]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert err == f"fastmae: error: {message}\n", err
    # --bands maps them: naming the 4 unnamed bands keeps the checkpoint's filters and statistics for them
    out = tmp_path / "mapped"
    assert main(["finetune", *FT, "--data", str(four), "--pretrained", str(ckpt13), "--output-dir", str(out),
                 "--bands", "B02,B03,B04,B08"]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    saved = torch.load(ckpt13, weights_only=True)["config"]["bands"]
    assert config["band_transfer"]["kept"] == ["B02", "B03", "B04", "B08"] and config["band_indices"] is None
    assert config["bands"]["mean"] == [saved["mean"][i] for i in (1, 2, 3, 7)]
    capsys.readouterr()


def test_visualize_and_export_take_the_bands_from_the_checkpoint(s2, ckpt13, tmp_path, capsys):
    pic = tmp_path / "rec.png"
    assert main(["visualize", "--checkpoint", str(ckpt13), "--images", str(s2), "--output", str(pic), "--count",
                 "2", "--show-bands", "B04,B03,B02"]) == 0  # fmt: skip
    assert Image.open(pic).size[0] > 0
    other = _named_tiles(tmp_path / "other", [f"b{i}" for i in range(1, 14)], count=2)
    assert main(["visualize", "--checkpoint", str(ckpt13), "--images", str(other), "--output", str(pic)]) == 2
    assert "the checkpoint's bands (B01," in capsys.readouterr().err
    assert main(["visualize", "--checkpoint", str(ckpt13), "--images", str(other), "--output", str(pic), "--bands",
                 "b1,b2,b3,b4,b5,b6,b7,b8,b9,b10,b11,b12,b13"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "reconstructs its own bands (B01,B02" in err and "the images give b1,b2" in err
    enc = tmp_path / "enc.pth"
    assert main(["export", str(ckpt13), str(enc)]) == 0
    saved = torch.load(ckpt13, weights_only=True)["config"]["bands"]
    assert json.loads((tmp_path / "enc.bands.json").read_text()) == saved
    capsys.readouterr()


def test_3_band_uint8_rasters_take_imagenet_statistics_and_the_raster_reader(tmp_path):
    from fastmae.train.data import resolve_bands
    from fastmae.train.data.loaders import ImageFiles

    from fastmae.bands import IMAGENET, parse_band_flags

    rng = np.random.default_rng(0)
    for k in range(4):
        (tmp_path / "d" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "d" / f"c{k % 2}" / f"{k}.npy", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    index = index_data(tmp_path / "d")
    assert (index.bands, index.dtype) == (3, "uint8") and not index.rgb and (index.routes == RASTER).all()
    bands = resolve_bands(index, parse_band_flags(), seed=0)
    assert bands.spec.same_stats(IMAGENET, rel=0) and bands.plain and bands.for_loader() is None
    for pipeline in ("finetune", "eval"):  # no Pillow transforms for a raster: read and cropped in its dtype
        files = ImageFiles(index, pipeline, 16, 0)
        assert not files.timm and files.image(0, 0).shape == (3, 16, 16) and files.image(0, 0).dtype == torch.uint8
