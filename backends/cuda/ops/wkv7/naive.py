"""Naive WKV-7 + SSE readout in plain torch: the per-token recurrence of SPEC section 2.

The twin every kernel is tested against (values and, through autograd, gradients). It keeps
nothing but the running state, so it is slow: tests and tiny models only.
"""

from __future__ import annotations

import torch

DECAY_SCALE = -0.6065306597126334  # -exp(-0.5): w = exp(DECAY_SCALE * sigmoid(w_raw)) in (0.545, 1)


def decay_log(w_raw: torch.Tensor) -> torch.Tensor:
    """log w from the decay pre-activation, in float32."""
    return DECAY_SCALE * torch.sigmoid(w_raw.float())


def naive_wkv7(r, w_raw, k, v, kk, a, S0=None, q=None):
    """WKV-7 over a sequence, with an optional second readout of the same states.

    Args:
        r, w_raw, k, v, kk, a: [B, T, H, N]. w_raw is the decay pre-activation
            (w0 + tanh(x_w @ w1) @ w2); kk is the L2-normalised removal key.
        S0: [B, H, N, N] float32 initial state (row = value index), zeros if None.
        q: [B, T, K, N] with K <= H, optional: the SSE query xs, read from the first K heads.
    Returns:
        y [B, T, H, N] = S_t r_t, z [B, T, K, N] = S_t q_t (None without q), S_T [B, H, N, N],
        y and z in float32.
    """
    B, T, H, N = k.shape
    S = torch.zeros(B, H, N, N, device=k.device, dtype=torch.float32) if S0 is None else S0.float()
    w = torch.exp(decay_log(w_raw))
    r, k, v, kk, a = (t.float() for t in (r, k, v, kk, a))
    ys, zs = [], []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, -kk[:, t])
        S = (S * w[:, t, :, None, :] + sa[..., :, None] * (kk[:, t] * a[:, t])[..., None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
        if q is not None:
            K = q.shape[2]
            zs.append(torch.einsum("bhij,bhj->bhi", S[:, :K], q[:, t].float()))
    y = torch.stack(ys, 1)
    z = torch.stack(zs, 1) if q is not None else None
    return y, z, S
