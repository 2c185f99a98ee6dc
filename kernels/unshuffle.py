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
