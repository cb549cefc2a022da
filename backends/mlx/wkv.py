"""WKV-7 + SSE readout in plain MLX ops, and the check that puts the Metal kernels beside them.

Inputs [B, T, H, N] (decode: [B, H, N]); w_raw is the decay pre-activation, log w =
DECAY_SCALE * sigmoid(w_raw); state S [B, H, N, N] float32, row = value index. The sequence
path is the chunked (WY) algorithm of metastate_core/chunked.py; the Metal kernels of
`backends.mlx.kernels` have the same signatures (the model chooses, in `Model.set_kernels`).
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from metastate_core.constants import DECAY_SCALE
from metastate_core.reference import rel_rms

CHUNK_SIZE = 16
F32 = mx.float32


def wkv7_step_ops(S, r, w_raw, k, v, kk, a):
    """One token. S [B, H, N, N]; r, w_raw, k, v, kk, a [B, H, N] -> (y [B, H, N], S_new)."""
    w = mx.exp(DECAY_SCALE * mx.sigmoid(w_raw))
    sa = S @ (-kk)[..., None]                                        # uses S before decay
    S = S * w[..., None, :] + sa * (kk * a)[..., None, :] + v[..., :, None] * k[..., None, :]
    return (S @ r[..., None])[..., 0], S


def state_read_ops(S, q):
    """S_h q_h for the first K heads. S [B, H, N, N], q [B, K, N] -> [B, K, N]."""
    return (S[:, : q.shape[1]] @ q[..., None])[..., 0]


def _to_chunks(x, C):
    """[B, T, H, N] -> [B, H, n, C, N], zero padded at the end (identity steps)."""
    B, T, H, N = x.shape
    n = -(-T // C)
    if n * C != T:
        x = mx.concatenate([x, mx.zeros((B, n * C - T, H, N), x.dtype)], axis=1)
    return x.reshape(B, n, C, H, N).transpose(0, 3, 1, 2, 4)


def _from_chunks(x, T):
    B, H, n, C, N = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(B, n * C, H, N)[:, :T]


def _unit_lower_inverse(M):
    """(I - M)^{-1} = (I + M)(I + M^2)(I + M^4)... for strictly lower M [..., C, C] (nilpotent)."""
    C = M.shape[-1]
    X, P, p = mx.eye(C, dtype=M.dtype) + M, M, 2
    while p < C:
        P = P @ P
        X = X + X @ P
        p *= 2
    return X


def _t(x):
    return mx.swapaxes(x, -1, -2)


def wkv7_ops(r, w_raw, k, v, kk, a, S0, chunk_size: int = CHUNK_SIZE):
    """A sequence, chunked WY form (metastate_core.chunked). Inputs [B, T, H, N], S0 [B, H, N, N].

    Returns (y [B, T, H, N], S_T [B, H, N, N], read) where read(q [B, T, K, N]) -> S_t q_t
    [B, T, K, N] for the first K heads, from the saved chunk states (pass 3).
    """
    T, C = k.shape[1], chunk_size
    log_w = _to_chunks(DECAY_SCALE * mx.sigmoid(w_raw), C)          # padding: log 1 = 0
    kc, vc = _to_chunks(k, C), _to_chunks(v, C)
    alpha, beta = _to_chunks(-kk, C), _to_chunks(kk * a, C)
    G = mx.cumsum(log_w, axis=-2)                                    # [B, H, n, C, N]
    G_last = G[..., -1:, :]
    A = alpha * mx.exp(G - log_w)
    Bh, Kh = beta * mx.exp(-G), kc * mx.exp(-G)

    # Pass 1: chunk-local WY factors, all chunks at once.
    strict = mx.tril(mx.ones((C, C), F32), -1)
    Tinv = _unit_lower_inverse((A @ _t(Bh)) * strict)
    W = Tinv @ A                                                     # [B, H, n, C, N_k]
    Uv = Tinv @ (((A @ _t(Kh)) * strict) @ vc)                       # [B, H, n, C, N_v]

    # Pass 2: carry the state across chunks (decay to the chunk end in log space, <= 1).
    to_end = mx.exp(G_last - G)
    B_end, K_end, decay = _t(beta * to_end), _t(kc * to_end), mx.exp(G_last)
    vT = _t(vc)
    S, starts, Us = S0, [], []
    for c in range(log_w.shape[2]):
        U = W[:, :, c] @ _t(S) + Uv[:, :, c]
        starts.append(S)
        Us.append(U)
        S = S * decay[:, :, c] + _t(U) @ _t(B_end[:, :, c]) + vT[:, :, c] @ _t(K_end[:, :, c])
    S_starts, U = mx.stack(starts, axis=2), mx.stack(Us, axis=2)    # [B, H, n, N, N], [B, H, n, C, N]
    causal = mx.tril(mx.ones((C, C), F32))

    def read(q):
        h = q.shape[2]
        Q = _to_chunks(q, C) * mx.exp(G[:, :h])
        out = (Q @ _t(S_starts[:, :h])
               + ((Q @ _t(Bh[:, :h])) * causal) @ U[:, :h]
               + ((Q @ _t(Kh[:, :h])) * causal) @ vc[:, :h])
        return _from_chunks(out, T)

    return read(r), S, read


@functools.lru_cache(maxsize=None)
def metal_problem(kernels, head_size: int) -> str | None:
    """Why `kernels` (the Metal set: seq, step, read) cannot stand in for the plain ops on this
    machine, or None. Runs every entry point once (float32, a sequence past one state-save
    interval) against the plain ops, at SPEC section 6's float32 bounds. The kernels are
    compiled by this machine's Metal compiler at first use, so a body it rejects shows here,
    once per process and head size, not in the middle of a chat."""
    B, T, H, N = 1, 21, 1, head_size
    keys = mx.random.split(mx.random.key(0), 7)
    r, w_raw, k, v, a = (mx.random.normal((B, T, H, N), key=keys[i]) for i in range(5))
    kk = mx.random.normal((B, T, H, N), key=keys[5])
    kk = kk / mx.sqrt((kk * kk).sum(-1, keepdims=True))
    a = mx.sigmoid(a)
    S0 = 0.1 * mx.random.normal((B, H, N, N), key=keys[6])
    inputs = (r, w_raw, k, v, kk, a, S0)
    try:
        got = _run(kernels.step, kernels.read, kernels.seq, *inputs)
        want = _run(wkv7_step_ops, state_read_ops, wkv7_ops, *inputs)
        mx.eval(got, want)
    except Exception as e:  # noqa: BLE001 - a compiler error, whatever MLX raises it as
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    for name, x, y in zip(("step y", "step S", "read", "sequence y", "sequence S_T", "sequence read"), got, want):
        err = rel_rms(np.array(x), np.array(y))
        if not err <= 1e-4:  # NaN fails too
            return f"{name} differs from the plain ops by rel_rms {err:.2e}"
    return None


def _run(step, read, seq, r, w_raw, k, v, kk, a, S0) -> tuple:
    y1, S1 = step(S0, *(t[:, 0] for t in (r, w_raw, k, v, kk, a)))
    y, S_T, seq_read = seq(r, w_raw, k, v, kk, a, S0)
    return y1, S1, read(S1, r[:, 0]), y, S_T, seq_read(k)
