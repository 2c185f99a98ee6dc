"""Small images: patch-4 checkpoints that carry their architecture downstream, the digits presets and split, and
the pretrained-vs-scratch comparison command (its flow; the accuracy claim lives in its committed results)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastmae
from fastmae.cli import main
from fastmae.config import FINETUNE_PRESETS, LINPROBE_PRESETS, PRESETS

FAST = ["--num-workers", "0", "--no-progress", "--log-every", "1"]


@pytest.fixture(scope="module")
def patch4_ckpt(tmp_path_factory):
    """A 2-step digits pretraining of a patch-4 model: a checkpoint that names no 224-px model."""
    out = tmp_path_factory.mktemp("p4") / "run"
    assert main(["pretrain", "--preset", "digits", *FAST, "--stop-after-steps", "2", "--batch-size", "16",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    return out / "checkpoint-last.pth"


def test_digits_pretraining_sees_only_the_training_split(patch4_ckpt):
    from fastmae.train.data import digits_folder, labelled_splits, pretrain_index

    pre = pretrain_index("digits")
    train, val = labelled_splits("digits", 0.2, 0)
    assert len(pre) == len(train) == 1438 and len(val) == 359
    assert set(pre.keys) == set(train.keys) and not set(pre.keys) & set(val.keys)
    assert all(str(digits_folder() / "train") in k for k in pre.keys[:5])
    cfg = json.loads((patch4_ckpt.parent / "config.json").read_text())
    assert cfg["num_images"] == 1438 and cfg["arch"]["patch_size"] == 4 and cfg["model"] == "mae_vit_mini_patch4"
    # the pictures are drawn 4x: a person can read a 32-px digit; one band, drawn in gray (no tint)
    from PIL import Image

    with Image.open(sorted((patch4_ckpt.parent / "reconstructions").glob("*.png"))[-1]) as im:
        assert im.size == (3 * 32 * 4, 8 * 32 * 4 + 34)  # under the header (step, eval loss, column labels)
        rgb = np.asarray(im.convert("RGB"))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert len(np.unique(rgb[34:])) > 16  # a picture, not a blank


def test_digits_are_one_band_with_their_own_statistics(patch4_ckpt):
    """The digits are written as one-band uint8 rasters (scikit-learn's 0..16 scaled to 0..255): the digits preset
    trains a one-channel model, normalised with the data's own statistics, which the checkpoint carries."""
    from fastmae.train.data import digits_folder, pretrain_index
    from sklearn.datasets import load_digits

    digits = load_digits()
    files = sorted((digits_folder() / "train").rglob("*.npy"))
    assert len(files) == 1438 and not list(digits_folder().rglob("*.png"))
    first = np.load(files[0])
    i, label = int(files[0].stem), int(files[0].parent.name)
    assert first.shape == (8, 8) and first.dtype == np.uint8 and digits.target[i] == label
    np.testing.assert_array_equal(first, (digits.images[i] * (255 / 16)).round().astype(np.uint8))
    index = pretrain_index("digits")
    assert (index.bands, index.dtype) == (1, "uint8")
    cfg = json.loads((patch4_ckpt.parent / "config.json").read_text())
    bands = cfg["bands"]
    assert cfg["arch"]["in_chans"] == 1 and (bands["count"], bands["dtype"], bands["norm"]) == (1, "uint8", "auto")
    pixels = np.stack([np.load(f) for f in files]).astype(np.float64)  # every training digit
    # a seeded sample of 512 of the 1438 files: close to the statistics of all of them
    assert bands["mean"][0] == pytest.approx(pixels.mean(), rel=0.03)
    assert bands["std"][0] == pytest.approx(pixels.std(), rel=0.03)
    ckpt = torch.load(patch4_ckpt, weights_only=True)
    assert ckpt["config"]["bands"] == bands and ckpt["model"]["patch_embed.proj.weight"].shape[1] == 1


def test_patch4_checkpoint_goes_downstream_without_model(patch4_ckpt, tmp_path, capsys):
    """finetune, linprobe, export and visualize read the architecture from the checkpoint (no --model), and the
    exported encoder loads into timm strictly and computes what fastmae's encoder computes."""
    pretrained_bands = json.loads((patch4_ckpt.parent / "config.json").read_text())["bands"]
    for command in ("finetune", "linprobe"):
        out = tmp_path / command
        assert main([command, "--preset", "digits", "--pretrained", str(patch4_ckpt), *FAST, "--stop-after-steps",
                     "1", "--output-dir", str(out)]) == 0  # fmt: skip
        summary = json.loads((out / "summary.json").read_text())
        assert set(summary["missing_keys"]) <= {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model"] == "mae_vit_mini_patch4" and cfg["pretrained"] == str(patch4_ckpt)
        assert cfg["bands"] == pretrained_bands  # one band, with the pretraining's statistics
    export = tmp_path / "enc.safetensors"
    assert main(["export", str(patch4_ckpt), str(export), "--to", "timm"]) == 0
    printed = capsys.readouterr().out
    assert "VisionTransformer(img_size=32, patch_size=4" in printed
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    assert "in_chans=1," in printed
    vit = VisionTransformer(img_size=32, patch_size=4, in_chans=1, embed_dim=192, depth=6, num_heads=3,
                            num_classes=0).eval()  # fmt: skip
    vit.load_state_dict(load_file(str(export)), strict=True)
    mae = fastmae.from_pretrained(patch4_ckpt).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), mae.forward_features(x), rtol=1e-5, atol=1e-5)
    assert main(["visualize", "--checkpoint", str(patch4_ckpt), "--output", str(tmp_path / "v.png"), "--count",
                 "2"]) == 0  # fmt: skip
    from PIL import Image

    with Image.open(tmp_path / "v.png") as im:  # without --images: the digits' validation split, in gray
        assert im.size == (3 * 32 * 4, 2 * 32 * 4 + 34)  # the run's picture scale, under the header
        rgb = np.asarray(im.convert("RGB"))
    assert (rgb[..., 0] == rgb[..., 2]).all() and len(np.unique(rgb[34:])) > 16
    capsys.readouterr()


def test_model_that_disagrees_with_the_checkpoint_is_one_line(patch4_ckpt, tmp_path, capsys):
    code = main(["finetune", "--preset", "digits", "--pretrained", str(patch4_ckpt), "--model", "mae_vit_tiny_patch16",
                 *FAST, "--output-dir", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "is a ViT with patch 4, width 192, 6 blocks, not mae_vit_tiny_patch16 (patch 16, width 192" in err[0]
    code = main(["pretrain", "--preset", "digits", "--pretrained", str(patch4_ckpt), "--model", "mae_vit_tiny_patch4",
                 *FAST, "--output-dir", str(tmp_path / "p")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--model mae_vit_tiny_patch4 disagrees with checkpoint" in err[0] and "mae_vit_mini_patch4" in err[0]
    # the output folder instead of its checkpoint (it has a config.json, but not a transformers one)
    code = main(["finetune", "--pretrained", str(patch4_ckpt.parent), *FAST, "--output-dir", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"is a run's output folder; its checkpoint is {patch4_ckpt}" in err[0]


def test_digits_presets_differ_from_the_paper_only_where_said():
    pre, ft, lp = PRESETS["digits"], FINETUNE_PRESETS["digits"], LINPROBE_PRESETS["digits"]
    assert pre.data == "digits" and pre.model == "mae_vit_mini_patch4" and pre.img_size == 32 and pre.norm_pix_loss
    assert pre.mask_ratio == 0.75 and (pre.beta1, pre.beta2, pre.weight_decay) == (0.9, 0.95, 0.05)
    assert ft.pretrained == lp.pretrained == "output/digits/checkpoint-last.pth"
    assert (ft.mixup, ft.cutmix, ft.rand_augment, ft.reprob, ft.hflip) == (0.0, 0.0, "none", 0.0, 0.0)
    assert (ft.layer_decay, ft.drop_path, ft.smoothing) == (0.75, 0.1, 0.1)


def test_payoff_command_writes_json_and_png(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import digits_payoff

    out = tmp_path / "payoff.json"
    result = digits_payoff.main(["--seeds", "0,1", "--work", str(tmp_path / "work"), "--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["env"]["torch"] == torch.__version__ and saved["seeds"] == [0, 1] and saved["quick"] is True
    kinds = [(r["kind"], r.get("init"), r["seed"]) for r in saved["rows"]]
    assert kinds.count(("finetune", "mae", 1)) == 1 and kinds.count(("linprobe", "scratch", 0)) == 1
    assert len(saved["finetune_top1"]["mae"]) == 2 and np.isfinite(saved["gain"])
    assert result["gain"] == pytest.approx(saved["finetune_top1_mean"]["mae"] - saved["finetune_top1_mean"]["scratch"])
    assert out.with_suffix(".png").stat().st_size > 10_000
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- digits-payoff:start -->\nold\n<!-- digits-payoff:end -->\nafter\n")
    digits_payoff.main(["--report", str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and text.endswith("after\n") and "| finetune, best epoch |" in text
    assert f"benchmarks/results/{out.name}" in text
