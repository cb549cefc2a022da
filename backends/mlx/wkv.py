"""WKV-7 + SSE readout in plain MLX ops, and the dispatch to the Metal kernels.

Inputs [B, T, H, N] (decode: [B, H, N]); w_raw is the decay pre-activation, log w =
DECAY_SCALE * sigmoid(w_raw); state S [B, H, N, N] float32, row = value index. The sequence
path is the chunked (WY) algorithm of metastate_core/chunked.py; `kernels="metal"` swaps in
`backends.mlx.kernels` (same signatures), `"auto"` does so when `mx.metal.is_available()`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from metastate_core.errors import MetaStateError
from metastate_core.reference import rel_rms

DECAY_SCALE = -0.6065306597126334  # log w = DECAY_SCALE * sigmoid(w_raw)
CHUNK_SIZE = 16
F32 = mx.float32


class KernelChoiceError(MetaStateError):
    """Kernels that are unknown or cannot run on this machine."""



def wkv7_step_ops(S, r, w_raw, k, v, kk, a):
    """One token. S [B, H, N, N]; r, w_raw, k, v, kk, a [B, H, N] -> (y [B, H, N], S_new)."""
    w = mx.exp(DECAY_SCALE * mx.sigmoid(w_raw))
    sa = S @ (-kk)[..., None]                                        # uses S before decay
    S = S * w[..., None, :] + sa * (kk * a)[..., None, :] + v[..., :, None] * k[..., None, :]
    return (S @ r[..., None])[..., 0], S


def state_read_ops(S, q):
    """S_h q_h for the first K heads. S [B, H, N, N], q [B, K, N] -> [B, K, N]."""
    return (S[:, : q.shape[1]] @ q[..., None])[..., 0]


def _to_chunks(x, C):
    """[B, T, H, N] -> [B, H, n, C, N], zero padded at the end (identity steps)."""
    B, T, H, N = x.shape
    n = -(-T // C)
    if n * C != T:
        x = mx.concatenate([x, mx.zeros((B, n * C - T, H, N), x.dtype)], axis=1)
    return x.reshape(B, n, C, H, N).transpose(0, 3, 1, 2, 4)


def _from_chunks(x, T):
    B, H, n, C, N = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(B, n * C, H, N)[:, :T]


def _unit_lower_inverse(M):
    """(I - M)^{-1} = (I + M)(I + M^2)(I + M^4)... for strictly lower M [..., C, C] (nilpotent)."""
    C = M.shape[-1]
    X, P, p = mx.eye(C, dtype=M.dtype) + M, M, 2
    while p < C:
        P = P @ P
        X = X + X @ P
        p *= 2
    return X


def _t(x):
    return mx.swapaxes(x, -1, -2)


def wkv7_ops(r, w_raw, k, v, kk, a, S0, chunk_size: int = CHUNK_SIZE):
    """A sequence, chunked WY form (metastate_core.chunked). Inputs [B, T, H, N], S0 [B, H, N, N].

    Returns (y [B, T, H, N], S_T [B, H, N, N], read) where read(q [B, T, K, N]) -> S_t q_t
    [B, T, K, N] for the first K heads, from the saved chunk states (pass 3).
    """
    T, C = k.shape[1], chunk_size
    log_w = _to_chunks(DECAY_SCALE * mx.sigmoid(w_raw), C)          # padding: log 1 = 0
    kc, vc = _to_chunks(k, C), _to_chunks(v, C)
    alpha, beta = _to_chunks(-kk, C), _to_chunks(kk * a, C)
    G = mx.cumsum(log_w, axis=-2)                                    # [B, H, n, C, N]
    G_last = G[..., -1:, :]
    A = alpha * mx.exp(G - log_w)
    Bh, Kh = beta * mx.exp(-G), kc * mx.exp(-G)

    # Pass 1: chunk-local WY factors, all chunks at once.
    strict = mx.tril(mx.ones((C, C), F32), -1)
    Tinv = _unit_lower_inverse((A @ _t(Bh)) * strict)
    W = Tinv @ A                                                     # [B, H, n, C, N_k]
    Uv = Tinv @ (((A @ _t(Kh)) * strict) @ vc)                       # [B, H, n, C, N_v]

    # Pass 2: carry the state across chunks (decay to the chunk end in log space, <= 1).
    to_end = mx.exp(G_last - G)
    B_end, K_end, decay = _t(beta * to_end), _t(kc * to_end), mx.exp(G_last)
    vT = _t(vc)
    S, starts, Us = S0, [], []
    for c in range(log_w.shape[2]):
        U = W[:, :, c] @ _t(S) + Uv[:, :, c]
        starts.append(S)
        Us.append(U)
        S = S * decay[:, :, c] + _t(U) @ _t(B_end[:, :, c]) + vT[:, :, c] @ _t(K_end[:, :, c])
    S_starts, U = mx.stack(starts, axis=2), mx.stack(Us, axis=2)    # [B, H, n, N, N], [B, H, n, C, N]
    causal = mx.tril(mx.ones((C, C), F32))

    def read(q):
        h = q.shape[2]
        Q = _to_chunks(q, C) * mx.exp(G[:, :h])
        out = (Q @ _t(S_starts[:, :h])
               + ((Q @ _t(Bh[:, :h])) * causal) @ U[:, :h]
               + ((Q @ _t(Kh[:, :h])) * causal) @ vc[:, :h])
        return _from_chunks(out, T)

    return read(r), S, read


@dataclass(frozen=True)
class WKVOps:
    """The three WKV entry points a kernel set provides (see the ops functions above)."""

    name: str
    step: Callable   # (S, r, w_raw, k, v, kk, a) -> (y [B, H, N], S_new)
    read: Callable   # (S, q [B, K, N]) -> [B, K, N]
    seq: Callable    # (r, w_raw, k, v, kk, a, S0) -> (y [B, T, H, N], S_T, read)


OPS = WKVOps("ops", wkv7_step_ops, state_read_ops, wkv7_ops)


def metal_ops() -> WKVOps:
    """The Metal kernels of backends.mlx.kernels as a WKVOps (imported lazily)."""
    from . import kernels as metal

    return WKVOps("metal", metal.metal_wkv7_step, metal.metal_state_read, metal.metal_wkv7)


def resolve_kernels(kernels: str | WKVOps = "auto", head_size: int | None = None) -> WKVOps:
    """"auto" | "ops" | "metal" (or a WKVOps) -> the WKV implementation to use.

    auto = Metal when mx.metal.is_available() and the kernels import and, for a given
    head_size, pass a check against the plain ops (check_kernels); else plain ops, with a
    warning when the check failed. "metal" raises KernelChoiceError instead of falling back.
    """
    if isinstance(kernels, WKVOps):
        return kernels
    if kernels not in ("auto", "ops", "metal"):
        raise KernelChoiceError(f"unknown kernels {kernels!r}: expected auto, ops or metal")
    if kernels == "ops" or (kernels == "auto" and not mx.metal.is_available()):
        return OPS
    if not mx.metal.is_available():
        raise KernelChoiceError("kernels='metal' needs a Metal GPU (mx.metal.is_available() is False); use kernels='ops'")
    try:
        ops = metal_ops()
    except ImportError as e:
        if kernels == "auto":
            return OPS
        raise KernelChoiceError(f"the Metal kernels cannot be imported: {e}") from e
    problem = check_kernels(ops, head_size) if head_size else None
    if problem is None:
        return ops
    if kernels == "metal":
        raise KernelChoiceError(f"the Metal kernels failed their check on this machine: {problem}")
    warnings.warn(f"the Metal kernels failed their check on this machine ({problem}); using plain MLX ops "
                  "(correct, slower). Please report this with your macOS and MLX versions.", stacklevel=2)
    return OPS


@functools.lru_cache(maxsize=None)
def check_kernels(ops: WKVOps, head_size: int) -> str | None:
    """Run every entry point of `ops` once (float32, a sequence past one state-save interval)
    against the plain ops: None if they agree at SPEC section 6's float32 bounds, else what
    went wrong. The kernels are compiled by this machine's Metal compiler at first use, so a
    body it rejects shows here, once per process and head size, not in the middle of a chat."""
    B, T, H, N = 1, 21, 1, head_size
    keys = mx.random.split(mx.random.key(0), 7)
    r, w_raw, k, v, a = (mx.random.normal((B, T, H, N), key=keys[i]) for i in range(5))
    kk = mx.random.normal((B, T, H, N), key=keys[5])
    kk = kk / mx.sqrt((kk * kk).sum(-1, keepdims=True))
    a = mx.sigmoid(a)
    S0 = 0.1 * mx.random.normal((B, H, N, N), key=keys[6])
    try:
        got, want = _run(ops, r, w_raw, k, v, kk, a, S0), _run(OPS, r, w_raw, k, v, kk, a, S0)
        mx.eval(got, want)
    except Exception as e:  # noqa: BLE001 - a compiler error, whatever MLX raises it as
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    for name, x, y in zip(("step y", "step S", "read", "sequence y", "sequence S_T", "sequence read"), got, want):
        err = rel_rms(np.array(x), np.array(y))
        if not err <= 1e-4:  # NaN fails too
            return f"{name} differs from the plain ops by rel_rms {err:.2e}"
    return None


def _run(ops: WKVOps, r, w_raw, k, v, kk, a, S0) -> tuple:
    y1, S1 = ops.step(S0, *(t[:, 0] for t in (r, w_raw, k, v, kk, a)))
    y, S_T, read = ops.seq(r, w_raw, k, v, kk, a, S0)
    return y1, S1, ops.read(S1, r[:, 0]), y, S_T, read(k)


def wkv(ops: WKVOps, r, w_raw, k, v, kk, a, S):
    """Dispatch on length: T == 1 is the per-token update, T > 1 the sequence path."""
    if k.shape[1] > 1:
        return ops.seq(r, w_raw, k, v, kk, a, S)
    y, S = ops.step(S, *(t[:, 0] for t in (r, w_raw, k, v, kk, a)))
    return y[:, None], S, lambda q: ops.read(S, q[:, 0])[:, None]


