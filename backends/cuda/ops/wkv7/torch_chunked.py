"""Chunked WKV-7 in plain torch ops: the sequence path of SPEC section 3, differentiable by autograd.

A port of `metastate_core.chunked` (read its docstring for the derivation). Per head, with
alpha = -kk, beta = kk * a and G the in-chunk cumulative log decay:

  1. per chunk, batched: (I - M) [W | Uv] = [A | P V] by a unit lower-triangular solve;
  2. over chunks, a Python loop of n = T / C steps: U = W S0^T + Uv, carry S to the next chunk;
  3. `read(q)`, batched over chunks: O = Q S0^T + tril(Q Bh^T) U + tril(Q Kh^T) V.

Everything runs in float32 whatever the input dtype. No per-token loop: cost O(T N^2 + T C N)
per head and autograd memory O(T N + (T / C) N^2). The Triton kernels have the same signature.
Passes 1-3 (`wy_factors`, `wy_read`) are also the forward of chunk.py's `reference_backward`,
the plain twin of the chunked Triton kernels, which runs them in float64.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from metastate_core.constants import MAX_CHUNK

from .naive import decay_log


def to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, T, H, N] -> [B, H, n, C, N], zero padded at the end (identity steps)."""
    B, T, H, N = x.shape
    n = -(-T // C)
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * C - T))
    return x.view(B, n, C, H, N).permute(0, 3, 1, 2, 4)


def from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, n, C, N] -> [B, T, H, N]."""
    B, H, n, C, N = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, N)[:, :T]


def solve_unit_lower(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(I - M)^-1 rhs for strictly lower-triangular M [..., C, C], in the dtype of rhs (M may be
    bfloat16 under autocast)."""
    eye = torch.eye(M.shape[-1], device=M.device, dtype=rhs.dtype)
    return torch.linalg.solve_triangular(eye - M, rhs, upper=False, unitriangular=True)


def wy_factors(log_w, k, v, kk, a, S, C: int) -> SimpleNamespace:
    """Passes 1 and 2 for [B, T, H, N] inputs (log w the log decay) from the state S [B, H, N, N],
    in chunks of C, in the inputs' dtype: the chunked inputs and factors (log_w, k, v, kk, a,
    G, A, Bh, Kh, M, P, W, Uv [B, H, n, C, N or C]), U, the state at each chunk start (states
    [B, H, n, N, N]) and the final one (S_T)."""
    f = SimpleNamespace(C=C, T=k.shape[1])
    f.log_w = to_chunks(log_w, C)                                 # padding: log 1 = 0
    f.k, f.v, f.kk, f.a = (to_chunks(x, C) for x in (k, v, kk, a))
    alpha, beta = -f.kk, f.kk * f.a
    f.G = torch.cumsum(f.log_w, dim=-2)                           # [B, H, n, C, N]
    G_last = f.G[..., -1:, :]
    f.A = alpha * torch.exp(f.G - f.log_w)                        # alpha_t Gamma_{t-1}
    inv = torch.exp(-f.G)
    f.Bh, f.Kh = beta * inv, f.k * inv

    # Pass 1: chunk-local WY factors, all chunks at once.
    f.M = torch.tril(f.A @ f.Bh.mT, -1)
    f.P = torch.tril(f.A @ f.Kh.mT, -1)
    WU = solve_unit_lower(f.M, torch.cat([f.A, f.P @ f.v], -1))
    f.W, f.Uv = WU[..., :k.shape[-1]], WU[..., k.shape[-1]:]

    # Pass 2: carry the state over chunks; decays to the chunk end are <= 1.
    end = torch.exp(G_last - f.G)
    B_end, K_end, decay_end = beta * end, f.k * end, torch.exp(G_last)
    starts, Us = [], []
    for c in range(f.G.shape[2]):
        starts.append(S)
        U = f.W[:, :, c] @ S.mT + f.Uv[:, :, c]
        Us.append(U)
        S = S * decay_end[:, :, c] + U.mT @ B_end[:, :, c] + f.v[:, :, c].mT @ K_end[:, :, c]
    f.states, f.U, f.S_T = torch.stack(starts, 2), torch.stack(Us, 2), S
    return f


def wy_read(f: SimpleNamespace, q: torch.Tensor) -> torch.Tensor:
    """Pass 3: S_t q_t for q [B, T, K, N], K <= H (the first K heads of `f`): [B, T, K, N]."""
    K = q.shape[2]
    Q = to_chunks(q, f.C) * torch.exp(f.G[:, :K])
    out = (Q @ f.states[:, :K].mT
           + torch.tril(Q @ f.Bh[:, :K].mT) @ f.U[:, :K]
           + torch.tril(Q @ f.Kh[:, :K].mT) @ f.v[:, :K])
    return from_chunks(out, f.T)


def torch_chunked_wkv7(r, w_raw, k, v, kk, a, S0=None, chunk_size: int = 16):
    """WKV-7 over a sequence in chunks.

    Args:
        r, w_raw, k, v, kk, a: [B, T, H, N], any float dtype. w_raw is the decay
            pre-activation: log w = DECAY_SCALE * sigmoid(w_raw).
        S0: [B, H, N, N] initial state (row = value index), zeros if None.
        chunk_size: C in [1, 64]; shorter sequences use C = T.
    Returns:
        y [B, T, H, N] = S_t r_t (float32), S_T [B, H, N, N] float32, and
        read(q): q [B, T, K, N] with K <= H -> S_t q_t [B, T, K, N] float32 for the first K heads.
    """
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}], got {chunk_size}")
    B, T, H, N = k.shape
    f32 = torch.float32
    S = torch.zeros(B, H, N, N, device=k.device, dtype=f32) if S0 is None else S0.to(f32)
    f = wy_factors(decay_log(w_raw), *(x.to(f32) for x in (k, v, kk, a)), S, min(chunk_size, T))

    def read(q: torch.Tensor) -> torch.Tensor:
        """S_t q_t for q [B, T, K, N], K <= H: [B, T, K, N] float32."""
        return wy_read(f, q.to(f32))

    return read(r), f.S_T, read
