"""The elementwise pieces around the WKV scan in plain torch: the model's "ops" path and the
twins the fused Triton kernels (fused.py) are tested against.

Same signatures as the fused kernels: the result is computed in float32 (float64 inputs stay
float64: the tests' reference) and returned as `out_dtype`, the dtype of the matmul that reads
it (k_prep's outputs feed the scan: float32, or float64 for float64 inputs). On the CPU each
operator costs a few microseconds whatever its size, so a decoded token pays for the count:
each piece is written in as few operators as the formula allows (addcmul for a + b * c, one
normalisation operator), and a single token's shift is the state itself (no concatenation).
"""

from __future__ import annotations

import torch

from metastate_core.constants import L2_EPS



def f32(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 kept (`ops.at_least_f32`, without a call for a float32 tensor)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _as(t: torch.Tensor, dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def token_shift_mix(x: torch.Tensor, prev: torch.Tensor, mix: torch.Tensor,
                    out_dtype=torch.float32) -> torch.Tensor:
    """x + (shift(x) - x) * mix[m] for each mix vector.

    x [B, T, D], prev [B, D] (the token before x[:, 0]), mix [M, D] -> [M, B, T, D].
    """
    x = f32(x)
    prev = f32(prev).unsqueeze(1)
    shifted = prev if x.shape[1] == 1 else torch.cat([prev, x[:, :-1]], dim=1)
    return _as(torch.addcmul(x, shifted - x, f32(mix).view(mix.shape[0], 1, 1, -1)), out_dtype)


def group_norm_bonus_gate(y, r, k, v, g, r_k, weight, bias, eps: float, out_dtype=torch.float32) -> torch.Tensor:
    """(GroupNorm(y) * weight + bias + sum_n(r k r_k) v) * g, per head: the time mix's output.

    y, r, k, v [B, T, H, N]; g [B, T, H*N]; r_k [H, N]; weight, bias [H*N] -> [B, T, H*N].
    """
    B, T, H, N = y.shape
    # torch.group_norm: F.group_norm's kernel without its Python checks (a decoded token calls it per layer)
    y = torch.group_norm(f32(y).reshape(B * T, H * N), H, f32(weight), f32(bias), eps).view(B, T, H, N)
    y = torch.addcmul(y, (f32(r) * f32(k) * f32(r_k)).sum(-1, keepdim=True), f32(v))  # + the bonus
    return _as(y.flatten(-2) * f32(g), out_dtype)


def sse_norm_gate(xs: torch.Tensor, z: torch.Tensor, gate: torch.Tensor, eps: float,
                  out_dtype=torch.float32) -> torch.Tensor:
    """The SSE's input: xs with gate * RMSNorm_head(z) added to its first K*N channels.

    xs [B, T, D], z [B, T, K, N] (the state readout), gate [D] -> [B, T, D].
    """
    z = torch.rms_norm(f32(z), z.shape[-1:], None, eps).flatten(-2)  # z / sqrt(mean(z^2) + eps), per head
    KN, xs = z.shape[-1], f32(xs)
    if KN == xs.shape[-1]:
        return _as(torch.addcmul(xs, f32(gate), z), out_dtype)
    return _as(torch.cat([torch.addcmul(xs[..., :KN], f32(gate[:KN]), z), xs[..., KN:]], dim=-1), out_dtype)


def relu_square(h: torch.Tensor, out_dtype=torch.float32) -> torch.Tensor:
    """relu(h)^2, the token-parameter attention weights. Any shape."""
    return _as(torch.relu(f32(h)).square(), out_dtype)


def k_prep(k: torch.Tensor, a: torch.Tensor, k_k: torch.Tensor, k_a: torch.Tensor, n_head: int):
    """The WKV's removal key and its modified key: kk = l2-normalised (k * k_k) per head, and
    k * (1 + (a - 1) * k_a).

    k, a [B, T, H*N] (a in (0, 1)), k_k, k_a [H*N] -> (kk [B, T, H, N], k [B, T, H*N]), float32.
    """
    k, a = f32(k), f32(a)
    kk = (k * f32(k_k)).unflatten(-1, (n_head, -1))
    kk = kk / torch.linalg.vector_norm(kk, dim=-1, keepdim=True).clamp_min(L2_EPS)  # F.normalize's ops, not its wrapper
    return kk, torch.addcmul(k, k * (a - 1), f32(k_a))
