"""The elementwise pieces around the WKV scan in plain torch: the model's "ops" path and the
twins the fused Triton kernels (fused.py) are tested against.

Same signatures as the fused kernels: the result is computed in float32 (float64 inputs stay
float64: the tests' reference) and returned as `out_dtype`, the dtype of the matmul that reads
it (k_prep's outputs feed the scan: float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least float32."""
    return x if x.dtype == torch.float64 else x.float()


def token_shift_mix(x: torch.Tensor, prev: torch.Tensor, mix: torch.Tensor,
                    out_dtype=torch.float32) -> torch.Tensor:
    """x + (shift(x) - x) * mix[m] for each mix vector.

    x [B, T, D], prev [B, D] (the token before x[:, 0]), mix [M, D] -> [M, B, T, D].
    """
    x = _f(x)
    shifted = torch.cat([_f(prev[:, None]), x[:, :-1]], dim=1)
    return (x + (shifted - x) * _f(mix)[:, None, None]).to(out_dtype)


def group_norm_bonus_gate(y, r, k, v, g, r_k, weight, bias, eps: float, out_dtype=torch.float32) -> torch.Tensor:
    """(GroupNorm(y) * weight + bias + sum_n(r k r_k) v) * g, per head: the time mix's output.

    y, r, k, v [B, T, H, N]; g [B, T, H*N]; r_k [H, N]; weight, bias [H*N] -> [B, T, H*N].
    """
    y = F.layer_norm(_f(y), y.shape[-1:], eps=eps).flatten(-2) * _f(weight) + _f(bias)
    bonus = (_f(r) * _f(k) * _f(r_k)).sum(-1, keepdim=True) * _f(v)
    return ((y + bonus.flatten(-2)) * _f(g)).to(out_dtype)


def sse_norm_gate(xs: torch.Tensor, z: torch.Tensor, gate: torch.Tensor, eps: float,
                  out_dtype=torch.float32) -> torch.Tensor:
    """The SSE's input: xs with gate * RMSNorm_head(z) added to its first K*N channels.

    xs [B, T, D], z [B, T, K, N] (the state readout), gate [D] -> [B, T, D].
    """
    z = _f(z)
    KN = z.shape[-2] * z.shape[-1]
    z = (z * torch.rsqrt((z * z).mean(-1, keepdim=True) + eps)).flatten(-2)
    xs = _f(xs)
    return torch.cat([xs[..., :KN] + _f(gate[:KN]) * z, xs[..., KN:]], dim=-1).to(out_dtype)


def relu_square(h: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    """relu(h)^2, the token-parameter attention weights. Any shape."""
    return (torch.relu(_f(h)) ** 2).to(out_dtype)


def k_prep(k: torch.Tensor, a: torch.Tensor, k_k: torch.Tensor, k_a: torch.Tensor, n_head: int):
    """The WKV's removal key and its modified key: kk = l2-normalised (k * k_k) per head, and
    k * (1 + (a - 1) * k_a).

    k, a [B, T, H*N] (a in (0, 1)), k_k, k_a [H*N] -> (kk [B, T, H, N], k [B, T, H*N]), float32.
    """
    k, a = _f(k), _f(a)
    kk = F.normalize((k * _f(k_k)).unflatten(-1, (n_head, -1)), dim=-1, eps=1e-12)
    return kk, k * (1 + (a - 1) * _f(k_a))
