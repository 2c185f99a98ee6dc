"""Attention dispatch: every runnable backend agrees with math; unrunnable requests fail loudly with reasons."""

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
        if backend.supports(q, k, v):
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
    assert "auto -> sdpa" in caplog.text and "xformers" in caplog.text and "cpu" in caplog.text.lower()


def test_explicit_xformers_on_cpu_raises_with_reason():
    q, k, v = _qkv(torch.float32)
    with pytest.raises(AttentionBackendUnavailable, match="attention backend 'xformers' cannot run: .*") as info:
        attention.attention(q, k, v, "xformers")
    msg = str(info.value)
    assert "no CPU operator" in msg or "not installed" in msg
    assert isinstance(info.value, FastMAEError) and "\n" not in msg


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

    reasons = attention.get_backend("xformers").supports(OnCuda, OnCuda, OnCuda)
    assert any("dtype torch.float64" in r for r in reasons) and any("head dim 512" in r for r in reasons)


def test_resolve_attention_reports_backend_without_running():
    model = MaskedAutoencoderViT(**SQUARE)
    assert model.attn_backend_used is None
    assert model.resolve_attention("cpu", torch.float32) == "sdpa"
    model(torch.randn(1, 3, 32, 32))
    assert model.attn_backend_used == "sdpa"
