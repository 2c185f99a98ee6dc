"""Masked reconstruction loss: patchify the images, optional per-patch normalisation, MSE averaged over removed patches.

Official semantics (facebookresearch/mae ``forward_loss``): target = patchify(imgs) with patch layout (p, q, c);
with ``norm_pix`` each patch becomes ``(x - mean) / sqrt(var + 1e-6)`` (unbiased var); loss = mean over the patch of
the squared error, summed over removed patches (mask = 1) and divided by their count.
"""

import torch

NORM_PIX_EPS = 1e-6


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)*(W/p), p*p*C], each patch flattened as (row-in-patch, col-in-patch, channel)."""
    N, C, H, W = imgs.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(N, h * w, p * p * C)


def unpatchify(
    x: torch.Tensor, patch_size: int, channels: int = 3, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W]; the grid is square unless given as (rows, cols)."""
    N, L, _ = x.shape
    p = patch_size
    if grid is None:
        h = w = int(round(L**0.5))
        if h * w != L:
            raise ValueError(f"{L} patches do not form a square grid; pass grid=(rows, cols)")
    else:
        h, w = grid
    x = x.reshape(N, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(N, channels, h * p, w * p)


def masked_mse_reference(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool = False
) -> torch.Tensor:
    """pred [N, L, p*p*C], imgs [N, C, H, W], mask [N, L] (1 = removed) -> scalar fp32 loss."""
    target = patchify(imgs, patch_size).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [N, L] per-patch MSE
    mask = mask.float()
    return (loss * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------------------- Triton
from ._common import FLOAT_DTYPES, cast_rtne, check, next_pow2, tl, triton  # noqa: E402


@triton.jit
def _patch_target(img_ptr, rows, active, L, GW, C, H, W, P, p, NORM: tl.constexpr, BLOCK_P: tl.constexpr):
    """Patchify on the fly: [BLOCK_R, BLOCK_P] target patches (layout (row, col, channel)), normalised per patch
    with ``NORM`` (mean, unbiased var, eps 1e-6). Only active (removed) patches are read."""
    n = rows // L
    patch = rows % L
    hi = patch // GW
    wi = patch % GW
    e = tl.arange(0, BLOCK_P)
    valid_e = e < P
    pr = e // (p * C)
    rem = e % (p * C)
    pc = rem // C
    c = rem % C
    addr = (n[:, None] * C + c[None, :]) * (H * W) + (hi[:, None] * p + pr[None, :]) * W + wi[:, None] * p + pc[None, :]
    m2 = active[:, None] & valid_e[None, :]
    x = tl.load(img_ptr + addr, mask=m2, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=1) / P
        d = tl.where(m2, x - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / (P - 1)
        x = tl.div_rn(d, tl.sqrt_rn(var + 1e-6)[:, None])
    return x, e, m2


@triton.jit
def _removed_patches(
    pred_ptr, img_ptr, mask_ptr, NL, L, GW, C, H, W, P, p,
    NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """This program's BLOCK_R patches: their mask values, targets and predictions (fp32; zero where visible)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid_r = rows < NL
    m = tl.load(mask_ptr + rows, mask=valid_r, other=0.0)
    t, e, m2 = _patch_target(img_ptr, rows, valid_r & (m != 0), L, GW, C, H, W, P, p, NORM, BLOCK_P)
    pv = tl.load(pred_ptr + rows[:, None] * P + e[None, :], mask=m2, other=0.0).to(tl.float32)
    return rows, valid_r, m, t, pv, e, m2


@triton.jit
def _mse_fwd(
    pred_ptr, img_ptr, mask_ptr, loss_ptr, NL, L, GW, C, H, W, P, p,
    NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Per-patch MSE for BLOCK_R patches (0 for visible ones, which are not read)."""
    rows, valid_r, m, t, pv, e, m2 = _removed_patches(
        pred_ptr, img_ptr, mask_ptr, NL, L, GW, C, H, W, P, p, NORM, BLOCK_R, BLOCK_P
    )
    diff = tl.where(m2, pv - t, 0.0)
    tl.store(loss_ptr + rows, tl.sum(diff * diff, axis=1) / P, mask=valid_r)


@triton.jit
def _mse_bwd(
    pred_ptr, img_ptr, mask_ptr, scale_ptr, dpred_ptr, NL, L, GW, C, H, W, P, p,
    NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """d pred = 2 (pred - target) / P * mask / sum(mask) * d loss, written for every patch (0 where visible)."""
    rows, valid_r, m, t, pv, e, m2 = _removed_patches(
        pred_ptr, img_ptr, mask_ptr, NL, L, GW, C, H, W, P, p, NORM, BLOCK_R, BLOCK_P
    )
    scale = tl.load(scale_ptr)
    dp = tl.where(m2, 2.0 * (pv - t) * (m * scale / P)[:, None], 0.0)
    out = cast_rtne(dp, dpred_ptr.dtype.element_ty)
    tl.store(dpred_ptr + rows[:, None] * P + e[None, :], out, mask=valid_r[:, None] & (e < P)[None, :])


def _blocks(P: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_P, num_warps) for patches of P = p*p*C values."""
    # A whole patch per row, ~2 K elements per program (was 4 K): 91-124 -> 48-72 registers, sm_90 occupancy 25-31% ->
    # 44-62% in the static report (benchmarks/results/kernel-static.json); not yet timed on a GPU.
    # A patch above 2 K values (13 bands at p = 14 or 16: 2548, 3328 -> 4096) is one row with more warps, 16 values
    # a thread as at 2 K: 4 warps held 167 registers a thread there (18.8% occupancy on sm_90), see the same report.
    block_p = next_pow2(P)
    return max(1, 2048 // block_p), block_p, min(16, max(4, block_p // 512))


def _geometry(pred, imgs, mask, patch_size):
    check(imgs.dim() == 4, f"masked_mse: imgs must be [N, C, H, W], got {list(imgs.shape)}")
    N, C, H, W = imgs.shape
    p = patch_size
    check(H % p == 0 and W % p == 0, f"masked_mse: image size {H}x{W} is not divisible by patch size {p}")
    L, P = (H // p) * (W // p), p * p * C
    check(pred.shape == (N, L, P), f"masked_mse: pred must be [N, L, p*p*C] = {[N, L, P]}, got {list(pred.shape)}")
    check(mask.shape == (N, L), f"masked_mse: mask must be [N, L] = {[N, L]}, got {list(mask.shape)}")
    check(pred.dtype in FLOAT_DTYPES and imgs.dtype in FLOAT_DTYPES, "masked_mse: pred and imgs must be floating")
    check(P > 1, "masked_mse: a patch needs more than one value")
    return N, C, H, W, L, P, W // p


@torch.library.custom_op("fastmae::masked_mse", mutates_args=())
def _mse_op(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool
) -> torch.Tensor:
    N, C, H, W, L, P, GW = _geometry(pred, imgs, mask, patch_size)
    mask = mask.to(torch.float32).contiguous()
    per_patch = torch.empty(N * L, device=pred.device, dtype=torch.float32)
    br, bp, warps = _blocks(P)
    _mse_fwd[(triton.cdiv(N * L, br),)](pred.contiguous(), imgs.contiguous(), mask, per_patch, N * L, L, GW, C, H, W,
                                        P, patch_size, NORM=norm_pix, BLOCK_R=br, BLOCK_P=bp,
                                        num_warps=warps)  # fmt: skip
    return (per_patch * mask.reshape(-1)).sum() / mask.sum()


@_mse_op.register_fake
def _(pred, imgs, mask, patch_size, norm_pix):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastmae::masked_mse_bwd", mutates_args=())
def _mse_bwd_op(
    grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool
) -> torch.Tensor:
    N, C, H, W, L, P, GW = _geometry(pred, imgs, mask, patch_size)
    mask = mask.to(torch.float32).contiguous()
    scale = (grad.to(torch.float32) / mask.sum()).reshape(1)  # stays on the device: no host sync
    dpred = torch.empty_like(pred, memory_format=torch.contiguous_format)
    br, bp, warps = _blocks(P)
    _mse_bwd[(triton.cdiv(N * L, br),)](pred.contiguous(), imgs.contiguous(), mask, scale, dpred, N * L, L, GW, C, H,
                                        W, P, patch_size, NORM=norm_pix, BLOCK_R=br, BLOCK_P=bp,
                                        num_warps=warps)  # fmt: skip
    return dpred


@_mse_bwd_op.register_fake
def _(grad, pred, imgs, mask, patch_size, norm_pix):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    pred, imgs, mask, patch_size, norm_pix = inputs
    ctx.save_for_backward(pred, imgs, mask)
    ctx.patch_size, ctx.norm_pix = patch_size, norm_pix


def _backward(ctx, grad):
    pred, imgs, mask = ctx.saved_tensors
    check(not ctx.needs_input_grad[1], "masked_mse: the fused loss has no gradient for imgs; use kernels='reference'")
    return _mse_bwd_op(grad, pred, imgs, mask, ctx.patch_size, ctx.norm_pix), None, None, None, None


_mse_op.register_autograd(_backward, setup_context=_setup)


def masked_mse(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool = False
) -> torch.Tensor:
    """Fused patchify + norm-pix target + masked MSE: same signature and results as :func:`masked_mse_reference`.
    Reads only the removed patches of ``imgs`` and ``pred``; the backward writes ``d pred`` directly."""
    return _mse_op(pred, imgs, mask, patch_size, norm_pix)
