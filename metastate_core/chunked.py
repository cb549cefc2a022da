"""Chunked sequence form of the WKV-7 recurrence (SPEC section 3), in NumPy.

This is the executable design of the Triton and Metal sequence kernels. Per head, with
alpha_t = -kk_t and beta_t = kk_t * a_t (fla's DPLR `a` and `b`):

    S_t = S_{t-1} (diag(w_t) + alpha_t beta_t^T) + v_t k_t^T                    S: [N_v, N_k]

Within a chunk of C tokens starting from S_0, let G_t = sum_{s<=t} log w_s (G_0 = 0),
Gamma_t = exp(G_t) and u_t = S_{t-1} alpha_t. Unrolling the recurrence gives

    S_t     = S_0 diag(Gamma_t) + sum_{s<=t} (u_s beta_s^T + v_s k_s^T) diag(Gamma_t / Gamma_s)
    u_t     = S_0 A_t + sum_{s<t} u_s (Bh_s . A_t) + v_s (Kh_s . A_t)
    S_t q_t = S_0 Q_t + sum_{s<=t} u_s (Bh_s . Q_t) + v_s (Kh_s . Q_t)

with A_t = alpha_t Gamma_{t-1}, Bh_s = beta_s / Gamma_s, Kh_s = k_s / Gamma_s, Q_t = q_t Gamma_t.
The u_t form a unit lower-triangular system: with M = tril(A Bh^T, -1), P = tril(A Kh^T, -1)
and Tinv = (I - M)^{-1} (forward substitution on a C x C matrix),

    U = W S_0^T + Uv,    W = Tinv A,    Uv = Tinv P V                            (WY form)

so a kernel works in three passes:
  1. per chunk, in parallel: Tinv, W [C, N_k] and Uv [C, N_v]; they do not depend on S_0.
  2. over chunks, sequentially: U = W S_0^T + Uv;
     S_C = S_0 diag(Gamma_C) + U^T (Bh Gamma_C) + V^T (Kh Gamma_C); save each chunk's S_0.
  3. per chunk, in parallel, for every query set q: O = Q S_0^T + tril(Q Bh^T) U + tril(Q Kh^T) V.

Pass 3 needs only the saved chunk states, their U and the pass-1 tensors, so the SSE readout
z_t = S_t xs_t, whose query is known only after the time mix, reuses them.

Range: RWKV-7 bounds w below by exp(-0.6065), so over C tokens Gamma >= exp(-0.6065 C); for
C <= 64 every 1/Gamma stays below 1e17, well inside float32. Sequences whose length is not a
multiple of C are padded at the end with identity steps (w = 1, k = v = kk = a = q = 0),
which leave the state unchanged, as a kernel masks its tail.
"""

from __future__ import annotations

import numpy as np

from .constants import MAX_CHUNK


def _to_chunks(x, C):
    """[B, T, H, N] -> [B, H, n_chunks, C, N], zero padded at the end."""
    B, T, H, N = x.shape
    n = -(-T // C)
    x = np.concatenate([x, np.zeros((B, n * C - T, H, N), x.dtype)], axis=1)
    return x.reshape(B, n, C, H, N).transpose(0, 3, 1, 2, 4)


def _from_chunks(x, T):
    B, H, n, C, N = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(B, n * C, H, N)[:, :T]


class ChunkedWKV:
    """WKV-7 over a sequence in chunks of `chunk_size`.

    S0 [B, H, N, N]; w, k, v, kk, a [B, T, H, N] (w is the decay itself, in (0, 1]).
    `states` [B, H, n_chunks + 1, N, N] holds each chunk's initial state and the final one.
    """

    def __init__(self, S0, w, k, v, kk, a, chunk_size: int = 16):
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}], got {chunk_size}")
        C, dt = chunk_size, S0.dtype
        self.T, self.C = k.shape[1], C
        log_w = _to_chunks(np.log(w).astype(dt), C)              # padding: log 1 = 0
        k, v = _to_chunks(k, C), _to_chunks(v, C)
        alpha, beta = _to_chunks(-kk, C), _to_chunks(kk * a, C)
        G = np.cumsum(log_w, axis=-2)                            # [B, H, n, C, N]
        G_prev = G - log_w
        G_last = G[..., -1:, :]
        A = alpha * np.exp(G_prev)
        inv_gamma = np.exp(-G)
        self.Bh, self.Kh, self.gamma = beta * inv_gamma, k * inv_gamma, np.exp(G)
        self.v = v

        # Pass 1: the chunk-local WY factors.
        causal = np.tril(np.ones((C, C), bool), -1)
        M = np.where(causal, A @ np.swapaxes(self.Bh, -1, -2), 0)
        P = np.where(causal, A @ np.swapaxes(self.Kh, -1, -2), 0)
        Tinv = _unit_lower_inverse(M)
        self.W = Tinv @ A                                        # [B, H, n, C, N_k]
        self.Uv = Tinv @ (P @ v)                                 # [B, H, n, C, N_v]

        # Pass 2: carry the state across chunks (decay to the chunk end in log space, <= 1).
        to_end = np.exp(G_last - G)
        B_end, K_end, decay_end = beta * to_end, k * to_end, np.exp(G_last)
        n = k.shape[2]
        self.states = np.empty(S0.shape[:2] + (n + 1,) + S0.shape[2:], dt)
        self.U = np.empty_like(self.Uv)                          # u_t, kept for pass 3
        S = S0
        for c in range(n):
            self.states[:, :, c] = S
            U = self.U[:, :, c] = self.W[:, :, c] @ np.swapaxes(S, -1, -2) + self.Uv[:, :, c]
            S = (S * decay_end[:, :, c]
                 + np.swapaxes(U, -1, -2) @ B_end[:, :, c]
                 + np.swapaxes(v[:, :, c], -1, -2) @ K_end[:, :, c])
        self.states[:, :, n] = S
        self.final_state = S

    def read(self, q):
        """Pass 3: S_t q_t for q [B, T, H', N], H' <= H (the first H' heads): [B, T, H', N]."""
        h = q.shape[2]
        S0 = self.states[:, :h, :-1]                             # [B, h, n, N_v, N_k]
        Q = _to_chunks(q, self.C) * self.gamma[:, :h]
        U = self.U[:, :h]
        causal = np.tril(np.ones((self.C, self.C), bool))
        out = (Q @ np.swapaxes(S0, -1, -2)
               + np.where(causal, Q @ np.swapaxes(self.Bh[:, :h], -1, -2), 0) @ U
               + np.where(causal, Q @ np.swapaxes(self.Kh[:, :h], -1, -2), 0) @ self.v[:, :h])
        return _from_chunks(out, self.T)


def _unit_lower_inverse(M):
    """(I - M)^{-1} for strictly lower-triangular M [..., C, C], by forward substitution."""
    C = M.shape[-1]
    Tinv = np.broadcast_to(np.eye(C, dtype=M.dtype), M.shape).copy()
    for t in range(1, C):
        # row t of (I - M) X = I:  X[t] = e_t + sum_{s<t} M[t, s] X[s]
        Tinv[..., t, :] += np.einsum("...s,...sj->...j", M[..., t, :t], Tinv[..., :t, :])
    return Tinv
