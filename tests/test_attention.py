"""Attention dispatch: every runnable backend agrees with math; unrunnable requests fail loudly with reasons."""

import json
import logging

import pytest
import torch

from fastmae import FastMAEError, MaskedAutoencoderViT, attention
from fastmae.attention import AttentionBackendUnavailable

from .conftest import SQUARE


def _qkv(dtype, B=2, H=3, N=50, Dh=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, Dh, generator=g).to(dtype) for _ in range(3)]


def _float64_reference(q, k, v):
    q, k, v = (t.double() for t in (q, k, v))
    w = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
    return w @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 50, 15), (3, 4, 197, 64)])
def test_runnable_backends_agree_with_math(dtype, shape):
    q, k, v = _qkv(dtype, *shape)
    ref = _float64_reference(q, k, v)
    math_out = attention.attention(q, k, v, "math")
    math_err = (math_out.double() - ref).norm() / ref.norm()
    ran = []
    for name in attention.AUTO_ORDER:
        backend = attention.get_backend(name)
        if backend.unsupported(q, k, v):
            continue
        out = attention.attention(q, k, v, name)
        assert out.shape == q.shape and out.dtype == dtype
        err = (out.double() - ref).norm() / ref.norm()
        # at most ~2x the error of the fp32-accumulating reference in the same dtype, plus a small floor
        assert err <= 2 * math_err + (1e-6 if dtype == torch.float32 else 8e-3), name
        ran.append(name)
    assert "sdpa" in ran and "math" in ran


def test_auto_resolves_to_sdpa_on_cpu_and_says_why(caplog):
    q, k, v = _qkv(torch.float32)
    attention._logged.clear()
    with caplog.at_level(logging.INFO, logger="fastmae.attention"):
        backend = attention.resolve("auto", q, k, v)
    assert backend.name == "sdpa"
    assert "auto -> sdpa" in caplog.text
    assert "auto takes xformers only where the measured table has it fastest" in caplog.text


def test_explicit_xformers_on_cpu_raises_with_reason():
    q, k, v = _qkv(torch.float32)
    with pytest.raises(AttentionBackendUnavailable, match="attention backend 'xformers' cannot run: .*") as info:
        attention.attention(q, k, v, "xformers")
    msg = str(info.value)
    assert "no CPU operator" in msg
    # xformers is installed (dev extra) and was chosen: its own operators say why too, each named
    assert "its operators: fa2F@" in msg and "cutlassF-pt: device=cpu (supported: {'cuda'})" in msg
    assert isinstance(info.value, FastMAEError) and "\n" not in msg


def test_xformers_is_imported_only_when_chosen():
    """fastmae, a model and auto on a CPU import no xformers (whose import warns when its C++ extension does not
    load): nothing reaches a user who did not choose it. Choosing it explicitly imports it."""
    import subprocess
    import sys

    code = ("import sys, torch, fastmae\n"
            "m = fastmae.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,\n"
            "    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)\n"
            "m(torch.randn(1, 3, 32, 32)); fastmae.attention.explain('auto', *[torch.randn(1, 2, 5, 8)] * 3)\n"
            "print('imported' if 'xformers' in sys.modules else 'not imported', flush=True)\n"
            "fastmae.attention.xformers_op_pairs(*[torch.randn(1, 5, 2, 8)] * 3)\n"
            "print('imported' if 'xformers' in sys.modules else 'not imported', flush=True)\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[0] == "not imported" and lines[-1] == "imported"  # nothing printed before the choice


def test_xformers_pair_choice_with_and_without_its_extension(monkeypatch):
    """Without xformers' C++ extension every operator reports "xFormers wasn't build with CUDA support"; the -pt
    operators wrap PyTorch's kernels and need none, so fastmae still takes them (flash first), and says why a pair
    was passed over, operator by operator."""
    from types import SimpleNamespace

    def op(name, reasons, available=True):
        return type(name, (), {"NAME": name, "OPERATOR": object() if available else None,
                               "not_supported_reasons": classmethod(lambda cls, inp: list(reasons))})  # fmt: skip

    no_ext = ["xFormers wasn't build with CUDA support"]
    fake = SimpleNamespace(
        Inputs=lambda query, key, value: None,
        flash=SimpleNamespace(FwOp=op("fa2F@2.5.7-pt", no_ext), BwOp=op("fa2B@2.5.7-pt", [*no_ext, "head dim 512"])),
        cutlass=SimpleNamespace(FwOp=op("cutlassF-pt", no_ext), BwOp=op("cutlassB-pt", no_ext)),
    )  # fmt: skip
    monkeypatch.setattr(attention, "_xformers_fmha", lambda: (fake, None))
    monkeypatch.setattr(attention, "_xformers_has_extension", lambda: False)
    q = torch.empty(1, 5, 2, 8)
    assert attention.xformers_op_pairs(q, q, q) == ("cutlass", ["fa2B@2.5.7-pt: head dim 512"])
    monkeypatch.setattr(attention, "_xformers_has_extension", lambda: True)  # then the reason is real
    pair, why = attention.xformers_op_pairs(q, q, q)
    assert pair is None and "cutlassF-pt: xFormers wasn't build with CUDA support" in why
    fake.cutlass.FwOp = op("cutlassF", [], available=False)
    assert "cutlassF: not available in this build" in attention.xformers_op_pairs(q, q, q)[1]


def test_model_with_xformers_on_cpu_fails_loudly():
    model = MaskedAutoencoderViT(**SQUARE, attn_backend="xformers")
    with pytest.raises(AttentionBackendUnavailable, match="xformers"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(AttentionBackendUnavailable, match="xformers"):
        model.resolve_attention("cpu", torch.float32)


def test_explain_lists_reasons_per_backend():
    q, k, v = _qkv(torch.float32)
    reasons = attention.explain("auto", q, k, v)
    assert reasons["sdpa"] == [] and reasons["math"] == [] and reasons["xformers"]


def test_xformers_reasons_on_cuda_metadata():
    q = torch.empty(1, 2, 3, 512, device="meta", dtype=torch.float64)

    class OnCuda:
        device, dtype, shape = torch.device("cuda"), q.dtype, q.shape

    reasons = attention.get_backend("xformers").unsupported(OnCuda, OnCuda, OnCuda)
    assert any("dtype torch.float64" in r for r in reasons) and any("head dim 512" in r for r in reasons)


def test_resolve_attention_reports_backend_without_running():
    model = MaskedAutoencoderViT(**SQUARE)
    assert model.attn_backend_used is None
    assert model.resolve_attention("cpu", torch.float32) == "sdpa"
    model(torch.randn(1, 3, 32, 32))
    assert model.attn_backend_used == "sdpa"


def test_sdpa_kernels_say_why_they_cannot_run_on_a_cpu():
    q, k, v = _qkv(torch.bfloat16, Dh=16)
    for name in ("flash", "cudnn", "efficient"):
        assert attention.get_backend(name).unsupported(q, k, v) == [f"{name} attention needs CUDA (inputs are on cpu)"]
        with pytest.raises(AttentionBackendUnavailable, match=f"attention backend '{name}' cannot run: {name} "):
            attention.attention(q, k, v, name)


def test_sdpa_kernel_reasons_on_cuda_metadata():
    class OnCuda:
        device, dtype, shape = torch.device("cuda"), torch.float32, (1, 2, 3, 100)

    reasons = attention.get_backend("flash").unsupported(OnCuda, OnCuda, OnCuda)
    assert "dtype torch.float32 is not one of float16, bfloat16" in reasons
    assert "head dim 100 is not a multiple of 8 up to 256" in reasons
    assert attention.get_backend("efficient").unsupported(OnCuda, OnCuda, OnCuda) == [
        "head dim 100 is not a multiple of 8 up to 256"]  # fmt: skip


def test_backends_per_call_site():
    assert attention.parse_sites("sdpa") == {"encoder": "sdpa", "decoder": "sdpa"}
    assert attention.parse_sites("encoder=flash, decoder=efficient") == {"encoder": "flash", "decoder": "efficient"}
    assert attention.parse_sites("decoder=math") == {"encoder": "auto", "decoder": "math"}
    with pytest.raises(FastMAEError, match="unknown call site 'enc'"):
        attention.parse_sites("enc=flash")
    with pytest.raises(FastMAEError, match="unknown attention backend 'fast'"):
        attention.parse_sites("encoder=fast")
    model = MaskedAutoencoderViT(**SQUARE, attn_backend="encoder=math,decoder=sdpa")
    assert model.resolve_attention("cpu", torch.float32) == "encoder=math,decoder=sdpa"
    model(torch.randn(1, 3, 32, 32))
    assert {b.attn.backend_used for b in model.blocks} == {"math"}
    assert {b.attn.backend_used for b in model.decoder_blocks} == {"sdpa"}


TABLE = {"entries": [
    {"gpu": "NVIDIA H200", "dtype": "bf16", "head_dim": 16, "tokens": 5, "batch_heads": 512, "best": "flash",
     "ms": {"flash": 0.1, "efficient": 0.2, "sdpa": 0.1}, "source": "benchmarks/results/attention-x.json"},
    {"gpu": "NVIDIA H200", "dtype": "bf16", "head_dim": 8, "tokens": 17, "batch_heads": 512, "best": "efficient",
     "ms": {"flash": 0.3, "efficient": 0.2}, "source": "benchmarks/results/attention-x.json"},
]}  # fmt: skip


def test_measured_choice_takes_the_nearest_entry_within_2x():
    entries = TABLE["entries"]
    best, why = attention.measured_choice("NVIDIA H200", torch.bfloat16, 16, 9, entries)
    assert best == "flash" and "measured fastest on NVIDIA H200 (bf16, head dim 16, 5 tokens" in why
    assert "flash 0.100 ms, sdpa 0.100 ms, efficient 0.200 ms" in why
    assert attention.measured_choice("NVIDIA H200", torch.bfloat16, 16, 11, entries) is None  # > 2x away
    assert attention.measured_choice("NVIDIA H100", torch.bfloat16, 16, 5, entries) is None
    assert attention.measured_choice("NVIDIA H200", torch.float16, 16, 5, entries) is None


def test_auto_on_a_gpu_takes_the_table_choice_per_site_and_says_why(tmp_path, monkeypatch, caplog):
    """resolve_attention for a (stand-in) H200: the encoder (4 visible tokens + cls, head dim 16) and the decoder
    (16 + 1 tokens, head dim 8) each get their measured fastest; on CPU tensors the forward falls back to auto."""
    table = tmp_path / "table.json"
    table.write_text(json.dumps(TABLE))
    monkeypatch.setenv("FASTMAE_ATTENTION_TABLE", str(table))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    model = MaskedAutoencoderViT(**SQUARE)
    attention._logged.clear()
    with caplog.at_level(logging.INFO, logger="fastmae.attention"):
        assert model.resolve_attention("cuda", torch.bfloat16) == "encoder=flash,decoder=efficient"
    assert "encoder auto -> flash: measured fastest on NVIDIA H200" in caplog.text
    assert "decoder auto -> efficient" in caplog.text
    model(torch.randn(1, 3, 32, 32))  # CPU inputs: the measured choice cannot run here, auto decides
    assert model.attn_backend_used == "sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    attention._logged.clear()
    with caplog.at_level(logging.INFO, logger="fastmae.attention"):
        assert model.resolve_attention("cuda", torch.bfloat16) in ("sdpa", "xformers")
    assert "no measured entry for NVIDIA A100" in caplog.text
