"""Random masking (encoder input): per-sample argsort of noise, keep the ``len_keep`` smallest, gather them.

Official semantics (facebookresearch/mae ``random_masking``), with the position embedding add folded in:
``x_visible = (x + pos_embed[:, 1:])[ids_keep]``. Ties in the noise are broken by the lower patch index first
(a stable sort), so every implementation orders kept tokens identically.
"""

import torch


def random_masking_reference(
    x: torch.Tensor, noise: torch.Tensor, len_keep: int, pos_embed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, L, D], noise [N, L], pos_embed [1, 1+L, D] or None -> (x_visible [N, K, D], mask [N, L], ids_restore)."""
    N, L, D = x.shape
    if pos_embed is not None:
        x = x + pos_embed[:, 1:, :]
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # [N, L] ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)  # [N, L] inverse permutation
    ids_keep = ids_shuffle[:, :len_keep]  # [N, K]
    x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    # 1 = removed. A patch is removed when its rank in the sorted noise is >= len_keep.
    mask = (ids_restore >= len_keep).to(torch.float32)
    return x_visible, mask, ids_restore


# ---------------------------------------------------------------------------------------------------- Triton
from ._common import FLOAT_DTYPES, cast_rtne, check, next_pow2, tl, triton  # noqa: E402


@triton.jit
def _masking_fwd(
    x_ptr, pos_ptr, noise_ptr, out_ptr, mask_ptr, ids_restore_ptr,
    L, D, K, stride_xn, stride_xl, stride_xd,
    HAS_POS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (sample, D-chunk). For each block of patches i: rank_i = #{j: noise_j < noise_i, or equal
    and j < i} (a stable argsort position, = ids_restore), then kept rows (rank < K) are gathered + pos-added straight
    into slot rank_i of the output. Only kept rows of x are read."""
    n = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_d = offs_d < D
    for i0 in range(0, L, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        valid_i = offs_i < L
        ni = tl.load(noise_ptr + n * L + offs_i, mask=valid_i, other=0.0)
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for j0 in range(0, L, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            valid_j = offs_j < L
            nj = tl.load(noise_ptr + n * L + offs_j, mask=valid_j, other=0.0)
            before = (nj[None, :] < ni[:, None]) | ((nj[None, :] == ni[:, None]) & (offs_j[None, :] < offs_i[:, None]))
            rank += tl.sum((before & valid_j[None, :]).to(tl.int32), axis=1)
        if pid_d == 0:
            tl.store(ids_restore_ptr + n * L + offs_i, rank.to(tl.int64), mask=valid_i)
            tl.store(mask_ptr + n * L + offs_i, (rank >= K).to(tl.float32), mask=valid_i)
        keep = (rank < K) & valid_i
        m2 = keep[:, None] & valid_d[None, :]
        xv = tl.load(
            x_ptr + n * stride_xn + offs_i[:, None] * stride_xl + offs_d[None, :] * stride_xd, mask=m2, other=0.0
        )
        val = xv.to(tl.float32)
        if HAS_POS:
            pv = tl.load(pos_ptr + (1 + offs_i[:, None]) * D + offs_d[None, :], mask=m2, other=0.0)
            val += pv.to(tl.float32)
        out_ptrs = out_ptr + n * K * D + rank[:, None] * D + offs_d[None, :]
        tl.store(out_ptrs, cast_rtne(val, out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _masking_bwd(gout_ptr, ids_restore_ptr, gx_ptr, L, D, K, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_x[n, i] = grad_out[n, ids_restore[n, i]] for kept patches, 0 for removed ones."""
    n = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_i, valid_d = offs_i < L, offs_d < D
    r = tl.load(ids_restore_ptr + n * L + offs_i, mask=valid_i, other=K)
    keep = (r < K) & valid_i
    g = tl.load(
        gout_ptr + n * K * D + r[:, None] * D + offs_d[None, :], mask=keep[:, None] & valid_d[None, :], other=0.0
    )
    m2 = valid_i[:, None] & valid_d[None, :]
    gx = cast_rtne(g.to(tl.float32), gx_ptr.dtype.element_ty)
    tl.store(gx_ptr + n * L * D + offs_i[:, None] * D + offs_d[None, :], gx, mask=m2)


# Block sizes: chosen from the static report (benchmarks/results/kernel-static.json: sm_90 registers and theoretical
# occupancy), not yet from GPU timings. BLOCK_D 128 -> 64: forward 128-141 -> 79 registers, occupancy 18.8% -> 37.5%.
# Rank tiles are BLOCK_I x BLOCK_J = 32 x 64.
_BLOCK_I, _BLOCK_J, _BLOCK_D = 32, 64, 64


def _launch_fwd(x, noise, len_keep, pos_embed):
    N, L, D = x.shape
    check(x.dtype in FLOAT_DTYPES, f"masking: x must be float16/bfloat16/float32, got {x.dtype}")
    check(noise.shape == (N, L), f"masking: noise must be [N, L] = {[N, L]}, got {list(noise.shape)}")
    check(0 <= len_keep <= L, f"masking: len_keep {len_keep} outside [0, {L}]")
    check(x.device == noise.device, f"masking: x on {x.device} but noise on {noise.device}")
    out_dtype = x.dtype
    if pos_embed is not None:
        check(
            pos_embed.shape == (1, L + 1, D),
            f"masking: pos_embed must be [1, {L + 1}, {D}], got {list(pos_embed.shape)}",
        )
        out_dtype = torch.result_type(x, pos_embed)
        pos_embed = pos_embed.contiguous()
    noise = noise.to(torch.float32).contiguous()  # exact for every float dtype: order and ties are kept
    out = torch.empty(N, len_keep, D, device=x.device, dtype=out_dtype)
    mask = torch.empty(N, L, device=x.device, dtype=torch.float32)
    ids_restore = torch.empty(N, L, device=x.device, dtype=torch.int64)
    block_d = min(_BLOCK_D, next_pow2(D))
    grid = (N, triton.cdiv(D, block_d))
    _masking_fwd[grid](
        x, pos_embed if pos_embed is not None else x, noise, out, mask, ids_restore,
        L, D, len_keep, x.stride(0), x.stride(1), x.stride(2),
        HAS_POS=pos_embed is not None, BLOCK_I=min(_BLOCK_I, next_pow2(L)), BLOCK_J=min(_BLOCK_J, next_pow2(L)),
        BLOCK_D=block_d,
    )  # fmt: skip
    return out, mask, ids_restore


def _launch_bwd(grad_out, ids_restore, L, dtype):
    N, K, D = grad_out.shape
    grad_out = grad_out.contiguous()
    gx = torch.empty(N, L, D, device=grad_out.device, dtype=dtype)
    # 32 rows (was 64): 166 -> 64-74 registers on sm_90, occupancy 18.8% -> 37.5-50% (static report)
    block_i, block_d = min(32, next_pow2(L)), min(_BLOCK_D, next_pow2(D))
    grid = (N, triton.cdiv(L, block_i), triton.cdiv(D, block_d))
    _masking_bwd[grid](grad_out, ids_restore, gx, L, D, K, BLOCK_I=block_i, BLOCK_D=block_d)
    return gx


@torch.library.custom_op("fastmae::random_masking", mutates_args=())
def _masking_op(
    x: torch.Tensor, noise: torch.Tensor, len_keep: int, pos_embed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_fwd(x, noise, len_keep, pos_embed)


@_masking_op.register_fake
def _(x, noise, len_keep, pos_embed):
    N, L, D = x.shape
    dtype = torch.result_type(x, pos_embed) if pos_embed is not None else x.dtype
    return x.new_empty(N, len_keep, D, dtype=dtype), x.new_empty(N, L), x.new_empty(N, L, dtype=torch.int64)


@torch.library.custom_op("fastmae::random_masking_bwd", mutates_args=())
def _masking_bwd_op(grad_out: torch.Tensor, ids_restore: torch.Tensor, L: int, dtype: torch.dtype) -> torch.Tensor:
    return _launch_bwd(grad_out, ids_restore, L, dtype)


@_masking_bwd_op.register_fake
def _(grad_out, ids_restore, L, dtype):
    return grad_out.new_empty(grad_out.shape[0], L, grad_out.shape[2], dtype=dtype)


def _setup(ctx, inputs, output):
    x, _, _, pos_embed = inputs
    ctx.save_for_backward(output[2])
    ctx.x_dtype, ctx.L = x.dtype, x.shape[1]
    ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else None


def _backward(ctx, grad_out, _grad_mask, _grad_ids):
    (ids_restore,) = ctx.saved_tensors
    need_x, need_pos = ctx.needs_input_grad[0], ctx.pos_dtype is not None and ctx.needs_input_grad[3]
    if need_pos:  # pos_embed is a fixed buffer in MAE; supported for completeness
        full = _masking_bwd_op(grad_out, ids_restore, ctx.L, grad_out.dtype)
        grad_pos = torch.cat([torch.zeros_like(full[:1, :1]), full.sum(0, keepdim=True)], dim=1).to(ctx.pos_dtype)
        return (full.to(ctx.x_dtype) if need_x else None), None, None, grad_pos
    grad_x = _masking_bwd_op(grad_out, ids_restore, ctx.L, ctx.x_dtype) if need_x else None
    return grad_x, None, None, None


_masking_op.register_autograd(_backward, setup_context=_setup)


def random_masking(
    x: torch.Tensor, noise: torch.Tensor, len_keep: int, pos_embed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused masking: same signature and results as :func:`random_masking_reference` (bit-identical forward)."""
    return _masking_op(x, noise, len_keep, pos_embed)
