"""Product-key parameter tokens with Triton kernels: the gather-weighted-sum of the selected value
rows, forward and backward. `select` stays plain torch (naive.select: two GEMMs and two top-k).
Twins (same arguments, same results, gradients included): naive.py.

    _rows_fwd_kernel     out[r] = sum_j weight[r, j] * values[token[r, j]]       grid (R, D tiles)
    _weight_bwd_kernel   dweight[r, j] = dout[r] . values[token[r, j]]          grid (R, K tiles)
    _values_bwd_kernel   dvalues[t] = sum over (r, j) with token[r, j] = t of weight[r, j] dout[r]
                                                                              grid (touched rows, D tiles)

r runs over the B*T tokens, j over the P*k selections of each. The value gradient is
deterministic, without atomics (as Meta's memory-layer kernels): the selections are sorted by
row (a stable sort), and one program per touched row and channel tile sums its selections in
that order. It is returned as a coalesced sparse COO tensor of the touched rows: its memory and
time do not grow with the table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import first_order_only
from .checks import check_rows
from .naive import select  # noqa: F401  (the model's kern.pk.select)

BLOCK_K = 32   # selections per tile
BLOCK_D = 128  # channels per tile (at most next_power_of_2(d))
BLOCK_E = 32   # selections of one row summed per step of the value gradient


@triton.jit
def _rows_fwd_kernel(values, token, weight, out, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, K, BLOCK_K):
        js = j0 + tl.arange(0, BLOCK_K)
        jmask = js < K
        tok = tl.load(token + r * K + js, mask=jmask, other=0).to(tl.int64)
        w = tl.load(weight + r * K + js, mask=jmask, other=0.0).to(tl.float32)
        rows = tl.load(values + tok[:, None] * D + cols[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(rows.to(tl.float32) * w[:, None], axis=0)
    tl.store(out + r * D + cols, acc, mask=cmask)


@triton.jit
def _weight_bwd_kernel(values, token, dout, dweight, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    jmask = js < K
    tok = tl.load(token + r * K + js, mask=jmask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        g = tl.load(dout + r * D + cols, mask=cmask, other=0.0)
        rows = tl.load(values + tok[:, None] * D + cols[None, :], mask=jmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(rows.to(tl.float32) * g[None, :], axis=1)
    tl.store(dweight + r * K + js, acc, mask=jmask)


@triton.jit
def _values_bwd_kernel(order, starts, weight, dout, drows, K, D, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start, end = tl.load(starts + u), tl.load(starts + u + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):  # this row's selections, in sorted order
        es = e0 + tl.arange(0, BLOCK_E)
        emask = es < end
        src = tl.load(order + es, mask=emask, other=0)           # flat index r*K + j
        w = tl.load(weight + src, mask=emask, other=0.0)
        g = tl.load(dout + (src // K)[:, None] * D + cols[None, :], mask=emask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(g * w[:, None], axis=0)
    tl.store(drows + u * D + cols, acc, mask=cmask)


def _block_d(D: int) -> int:
    return min(BLOCK_D, triton.next_power_of_2(D))


class _WeightedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, token, weight):
        R, K = token.shape
        D = values.shape[1]
        out = torch.empty(R, D, device=values.device, dtype=torch.float32)
        bd = _block_d(D)
        _rows_fwd_kernel[(R, triton.cdiv(D, bd))](values, token, weight, out, K, D, BLOCK_K, bd)
        ctx.save_for_backward(values, token, weight)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, dout):
        values, token, weight = ctx.saved_tensors
        R, K = token.shape
        n, D = values.shape
        dout, bd = dout.contiguous(), _block_d(D)
        dvalues = dweight = None
        if ctx.needs_input_grad[0]:
            flat, order = torch.sort(token.flatten(), stable=True)   # selections grouped by row
            rows, counts = torch.unique_consecutive(flat, return_counts=True)
            starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            drows = torch.empty(rows.shape[0], D, device=dout.device, dtype=torch.float32)
            _values_bwd_kernel[(rows.shape[0], triton.cdiv(D, bd))](order, starts, weight, dout, drows, K, D,
                                                                    BLOCK_E, bd)
            dvalues = torch.sparse_coo_tensor(rows[None], drows.to(values.dtype), (n, D), is_coalesced=True,
                                              check_invariants=False)
        if ctx.needs_input_grad[2]:
            dweight = torch.empty(R, K, device=dout.device, dtype=torch.float32)
            _weight_bwd_kernel[(R, triton.cdiv(K, BLOCK_K))](values, token, dout, dweight, K, D, BLOCK_K, bd)
        return dvalues, None, dweight


def weighted_rows(values: torch.Tensor, token: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum over P and k of weight * values[token] -> [B, T, d] float32 (naive.weighted_rows)."""
    check_rows(values, token, weight)
    B, T, P, k = token.shape
    R, K = B * T, P * k
    out = _WeightedRows.apply(values.contiguous(), token.reshape(R, K).contiguous(),
                              weight.reshape(R, K).float().contiguous())
    return out.view(B, T, -1)
