"""Fused Triton ops (run under TRITON_INTERPRET=1 on CPU) against their PyTorch references, and in the model."""

import pytest
import torch
from fastmae.kernels.masked_mse import masked_mse, masked_mse_reference
from fastmae.kernels.masking import random_masking, random_masking_reference
from fastmae.kernels.unshuffle import unshuffle, unshuffle_reference

from fastmae import FastMAEError, MaskedAutoencoderViT

from .conftest import AWKWARD

SHAPES = [(1, 49, 72), (3, 197, 123)]  # (batch, L, D): L and D not powers of two
DTYPES = [torch.float32, torch.bfloat16]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _noise_with_ties(N, L, g):
    noise = torch.rand(N, L, generator=g)
    noise[:, L // 2] = noise[:, 3]  # ties must break by index, as a stable argsort does
    noise[:, -1] = noise[:, 0]
    return noise


@pytest.mark.parametrize("N, L, D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_dtype", [None, torch.float32])
def test_masking(N, L, D, dtype, pos_dtype):
    g = torch.Generator().manual_seed(L + D)
    # a transposed (non-contiguous) x, as the patch embedding produces
    x = torch.randn(N, D, L, generator=g).to(dtype).transpose(1, 2).requires_grad_(True)
    noise = _noise_with_ties(N, L, g)
    pos = torch.randn(1, L + 1, D, generator=g).to(pos_dtype) if pos_dtype else None
    K = int(L * 0.25)
    out = random_masking(x, noise, K, pos)
    ref = random_masking_reference(x, noise, K, pos)
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == r.dtype and torch.equal(o, r)
    grad = torch.randn(out[0].shape, generator=g).to(out[0].dtype)
    (gx,) = torch.autograd.grad(out[0], x, grad)
    (rx,) = torch.autograd.grad(ref[0], x, grad)
    assert torch.equal(gx, rx)
    again = random_masking(x, noise, K, pos)
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))


@pytest.mark.parametrize("N, L, D", SHAPES)
@pytest.mark.parametrize("dtype, tok_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)])  # fmt: skip
def test_unshuffle(N, L, D, dtype, tok_dtype):
    g = torch.Generator().manual_seed(L * D)
    K = int(L * 0.25)
    x = torch.randn(N, 1 + K, D, generator=g).to(dtype).requires_grad_(True)
    tok = (0.02 * torch.randn(1, 1, D, generator=g)).to(tok_dtype).requires_grad_(True)
    ids = torch.argsort(torch.argsort(torch.rand(N, L, generator=g), 1), 1)
    pos = torch.randn(1, L + 1, D, generator=g).to(tok_dtype)
    out, ref = unshuffle(x, tok, ids, pos), unshuffle_reference(x, tok, ids, pos)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    grad = torch.randn(out.shape, generator=g).to(out.dtype)
    gx, gt = torch.autograd.grad(out, (x, tok), grad)
    rx, rt = torch.autograd.grad(ref, (x, tok), grad)
    assert torch.equal(gx, rx)
    # the mask token's gradient is a sum over removed positions: fp32 accumulation, order differs from torch's
    assert gt.dtype == tok_dtype and _rel(gt, rt) < (1e-6 if tok_dtype == torch.float32 else 8e-3)
    assert torch.equal(unshuffle(x, tok, ids, pos), out)


@pytest.mark.parametrize("N, img, patch", [(1, 56, 8), (3, 48, 16), (2, 112, 16)])  # L = 49, 9, 49
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse(N, img, patch, dtype, norm_pix):
    g = torch.Generator().manual_seed(img + patch)
    L, P = (img // patch) ** 2, patch * patch * 3
    imgs = torch.randn(N, 3, img, img, generator=g)
    pred = torch.randn(N, L, P, generator=g).to(dtype).requires_grad_(True)
    mask = (torch.rand(N, L, generator=g) < 0.75).float()
    mask[0, 0] = 1
    out, ref = masked_mse(pred, imgs, mask, patch, norm_pix), masked_mse_reference(pred, imgs, mask, patch, norm_pix)
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) <= 1e-5 * ref.item()
    (gp,) = torch.autograd.grad(out, pred)
    (rp,) = torch.autograd.grad(ref, pred)
    assert gp.dtype == dtype and _rel(gp, rp) < 1e-5
    assert torch.all(gp[mask == 0] == 0)  # visible patches get exactly zero gradient
    assert torch.equal(masked_mse(pred, imgs, mask, patch, norm_pix), out)


# Any band count: (batch, bands, image, patch) with odd patch counts (25, 9) and patches of 16 to 3328 values, the
# largest one a program per patch (BLOCK_R = 1).
BANDS_SHAPES = [(1, 1, 20, 4), (3, 2, 12, 4), (2, 4, 20, 4), (1, 13, 12, 4), (1, 13, 48, 16)]


@pytest.mark.parametrize("N, C, img, patch", BANDS_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_at_any_band_count(N, C, img, patch, norm_pix):
    g = torch.Generator().manual_seed(C * img + patch)
    L, P = (img // patch) ** 2, patch * patch * C
    imgs = torch.randn(N, C, img, img, generator=g) * 3 + 1
    pred = torch.randn(N, L, P, generator=g).requires_grad_(True)
    mask = (torch.rand(N, L, generator=g) < 0.6).float()
    mask[0, -1] = 1
    out, ref = masked_mse(pred, imgs, mask, patch, norm_pix), masked_mse_reference(pred, imgs, mask, patch, norm_pix)
    exact = masked_mse_reference(pred.double(), imgs.double(), mask, patch, norm_pix)
    assert abs(out.item() - exact.item()) <= 2 * abs(ref.item() - exact.item()) + 1e-6 * exact.item()
    (gp,) = torch.autograd.grad(out, pred)
    (rp,) = torch.autograd.grad(ref, pred)
    assert _rel(gp, rp) < 1e-5 and torch.all(gp[mask == 0] == 0)
    assert torch.equal(masked_mse(pred, imgs, mask, patch, norm_pix), out)


def test_input_checks_are_clear():
    x = torch.randn(2, 10, 8)
    with pytest.raises(FastMAEError, match=r"masking: noise must be \[N, L\] = \[2, 10\], got \[2, 9\]"):
        random_masking(x, torch.rand(2, 9), 3)
    with pytest.raises(FastMAEError, match="masking: x must be float16/bfloat16/float32, got torch.int64"):
        random_masking(torch.ones(2, 10, 8, dtype=torch.long), torch.rand(2, 10), 3)
    with pytest.raises(FastMAEError, match="unshuffle: ids_restore must be int64"):
        unshuffle(
            torch.randn(2, 4, 8), torch.randn(1, 1, 8), torch.zeros(2, 10, dtype=torch.int32), torch.randn(1, 11, 8)
        )
    with pytest.raises(FastMAEError, match=r"masked_mse: pred must be \[N, L, p\*p\*C\] = \[1, 4, 48\]"):
        masked_mse(torch.randn(1, 4, 47), torch.randn(1, 3, 8, 8), torch.ones(1, 4), 4)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("encoder_mode", ["visible", "mask_token"])
def test_model_with_triton_kernels_matches_reference(norm_pix, encoder_mode):
    torch.manual_seed(0)
    ref = MaskedAutoencoderViT(**AWKWARD, kernels="reference", norm_pix_loss=norm_pix, encoder_mode=encoder_mode)
    fused = MaskedAutoencoderViT(**AWKWARD, kernels="triton", norm_pix_loss=norm_pix, encoder_mode=encoder_mode)
    fused.load_state_dict(ref.state_dict())
    assert fused.kernels_used("cpu") == {"masking": "triton", "unshuffle": "triton", "masked_mse": "triton"}
    imgs, noise = torch.randn(3, 3, 56, 56), _noise_with_ties(3, 49, torch.Generator().manual_seed(1))
    lr_, pr, mr = ref(imgs, mask_ratio=0.6, noise=noise)
    lf, pf, mf = fused(imgs, mask_ratio=0.6, noise=noise)
    lr_.backward()
    lf.backward()
    assert torch.equal(mf, mr) and torch.equal(pf, pr)  # the fused glue is exact; only the loss sum order differs
    assert abs(lf.item() - lr_.item()) <= 1e-6 * lr_.item()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
            continue
        assert _rel(p.grad, q.grad) < 1e-5, name


@pytest.mark.parametrize("C, encoder_mode", [(1, "visible"), (2, "visible"), (4, "visible"), (13, "visible"),
                                             (13, "mask_token")])  # fmt: skip
def test_model_at_any_band_count_with_triton_kernels_matches_reference(C, encoder_mode):
    """Patchify, norm-pix target and masked MSE, masking and unshuffle fused, at C bands (batch 1, 49 patches)."""
    torch.manual_seed(C)
    cfg = {**AWKWARD, "in_chans": C, "depth": 1, "decoder_depth": 1}
    ref = MaskedAutoencoderViT(**cfg, kernels="reference", norm_pix_loss=True, encoder_mode=encoder_mode)
    fused = MaskedAutoencoderViT(**cfg, kernels="triton", norm_pix_loss=True, encoder_mode=encoder_mode)
    fused.load_state_dict(ref.state_dict())
    imgs, noise = torch.randn(1, C, 56, 56), _noise_with_ties(1, 49, torch.Generator().manual_seed(C))
    lr_, pr, mr = ref(imgs, mask_ratio=0.75, noise=noise)
    lf, pf, mf = fused(imgs, mask_ratio=0.75, noise=noise)
    lr_.backward()
    lf.backward()
    assert pf.shape == (1, 49, 64 * C) and torch.equal(mf, mr) and torch.equal(pf, pr)
    assert abs(lf.item() - lr_.item()) <= 1e-6 * lr_.item()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
        if q.grad is not None:
            assert _rel(p.grad, q.grad) < 1e-5, name


@pytest.mark.parametrize("kernels", ["triton", "reference"])
def test_compile_fullgraph_without_graph_breaks(kernels):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**AWKWARD, kernels=kernels, norm_pix_loss=True)
    imgs, noise = torch.randn(2, 3, 56, 56), torch.rand(2, 49)
    eager_loss, eager_pred, _ = model(imgs, noise=noise)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: any graph break raises
    loss, pred, mask = compiled(imgs, noise=noise)
    loss.backward()
    assert torch.equal(pred, eager_pred) and abs(loss.item() - eager_loss.item()) < 1e-6
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("encoder_mode, backend", [("visible", "inductor"), ("mask_token", "aot_eager")])
def test_inductor_compiles_the_training_step_with_the_fused_ops(encoder_mode, backend):
    """The default backend (inductor) over the whole model with the Triton ops inside (interpreted on CPU), fullgraph:
    loss, pred, mask and every gradient equal eager's (inductor may reorder float sums in the rest of the model).
    The mask-token encoder runs the same ops (masking, unshuffle, masked MSE) through the same registrations, so its
    case traces forward and backward graphs as inductor gets them (``aot_eager``) without inductor's code generation,
    which took a minute of CI on 2 cores for what the visible case already proves."""
    import copy

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = MaskedAutoencoderViT(**AWKWARD, kernels="triton", norm_pix_loss=True, encoder_mode=encoder_mode)
    model = copy.deepcopy(eager)
    imgs, noise = torch.randn(2, 3, 56, 56), torch.rand(2, 49)
    el, ep, em = eager(imgs, mask_ratio=0.75, noise=noise)
    el.backward()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # any graph break raises
    loss, pred, mask = compiled(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    assert torch.equal(mask, em) and _rel(pred, ep) < 1e-5 and abs(loss.item() - el.item()) <= 1e-5 * el.item()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
            continue
        assert _rel(p.grad, q.grad) < 1e-4, name


# Run from the repository root with the root first on sys.path, as pytest, `python -m` and users' scripts in a
# checkout do. The ops are registered once (a second registration of fastmae::masked_mse left the first one's handles
# dangling, and a later custom op was called in its place), which the last lines check.
_TOP_LEVEL_KERNELS = """
import importlib.machinery, os, sys, torch
root, case = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
if case == "none":  # no other `kernels` anywhere: Hugging Face's distribution hidden from the path finder
    _find = importlib.machinery.PathFinder.find_spec.__func__
    def _hide(cls, name, path=None, target=None):
        if name == "kernels":
            path = [p for p in (path or sys.path) if os.path.realpath(p or ".") == os.path.realpath(root)
                    or not os.path.isdir(os.path.join(p or ".", "kernels"))]
        return _find(cls, name, path, target)
    importlib.machinery.PathFinder.find_spec = classmethod(_hide)
elif case == "stand-in":  # another distribution's `kernels`, later on sys.path than the checkout
    sys.path.insert(1, sys.argv[3])
from fastmae.kernels.masked_mse import masked_mse, masked_mse_reference
import fastmae.kernels, kernels
assert "kernels.masked_mse" not in sys.modules, "the checkout's ops were loaded a second time"
if case == "none":
    assert kernels is fastmae.kernels
else:
    assert kernels is not fastmae.kernels and "fastmae" not in kernels.__file__, kernels.__file__
if case == "stand-in":
    from kernels.layer import LAYER  # a submodule of the other package
    assert kernels.MARK == "other" and LAYER == 1
if case == "hugging-face":  # the import that failed: transformers' hub kernels integration
    from kernels import CUDAProperties  # noqa: F401
    from transformers.integrations import hub_kernels  # noqa: F401
    from transformers.utils.import_utils import is_kernels_available
    assert is_kernels_available()

@torch.library.custom_op("zz_test::other", mutates_args=())
def other(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return a
pred, imgs = torch.randn(2, 4, 192), torch.randn(2, 3, 16, 16)
mask = torch.ones(2, 4)
torch.testing.assert_close(masked_mse(pred, imgs, mask, 8, True), masked_mse_reference(pred, imgs, mask, 8, True))
"""


@pytest.mark.parametrize("case", ["hugging-face", "stand-in", "none"])
def test_top_level_kernels_import_never_shadows_another_package(case, tmp_path):
    """The checkout's `kernels/` folder (installed as fastmae.kernels) found as a top-level `kernels`: with Hugging
    Face's `kernels` installed, `import kernels` gets that package (transformers 5 imports `CUDAProperties` from it);
    with another package of that name it gets that one; with none it gets fastmae.kernels; the ops load once."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if case == "hugging-face":
        spec = importlib.util.find_spec("transformers")
        try:
            import importlib.metadata as metadata

            metadata.version("kernels")
        except metadata.PackageNotFoundError:
            pytest.skip("Hugging Face's kernels is not installed (the dev extra brings it with transformers 5)")
        if spec is None:
            pytest.skip("transformers is not installed")
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text('MARK = "other"\n')
    (other / "layer.py").write_text("LAYER = 1\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _TOP_LEVEL_KERNELS, str(root), case, str(other.parent)],
                          capture_output=True, text=True, timeout=300, cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
