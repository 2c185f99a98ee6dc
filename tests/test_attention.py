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


def test_the_table_keeps_an_entry_per_model_and_batch_and_auto_takes_the_nearest_batch(tmp_path, monkeypatch):
    """ViT-B's and ViT-L's encoders share head dim 64 and 50 tokens at other batch x heads (256 x 12, 128 x 16): the
    table keeps both, and a model resolving at its batch takes its own. An entry written before entries named a
    model and batch still reads."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_attention", Path(__file__).parent.parent / "benchmarks"
                                                  / "bench_attention.py")  # fmt: skip
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"name": "attention", "model": model, "site": "encoder", "backend": backend, "batch": batch,
             "heads": heads, "tokens": 50, "head_dim": 64, "dtype": "bf16", "ms": ms}
            for model, batch, heads, times in (("mae_vit_base_patch16", 256, 12, {"flash": 1.0, "cudnn": 2.0}),
                                               ("mae_vit_large_patch16", 128, 16, {"flash": 2.0, "cudnn": 1.0}))
            for backend, ms in times.items()]  # fmt: skip
    table = tmp_path / "table.json"
    old = {"gpu": "NVIDIA H100 80GB HBM3", "dtype": "bf16", "head_dim": 32, "tokens": 197, "batch_heads": 4096,
           "ms": {"efficient": 1.0}, "best": "efficient"}  # fmt: skip
    table.write_text(json.dumps({"entries": [old]}))
    env = {"gpu": "NVIDIA H100 80GB HBM3"}
    bench.write_table(table, bench.table_entries(rows, env, "x.json"))
    bench.write_table(table, bench.table_entries(rows, env, "y.json"))  # the same keys again: replaced, not added
    entries = json.loads(table.read_text())["entries"]
    assert len(entries) == 3 and old in entries
    by = {e.get("model"): e for e in entries}
    assert by["mae_vit_base_patch16"]["best"] == "flash" and by["mae_vit_large_patch16"]["best"] == "cudnn"
    assert by["mae_vit_base_patch16"]["batch_heads"] == 3072 and by["mae_vit_base_patch16"]["source"] == "y.json"
    choose = attention.measured_choice
    best, why = choose(env["gpu"], torch.bfloat16, 64, 50, entries, batch_heads=256 * 12)
    assert best == "flash" and "mae_vit_base_patch16 encoder at batch 256" in why
    assert choose(env["gpu"], torch.bfloat16, 64, 50, entries, batch_heads=128 * 16)[0] == "cudnn"
    assert choose(env["gpu"], torch.bfloat16, 32, 197, entries, batch_heads=512)[0] == "efficient"  # the old entry
    monkeypatch.setenv("FASTMAE_ATTENTION_TABLE", str(table))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: env["gpu"])
    # encoder: 49 visible + cls tokens, head dim 64, 2 heads; decoder: 197 tokens, head dim 32, 1 head
    model = MaskedAutoencoderViT(img_size=224, patch_size=16, embed_dim=128, depth=1, num_heads=2,
                                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=1)  # fmt: skip
    attention._logged.clear()
    assert model.resolve_attention("cuda", torch.bfloat16, batch=1536) == "encoder=flash,decoder=efficient"
    assert model.resolve_attention("cuda", torch.bfloat16, batch=1024) == "encoder=cudnn,decoder=efficient"


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


def _stand_in_fmha():
    """xformers' ``fmha`` as fastmae uses it (``Inputs``, ``Context``, a ``flash`` and a ``cutlass`` pair whose
    ``FwOp.apply`` / ``BwOp.apply`` take ``[B, N, H, Dh]``), computing exact attention with torch ops on any device:
    xformers' operators stood in on a CPU. The backward recomputes the probabilities from the saved log-sum-exp, as the
    real kernels do. ``calls`` counts the calls per operator."""
    from types import SimpleNamespace

    calls = {"fw": 0, "bw": 0}

    def scores(q, k):  # [B, H, N, N] in float32
        return (q.transpose(1, 2).float() @ k.transpose(1, 2).float().transpose(-2, -1)) * q.shape[-1] ** -0.5

    class FwOp:
        NAME, OPERATOR = "standinF-pt", object()

        @classmethod
        def not_supported_reasons(cls, inp):
            return []

        @classmethod
        def apply(cls, inp, needs_gradient):
            calls["fw"] += 1
            s = scores(inp.query, inp.key)
            lse = s.logsumexp(-1)  # [B, H, N]
            out = ((s - lse[..., None]).exp() @ inp.value.transpose(1, 2).float()).transpose(1, 2)
            out = out.to(inp.query.dtype)
            return out, SimpleNamespace(out=out, lse=lse)

    class BwOp:
        NAME, OPERATOR = "standinB-pt", object()

        @classmethod
        def not_supported_reasons(cls, inp):
            return []

        @classmethod
        def apply(cls, ctx, inp, grad):
            calls["bw"] += 1
            q, k, v = (t.transpose(1, 2).float() for t in (inp.query, inp.key, inp.value))
            go, o = grad.transpose(1, 2).float(), ctx.out.transpose(1, 2).float()
            p = (scores(inp.query, inp.key) - ctx.lse[..., None]).exp()
            dv = p.transpose(-2, -1) @ go
            ds = p * (go @ v.transpose(-2, -1) - (go * o).sum(-1, keepdim=True))
            dq, dk = ds @ k * q.shape[-1] ** -0.5, ds.transpose(-2, -1) @ q * q.shape[-1] ** -0.5
            return SimpleNamespace(**{n: g.transpose(1, 2).to(inp.query.dtype) for n, g in
                                      (("dq", dq), ("dk", dk), ("dv", dv))})  # fmt: skip

    pair = SimpleNamespace(FwOp=FwOp, BwOp=BwOp)
    return SimpleNamespace(Inputs=lambda query, key, value: SimpleNamespace(query=query, key=key, value=value),
                           Context=lambda lse, out: SimpleNamespace(lse=lse, out=out), flash=pair, cutlass=pair,
                           calls=calls)  # fmt: skip


@pytest.fixture
def xformers_on_cpu(monkeypatch):
    """xformers resolved to the stand-in operators, which run on a CPU."""
    fake = _stand_in_fmha()
    monkeypatch.setattr(attention, "_XFORMERS", (fake, None, False))
    monkeypatch.setattr(attention, "_PAIRS", {})
    monkeypatch.setattr(attention, "_XOPS_USED", {})
    monkeypatch.setattr(attention.XFormersAttention, "devices", ("cuda", "cpu"))
    torch._dynamo.reset()
    yield fake
    torch._dynamo.reset()


def test_xformers_operators_through_the_dispatch_match_math(xformers_on_cpu):
    """The dispatch's xformers path (operator pair, the custom ops, their autograd) against float64, forward and every
    gradient, with xformers' operators stood in on a CPU."""
    q, k, v = (t.requires_grad_() for t in _qkv(torch.float32, 2, 3, 50, 16))
    out = attention.attention(q, k, v, "xformers")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _float64_reference(qd, kd, vd)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad.double())
    assert (out.double() - ref).norm() / ref.norm() < 1e-5
    assert all((a.double() - b).norm() / b.norm() < 1e-5 for a, b in zip(grads, ref_grads, strict=True))
    assert attention.xformers_ops_used() == {"forward": "standinF-pt", "backward": "standinB-pt",
                                             "extension": "not loaded"}  # fmt: skip
    assert xformers_on_cpu.calls == {"fw": 1, "bw": 1}


@pytest.mark.parametrize("backend", ["xformers", "auto"])
def test_a_compiled_block_is_one_graph_with_xformers(xformers_on_cpu, backend):
    """torch.compile(fullgraph=True) over a block whose attention goes through the dispatch: xformers' pair is resolved
    outside the trace and its operators are opaque custom ops, so the block is one graph (a graph break raises here),
    forward and backward through the operators' fake forms and autograd (aot_eager), equal to the eager block."""
    from fastmae.models import Block

    torch.manual_seed(0)
    block = Block(32, 2, attn_backend=backend)
    x = torch.randn(3, 17, 32, requires_grad=True)
    want = block(x)
    want_grads = torch.autograd.grad(want.square().sum(), (x, *block.parameters()))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=False)
    got = compiled(x)
    got_grads = torch.autograd.grad(got.square().sum(), (x, *block.parameters()))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    if backend == "xformers":
        assert xformers_on_cpu.calls["fw"] >= 2 and xformers_on_cpu.calls["bw"] >= 2  # eager and compiled both ran it
