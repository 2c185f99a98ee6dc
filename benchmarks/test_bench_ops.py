"""pytest-benchmark for CPU-sized cases: `pytest benchmarks/test_bench_ops.py` (not part of the test suite).

Times each op's reference on CPU (and the fused op where CUDA is present) at ViT-B geometry with batch 8.
"""

import pytest
import torch
from fastmae.kernels import masked_mse, masking, unshuffle

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ["reference", "fused"] if DEVICE.type == "cuda" else ["reference"]
N, L, D, Dd, K, P = 8, 196, 768, 512, 49, 768


@pytest.fixture(scope="module")
def data():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    noise = torch.rand(N, L, generator=g, device=DEVICE)
    ids = torch.argsort(torch.argsort(noise, 1), 1)
    return {
        "x": torch.randn(N, L, D, device=DEVICE),
        "pos": torch.randn(1, L + 1, D, device=DEVICE),
        "noise": noise,
        "ids": ids,
        "xv": torch.randn(N, 1 + K, Dd, device=DEVICE),
        "tok": torch.randn(1, 1, Dd, device=DEVICE),
        "pos_d": torch.randn(1, L + 1, Dd, device=DEVICE),
        "pred": torch.randn(N, L, P, device=DEVICE),
        "imgs": torch.randn(N, 3, 224, 224, device=DEVICE),
        "mask": (ids >= K).float(),
    }


def _sync(fn):
    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("impl", IMPLS)
def test_masking(benchmark, data, impl):
    fn = masking.random_masking if impl == "fused" else masking.random_masking_reference
    benchmark(_sync(lambda: fn(data["x"], data["noise"], K, data["pos"])))


@pytest.mark.parametrize("impl", IMPLS)
def test_unshuffle(benchmark, data, impl):
    fn = unshuffle.unshuffle if impl == "fused" else unshuffle.unshuffle_reference
    benchmark(_sync(lambda: fn(data["xv"], data["tok"], data["ids"], data["pos_d"])))


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_mse(benchmark, data, impl):
    fn = masked_mse.masked_mse if impl == "fused" else masked_mse.masked_mse_reference
    benchmark(_sync(lambda: fn(data["pred"], data["imgs"], data["mask"], 16, True)))
