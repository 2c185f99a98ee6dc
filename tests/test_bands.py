"""Bands: the spec (validation, JSON, --bands selection, matching a checkpoint), weights moved across band sets
(timm's rule without names, kept / new filters with names, the variance a new band adds), and exports that carry the
bands out and back (timm, official, transformers)."""

import json
import math

import numpy as np
import pytest
import torch
from timm.models import adapt_input_conv

import fastmae
from fastmae import IMAGENET, BandSpec, FastMAEError
from fastmae.bands import (
    config_with_bands,
    dtype_name,
    match_bands,
    plan_transfer,
    read_sidecar,
    select_bands,
    sidecar_path,
    spec_from_config,
    transfer_state,
    write_sidecar,
)
from fastmae.cli import main
from fastmae.interop import create_vit, load_pretrained, read_checkpoint
from fastmae.models import model_arch

S2 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")  # Sentinel-2 L1C
# a tiny MAE: 16 px, patch 4 (16 patches), widths not powers of two
TINY = dict(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=2, decoder_embed_dim=20, decoder_depth=1,
            decoder_num_heads=2, mlp_ratio=2.0)  # fmt: skip


def _s2_spec(names=S2) -> BandSpec:
    n = len(names)
    return BandSpec(n, names=names, mean=[1000.0 + 10 * i for i in range(n)], std=[500.0 + i for i in range(n)],
                    dtype="uint16", nodata=0, norm="auto")  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _checkpoint(tmp_path, spec: BandSpec | None, in_chans: int, name="ckpt.pth", seed=0):
    """A fastmae pretraining checkpoint (random weights) of ``in_chans`` bands, its spec in its config."""
    model = fastmae.MaskedAutoencoderViT(**TINY, in_chans=in_chans, kernels="reference")
    _randomize(model, seed)
    config = config_with_bands({"arch": model_arch(model)}, spec)
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / name)
    return tmp_path / name, model


# ------------------------------------------------------------------------------------------------ the spec
def test_spec_round_trips_through_json():
    spec = _s2_spec().with_stats(range(1, 14), [2.5] * 13, "given")
    text = json.dumps(spec.to_dict(), allow_nan=False)  # strict JSON
    assert BandSpec.from_dict(json.loads(text)) == spec
    nan = BandSpec(2, dtype="float32", nodata=float("nan"))
    back = BandSpec.from_dict(json.loads(json.dumps(nan.to_dict(), allow_nan=False)))
    assert math.isnan(back.nodata) and back.dtype == "float32" and not back.has_stats
    assert back == nan and len({back, nan}) == 1 and back != BandSpec(2, dtype="float32", nodata=0)
    assert spec_from_config(config_with_bands({"arch": {}}, spec)) == spec
    assert spec_from_config({"arch": {}}) is None and "bands" not in config_with_bands({"bands": 1}, None)
    assert BandSpec.from_dict({"names": ["a", "b"]}).count == 2  # a hand-written file may leave the count out


@pytest.mark.parametrize("kwargs, message", [
    (dict(count=3, mean=[1, 2, 3], std=[1, 0, 2]), r"band std of band 1 is 0: a std must be positive"),
    (dict(count=2, names=["red", "nir"], mean=[1, 2], std=[1, -3]), r"band std of band 1 \(nir\) is -3"),
    (dict(count=3, mean=[1, 2], std=[1, 2]), r"band mean has 2 values for 3 bands"),
    (dict(count=2, names=["a", "b"], mean=[1, 2], std=[1, 2, 3]), r"band std has 3 values for 2 bands \(a,b\)"),
    (dict(count=3, names=["a", "b"]), r"2 band names \(a,b\) for 3 bands"),
    (dict(count=2, names=["a", "a"]), r"band names must be unique: a repeated in a,a"),
    (dict(count=1, names=["a,b"]), r"without commas"),
    (dict(count=2, mean=[1, 2]), r"both mean and std"),
    (dict(count=1, mean=[float("nan")], std=[1]), r"band mean of band 0 is nan, not a finite number"),
    (dict(count=0), r"band count must be a positive integer, got 0"),
    (dict(count=2, dtype="complex64"), r"bands: dtype complex64 is not supported \(fastmae reads uint8, uint16, "
                                       r"int16, float32\)"),
    (dict(count=2, dtype="int64"), r"dtype int64 is not supported"),
    (dict(count=2, norm="z"), r"unknown band normalisation 'z'; choose one of imagenet, auto, given"),
])  # fmt: skip
def test_bad_specs_are_one_line(kwargs, message):
    with pytest.raises(FastMAEError, match=message) as exc:
        BandSpec(**kwargs)
    assert "\n" not in str(exc.value)


def test_dtypes_of_files_are_named():
    assert [dtype_name(d) for d in (np.uint8, np.dtype("uint16"), torch.int16, "float32", "<f4")] == [
        "uint8", "uint16", "int16", "float32", "float32"]  # fmt: skip
    for bad in (np.complex64, np.int64, torch.float64, np.bool_):
        with pytest.raises(FastMAEError, match=r"tile_7.tif: dtype (complex64|int64|float64|bool) is not supported"):
            dtype_name(bad, "tile_7.tif")
    with pytest.raises(FastMAEError, match=r"cfg.json: unknown band field\(s\) stds"):
        BandSpec.from_dict({"count": 1, "stds": [1]}, "cfg.json")
    with pytest.raises(FastMAEError, match=r"cfg.json: band std of band 0 is 0"):
        BandSpec.from_dict({"count": 1, "mean": [0], "std": [0]}, "cfg.json")


def test_imagenet_is_todays_normalisation_to_the_bit():
    from fastmae.train.data.decode import IMAGENET_MEAN, IMAGENET_STD

    scale, bias = IMAGENET.affine()
    assert torch.equal(torch.tensor(scale), torch.tensor([1 / (255 * s) for s in IMAGENET_STD]))
    todays = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]  # decode.normalize's bias
    assert torch.equal(torch.tensor(bias), torch.tensor(todays))
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)  # torchvision's
    assert IMAGENET.count == 3 and IMAGENET.dtype == "uint8" and IMAGENET.norm == "imagenet" and IMAGENET.names is None
    x = torch.tensor([0.0, 128.0, 255.0])
    np.testing.assert_allclose(x * scale[1] + bias[1], (x - IMAGENET.mean[1]) / IMAGENET.std[1], rtol=1e-6)


def test_select_bands_by_name_or_index():
    spec = _s2_spec()
    sub, idx = select_bands(spec, "B02,B03,B04,B08")
    assert idx == [1, 2, 3, 7] and sub.names == ("B02", "B03", "B04", "B08") and sub.count == 4
    assert sub.mean == tuple(spec.mean[i] for i in idx) and sub.std == tuple(spec.std[i] for i in idx)
    assert sub.dtype == "uint16" and sub.nodata == 0 and sub.norm == "auto"
    assert select_bands(spec, "3,2,1")[1] == [3, 2, 1] and select_bands(spec, ["B04", 2])[1] == [3, 2]
    unnamed = BandSpec(4, dtype="uint16")
    named, idx = select_bands(unnamed, "blue,green,red,nir")  # as many names as bands: they name them
    assert named.names == ("blue", "green", "red", "nir") and idx == [0, 1, 2, 3]
    assert select_bands(unnamed, "0,3")[0].names is None


@pytest.mark.parametrize("which, message", [
    ("B02,B2", r"--bands: band B2 is not in the data's bands \(B01,B02,.*,B12\)"),
    ("13", r"--bands: band index 13 is out of range: the data has 13 bands \(0..12\)"),
    ("B04,3", r"--bands: band B04 chosen twice"),
    ("B04,,B03", r"--bands 'B04,,B03': give comma-separated band names or 0-based indices"),
])  # fmt: skip
def test_bad_band_choices_are_one_line(which, message):
    with pytest.raises(FastMAEError, match=message):
        select_bands(_s2_spec(), which)
    with pytest.raises(FastMAEError, match=r"--bands names 2 bands \(a,b\) but the data's 4 bands have no names"):
        select_bands(BandSpec(4), "a,b")


def test_match_checkpoint_bands_to_the_data():
    ckpt, data = _s2_spec(("B04", "B03", "B02")), _s2_spec()
    assert match_bands(ckpt, data) == [3, 2, 1]  # a subset, reordered
    assert match_bands(BandSpec(3), BandSpec(3, names=("r", "g", "b"))) == [0, 1, 2]
    with pytest.raises(FastMAEError, match=r"the checkpoint's bands \(B04,B03,B02\) are not the data's \(red,green,"
                                           r"blue\): B04,B03,B02 missing; choose the data's bands with --bands"):
        match_bands(ckpt, BandSpec(3, names=("red", "green", "blue")))
    with pytest.raises(FastMAEError, match=r"the checkpoint has 3 bands \(3 unnamed bands\), the data 13 \(B01,"):
        match_bands(IMAGENET, data)


def test_band_file_beside_weights(tmp_path):
    weights = tmp_path / "enc.pth"
    assert sidecar_path(weights) == tmp_path / "enc.bands.json" and read_sidecar(weights) is None
    assert write_sidecar(weights, _s2_spec()) == tmp_path / "enc.bands.json"
    assert read_sidecar(weights) == _s2_spec()
    write_sidecar(weights, None)  # a later export without bands leaves no stale file
    assert not sidecar_path(weights).exists()
    sidecar_path(weights).write_text("{")
    with pytest.raises(FastMAEError, match=r"enc.bands.json could not be read"):
        read_sidecar(weights)


# ------------------------------------------------------------------------------------------------ weights across bands
def test_rgb_checkpoint_into_one_band_is_timms_rule(tmp_path):
    path, src = _checkpoint(tmp_path, None, 3)  # an RGB checkpoint without names (official files have none)
    w = src.patch_embed.proj.weight.detach()
    model = fastmae.from_pretrained(path, in_chans=1, kernels="reference")
    assert model.in_chans == 1 and model.bands is None
    assert torch.equal(model.patch_embed.proj.weight.detach(), adapt_input_conv(1, w))  # the filters summed
    pp = TINY["patch_size"] ** 2
    rows = src.decoder_pred.weight.detach().reshape(pp, 3, -1)  # (row, col, band) rows
    torch.testing.assert_close(model.decoder_pred.weight.detach(), rows.mean(1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.decoder_pred.bias.detach(), src.decoder_pred.bias.detach().reshape(pp, 3).mean(1))
    for key, value in src.state_dict().items():  # everything else as it was
        if not key.startswith(("patch_embed.proj.weight", "decoder_pred.")):
            assert torch.equal(model.state_dict()[key], value), key
    gray = torch.randn(2, 1, 16, 16)  # a gray image is the RGB image with equal bands: the same embedding
    torch.testing.assert_close(model.patch_embed(gray), src.patch_embed(gray.expand(-1, 3, -1, -1)), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    loss, pred, _ = model(gray, noise=torch.rand(2, 16))
    assert pred.shape == (2, 16, pp) and torch.isfinite(loss)
    # the finetune encoder (timm) from the same checkpoint, and N > 3 bands: repeated, scaled by 3/N
    vit = create_vit(model_arch(model) | {"in_chans": 1}, num_classes=0, img_size=16)
    done = load_pretrained(vit, path, None)
    assert torch.equal(vit.patch_embed.proj.weight.detach(), adapt_input_conv(1, w))
    assert done["band_transfer"] == {"rule": "timm", "kept": [], "new": [], "source_count": 3, "target_count": 1}
    five = fastmae.from_pretrained(path, in_chans=5, kernels="reference")
    assert torch.equal(five.patch_embed.proj.weight.detach(), adapt_input_conv(5, w))
    assert torch.equal(five.decoder_pred.weight.detach().reshape(pp, 5, -1)[:, 3], rows[:, 0])  # predictions repeat


def test_named_checkpoint_into_a_named_subset_keeps_its_filters(tmp_path, caplog):
    path, src = _checkpoint(tmp_path, _s2_spec(), 13)
    sub, idx = select_bands(_s2_spec(), "B02,B03,B04,B08")
    data = sub.with_stats([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], "auto")  # the new data's statistics
    with caplog.at_level("INFO", logger="fastmae.interop"):
        model = fastmae.from_pretrained(path, bands=data, kernels="reference")
    assert "bands kept from the checkpoint: B02,B03,B04,B08; new (mean" in caplog.text and "none; dropped: B01,B05" \
        in caplog.text  # fmt: skip
    assert model.in_chans == 4 and model.bands == data
    assert torch.equal(model.patch_embed.proj.weight, src.patch_embed.proj.weight[:, idx])  # bit for bit
    pp = TINY["patch_size"] ** 2
    rows = src.decoder_pred.weight.reshape(pp, 13, -1)
    assert torch.equal(model.decoder_pred.weight, rows[:, idx].reshape(pp * 4, -1))
    assert torch.equal(model.decoder_pred.bias, src.decoder_pred.bias.reshape(pp, 13)[:, idx].reshape(-1))
    same = fastmae.from_pretrained(path, kernels="reference")  # no bands asked: the checkpoint's own
    assert same.bands == _s2_spec() and same.in_chans == 13
    # finetuning: the timm encoder from the checkpoint, on the subset
    vit = create_vit(model_arch(model), num_classes=5, img_size=16)
    done = load_pretrained(vit, path, None, bands=data)
    assert torch.equal(vit.patch_embed.proj.weight.detach(), src.patch_embed.proj.weight.detach()[:, idx])
    assert done["band_transfer"]["kept"] == ["B02", "B03", "B04", "B08"] and done["band_transfer"]["new"] == []


def test_new_bands_start_from_the_mean_filter_at_a_pretrained_bands_scale(tmp_path):
    path, src = _checkpoint(tmp_path, _s2_spec(), 13)
    target = BandSpec(3, names=("B04", "NIR2", "B03"))
    model = fastmae.from_pretrained(path, bands=target, kernels="reference")
    w = src.patch_embed.proj.weight.detach().double()  # [D, 13, p, p]
    new = model.patch_embed.proj.weight.detach().double()[:, 1]
    assert torch.equal(model.patch_embed.proj.weight[:, 0], src.patch_embed.proj.weight[:, 3])
    assert torch.equal(model.patch_embed.proj.weight[:, 2], src.patch_embed.proj.weight[:, 2])
    mean = w.mean(1)
    cos = (new * mean).sum((1, 2)) / (new.norm(dim=(1, 2)) * mean.norm(dim=(1, 2)))
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)  # the mean filter's direction
    rms = w.pow(2).sum((2, 3)).mean(1).sqrt()
    torch.testing.assert_close(new.norm(dim=(1, 2)), rms, rtol=1e-5, atol=0)  # at the pretrained filters' RMS norm


def test_a_new_band_adds_a_pretrained_bands_share_of_the_variance():
    """Numerically, on random inputs normalised per band (independent, unit variance): a new band adds to each
    activation's variance the mean of what one pretrained band adds, so that swapping any one band for a new one
    keeps the activation's variance on average over the band swapped."""
    g = torch.Generator().manual_seed(0)
    D, C, p, n = 32, 6, 4, 40000
    names = tuple(f"b{i}" for i in range(C))
    base = torch.randn(D, 1, p, p, generator=g, dtype=torch.float64)  # pretrained filters share a direction...
    w = base + 0.8 * torch.randn(D, C, p, p, generator=g, dtype=torch.float64)  # ...and differ
    x = torch.randn(n, C, p, p, generator=g, dtype=torch.float64)

    def act_var(weight, inputs):
        return torch.einsum("dcij,ncij->nd", weight, inputs).var(0)  # [D]

    source_var = act_var(w, x)
    swapped = []
    for j in range(C):
        target = names[:j] + ("new",) + names[j + 1 :]
        sd = transfer_state({"patch_embed.proj.weight": w}, plan_transfer(names, target))
        swapped.append(act_var(sd["patch_embed.proj.weight"], x))
        new_alone = act_var(sd["patch_embed.proj.weight"][:, j : j + 1], x[:, j : j + 1])
        one_band = torch.stack([act_var(w[:, c : c + 1], x[:, c : c + 1]) for c in range(C)]).mean(0)
        assert ((new_alone / one_band - 1).abs() < 0.05).all()  # a pretrained band's share, within sampling error
    ratio = torch.stack(swapped).mean(0) / source_var
    assert ((ratio - 1).abs() < 0.05).all(), ratio
    unscaled = act_var(w.mean(1, keepdim=True), x[:, :1])  # the plain mean filter would add less (~0.67 here)
    assert (unscaled / one_band).mean() < 0.8


def test_bands_with_no_name_in_common_are_one_line(tmp_path):
    path, _ = _checkpoint(tmp_path, _s2_spec(), 13)
    with pytest.raises(FastMAEError, match=r"no band of the data \(red,green,blue\) is among the checkpoint's bands "
                                           r"\(B01,B02,B03,.*,B12\): name the bands alike") as exc:
        fastmae.from_pretrained(path, bands=BandSpec(3, names=("red", "green", "blue")))
    assert "\n" not in str(exc.value)
    with pytest.raises(FastMAEError, match=r"in_chans 2 disagrees with the 3 bands asked for"):
        fastmae.from_pretrained(path, bands=BandSpec(3, names=("B01", "x", "y")), in_chans=2)


# ------------------------------------------------------------------------------------------------ out and back
@pytest.mark.parametrize("to, output", [("timm", "enc.safetensors"), ("timm", "enc.pth"), ("official", "off.pth"),
                                        ("hf", "hf"), ("hf-encoder", "hfe")])  # fmt: skip
def test_thirteen_bands_export_and_read_back(to, output, tmp_path, capsys):
    path, src = _checkpoint(tmp_path, _s2_spec(), 13)
    out = tmp_path / output
    assert main(["export", str(path), str(out), "--to", to]) == 0
    printed = capsys.readouterr().out
    assert "bands: 13 uint16 bands (B01,B02," in printed
    back_sd, arch, info = read_checkpoint(out)
    assert arch["in_chans"] == 13 and info["bands"] == _s2_spec()
    want = src.state_dict()
    for key, value in back_sd.items():
        assert torch.equal(value, want[key]), key
    if to in ("timm", "official"):
        assert sidecar_path(out).is_file() and ("in_chans=13" in printed or to == "official")
        import timm

        vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, in_chans=13, embed_dim=24,
                                                               depth=1, num_heads=2, mlp_ratio=2.0, num_classes=0)
        vit.load_state_dict(back_sd, strict=True)
    else:
        config = json.loads((out / "config.json").read_text())
        assert config["num_channels"] == 13 and BandSpec.from_dict(config["fastmae_bands"]) == _s2_spec()
    if to == "hf":
        model = fastmae.from_pretrained(out, kernels="reference")
        assert model.bands == _s2_spec() and model.in_chans == 13
        for key, value in want.items():
            assert torch.equal(model.state_dict()[key], value), key


def test_transformers_loads_a_four_band_export_and_computes_the_same(tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = _s2_spec(("B02", "B03", "B04", "B08"))
    path, src = _checkpoint(tmp_path, spec, 4)
    src.eval()
    assert main(["export", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    ref, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert ref.config.num_channels == 4
    g = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, 16, generator=g)
    with torch.no_grad():
        want = ref.eval()(pixel_values=imgs, noise=noise)
        loss, pred, mask = src(imgs, mask_ratio=ref.config.mask_ratio, noise=noise)
    assert torch.equal(mask, want.mask)
    torch.testing.assert_close(pred, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, want.loss, rtol=1e-5, atol=1e-6)
    # transformers keeps the band spec through its own save_pretrained
    ref.save_pretrained(tmp_path / "again")
    assert fastmae.from_pretrained(tmp_path / "again", kernels="reference").bands == spec
