"""Generation on the MLX model: prefill through the sequence path, then decode.

Sampling is the shared `metastate_core.sampling` (NumPy), so every backend draws the same
tokens from the same logits and seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx
import numpy as np

from metastate_core.sampling import Sampler, SamplingParams

from .model import Cache, Model, ModelError

PREFILL_STEP = 512  # prompt tokens per model call: bounds prefill memory whatever the prompt length


def prefill(model: Model, prompt_ids: Sequence[int], cache: Cache, step: int = PREFILL_STEP) -> mx.array:
    """Run the prompt [T] through the model in pieces of `step` tokens; logits [V] of the last one."""
    ids = mx.array(np.asarray(prompt_ids, dtype=np.int32))[None]
    for start in range(0, ids.shape[1], step):
        logits = model(ids[:, start:start + step], cache)
        mx.eval(logits, cache.state)  # materialise the state so each piece's graph is freed
    return logits[0, -1]


def stream_generate(model: Model, tokenizer, prompt_ids: Sequence[int], max_tokens: int,
                    sampler: Sampler | SamplingParams | None = None, *,
                    stop_ids: Sequence[int] | None = None,
                    prefill_step: int = PREFILL_STEP) -> Iterator[int]:
    """Yield up to `max_tokens` sampled token ids after `prompt_ids` (non-empty, [T]).

    sampler: a `Sampler`, `SamplingParams`, or None for greedy. Penalties count the generated
    tokens. Generation stops before yielding a stop id: `stop_ids`, or by default the
    tokenizer's eos_id (none when tokenizer is None).
    """
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    V = model.args.vocab_size
    if prompt.size == 0:
        raise ModelError("generation needs a non-empty prompt")
    if prompt.min() < 0 or prompt.max() >= V:
        raise ModelError(f"prompt token id out of range for vocab_size {V}")
    if not isinstance(sampler, Sampler):
        sampler = Sampler(sampler if sampler is not None else SamplingParams(temperature=0.0))
    if stop_ids is None:
        eos = getattr(tokenizer, "eos_id", None)
        stop_ids = () if eos is None else (eos,)
    stop = set(int(i) for i in stop_ids)
    counts = np.zeros(V, np.int64)
    cache = model.make_cache()
    logits = prefill(model, prompt, cache, prefill_step)
    for n in range(max_tokens):
        token = int(sampler(np.array(logits.astype(mx.float32)), counts))
        if token in stop:
            return
        yield token
        counts[token] += 1
        if n + 1 < max_tokens:  # no decode step for a token nobody asks for
            logits = model(mx.array([[token]], dtype=mx.int32), cache)[0, -1]
            mx.eval(logits, cache.state)


def generate(model: Model, tokenizer, prompt_ids: Sequence[int], max_tokens: int,
             sampler: Sampler | SamplingParams | None = None, **kwargs) -> list[int]:
    """The ids `stream_generate` yields, as a list."""
    return list(stream_generate(model, tokenizer, prompt_ids, max_tokens, sampler, **kwargs))


