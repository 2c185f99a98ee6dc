"""Hugging Face transformers interop: ViTMAE folders in (same loss, pred, mask), fastmae out (loads with no missing
keys, computes the same), the exact round trip, and continued pretraining from every kind of source."""

import json

import pytest
import torch
from fastmae.train.noise import mask_noise

import fastmae
from fastmae import hf
from fastmae.cli import main

transformers = pytest.importorskip("transformers")

# a non-224, non-square-friendly size: 48 px, patch 8 -> 6 x 6 = 36 patches; widths not powers of two
SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192, image_size=48,
             patch_size=8, decoder_hidden_size=40, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
             decoder_intermediate_size=160, mask_ratio=0.75)  # fmt: skip


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every tensor random (not the initialisation), position tables included, so that any mix-up of names,
    q/k/v order or transposes shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _hf_model(norm_pix: bool, seed: int = 0):
    cfg = transformers.ViTMAEConfig(**SMALL, norm_pix_loss=norm_pix)
    model = transformers.ViTMAEForPreTraining(cfg).eval()
    _randomize(model, seed)
    return model


def _inputs(n: int, size: int = 48, patches: int = 36, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.rand(n, patches, generator=g)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_transformers_folder_loads_and_computes_the_same(norm_pix, tmp_path):
    ref = _hf_model(norm_pix)
    ref.save_pretrained(tmp_path / "hf")
    model = fastmae.from_pretrained(tmp_path / "hf", kernels="reference").eval()
    assert model.norm_pix_loss is norm_pix and model.norm.eps == ref.config.layer_norm_eps
    imgs, noise = _inputs(3)
    with torch.no_grad():
        want = ref(pixel_values=imgs, noise=noise)
        loss, pred, mask = model(imgs, mask_ratio=ref.config.mask_ratio, noise=noise)
    assert torch.equal(mask, want.mask)
    torch.testing.assert_close(pred, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, want.loss, rtol=1e-5, atol=1e-6)
    # the weight file alone, with its config.json beside it, reads the same
    again = fastmae.from_pretrained(tmp_path / "hf" / "model.safetensors", kernels="reference")
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_export_loads_in_transformers_and_round_trips_exactly(tmp_path, capsys):
    torch.manual_seed(0)
    src = fastmae.create_model("mae_vit_tiny_patch16", img_size=48, patch_size=8, depth=2, norm_pix_loss=True,
                               kernels="reference").eval()  # fmt: skip
    _randomize(src, 3)
    arch = fastmae.models.model_arch(src)
    torch.save({"model": src.state_dict(), "config": {"arch": arch}}, tmp_path / "ckpt.pth")
    assert main(["export", str(tmp_path / "ckpt.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "ViTMAEForPreTraining.from_pretrained" in capsys.readouterr().out
    ref, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref.eval()
    imgs, noise = _inputs(2)
    with torch.no_grad():
        want = ref(pixel_values=imgs, noise=noise)
        loss, pred, mask = src(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, want.mask)
    torch.testing.assert_close(pred, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, want.loss, rtol=1e-5, atol=1e-6)
    back = fastmae.from_pretrained(tmp_path / "hf", kernels="reference")  # fastmae -> transformers -> fastmae
    assert fastmae.models.model_arch(back) == arch
    for key, value in src.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    # the encoder alone, for ViTMAEModel: its last hidden state is fastmae's encoder output (same masks)
    assert main(["export", str(tmp_path / "ckpt.pth"), str(tmp_path / "enc"), "--to", "hf-encoder"]) == 0
    enc, info = transformers.ViTMAEModel.from_pretrained(tmp_path / "enc", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        latent, _, _ = src.forward_encoder(imgs, 0.75, noise)
        torch.testing.assert_close(enc.eval()(pixel_values=imgs, noise=noise).last_hidden_state, latent,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    # both folders start a finetune and a linear probe, the architecture read from them (no --model)
    for folder in ("hf", "enc"):
        for command in ("finetune", "linprobe"):
            out = tmp_path / f"{command}-{folder}"
            assert main([command, "--pretrained", str(tmp_path / folder), "--img-size", "32", "--num-workers", "0",
                         "--no-progress", "--stop-after-steps", "1", "--output-dir", str(out)]) == 0  # fmt: skip
            summary = json.loads((out / "summary.json").read_text())
            assert summary["pretrained"] == str(tmp_path / folder)
            assert set(summary["missing_keys"]) <= {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    capsys.readouterr()


def test_hub_spellings_fold_into_one_table():
    """The Hub layout, transformers 5's in-memory names and its save quirk all map to the same fastmae names."""
    ref = _hf_model(False)
    in_memory = ref.state_dict()  # transformers 5: vit.layers.N.attention.q_proj, decoder.decoder_layers.N...
    hub = hf.to_hub(hf.from_hub(in_memory))
    assert any(k.startswith("vit.encoder.layer.0.attention.attention.query") for k in hub)
    assert any(k.startswith("decoder.decoder_layers.1.attention.output.dense") for k in hub)
    quirk = {k.replace("decoder.decoder_layers.", "decoder.decoder_encoder.layer."): v for k, v in hub.items()}
    a, b = hf.from_hub(in_memory), hf.from_hub(quirk)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["blocks.0.attn.qkv.weight"][:48], hub["vit.encoder.layer.0.attention.attention.query.weight"])


def _first_loss(out) -> float:
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if "loss" in r)


def _synthetic_batch(size: int, patches: int, batch: int = 2, seed: int = 0):
    from fastmae.train.data import SyntheticLoader

    imgs = next(SyntheticLoader(size, batch, 64, seed, torch.device("cpu")).epoch(0)).images
    return imgs, mask_noise(seed, 0, torch.arange(batch), patches)


PRETRAIN = ["pretrain", "--loader", "synthetic", "--batch-size", "2", "--synthetic-images", "4", "--epochs", "1",
            "--warmup-epochs", "0", "--no-progress", "--log-every", "1", "--num-reconstructions", "1"]  # fmt: skip


def test_pretrain_continues_from_a_transformers_folder(tmp_path, capsys):
    ref = _hf_model(True)
    ref.save_pretrained(tmp_path / "hf")
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--pretrained", str(tmp_path / "hf"), "--output-dir", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] is None and cfg["img_size"] == 48 and cfg["norm_pix_loss"] is True  # all from the folder
    assert cfg["arch"]["norm_eps"] == ref.config.layer_norm_eps and cfg["arch"]["decoder_embed_dim"] == 40
    imgs, noise = _synthetic_batch(48, 36)
    with torch.no_grad():
        want = ref.train()(pixel_values=imgs, noise=noise).loss.item()
    assert _first_loss(out) == pytest.approx(want, rel=1e-5)
    # its checkpoint carries the architecture: visualize and export need nothing else
    assert main(["visualize", "--checkpoint", str(out / "checkpoint-last.pth"), "--output", str(tmp_path / "v.png"),
                 "--count", "2"]) == 0  # fmt: skip
    assert main(["export", str(out / "checkpoint-last.pth"), str(tmp_path / "again"), "--to", "hf"]) == 0
    capsys.readouterr()


def test_pretrain_continues_from_an_official_file(tmp_path, capsys):
    torch.manual_seed(0)
    src = fastmae.create_model("mae_vit_tiny_patch16", img_size=32, kernels="reference")
    _randomize(src, 5)
    with torch.no_grad():
        src.pos_embed.copy_(fastmae.create_model("mae_vit_tiny_patch16", img_size=32).pos_embed)
    torch.save({"model": src.state_dict()}, tmp_path / "mae_visualize_vit_tiny.pth")
    out = tmp_path / "run"
    args = [*PRETRAIN, "--pretrained", str(tmp_path / "mae_visualize_vit_tiny.pth"), "--output-dir", str(out)]
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "mae_vit_tiny_patch16" and cfg["img_size"] == 32  # read from the shapes
    imgs, noise = _synthetic_batch(32, 4)
    with torch.no_grad():
        want = src.train()(imgs, mask_ratio=0.75, noise=noise)[0].item()
    assert _first_loss(out) == pytest.approx(want, rel=1e-5)
    # an encoder-only file continues with a fresh decoder (a warning, not an error)
    enc = {k: v for k, v in src.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": enc}, tmp_path / "mae_pretrain_vit_tiny.pth")
    assert main([*PRETRAIN, "--pretrained", str(tmp_path / "mae_pretrain_vit_tiny.pth"), "--output-dir",
                 str(tmp_path / "enc")]) == 0  # fmt: skip
    capsys.readouterr()


def test_other_architectures_and_disagreements_are_one_line(tmp_path, capsys):
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64, image_size=16, patch_size=8))  # fmt: skip
    vit.save_pretrained(tmp_path / "vit")
    capsys.readouterr()  # transformers' own progress output
    for command in (["pretrain", *PRETRAIN[1:]], ["finetune", "--no-progress"], ["linprobe", "--no-progress"]):
        code = main([*command, "--pretrained", str(tmp_path / "vit"), "--output-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "holds a vit model, not ViT-MAE" in err[0], err
    _hf_model(False).save_pretrained(tmp_path / "mae")
    capsys.readouterr()
    code = main([*PRETRAIN, "--pretrained", str(tmp_path / "mae"), "--model", "mae_vit_base_patch16",
                 "--output-dir", str(tmp_path / "o2")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--model mae_vit_base_patch16 disagrees with checkpoint" in err[0] and "width 48" in err[0]
