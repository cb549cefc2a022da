"""Chunked WKV-7 in plain torch ops: the sequence path of SPEC section 3, differentiable by autograd.

A port of `metastate_core.chunked` (read its docstring for the derivation). Per head, with
alpha = -kk, beta = kk * a and G the in-chunk cumulative log decay:

  1. per chunk, batched: (I - M) [W | Uv] = [A | P V] by a unit lower-triangular solve;
  2. over chunks, a Python loop of n = T / C steps: U = W S0^T + Uv, carry S to the next chunk;
  3. `read(q)`, batched over chunks: O = Q S0^T + tril(Q Bh^T) U + tril(Q Kh^T) V.

Everything runs in float32 whatever the input dtype. No per-token loop: cost O(T N^2 + T C N)
per head and autograd memory O(T N + (T / C) N^2). The Triton kernels have the same signature.
"""

from __future__ import annotations

import torch

from .naive import decay_log

MAX_CHUNK = 64  # exp(0.6065 * 64) ~ 7e16: 1 / Gamma stays finite in float32


def _to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H, N] -> [B, H, n, C, N], zero padded at the end (identity steps)."""
    B, T, H, N = x.shape
    n = -(-T // C)
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * C - T))
    return x.view(B, n, C, H, N).permute(0, 3, 1, 2, 4)


def _from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, n, C, N] -> [B, T, H, N]."""
    B, H, n, C, N = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, N)[:, :T]


def torch_chunked_wkv7(r, w_raw, k, v, kk, a, S0=None, chunk_size: int = 16):
    """WKV-7 over a sequence in chunks.

    Args:
        r, w_raw, k, v, kk, a: [B, T, H, N], any float dtype. w_raw is the decay
            pre-activation: log w = -0.6065306597126334 * sigmoid(w_raw).
        S0: [B, H, N, N] initial state (row = value index), zeros if None.
        chunk_size: C in [1, 64]; shorter sequences use C = T.
    Returns:
        y [B, T, H, N] = S_t r_t (float32), S_T [B, H, N, N] float32, and
        read(q): q [B, T, K, N] with K <= H -> S_t q_t [B, T, K, N] float32 for the first K heads.
    """
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}], got {chunk_size}")
    B, T, H, N = k.shape
    C = min(chunk_size, T)
    f32 = torch.float32
    S = torch.zeros(B, H, N, N, device=k.device, dtype=f32) if S0 is None else S0.to(f32)

    log_w = _to_chunks(decay_log(w_raw), C)                       # padding: log 1 = 0
    kc, vc = _to_chunks(k.to(f32), C), _to_chunks(v.to(f32), C)
    kk32 = kk.to(f32)
    alpha, beta = _to_chunks(-kk32, C), _to_chunks(kk32 * a.to(f32), C)
    G = torch.cumsum(log_w, dim=-2)                               # [B, H, n, C, N]
    G_last = G[..., -1:, :]
    A = alpha * torch.exp(G - log_w)                              # alpha_t Gamma_{t-1}
    inv = torch.exp(-G)
    Bh, Kh = beta * inv, kc * inv

    # Pass 1: chunk-local WY factors, all chunks at once.
    M = torch.tril(A @ Bh.transpose(-1, -2), -1)
    P = torch.tril(A @ Kh.transpose(-1, -2), -1)
    eye = torch.eye(C, device=k.device, dtype=f32)
    WU = torch.linalg.solve_triangular(eye - M, torch.cat([A, P @ vc], -1), upper=False, unitriangular=True)
    W, Uv = WU[..., :N], WU[..., N:]

    # Pass 2: carry the state over chunks; decays to the chunk end are <= 1.
    end = torch.exp(G_last - G)
    B_end, K_end, decay_end = beta * end, kc * end, torch.exp(G_last)
    starts, Us = [], []
    for c in range(G.shape[2]):
        starts.append(S)
        U = W[:, :, c] @ S.transpose(-1, -2) + Uv[:, :, c]
        Us.append(U)
        S = (S * decay_end[:, :, c] + U.transpose(-1, -2) @ B_end[:, :, c]
             + vc[:, :, c].transpose(-1, -2) @ K_end[:, :, c])
    S0s, U = torch.stack(starts, 2), torch.stack(Us, 2)           # [B, H, n, N, N], [B, H, n, C, N]

    def read(q: torch.Tensor) -> torch.Tensor:
        """Pass 3: S_t q_t for q [B, T, K, N], K <= H: [B, T, K, N] float32."""
        K = q.shape[2]
        Q = _to_chunks(q.to(f32), C) * torch.exp(G[:, :K])
        out = (Q @ S0s[:, :K].transpose(-1, -2)
               + torch.tril(Q @ Bh[:, :K].transpose(-1, -2)) @ U[:, :K]
               + torch.tril(Q @ Kh[:, :K].transpose(-1, -2)) @ vc[:, :K])
        return _from_chunks(out, T)

    return read(r), S, read
