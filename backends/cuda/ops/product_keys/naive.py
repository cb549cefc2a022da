"""Product-key parameter tokens (SPEC section 7) in plain torch: the model's "ops" path and the
twin the Triton kernels of fused.py are tested against. Same names, same signatures:

    select         u [B, T, d], sub_keys [P, 2, m, d/2], topk k -> score [B, T, P, k] float32,
                   token [B, T, P, k] int64 (t = i*m + j; best first, a tie to the smaller t)
    weighted_rows  values [n, d], token [B, T, P, k], weight [B, T, P, k] -> [B, T, d] float32:
                   sum over P and k of weight * values[token]

`score` is differentiable with respect to u and sub_keys through the kept scores only; the
gradient of `values` is a coalesced sparse COO tensor holding the rows read in the step.
float64 inputs stay float64 (the tests' exact references).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import at_least_f32 as f32
from .checks import MAX_TOKENS, check_rows, check_select


def _key(score: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys in the order of SPEC 7's `top`: the float32 score's bits made
    order-preserving in the upper half (negatives' magnitude bits flipped; + 0.0 turns -0.0 into
    its equal +0.0), 2^31 - 1 - index in the lower (a tie goes to the smaller index)."""
    bits = (score.float() + 0.0).view(torch.int32).long()
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)) << 32 | (MAX_TOKENS - index)


def top(score: torch.Tensor, k: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the k largest of `score` along the last axis, best first; a tie goes to the
    smaller `index` (int64, broadcastable to score, distinct along the axis, in [0, 2^31);
    default: the position). SPEC 7's `top`, exactly.

    torch.topk orders ties arbitrarily, so it runs on unique keys (`_key`; a stable sort of the
    axis costs 8-20x topk on a CPU at m = 1024). On a long axis of many rows (the halves in a
    prefill) the keys of the whole axis cost more than topk itself: there topk of the raw scores
    comes first, and where no tie straddles the k-th place (the usual case) its set is exact and
    only its k are keyed. On a CPU that is 7x faster at 512 rows of m = 1024, k = 32 and slower
    below 16 rows (a decoded token: more operations)."""
    score = score.detach()
    if index is None:
        index = _arange(score.shape[-1], score.device)
    if score.dtype == torch.float64:  # no room for the index beside 64 bits: two sorts (tests)
        order = index.expand_as(score).argsort(-1)
        best = score.gather(-1, order).argsort(dim=-1, descending=True, stable=True)[..., :k]
        return order.gather(-1, best)
    if score.shape[-1] >= 8 * k and score.numel() >= 1 << 17 and not (
            score.is_cuda and torch.cuda.is_current_stream_capturing()):
        vals, pos = score.topk(k + 1, -1)
        if not (vals[..., k - 1] == vals[..., k]).any():  # (waits for a GPU; a captured graph takes the keys)
            pos = pos[..., :k]
            return pos.gather(-1, _key(vals[..., :k], index.expand_as(score).gather(-1, pos)).topk(k, -1).indices)
    return _key(score, index).topk(k, -1).indices


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=64)
def rank_pairs(k: int, k1: int, device: torch.device) -> torch.Tensor:
    """The pairs of half ranks (a, b) (from 0, < k1) with (a+1)(b+1) <= k, [2, pairs]: the only
    pairs that can be among the k best sums (`select`), about k ln k of the k1^2 (119 of 1024
    at k = 32)."""
    return torch.tensor([(a, b) for a in range(k1) for b in range(min(k1, k // (a + 1)))], device=device).T


def half_scores(u: torch.Tensor, sub_keys: torch.Tensor) -> torch.Tensor:
    """The two score GEMMs: u [R, d], sub_keys [P, 2, m, h] -> [P, 2, R, m] (half 0: sL, 1: sR),
    in the sub-keys' dtype, result float32."""
    P, _, m, h = sub_keys.shape
    uh = u.to(sub_keys.dtype).reshape(-1, 2, h).transpose(0, 1).expand(P, 2, -1, h).reshape(2 * P, -1, h)
    s = torch.bmm(uh, sub_keys.reshape(2 * P, m, h).transpose(1, 2))  # [2P, R, m] (torch.matmul's
    return f32(s).view(P, 2, -1, m)                                    # broadcasting: 1.5x slower at R = 1)


def select(u: torch.Tensor, sub_keys: torch.Tensor, topk: int):
    """SPEC section 7's selection: per head, the exact top-k of the m*m sums sL[i] + sR[j].

    With the halves ranked best first (ties: the smaller index), the pair of ranks (a, b) is
    beaten by the (a+1)(b+1) - 1 pairs of ranks a' <= a, b' <= b (a higher sum, or an equal one
    with a smaller t), so only `rank_pairs` are candidates. Exact, except where float32 rounding
    makes two such sums equal though their halves differ: a near tie, which SPEC 6 leaves open."""
    check_select(u, sub_keys, topk)
    B, T, _ = u.shape
    P, _, m, _ = sub_keys.shape
    s = half_scores(u.reshape(B * T, -1), sub_keys)                      # [P, 2, R, m]
    half = top(s, min(topk, m))                                          # ranks -> i, j: [P, 2, R, k1]
    a, b = rank_pairs(topk, half.shape[-1], u.device)[:, None, None].expand(2, P, B * T, -1)
    best = s.gather(-1, half)
    cand = best[:, 0].gather(-1, a) + best[:, 1].gather(-1, b)           # [P, R, pairs]
    t = half[:, 0].gather(-1, a) * m + half[:, 1].gather(-1, b)
    pick = top(cand, topk, t)                                            # the top k of all m*m
    score, token = cand.gather(-1, pick), t.gather(-1, pick)             # [P, R, k]
    return (score.transpose(0, 1).reshape(B, T, P, topk), token.transpose(0, 1).reshape(B, T, P, topk))


class _CoalescedGrad(torch.autograd.Function):
    """Identity whose backward coalesces a sparse gradient (duplicate rows summed, sorted)."""

    @staticmethod
    def forward(ctx, values):
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad):
        return grad.coalesce() if grad.is_sparse else grad


def weighted_rows(values: torch.Tensor, token: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum over P and k of weight * values[token], the product in the values' dtype (as the dense
    layer's matmul), result float32; values' gradient sparse (embedding_bag, sparse=True)."""
    check_rows(values, token, weight)
    B, T, P, k = token.shape
    if values.requires_grad and torch.is_grad_enabled():
        values = _CoalescedGrad.apply(values)
    out = F.embedding_bag(token.reshape(B * T, P * k), values, mode="sum", sparse=True,
                          per_sample_weights=weight.reshape(B * T, P * k).to(values.dtype))
    return f32(out).view(B, T, -1)
