"""The elementwise pieces around the WKV scan as fused Triton kernels (forward and backward).

Each replaces a chain of torch operators, every one of which reads and writes a whole
[B, T, D] float32 tensor, with one pass that reads the inputs once and writes its output in the
dtype of the matmul that consumes it. Twins (same arguments, float32 results): naive.py.

    token_shift_mix        x [B, T, D], prev [B, D], mix [M, D]            -> [M, B, T, D]
    group_norm_bonus_gate  y, r, k, v [B, T, H, N], g [B, T, H*N], r_k [H, N],
                           weight, bias [H*N]                              -> [B, T, H*N]
    sse_norm_gate          xs [B, T, D], z [B, T, K, N], gate [D]          -> [B, T, D]
    k_prep                 k, a [B, T, H*N], k_k, k_a [H*N]                -> kk [B, T, H, N], k [B, T, H*N]
    relu_square            h [...]                                         -> [...]

Backward kernels recompute what the forward derived (shifted rows, norms) instead of saving
it, and reduce parameter gradients per program into a [programs, ...] buffer summed by torch
(no atomics, so results are deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metastate_core.constants import L2_EPS
from metastate_core.errors import MetaStateError

from .. import first_order_only

ROWS = 16          # rows (tokens) per tile of a per-head piece: [ROWS, N]
MIX_ROWS = 4       # rows per tile of the token shift: [mixes (8), MIX_ROWS, BLOCK_D], in registers
BLOCK_D = 64       # channels per tile of the token shift (128: 234 registers in backward, 64: 96)
BLOCK_FLAT = 1024  # elements per program of relu_square
_L2_EPS = tl.constexpr(L2_EPS)  # kk = x / max(|x|, L2_EPS), F.normalize's eps


class ElementwiseInputError(MetaStateError):
    """Inputs the fused kernels cannot take."""


def _check_head_size(N: int) -> None:
    if N < 1 or N & (N - 1):
        raise ElementwiseInputError(f"the fused kernels need a power-of-two head size, got {N}: "
                                    "use the plain pieces (fused=False)")


def _check_dims(piece: str, name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() != dims:
        raise ElementwiseInputError(f"{piece}: {name} must have {dims} dimensions, got {list(t.shape)}")


def _check_shapes(piece: str, **expected) -> None:
    """expected: name=(tensor, shape). The kernels index every input by the first one's shape, so
    a mismatch would read out of bounds instead of failing."""
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != tuple(shape):
            raise ElementwiseInputError(f"{piece}: {name} must be {list(shape)}, got {list(t.shape)}")


def _programs(tiles: int, device: torch.device) -> int:
    """Programs that loop over row tiles when a kernel reduces parameter gradients (at least one,
    which stores the zero gradient of no rows)."""
    if device.type == "cuda":
        return max(1, min(tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(tiles, 4))  # the interpreter: each program costs Python time


# ---------------------------------------------------------------------------------------------
# Token shift: out[m] = x + (shift(x) - x) * mix[m]


@triton.jit
def _shift_tile(x_ptr, prev_ptr, rows, cols, BT, T, D):
    """x and shift(x) - x for a [ROWS, BD] tile; rows are flat (batch, time) indices."""
    t = rows % T
    m2 = (rows < BT)[:, None] & (cols < D)[None, :]
    io = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + io, mask=m2, other=0.0).to(tl.float32)
    first = (t == 0)[:, None]
    before = tl.load(x_ptr + io - D, mask=m2 & (t > 0)[:, None], other=0.0).to(tl.float32)
    prev = tl.load(prev_ptr + (rows // T)[:, None] * D + cols[None, :], mask=m2 & first, other=0.0)
    return x, tl.where(first, prev.to(tl.float32), before) - x, io, m2


@triton.jit
def _mix_fwd_kernel(x_ptr, prev_ptr, mix_ptr, out_ptr, BT, T, D,
                    M: tl.constexpr, MP: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    ms = tl.arange(0, MP).to(tl.int64)  # the mix planes are B*T*D apart: past 2^31 elements
    x, dx, io, m2 = _shift_tile(x_ptr, prev_ptr, rows, cols, BT, T, D)
    mm = ms < M
    mu = tl.load(mix_ptr + ms[:, None] * D + cols[None, :], mask=mm[:, None] & (cols < D)[None, :], other=0.0)
    out = x[None] + dx[None] * mu.to(tl.float32)[:, None, :]
    tl.store(out_ptr + ms[:, None, None] * BT * D + io[None], out.to(out_ptr.dtype.element_ty),
             mask=mm[:, None, None] & m2[None])


@triton.jit
def _mix_bwd_kernel(x_ptr, prev_ptr, mix_ptr, dout_ptr, dx_ptr, dprev_ptr, dmix_ptr, BT, T, D, TILES,
                    M: tl.constexpr, MP: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    ms = tl.arange(0, MP).to(tl.int64)
    mm = ms < M
    mu = tl.load(mix_ptr + ms[:, None] * D + cols[None, :], mask=mm[:, None] & (cols < D)[None, :],
                 other=0.0).to(tl.float32)
    acc = tl.zeros([MP, BD], dtype=tl.float32)
    for i in range(TILES):
        rows = (pid * TILES + i).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        x, dx, io, m2 = _shift_tile(x_ptr, prev_ptr, rows, cols, BT, T, D)
        t = rows % T
        mk = mm[:, None, None] & m2[None]
        dout = ms[:, None, None] * BT * D + io[None]
        do = tl.load(dout_ptr + dout, mask=mk, other=0.0).to(tl.float32)
        acc += tl.sum(do * dx[None], axis=1)
        to_prev = tl.sum(do * mu[:, None, :], axis=0)  # what flows to the token before
        # ...and what flows here from the next token of the same sequence
        do_next = tl.load(dout_ptr + dout + D, mask=mk & (t < T - 1)[None, :, None], other=0.0).to(tl.float32)
        grad = tl.sum(do, axis=0) - to_prev + tl.sum(do_next * mu[:, None, :], axis=0)
        tl.store(dx_ptr + io, grad.to(dx_ptr.dtype.element_ty), mask=m2)
        tl.store(dprev_ptr + (rows // T)[:, None] * D + cols[None, :], to_prev.to(dprev_ptr.dtype.element_ty),
                 mask=m2 & (t == 0)[:, None])
    tl.store(dmix_ptr + (pid * M + ms[:, None]) * D + cols[None, :], acc, mask=mm[:, None] & (cols < D)[None, :])


class _TokenShiftMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, prev, mix, out_dtype):
        B, T, D = x.shape
        M = mix.shape[0]
        x, prev, mix = x.contiguous(), prev.contiguous(), mix.contiguous()
        out = torch.empty(M, B, T, D, device=x.device, dtype=out_dtype)
        grid = (triton.cdiv(B * T, MIX_ROWS), triton.cdiv(D, BLOCK_D))
        _mix_fwd_kernel[grid](x, prev, mix, out, B * T, T, D, M, triton.next_power_of_2(M), MIX_ROWS, BLOCK_D)
        ctx.save_for_backward(x, prev, mix)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, dout):
        x, prev, mix = ctx.saved_tensors
        B, T, D = x.shape
        M = mix.shape[0]
        tiles = triton.cdiv(B * T, MIX_ROWS)
        programs = _programs(tiles, x.device)
        dx, dprev = torch.empty_like(x), torch.empty_like(prev)
        dmix = torch.empty(programs, M, D, device=x.device, dtype=torch.float32)
        _mix_bwd_kernel[(programs, triton.cdiv(D, BLOCK_D))](
            x, prev, mix, dout.contiguous(), dx, dprev, dmix, B * T, T, D, triton.cdiv(tiles, programs),
            M, triton.next_power_of_2(M), MIX_ROWS, BLOCK_D)
        return dx, dprev, dmix.sum(0).to(mix.dtype), None


def token_shift_mix(x, prev, mix, out_dtype=torch.float32):
    """x + (shift(x) - x) * mix[m] for each m. x [B, T, D], prev [B, D], mix [M, D] -> [M, B, T, D]."""
    _check_dims("token_shift_mix", "x", x, 3)
    B, T, D = x.shape
    _check_shapes("token_shift_mix", prev=(prev, (B, D)), mix=(mix, (*mix.shape[:1], D)))
    return _TokenShiftMix.apply(x, prev, mix, out_dtype)


# ---------------------------------------------------------------------------------------------
# Time-mix output: (GroupNorm(y) * weight + bias + sum(r k r_k) v) * g


@triton.jit
def _gate_tile(y_ptr, r_ptr, k_ptr, v_ptr, g_ptr, rows, h, BT, eps, H: tl.constexpr, N: tl.constexpr):
    """The loads and norm of one [ROWS, N] head tile: (io, mask, yn, rstd, r, k, v, g)."""
    cols = tl.arange(0, N)
    m2 = (rows < BT)[:, None] & (cols < N)[None, :]
    io = rows[:, None] * (H * N) + h * N + cols[None, :]
    y = tl.load(y_ptr + io, mask=m2, other=0.0).to(tl.float32)
    mean = tl.sum(y, axis=1) / N
    yc = y - mean[:, None]
    rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, axis=1) / N + eps)
    r = tl.load(r_ptr + io, mask=m2, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + io, mask=m2, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + io, mask=m2, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + io, mask=m2, other=0.0).to(tl.float32)
    return io, m2, yc * rstd[:, None], rstd, r, k, v, g


@triton.jit
def _gate_fwd_kernel(y_ptr, r_ptr, k_ptr, v_ptr, g_ptr, rk_ptr, w_ptr, b_ptr, out_ptr, BT, eps,
                     H: tl.constexpr, N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    h = tl.program_id(1)
    p = h * N + tl.arange(0, N)
    io, m2, yn, rstd, r, k, v, g = _gate_tile(y_ptr, r_ptr, k_ptr, v_ptr, g_ptr, rows, h, BT, eps, H, N)
    rk = tl.load(rk_ptr + p).to(tl.float32)
    bonus = tl.sum(r * k * rk[None, :], axis=1)
    o = yn * tl.load(w_ptr + p).to(tl.float32)[None, :] + tl.load(b_ptr + p).to(tl.float32)[None, :] \
        + bonus[:, None] * v
    tl.store(out_ptr + io, (o * g).to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _gate_bwd_kernel(y_ptr, r_ptr, k_ptr, v_ptr, g_ptr, rk_ptr, w_ptr, b_ptr, dout_ptr,
                     dy_ptr, dr_ptr, dk_ptr, dv_ptr, dg_ptr, dpar_ptr, BT, eps, TILES,
                     H: tl.constexpr, N: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    p = h * N + tl.arange(0, N)
    rk = tl.load(rk_ptr + p).to(tl.float32)
    lw = tl.load(w_ptr + p).to(tl.float32)
    lb = tl.load(b_ptr + p).to(tl.float32)
    d_rk = tl.zeros([N], dtype=tl.float32)
    d_w = tl.zeros([N], dtype=tl.float32)
    d_b = tl.zeros([N], dtype=tl.float32)
    for i in range(TILES):
        rows = (pid * TILES + i).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        io, m2, yn, rstd, r, k, v, g = _gate_tile(y_ptr, r_ptr, k_ptr, v_ptr, g_ptr, rows, h, BT, eps, H, N)
        bonus = tl.sum(r * k * rk[None, :], axis=1)
        dout = tl.load(dout_ptr + io, mask=m2, other=0.0).to(tl.float32)
        do = dout * g
        tl.store(dg_ptr + io, (dout * (yn * lw[None, :] + lb[None, :] + bonus[:, None] * v))
                 .to(dg_ptr.dtype.element_ty), mask=m2)
        d_w += tl.sum(do * yn, axis=0)
        d_b += tl.sum(do, axis=0)
        dyn = do * lw[None, :]
        dy = rstd[:, None] * (dyn - tl.sum(dyn, axis=1)[:, None] / N
                              - yn * (tl.sum(dyn * yn, axis=1) / N)[:, None])
        tl.store(dy_ptr + io, dy.to(dy_ptr.dtype.element_ty), mask=m2)
        dbonus = tl.sum(do * v, axis=1)[:, None]
        tl.store(dv_ptr + io, (do * bonus[:, None]).to(dv_ptr.dtype.element_ty), mask=m2)
        tl.store(dr_ptr + io, (dbonus * k * rk[None, :]).to(dr_ptr.dtype.element_ty), mask=m2)
        tl.store(dk_ptr + io, (dbonus * r * rk[None, :]).to(dk_ptr.dtype.element_ty), mask=m2)
        d_rk += tl.sum(dbonus * r * k, axis=0)
    base = pid * 3 * H * N + p
    tl.store(dpar_ptr + base, d_rk)
    tl.store(dpar_ptr + base + H * N, d_w)
    tl.store(dpar_ptr + base + 2 * H * N, d_b)


class _GroupNormBonusGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, r, k, v, g, r_k, weight, bias, eps, out_dtype):
        B, T, H, N = y.shape
        _check_head_size(N)
        y, r, k, v, g = (t.contiguous() for t in (y, r, k, v, g))
        r_k, weight, bias = r_k.contiguous(), weight.contiguous(), bias.contiguous()
        out = torch.empty(B, T, H * N, device=y.device, dtype=out_dtype)
        _gate_fwd_kernel[(triton.cdiv(B * T, ROWS), H)](y, r, k, v, g, r_k, weight, bias, out, B * T, eps,
                                                         H, N, ROWS)
        ctx.save_for_backward(y, r, k, v, g, r_k, weight, bias)
        ctx.eps = eps
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, dout):
        y, r, k, v, g, r_k, weight, bias = ctx.saved_tensors
        B, T, H, N = y.shape
        tiles = triton.cdiv(B * T, ROWS)
        programs = _programs(tiles, y.device)
        dy, dr, dk, dv, dg = (torch.empty_like(t) for t in (y, r, k, v, g))
        dpar = torch.empty(programs, 3, H * N, device=y.device, dtype=torch.float32)
        _gate_bwd_kernel[(programs, H)](y, r, k, v, g, r_k, weight, bias, dout.contiguous(),
                                        dy, dr, dk, dv, dg, dpar, B * T, ctx.eps, triton.cdiv(tiles, programs),
                                        H, N, ROWS)
        d_rk, d_w, d_b = dpar.sum(0)
        return (dy, dr, dk, dv, dg, d_rk.view_as(r_k).to(r_k.dtype), d_w.to(weight.dtype), d_b.to(bias.dtype),
                None, None)


def group_norm_bonus_gate(y, r, k, v, g, r_k, weight, bias, eps: float, out_dtype=torch.float32):
    """(GroupNorm(y) * weight + bias + sum_n(r k r_k) v) * g per head.

    y, r, k, v [B, T, H, N]; g [B, T, H*N]; r_k [H, N]; weight, bias [H*N] -> [B, T, H*N].
    """
    _check_dims("group_norm_bonus_gate", "y", y, 4)
    B, T, H, N = y.shape
    _check_shapes("group_norm_bonus_gate", r=(r, y.shape), k=(k, y.shape), v=(v, y.shape), g=(g, (B, T, H * N)),
                  r_k=(r_k, (H, N)), weight=(weight, (H * N,)), bias=(bias, (H * N,)))
    return _GroupNormBonusGate.apply(y, r, k, v, g, r_k, weight, bias, eps, out_dtype)


# ---------------------------------------------------------------------------------------------
# SSE input: xs + gate * RMSNorm_head(z) on the first K*N channels


@triton.jit
def _sse_tile(xs_ptr, z_ptr, rows, c, BT, D, K, eps, N: tl.constexpr):
    """Channels [c N, (c+1) N) of a [ROWS, N] tile: (io, mask, xs, zn, rstd) (z parts when c < K)."""
    cols = c * N + tl.arange(0, N)
    m2 = (rows < BT)[:, None] & (cols < D)[None, :]
    io = rows[:, None] * D + cols[None, :]
    xs = tl.load(xs_ptr + io, mask=m2, other=0.0).to(tl.float32)
    zm = m2 & (c < K)
    z = tl.load(z_ptr + rows[:, None] * (K * N) + cols[None, :], mask=zm, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(z * z, axis=1) / N + eps)
    return io, m2, xs, z * rstd[:, None], rstd


@triton.jit
def _sse_fwd_kernel(xs_ptr, z_ptr, gate_ptr, out_ptr, BT, D, K, eps, N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    c = tl.program_id(1)
    io, m2, xs, zn, _ = _sse_tile(xs_ptr, z_ptr, rows, c, BT, D, K, eps, N)
    cols = c * N + tl.arange(0, N)
    gate = tl.load(gate_ptr + cols, mask=(cols < D) & (c < K), other=0.0).to(tl.float32)
    tl.store(out_ptr + io, (xs + gate[None, :] * zn).to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _sse_bwd_kernel(xs_ptr, z_ptr, gate_ptr, dout_ptr, dxs_ptr, dz_ptr, dgate_ptr, BT, D, K, eps, TILES,
                    N: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    cols = c * N + tl.arange(0, N)
    gate = tl.load(gate_ptr + cols, mask=(cols < D) & (c < K), other=0.0).to(tl.float32)
    d_gate = tl.zeros([N], dtype=tl.float32)
    for i in range(TILES):
        rows = (pid * TILES + i).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        io, m2, xs, zn, rstd = _sse_tile(xs_ptr, z_ptr, rows, c, BT, D, K, eps, N)
        dout = tl.load(dout_ptr + io, mask=m2, other=0.0).to(tl.float32)
        tl.store(dxs_ptr + io, dout.to(dxs_ptr.dtype.element_ty), mask=m2)
        d_gate += tl.sum(dout * zn, axis=0)
        dzn = dout * gate[None, :]
        dz = rstd[:, None] * (dzn - zn * (tl.sum(dzn * zn, axis=1) / N)[:, None])
        tl.store(dz_ptr + rows[:, None] * (K * N) + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=m2 & (c < K))
    tl.store(dgate_ptr + pid * K * N + cols, d_gate, mask=(cols < D) & (c < K))


class _SSENormGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, z, gate, eps, out_dtype):
        B, T, D = xs.shape
        K, N = z.shape[-2:]
        _check_head_size(N)
        xs, z, gate = xs.contiguous(), z.contiguous(), gate.contiguous()
        out = torch.empty(B, T, D, device=xs.device, dtype=out_dtype)
        _sse_fwd_kernel[(triton.cdiv(B * T, ROWS), triton.cdiv(D, N))](xs, z, gate, out, B * T, D, K, eps, N, ROWS)
        ctx.save_for_backward(xs, z, gate)
        ctx.eps = eps
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, dout):
        xs, z, gate = ctx.saved_tensors
        B, T, D = xs.shape
        K, N = z.shape[-2:]
        tiles = triton.cdiv(B * T, ROWS)
        programs = _programs(tiles, xs.device)
        dxs, dz = torch.empty_like(xs), torch.empty_like(z)
        dgate = torch.empty(programs, K * N, device=xs.device, dtype=torch.float32)
        _sse_bwd_kernel[(programs, triton.cdiv(D, N))](xs, z, gate, dout.contiguous(), dxs, dz, dgate, B * T, D, K,
                                                         ctx.eps, triton.cdiv(tiles, programs), N, ROWS)
        d_gate = torch.zeros_like(gate, dtype=torch.float32)
        d_gate[:K * N] = dgate.sum(0)
        return dxs, dz, d_gate.to(gate.dtype), None, None


def sse_norm_gate(xs, z, gate, eps: float, out_dtype=torch.float32):
    """xs with gate * RMSNorm_head(z) added to its first K*N channels.

    xs [B, T, D], z [B, T, K, N], gate [D] -> [B, T, D].
    """
    _check_dims("sse_norm_gate", "xs", xs, 3)
    _check_dims("sse_norm_gate", "z", z, 4)
    (B, T, D), (K, N) = xs.shape, z.shape[2:]
    _check_shapes("sse_norm_gate", z=(z, (B, T, K, N)), gate=(gate, (D,)))
    if K * N > D:
        raise ElementwiseInputError(f"sse_norm_gate: z has {K} x {N} channels, more than xs's {D}")
    return _SSENormGate.apply(xs, z, gate, eps, out_dtype)


# ---------------------------------------------------------------------------------------------
# The scan's keys: kk = l2norm_head(k * k_k), k' = k * (1 + (a - 1) * k_a)


@triton.jit
def _kprep_tile(k_ptr, a_ptr, kk_w_ptr, ka_ptr, rows, h, BT, H: tl.constexpr, N: tl.constexpr):
    """One [ROWS, N] head tile: (io, mask, k, a, k_k, k_a, k * k_k, its norm)."""
    cols = tl.arange(0, N)
    m2 = (rows < BT)[:, None] & (cols < N)[None, :]
    io = rows[:, None] * (H * N) + h * N + cols[None, :]
    k = tl.load(k_ptr + io, mask=m2, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + io, mask=m2, other=0.0).to(tl.float32)
    kk_w = tl.load(kk_w_ptr + h * N + cols).to(tl.float32)
    ka = tl.load(ka_ptr + h * N + cols).to(tl.float32)
    x = k * kk_w[None, :]
    return io, m2, k, a, kk_w, ka, x, tl.sqrt(tl.sum(x * x, axis=1))


@triton.jit
def _kprep_fwd_kernel(k_ptr, a_ptr, kk_w_ptr, ka_ptr, kk_ptr, kout_ptr, BT,
                      H: tl.constexpr, N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    io, m2, k, a, kk_w, ka, x, norm = _kprep_tile(k_ptr, a_ptr, kk_w_ptr, ka_ptr, rows, tl.program_id(1), BT, H, N)
    tl.store(kk_ptr + io, x / tl.maximum(norm, _L2_EPS)[:, None], mask=m2)
    tl.store(kout_ptr + io, k * (1.0 + (a - 1.0) * ka[None, :]), mask=m2)


@triton.jit
def _kprep_bwd_kernel(k_ptr, a_ptr, kk_w_ptr, ka_ptr, dkk_ptr, dkout_ptr, dk_ptr, da_ptr, dpar_ptr, BT, TILES,
                      H: tl.constexpr, N: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    d_kk_w = tl.zeros([N], dtype=tl.float32)
    d_ka = tl.zeros([N], dtype=tl.float32)
    for i in range(TILES):
        rows = (pid * TILES + i).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        io, m2, k, a, kk_w, ka, x, norm = _kprep_tile(k_ptr, a_ptr, kk_w_ptr, ka_ptr, rows, h, BT, H, N)
        dkk = tl.load(dkk_ptr + io, mask=m2, other=0.0).to(tl.float32)
        dko = tl.load(dkout_ptr + io, mask=m2, other=0.0).to(tl.float32)
        # x / max(|x|, eps): the projection off the unit vector, or a plain scale below eps
        big = norm > _L2_EPS
        inv = 1.0 / tl.maximum(norm, _L2_EPS)
        y = x * inv[:, None]
        dx = tl.where(big[:, None], (dkk - y * tl.sum(dkk * y, axis=1)[:, None]) * inv[:, None], dkk * (1.0 / _L2_EPS))
        tl.store(dk_ptr + io, dko * (1.0 + (a - 1.0) * ka[None, :]) + dx * kk_w[None, :], mask=m2)
        tl.store(da_ptr + io, dko * k * ka[None, :], mask=m2)
        d_kk_w += tl.sum(dx * k, axis=0)
        d_ka += tl.sum(dko * k * (a - 1.0), axis=0)
    base = pid * 2 * H * N + h * N + tl.arange(0, N)
    tl.store(dpar_ptr + base, d_kk_w)
    tl.store(dpar_ptr + base + H * N, d_ka)


class _KPrep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, a, k_k, k_a, n_head):
        B, T, A = k.shape
        N = A // n_head
        _check_head_size(N)
        k, a, k_k, k_a = k.contiguous(), a.contiguous(), k_k.contiguous(), k_a.contiguous()
        kk = torch.empty(B, T, n_head, N, device=k.device, dtype=torch.float32)
        k_out = torch.empty(B, T, A, device=k.device, dtype=torch.float32)
        _kprep_fwd_kernel[(triton.cdiv(B * T, ROWS), n_head)](k, a, k_k, k_a, kk, k_out, B * T, n_head, N, ROWS)
        ctx.save_for_backward(k, a, k_k, k_a)
        ctx.n_head = n_head
        return kk, k_out

    @staticmethod
    @first_order_only
    def backward(ctx, dkk, dk_out):
        k, a, k_k, k_a = ctx.saved_tensors
        B, T, A = k.shape
        H = ctx.n_head
        dkk = torch.zeros(B, T, H, A // H, device=k.device) if dkk is None else dkk.contiguous()
        dk_out = torch.zeros_like(k) if dk_out is None else dk_out.contiguous()
        tiles = triton.cdiv(B * T, ROWS)
        programs = _programs(tiles, k.device)
        dk, da = torch.empty_like(k), torch.empty_like(a)
        dpar = torch.empty(programs, 2, A, device=k.device, dtype=torch.float32)
        _kprep_bwd_kernel[(programs, H)](k, a, k_k, k_a, dkk, dk_out, dk, da, dpar, B * T,
                                         triton.cdiv(tiles, programs), H, A // H, ROWS)
        d_kk_w, d_ka = dpar.sum(0)
        return dk, da, d_kk_w.to(k_k.dtype), d_ka.to(k_a.dtype), None


def k_prep(k, a, k_k, k_a, n_head: int):
    """kk = l2-normalised (k * k_k) per head and k * (1 + (a - 1) * k_a), float32.

    k, a [B, T, H*N], k_k, k_a [H*N] -> (kk [B, T, H, N], k [B, T, H*N]).
    """
    _check_dims("k_prep", "k", k, 3)
    _check_shapes("k_prep", a=(a, k.shape), k_k=(k_k, k.shape[-1:]), k_a=(k_a, k.shape[-1:]))
    if n_head < 1 or k.shape[-1] % n_head:
        raise ElementwiseInputError(f"k_prep: {k.shape[-1]} channels do not split into {n_head} heads")
    return _KPrep.apply(k, a, k_k, k_a, n_head)


# ---------------------------------------------------------------------------------------------
# relu(h)^2


@triton.jit
def _relu_sq_fwd_kernel(h_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    h = tl.maximum(tl.load(h_ptr + i, mask=i < n, other=0.0).to(tl.float32), 0.0)
    tl.store(out_ptr + i, (h * h).to(out_ptr.dtype.element_ty), mask=i < n)


@triton.jit
def _relu_sq_bwd_kernel(h_ptr, dout_ptr, dh_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    h = tl.maximum(tl.load(h_ptr + i, mask=i < n, other=0.0).to(tl.float32), 0.0)
    dout = tl.load(dout_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    tl.store(dh_ptr + i, (2.0 * h * dout).to(dh_ptr.dtype.element_ty), mask=i < n)


class _ReluSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, out_dtype):
        h = h.contiguous()
        out = torch.empty(h.shape, device=h.device, dtype=out_dtype)
        _relu_sq_fwd_kernel[(triton.cdiv(h.numel(), BLOCK_FLAT),)](h, out, h.numel(), BLOCK_FLAT)
        ctx.save_for_backward(h)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        dh = torch.empty_like(h)
        _relu_sq_bwd_kernel[(triton.cdiv(h.numel(), BLOCK_FLAT),)](h, dout.contiguous(), dh, h.numel(), BLOCK_FLAT)
        return dh, None


def relu_square(h, out_dtype=torch.float32):
    """relu(h)^2 for any shape, computed in float32, stored as out_dtype."""
    return _ReluSquare.apply(h, out_dtype)
