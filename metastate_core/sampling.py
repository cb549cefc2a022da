"""Token sampling, shared by every backend: they hand over float32 logits [V] or [B, V].

Order: penalties -> temperature -> top-k -> top-p -> min-p -> sample. Each filter sees the
distribution left by the one before (renormalised) and always keeps the most likely token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import MetaStateError


class SamplingError(MetaStateError, ValueError):
    """Invalid sampling parameters or logits of the wrong shape."""


MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias: +-100 bans or forces a token


@dataclass
class SamplingParams:
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI's, in [-100, 100])

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise SamplingError(msg)

        check(math.isfinite(self.temperature) and self.temperature >= 0,
              f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0,
              f"top_k must be an integer >= 0, got {self.top_k!r}")
        check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            check(math.isfinite(getattr(self, name)), f"{name} must be finite, got {getattr(self, name)}")
        check(self.seed is None or (isinstance(self.seed, (int, np.integer)) and self.seed >= 0),
              f"seed must be None or an integer >= 0, got {self.seed!r}")
        check(self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
              _is_int(i) and i >= 0 and _is_number(b) and abs(b) <= MAX_LOGIT_BIAS for i, b in self.logit_bias.items())),
              f"logit_bias must map token ids >= 0 to numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def apply_penalties(logits: np.ndarray, counts: np.ndarray | None,
                    presence: float, frequency: float) -> np.ndarray:
    """logits - presence * (counts > 0) - frequency * counts (RWKV convention). [..., V] -> [..., V]."""
    if counts is None or (presence == 0 and frequency == 0):
        return logits
    counts = np.asarray(counts)
    if counts.shape != logits.shape:
        raise SamplingError(f"counts shape {counts.shape} does not match logits shape {logits.shape}")
    return logits - presence * (counts > 0) - frequency * counts


def apply_logit_bias(logits: np.ndarray, bias: dict[int, float] | None) -> np.ndarray:
    """logits with bias[i] added to token i's logit (a new array). [..., V] -> [..., V]."""
    if not bias:
        return logits
    ids = np.fromiter(bias, np.int64, len(bias))
    if ids.max() >= logits.shape[-1]:
        raise SamplingError(f"logit_bias names token id {int(ids.max())}, past the vocabulary of {logits.shape[-1]}")
    logits = logits.copy()
    logits[..., ids] += np.fromiter(bias.values(), np.float64, len(bias))
    return logits


def filter_logits(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> np.ndarray:
    """Mask with -inf what top-k, then top-p, then min-p drop. [..., V] -> float64 [..., V].

    top-k keeps exactly k tokens (ties at the k-th value broken arbitrarily); top-p keeps the
    smallest set of most likely tokens whose probability mass reaches top_p; min-p drops
    tokens whose probability is below min_p times the largest one. The argmax always
    survives (top_k=1 is greedy). The input is not modified.
    """
    x = np.array(logits, dtype=np.float64)
    shape, V = x.shape, x.shape[-1]
    x = x.reshape(-1, V)                                    # [R, V]
    if 0 < top_k < V:
        drop = np.argpartition(-x, top_k - 1, axis=-1)[:, top_k:]   # O(V), no full sort
        np.put_along_axis(x, drop, -np.inf, axis=-1)
    if top_p < 1.0:
        p = _softmax(x)
        # The nucleus is a prefix of the sorted order: sort only the m most likely tokens,
        # growing m until they carry top_p in every row (usually a few dozen of a large vocab).
        m = min(64, V)
        while True:
            top = np.argpartition(-p, m - 1, axis=-1)[:, :m] if m < V else np.broadcast_to(np.arange(V), p.shape)
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(p, top, -1), axis=-1), -1)
            cum = np.cumsum(np.take_along_axis(p, top, -1), axis=-1)
            if m == V or (cum[:, -1] >= top_p).all():
                break
            m = 16 * m if 16 * m < V // 4 else V             # a wide nucleus: sort everything
        # keep position j while the mass before it is < top_p: the first prefix reaching top_p
        before = np.concatenate([np.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
        keep = np.zeros(x.shape, dtype=bool)
        np.put_along_axis(keep, top, before < top_p, axis=-1)
        x[~keep] = -np.inf
    if min_p > 0.0:
        # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p)
        x[x < x.max(axis=-1, keepdims=True) + np.log(min_p)] = -np.inf
    return x.reshape(shape)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Sampler:
    """Draws token ids from logits under `SamplingParams`; owns its random generator.

    __call__(logits [V] or [B, V], counts same shape or None) -> int or int64 [B].
    counts: how often each token id occurred so far (for the penalties).
    """

    def __init__(self, params: SamplingParams | None = None):
        self.params = params if params is not None else SamplingParams()
        self.rng = np.random.default_rng(self.params.seed)

    def __call__(self, logits: np.ndarray, counts: np.ndarray | None = None) -> int | np.ndarray:
        p = self.params
        logits = np.asarray(logits)
        if logits.ndim not in (1, 2) or logits.shape[-1] == 0:
            raise SamplingError(f"logits must be [V] or [B, V], got shape {logits.shape}")
        if np.isnan(logits).any() or np.isposinf(logits).any():  # softmax would turn +inf into NaN
            raise SamplingError("logits contain NaN or +inf (an overflow in the model?)")
        if np.isneginf(logits).all(axis=-1).any():  # -inf masks a token out; here every token is
            raise SamplingError("every logit of a row is -inf: no token can be drawn")
        x = apply_penalties(logits.astype(np.float64), counts, p.presence_penalty, p.frequency_penalty)
        x = apply_logit_bias(x, p.logit_bias)
        if p.temperature == 0:
            ids = x.argmax(axis=-1)
        else:
            x = filter_logits(x / p.temperature, p.top_k, p.top_p, p.min_p)
            ids = self._draw(_softmax(x))
        return int(ids) if logits.ndim == 1 else ids.astype(np.int64)

    def _draw(self, probs: np.ndarray) -> np.ndarray:
        """Inverse CDF: the first id whose cumulative probability exceeds u ~ U[0, 1)."""
        cdf = np.cumsum(probs, axis=-1)
        u = self.rng.random(probs.shape[:-1]) * cdf[..., -1]
        ids = (cdf <= u[..., None]).sum(axis=-1)
        # u rounding up to the total would give V: take the most likely token instead.
        return np.where(ids < probs.shape[-1], ids, probs.argmax(axis=-1))
