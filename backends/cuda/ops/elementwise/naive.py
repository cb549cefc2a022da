"""The elementwise pieces around the WKV scan in plain torch: the model's "ops" path and the
twins the fused Triton kernels (fused.py) are tested against.

Same signatures as the fused kernels: the result is computed in float32 (float64 inputs stay
float64: the tests' reference) and returned as `out_dtype`, the dtype of the matmul that reads
it (k_prep's outputs feed the scan: float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metastate_core.constants import L2_EPS

from .. import at_least_f32 as f32


def token_shift_mix(x: torch.Tensor, prev: torch.Tensor, mix: torch.Tensor,
                    out_dtype=torch.float32) -> torch.Tensor:
    """x + (shift(x) - x) * mix[m] for each mix vector.

    x [B, T, D], prev [B, D] (the token before x[:, 0]), mix [M, D] -> [M, B, T, D].
    """
    x = f32(x)
    shifted = torch.cat([f32(prev[:, None]), x[:, :-1]], dim=1)
    return (x + (shifted - x) * f32(mix)[:, None, None]).to(out_dtype)


def group_norm_bonus_gate(y, r, k, v, g, r_k, weight, bias, eps: float, out_dtype=torch.float32) -> torch.Tensor:
    """(GroupNorm(y) * weight + bias + sum_n(r k r_k) v) * g, per head: the time mix's output.

    y, r, k, v [B, T, H, N]; g [B, T, H*N]; r_k [H, N]; weight, bias [H*N] -> [B, T, H*N].
    """
    y = F.layer_norm(f32(y), y.shape[-1:], eps=eps).flatten(-2) * f32(weight) + f32(bias)
    bonus = (f32(r) * f32(k) * f32(r_k)).sum(-1, keepdim=True) * f32(v)
    return ((y + bonus.flatten(-2)) * f32(g)).to(out_dtype)


def sse_norm_gate(xs: torch.Tensor, z: torch.Tensor, gate: torch.Tensor, eps: float,
                  out_dtype=torch.float32) -> torch.Tensor:
    """The SSE's input: xs with gate * RMSNorm_head(z) added to its first K*N channels.

    xs [B, T, D], z [B, T, K, N] (the state readout), gate [D] -> [B, T, D].
    """
    z = f32(z)
    KN = z.shape[-2] * z.shape[-1]
    z = (z * torch.rsqrt((z * z).mean(-1, keepdim=True) + eps)).flatten(-2)
    xs = f32(xs)
    return torch.cat([xs[..., :KN] + f32(gate[:KN]) * z, xs[..., KN:]], dim=-1).to(out_dtype)


def relu_square(h: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    """relu(h)^2, the token-parameter attention weights. Any shape."""
    return (torch.relu(f32(h)) ** 2).to(out_dtype)


def k_prep(k: torch.Tensor, a: torch.Tensor, k_k: torch.Tensor, k_a: torch.Tensor, n_head: int):
    """The WKV's removal key and its modified key: kk = l2-normalised (k * k_k) per head, and
    k * (1 + (a - 1) * k_a).

    k, a [B, T, H*N] (a in (0, 1)), k_k, k_a [H*N] -> (kk [B, T, H, N], k [B, T, H*N]), float32.
    """
    k, a = f32(k), f32(a)
    kk = F.normalize((k * f32(k_k)).unflatten(-1, (n_head, -1)), dim=-1, eps=L2_EPS)
    return kk, k * (1 + (a - 1) * f32(k_a))
