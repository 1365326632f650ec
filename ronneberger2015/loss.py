"""The energy function of Eq. 1: pixel-wise soft-max with a weighted cross entropy.

    p_k(x) = exp(a_k(x)) / sum_k' exp(a_k'(x))
    E = sum_x w(x) log p_l(x)(x)

Eq. 1 as printed has no minus sign; training minimises the weighted cross
entropy -sum_x w(x) log p_l(x)(x), which is what "soft-max ... combined with the
cross entropy loss function" means. The paper does not say how E is
normalised: we divide by the number of output pixels (the mean, as Caffe's
SoftmaxWithLoss does by default), so the learning rate does not depend on the
tile size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["weighted_cross_entropy"]


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over output pixels of -w(x) log p_l(x)(x) (Eq. 1).

    Parameters
    ----------
    logits : torch.Tensor
        (B, K, H, W) scores a_k(x) of the network's last layer.
    target : torch.Tensor
        (B, H, W) integer class l(x) of each pixel.
    weight : torch.Tensor
        (B, H, W) weight map w(x) (Eq. 2).

    The soft-max is computed in float32 even under bf16 autocast.
    """
    if logits.ndim != 4 or target.shape != weight.shape or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"expected logits (B, K, H, W) with target and weight (B, H, W); got {tuple(logits.shape)}, "
            f"{tuple(target.shape)}, {tuple(weight.shape)}"
        )
    cross_entropy = F.cross_entropy(logits.float(), target, reduction="none")
    return (weight * cross_entropy).mean()
