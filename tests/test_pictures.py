"""Reconstruction pictures at any band count: the 2-98% stretch on known arrays, RGB drawn as before, gray for one
band, a chosen band triple, and --show-bands errors in one line."""

import pytest
import torch
from fastmae.train.data.decode import IMAGENET_MEAN, IMAGENET_STD
from fastmae.train.visualize import picture_bands, reconstruct, save_reconstructions, stretch
from PIL import Image

import fastmae
from fastmae import IMAGENET, BandSpec, FastMAEError
from fastmae.bands import config_with_bands
from fastmae.cli import main
from fastmae.models import model_arch

TINY = dict(img_size=16, patch_size=4, embed_dim=24, depth=1, num_heads=2, decoder_embed_dim=20, decoder_depth=1,
            decoder_num_heads=2, mlp_ratio=2.0)  # fmt: skip


def _model(C: int, norm_pix: bool = False):
    torch.manual_seed(C)
    return fastmae.MaskedAutoencoderViT(**TINY, in_chans=C, norm_pix_loss=norm_pix, kernels="reference")


def test_stretch_on_known_arrays():
    # band 0: 0..100 over 101 pixels (2% -> 2, 98% -> 98); band 1 constant; band 2: two values
    band0 = torch.arange(101.0)
    originals = torch.stack([band0, torch.full((101,), 7.0), torch.tensor([-5.0] * 50 + [5.0] * 51)])
    originals = originals.view(1, 3, 1, 101)
    rec = originals.clone()
    rec[0, 0, 0, :3] = torch.tensor([-100.0, 50.0, 1000.0])  # clipped with the originals' stretch, not its own
    o, r = stretch(originals, rec)
    torch.testing.assert_close(o[0, 0, 0], ((band0 - 2) / 96).clamp(0, 1))
    assert o[0, 0, 0, 2].item() == 0 and o[0, 0, 0, 98].item() == 1 and abs(o[0, 0, 0, 50].item() - 0.5) < 1e-6
    assert torch.equal(r[0, 0, 0, :3], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(o[0, 1], torch.zeros(1, 101))  # a constant band: no division by zero
    assert set(o[0, 2].unique().tolist()) == {0.0, 1.0}
    # the stretch is per band over every image of the picture, and blind to the band's units (affine)
    two = torch.randn(4, 2, 8, 8)
    a = stretch(two)[0]
    b = stretch(two * torch.tensor([3.0, 500.0]).view(1, 2, 1, 1) + torch.tensor([1.0, 1000.0]).view(1, 2, 1, 1))[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_rgb_pictures_are_drawn_as_before(norm_pix):
    model = _model(3, norm_pix)
    imgs = torch.randn(2, 3, 16, 16)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for bands in (None, IMAGENET):
        loss, orig, masked, rec = reconstruct(model, imgs, 0.75, 0, bands)
        assert torch.equal(orig, (imgs * std + mean).clamp(0, 1))  # the normalisation undone, to the bit
        m = (masked == 0.5).all(1, keepdim=True).float()
        assert m.mean().item() == pytest.approx(0.75, abs=0.1) and torch.equal(rec * (1 - m), orig * (1 - m))


def test_one_band_is_gray_and_a_chosen_triple_is_stretched():
    gray = _model(1)
    imgs = torch.randn(2, 1, 16, 16) * 1000 + 5000
    _, orig, masked, rec = reconstruct(gray, imgs, 0.75, 0)
    assert orig.shape == (2, 3, 16, 16) and torch.equal(orig[:, 0], orig[:, 1]) and torch.equal(orig[:, 1], orig[:, 2])
    assert torch.equal(orig[:, :1], stretch(imgs)[0]) and rec.min() >= 0 and rec.max() <= 1
    spec = BandSpec(13, names=tuple(f"B{i:02d}" for i in range(1, 14)), dtype="uint16")
    s2 = _model(13)
    imgs = torch.randn(3, 13, 16, 16) * torch.arange(1.0, 14.0).view(1, 13, 1, 1)
    for show, idx in ((None, [0, 1, 2]), ("3,2,1", [3, 2, 1]), ("B04,B03,B02", [3, 2, 1]), (["B08"], [7])):
        _, orig, _, _ = reconstruct(s2, imgs, 0.75, 0, spec, show)
        want = stretch(imgs[:, idx])[0]
        assert torch.equal(orig, want if len(idx) == 3 else want.expand(-1, 3, -1, -1)), show
    # a 3-band RGB picture with bands chosen, or of 16-bit RGB, is stretched too
    rgb16 = BandSpec(3, mean=[1.0] * 3, std=[2.0] * 3, dtype="uint16")
    rgb = torch.randn(2, 3, 16, 16)
    assert torch.equal(reconstruct(_model(3), rgb, 0.75, 0, rgb16)[1], stretch(rgb)[0])
    assert torch.equal(reconstruct(_model(3), rgb, 0.75, 0, None, "2,1,0")[1], stretch(rgb[:, [2, 1, 0]])[0])
    assert picture_bands(2) == [0] and picture_bands(4) == [0, 1, 2]


@pytest.mark.parametrize("show, message", [
    ("13", r"--show-bands: band index 13 is out of range: the data has 13 bands \(0..12\)"),
    ("0,1", r"--show-bands takes 1 band \(drawn in gray\) or 3 \(red, green, blue\), got 2"),
    ("nir", r"--show-bands: band nir is not in the data's bands \(13 unnamed bands\)"),
])  # fmt: skip
def test_bad_show_bands_are_one_line(show, message):
    with pytest.raises(FastMAEError, match=message):
        picture_bands(13, show)


def test_visualize_checks_show_bands_before_reading_images(tmp_path, capsys):
    model = _model(13)
    spec = BandSpec(13, mean=[0.0] * 13, std=[1.0] * 13, dtype="uint16", norm="auto")
    torch.save({"model": model.state_dict(), "config": config_with_bands({"arch": model_arch(model)}, spec)},
               tmp_path / "c.pth")  # fmt: skip
    args = ["visualize", "--checkpoint", str(tmp_path / "c.pth"), "--output", str(tmp_path / "v.png")]
    assert main([*args, "--show-bands", "3,2,13", "--images", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastmae: error: --show-bands: band index 13 is out of range: the data has 13 bands (0..12)"]
    # a picture of a 13-band model drawn from 13-band images (as the pretraining loop calls it)
    png = tmp_path / "p.png"
    save_reconstructions(model, torch.randn(2, 13, 16, 16), png, 0.75, scale=2, bands=spec, show_bands="3,2,1")
    with Image.open(png) as im:
        assert im.size[0] == 3 * 32 and im.mode == "RGB"
    with pytest.raises(FastMAEError, match=r"the images have 3 bands, the model takes 13"):
        reconstruct(model, torch.randn(1, 3, 16, 16), 0.75)
