"""Naive WKV-7 + SSE readout in plain torch: the per-token recurrence of SPEC section 2.

The twin every kernel is tested against (values and, through autograd, gradients). It keeps
nothing but the running state, so it is slow: tests and tiny models only.
"""

from __future__ import annotations

import torch

from metastate_core.constants import DECAY_SCALE

from .. import at_least_f32


def _f32(t: torch.Tensor) -> torch.Tensor:  # at_least_f32 without a call for a float32 tensor
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def decay_log(w_raw: torch.Tensor) -> torch.Tensor:
    """log w from the decay pre-activation, in float32 (float64 for float64 input)."""
    return DECAY_SCALE * torch.sigmoid(_f32(w_raw))


def naive_wkv7(r, w_raw, k, v, kk, a, S0=None, q=None):
    """WKV-7 over a sequence, with an optional second readout of the same states.

    Args:
        r, w_raw, k, v, kk, a: [B, T, H, N]. w_raw is the decay pre-activation
            (w0 + tanh(x_w @ w1) @ w2); kk is the L2-normalised removal key.
        S0: [B, H, N, N] float32 initial state (row = value index), zeros if None.
        q: [B, T, K, N] with K <= H, optional: the SSE query xs, read from the first K heads.
    Returns:
        y [B, T, H, N] = S_t r_t, z [B, T, K, N] = S_t q_t (None without q), S_T [B, H, N, N],
        all float32, or float64 when k is (the arithmetic follows).
    """
    B, T, H, N = k.shape
    dtype = at_least_f32(k[:0]).dtype
    S = torch.zeros(B, H, N, N, device=k.device, dtype=dtype) if S0 is None else S0.to(dtype)
    ys, zs = [], []
    for t in range(T):
        y, S = naive_wkv7_step(S, r[:, t], w_raw[:, t], k[:, t], v[:, t], kk[:, t], a[:, t])
        ys.append(y)
        if q is not None:
            zs.append(state_readout(S, q[:, t]))
    y = torch.stack(ys, 1)
    z = torch.stack(zs, 1) if q is not None else None
    return y, z, S


def naive_wkv7_step(S, r, w_raw, k, v, kk, a, out=None):
    """One token: S [B, H, N, N] float32, inputs [B, H, N] -> (y [B, H, N] float32, new S)
    (float64 throughout for float64 inputs). out: a [B, H, N, N] tensor to write the new S
    into, returned as it (decode without autograd: no new state tensor per token).

    SPEC section 2's update, S' = S diag(w) + (S (-kk)) (kk a)^T + v k^T, as a scaled copy of
    S and two outer products added into it, and each S x as a product and a sum: batched
    matrix products of this size (N x N by N x 1 or N x 2, per head) cost the CPU BLAS 3x as
    much per call (docs/benchmarks.md)."""
    # unsqueeze, not [:, :, None, :]: Python indexing costs twice as much, and a decoded token
    # runs this once a layer
    w = torch.exp(decay_log(w_raw)).unsqueeze(-2)                      # [B, H, 1, N]: scales S's columns
    r, k, v, kk, a = _f32(r), _f32(k), _f32(v), _f32(kk), _f32(a)
    sa = (S * kk.unsqueeze(-2)).sum(-1, keepdim=True)                   # S kk [B, H, N, 1], S before this token
    S_new = S * w if out is None else torch.mul(S, w, out=out)
    S_new.addcmul_(sa, (kk * a).unsqueeze(-2), value=-1).addcmul_(v.unsqueeze(-1), k.unsqueeze(-2))
    return state_readout(S_new, r), S_new


def state_readout(S, q):
    """z = S q over the first K heads: S [B, H, N, N], q [B, K, N] -> [B, K, N] float32."""
    K = q.shape[1]
    return ((S if K == S.shape[1] else S[:, :K]) * _f32(q).unsqueeze(-2)).sum(-1)
