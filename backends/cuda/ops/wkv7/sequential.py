"""WKV-7 over a sequence in Triton: sequential in time, state checkpoints every CHUNK tokens.

Layout: r, w_raw, k, v, kk, a [B, T, H, N]; state S [B, H, N, N] float32, row i = value index,
column j = key index. The recurrence (SPEC sections 2-3), alpha = -kk, beta = kk * a:

    sa_t = S_{t-1} alpha_t;   S_t = S_{t-1} diag(w_t) + sa_t beta_t^T + v_t k_t^T;   y_t = S_t r_t

is row-local in i (row i of S_t needs only row i of S_{t-1}), and so is its adjoint

    dS_t += dy_t r_t^T + dz_t q_t^T;   dsa = dS_t beta_t;   dS_{t-1} = dS_t diag(w_t) + dsa alpha_t^T.

So each program owns (b, h, a block of BI rows) and keeps its rows of S in registers while it
walks the tokens. Gradients of key-indexed vectors (r, w, k, kk, a, q) are sums over rows:
with several row blocks (BI < N) each program atomically adds its partial sum.

Kernels:
  _fwd_kernel     sequential over T: y, the final state, and S at the start of every chunk.
  _replay_kernel  parallel over chunks: replays a chunk from its checkpoint to read z = S_t q_t
                  (readout) or to form dq_t = S_t^T dz_t (its backward).
  _bwd_kernel     sequential over T in reverse: per chunk, replays forward from the checkpoint
                  into a scratch buffer (S_{t-1} of each token), then steps the adjoint back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metastate_core.constants import DECAY_SCALE

from .. import first_order_only

CHUNK = 16  # tokens between saved states: memory T/16 * N^2 per head, scratch 16 * BI * N per program
# Multiply it tensor-first (x * _DECAY): the interpreter keeps constexpr * tensor a constexpr.
_DECAY = tl.constexpr(DECAY_SCALE)


# The forward step is one @triton.jit helper (_step, also the decode kernel's); the adjoint step in
# _bwd_kernel is written out (twin: autograd through naive_wkv7_step), since the CPU interpreter
# (tests) re-patches triton.language on every device-function call, which dominates its run time in
# these per-token loops. A masked token (t >= T) loads w = 1 and k = v = kk = a = 0, the identity
# step. (sigmoid is written as 1 / (1 + exp(-x)) for the same reason: tl.sigmoid is a device
# function.) The step, alpha = -kk, beta = kk * a:
#     sa = S alpha;   S <- S diag(w) + sa beta^T + v k^T


@triton.jit
def _step(S, w_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, o, rows, cols, mc, mr):
    """S_t from S_{t-1} ([BI, N], this program's value rows) for the token at offset o; past the
    sequence's end (masks mc, mr off) an identity step. Twin: naive_wkv7_step."""
    x = tl.load(w_ptr + o + cols, mask=mc, other=0.0).to(tl.float32)
    w = tl.exp(tl.where(mc, (1.0 / (1.0 + tl.exp(-x))) * _DECAY, 0.0))
    k = tl.load(k_ptr + o + cols, mask=mc, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + o + rows, mask=mr, other=0.0).to(tl.float32)
    kk = tl.load(kk_ptr + o + cols, mask=mc, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + o + cols, mask=mc, other=0.0).to(tl.float32)
    sa = -tl.sum(S * kk[None, :], axis=1)
    return S * w[None, :] + sa[:, None] * (kk * a)[None, :] + v[:, None] * k[None, :]


@triton.jit
def _fwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, s0_ptr, y_ptr, states_ptr, sT_ptr,
                T, NC, H: tl.constexpr, N: tl.constexpr, BI: tl.constexpr,
                CHUNK: tl.constexpr, HAS_S0: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BI + tl.arange(0, BI)
    cols = tl.arange(0, N)
    soff = rows[:, None] * N + cols[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + bh * N * N + soff)
    else:
        S = tl.zeros([BI, N], dtype=tl.float32)
    base = (bh // H) * T * H * N + (bh % H) * N
    for c in range(NC):
        tl.store(states_ptr + (bh * NC + c) * N * N + soff, S)
        for s in range(CHUNK):
            t = c * CHUNK + s
            mc = (cols * 0 + t) < T  # block-shaped masks: newer interpreters reject scalar ones
            mr = (rows * 0 + t) < T
            o = base + t * H * N
            S = _step(S, w_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, o, rows, cols, mc, mr)
            r = tl.load(r_ptr + o + cols, mask=mc, other=0.0).to(tl.float32)
            tl.store(y_ptr + o + rows, tl.sum(S * r[None, :], axis=1), mask=mr)
    tl.store(sT_ptr + bh * N * N + soff, S)


@triton.jit
def _replay_kernel(w_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, states_ptr, q_ptr, io_ptr,
                   T, NC, H: tl.constexpr, K: tl.constexpr, N: tl.constexpr, BI: tl.constexpr,
                   CHUNK: tl.constexpr, GRAD: tl.constexpr, ATOMIC: tl.constexpr):
    """GRAD=False: io = z = S_t q_t. GRAD=True: q_ptr holds dz, io accumulates dq = S_t^T dz."""
    bk = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = bk // K
    h = bk % K
    rows = tl.program_id(2) * BI + tl.arange(0, BI)
    cols = tl.arange(0, N)
    S = tl.load(states_ptr + ((b * H + h) * NC + c) * N * N + rows[:, None] * N + cols[None, :])
    base = b * T * H * N + h * N
    qbase = b * T * K * N + h * N
    for s in range(CHUNK):
        t = c * CHUNK + s
        mc = (cols * 0 + t) < T  # block-shaped masks: newer interpreters reject scalar ones
        mr = (rows * 0 + t) < T
        o = base + t * H * N
        qo = qbase + t * K * N
        S = _step(S, w_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, o, rows, cols, mc, mr)
        if GRAD:
            dz = tl.load(q_ptr + qo + rows, mask=mr, other=0.0).to(tl.float32)
            dq = tl.sum(S * dz[:, None], axis=0)
            if ATOMIC:
                tl.atomic_add(io_ptr + qo + cols, dq, mask=mc)
            else:
                tl.store(io_ptr + qo + cols, dq, mask=mc)
        else:
            q = tl.load(q_ptr + qo + cols, mask=mc, other=0.0).to(tl.float32)
            tl.store(io_ptr + qo + rows, tl.sum(S * q[None, :], axis=1), mask=mr)


@triton.jit
def _bwd_kernel(r_ptr, w_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, q_ptr, dy_ptr, dz_ptr,
                states_ptr, scratch_ptr, dsT_ptr,
                dr_ptr, dw_ptr, dk_ptr, dv_ptr, dkk_ptr, da_ptr, ds0_ptr,
                T, NC, H: tl.constexpr, K: tl.constexpr, N: tl.constexpr, BI: tl.constexpr,
                CHUNK: tl.constexpr, HAS_Q: tl.constexpr, HAS_DST: tl.constexpr,
                ATOMIC: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = rb * BI + tl.arange(0, BI)
    cols = tl.arange(0, N)
    soff = rows[:, None] * N + cols[None, :]
    boff = tl.arange(0, BI)[:, None] * N + cols[None, :]
    scratch = scratch_ptr + (bh * tl.num_programs(1) + rb) * CHUNK * BI * N
    if HAS_DST:
        dS = tl.load(dsT_ptr + bh * N * N + soff)
    else:
        dS = tl.zeros([BI, N], dtype=tl.float32)
    base = b * T * H * N + h * N
    qbase = b * T * K * N + h * N
    for ci in range(NC):
        c = NC - 1 - ci
        # Replay the chunk: scratch[s] = S_{t-1} for token t = c * CHUNK + s.
        S = tl.load(states_ptr + (bh * NC + c) * N * N + soff)
        for s in range(CHUNK):
            t = c * CHUNK + s
            mc = (cols * 0 + t) < T  # block-shaped masks: newer interpreters reject scalar ones
            mr = (rows * 0 + t) < T
            tl.store(scratch + s * BI * N + boff, S)
            S = _step(S, w_ptr, k_ptr, v_ptr, kk_ptr, a_ptr, base + t * H * N, rows, cols, mc, mr)
        # S is now S_t of the chunk's last token; step the adjoint back through the chunk.
        for si in range(CHUNK):
            s = CHUNK - 1 - si
            t = c * CHUNK + s
            mc = (cols * 0 + t) < T  # block-shaped masks: newer interpreters reject scalar ones
            mr = (rows * 0 + t) < T
            o = base + t * H * N
            sig = 1.0 / (1.0 + tl.exp(-tl.load(w_ptr + o + cols, mask=mc, other=0.0).to(tl.float32)))
            w = tl.exp(tl.where(mc, sig * _DECAY, 0.0))
            k = tl.load(k_ptr + o + cols, mask=mc, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + o + rows, mask=mr, other=0.0).to(tl.float32)
            kk = tl.load(kk_ptr + o + cols, mask=mc, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + o + cols, mask=mc, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + o + cols, mask=mc, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + o + rows, mask=mr, other=0.0).to(tl.float32)
            dS += dy[:, None] * r[None, :]
            if HAS_Q:
                qo = qbase + t * K * N
                mqc = mc & ((cols * 0 + h) < K)
                mqr = mr & ((rows * 0 + h) < K)
                q = tl.load(q_ptr + qo + cols, mask=mqc, other=0.0).to(tl.float32)
                dz = tl.load(dz_ptr + qo + rows, mask=mqr, other=0.0).to(tl.float32)
                dS += dz[:, None] * q[None, :]
            S_prev = tl.load(scratch + s * BI * N + boff)
            beta = kk * a
            sa = -tl.sum(S_prev * kk[None, :], axis=1)
            dsa = tl.sum(dS * beta[None, :], axis=1)
            dr = tl.sum(S * dy[:, None], axis=0)
            dk = tl.sum(dS * v[:, None], axis=0)
            dbeta = tl.sum(dS * sa[:, None], axis=0)
            dalpha = tl.sum(S_prev * dsa[:, None], axis=0)
            dw = tl.sum(dS * S_prev, axis=0)
            tl.store(dv_ptr + o + rows, tl.sum(dS * k[None, :], axis=1), mask=mr)
            # dL/dw_raw = dL/dw * w * d(log w)/dw_raw, log w = DECAY * sigmoid(w_raw).
            dw_raw = dw * w * _DECAY * sig * (1.0 - sig)
            if ATOMIC:  # partial sums over this program's rows
                tl.atomic_add(dr_ptr + o + cols, dr, mask=mc)
                tl.atomic_add(dk_ptr + o + cols, dk, mask=mc)
                tl.atomic_add(dkk_ptr + o + cols, dbeta * a - dalpha, mask=mc)
                tl.atomic_add(da_ptr + o + cols, dbeta * kk, mask=mc)
                tl.atomic_add(dw_ptr + o + cols, dw_raw, mask=mc)
            else:
                tl.store(dr_ptr + o + cols, dr, mask=mc)
                tl.store(dk_ptr + o + cols, dk, mask=mc)
                tl.store(dkk_ptr + o + cols, dbeta * a - dalpha, mask=mc)
                tl.store(da_ptr + o + cols, dbeta * kk, mask=mc)
                tl.store(dw_ptr + o + cols, dw_raw, mask=mc)
            dS = dS * w[None, :] - dsa[:, None] * kk[None, :]
            S = S_prev
    tl.store(ds0_ptr + bh * N * N + soff, dS)


# ---------------------------------------------------------------------------------------------
# Launchers and autograd


def default_block_rows(N: int, device: torch.device) -> int:
    """Rows of S per program. On a GPU 16 rows (N / 16 programs per head) give B*H*N/16
    programs, enough to fill the SMs at training batch sizes, with 16*N state values per
    program (8 registers a thread at N = 64, 4 warps). Under the CPU interpreter every program
    costs the same Python overhead, so one program per head is fastest."""
    return min(N, 16) if device.type == "cuda" else N


def _num_warps(BI: int, N: int) -> int:
    return max(1, min(8, BI * N // 256))


def wkv7_forward(r, w_raw, k, v, kk, a, S0, BI):
    """y [B, T, H, N] (dtype of r), S_T [B, H, N, N] f32, states [B, H, NC, N, N] f32."""
    B, T, H, N = k.shape
    NC = triton.cdiv(T, CHUNK)
    y = torch.empty_like(r)
    states = torch.empty(B, H, NC, N, N, device=k.device, dtype=torch.float32)
    sT = torch.empty(B, H, N, N, device=k.device, dtype=torch.float32)
    _fwd_kernel[(B * H, N // BI)](
        r, w_raw, k, v, kk, a, S0 if S0 is not None else sT, y, states, sT,
        T, NC, H=H, N=N, BI=BI, CHUNK=CHUNK, HAS_S0=S0 is not None,
        num_warps=_num_warps(BI, N))
    return y, sT, states


def wkv7_replay(w_raw, k, v, kk, a, states, q, BI, grad=False):
    """grad=False: z = S_t q_t [B, T, K, N]. grad=True: q is dz, returns dq = S_t^T dz (f32)."""
    B, T, H, N = k.shape
    K = q.shape[2]
    NC = states.shape[2]
    atomic = grad and BI < N
    if grad:
        out = (torch.zeros if atomic else torch.empty)(B, T, K, N, device=k.device, dtype=torch.float32)
    else:
        out = torch.empty_like(q)
    _replay_kernel[(B * K, NC, N // BI)](
        w_raw, k, v, kk, a, states, q, out, T, NC, H=H, K=K, N=N, BI=BI, CHUNK=CHUNK,
        GRAD=grad, ATOMIC=atomic, num_warps=_num_warps(BI, N))
    return out


def wkv7_backward(r, w_raw, k, v, kk, a, states, dy, dS_T, q, dz, BI):
    """Gradients (f32) of r, w_raw, k, v, kk, a and S0 in one reverse pass."""
    B, T, H, N = k.shape
    NC = states.shape[2]
    NB = N // BI
    atomic = NB > 1
    alloc = torch.zeros if atomic else torch.empty
    dr, dw, dk, dkk, da = (alloc(B, T, H, N, device=k.device, dtype=torch.float32) for _ in range(5))
    dv = torch.empty(B, T, H, N, device=k.device, dtype=torch.float32)
    dS0 = torch.empty(B, H, N, N, device=k.device, dtype=torch.float32)
    scratch = torch.empty(B * H * NB, CHUNK, BI, N, device=k.device, dtype=torch.float32)
    has_q = dz is not None
    K = q.shape[2] if has_q else 1
    _bwd_kernel[(B * H, NB)](
        r, w_raw, k, v, kk, a, q if has_q else r, dy, dz if has_q else dy,
        states, scratch, dS_T if dS_T is not None else dS0,
        dr, dw, dk, dv, dkk, da, dS0,
        T, NC, H=H, K=K, N=N, BI=BI, CHUNK=CHUNK, HAS_Q=has_q, HAS_DST=dS_T is not None,
        ATOMIC=atomic, num_warps=_num_warps(BI, N))
    return dr, dw, dk, dv, dkk, da, dS0


def graph_task() -> int:
    """Which backward pass is running (-1 outside one). What a readout's backward leaves for the
    sequence's backward is used only within the same pass: torch.autograd.grad through z alone
    must not leave its dz to a later backward through y."""
    return torch._C._current_graph_task_id()


class _Shared:
    """What the sequence pass and its readout share: the block size, whether read was called
    and, during backward, the readout's q and dz (its backward runs first and leaves them).
    The saved states travel through autograd (a non-differentiable output), so saved-tensor
    hooks such as activation checkpointing see them."""

    def __init__(self, BI):
        self.BI = BI
        self.read_called = False
        self.q = self.dz = None
        self.task = None  # the backward pass that left q and dz


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, w_raw, k, v, kk, a, S0, shared):
        y, sT, states = wkv7_forward(r, w_raw, k, v, kk, a, S0, shared.BI)
        ctx.save_for_backward(r, w_raw, k, v, kk, a, states)
        ctx.mark_non_differentiable(states)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the states
        ctx.shared = shared
        ctx.has_s0 = S0 is not None
        # `link` carries no value: the readout takes it as input, so autograd runs the
        # readout's backward (which leaves dz in `shared`) before this one.
        return y, sT, sT.new_zeros(()), states

    @staticmethod
    @first_order_only
    def backward(ctx, dy, dS_T, _dlink, _dstates):
        r, w_raw, k, v, kk, a, states = ctx.saved_tensors
        sh = ctx.shared
        q, dz = (sh.q, sh.dz) if sh.task == graph_task() else (None, None)
        sh.q = sh.dz = None
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        dS_T = None if dS_T is None else dS_T.contiguous()
        grads = wkv7_backward(r, w_raw, k, v, kk, a, states, dy, dS_T, q, dz, sh.BI)
        dr, dw, dk, dv, dkk, da, dS0 = grads
        out = [g.to(x.dtype) for g, x in zip((dr, dw, dk, dv, dkk, da), (r, w_raw, k, v, kk, a))]
        return (*out, dS0 if ctx.has_s0 else None, None)


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, link, w_raw, k, v, kk, a, states, shared):
        ctx.save_for_backward(q, w_raw, k, v, kk, a, states)
        ctx.shared = shared
        return wkv7_replay(w_raw, k, v, kk, a, states, q, shared.BI)

    @staticmethod
    @first_order_only
    def backward(ctx, dz):
        q, w_raw, k, v, kk, a, states = ctx.saved_tensors
        sh = ctx.shared
        dz = dz.contiguous()
        sh.q, sh.dz, sh.task = q, dz, graph_task()
        dq = wkv7_replay(w_raw, k, v, kk, a, states, dz, sh.BI, grad=True)
        return dq.to(q.dtype), torch.zeros((), device=dz.device), *([None] * 7)
