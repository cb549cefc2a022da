"""Input checks of the WKV-7 Triton kernels, one set for the chunked, sequential and decode
entry points, and the limits behind them. No Triton here: the model and the benchmarks read
the limits without importing a kernel."""

from __future__ import annotations

import torch

from metastate_core.errors import MetaStateError

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NAMES = ("r", "w_raw", "k", "v", "kk", "a")
# CUDA's limit on grid dimensions 1 and 2, where the sequence kernels put the chunk count.
MAX_CHUNKS = 65535
# Head sizes up to this for the chunked kernels (chunk.py): their passes hold whole [N, N]
# float32 tiles per program. Compiled for sm_90 by Triton 3.7.1 at N = 128, _bwd_kernel spills
# 2.4 KB per thread and needs 160 KB of shared memory (consumer GPUs, sm_86/89, give a block
# 99 KB); at N = 256, 576 KB (no GPU has it). triton_wkv7, one state row per thread, takes the
# larger heads.
MAX_HEAD_SIZE = 64


class WKV7InputError(MetaStateError, ValueError):
    """Inputs of the WKV-7 kernels with the wrong shape, dtype or device."""


def check_vectors(tensors, ndim: int) -> None:
    """r, w_raw, k, v, kk, a: one shape of `ndim` dims, float dtypes, one device, and a head
    size N (last dim) that is a power of two in [16, 256]."""
    ref = tensors[0]
    for name, x in zip(NAMES, tensors):
        if x.dim() != ndim or x.shape != ref.shape:
            raise WKV7InputError(f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} "
                                 f"({ndim} dims, same for {', '.join(NAMES)})")
        if x.dtype not in DTYPES:
            raise WKV7InputError(f"{name} has dtype {x.dtype}; expected float32, bfloat16 or float16")
        if x.device != ref.device:
            raise WKV7InputError(f"{name} is on {x.device}, {NAMES[0]} on {ref.device}")
    N = ref.shape[-1]
    if N < 16 or N > 256 or N & (N - 1):
        raise WKV7InputError(f"head size N = {N} is not supported; expected a power of two in [16, 256]")


def check_sequence(tensors, S0) -> tuple[int, int, int, int]:
    """The six inputs of a sequence kernel, [B, T, H, N] with T >= 1, and S0 (None or the
    initial state): returns (B, T, H, N)."""
    check_vectors(tensors, 4)
    B, T, H, N = tensors[0].shape
    if T == 0:
        raise WKV7InputError("sequence length T must be at least 1")
    if S0 is not None:
        check_state(S0, B, H, N, tensors[0].device)
    return B, T, H, N


def check_chunk_count(T: int, C: int) -> None:
    chunks = -(-T // C)
    if chunks > MAX_CHUNKS:
        raise WKV7InputError(f"T = {T} tokens make {chunks} chunks of {C}, past the {MAX_CHUNKS} a CUDA grid "
                             "dimension holds: split the sequence, passing each piece's S_T as the next S0")


def check_state(S, B, H, N, device, name="S0") -> None:
    if S.shape != (B, H, N, N):
        raise WKV7InputError(f"{name} has shape {tuple(S.shape)}, expected {(B, H, N, N)}")
    if S.dtype != torch.float32:
        raise WKV7InputError(f"{name} must be float32, got {S.dtype}")
    if S.device != device:
        raise WKV7InputError(f"{name} is on {S.device}, the inputs on {device}")


def check_query(q, lead_shape, H, N) -> None:
    """q [*lead_shape, K, N] with 1 <= K <= H, a float dtype."""
    if q.shape[:-2] != lead_shape or q.shape[-1] != N or not 1 <= q.shape[-2] <= H:
        raise WKV7InputError(f"query has shape {tuple(q.shape)}, expected {(*lead_shape, 'K', N)} "
                             f"with 1 <= K <= {H}")
    if q.dtype not in DTYPES:
        raise WKV7InputError(f"query has dtype {q.dtype}; expected float32, bfloat16 or float16")


def check_block_rows(block_rows, default, N) -> int:
    """block_rows (default if None): a power of two dividing N."""
    BI = default if block_rows is None else block_rows
    if BI < 1 or N % BI or BI & (BI - 1):
        raise WKV7InputError(f"block_rows = {BI} must be a power of two dividing N = {N}")
    return BI


def check_read_once(shared, q, B, T, H, N, device, name) -> None:
    """A sequence kernel's read(q): called at most once, with a query [B, T, K <= H, N] on `device`."""
    if shared.read_called:
        raise WKV7InputError(f"read(q) may be called once per {name} call")
    check_query(q, (B, T), H, N)
    if q.device != device:
        raise WKV7InputError(f"query is on {q.device}, the inputs on {device}")
    shared.read_called = True
