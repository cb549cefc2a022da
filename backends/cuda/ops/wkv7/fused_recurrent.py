"""WKV-7 decode in Triton: one token's state update (in place) and the state readouts.

Layout: S [B, H, N, N] float32 (row i = value index); per-token inputs [B, H, N]. A program
owns (b, h, a block of BI rows): the update is row-local, so rows need no communication.

The SSE readout z = S_t xs_t cannot share the update's launch: xs_t comes from y_t through
the output projection and ln2, so decoding runs `step` (update + y), the model's dense layers,
then `state_read`. Twins: naive_wkv7_step and state_readout (naive.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sequential import _step


def default_decode_rows(N: int, device: torch.device) -> int:
    """8 rows per program: a single token is pure memory traffic (S read and written once), so
    the more programs the better at batch 1 (B*H*N/8 programs, 96 at B=1, H=12, N=64)."""
    return min(N, 8) if device.type == "cuda" else N


@triton.jit
def _step_kernel(s_ptr, r_ptr, w_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, y_ptr,
                 N: tl.constexpr, BI: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BI + tl.arange(0, BI)
    cols = tl.arange(0, N)
    sp = s_ptr + bh * N * N + rows[:, None] * N + cols[None, :]
    o = bh * N
    # the sequence kernels' step (twin: naive_wkv7_step); every row and column is in range
    S = _step(tl.load(sp), w_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, o, rows, cols, cols < N, rows < N)
    tl.store(sp, S)
    r = tl.load(r_ptr + o + cols).to(tl.float32)
    tl.store(y_ptr + o + rows, tl.sum(S * r[None, :], axis=1))


@triton.jit
def _read_kernel(s_ptr, q_ptr, z_ptr, H: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                 BI: tl.constexpr):
    bk = tl.program_id(0).to(tl.int64)
    b = bk // K
    h = bk % K
    rows = tl.program_id(1) * BI + tl.arange(0, BI)
    cols = tl.arange(0, N)
    S = tl.load(s_ptr + (b * H + h) * N * N + rows[:, None] * N + cols[None, :])
    q = tl.load(q_ptr + bk * N + cols).to(tl.float32)
    tl.store(z_ptr + bk * N + rows, tl.sum(S * q[None, :], axis=1))


def wkv7_step(S, r, w_raw, k, v, kk, a, BI):
    B, H, N = k.shape
    y = torch.empty_like(r)
    _step_kernel[(B * H, N // BI)](S, r, w_raw, k, v, kk, a, y, N=N, BI=BI,
                                   num_warps=max(1, min(4, BI * N // 256)))
    return y


def state_read(S, q, BI):
    B, H, N, _ = S.shape
    K = q.shape[1]
    z = torch.empty_like(q)
    _read_kernel[(B * K, N // BI)](S, q, z, H=H, K=K, N=N, BI=BI,
                                   num_warps=max(1, min(4, BI * N // 256)))
    return z
