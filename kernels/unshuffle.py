"""Decoder unshuffle: put the visible tokens back in patch order, fill removed slots with the mask token, add pos.

Official semantics (facebookresearch/mae ``forward_decoder``): ``cat(visible, mask_tokens)`` gathered by
``ids_restore``, the cls token kept first, then ``+ decoder_pos_embed``. The output dtype follows torch's type
promotion of the three inputs, as the official code's ``cat`` and ``+`` do under autocast.
"""

import torch


def unshuffle_reference(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """x [N, 1+K, Dd], mask_token [1, 1, Dd], ids_restore [N, L], pos_embed [1, 1+L, Dd] -> [N, 1+L, Dd]."""
    N, K1, D = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.expand(N, L + 1 - K1, D)  # [N, L-K, Dd]
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd] kept tokens first, in shuffled order
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    return torch.cat([x[:, :1, :], x_], dim=1) + pos_embed


# ---------------------------------------------------------------------------------------------------- Triton
from ._common import FLOAT_DTYPES, cast_rtne, check, next_pow2, tl, triton  # noqa: E402


@triton.jit
def _token_sources(ids_ptr, n, L, K1, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """For this program's output tokens t: the row of x they come from (cls first, kept tokens at 1 + rank) and
    whether they come from x at all (else the mask token), plus the column offsets and the tile mask."""
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_t, valid_d = offs_t < L + 1, offs_d < D
    r = tl.load(ids_ptr + n * L + offs_t - 1, mask=valid_t & (offs_t > 0), other=0)
    src = tl.where(offs_t == 0, 0, r + 1)
    from_x = (offs_t == 0) | (r < K1 - 1)
    return offs_t, offs_d, valid_d, src, from_x, valid_t[:, None] & valid_d[None, :]


@triton.jit
def _unshuffle_fwd(
    x_ptr, tok_ptr, ids_ptr, pos_ptr, out_ptr, L, K1, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    """out[n, t] = (t == 0 ? x[n, 0] : ids[n, t-1] < K ? x[n, 1 + ids[n, t-1]] : mask_token) + pos[t]."""
    n = tl.program_id(0)
    offs_t, offs_d, valid_d, src, from_x, m2 = _token_sources(ids_ptr, n, L, K1, D, BLOCK_T, BLOCK_D)
    xv = tl.load(x_ptr + n * K1 * D + src[:, None] * D + offs_d[None, :], mask=m2 & from_x[:, None], other=0.0)
    tok = tl.load(tok_ptr + offs_d, mask=valid_d, other=0.0)
    v = tl.where(from_x[:, None], xv.to(tl.float32), tok.to(tl.float32)[None, :])
    pv = tl.load(pos_ptr + offs_t[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
    out = cast_rtne(v + pv.to(tl.float32), out_ptr.dtype.element_ty)
    tl.store(out_ptr + n * (L + 1) * D + offs_t[:, None] * D + offs_d[None, :], out, mask=m2)


@triton.jit
def _unshuffle_bwd(
    g_ptr, ids_ptr, gx_ptr, gtok_part_ptr, L, K1, D, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    """grad_x[n, src(t)] = g[n, t] for tokens that came from x (a permutation: each row written once); the mask
    token's gradient, summed over this program's removed positions, goes to one partial-sum row per program."""
    n = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_t, offs_d, valid_d, src, from_x, m2 = _token_sources(ids_ptr, n, L, K1, D, BLOCK_T, BLOCK_D)
    g = tl.load(g_ptr + n * (L + 1) * D + offs_t[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    gx = cast_rtne(g, gx_ptr.dtype.element_ty)
    tl.store(gx_ptr + n * K1 * D + src[:, None] * D + offs_d[None, :], gx, mask=m2 & from_x[:, None])
    part = tl.sum(tl.where(from_x[:, None], 0.0, g), axis=0)
    tl.store(gtok_part_ptr + (n * tl.num_programs(1) + pid_t) * D + offs_d, part, mask=valid_d)


# Block sizes: 16 tokens x 128 channels per program, from the static report (benchmarks/results/kernel-static.json),
# not yet from GPU timings: BLOCK_T 32 -> 16 took the backward from 176 to 54-77 registers (sm_80 occupancy 12.5% ->
# 37.5%, sm_90 25-31% -> 44-56%).
_BLOCK_T, _BLOCK_D = 16, 128


def _grid(N, L, D):
    bt, bd = min(_BLOCK_T, next_pow2(L + 1)), min(_BLOCK_D, next_pow2(D))
    return (N, triton.cdiv(L + 1, bt), triton.cdiv(D, bd)), bt, bd


def _launch_fwd(x, mask_token, ids_restore, pos_embed):
    N, K1, D = x.shape
    L = ids_restore.shape[1]
    check(x.dtype in FLOAT_DTYPES, f"unshuffle: x must be float16/bfloat16/float32, got {x.dtype}")
    check(mask_token.numel() == D, f"unshuffle: mask_token must have {D} elements, got {list(mask_token.shape)}")
    ids_ok = ids_restore.shape == (N, L) and ids_restore.dtype == torch.int64
    check(ids_ok, f"unshuffle: ids_restore must be int64 [N, L], got {ids_restore.dtype} {list(ids_restore.shape)}")
    check(1 <= K1 <= L + 1, f"unshuffle: x has {K1} tokens, expected 1 + K with K <= L = {L}")
    check(
        pos_embed.shape == (1, L + 1, D), f"unshuffle: pos_embed must be [1, {L + 1}, {D}], got {list(pos_embed.shape)}"
    )
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    out = torch.empty(N, L + 1, D, device=x.device, dtype=out_dtype)
    grid, bt, bd = _grid(N, L, D)
    _unshuffle_fwd[grid](x.contiguous(), mask_token.contiguous(), ids_restore.contiguous(), pos_embed.contiguous(), out,
                         L, K1, D, BLOCK_T=bt, BLOCK_D=bd)  # fmt: skip
    return out


def _launch_bwd(grad_out, ids_restore, K1, x_dtype):
    N, L1, D = grad_out.shape
    L = L1 - 1
    grid, bt, bd = _grid(N, L, D)
    gx = torch.empty(N, K1, D, device=grad_out.device, dtype=x_dtype)
    part = torch.empty(N * grid[1], D, device=grad_out.device, dtype=torch.float32)
    _unshuffle_bwd[grid](grad_out.contiguous(), ids_restore.contiguous(), gx, part, L, K1, D, BLOCK_T=bt, BLOCK_D=bd)
    return gx, part.sum(0)


@torch.library.custom_op("fastmae::unshuffle", mutates_args=())
def _unshuffle_op(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    return _launch_fwd(x, mask_token, ids_restore, pos_embed)


@_unshuffle_op.register_fake
def _(x, mask_token, ids_restore, pos_embed):
    dtype = torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos_embed.dtype)
    return x.new_empty(x.shape[0], ids_restore.shape[1] + 1, x.shape[2], dtype=dtype)


@torch.library.custom_op("fastmae::unshuffle_bwd", mutates_args=())
def _unshuffle_bwd_op(
    grad_out: torch.Tensor, ids_restore: torch.Tensor, K1: int, x_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_bwd(grad_out, ids_restore, K1, x_dtype)


@_unshuffle_bwd_op.register_fake
def _(grad_out, ids_restore, K1, x_dtype):
    N, _, D = grad_out.shape
    return grad_out.new_empty(N, K1, D, dtype=x_dtype), grad_out.new_empty(D, dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, mask_token, ids_restore, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.K1, ctx.x_dtype, ctx.tok_shape, ctx.tok_dtype = x.shape[1], x.dtype, mask_token.shape, mask_token.dtype
    ctx.pos_dtype = pos_embed.dtype


def _backward(ctx, grad_out):
    (ids_restore,) = ctx.saved_tensors
    gx, gtok = _unshuffle_bwd_op(grad_out, ids_restore, ctx.K1, ctx.x_dtype)
    gpos = grad_out.sum(0, keepdim=True).to(ctx.pos_dtype) if ctx.needs_input_grad[3] else None
    return gx, gtok.reshape(ctx.tok_shape).to(ctx.tok_dtype), None, gpos


_unshuffle_op.register_autograd(_backward, setup_context=_setup)


def unshuffle(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """Fused decoder unshuffle: same signature and results as :func:`unshuffle_reference` (bit-identical forward)."""
    return _unshuffle_op(x, mask_token, ids_restore, pos_embed)
