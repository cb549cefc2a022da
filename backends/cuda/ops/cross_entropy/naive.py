"""Plain-torch linear cross-entropy: the twin the chunked version is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import at_least_f32


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight^T against targets.

    Args:
        h: [N, d] hidden states (float32 or float64).
        weight: [V, d] the head.
        targets: [N] int64 token ids in [0, V).
        compute_dtype: the matmul's dtype (None: autocast's where it is on, else the weight's). The logits are rounded to it, as a
            matmul in that dtype returns them, then the softmax is taken in float32 (float64 kept).
    Returns:
        loss: [] in the dtype of h.
    """
    dt = compute_dtype or weight.dtype
    logits = at_least_f32(h.to(dt) @ weight.to(dt).T)
    return F.cross_entropy(logits, targets).to(h.dtype)
