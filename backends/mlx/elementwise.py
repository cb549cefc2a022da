"""The elementwise pieces around the WKV scan in plain MLX: the twins of the torch backend's
`ops.elementwise.naive` (same names and signatures), so the two models read alike.

Computed in float32, returned as `out_dtype` (the dtype of the matmul that reads the result).
As in the twins, each piece is written in as few operations as the formula allows (one fast
normalisation each, no concatenation for a single token's shift): every operation is a node
MLX builds and schedules per decoded token.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from metastate_core.constants import L2_EPS

F32 = mx.float32


def token_shift_mix(x, prev, mix, out_dtype=F32):
    """x + (shift(x) - x) * mix[m] for each mix vector.

    x [B, T, D], prev [B, D] (the token before x[:, 0]), mix [M, D] -> [M, B, T, D].
    """
    shifted = prev[:, None] if x.shape[1] == 1 else mx.concatenate([prev[:, None], x[:, :-1]], axis=1)
    return (x + (shifted - x) * mix.astype(F32)[:, None, None]).astype(out_dtype)


def group_norm_bonus_gate(y, r, k, v, g, r_k, weight, bias, eps: float, out_dtype=F32):
    """(GroupNorm(y) * weight + bias + sum_n(r k r_k) v) * g, per head: the time mix's output.

    y, r, k, v [B, T, H, N]; g [B, T, H*N]; r_k [H, N]; weight, bias [H*N] -> [B, T, H*N].
    """
    y = mx.fast.layer_norm(y, None, None, eps).reshape(*y.shape[:-2], -1) * weight.astype(F32) + bias.astype(F32)
    bonus = (r * k * r_k.astype(F32)).sum(-1, keepdims=True) * v
    return ((y + bonus.reshape(y.shape)) * g).astype(out_dtype)


def sse_norm_gate(xs, z, gate, eps: float, out_dtype=F32):
    """The SSE's input: xs with gate * RMSNorm_head(z) added to its first K*N channels.

    xs [B, T, D], z [B, T, K, N] (the state readout), gate [D] -> [B, T, D].
    """
    KN = z.shape[-2] * z.shape[-1]
    z = mx.fast.rms_norm(z, None, eps).reshape(*z.shape[:-2], KN)  # z / sqrt(mean(z^2) + eps), per head
    if KN == xs.shape[-1]:
        return (xs + gate.astype(F32) * z).astype(out_dtype)
    return mx.concatenate([xs[..., :KN] + gate[:KN].astype(F32) * z, xs[..., KN:]], axis=-1).astype(out_dtype)


def relu_square(h, out_dtype=F32):
    """relu(h)^2, the token-parameter attention weights. Any shape."""
    return mx.square(nn.relu(h)).astype(out_dtype)


def k_prep(k, a, k_k, k_a, n_head: int):
    """The WKV's removal key and its modified key: kk = l2-normalised (k * k_k) per head, and
    k * (1 + (a - 1) * k_a).

    k, a [B, T, H*N] (a in (0, 1)), k_k, k_a [H*N] -> (kk [B, T, H, N], k [B, T, H*N]), float32.
    """
    kk = (k * k_k.astype(F32)).reshape(*k.shape[:-1], n_head, -1)
    kk = kk / mx.maximum(mx.linalg.norm(kk, axis=-1, keepdims=True), L2_EPS)
    return kk, k * (1 + (a - 1) * k_a.astype(F32))
