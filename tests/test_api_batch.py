"""Batched generation (`metastate.api.batch_generate`, and `DecodeBatch`, the one decode loop
under it, `stream_generate` and `metastate serve`): several prompts, each with its own state,
decoded together, must give what each prompt gives alone (`stream_generate`): the same tokens
(greedy, and sampled with a seed), text, finish reason and final state, on every backend; a
sequence that ends leaves the batch without changing the others, and one may join a running
batch.
"""

import numpy as np
import pytest
from test_generate import make_model

from metastate.api import (DecodeBatch, GenerationError, GenerationSequence, batch_generate, generate, load,
                           stream_generate)
from metastate_core.reference import rel_rms
from metastate_core.sampling import Sampler, SamplingParams

PROMPTS = [[5, 17, 42, 3, 99, 64, 8], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [99, 98]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("batch"))


def alone(engine, tok, prompt, n, state=None, **kw):
    """stream_generate's tokens, text, finish reason and last piece for one prompt."""
    pieces = list(stream_generate(engine, tok, prompt, n, state=state, **kw))
    ids = [r.token for r in pieces if r.token is not None]
    return ids, "".join(r.text for r in pieces), pieces[-1].finish_reason, pieces[-1]


def assert_same_as_alone(engine, tok, prompts, n, states=None, **kw):
    batch = batch_generate(engine, tok, prompts, n, states=states, **kw)
    assert len(batch) == len(prompts)
    for i, (prompt, got) in enumerate(zip(prompts, batch)):
        ids, text, reason, last = alone(engine, tok, prompt, n, None if states is None else states[i], **kw)
        assert (got.ids, got.text, got.finish_reason) == (ids, text, reason), i
        np.testing.assert_allclose(got.logits, last.logits, rtol=0, atol=1e-4 * np.abs(last.logits).max())
        mine, theirs = engine.state_to_arrays(got.state), engine.state_to_arrays(last.state)
        for name, a in theirs.items():
            assert rel_rms(mine[name], a) <= 1e-5, (i, name)
    return batch


@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
def test_greedy_batch_equals_one_by_one_on_every_backend(model, backend):
    path, _, _ = model
    engine, tok = load(path, backend)
    # prompts of different lengths, prefilled apart; one stop id makes some end early
    first = assert_same_as_alone(engine, None, PROMPTS, 12, temperature=0.0)
    stop = first[0].ids[2]
    batch = assert_same_as_alone(engine, None, PROMPTS, 12, temperature=0.0, stop_ids=[stop])
    assert batch[0].finish_reason == "eos" and len(batch[0].ids) == first[0].ids.index(stop)
    assert "length" in {c.finish_reason for c in batch}  # the others went on


def test_sampled_batch_equals_one_by_one_with_a_seed(model):
    path, _, _ = model
    engine, tok = load(path, "numpy")
    batch = assert_same_as_alone(engine, tok, ["the king", "my lord is", "the king"], 15,
                                 temperature=1.0, top_p=0.9, seed=11)
    assert batch[0].ids == batch[2].ids  # the same prompt and seed: the same draws


def test_text_stop_strings_and_lengths(model):
    path, _, _ = model
    engine, tok = load(path, "numpy")
    prompts = ["the king", "good night", "what is love", "me"]
    free = batch_generate(engine, tok, prompts, 20, temperature=0.0)
    stop = free[1].text[3:6]  # a string one sequence is known to produce
    batch = assert_same_as_alone(engine, tok, prompts, 20, temperature=0.0, stop=[stop])
    assert batch[1].finish_reason == "stop" and stop not in batch[1].text
    assert_same_as_alone(engine, tok, prompts, 0, temperature=0.0)  # nothing to decode


def test_each_sequence_continues_its_own_state(model):
    path, _, _ = model
    engine, tok = load(path, "torch")
    states = [None, engine.prefill([3, 4, 5])[1], engine.prefill([9] * 20)[1]]
    assert_same_as_alone(engine, None, [[1, 2], [6], [10, 11, 12]], 8, states=states, temperature=0.0)


def test_stack_and_select_states(model):
    path, _, _ = model
    for backend in ("numpy", "torch", "mlx"):
        engine, _ = load(path, backend)
        states = [engine.prefill(p)[1] for p in PROMPTS]
        stacked = engine.stack_states(states)
        for i, s in enumerate(states):
            one = engine.select_state(stacked, [i])
            for name, a in engine.state_to_arrays(s).items():
                np.testing.assert_array_equal(engine.state_to_arrays(one)[name], a)
        pair = engine.select_state(stacked, [3, 1])
        logits, _ = engine.step_batch([4, 4], pair)
        np.testing.assert_allclose(logits[0], engine.step(4, states[3])[0], rtol=0, atol=1e-4)
        np.testing.assert_allclose(logits[1], engine.step(4, states[1])[0], rtol=0, atol=1e-4)


def test_batch_errors(model):
    path, _, _ = model
    engine, tok = load(path, "numpy")
    assert batch_generate(engine, tok, [], 5) == []
    with pytest.raises(GenerationError, match="one state per prompt"):
        batch_generate(engine, tok, [[1], [2]], 3, states=[None])
    with pytest.raises(GenerationError, match="out of range"):
        batch_generate(engine, tok, [[1], [10**6]], 3)
    with pytest.raises(GenerationError, match="max_tokens"):
        batch_generate(engine, tok, [[1]], -1)
    with pytest.raises(GenerationError, match="list of prompts"):
        batch_generate(engine, tok, "the king", 3)


def test_decode_batch_joins_and_leaves_like_one_by_one(model):
    """Sequences join a running batch at different steps (as requests do in `metastate serve`)
    and leave it when done; each gives what it gives alone."""
    path, _, _ = model
    engine, tok = load(path, "numpy")
    prompts = ["the king", "my lord is good and", "what"]
    lengths = [6, 9, 4]
    batch = DecodeBatch(engine)
    seqs, texts = [], {}

    def join(i):
        ids = tok.encode(prompts[i])
        logits, state = engine.prefill(ids)
        seq = GenerationSequence(engine, tok, ids, logits, state, Sampler(SamplingParams(temperature=0.0)), (),
                                 {tok.eos_id}, lengths[i], 0.0)
        seqs.append(seq)
        batch.add(seq)

    join(0)
    for step in range(20):
        if step == 2:
            join(1)  # joins a running batch
        if step == 3:
            join(2)
        for d in batch.step():
            texts[id(d.seq)] = texts.get(id(d.seq), "") + "".join(p.text for p in d.pieces)
        if not len(batch) and step > 3:
            break
    assert [texts[id(s)] for s in seqs] == [generate(engine, tok, p, n, temperature=0.0)
                                            for p, n in zip(prompts, lengths)]
    assert all(s.reason == "length" and s.state is not None for s in seqs)


def test_decode_batch_remove_gives_each_its_own_state(model):
    path, _, _ = model
    engine, _ = load(path, "numpy")
    greedy = Sampler(SamplingParams(temperature=0.0))
    seqs = []
    for prompt in PROMPTS[:3]:
        logits, state = engine.prefill(prompt)
        seqs.append(GenerationSequence(engine, None, prompt, logits, state, greedy, max_tokens=5))
    batch = DecodeBatch(engine)
    batch.add(*seqs)
    batch.step()
    batch.remove([seqs[1]])
    assert batch.seqs == [seqs[0], seqs[2]]
    _, expected = engine.prefill(PROMPTS[1] + seqs[1].ids)
    for name, a in engine.state_to_arrays(expected).items():
        assert rel_rms(engine.state_to_arrays(seqs[1].state)[name], a) <= 1e-5, name
    batch.remove([seqs[1]])  # no longer in the batch: nothing happens
    assert len(batch) == 2
