"""The elementwise pieces around the WKV scan in plain torch: the model's "ops" path and the
twins the fused Triton kernels (fused.py) are tested against.

Same signatures as the fused kernels: the result is computed in float32 and returned as
`out_dtype` (the dtype of the matmul that reads it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_shift_mix(x: torch.Tensor, prev: torch.Tensor, mix: torch.Tensor,
                    out_dtype=torch.float32) -> torch.Tensor:
    """x + (shift(x) - x) * mix[m] for each mix vector.

    x [B, T, D], prev [B, D] (the token before x[:, 0]), mix [M, D] -> [M, B, T, D].
    """
    x = x.float()
    shifted = torch.cat([prev[:, None].float(), x[:, :-1]], dim=1)
    return (x + (shifted - x) * mix.float()[:, None, None]).to(out_dtype)


def group_norm_bonus_gate(y, r, k, v, g, r_k, weight, bias, eps: float, out_dtype=torch.float32) -> torch.Tensor:
    """(GroupNorm(y) * weight + bias + sum_n(r k r_k) v) * g, per head: the time mix's output.

    y, r, k, v [B, T, H, N]; g [B, T, H*N]; r_k [H, N]; weight, bias [H*N] -> [B, T, H*N].
    """
    y = F.layer_norm(y.float(), y.shape[-1:], eps=eps).flatten(-2) * weight.float() + bias.float()
    bonus = (r.float() * k.float() * r_k.float()).sum(-1, keepdim=True) * v.float()
    return ((y + bonus.flatten(-2)) * g.float()).to(out_dtype)


def sse_norm_gate(xs: torch.Tensor, z: torch.Tensor, gate: torch.Tensor, eps: float,
                  out_dtype=torch.float32) -> torch.Tensor:
    """The SSE's input: xs with gate * RMSNorm_head(z) added to its first K*N channels.

    xs [B, T, D], z [B, T, K, N] (the state readout), gate [D] -> [B, T, D].
    """
    z = z.float()
    KN = z.shape[-2] * z.shape[-1]
    z = (z * torch.rsqrt((z * z).mean(-1, keepdim=True) + eps)).flatten(-2)
    xs = xs.float()
    return torch.cat([xs[..., :KN] + gate[:KN].float() * z, xs[..., KN:]], dim=-1).to(out_dtype)


def relu_square(h: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    """relu(h)^2, the token-parameter attention weights. Any shape."""
    return (torch.relu(h.float()) ** 2).to(out_dtype)
