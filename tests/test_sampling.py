"""Sampling: parameter checks, greedy, each filter on hand-built distributions, penalties,
and the empirical distribution of many draws against an independent computation."""

import numpy as np
import pytest

from metastate_core.errors import MetaStateError
from metastate_core.sampling import (Sampler, SamplingError, SamplingParams, apply_penalties,
                                     filter_logits)


def kept(x):
    return set(np.flatnonzero(np.isfinite(x)).tolist())


@pytest.mark.parametrize("kw", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.01),
    dict(top_k=-1), dict(top_k=2.5), dict(min_p=-0.01), dict(min_p=1.5),
    dict(presence_penalty=float("inf")), dict(seed=-3),
    dict(logit_bias=[1]), dict(logit_bias={-1: 1.0}), dict(logit_bias={1: 100.5}), dict(logit_bias={1: float("nan")}),
    dict(logit_bias={True: 1.0}), dict(logit_bias={1.0: 1.0}), dict(logit_bias={1: "1"}),
])
def test_invalid_params_raise(kw):
    with pytest.raises(SamplingError):
        SamplingParams(**kw)
    assert issubclass(SamplingError, MetaStateError)


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 500)).astype(np.float32)
    want = logits.argmax(-1)
    greedy = Sampler(SamplingParams(temperature=0, seed=1))
    topk1 = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=2))
    np.testing.assert_array_equal(greedy(logits), want)
    np.testing.assert_array_equal(topk1(logits), want)
    for row, w in zip(logits, want):
        a, b = greedy(row), topk1(row)
        assert type(a) is int and a == w and b == w


def test_top_k_keeps_k_largest():
    x = np.log([0.1, 0.35, 0.2, 0.3, 0.05])
    assert kept(filter_logits(x, top_k=2)) == {1, 3}
    assert kept(filter_logits(x, top_k=4)) == {0, 1, 2, 3}


def test_top_p_keeps_smallest_set_reaching_mass():
    # probs 0.1, 0.4, 0.2, 0.3 -> sorted 0.4 (id 1), 0.3 (id 3), 0.2 (id 2), 0.1 (id 0);
    # cumulative 0.4, 0.7, 0.9, 1.0
    x = np.log([0.1, 0.4, 0.2, 0.3])
    assert kept(filter_logits(x, top_p=0.3)) == {1}            # 0.4 >= 0.3
    assert kept(filter_logits(x, top_p=0.65)) == {1, 3}        # 0.7 >= 0.65
    assert kept(filter_logits(x, top_p=0.75)) == {1, 2, 3}     # 0.7 < 0.75 <= 0.9
    assert kept(filter_logits(x, top_p=0.95)) == {0, 1, 2, 3}
    assert kept(filter_logits(x, top_p=0.01)) == {1}           # argmax always kept
    out = filter_logits(x, top_p=0.65)
    np.testing.assert_array_equal(out[[1, 3]], x[[1, 3]])     # survivors unchanged


def test_top_p_sees_top_k_renormalised():
    # top_k=3 leaves 0.4, 0.3, 0.2 -> renormalised 4/9, 3/9, 2/9; cumulative 0.444, 0.778.
    # top_p=0.75 then stops after two tokens (on the raw probs 0.4+0.3 = 0.7 it would need three).
    x = np.log([0.4, 0.3, 0.2, 0.1])
    assert kept(filter_logits(x, top_k=3, top_p=0.75)) == {0, 1}


def test_min_p_drops_below_fraction_of_max():
    x = np.log([0.5, 0.25, 0.15, 0.1])
    assert kept(filter_logits(x, min_p=0.25)) == {0, 1, 2}     # threshold 0.125
    assert kept(filter_logits(x, min_p=0.4)) == {0, 1}         # threshold 0.2
    assert kept(filter_logits(x, min_p=1.0)) == {0}
    assert kept(filter_logits(x, min_p=0.0)) == {0, 1, 2, 3}


def test_filter_batch_rows_independent_and_input_untouched():
    x = np.log(np.array([[0.1, 0.4, 0.2, 0.3], [0.4, 0.3, 0.2, 0.1]], dtype=np.float32))
    x0 = x.copy()
    out = filter_logits(x, top_p=0.65)
    assert kept(out[0]) == {1, 3} and kept(out[1]) == {0, 1}
    np.testing.assert_array_equal(x, x0)


def test_penalties_formula():
    logits = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    counts = np.array([0, 1, 3, 0])
    # presence 0.5 on ids 1, 2; frequency 0.2 * count: 2 - 0.5 - 0.2, 3 - 0.5 - 0.6
    np.testing.assert_allclose(apply_penalties(logits, counts, 0.5, 0.2), [1.0, 1.3, 1.9, 4.0], rtol=1e-6)
    np.testing.assert_array_equal(apply_penalties(logits, None, 0.5, 0.2), logits)
    with pytest.raises(SamplingError):
        apply_penalties(logits, np.zeros(3), 0.5, 0.2)
    # greedy follows the penalised logits: 2.0 - 0.2 < 1.9
    s = Sampler(SamplingParams(temperature=0, presence_penalty=0.2))
    assert s(np.array([2.0, 1.9], np.float32)) == 0
    assert s(np.array([2.0, 1.9], np.float32), counts=np.array([1, 0])) == 1


def test_batch_returns_ids_per_row():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 40)).astype(np.float32)
    counts = np.zeros((5, 40), np.int64)
    counts[np.arange(5), logits.argmax(-1)] = 1
    out = Sampler(SamplingParams(temperature=0, frequency_penalty=100.0))(logits, counts)
    assert out.shape == (5,) and out.dtype == np.int64
    want = np.argsort(logits, axis=-1)[:, -2]                  # the runner-up of each row
    np.testing.assert_array_equal(out, want)
    out = Sampler(SamplingParams(seed=0))(logits)
    assert out.shape == (5,) and ((0 <= out) & (out < 40)).all()


def test_bad_shapes_raise():
    s = Sampler(SamplingParams())
    with pytest.raises(SamplingError):
        s(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(SamplingError):
        s(np.array([0.0, np.nan], np.float32))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_infinite_logits(temperature):
    """-inf masks a token out at any temperature; +inf (an overflow) and a row with nothing left
    are errors, never a silent token 0."""
    s = Sampler(SamplingParams(temperature=temperature, seed=0))
    masked = np.array([5.0, -np.inf, 1.0, -np.inf], np.float32)
    assert {s(masked) for _ in range(50)} <= {0, 2}
    assert s(np.array([-np.inf, -np.inf, 3.0], np.float32)) == 2
    with pytest.raises(SamplingError, match=r"\+inf"):
        s(np.array([0.0, np.inf, 1.0], np.float32))
    with pytest.raises(SamplingError, match="every logit of a row is -inf"):
        s(np.array([[0.0, 1.0], [-np.inf, -np.inf]], np.float32))


def test_same_seed_same_sequence():
    logits = np.random.default_rng(5).normal(size=1000).astype(np.float32)
    a, b, c = (Sampler(SamplingParams(seed=s, top_p=0.9)) for s in (7, 7, 8))
    sa, sb, sc = ([s(logits) for _ in range(50)] for s in (a, b, c))
    assert sa == sb and sa != sc


def expected_probs(logits, temperature, top_k, top_p, min_p):
    """Independent, loop-based version of the documented pipeline."""
    z = [v / temperature for v in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    alive = order[:top_k] if top_k else order
    p = np.exp([z[i] for i in alive]); p /= p.sum()
    keep, mass = [], 0.0
    for i, pi in zip(alive, p):
        keep.append(i)
        mass += pi
        if mass >= top_p:
            break
    pmax = max(np.exp(z[i]) for i in keep)
    keep = [i for i in keep if np.exp(z[i]) >= min_p * pmax]
    w = np.zeros(len(z))
    w[keep] = np.exp([z[i] for i in keep])
    return w / w.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 6, 0.9, 0.05), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.2)])
def test_empirical_frequencies_match_filtered_softmax(temperature, top_k, top_p, min_p):
    logits = np.array([1.2, -0.3, 0.8, 2.0, 0.1, -1.0, 0.5, 1.6, -2.0, 0.0], np.float32)
    want = expected_probs(logits.astype(np.float64), temperature, top_k, top_p, min_p)
    n = 20000
    s = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=11))
    ids = s(np.broadcast_to(logits, (n, logits.size)))
    freq = np.bincount(ids, minlength=logits.size) / n
    assert (freq[want == 0] == 0).all()                        # filtered tokens never drawn
    # sd of a frequency <= sqrt(0.25 / 20000) = 0.0035; 0.015 is over 4 sd
    assert np.abs(freq - want).max() < 0.015
    # and one-at-a-time calls draw from the same distribution
    one = np.bincount([s(logits) for _ in range(1000)], minlength=logits.size) / 1000
    assert (one[want == 0] == 0).all() and np.abs(one - want).max() < 0.065    # sd <= 0.016


@pytest.mark.parametrize("scale", [0.3, 3.0, 10.0])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_top_p_large_vocab_matches_full_sort(scale, top_p):
    # nuclei from a handful to thousands of tokens: exercises the partial-sort growth
    x = np.random.default_rng(1).normal(size=5000) * scale
    p = np.exp(x - x.max()); p /= p.sum()
    order = np.argsort(-p)
    n = 1
    while p[order[:n]].sum() < top_p:
        n += 1
    assert kept(filter_logits(x, top_p=top_p)) == set(order[:n].tolist())


def test_logit_bias_is_added_to_the_logits():
    logits = np.array([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.0]])
    greedy = Sampler(SamplingParams(temperature=0, logit_bias={2: 1.6, 3: -0.5}))
    assert greedy(logits).tolist() == [2, 1]  # 0.5 + 1.6 > 2.0; 2.0 - 0.5 < 3.0
    assert Sampler(SamplingParams(temperature=0, logit_bias={1: -100})).__call__(logits[1]) == 3
    drawn = Sampler(SamplingParams(temperature=1.0, seed=0, logit_bias={3: 100}))
    assert all(drawn(logits[0]) == 3 for _ in range(50))  # e^-96 for the others: never
    assert logits[0, 2] == 0.5  # the input is not modified
    with pytest.raises(SamplingError, match="past the vocabulary"):
        Sampler(SamplingParams(logit_bias={4: 1.0}))(logits)
