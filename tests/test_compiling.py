"""``--compile off|full|regional``: the same losses and gradients as eager, one compiled graph per block width, the
flags in every command, and the pairs that cannot run refused in one line. The compilers here are dynamo with
``aot_eager`` (forward and backward graphs traced as inductor gets them, run without code generation) and a counting
backend: what the variants differ in is the graphs dynamo makes, which these show in seconds. Inductor's compile
times are ``benchmarks/bench_compile.py``'s."""

import pytest
import torch
from torch import nn

from fastmae.cli import build_parser, config_from_args, main
from fastmae.compiling import DEFAULT_VARIANT, TensorDropPath, compile_model, repeated_blocks
from fastmae.config import FINETUNE_PRESETS, LINPROBE_PRESETS, FinetuneConfig, LinprobeConfig
from fastmae.models import create_model

TINY = dict(img_size=32, depth=3, decoder_depth=2, kernels="reference")


class CountingBackend:
    """A dynamo backend that runs each graph as traced and counts the graphs it was given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _loss_and_grads(variant: str, backend="aot_eager"):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch16", **TINY)
    run = compile_model(model, variant, backend=backend)
    imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(2, model.patch_embed.num_patches, generator=torch.Generator().manual_seed(2))
    loss, _, _ = run(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_full_and_regional_give_the_eager_loss_and_gradients():
    _, eager_loss, eager_grads = _loss_and_grads("off")
    for variant in ("full", "regional"):
        model, loss, grads = _loss_and_grads(variant)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == eager_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, eager_grads[name], rtol=1e-4, atol=1e-6, msg=f"{variant}: {name}")
    # regional compiles the blocks in place: the checkpoint keys stay the official ones (full's wrapper is apart)
    assert set(model.state_dict()) == set(create_model("mae_vit_tiny_patch16", **TINY).state_dict())


def test_regional_compiles_one_graph_per_block_width():
    counting = CountingBackend()
    _loss_and_grads("regional", backend=counting)
    assert counting.graphs == 2  # one encoder block, one decoder block: 5 blocks, 2 widths
    counting = CountingBackend()
    _loss_and_grads("full", backend=counting)
    assert counting.graphs == 1


def test_finetune_blocks_of_different_drop_path_rates_share_one_graph():
    from timm.models.vision_transformer import VisionTransformer

    torch._dynamo.reset()
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=4, num_heads=4, num_classes=5,
                            drop_path_rate=0.3)  # rates 0, 0.1, 0.2, 0.3 along the depth  # fmt: skip
    counting = CountingBackend()
    compile_model(vit.train(), "regional", backend=counting)
    keeps = [b.drop_path1.keep.item() for b in repeated_blocks(vit)]
    assert keeps == pytest.approx([1.0, 0.9, 0.8, 0.7])  # timm's rates kept, as tensors
    vit(torch.randn(2, 3, 32, 32)).sum().backward()
    assert counting.graphs == 1  # timm's float rates would compile once per block
    assert not any(k.endswith(".keep") for k in vit.state_dict())  # checkpoints unchanged


def test_tensor_drop_path_keeps_a_branch_with_its_probability_and_unbiased():
    torch.manual_seed(0)
    drop = TensorDropPath(0.25).train()
    out = drop(torch.ones(20000, 3))
    kept = out[:, 0] != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02  # per sample, whole rows
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / 0.75))
    assert out.mean().item() == pytest.approx(1, abs=0.03)
    x = torch.randn(4, 3)
    assert torch.equal(drop.eval()(x), x)


def _config(argv, cls=None, presets=None):
    args = build_parser().parse_args(argv)
    return config_from_args(args) if cls is None else config_from_args(args, cls, presets)


@pytest.mark.parametrize("command,cls,presets", [("pretrain", None, None),
                                                 ("finetune", FinetuneConfig, FINETUNE_PRESETS),
                                                 ("linprobe", LinprobeConfig, LINPROBE_PRESETS)])  # fmt: skip
def test_compile_flags_in_every_command(command, cls, presets):
    extra = ["--pretrained", "none"] if cls is not None else []
    assert _config([command, *extra], cls, presets).compile is None  # the device decides: compiled on CUDA
    assert _config([command, *extra, "--compile"], cls, presets).compile == DEFAULT_VARIANT
    assert _config([command, *extra, "--compile", "regional"], cls, presets).compile == "regional"
    assert _config([command, *extra, "--no-compile"], cls, presets).compile == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--compile", "partial"])


def test_graphs_with_a_mode_that_captures_its_own_is_one_line(tmp_path, capsys):
    code = main(["pretrain", "--cuda-graphs", "--compile", "full", "--compile-mode", "reduce-overhead",
                 "--output-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "reduce-overhead captures CUDA graphs of its own" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written
    code = main(["bench", "--graphs", "--compile-mode", "max-autotune", "--quick", "--out", str(tmp_path / "b.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "max-autotune captures CUDA graphs of its own" in err[0]


def test_regional_on_a_model_without_blocks_is_one_line():
    from fastmae.errors import FastMAEError

    with pytest.raises(FastMAEError, match="has no transformer blocks"):
        compile_model(nn.Linear(2, 2), "regional")
    with pytest.raises(FastMAEError, match="--compile must be one of off, full, regional"):
        compile_model(nn.Linear(2, 2), "some")


def test_regional_covers_its_real_cache_entries_and_every_limit_hit_is_recorded():
    """The inputs a regional model's blocks see in a run and a benchmark (training, a short batch, the eval picture
    without gradients, the mask-token encoder sharing the blocks' code) take more compiled entries than dynamo's
    default limit of 8: regional raises it, so nothing runs uncompiled. A hit is recorded
    (fastmae.compiling.recompile_limit_hits), not silent."""
    from fastmae import compiling

    config = torch._dynamo.config  # (not monkeypatch: its undo deletes a config entry, which hides it for good)
    original = config.recompile_limit
    config.recompile_limit = 8
    try:
        before = len(compiling.recompile_limit_hits())
        torch._dynamo.reset()
        counting = CountingBackend()
        models = [create_model("mae_vit_tiny_patch16", **TINY, encoder_mode=mode) for mode in ("visible",
                                                                                               "mask_token")]
        for m in models:
            compile_model(m, "regional", backend=counting)
            for batch in (2, 1):  # the batch, a short batch
                m(torch.randn(batch, 3, 32, 32))[0].backward()
            with torch.no_grad():  # the eval picture
                m.eval()(torch.randn(3, 3, 32, 32))
        assert config.recompile_limit == 2 * compiling.REGIONAL_ENTRIES_PER_BLOCK_KIND  # 2 kinds of block
        assert counting.graphs == 9 and compiling.recompile_limit_hits()[before:] == []  # 9 entries, all compiled
        config.recompile_limit = counting.graphs  # at the limit: the next input hits it
        models[0].train()(torch.randn(4, 3, 32, 32))
        hits = compiling.recompile_limit_hits()[before:]
        assert counting.graphs == 9 and len(hits) == 1 and f"recompile_limit ({counting.graphs})" in hits[0]
        assert "'forward'" in hits[0]
    finally:
        config.recompile_limit = original
        torch._dynamo.reset()
