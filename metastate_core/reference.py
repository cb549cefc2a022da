"""NumPy reference of the Meta-State model: SPEC section 2, line by line.

The judge of every parity test. Runs a batch of sequences [B, T] in float64 or float32,
with the recurrent state in and out. The WKV recurrence is pluggable: `"recurrent"` runs the
spec's per-token update verbatim, `"chunked"` runs the sequence form of SPEC section 3
(`metastate_core.chunked`), the design the GPU kernels follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .constants import DECAY_SCALE, L2_EPS, LN_EPS


@dataclass(frozen=True)
class State:
    """Per-layer recurrent state of a batch. All zeros at the start of a sequence."""

    att_x: np.ndarray   # [L, B, d]        previous ln1 output
    meta_x: np.ndarray  # [L, B, d]        previous ln2 output
    wkv: np.ndarray     # [L, B, H, N, N]  S, row = value index, column = key index

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, dtype=np.float64) -> "State":
        L, d, H, N = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_size
        return cls(np.zeros((L, batch, d), dtype), np.zeros((L, batch, d), dtype),
                   np.zeros((L, batch, H, N, N), dtype))

    def copy(self) -> "State":
        return State(self.att_x.copy(), self.meta_x.copy(), self.wkv.copy())

    def astype(self, dtype) -> "State":
        return State(self.att_x.astype(dtype), self.meta_x.astype(dtype), self.wkv.astype(dtype))


def rel_rms(a, b) -> float:
    """SPEC section 6's parity metric, rms(a - b) / rms(b), in float64 (numpy or torch inputs)."""
    a, b = (np.asarray(t.detach().cpu().double() if hasattr(t, "detach") else t, np.float64) for t in (a, b))
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def layer_norm(x, weight, bias, eps=LN_EPS):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def group_norm(y, weight, bias, eps):
    """y [..., H, N] normalised per head, then an affine map over the flattened H*N."""
    mu = y.mean(-1, keepdims=True)
    var = ((y - mu) ** 2).mean(-1, keepdims=True)
    y = (y - mu) / np.sqrt(var + eps)
    return y.reshape(*y.shape[:-2], -1) * weight + bias


def l2_normalize(x, eps=L2_EPS):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


class RecurrentWKV:
    """The spec's per-token WKV update; keeps every state S_t so any query can read it.

    w, k, v, kk, a: [B, T, H, N]; S0: [B, H, N, N]. Memory O(T N^2): reference only.
    """

    def __init__(self, S0, w, k, v, kk, a):
        T = k.shape[1]
        self.states = []                                                   # S_t [B, H, N, N], t < T
        S = S0
        for t in range(T):
            sa = np.einsum("bhij,bhj->bhi", S, -kk[:, t])                  # uses S before decay
            S = (S * w[:, t, :, None, :] + sa[..., :, None] * (kk[:, t] * a[:, t])[..., None, :]
                 + v[:, t, :, :, None] * k[:, t, :, None, :])
            self.states.append(S)
        self.final_state = S

    def read(self, q):
        """S_t q_t for q [B, T, H', N], H' <= H (the first H' heads): [B, T, H', N]."""
        heads = q.shape[2]
        return np.stack([np.einsum("bhij,bhj->bhi", S[:, :heads], q[:, t]) for t, S in enumerate(self.states)], 1)


def top(scores, k: int):
    """Indices of the k largest scores along the last axis, best first; ties go to the smaller
    index (SPEC section 7), so every backend can select the same set."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def product_select(u, sub_keys, k: int):
    """SPEC section 7's selection. u [..., d], sub_keys [P, 2, m, d/2] -> (score, token), each
    [..., P, k]: per head, the k best of the m*m sums sL[i] + sR[j], token t = i*m + j.

    The best k sums lie among the best min(k, m) halves on each side, so this is exact: a pair
    outside I x J is beaten by k pairs inside it (same or higher score, smaller t on a tie).
    """
    P, _, m, h = sub_keys.shape
    sL = np.einsum("...c,pic->...pi", u[..., :h], sub_keys[:, 0])      # [..., P, m]
    sR = np.einsum("...c,pjc->...pj", u[..., h:], sub_keys[:, 1])
    I = np.sort(top(sL, min(k, m)), axis=-1)                           # ascending index, so the
    J = np.sort(top(sR, min(k, m)), axis=-1)                           # candidates' t ascend too
    cand = (np.take_along_axis(sL, I, -1)[..., :, None] + np.take_along_axis(sR, J, -1)[..., None, :])
    token = I[..., :, None] * m + J[..., None, :]                      # [..., P, |I|, |J|]
    cand, token = cand.reshape(*cand.shape[:-2], -1), token.reshape(*token.shape[:-2], -1)
    best = top(cand, k)                                                # a tie: the smaller t
    return np.take_along_axis(cand, best, -1), np.take_along_axis(token, best, -1)


def mm(x, w):
    """x @ w for x [..., n], w [n, m]: one 2-D product over all rows (numpy's matmul runs one
    product per leading index, so a batch of decoded tokens would read w once per sequence)."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def _lerp_prev(x, prev):
    """Token shift: the previous token's value for each position ([B, T, d], prev [B, d])."""
    return np.concatenate([prev[:, None], x[:, :-1]], axis=1)


def forward(weights: dict, cfg: ModelConfig, tokens, state: State | None = None, *,
            dtype=np.float64, wkv: str = "recurrent", chunk_size: int = 16, last_only: bool = False):
    """Logits [B, T, V] and the state after the last token.

    weights: canonical names of SPEC section 4 -> arrays; tokens: int [B, T] (or [T]).
    The input state is not modified. last_only: the logits of the last position only, [B, 1, V]
    (a prefill needs no others: the head's product for one token instead of T).
    """
    from .chunked import ChunkedWKV  # sibling module; imported here to keep this file standalone to read

    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    B, T = tokens.shape
    H, N = cfg.n_head, cfg.head_size
    st = State.zeros(cfg, B, dtype) if state is None else state.astype(dtype)

    def p(name):
        return np.asarray(weights[name], dtype=dtype)

    x = layer_norm(p("emb.weight")[tokens], p("blocks.0.ln0.weight"), p("blocks.0.ln0.bias"))
    v_first = None
    for l in range(cfg.n_layer):
        b = f"blocks.{l}."
        # --- time mix: exact RWKV-7 ---
        xa = layer_norm(x, p(b + "ln1.weight"), p(b + "ln1.bias"))
        dx = _lerp_prev(xa, st.att_x[l]) - xa
        st.att_x[l] = xa[:, -1]
        x_r, x_w, x_k, x_v, x_a, x_g = (xa + dx * p(b + f"att.x_{c}") for c in "rwkvag")
        r = mm(x_r, p(b + "att.receptance.weight").T)                      # x_r @ W^T
        k = mm(x_k, p(b + "att.key.weight").T)
        v = mm(x_v, p(b + "att.value.weight").T)
        w = np.exp(DECAY_SCALE * sigmoid(p(b + "att.w0") + mm(np.tanh(mm(x_w, p(b + "att.w1"))), p(b + "att.w2"))))
        a = sigmoid(p(b + "att.a0") + mm(mm(x_a, p(b + "att.a1")), p(b + "att.a2")))
        g = mm(sigmoid(mm(x_g, p(b + "att.g1"))), p(b + "att.g2"))
        kk = l2_normalize((k * p(b + "att.k_k")).reshape(B, T, H, N))
        k = k * (1 + (a - 1) * p(b + "att.k_a"))
        if l == 0:
            v_first = v
        else:
            v = v + (v_first - v) * sigmoid(p(b + "att.v0") + mm(mm(x_v, p(b + "att.v1")), p(b + "att.v2")))
        r, w, k, v, a = (t.reshape(B, T, H, N) for t in (r, w, k, v, a))
        if wkv == "recurrent":
            scan = RecurrentWKV(st.wkv[l], w, k, v, kk, a)
        elif wkv == "chunked":
            scan = ChunkedWKV(st.wkv[l], w, k, v, kk, a, chunk_size)
        else:
            raise ValueError(f"unknown wkv form {wkv!r}: expected 'recurrent' or 'chunked'")
        st.wkv[l] = scan.final_state
        y = group_norm(scan.read(r), p(b + "att.ln_x.weight"), p(b + "att.ln_x.bias"), cfg.ln_x_eps)
        bonus = (r * k * p(b + "att.r_k")).sum(-1, keepdims=True) * v        # modified k
        y = y + bonus.reshape(B, T, -1)
        x = x + mm(y * g, p(b + "att.output.weight").T)
        # --- Meta-State layer: replaces RWKV-7's channel mix ---
        xm = layer_norm(x, p(b + "ln2.weight"), p(b + "ln2.bias"))
        xs = xm + (_lerp_prev(xm, st.meta_x[l]) - xm) * p(b + "meta.x_k")
        st.meta_x[l] = xm[:, -1]
        u = xs
        K = cfg.sse_heads
        if K:  # Self-State Encoder: the state after this token, read with xs as the query
            z = scan.read(xs[..., : K * N].reshape(B, T, K, N))
            z = z / np.sqrt((z * z).mean(-1, keepdims=True) + cfg.eps_sse)
            u = xs.copy()
            u[..., : K * N] += p(b + "meta.sse_gate")[: K * N] * z.reshape(B, T, K * N)
        if cfg.product:  # SPEC section 7: each head reads its exact top-k of m*m tokens
            score, token = product_select(u, p(b + "meta.sub_keys"), cfg.param_topk)
            alpha = np.maximum(score, 0) ** 2                                # [B, T, P, k]
            x = x + np.einsum("btpk,btpkd->btd", alpha, p(b + "meta.param_values")[token])
        else:
            alpha = np.maximum(mm(u, p(b + "meta.param_keys").T), 0) ** 2  # [B, T, n]
            x = x + mm(alpha, p(b + "meta.param_values"))
    x = x[:, -1:] if last_only else x
    logits = mm(layer_norm(x, p("ln_out.weight"), p("ln_out.bias")), p("head.weight").T)
    return logits, st


# Matrices a token multiplies as x @ W^T (the rest: x @ W, or rows gathered).
TRANSPOSED_PRODUCTS = (".receptance.weight", ".key.weight", ".value.weight", ".output.weight", ".param_keys",
                       "head.weight")


def decode_layout(weights: dict, dtype=None) -> dict:
    """The same arrays (values unchanged; in `dtype` if given), with each matrix `forward`
    multiplies as x @ W^T stored column-major, so that W^T is a row-major operand: one row
    times it then runs the BLAS's fast kernel (OpenBLAS and MKL read a row-major operand about
    1.4x faster than the transpose of one; docs/benchmarks.md). For the NumPy engine's
    float32/float64 weights; each array is converted and laid out in one copy at most."""
    return {name: np.asarray(a, dtype, order="F" if name.endswith(TRANSPOSED_PRODUCTS) else "K")
            for name, a in weights.items()}
