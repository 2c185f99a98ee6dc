"""Training pieces: the lr schedule, weight-decay groups, atomic checkpoints, resumable loading, image modes."""

import math

import numpy as np
import pytest
import torch
from fastmae.train.checkpointer import load_checkpoint
from fastmae.train.data.decode import load_rgb
from fastmae.train.data.index import index_data
from fastmae.train.schedule import build_optimizer, lr_at
from PIL import Image

from fastmae import FastMAEError, MaskedAutoencoderViT
from fastmae.batching import choose_batch
from fastmae.config import PretrainConfig, preset
from fastmae.files import save_torch as save_checkpoint

from .conftest import SQUARE


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 1.0, 0.1, 4, 10) == 0
    assert lr_at(2, 1.0, 0.1, 4, 10) == pytest.approx(0.5)
    assert lr_at(4, 1.0, 0.1, 4, 10) == pytest.approx(1.0)
    assert lr_at(7, 1.0, 0.1, 4, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10, 1.0, 0.1, 4, 10) == pytest.approx(0.1)


def test_weight_decay_groups_skip_biases_norms_tokens():
    model = MaskedAutoencoderViT(**SQUARE)
    opt = build_optimizer(model, 1e-3, 0.05, (0.9, 0.95), fused=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= decay
    assert "pos_embed" not in decay | no_decay  # fixed, not trained
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)


def test_presets_follow_the_official_recipe():
    cfg = preset("mae_vit_large_patch16")
    # 4096 is the recipe's effective batch; the batch per process and the accumulation are chosen at the start
    assert (cfg.recipe_batch, cfg.batch_size, cfg.accum_iter) == (4096, None, None)
    assert (cfg.blr, cfg.warmup_epochs, cfg.weight_decay) == (1.5e-4, 40, 0.05)
    choose_batch(cfg, world=8, gpu_mem_gib=80)
    assert (cfg.batch_size, cfg.accum_iter) == (512, 1)
    assert cfg.effective_lr(8) == pytest.approx(1.5e-4 * 16) and cfg.norm_pix_loss
    with pytest.raises(FastMAEError, match="unknown preset"):
        preset("mae_vit_xl")
    with pytest.raises(FastMAEError, match="--loader must be one of"):
        PretrainConfig(loader="dali-nope").validate()


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the old file survived intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]  # no temp file left behind


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "c.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(FastMAEError, match=f"checkpoint {bad} is not a PyTorch checkpoint"):
        load_checkpoint(bad)


def test_every_image_mode_decodes_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (9, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.dstack([rgb, np.full((9, 5), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(rgb[:1, :1]).save(tmp_path / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (2, 300, 3), dtype=np.uint8)).save(tmp_path / "long.png")
    index = index_data(tmp_path)
    assert len(index) == 7
    for i in range(len(index)):
        img = load_rgb(index.read(i))
        assert img.mode == "RGB", index.keys[i]
    deep = np.asarray(load_rgb(tmp_path / "deep.png"))[..., 0]
    np.testing.assert_array_equal(deep, rgb[..., 0])  # 16-bit rescaled, not clipped to white


def test_index_labels_from_imagefolder_layout(tmp_path):
    for cls in ("b", "a"):
        (tmp_path / cls / "deeper").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / cls / "deeper" / "x.png")
    index = index_data(tmp_path)
    assert index.classes == ["a", "b"] and index.labels.tolist() == [0, 1]
