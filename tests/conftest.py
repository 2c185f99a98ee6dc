import os

import torch

# Triton kernels run under the interpreter on CPU; it must be chosen before fastmae (and its kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Small, awkward geometries: 49 patches (not a power of two), head dims 15 and 12 (not multiples of 8).
AWKWARD = dict(img_size=56, patch_size=8, in_chans=3, embed_dim=60, depth=2, num_heads=4, decoder_embed_dim=36,
               decoder_depth=2, decoder_num_heads=3, mlp_ratio=4.0)  # fmt: skip
# Patch 4 on 32 px (the small-image models): 64 patches of 48 values.
PATCH4 = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32,
              decoder_depth=1, decoder_num_heads=4, mlp_ratio=4.0)  # fmt: skip
SQUARE = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
              decoder_depth=1, decoder_num_heads=4, mlp_ratio=2.0)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without it they are skipped, saying so (``pytest -m gpu`` selects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); run pytest -m gpu on one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    """Tests choose kernels explicitly; a developer's FASTMAE_KERNELS must not leak in."""
    monkeypatch.delenv("FASTMAE_KERNELS", raising=False)
    yield


@pytest.fixture(autouse=True, scope="session")
def _index_cache(tmp_path_factory):
    """The validated image index cache goes to a temporary folder, not the developer's ~/.cache."""
    os.environ["FASTMAE_CACHE"] = str(tmp_path_factory.mktemp("fastmae-cache"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
