"""Finetune, linear probe and interop: layer decay, position tables, timm export, official checkpoints, commands."""

import concurrent.futures
import json
import math
import os
import signal
import sys
import uuid

import numpy as np
import pytest
import timm
import torch
from fastmae.train.data.labelled import digits_folder
from fastmae.train.evaluate import knn_classify, layer_decay_groups
from fastmae.train.procs import finish, pids_with, start, torchrun_cmd, wait_for_step

import fastmae
from fastmae.cli import main
from fastmae.interop import create_vit, interpolate_pos_embed, load_encoder, read_state_dict
from fastmae.pos_embed import sincos_1d, sincos_2d

from ._util import noise_pngs, torchrun

TINY = "mae_vit_tiny_patch16"
FAST = ["--img-size", "32", "--num-workers", "0", "--no-progress", "--log-every", "5"]


@pytest.fixture(scope="module")
def official_ckpts(tmp_path_factory):
    """A full MAE state_dict and its encoder-only half, both in the official {"model": ...} format."""
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    full = fastmae.create_model(TINY, kernels="reference").state_dict()
    encoder = {k: v for k, v in full.items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": full}, root / "mae_full.pth")
    torch.save({"model": encoder}, root / "mae_pretrain_vit_tiny.pth")
    return root


def _official_layer_id(name: str, depth: int) -> int:
    """facebookresearch/mae util/lr_decay.py get_layer_id_for_vit, written out again."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_layer_decay_groups_match_the_official_rule():
    model = create_vit("mae_vit_small_patch16", 7, 32, "avg")
    depth, decay, wd = len(model.blocks), 0.65, 0.05
    got, names = {}, {id(p): n for n, p in model.named_parameters()}
    for group in layer_decay_groups(model, wd, decay):
        for p in group["params"]:
            got[names[id(p)]] = (group["lr_scale"], group["weight_decay"])
    assert len(got) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        scale = decay ** (depth + 1 - _official_layer_id(name, depth))
        no_wd = p.ndim == 1 or name in ("cls_token", "pos_embed")
        assert got[name] == (pytest.approx(scale), 0.0 if no_wd else wd), name
    assert got["head.weight"][0] == 1.0 and got["pos_embed"][0] == pytest.approx(decay ** (depth + 1))
    assert got["blocks.0.attn.qkv.weight"][0] == pytest.approx(decay**depth)


def test_pos_embed_interpolation():
    dim = 64
    square = sincos_2d(dim, 4, 4, cls_token=True).unsqueeze(0)
    assert interpolate_pos_embed(square, 4) is square  # identity at the same size
    wide = interpolate_pos_embed(square, (3, 5))  # sin-cos: regenerated for the new grid, not resized
    assert wide.shape == (1, 1 + 15, dim)
    torch.testing.assert_close(wide[0], sincos_2d(dim, 3, 5, cls_token=True), rtol=0, atol=0)
    # same channel layout as the square table (the official one): the first half of the channels depends only on
    # the patch's column, the second only on its row
    grid = wide[0, 1:].reshape(3, 5, dim)
    cols, rows = sincos_1d(dim // 2, torch.arange(5.0)), sincos_1d(dim // 2, torch.arange(3.0))
    assert torch.equal(grid[:, :, : dim // 2], cols.expand(3, 5, -1))
    assert torch.equal(grid[:, :, dim // 2 :], rows[:, None].expand(3, 5, -1))
    # learned tables: bicubic as an image, the cls row kept
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 4).view(4, 1, 1).expand(4, 4, dim).reshape(1, 16, dim)
    learned = torch.cat([torch.randn(1, 1, dim), ramp + 0.01 * torch.randn(1, 16, dim)], dim=1)
    out = interpolate_pos_embed(learned, (8, 6))
    assert out.shape == (1, 49, dim) and torch.equal(out[:, :1], learned[:, :1])
    rows = out[0, 1:].reshape(8, 6, dim).mean(dim=(1, 2))
    assert (rows.diff() > 0).all()  # the ramp along the rows survives the resize
    with pytest.raises(fastmae.FastMAEError, match="not a square grid"):
        interpolate_pos_embed(learned[:, :15], 4)


def test_models_accept_a_non_square_img_size(tmp_path):
    mae = fastmae.create_model(TINY, img_size=(32, 48), kernels="reference")
    assert mae.patch_embed.grid_size == (2, 3)
    torch.testing.assert_close(mae.pos_embed[0], sincos_2d(192, 2, 3, cls_token=True), rtol=0, atol=0)
    imgs = torch.randn(2, 3, 32, 48)
    loss, pred, mask = mae(imgs, mask_ratio=0.5)
    assert pred.shape == (2, 6, 768) and mae.unpatchify(pred).shape == imgs.shape and loss.isfinite()
    ckpt = _save({"model": mae.state_dict(), "config": {"model": TINY, "img_size": [32, 48]}}, tmp_path / "ns.pth")
    vit = create_vit(TINY, 5, (32, 48))
    load_encoder(vit, ckpt, TINY)
    assert torch.equal(vit.pos_embed, mae.pos_embed) and vit(imgs).shape == (2, 5)
    tall = create_vit(TINY, 5, (48, 32))  # the 2x3 table regenerated for 3x2
    load_encoder(tall, ckpt, TINY)
    torch.testing.assert_close(tall.pos_embed[0], sincos_2d(192, 3, 2, cls_token=True))
    assert tall(torch.randn(1, 3, 48, 32)).shape == (1, 5)


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_export_to_timm_loads_strictly_and_features_match(tmp_path, capsys):
    torch.manual_seed(1)
    mae = fastmae.create_model(TINY, kernels="reference").eval()
    ckpt = _save({"model": mae.state_dict(), "config": {"model": TINY, "img_size": 224}}, tmp_path / "c.pth")
    x = torch.randn(2, 3, 224, 224)
    for out in (tmp_path / "enc.safetensors", tmp_path / "enc.pth"):
        assert main(["export", str(ckpt), str(out), "--to", "timm"]) == 0
        assert 'timm.create_model("vit_tiny_patch16_224", num_classes=0)' in capsys.readouterr().out
        sd, _ = read_state_dict(out)
        vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False).eval()
        vit.load_state_dict(sd, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(vit.forward_features(x), mae.forward_features(x), rtol=1e-5, atol=1e-5)
    # another resolution: the sin-cos table regenerated; timm made at that size loads it strictly
    assert main(["export", str(ckpt), str(tmp_path / "e64.pth"), "--img-size", "64"]) == 0
    assert "img_size=64" in capsys.readouterr().out
    small = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64)
    small.load_state_dict(torch.load(tmp_path / "e64.pth", weights_only=True), strict=True)
    torch.testing.assert_close(small.pos_embed[0].detach(), sincos_2d(192, 4, 4, cls_token=True))
    # the official encoder-only format
    assert main(["export", str(ckpt), str(tmp_path / "off.pth"), "--to", "official"]) == 0
    off = torch.load(tmp_path / "off.pth", weights_only=True)
    assert set(off) == {"model"} and not any(k.startswith(("decoder", "mask_token")) for k in off["model"])
    assert off["model"].keys() == sd.keys()


def _timm_from_export(args, capsys) -> torch.nn.Module:
    """Run ``fastmae export ARGS`` and build the model the printed line says, with the weights it wrote (strict)."""
    assert main(["export", *args]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    build = line.split("; model = ")[1].split("; model.load_state_dict")[0]
    from functools import partial

    model = eval(build, {"timm": timm, "torch": torch, "nn": torch.nn, "partial": partial})
    model.load_state_dict(read_state_dict(args[1])[0], strict=True)
    return model.eval()


def check_finetune_export(ckpt, tmp_path, capsys, size: int) -> str:
    """A finetune checkpoint exported for timm: the printed call builds the model with its head (classes, global
    pool + fc_norm) and it computes fastmae's logits. Returns the call."""
    saved = torch.load(ckpt, weights_only=True)
    classes = saved["model"]["head.weight"].shape[0]
    ours = create_vit(saved["config"]["arch"], classes, size).eval()  # the model fastmae finetune trains
    ours.load_state_dict(saved["model"], strict=True)
    x = torch.randn(3, saved["config"]["arch"]["in_chans"], size, size)
    for out in (tmp_path / "ft.safetensors", tmp_path / "ft.pth"):
        theirs = _timm_from_export([str(ckpt), str(out), "--to", "timm"], capsys)
        assert theirs.num_classes == classes and theirs.global_pool == "avg"
        with torch.no_grad():
            torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
    assert main(["export", str(ckpt), str(tmp_path / "again.pth")]) == 0
    return capsys.readouterr().out.splitlines()[-1].split("; model = ")[1].split("; model.")[0]


@pytest.mark.parametrize("model, size, call", [
    (TINY, 224, 'timm.create_model("vit_tiny_patch16_224", num_classes=7, global_pool="avg")'),
    ("mae_vit_mini_patch4", 32, "timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, "
     'in_chans=3, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4, num_classes=7, global_pool="avg")'),
])  # fmt: skip
def test_export_a_finetuned_model_to_timm_with_its_head(model, size, call, tmp_path, capsys):
    torch.manual_seed(2)
    vit = create_vit(model, 7, size)  # a finetuned ViT as fastmae finetune saves it (random weights)
    for p in vit.parameters():
        p.data.normal_(0, 0.05)
    arch = {**fastmae.models.named_arch(model), "img_size": size}
    ckpt = _save({"model": vit.state_dict(), "config": {"model": model, "arch": arch, "num_classes": 7}},
                 tmp_path / "ft.pth")  # fmt: skip
    assert check_finetune_export(ckpt, tmp_path, capsys, size) == call


def test_official_checkpoints_load_into_the_finetune_model(official_ckpts):
    for name in ("mae_full.pth", "mae_pretrain_vit_tiny.pth"):
        vit = create_vit(TINY, 10, 32, "avg")
        missing, unexpected = load_encoder(vit, official_ckpts / name, TINY)
        assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        assert sorted(unexpected) == ["norm.bias", "norm.weight"]  # global pool uses fc_norm instead, as official
        sd = torch.load(official_ckpts / name, weights_only=True)["model"]
        assert torch.equal(vit.blocks[3].mlp.fc1.weight, sd["blocks.3.mlp.fc1.weight"])
        torch.testing.assert_close(vit.pos_embed[0], sincos_2d(192, 2, 2, cls_token=True))  # 224 -> 32 px, regenerated
        assert vit.head.weight.std() < 1e-4  # the official head init (trunc normal, std 2e-5)
    probe = create_vit(TINY, 0, 32, "token")  # linear probe: cls token through the pretrained norm
    missing, unexpected = load_encoder(probe, official_ckpts / "mae_full.pth", TINY)
    assert missing == [] and unexpected == []


def test_wrong_architecture_is_one_line(official_ckpts, tmp_path, capsys):
    code = main(["finetune", *FAST, "--model", "mae_vit_small_patch16", "--pretrained",
                 str(official_ckpts / "mae_full.pth"), "--output-dir", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "is a ViT with patch 16, width 192, 12 blocks, not mae_vit_small_patch16 (patch 16, width 384" in err[0]
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["export", str(tmp_path / "junk.pth"), str(tmp_path / "x.pth")]) == 2
    assert "junk.pth is not a PyTorch checkpoint" in capsys.readouterr().err


def test_finetune_on_digits_learns_then_resumes(official_ckpts, tmp_path, capsys):
    """An RGB checkpoint finetuned on the one-band digits (its patch embedding adapted by timm's rule), the paper's
    recipe stopped mid-epoch and resumed."""
    out = tmp_path / "ft"
    args = ["finetune", *FAST, "--epochs", "2", "--warmup-epochs", "0.2", "--batch-size", "32", "--blr", "4e-3",
            "--pretrained", str(official_ckpts / "mae_pretrain_vit_tiny.pth"), "--output-dir", str(out)]  # fmt: skip
    assert main([*args, "--mixup", "0", "--cutmix", "0"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 88 and s["num_classes"] == 10 and s["loader"] == "torchvision"
    assert s["val_loss"] < 0.9 * s["val_loss_start"] and s["top1"] > s["top1_start"] + 15, s
    assert sorted(s["missing_keys"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    assert best["best_top1"] == s["best_top1"] and best["model"]["head.weight"].shape == (10, 192)
    assert best["model"]["patch_embed.proj.weight"].shape[1] == 1 and best["config"]["bands"]["count"] == 1
    assert check_finetune_export(out / "checkpoint-best.pth", tmp_path, capsys, 32) == (  # the run's own checkpoint
        "timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=16, in_chans=1, embed_dim=192, "
        'depth=12, num_heads=3, mlp_ratio=4, num_classes=10, global_pool="avg")')
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "top1" in r] == [1, 2]
    # the paper's full recipe (mixup + cutmix + smoothing, EMA), stopped mid-epoch and resumed
    mix = tmp_path / "mix"
    recipe = [*args[:-1], str(mix), "--ema", "--ema-decay", "0.9"]
    assert main([*recipe, "--stop-after-steps", "30"]) == 0
    mid = torch.load(mix / "checkpoint-last.pth", weights_only=True)
    assert mid["step"] == 30 and mid["data_position"] == [0, 30] and "ema" in mid
    assert main([*recipe, "--resume", "auto"]) == 0
    s = json.loads((mix / "summary.json").read_text())
    assert s["steps"] == 88 and s["ema_top1"] is not None
    logged = [r["step"] for r in map(json.loads, (mix / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged[logged.index(30) + 1] == 35  # the step count goes on after the resume


def test_finetune_with_dali_loader(labelled, tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "dali"  # DALI reads 8-bit pictures (the digits are one-band rasters)
    assert main(["finetune", *FAST, "--loader", "dali", "--data", str(labelled), "--stop-after-steps", "3",
                 "--batch-size", "4", "--output-dir", str(out)]) == 0  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    assert s["loader"] == "dali" and s["steps"] == 3 and 0 <= s["top1"] <= 100


def test_linprobe_several_lrs_and_knn(official_ckpts, tmp_path, capsys):
    out = tmp_path / "lp"
    assert main(["linprobe", *FAST, "--epochs", "4", "--pretrained", str(official_ckpts / "mae_full.pth"),
                 "--probe-blrs", "25,400", "--output-dir", str(out)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "| linear, blr 25 |" in table and "| kNN, k=20, t=0.07 |" in table
    s = json.loads((out / "summary.json").read_text())
    assert [p["blr"] for p in s["probes"]] == [25, 400] and s["knn"]["k"] == 20
    assert s["probes"][0]["lr"] == pytest.approx(25 * 64 / 256)
    best = s["probes"][s["best_probe"]]
    assert best["top1"] > max(p["top1_start"] for p in s["probes"]) + 15, s["probes"]  # chance is 10%
    assert min(p["val_loss"] for p in s["probes"]) < 0.9 * s["probes"][0]["val_loss_start"], s["probes"]
    assert s["knn"]["top1"] > 30
    probes = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    assert probes["0.1.weight"].shape == (10, 192) and "0.0.running_mean" in probes  # BN without affine: no weight
    assert "0.0.weight" not in probes


def test_knn_classify_on_separable_points():
    torch.manual_seed(0)
    centers = torch.randn(3, 16) * 5
    train_y = torch.arange(3).repeat_interleave(20)
    train_f = centers[train_y] + torch.randn(60, 16)
    test_y = torch.tensor([2, 0, 1, 1])
    res = knn_classify(train_f, train_y, centers[test_y] + 0.1 * torch.randn(4, 16), test_y, 3, k=5, t=0.07)
    assert res["top1"] == 100.0 and res["top5"] == 100.0 and res["k"] == 5


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A tiny ImageFolder with train/ and val/: 2 classes x 10 training images, 7 validation images (an odd count,
    so two ranks score unequal shards)."""
    root = tmp_path_factory.mktemp("labelled")
    for split, counts in (("train", (10, 10)), ("val", (4, 3))):
        for c, count in enumerate(counts):
            noise_pngs(root / split / f"class{c}", count, seed=10 * c + len(split))
    return root


def _rows(out, key):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_two_process_finetune_matches_one_process(labelled, official_ckpts, tmp_path):
    """torchrun, 2 gloo processes with DDP (batch 1 x accum 2 each, so no_sync runs) against one process with batch 4
    on the same global batches: same losses, weights and validation scores (each val image counted once)."""
    base = ["finetune", *FAST, "--log-every", "1", "--data", str(labelled), "--epochs", "2", "--warmup-epochs", "1",
            "--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--blr", "1e-2", "--precision", "fp32",
            "--pretrained", str(official_ckpts / "mae_pretrain_vit_tiny.pth")]  # fmt: skip
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*base, "--batch-size", "4", "--output-dir", str(single)]) == 0
    proc = torchrun([*base, "--batch-size", "1", "--accum-iter", "2", "--output-dir", str(ddp)])
    assert proc.stdout.count("done: 10 steps") == 1  # rank 1 stays quiet
    one, two = (json.loads((o / "summary.json").read_text()) for o in (single, ddp))
    assert two["world_size"] == 2 and two["ranks_in_sync"] and two["images_seen"] == one["images_seen"] == 40
    assert json.loads((ddp / "config.json").read_text())["effective_batch"] == 4
    assert [r["step"] for r in _rows(ddp, "loss")] == list(range(1, 11))
    np.testing.assert_allclose([r["loss"] for r in _rows(ddp, "loss")], [r["loss"] for r in _rows(single, "loss")],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    for key in ("val_loss", "top1", "top5", "val_loss_start", "top1_start"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    assert [r["top1"] for r in _rows(ddp, "top1")] == [r["top1"] for r in _rows(single, "top1")]
    want = torch.load(single / "checkpoint-last.pth", weights_only=True)
    got = torch.load(ddp / "checkpoint-last.pth", weights_only=True)
    assert len(got["rng"]) == 2  # every rank's generators
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_two_process_linprobe_matches_one_process(labelled, official_ckpts, tmp_path):
    """The ranks split the encoder work, every rank trains the probes on the gathered global batch: same probes,
    batch-norm statistics, validation scores and kNN as one process."""
    mae = str(official_ckpts / "mae_full.pth")
    base = ["linprobe", *FAST, "--data", str(labelled), "--epochs", "3", "--warmup-epochs", "1", "--precision", "fp32",
            "--probe-blrs", "100,400", "--knn-k", "15", "--pretrained", mae]  # fmt: skip
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main([*base, "--batch-size", "4", "--output-dir", str(single)]) == 0
    proc = torchrun([*base, "--batch-size", "2", "--output-dir", str(ddp)])
    assert proc.stdout.count("| kNN, k=15") == 1  # more than one rank's 10 images: candidates merged
    one, two = (json.loads((o / "summary.json").read_text()) for o in (single, ddp))
    assert two["world_size"] == 2 and two["ranks_in_sync"] and two["val_images"] == one["val_images"] == 7
    assert two["steps"] == one["steps"] == 15 and two["images_seen"] == 60
    assert two["knn"] == one["knn"]
    for a, b in zip(two["probes"], one["probes"], strict=True):
        assert a["lr"] == b["lr"] == pytest.approx(float(a["blr"]) * 4 / 256)
        for key in ("top1", "top5", "val_loss", "top1_start"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    want = torch.load(single / "checkpoint-last.pth", weights_only=True)["model"]
    got = torch.load(ddp / "checkpoint-last.pth", weights_only=True)["model"]
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_linprobe_resumes_mid_epoch_exactly(labelled, official_ckpts, tmp_path, capsys):
    mae = str(official_ckpts / "mae_full.pth")
    base = ["linprobe", *FAST, "--data", str(labelled), "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "4",
            "--knn-k", "0", "--pretrained", mae]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    base_two = [*base, "--probe-blrs", "100,400"]
    assert main([*base_two, "--output-dir", str(whole)]) == 0
    assert main([*base_two, "--output-dir", str(parts), "--stop-after-steps", "7"]) == 0
    mid = torch.load(parts / "checkpoint-last.pth", weights_only=True)
    assert mid["step"] == 7 and mid["data_position"] == [1, 2]  # 5 steps per epoch: 2 batches into the second
    assert main([*base_two, "--output-dir", str(parts), "--resume", "auto"]) == 0
    a, b = (torch.load(o / "checkpoint-last.pth", weights_only=True) for o in (whole, parts))
    assert a["step"] == b["step"] == 15
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    s = json.loads((parts / "summary.json").read_text())
    assert s["probes"][0]["top1_start"] == json.loads((whole / "summary.json").read_text())["probes"][0]["top1_start"]
    capsys.readouterr()
    # a checkpoint of other probes (here two, asked for one) is refused with one line
    assert main([*base, "--probe-blrs", "100", "--output-dir", str(parts), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not hold 1 probe(s) of 192 features x 2 classes" in err[0], err


def test_digits_are_written_once_even_by_processes_starting_together(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMAE_CACHE", str(tmp_path))
    (tmp_path / "digits-v2" / "val").mkdir(parents=True)  # an incomplete copy from an interrupted first run
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        roots = list(pool.map(lambda _: digits_folder(), range(2)))
    assert roots[0] == roots[1] == tmp_path / "digits-v2"
    assert len(list(roots[0].rglob("*.npy"))) == 1797 and (roots[0] / "done").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["digits-v2"]  # no private copy left behind


@pytest.mark.parametrize(
    "args, message",
    [
        (["linprobe", "--save-every", "0"], "--save-every must be positive, got 0"),
        (["finetune", "--stop-after-steps", "-1"], "--stop-after-steps must be positive, got -1"),
        (["linprobe", "--resume", "/nonexistent/probes.pth"], "--resume /nonexistent/probes.pth does not exist"),
    ],
)
def test_downstream_bad_flags_are_one_line(args, message, tmp_path, capsys):
    assert main([*args, *FAST, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_finetune_resumes_mid_epoch_exactly(labelled, official_ckpts, tmp_path):
    """The full recipe (mixup + cutmix, label smoothing, drop path, random erasing, EMA) stopped mid-epoch and resumed
    ends with the same weights, bit for bit, as an uninterrupted run: data, augmentations and every generator resume."""
    base = ["finetune", *FAST, "--data", str(labelled), "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "4",
            "--drop-path", "0.1", "--ema", "--ema-decay", "0.9", "--pretrained",
            str(official_ckpts / "mae_pretrain_vit_tiny.pth")]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*base, "--output-dir", str(whole)]) == 0
    assert main([*base, "--output-dir", str(parts), "--stop-after-steps", "7"]) == 0
    assert torch.load(parts / "checkpoint-last.pth", weights_only=True)["data_position"] == [1, 2]
    assert main([*base, "--output-dir", str(parts), "--resume", "auto"]) == 0
    a, b = (torch.load(o / "checkpoint-last.pth", weights_only=True) for o in (whole, parts))
    assert a["step"] == b["step"] == 10
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), (part, key)


def _downstream(command, labelled, official_ckpts, epochs):
    """A finetune or linprobe run on ``labelled``: batch 4 over 20 images (5 steps an epoch), every step logged."""
    base = [command, *FAST, "--log-every", "1", "--data", str(labelled), "--epochs", str(epochs), "--warmup-epochs",
            "1", "--batch-size", "4", "--seed", "3"]  # fmt: skip
    if command == "finetune":
        return [*base, "--drop-path", "0.1", "--pretrained", str(official_ckpts / "mae_pretrain_vit_tiny.pth")]
    return [*base, "--probe-blrs", "100,400", "--knn-k", "0", "--pretrained", str(official_ckpts / "mae_full.pth")]


@pytest.mark.parametrize("command, epochs", [("finetune", 8), ("linprobe", 16)])  # long enough to be signalled
def test_stopped_by_sigterm_then_resumed_equals_the_uninterrupted_run(command, epochs, labelled, official_ckpts,
                                                                       tmp_path):  # fmt: skip
    """A real SIGTERM (preemption) at whatever step it lands: the run finishes that step, saves and exits 0; the same
    command with --resume auto ends with the uninterrupted run's weights and optimizer state, bit for bit."""
    args, steps = _downstream(command, labelled, official_ckpts, epochs), 5 * epochs
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main([*args, "--output-dir", str(whole)]) == 0
    threads = str(torch.get_num_threads())  # as this process computes: the same sums, bit for bit
    proc = start([sys.executable, "-m", "fastmae.cli", *args, "--output-dir", str(parts)],
                 {**os.environ, "OMP_NUM_THREADS": threads})  # fmt: skip
    assert wait_for_step(proc, parts, 3), "the run ended before the signal"
    proc.send_signal(signal.SIGTERM)
    code, log, hung = finish(proc, 120)
    assert code == 0 and not hung and "Traceback" not in log, log[-3000:]
    stopped = json.loads((parts / "summary.json").read_text())
    mid = torch.load(parts / "checkpoint-last.pth", weights_only=True)
    assert stopped["stopped_by"] == "SIGTERM" and 3 <= mid["step"] == stopped["steps"] < steps, stopped
    assert main([*args, "--output-dir", str(parts), "--resume", "auto"]) == 0
    a, b = (torch.load(o / "checkpoint-last.pth", weights_only=True) for o in (whole, parts))
    assert a["step"] == b["step"] == steps
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    for idx, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(b["optimizer"]["state"][idx][name], value), (idx, name)


def test_nan_in_finetune_is_skipped_and_counted_then_rolled_back(labelled, official_ckpts, tmp_path, monkeypatch,
                                                                  caplog):  # fmt: skip
    """A non-finite loss in finetuning is the NaN guard's, as in pretraining: the update is skipped on the device and
    counted (no error); three in a row roll the weights back to the last checkpoint and the run goes on."""
    import fastmae.train.finetune as ft

    bad_calls, calls = {2, 8, 9, 10}, [0]  # training forward calls (= steps here): one alone, then three in a row

    def poisoned(*args, **kw):
        model = create_vit(*args, **kw)
        forward = model.forward

        def forward_with_nan(x):
            out = forward(x)
            if model.training:
                calls[0] += 1
                if calls[0] in bad_calls:
                    out = out * float("nan")
            return out

        model.forward = forward_with_nan
        return model

    monkeypatch.setattr(ft, "create_vit", poisoned)
    out = tmp_path / "nan"
    args = [*_downstream("finetune", labelled, official_ckpts, epochs=3), "--mixup", "0", "--cutmix", "0",
            "--save-every", "5", "--compile", "off", "--output-dir", str(out)]  # fmt: skip
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 15 and s["nan_skipped"] == 4 and s["rollbacks"] == 1, s
    rows = _rows(out, "nan_skipped")
    assert [r["step"] for r in rows if r["loss"] is None] == [2, 8, 9, 10]
    assert [r["nan_skipped"] for r in rows][:3] == [0, 1, 1] and rows[-1]["nan_skipped"] == 4
    assert "rolled back to" in caplog.text and "(step 5)" in caplog.text  # the last checkpoint before the three
    weights = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert math.isfinite(s["val_loss"])


def test_finetune_with_a_rank_sigkilled_ends_in_one_line_on_the_survivor(labelled, official_ckpts, tmp_path):
    """torchrun, 2 gloo processes, no restarts: rank 1 SIGKILLed mid-run. Rank 0's collective fails; it saves the last
    whole step alone and ends with one line, no traceback, no hang; --resume auto then finishes the run."""
    out, marker = tmp_path / "run", uuid.uuid4().hex
    args = [*_downstream("finetune", labelled, official_ckpts, epochs=6), "--batch-size", "2", "--no-tensorboard",
            "--output-dir", str(out), "--resume", "auto"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "FASTMAE_TEST_RUN": marker}
    proc = start(torchrun_cmd(args), env)
    assert wait_for_step(proc, out, 3, timeout=180), "the run ended before the kill"
    os.kill(pids_with(marker, rank="1")[0], signal.SIGKILL)
    code, log, hung = finish(proc, 120)
    assert code != 0 and not hung, log[-3000:]
    lines = [line for line in log.splitlines() if "fastmae: error:" in line]
    assert len(lines) == 1 and "rank 0 of 2: lost another rank" in lines[0] and "; saved " in lines[0], log[-3000:]
    assert "Traceback" not in log.split("lost another rank")[0][-2000:]
    step = torch.load(out / "checkpoint-last.pth", weights_only=True)["step"]
    assert step >= 3 and f"after step {step};" in lines[0]
    code, log, _ = finish(start(torchrun_cmd(args), {**env, "FASTMAE_TEST_RUN": uuid.uuid4().hex}), 300)
    assert code == 0, log[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 30
