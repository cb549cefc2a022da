"""WKV-7 over a sequence in chunks on tensor cores (Triton), forward and backward.

The algorithm of `metastate_core/chunked.py` (read its docstring); the kernels' plain-torch twin
is at the end of this file (`reference_forward`, `reference_backward`). Per head, chunk of C
tokens starting from state S (row = value index), alpha = -kk, beta = kk * a, G = in-chunk
cumsum of log w, Gp = G - log w, g = G[C-1] (the chunk's total log decay):

    A = alpha e^Gp,  Bh = beta e^-G,  Kh = k e^-G,  Q = q e^G                      [C, N]
    M = tril(A Bh^T, -1),  P = tril(A Kh^T, -1),  Tinv = (I - M)^-1                [C, C]
    W = Tinv A,  Uv = Tinv P V,  U = W S^T + Uv                                     [C, N]
    S' = S diag(e^g) + U^T Bend + V^T Kend,   Bend = beta e^(g-G),  Kend = k e^(g-G)
    O  = Q S^T + tril(Q Bh^T) U + tril(Q Kh^T) V                                    (each readout)

Kernels (forward):
  _prep_kernel   grid (B*H, chunks)       G, W, Uv, Tinv per chunk (pass 1, parallel)
  _state_kernel  grid (B*H, N/BV)         over chunks: U, S at each chunk start, S_T (pass 2)
  _read_kernel   grid (B*K, chunks)       O for a query, y (q = r) or z (q = xs) (pass 3)

Backward, reverse mode through the same formulas (derivation in `reference_backward`):
  _read_bwd_kernel grid (B*K, chunks)     per readout (q, dO): dq = dQ e^G and its chunk-local
        terms dG += dQ*Q, dU += tril(Q Bh^T)^T dO, dV += tril(Q Kh^T)^T dO,
        dBh += tril(dO U^T)^T Q, dKh += tril(dO V^T)^T Q, with
        dQ = dO S + tril(dO U^T) Bh + tril(dO V^T) Kh. The SSE readout's runs first (its dq
        is needed before dy is known), the r readout's adds to the same buffers.
  _dstate_kernel grid (B*H, N/BV)         reverse over chunks: dS at each chunk end and
        dU += Bend dS'^T;  dS = dS' diag(e^g) + dU^T W + dy^T Q_r + dz^T Q_z.
  _bwd_kernel    grid (B*H, chunks)       every chunk-local gradient, given dS' and dU:
        dW = dU S, dWt = Tinv^T dW, dUt = Tinv^T dU, dM = tril(dWt W^T + dUt Uv^T, -1),
        dP = tril(dUt V^T, -1), dA = dWt + dM Bh + dP Kh, dBh += dM^T A, dKh += dP^T A, ...
        then log space: dG -> d log w by a reverse cumulative sum.

Range: log w >= -0.6065, so for C <= 64 every e^-G < 1e17 and every product above that pairs
a large factor with a small one stays <= 1 in size: float32 throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metastate_core.constants import DECAY_SCALE

from .. import first_order_only
from .checks import MAX_HEAD_SIZE, WKV7InputError, check_chunk_count, check_read_once, check_sequence
from .naive import decay_log
from .sequential import _DECAY, graph_task
from .torch_chunked import from_chunks, solve_unit_lower, to_chunks, wy_factors, wy_read

CHUNK_SIZES = (16, 32, 64)  # tl.dot needs >= 16 rows; MAX_CHUNK (64) bounds 1 / Gamma in float32
# tl.dot operand precision on a GPU (the interpreter ignores it: numpy float32 matmul). "ieee":
# float32 FMA on CUDA cores; "tf32x3": float32-accurate on tensor cores (three TF32 products);
# "tf32": one TF32 product (10-bit mantissa, below bfloat16 input rounding). Accumulation is
# float32 in all. bfloat16 operands were measured slower (the f32 -> bf16 conversions at every
# dot) and 4x less accurate than tf32 (docs/kernels.md), so they are not offered.
PRECISIONS = ("ieee", "tf32x3", "tf32")


@triton.jit
def _dot(x, y, PREC: tl.constexpr):
    """x @ y, float32 accumulation, operands at PREC."""
    return tl.dot(x, y, input_precision=PREC)


# ---------------------------------------------------------------------------------------------
# Pass 1: chunk-local WY factors


@triton.jit
def _prep_kernel(w_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, g_ptr, wf_ptr, uv_ptr, ti_ptr,
                 T, NC, H: tl.constexpr, N: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, C)
    cols = tl.arange(0, N)
    t = c * C + rows
    m = (t < T)[:, None]
    # int64 token offsets: T * H * N passes 2^31 in a long sequence (masks stay int32: registers)
    io = (b * T * H + h) * N + t[:, None].to(tl.int64) * H * N + cols[None, :]
    x = tl.load(w_ptr + io, mask=m, other=0.0).to(tl.float32)
    logw = tl.where(m, (1.0 / (1.0 + tl.exp(-x))) * _DECAY, 0.0)  # padding: log w = 0
    G = tl.cumsum(logw, axis=0)
    kk = tl.load(kk_ptr + io, mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + io, mask=m, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + io, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + io, mask=m, other=0.0).to(tl.float32)
    A = -kk * tl.exp(G - logw)
    ig = tl.exp(-G)
    Bh = kk * a * ig
    Kh = k * ig
    strict = rows[:, None] > rows[None, :]
    M = tl.where(strict, _dot(A, tl.trans(Bh), PREC), 0.0)
    P = tl.where(strict, _dot(A, tl.trans(Kh), PREC), 0.0)
    # Tinv by forward substitution (twin: solve_unit_lower): Tinv[t] = e_t + sum_{s<t} M[t, s] Tinv[s]
    # (rows >= t are still e_t).
    Ti = (rows[:, None] == rows[None, :]).to(tl.float32)
    for s in range(1, C):
        sel = rows[:, None] == s
        m_row = tl.sum(tl.where(sel, M, 0.0), axis=0)
        Ti = tl.where(sel, Ti + tl.sum(m_row[:, None] * Ti, axis=0)[None, :], Ti)
    Wf = _dot(Ti, A, PREC)
    Uv = _dot(Ti, _dot(P, v, PREC), PREC)
    co = (bh * NC + c) * C * N + rows[:, None] * N + cols[None, :]
    tl.store(g_ptr + co, G)
    tl.store(wf_ptr + co, Wf)
    tl.store(uv_ptr + co, Uv)
    tl.store(ti_ptr + (bh * NC + c) * C * C + rows[:, None] * C + rows[None, :], Ti)


# ---------------------------------------------------------------------------------------------
# Pass 2: the state carry over chunks


@triton.jit
def _state_kernel(k_ptr, v_ptr, kk_ptr, a_ptr, s0_ptr, g_ptr, wf_ptr, uv_ptr,
                  u_ptr, states_ptr, sT_ptr,
                  T, NC, H: tl.constexpr, N: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                  HAS_S0: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1) * BV + tl.arange(0, BV)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, C)
    cols = tl.arange(0, N)
    soff = vb[:, None] * N + cols[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + bh * N * N + soff)
    else:
        S = tl.zeros([BV, N], dtype=tl.float32)
    for c in range(NC):
        tl.store(states_ptr + (bh * NC + c) * N * N + soff, S)
        t = c * C + rows
        m = (t < T)[:, None]
        io = (b * T * H + h) * N + t[:, None].to(tl.int64) * H * N
        cb = (bh * NC + c) * C * N + rows[:, None] * N
        kk = tl.load(kk_ptr + io + cols[None, :], mask=m, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + io + cols[None, :], mask=m, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + io + cols[None, :], mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + io + vb[None, :], mask=m, other=0.0).to(tl.float32)
        G = tl.load(g_ptr + cb + cols[None, :])
        g = tl.load(g_ptr + (bh * NC + c) * C * N + (C - 1) * N + cols)
        Wf = tl.load(wf_ptr + cb + cols[None, :])
        U = _dot(Wf, tl.trans(S), PREC) + tl.load(uv_ptr + cb + vb[None, :])
        tl.store(u_ptr + cb + vb[None, :], U)
        e = tl.exp(g[None, :] - G)  # decay to the chunk end, <= 1
        S = (S * tl.exp(g)[None, :] + _dot(tl.trans(U), kk * a * e, PREC)
             + _dot(tl.trans(v), k * e, PREC))
    tl.store(sT_ptr + bh * N * N + soff, S)


# ---------------------------------------------------------------------------------------------
# Pass 3: readout O = S_t q_t


@triton.jit
def _read_kernel(q_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, g_ptr, u_ptr, states_ptr, o_ptr,
                 T, NC, H: tl.constexpr, K: tl.constexpr, N: tl.constexpr, C: tl.constexpr,
                 BV: tl.constexpr, PREC: tl.constexpr):
    bk = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    vb = tl.program_id(2) * BV + tl.arange(0, BV)
    b = bk // K
    h = bk % K
    bh = b * H + h
    rows = tl.arange(0, C)
    cols = tl.arange(0, N)
    t = c * C + rows
    m = (t < T)[:, None]
    io = (b * T * H + h) * N + t[:, None].to(tl.int64) * H * N
    qo = (b * T * K + h) * N + t[:, None].to(tl.int64) * K * N
    cb = (bh * NC + c) * C * N + rows[:, None] * N
    G = tl.load(g_ptr + cb + cols[None, :])
    q = tl.load(q_ptr + qo + cols[None, :], mask=m, other=0.0).to(tl.float32)
    kk = tl.load(kk_ptr + io + cols[None, :], mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + io + cols[None, :], mask=m, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + io + cols[None, :], mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + io + vb[None, :], mask=m, other=0.0).to(tl.float32)
    S = tl.load(states_ptr + (bh * NC + c) * N * N + vb[:, None] * N + cols[None, :])
    U = tl.load(u_ptr + cb + vb[None, :])
    Q = q * tl.exp(G)
    ig = tl.exp(-G)
    causal = rows[:, None] >= rows[None, :]
    Dq = tl.where(causal, _dot(Q, tl.trans(kk * a * ig), PREC), 0.0)
    Eq = tl.where(causal, _dot(Q, tl.trans(k * ig), PREC), 0.0)
    O = (_dot(Q, tl.trans(S), PREC) + _dot(Dq, U, PREC)
         + _dot(Eq, v, PREC))
    tl.store(o_ptr + qo + vb[None, :], O.to(o_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _read_grads(q, dO, S, U, v, Bh, Kh, eg, rows, PREC: tl.constexpr):
    """One readout's backward on one chunk ([C, N] tiles; S [N, N] the chunk's initial state):
    dq, and its chunk-local terms dG, dU, dV, dBh, dKh."""
    causal = rows[:, None] >= rows[None, :]
    Q = q * eg
    DU = tl.where(causal, _dot(dO, tl.trans(U), PREC), 0.0)
    DV = tl.where(causal, _dot(dO, tl.trans(v), PREC), 0.0)
    dQ = _dot(dO, S, PREC) + _dot(DU, Bh, PREC) + _dot(DV, Kh, PREC)
    Dq = tl.where(causal, _dot(Q, tl.trans(Bh), PREC), 0.0)
    Eq = tl.where(causal, _dot(Q, tl.trans(Kh), PREC), 0.0)
    return (dQ * eg, dQ * Q, _dot(tl.trans(Dq), dO, PREC), _dot(tl.trans(Eq), dO, PREC),
            _dot(tl.trans(DU), Q, PREC), _dot(tl.trans(DV), Q, PREC))


@triton.jit
def _read_bwd_kernel(q_ptr, do_ptr, q2_ptr, do2_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, g_ptr, u_ptr, states_ptr,
                     dq_ptr, dg_ptr, du_ptr, dv_ptr, dbh_ptr, dkh_ptr,
                     T, NC, KADD, H: tl.constexpr, K: tl.constexpr, K2: tl.constexpr, N: tl.constexpr,
                     C: tl.constexpr, PREC: tl.constexpr, TERMS: tl.constexpr):
    """dq for a readout (q, dO over K heads) and, with TERMS, its chunk-local terms stored into
    (h >= KADD) or added to (h < KADD) the buffers dG, dU, dV, dBh, dKh [B, H, NC, C, N]. K2 > 0:
    the terms of a second readout (q2, dO2 over its first K2 heads) join them in registers."""
    bk = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = bk // K
    h = bk % K
    bh = b * H + h
    rows = tl.arange(0, C)
    cols = tl.arange(0, N)
    t = c * C + rows
    m = (t < T)[:, None]
    io = (b * T * H + h) * N + t[:, None].to(tl.int64) * H * N + cols[None, :]
    qo = (b * T * K + h) * N + t[:, None].to(tl.int64) * K * N + cols[None, :]
    co = (bh * NC + c) * C * N + rows[:, None] * N + cols[None, :]
    G = tl.load(g_ptr + co)
    q = tl.load(q_ptr + qo, mask=m, other=0.0).to(tl.float32)
    dO = tl.load(do_ptr + qo, mask=m, other=0.0).to(tl.float32)
    kk = tl.load(kk_ptr + io, mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + io, mask=m, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + io, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + io, mask=m, other=0.0).to(tl.float32)
    S = tl.load(states_ptr + (bh * NC + c) * N * N + cols[:, None] * N + cols[None, :])
    U = tl.load(u_ptr + co)
    ig = tl.exp(-G)
    Bh, Kh, eg = kk * a * ig, k * ig, tl.exp(G)
    dq, dG, dU, dV, dBh, dKh = _read_grads(q, dO, S, U, v, Bh, Kh, eg, rows, PREC)
    tl.store(dq_ptr + qo, dq, mask=m)
    if TERMS:
        if K2 > 0:
            if h < K2:
                q2o = (b * T * K2 + h) * N + t[:, None].to(tl.int64) * K2 * N + cols[None, :]
                q2 = tl.load(q2_ptr + q2o, mask=m, other=0.0).to(tl.float32)
                dO2 = tl.load(do2_ptr + q2o, mask=m, other=0.0).to(tl.float32)
                _, dG2, dU2, dV2, dBh2, dKh2 = _read_grads(q2, dO2, S, U, v, Bh, Kh, eg, rows, PREC)
                dG += dG2
                dU += dU2
                dV += dV2
                dBh += dBh2
                dKh += dKh2
        if h < KADD:
            dG += tl.load(dg_ptr + co)
            dU += tl.load(du_ptr + co)
            dV += tl.load(dv_ptr + co)
            dBh += tl.load(dbh_ptr + co)
            dKh += tl.load(dkh_ptr + co)
        tl.store(dg_ptr + co, dG)
        tl.store(du_ptr + co, dU)
        tl.store(dv_ptr + co, dV)
        tl.store(dbh_ptr + co, dBh)
        tl.store(dkh_ptr + co, dKh)


@triton.jit
def _dstate_kernel(r_ptr, dy_ptr, q_ptr, dz_ptr, kk_ptr, a_ptr, g_ptr, wf_ptr, du_ptr,
                   dsT_ptr, dstates_ptr, ds0_ptr,
                   T, NC, H: tl.constexpr, K: tl.constexpr, N: tl.constexpr, C: tl.constexpr,
                   BV: tl.constexpr, HAS_DST: tl.constexpr, HAS_Z: tl.constexpr,
                   PREC: tl.constexpr):
    """dS' at every chunk end (dstates) and dU += Bend dS'^T in place, last chunk first."""
    bh = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1) * BV + tl.arange(0, BV)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, C)
    cols = tl.arange(0, N)
    soff = vb[:, None] * N + cols[None, :]
    if HAS_DST:
        dS = tl.load(dsT_ptr + bh * N * N + soff)
    else:
        dS = tl.zeros([BV, N], dtype=tl.float32)
    for ci in range(NC):
        c = NC - 1 - ci
        tl.store(dstates_ptr + (bh * NC + c) * N * N + soff, dS)
        t = c * C + rows
        m = (t < T)[:, None]
        io = (b * T * H + h) * N + t[:, None].to(tl.int64) * H * N
        cb = (bh * NC + c) * C * N + rows[:, None] * N
        G = tl.load(g_ptr + cb + cols[None, :])
        g = tl.load(g_ptr + (bh * NC + c) * C * N + (C - 1) * N + cols)
        kk = tl.load(kk_ptr + io + cols[None, :], mask=m, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + io + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dU = (tl.load(du_ptr + cb + vb[None, :])
              + _dot(kk * a * tl.exp(g[None, :] - G), tl.trans(dS), PREC))
        tl.store(du_ptr + cb + vb[None, :], dU)
        eg = tl.exp(G)
        r = tl.load(r_ptr + io + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + io + vb[None, :], mask=m, other=0.0).to(tl.float32)
        dS = (dS * tl.exp(g)[None, :]
              + _dot(tl.trans(dU), tl.load(wf_ptr + cb + cols[None, :]), PREC)
              + _dot(tl.trans(dy), r * eg, PREC))
        if HAS_Z:
            mz = m & ((t * 0 + h) < K)[:, None]  # block-shaped: newer interpreters reject scalar masks
            qo = (b * T * K + h) * N + t[:, None].to(tl.int64) * K * N
            q = tl.load(q_ptr + qo + cols[None, :], mask=mz, other=0.0).to(tl.float32)
            dz = tl.load(dz_ptr + qo + vb[None, :], mask=mz, other=0.0).to(tl.float32)
            dS += _dot(tl.trans(dz), q * eg, PREC)
    tl.store(ds0_ptr + bh * N * N + soff, dS)


@triton.jit
def _bwd_kernel(w_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, g_ptr, wf_ptr, uv_ptr, ti_ptr, u_ptr,
                states_ptr, dstates_ptr, du_ptr, dg_ptr, dv_acc_ptr, dbh_ptr, dkh_ptr,
                dw_ptr, dk_ptr, dv_ptr, dkk_ptr, da_ptr,
                T, NC, H: tl.constexpr, N: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, C)
    cols = tl.arange(0, N)
    t = c * C + rows
    m = (t < T)[:, None]
    io = (b * T * H + h) * N + t[:, None].to(tl.int64) * H * N + cols[None, :]
    co = (bh * NC + c) * C * N + rows[:, None] * N + cols[None, :]
    so = (bh * NC + c) * N * N + cols[:, None] * N + cols[None, :]
    x = tl.load(w_ptr + io, mask=m, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-x))
    logw = tl.where(m, sig * _DECAY, 0.0)
    kk = tl.load(kk_ptr + io, mask=m, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + io, mask=m, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + io, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + io, mask=m, other=0.0).to(tl.float32)
    G = tl.load(g_ptr + co)
    g = tl.load(g_ptr + (bh * NC + c) * C * N + (C - 1) * N + cols)
    S = tl.load(states_ptr + so)
    dSn = tl.load(dstates_ptr + so)
    U = tl.load(u_ptr + co)
    dU = tl.load(du_ptr + co)
    dG = tl.load(dg_ptr + co)
    dV = tl.load(dv_acc_ptr + co)
    dBh = tl.load(dbh_ptr + co)
    dKh = tl.load(dkh_ptr + co)
    beta = kk * a
    # Through S' = S diag(e^g) + U^T Bend + V^T Kend (S's own gradient is _dstate_kernel's).
    e = tl.exp(g[None, :] - G)
    Bend = beta * e
    Kend = k * e
    dg = tl.exp(g) * tl.sum(dSn * S, axis=0)
    dBend = _dot(U, dSn, PREC)
    dKend = _dot(v, dSn, PREC)
    dV += _dot(Kend, tl.trans(dSn), PREC)
    dbeta = dBend * e
    dk = dKend * e
    t1 = dBend * Bend + dKend * Kend
    dg += tl.sum(t1, axis=0)
    dG -= t1
    # Through U = W S^T + Uv, W = Tinv A, Uv = Tinv P V, Tinv = (I - M)^-1.
    Wf = tl.load(wf_ptr + co)
    Uv = tl.load(uv_ptr + co)
    Ti = tl.load(ti_ptr + (bh * NC + c) * C * C + rows[:, None] * C + rows[None, :])
    dW = _dot(dU, S, PREC)
    dWt = _dot(tl.trans(Ti), dW, PREC)
    dUt = _dot(tl.trans(Ti), dU, PREC)
    strict = rows[:, None] > rows[None, :]
    dM = tl.where(strict, _dot(dWt, tl.trans(Wf), PREC)
                  + _dot(dUt, tl.trans(Uv), PREC), 0.0)
    dP = tl.where(strict, _dot(dUt, tl.trans(v), PREC), 0.0)
    ig = tl.exp(-G)
    egp = tl.exp(G - logw)
    A = -kk * egp
    Bh = beta * ig
    Kh = k * ig
    P = tl.where(strict, _dot(A, tl.trans(Kh), PREC), 0.0)
    dV += _dot(tl.trans(P), dUt, PREC)
    dA = dWt + _dot(dM, Bh, PREC) + _dot(dP, Kh, PREC)
    dBh += _dot(tl.trans(dM), A, PREC)
    dKh += _dot(tl.trans(dP), A, PREC)
    # Through A = alpha e^Gp, Bh = beta e^-G, Kh = k e^-G, then log space.
    dbeta += dBh * ig
    dk += dKh * ig
    dG -= dBh * Bh + dKh * Kh
    dGp = dA * A
    dG += dGp + tl.where(rows[:, None] == C - 1, dg[None, :], 0.0)
    dlogw = tl.cumsum(dG, axis=0, reverse=True) - dGp
    tl.store(dw_ptr + io, dlogw * _DECAY * sig * (1.0 - sig), mask=m)
    tl.store(dk_ptr + io, dk, mask=m)
    tl.store(dv_ptr + io, dV, mask=m)
    tl.store(dkk_ptr + io, dbeta * a - dA * egp, mask=m)
    tl.store(da_ptr + io, dbeta * kk, mask=m)


# ---------------------------------------------------------------------------------------------
# Launchers


class Launch:
    """Launch parameters of one chunk_wkv7 call (none changes a result beyond rounding).

    C: chunk size; BV: value rows of S per program in the sequential passes (B*H*N/BV
    programs, a [BV, N] state block each); prec: tl.dot input precision; warps: num_warps of
    every kernel; fused_backward: both readouts' chunk-local gradient terms in one
    _read_bwd_kernel pass (the SSE readout's own backward computes only its dq) instead of
    stored by one, re-read and re-stored by the other; seq_maxnreg: a register cap for the two
    sequential passes (_state_kernel, _dstate_kernel), so that more of their B*H*N/BV programs
    are resident at once (they are latency-bound: a program that waits for a second wave doubles
    the pass).
    """

    def __init__(self, C, BV, prec, warps, fused_backward=False, seq_maxnreg=None):
        self.C, self.BV, self.prec, self.warps = C, BV, prec, warps
        self.fused_backward, self.seq_maxnreg = fused_backward, seq_maxnreg

    def seq_options(self) -> dict:
        """Launch options of the sequential passes."""
        return {"num_warps": self.warps, **({"maxnreg": self.seq_maxnreg} if self.seq_maxnreg else {})}

    @classmethod
    def resolve(cls, device, dtype, N, chunk_size=16, block_v=None, precision=None, num_warps=None,
                fused_backward=False, seq_maxnreg=None):
        """Defaults by device and input dtype: on a GPU BV = 32 and float32 inputs get "tf32x3"
        (SPEC section 6's 1e-4 for float32), bfloat16/float16 "tf32"; under the interpreter one
        block per head (its cost is per operation, not per element)."""
        if chunk_size not in CHUNK_SIZES:
            raise WKV7InputError(f"chunk_size = {chunk_size} is not supported; expected one of {CHUNK_SIZES}")
        BV = block_v or (min(N, 32) if device.type == "cuda" else N)
        if not 16 <= BV <= N or BV & (BV - 1):
            raise WKV7InputError(f"block_v = {BV} must be a power of two in [16, N = {N}]")
        prec = precision or ("tf32x3" if dtype == torch.float32 else "tf32")
        if prec not in PRECISIONS:
            raise WKV7InputError(f"precision = {prec!r} is not one of {PRECISIONS}")
        warps = num_warps or 4
        if warps not in (1, 2, 4, 8, 16):
            raise WKV7InputError(f"num_warps = {warps} must be a power of two in [1, 16]")
        if seq_maxnreg is not None and not 24 <= seq_maxnreg <= 255:
            raise WKV7InputError(f"seq_maxnreg = {seq_maxnreg} must be in [24, 255] registers")
        return cls(chunk_size, BV, prec, warps, bool(fused_backward), seq_maxnreg)


class ChunkSaved:
    """What pass 1 and 2 leave for the readouts and the backward pass.

    G, W, Uv, U [B, H, NC, C, N] f32; Tinv [B, H, NC, C, C] f32; states [B, H, NC, N, N] f32
    (each chunk's initial state); the inputs k, v, kk, a, w_raw [B, T, H, N] as given.
    """

    def __init__(self, launch, T, w_raw, k, v, kk, a, G, W, Uv, Tinv, U, states):
        self.launch, self.C, self.T = launch, launch.C, T
        self.w_raw, self.k, self.v, self.kk, self.a = w_raw, k, v, kk, a
        self.G, self.W, self.Uv, self.Tinv, self.U, self.states = G, W, Uv, Tinv, U, states


def chunk_wkv7_fwd(r, w_raw, k, v, kk, a, S0=None, launch: Launch | None = None):
    """Passes 1-3 for the query r.

    Args: r, w_raw, k, v, kk, a [B, T, H, N] contiguous, any float dtype; S0 [B, H, N, N]
        float32 or None; launch: Launch (default: Launch.resolve for these inputs).
    Returns: y [B, T, H, N] (dtype of r), S_T [B, H, N, N] f32, saved (ChunkSaved).
    """
    B, T, H, N = k.shape
    L = launch or Launch.resolve(k.device, k.dtype, N)
    C, BV, PREC, NW = L.C, L.BV, L.prec, L.warps
    NC = triton.cdiv(T, C)
    f32 = dict(device=k.device, dtype=torch.float32)
    G, W, Uv, U = (torch.empty(B, H, NC, C, N, **f32) for _ in range(4))
    Tinv = torch.empty(B, H, NC, C, C, **f32)
    states = torch.empty(B, H, NC, N, N, **f32)
    sT = torch.empty(B, H, N, N, **f32)
    _prep_kernel[(B * H, NC)](w_raw, k, v, kk, a, G, W, Uv, Tinv, T, NC, H=H, N=N, C=C,
                              PREC=PREC, num_warps=NW)
    _state_kernel[(B * H, N // BV)](k, v, kk, a, S0 if S0 is not None else sT, G, W, Uv, U, states, sT,
                                    T, NC, H=H, N=N, C=C, BV=BV, HAS_S0=S0 is not None,
                                    PREC=PREC, **L.seq_options())
    saved = ChunkSaved(L, T, w_raw, k, v, kk, a, G, W, Uv, Tinv, U, states)
    return chunk_wkv7_read(saved, r), sT, saved


def chunk_wkv7_read(saved: ChunkSaved, q):
    """Pass 3: z_t = S_t q_t for q [B, T, K, N] (contiguous, K <= H, the first K heads): dtype of q."""
    B, T, H, N = saved.k.shape
    K = q.shape[2]
    NC = saved.states.shape[2]
    out = torch.empty_like(q)
    L = saved.launch
    # One program per (b, h, chunk) covers all N value rows: narrower blocks would recompute
    # the C x C factors per block.
    _read_kernel[(B * K, NC, 1)](
        q, saved.k, saved.v, saved.kk, saved.a, saved.G, saved.U, saved.states, out,
        T, NC, H=H, K=K, N=N, C=L.C, BV=N, PREC=L.prec, num_warps=L.warps)
    return out


def chunk_wkv7_read_bwd(saved: ChunkSaved, q, dO, acc=None, *, terms=True, second=None):
    """Backward of one readout: returns dq [B, T, K, N] f32 and `acc`, the chunk-local gradient
    buffers (dG, dU, dV, dBh, dKh, each [B, H, NC, C, N] f32) with this readout's terms stored
    (acc None) or added (acc from an earlier readout over its first acc.K heads). terms False:
    dq only (acc None). second: (q2, dO2) of another readout over its first K2 heads, whose
    terms are added in the same pass (its dq is not returned)."""
    B, T, H, N = saved.k.shape
    K = q.shape[2]
    NC = saved.states.shape[2]
    dq = torch.empty(B, T, K, N, device=q.device, dtype=torch.float32)
    if terms and acc is None:
        acc = _Acc([torch.empty_like(saved.G) for _ in range(5)], 0)
    q2, dO2 = second if second is not None else (q, dO)
    _read_bwd_kernel[(B * K, NC)](
        q, dO, q2, dO2, saved.k, saved.v, saved.kk, saved.a, saved.G, saved.U, saved.states,
        dq, *(acc.bufs if terms else [dq] * 5), T, NC, acc.K if terms else 0, H=H, K=K,
        K2=q2.shape[2] if second is not None else 0, N=N, C=saved.C,
        PREC=saved.launch.prec, TERMS=terms, num_warps=saved.launch.warps)
    if terms:
        acc.K = max(acc.K, K)
    return dq, acc


class _Acc:
    def __init__(self, bufs, K):
        self.bufs, self.K = bufs, K


def chunk_wkv7_bwd(saved: ChunkSaved, r, dy, dS_T=None, q=None, dz=None, acc=None):
    """Gradients (f32) of r, w_raw, k, v, kk, a and S0 given dy (readout r), optionally dz
    (readout q, its chunk-local terms already in `acc` from chunk_wkv7_read_bwd, or with
    launch.fused_backward added here in r's pass) and dS_T."""
    B, T, H, N = saved.k.shape
    L = saved.launch
    C, NC, BV = L.C, saved.states.shape[2], L.BV
    has_z = dz is not None
    if L.fused_backward:
        dr, acc = chunk_wkv7_read_bwd(saved, r, dy, second=(q, dz) if has_z else None)
    else:
        dr, acc = chunk_wkv7_read_bwd(saved, r, dy, acc)
    dG, dU, dV_acc, dBh, dKh = acc.bufs
    K = q.shape[2] if has_z else 1
    dstates = torch.empty_like(saved.states)
    dS0 = torch.empty(B, H, N, N, device=r.device, dtype=torch.float32)
    _dstate_kernel[(B * H, N // BV)](
        r, dy, q if has_z else r, dz if has_z else dy, saved.kk, saved.a, saved.G, saved.W, dU,
        dS_T if dS_T is not None else dS0, dstates, dS0,
        T, NC, H=H, K=K, N=N, C=C, BV=BV, HAS_DST=dS_T is not None, HAS_Z=has_z,
        PREC=L.prec, **L.seq_options())
    dw, dk, dv, dkk, da = (torch.empty(B, T, H, N, device=r.device, dtype=torch.float32) for _ in range(5))
    _bwd_kernel[(B * H, NC)](
        saved.w_raw, saved.k, saved.v, saved.kk, saved.a, saved.G, saved.W, saved.Uv, saved.Tinv,
        saved.U, saved.states, dstates, dU, dG, dV_acc, dBh, dKh, dw, dk, dv, dkk, da,
        T, NC, H=H, N=N, C=C, PREC=L.prec, num_warps=L.warps)
    return dr, dw, dk, dv, dkk, da, dS0


# ---------------------------------------------------------------------------------------------
# Autograd (the two-function pattern of sequential.py) and the public entry point


class _Shared:
    """The launch parameters the sequence pass and its readout share and, during backward, the
    readout's q, dz and chunk-local gradient buffers (the readout's backward runs first).
    Tensors between forward and backward travel only through autograd (save_for_backward), so
    saved-tensor hooks, activation checkpointing among them, see every one."""

    def __init__(self, launch, T):
        self.launch, self.T = launch, T
        self.read_called = False
        self.q = self.dz = self.acc = None
        self.task = None  # the backward pass that left q, dz and acc


class _ChunkWKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w_raw, k, v, kk, a, S0, shared):
        y, sT, sv = chunk_wkv7_fwd(r, w_raw, k, v, kk, a, S0, shared.launch)
        internals = (sv.G, sv.W, sv.Uv, sv.Tinv, sv.U, sv.states)
        ctx.save_for_backward(r, w_raw, k, v, kk, a, *internals)
        ctx.mark_non_differentiable(*internals)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the internals
        ctx.shared = shared
        ctx.has_s0 = S0 is not None
        # `link` carries no value: the readout consumes it, so autograd runs the readout's
        # backward (which leaves dz in `shared`) before this one.
        return y, sT, sT.new_zeros(()), *internals

    @staticmethod
    @first_order_only
    def backward(ctx, dy, dS_T, _dlink, *_internals):
        r, w_raw, k, v, kk, a, *internals = ctx.saved_tensors
        sh = ctx.shared
        saved = ChunkSaved(sh.launch, sh.T, w_raw, k, v, kk, a, *internals)
        q, dz, acc = (sh.q, sh.dz, sh.acc) if sh.task == graph_task() else (None, None, None)
        sh.q = sh.dz = sh.acc = None
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        dS_T = None if dS_T is None else dS_T.contiguous()
        grads = chunk_wkv7_bwd(saved, r, dy, dS_T, q, dz, acc)
        dr, dw, dk, dv, dkk, da, dS0 = grads
        out = [g.to(x.dtype) for g, x in zip((dr, dw, dk, dv, dkk, da), (r, w_raw, k, v, kk, a))]
        return (*out, dS0 if ctx.has_s0 else None, None)


class _ChunkRead(torch.autograd.Function):
    """z = S_t q_t. Its gradients for k, v, kk, a (inputs here only for the kernels) reach them
    through _ChunkWKV7.backward, which takes this readout's chunk-local terms."""

    @staticmethod
    def forward(ctx, q, link, k, v, kk, a, G, U, states, shared):
        ctx.save_for_backward(q, k, v, kk, a, G, U, states)
        ctx.shared = shared
        return chunk_wkv7_read(_read_view(shared, k, v, kk, a, G, U, states), q)

    @staticmethod
    @first_order_only
    def backward(ctx, dz):
        q, *tensors = ctx.saved_tensors
        sh = ctx.shared
        sh.q, sh.dz, sh.task = q, dz.contiguous(), graph_task()
        # fused_backward: dq only here; r's pass adds this readout's terms (chunk_wkv7_bwd)
        view = _read_view(sh, *tensors)
        dq, sh.acc = chunk_wkv7_read_bwd(view, q, sh.dz, terms=not sh.launch.fused_backward)
        return dq.to(q.dtype), torch.zeros((), device=dz.device), *([None] * 8)


def _read_view(shared, k, v, kk, a, G, U, states):
    """The part of ChunkSaved the readout kernels use."""
    return ChunkSaved(shared.launch, shared.T, None, k, v, kk, a, G, None, None, None, U, states)


def chunk_wkv7(r, w_raw, k, v, kk, a, S0=None, *, chunk_size: int = 16, block_v: int | None = None,
               precision: str | None = None, num_warps: int | None = None, fused_backward: bool = False,
               seq_maxnreg: int | None = None):
    """WKV-7 over a sequence by the chunked (WY) kernels: same contract as `triton_wkv7`.

    Args:
        r, w_raw, k, v, kk, a: [B, T, H, N], float32/bfloat16/float16. w_raw is the decay
            pre-activation: log w = DECAY_SCALE * sigmoid(w_raw), in float32.
        S0: [B, H, N, N] float32 initial state (row = value index), zeros if None.
        chunk_size: tokens per chunk, 16, 32 or 64 (tl.dot needs >= 16; 1/Gamma overflows
            float32 past 64).
        block_v: value rows of S per program in the sequential passes (a power of two in
            [16, N]); default by device.
        precision: tl.dot input precision on a GPU, "ieee", "tf32x3" or "tf32"; default
            "tf32x3" for float32 inputs, "tf32" for bfloat16/float16 (see `Launch.resolve`).
        num_warps: of every kernel (default 4).
        fused_backward: both readouts' gradient terms in one pass instead of one pass each
            that stores, re-reads and re-stores five buffers (see docs/kernels.md).
        seq_maxnreg: register cap of the two sequential passes (GPU), None for the compiler's
            choice (see docs/kernels.md).
    Returns:
        y [B, T, H, N] = S_t r_t (dtype of r), S_T [B, H, N, N] float32, and
        read(q): q [B, T, K, N], K <= H -> z [B, T, K, N] = S_t q_t over the first K heads
        (dtype of q), at most once; the backward pass adds both readouts' state gradients.
    """
    B, T, H, N = check_sequence((r, w_raw, k, v, kk, a), S0)
    if N > MAX_HEAD_SIZE:
        raise WKV7InputError(f"head size N = {N} is past the chunked kernels' {MAX_HEAD_SIZE}: use triton_wkv7")
    launch = Launch.resolve(k.device, k.dtype, N, chunk_size, block_v, precision, num_warps,
                            fused_backward, seq_maxnreg)
    check_chunk_count(T, launch.C)
    r, w_raw, k, v, kk, a = (x.contiguous() for x in (r, w_raw, k, v, kk, a))
    S0 = S0 if S0 is None else S0.contiguous()
    shared = _Shared(launch, T)
    y, sT, link, G, _, _, _, U, states = _ChunkWKV7.apply(r, w_raw, k, v, kk, a, S0, shared)

    def read(q):
        check_read_once(shared, q, B, T, H, N, k.device, "chunk_wkv7")
        return _ChunkRead.apply(q.contiguous(), link, k, v, kk, a, G, U, states, shared)

    return y, sT, read


# ---------------------------------------------------------------------------------------------
# The twin in plain torch ops (any dtype, float64 in tests): the forward is torch_chunked's
# passes 1-3 (`wy_factors`, `wy_read`); the backward is the executable derivation the backward
# kernels follow line by line. No autograd; not a production path.


def reference_forward(r, w_raw, k, v, kk, a, S0, C):
    """Passes 1-3 in torch, in the dtype of the inputs: (y, S_T, saved factors)."""
    sv = wy_factors(decay_log(w_raw), k, v, kk, a, S0, C)
    sv.sig = to_chunks(torch.sigmoid(w_raw), C)
    sv.Ti = solve_unit_lower(sv.M, torch.eye(C, dtype=k.dtype, device=k.device).expand_as(sv.M))
    return wy_read(sv, r), sv.S_T, sv


def _reference_read_bwd(sv, q, dO):
    """One readout's backward: dq [B, T, K, N] and its chunk-local terms (dG, dU, dV, dBh, dKh)."""
    K = q.shape[2]
    G, Bh, Kh, U, v = (x[:, :K] for x in (sv.G, sv.Bh, sv.Kh, sv.U, sv.v))
    Q, dO = to_chunks(q, sv.C) * torch.exp(G), to_chunks(dO, sv.C)
    DU, DV = torch.tril(dO @ U.mT), torch.tril(dO @ v.mT)
    dQ = dO @ sv.states[:, :K] + DU @ Bh + DV @ Kh
    terms = (dQ * Q, torch.tril(Q @ Bh.mT).mT @ dO, torch.tril(Q @ Kh.mT).mT @ dO, DU.mT @ Q, DV.mT @ Q)
    return from_chunks(dQ * torch.exp(G), sv.T), terms


def reference_backward(sv, r, dy, dS_T, q=None, dz=None):
    """Gradients of r, w_raw, k, v, kk, a, S0 (and q if given) for dy, dz, dS_T."""
    C, T = sv.C, sv.T
    dr, (dG, dU, dV, dBh, dKh) = _reference_read_bwd(sv, r, dy)
    dq = None
    if dz is not None:  # the SSE readout's terms land on its first K heads
        K = q.shape[2]
        dq, terms = _reference_read_bwd(sv, q, dz)
        for acc, t in zip((dG, dU, dV, dBh, dKh), terms):
            acc[:, :K] += t
    G, W, S_all = sv.G, sv.W, sv.states
    g = G[..., -1:, :]
    e = torch.exp(g - G)
    Qr = to_chunks(r, C) * torch.exp(G)
    dyc = to_chunks(dy, C)
    # Reverse over chunks: dS' (gradient at each chunk end) and dU += Bend dS'^T.
    dS, dSn = dS_T, torch.empty_like(S_all)
    for c in reversed(range(G.shape[2])):
        dSn[:, :, c] = dS
        dU[:, :, c] += (sv.kk * sv.a * e)[:, :, c] @ dS.mT
        dS = dS * torch.exp(g[:, :, c]) + dU[:, :, c].mT @ W[:, :, c] + dyc[:, :, c].mT @ Qr[:, :, c]
        if dz is not None:
            K = q.shape[2]
            Qz = to_chunks(q, C)[:, :, c] * torch.exp(G[:, :K, c])
            dS[:, :K] += to_chunks(dz, C)[:, :, c].mT @ Qz
    # Chunk-local gradients, every chunk at once.
    S, v, kk, a, k = S_all, sv.v, sv.kk, sv.a, sv.k
    beta = kk * a
    Bend, Kend = beta * e, k * e
    dg = torch.exp(g) * (dSn * S).sum(-2, keepdim=True)
    dBend, dKend = sv.U @ dSn, v @ dSn
    dV = dV + Kend @ dSn.mT
    dbeta, dk = dBend * e, dKend * e
    t1 = dBend * Bend + dKend * Kend
    dg = dg + t1.sum(-2, keepdim=True)
    dG = dG - t1
    dW = dU @ S
    dWt, dUt = sv.Ti.mT @ dW, sv.Ti.mT @ dU
    dM = torch.tril(dWt @ W.mT + dUt @ sv.Uv.mT, -1)
    dP = torch.tril(dUt @ v.mT, -1)
    A = sv.A
    dV = dV + sv.P.mT @ dUt
    dA = dWt + dM @ sv.Bh + dP @ sv.Kh
    dBh = dBh + dM.mT @ A
    dKh = dKh + dP.mT @ A
    ig = torch.exp(-G)
    dbeta = dbeta + dBh * ig
    dk = dk + dKh * ig
    dG = dG - dBh * sv.Bh - dKh * sv.Kh
    dGp = dA * A
    dG = dG + dGp
    dG[..., -1:, :] += dg
    dlogw = dG.flip(-2).cumsum(-2).flip(-2) - dGp
    sig = sv.sig
    dw = dlogw * DECAY_SCALE * sig * (1 - sig)
    dkk = dbeta * a - dA * torch.exp(G - sv.log_w)
    out = [from_chunks(x, T) for x in (dw, dk, dV, dkk, dbeta * kk)]
    return (dr, *out, dS, dq)
