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


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent where it is not installed
def pytest_xdist_auto_num_workers(config):
    """Workers for ``-n auto`` (pyproject's addopts): one per core up to 4 on a CPU machine, each test file in one
    worker. Many tests start processes of their own (torchrun pairs, DataLoader workers), and the fault tests bound
    their waits in time: more workers than cores would only make them wait for each other. On a GPU machine one
    worker: the GPU tests time and fill one device."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(4, _cores()))


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


# Threads per test process: the cores (at most 2) shared among pytest-xdist's workers. Two workers with two threads
# each on 2 cores ran CPU-bound tests 3x slower than alone (OpenMP threads waiting on each other); the processes the
# tests start (torchrun pairs, fastmae runs, DataLoader workers) inherit OMP_NUM_THREADS.
THREADS = max(1, min(2, _cores()) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _triton_stays_in_bounds(monkeypatch):
    """Under the Triton interpreter, every load and store a kernel makes (where its mask is true) must fall inside the
    tensors the kernel was given. The interpreter touches real memory: an out-of-bounds store would corrupt this
    process's heap, and on a GPU another tensor."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import numpy as np
    from triton.runtime import interpreter as ti

    spans: list[list[tuple[int, int]]] = []
    real_call, real_load, real_store = (ti.GridExecutor.__call__, ti.InterpreterBuilder.create_masked_load,
                                        ti.InterpreterBuilder.create_masked_store)  # fmt: skip

    def call(self, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        spans.append([(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
                      for t in tensors])  # fmt: skip
        try:
            return real_call(self, *args, **kwargs)
        finally:
            spans.pop()

    def check(ptrs, mask, what):
        if not spans:
            return
        size = ti._get_np_dtype(ptrs.get_element_ty()).itemsize
        addr = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.data.shape))[mask.data]
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi in spans[-1]:
            inside |= (addr >= lo) & (addr + size <= hi)
        if not inside.all():
            raise AssertionError(f"Triton kernel {what} {int((~inside).sum())} element(s) outside its tensors")

    def load(self, ptrs, mask, *rest):
        check(ptrs, mask, "loads")
        return real_load(self, ptrs, mask, *rest)

    def store(self, ptrs, value, mask, *rest):
        check(ptrs, mask, "stores")
        return real_store(self, ptrs, value, mask, *rest)

    monkeypatch.setattr(ti.GridExecutor, "__call__", call)
    monkeypatch.setattr(ti.InterpreterBuilder, "create_masked_load", load)
    monkeypatch.setattr(ti.InterpreterBuilder, "create_masked_store", store)
    yield
