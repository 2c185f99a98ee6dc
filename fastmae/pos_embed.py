"""Fixed 2-D sine-cosine position embeddings, as in the official MAE release.

Channel layout (identical to facebookresearch/mae, so official checkpoints and our init agree exactly): the first half
of the channels encodes the patch's column index and the second half its row index (the official code builds the grid
with ``meshgrid(w, h)`` and feeds its first plane to the first half). Within each half, ``sin`` comes before ``cos``.
The computation is done in float32, as the official NumPy code does.
"""

import torch


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] embedding (sin half then cos half)."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    out = pos.reshape(-1, 1).float() * omega.reshape(1, -1)  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None, cls_token: bool = False) -> torch.Tensor:
    """[(1+)grid_h*grid_w, dim] embedding; patches in row-major order; an all-zero row first when ``cls_token``."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w
    rows = torch.arange(grid_h, dtype=torch.float32).repeat_interleave(grid_w)  # [H*W] row index of each patch
    cols = torch.arange(grid_w, dtype=torch.float32).repeat(grid_h)  # [H*W] column index
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb
