"""WKV-7 (RWKV-7 time mix) + Self-State Encoder readout: the Triton kernels and their autograd.

    triton_wkv7(r, w_raw, k, v, kk, a, S0=None) -> (y, S_T, read)    sequential sequence kernel
                                                                      (the alternative to chunk_wkv7)
    triton_wkv7_step(S, r, w_raw, k, v, kk, a) -> y                   decode, S updated in place
    triton_state_read(S, q) -> z                                      decode SSE readout

Design notes: docs/kernels.md. `naive_wkv7` (naive.py) is the plain-torch twin they are tested
against.
"""

from __future__ import annotations

from .checks import (MAX_HEAD_SIZE, WKV7InputError, check_block_rows, check_chunk_count, check_query,
                     check_read_once, check_sequence, check_state, check_vectors)
from .fused_recurrent import default_decode_rows, state_read, wkv7_step
from .sequential import CHUNK, _Read, _Shared, _WKV7, default_block_rows

__all__ = ["triton_wkv7", "triton_wkv7_step", "triton_state_read"]


def triton_wkv7(r, w_raw, k, v, kk, a, S0=None, *, block_rows: int | None = None):
    """WKV-7 over a sequence, differentiable, with a readout of the same states for a query.

    Args:
        r, w_raw, k, v, kk, a: [B, T, H, N], float32/bfloat16/float16. w_raw is the decay
            pre-activation: log w = DECAY_SCALE * sigmoid(w_raw), in float32.
        S0: [B, H, N, N] float32 initial state (row = value index), zeros if None.
        block_rows: rows of S per program (a power of two dividing N); default by device.
    Returns:
        y [B, T, H, N] = S_t r_t (dtype of r), S_T [B, H, N, N] float32, and
        read(q): q [B, T, K, N], K <= H -> z [B, T, K, N] = S_t q_t over the first K heads
        (dtype of q). Call read at most once; the backward pass adds the state gradients of
        both readouts in one reverse sweep.
    """
    B, T, H, N = check_sequence((r, w_raw, k, v, kk, a), S0)
    if T * H * N >= 2**31:  # int64 offsets cost this kernel a block per SM; chunk_wkv7 has them
        fix = ("use chunk_wkv7" if N <= MAX_HEAD_SIZE else
               "split the sequence, passing each piece's S_T as the next S0")
        raise WKV7InputError(f"T * H * N = {T * H * N} elements per sequence is past the sequential kernel's "
                             f"32-bit token offsets: {fix}")
    check_chunk_count(T, CHUNK)
    BI = check_block_rows(block_rows, default_block_rows(N, k.device), N)
    r, w_raw, k, v, kk, a = (x.contiguous() for x in (r, w_raw, k, v, kk, a))
    S0 = S0 if S0 is None else S0.contiguous()
    shared = _Shared(BI)
    y, sT, link, states = _WKV7.apply(r, w_raw, k, v, kk, a, S0, shared)

    def read(q):
        check_read_once(shared, q, B, T, H, N, k.device, "triton_wkv7")
        return _Read.apply(q.contiguous(), link, w_raw, k, v, kk, a, states, shared)

    return y, sT, read


def triton_wkv7_step(S, r, w_raw, k, v, kk, a, *, block_rows: int | None = None):
    """Decode one token: S [B, H, N, N] float32 is updated in place; inputs [B, H, N].

    Returns y [B, H, N] = S_t r_t in the dtype of r. Not differentiable (inference).
    """
    check_vectors((r, w_raw, k, v, kk, a), 3)
    B, H, N = k.shape
    check_state(S, B, H, N, k.device, name="S")
    if not S.is_contiguous():
        raise WKV7InputError("S must be contiguous (it is updated in place)")
    BI = check_block_rows(block_rows, default_decode_rows(N, k.device), N)
    r, w_raw, k, v, kk, a = (x.contiguous() for x in (r, w_raw, k, v, kk, a))
    return wkv7_step(S, r, w_raw, k, v, kk, a, BI)


def triton_state_read(S, q, *, block_rows: int | None = None):
    """z = S q over the first K heads: S [B, H, N, N] float32, q [B, K, N] -> z [B, K, N]."""
    if S.dim() != 4 or S.shape[-1] != S.shape[-2]:
        raise WKV7InputError(f"S has shape {tuple(S.shape)}, expected [B, H, N, N]")
    B, H, N, _ = S.shape
    check_state(S, B, H, N, S.device, name="S")
    check_query(q, (B,), H, N)
    if q.device != S.device:
        raise WKV7InputError(f"q is on {q.device}, S on {S.device}")
    BI = check_block_rows(block_rows, default_decode_rows(N, S.device), N)
    return state_read(S.contiguous(), q.contiguous(), BI)
