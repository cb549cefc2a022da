"""WKV-7 (RWKV-7 time mix) + Self-State Encoder readout: the Triton kernels and their autograd.

    triton_wkv7(r, w_raw, k, v, kk, a, S0=None) -> (y, S_T, read)    sequential sequence kernel
                                                                      (the alternative to chunk_wkv7)
    triton_wkv7_step(S, r, w_raw, k, v, kk, a) -> y                   decode, S updated in place
    triton_state_read(S, q) -> z                                      decode SSE readout

Design notes: docs/kernels.md. `naive_wkv7` (naive.py) is the plain-torch twin they are tested
against.
"""

from __future__ import annotations

import torch

from metastate_core.errors import MetaStateError

from .fused_recurrent import default_decode_rows, state_read, wkv7_step
from .naive import DECAY_SCALE, decay_log, naive_wkv7
from .sequential import CHUNK, _Read, _Shared, _WKV7, default_block_rows

__all__ = ["triton_wkv7", "triton_wkv7_step", "triton_state_read", "naive_wkv7", "decay_log",
           "DECAY_SCALE", "CHUNK", "WKV7InputError"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# CUDA's limit on grid dimensions 1 and 2, where the sequence kernels put the chunk count.
MAX_CHUNKS = 65535


class WKV7InputError(MetaStateError, ValueError):
    """Inputs of the WKV-7 kernels with the wrong shape, dtype or device."""


def _check_inputs(names, tensors, ndim):
    ref = tensors[0]
    for name, x in zip(names, tensors):
        if x.dim() != ndim or x.shape != ref.shape:
            raise WKV7InputError(f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} "
                                 f"({ndim} dims, same for {', '.join(names)})")
        if x.dtype not in _DTYPES:
            raise WKV7InputError(f"{name} has dtype {x.dtype}; expected float32, bfloat16 or float16")
        if x.device != ref.device:
            raise WKV7InputError(f"{name} is on {x.device}, {names[0]} on {ref.device}")
    N = ref.shape[-1]
    if N < 16 or N > 256 or N & (N - 1):
        raise WKV7InputError(f"head size N = {N} is not supported; expected a power of two in [16, 256]")


def check_chunk_count(T: int, C: int) -> None:
    chunks = -(-T // C)
    if chunks > MAX_CHUNKS:
        raise WKV7InputError(f"T = {T} tokens make {chunks} chunks of {C}, past the {MAX_CHUNKS} a CUDA grid "
                             "dimension holds: split the sequence, passing each piece's S_T as the next S0")


def _check_state(S, B, H, N, device, name="S0"):
    if S.shape != (B, H, N, N):
        raise WKV7InputError(f"{name} has shape {tuple(S.shape)}, expected {(B, H, N, N)}")
    if S.dtype != torch.float32:
        raise WKV7InputError(f"{name} must be float32, got {S.dtype}")
    if S.device != device:
        raise WKV7InputError(f"{name} is on {S.device}, the inputs on {device}")


def _check_query(q, B, T_shape, H, N, dtype_ok=_DTYPES):
    if q.shape[:-2] != T_shape or q.shape[-1] != N or not 1 <= q.shape[-2] <= H:
        raise WKV7InputError(f"query has shape {tuple(q.shape)}, expected {(*T_shape, 'K', N)} "
                             f"with 1 <= K <= {H}")
    if q.dtype not in dtype_ok:
        raise WKV7InputError(f"query has dtype {q.dtype}; expected float32, bfloat16 or float16")


def _block_rows(block_rows, default, N):
    BI = default if block_rows is None else block_rows
    if BI < 1 or N % BI or BI & (BI - 1):
        raise WKV7InputError(f"block_rows = {BI} must be a power of two dividing N = {N}")
    return BI


def check_read_once(shared, q, B, T, H, N, device, name):
    """A sequence kernel's read(q): called at most once, with a query [B, T, K <= H, N] on `device`."""
    if shared.read_called:
        raise WKV7InputError(f"read(q) may be called once per {name} call")
    _check_query(q, B, (B, T), H, N)
    if q.device != device:
        raise WKV7InputError(f"query is on {q.device}, the inputs on {device}")
    shared.read_called = True


def triton_wkv7(r, w_raw, k, v, kk, a, S0=None, *, block_rows: int | None = None):
    """WKV-7 over a sequence, differentiable, with a readout of the same states for a query.

    Args:
        r, w_raw, k, v, kk, a: [B, T, H, N], float32/bfloat16/float16. w_raw is the decay
            pre-activation: log w = -0.6065306597126334 * sigmoid(w_raw), in float32.
        S0: [B, H, N, N] float32 initial state (row = value index), zeros if None.
        block_rows: rows of S per program (a power of two dividing N); default by device.
    Returns:
        y [B, T, H, N] = S_t r_t (dtype of r), S_T [B, H, N, N] float32, and
        read(q): q [B, T, K, N], K <= H -> z [B, T, K, N] = S_t q_t over the first K heads
        (dtype of q). Call read at most once; the backward pass adds the state gradients of
        both readouts in one reverse sweep.
    """
    names = ("r", "w_raw", "k", "v", "kk", "a")
    _check_inputs(names, (r, w_raw, k, v, kk, a), 4)
    B, T, H, N = k.shape
    if T == 0:
        raise WKV7InputError("sequence length T must be at least 1")
    if T * H * N >= 2**31:  # int64 offsets cost this kernel a block per SM; chunk_wkv7 has them
        from .chunk import MAX_HEAD_SIZE
        fix = ("use chunk_wkv7" if N <= MAX_HEAD_SIZE else
               "split the sequence, passing each piece's S_T as the next S0")
        raise WKV7InputError(f"T * H * N = {T * H * N} elements per sequence is past the sequential kernel's "
                             f"32-bit token offsets: {fix}")
    check_chunk_count(T, CHUNK)
    if S0 is not None:
        _check_state(S0, B, H, N, k.device)
        S0 = S0.contiguous()
    BI = _block_rows(block_rows, default_block_rows(N, k.device), N)
    r, w_raw, k, v, kk, a = (x.contiguous() for x in (r, w_raw, k, v, kk, a))
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
    _check_inputs(("r", "w_raw", "k", "v", "kk", "a"), (r, w_raw, k, v, kk, a), 3)
    B, H, N = k.shape
    _check_state(S, B, H, N, k.device, name="S")
    if not S.is_contiguous():
        raise WKV7InputError("S must be contiguous (it is updated in place)")
    BI = _block_rows(block_rows, default_decode_rows(N, k.device), N)
    r, w_raw, k, v, kk, a = (x.contiguous() for x in (r, w_raw, k, v, kk, a))
    return wkv7_step(S, r, w_raw, k, v, kk, a, BI)


def triton_state_read(S, q, *, block_rows: int | None = None):
    """z = S q over the first K heads: S [B, H, N, N] float32, q [B, K, N] -> z [B, K, N]."""
    if S.dim() != 4 or S.shape[-1] != S.shape[-2]:
        raise WKV7InputError(f"S has shape {tuple(S.shape)}, expected [B, H, N, N]")
    B, H, N, _ = S.shape
    _check_state(S, B, H, N, S.device, name="S")
    _check_query(q, B, (B,), H, N)
    if q.device != S.device:
        raise WKV7InputError(f"q is on {q.device}, S on {S.device}")
    BI = _block_rows(block_rows, default_decode_rows(N, S.device), N)
    return state_read(S.contiguous(), q.contiguous(), BI)
