"""Product-key parameter tokens in MLX (SPEC section 7): the selection and the weighted
gather-sum, in plain MLX ops, with a Metal kernel for the gather-sum.

    score, token = select(u, sub_keys, topk)           # each head's exact top-k of m*m tokens
    out = weighted_rows(values, token, relu(score)^2)  # sum over heads and k of weight * values[token]

The model's kernels choose the module (`Kernels.pk`): this module for kernels="ops", `Metal`
(the same select, weighted_rows on the GPU) for kernels="metal". Twin of the torch backend's
ops/product_keys (same names and signatures; weighted_rows here also reads a 4/8-bit quantized
table, utils.quantize). MLX trains nothing here, so the value table's gradient is dense (a
scatter-add into [n, d]); autodiff works through both functions.

Tie rule: `top` is mx.argsort, stable on ties on both devices (the CPU sort compares the index
on equal values; Metal's is a merge sort that keeps the earlier element), so a tie goes to the
smaller index as in the reference (metastate_core.reference.product_select), line for line.
mx.topk / mx.argpartition promise no order among ties and are not used.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from .kernels import MetalKernelError, launcher

F32 = mx.float32


def top(scores, k: int):
    """Indices of the k largest scores along the last axis, best first; ties to the smaller index."""
    return mx.stop_gradient(mx.argsort(-scores, axis=-1)[..., :k])


def select(u, sub_keys, topk: int):
    """u [..., d], sub_keys [P, 2, m, d/2] -> (score float32, token int32), each [..., P, k].

    Per head p: sL = K[p,0] u[:h], sR = K[p,1] u[h:]; the best min(k, m) halves on each side;
    their <= k*k sums, token t = i*m + j; the best k of those (exact: SPEC section 7). The
    score matmuls run in the dtype of sub_keys; score is differentiable in u and sub_keys.
    """
    P, _, m, h = sub_keys.shape
    lead = u.shape[:-1]
    x = u.astype(sub_keys.dtype)

    def half(side, xs):   # [..., P, m] float32
        return (xs @ sub_keys[:, side].reshape(P * m, h).T).astype(F32).reshape(*lead, P, m)

    sL, sR = half(0, x[..., :h]), half(1, x[..., h:])
    c = min(topk, m)
    I, J = mx.sort(top(sL, c), axis=-1), mx.sort(top(sR, c), axis=-1)   # ascending: t ascends too
    cand = mx.take_along_axis(sL, I, -1)[..., :, None] + mx.take_along_axis(sR, J, -1)[..., None, :]
    token = (I[..., :, None] * m + J[..., None, :]).astype(mx.int32)
    cand, token = cand.reshape(*lead, P, c * c), token.reshape(*lead, P, c * c)
    best = top(cand, topk)                                               # a tie: the smaller t
    return mx.take_along_axis(cand, best, -1), mx.take_along_axis(token, best, -1)


def _gather(values, token, scales=None, biases=None, group_size=None, bits=None):
    """values[token] [..., d] float32; a quantized table (packed values, scales, biases: groups
    along d) is dequantized row by row after the gather."""
    rows = mx.take(values, token, axis=0)
    if scales is not None:
        rows = mx.dequantize(rows, mx.take(scales, token, axis=0), mx.take(biases, token, axis=0),
                             group_size=group_size, bits=bits)
    return rows.astype(F32)


def weighted_rows(values, token, weight, **quantized):
    """sum over P and k of weight * values[token]: values [n, d], token and weight [..., P, k]
    -> [..., d] float32 (a token chosen by two heads counts twice). Accumulated in float32.

    quantized: scales, biases, group_size, bits when `values` is mx.quantize's packed table.
    """
    rows = _gather(values, token.reshape(*token.shape[:-2], -1), **quantized)     # [..., P*k, d]
    w = weight.astype(F32).reshape(*weight.shape[:-2], 1, -1)                      # [..., 1, P*k]
    return (w @ rows)[..., 0, :]


# ---------------------------------------------------------------------------------------
# Metal: the gather-sum. One output row (b, t) per grid row, one thread per column c of d
# (threadgroups of up to 256 columns: one group per row for d <= 256). Every thread of a row
# reads the same P*k tokens and weights (uniform loads), and its column of each selected row
# (coalesced across the group); the sum runs in float32, heads and k in order.
# token int32 [R, P*k], weight float32 [R, P*k], out [R, d]. Template VT: the dtype of values,
# unused in the body but part of the kernel's name, so each dtype compiles its own library
# (older MLX releases name a custom kernel by its template arguments only, not its input dtypes).

_WEIGHTED_ROWS = """
    const uint c = thread_position_in_grid.x;
    const int d = values_shape[1];
    const int PK = token_shape[1];
    const size_t base = size_t(thread_position_in_grid.y) * PK;
    float acc = 0.0f;
    for (int e = 0; e < PK; ++e)
        acc += weight[base + e] * float(values[size_t(token[base + e]) * d + c]);
    out[size_t(thread_position_in_grid.y) * d + c] = acc;
"""
# (No pointer variables: MLX passes an input under 8 elements as `constant`, not `device`.)

KERNEL_SOURCES: dict[str, tuple[str, str]] = {"pk_weighted_rows": ("", _WEIGHTED_ROWS)}
KERNEL_IO: dict[str, tuple[list[str], list[str]]] = {"pk_weighted_rows": (["values", "token", "weight"], ["out"])}
THREADS = 256  # columns per threadgroup

_launch = launcher(KERNEL_SOURCES, KERNEL_IO)  # tests swap this for the CPU harness


@mx.custom_function
def _metal_rows(values, token, weight):
    """values [n, d], token int32 [R, P*k], weight float32 [R, P*k] -> [R, d] float32."""
    R, d = token.shape[0], values.shape[1]
    (out,) = _launch("pk_weighted_rows", [values, token, weight], template=[("VT", values.dtype)],
                     grid=(d, R, 1), threadgroup=(min(d, THREADS), 1, 1),
                     output_shapes=[(R, d)], output_dtypes=[F32])
    return out


@_metal_rows.vjp
def _metal_rows_vjp(primals, cotangent, output):
    values, token, weight = primals
    dout = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
    rows = _gather(values, token)                                          # [R, P*k, d]
    dweight = (rows @ dout[:, :, None])[..., 0]                            # a dot per selected row
    dvalues = mx.zeros(values.shape, F32).at[token.reshape(-1)].add(
        (weight[..., None] * dout[:, None, :]).reshape(-1, values.shape[1]))
    return dvalues.astype(values.dtype), mx.zeros_like(token), dweight.astype(weight.dtype)


def metal_weighted_rows(values, token, weight, **quantized):
    """`weighted_rows` with the gather-sum in a Metal kernel (same signature and result).
    A quantized table takes the plain path. Token ids are trusted to lie in [0, n)."""
    if quantized.get("scales") is not None:
        return weighted_rows(values, token, weight, **quantized)
    if values.ndim != 2 or token.shape != weight.shape or token.ndim < 2:
        raise MetalKernelError(f"weighted_rows needs values [n, d] and token, weight [..., P, k] of one shape, got "
                               f"{tuple(values.shape)}, {tuple(token.shape)}, {tuple(weight.shape)}")
    lead = token.shape[:-2]
    R = int(np.prod(lead)) if lead else 1
    out = _metal_rows(values, token.reshape(R, -1).astype(mx.int32), weight.reshape(R, -1).astype(F32))
    return out.reshape(*lead, values.shape[1])


class Metal:
    """`Kernels.pk` for kernels="metal": the plain selection, the gather-sum in Metal."""

    select = staticmethod(select)
    weighted_rows = staticmethod(metal_weighted_rows)


@functools.lru_cache(maxsize=None)
def metal_problem(kernels_pk) -> str | None:
    """Why `kernels_pk` (e.g. `Metal`) cannot stand in for this module's plain ops on this
    machine, or None: as wkv.metal_problem, its weighted_rows run once (float32) against the
    plain one at SPEC section 6's kernel bound, so a body the Metal compiler rejects shows at load."""
    from metastate_core.reference import rel_rms

    keys = mx.random.split(mx.random.key(0), 3)
    values = mx.random.normal((37, 40), key=keys[0])
    token = mx.random.randint(0, 37, (2, 3, 2, 5), key=keys[1]).astype(mx.int32)
    weight = mx.random.uniform(shape=(2, 3, 2, 5), key=keys[2])
    try:
        got, want = kernels_pk.weighted_rows(values, token, weight), weighted_rows(values, token, weight)
        mx.eval(got, want)
    except Exception as e:  # noqa: BLE001 - a compiler error, whatever MLX raises it as
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    err = rel_rms(np.array(got), np.array(want))
    return None if err <= 1e-4 else f"weighted_rows differs from the plain ops by rel_rms {err:.2e}"
