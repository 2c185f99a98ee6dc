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
