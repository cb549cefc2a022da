"""Product-key parameter tokens on the MLX backend (SPEC section 7): backends/mlx/product_keys.py
against the NumPy reference (selection, tie rule, readout, gradients), its Metal gather-sum
through the CPU harness (tests/metal_harness) or on Apple silicon, and whole product-mode
models once backends/mlx/model.py reads parameter tokens through `Kernels.pk`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from backends.mlx import product_keys as pk  # noqa: E402
from metastate_core.reference import product_select, rel_rms  # noqa: E402

# (m, P, k): m and k not powers of two, k > m, k = 1, k = m*m, P > 1
SHAPES = [(5, 2, 3), (7, 3, 10), (6, 1, 1), (3, 2, 9), (9, 4, 6)]
B, T, D = 2, 3, 10


def mxa(x, dtype=mx.float32):
    return mx.array(np.asarray(x, np.float32)).astype(dtype)


def to_np(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


def reference_readout(u, sub_keys, values, k):
    score, token = product_select(u, sub_keys, k)
    return np.einsum("btpk,btpkd->btd", np.maximum(score, 0) ** 2, values[token])


def brute_force(u, sub_keys, k):
    """Each head's top k of all m*m sums, ties to the smaller token: (score, token) [B, T, P, k]."""
    P, _, m, h = sub_keys.shape
    sL = np.einsum("btc,pic->btpi", u[..., :h], sub_keys[:, 0])
    sR = np.einsum("btc,pjc->btpj", u[..., h:], sub_keys[:, 1])
    full = (sL[..., :, None] + sR[..., None, :]).reshape(*sL.shape[:-1], m * m)
    token = np.argsort(-full, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(full, token, -1), token


def case(rng, m, P, d=D):
    u = rng.standard_normal((B, T, d))
    sub_keys = rng.standard_normal((P, 2, m, d // 2)) / np.sqrt(d)
    values = rng.standard_normal((m * m, d))
    return u, sub_keys, values


# --- selection --------------------------------------------------------------------------

@pytest.mark.parametrize("m, P, k", SHAPES)
def test_select_matches_reference(m, P, k):
    u, sub_keys, _ = case(np.random.default_rng(m * 100 + k), m, P)
    score, token = pk.select(mxa(u), mxa(sub_keys), k)
    ref_score, ref_token = product_select(u, sub_keys, k)
    assert score.dtype == mx.float32 and token.dtype == mx.int32 and token.shape == (B, T, P, k)
    np.testing.assert_array_equal(np.array(token), ref_token)       # same set, same order
    assert rel_rms(to_np(score), ref_score) <= 1e-5
    np.testing.assert_array_equal(ref_token, brute_force(u, sub_keys, k)[1])


def tied_keys(m, P, d):
    """Sub-keys that tie: the odd rows (and the last and the first) equal on the left, zero odd
    rows on the right, so blocks of candidates have equal sums across the top-k boundaries.
    Multiples of 1/8: every product and sum is exact in float32, in any order."""
    K = np.round(np.random.default_rng(7).standard_normal((P, 2, m, d // 2)) * 8) / 8
    K[:, 0, 1::2] = K[:, 0, 1:2]
    K[:, 0, m - 1] = K[:, 0, 0]
    K[:, 1, 1::2] = 0.0
    K[:, 1, 2] = K[:, 1, 0]
    return K


@pytest.mark.parametrize("m, P, k", SHAPES)
def test_tie_rule_on_constructed_ties(m, P, k):
    """Scores constructed to tie (equal and zero sub-key rows; a zero query ties everything):
    the smaller index wins in the halves and among the candidates, as in the reference and a
    brute-force stable top-k over all m*m sums."""
    d = 8
    rng = np.random.default_rng(3)
    K = tied_keys(m, P, d)
    u = np.round(rng.standard_normal((B, T, d)) * 4) / 4             # few distinct products
    u[0, 0] = 0.0                                                     # every score 0
    u[1, 2, d // 2:] = 0.0                                            # the right half ties
    score, token = pk.select(mxa(u), mxa(K), k)
    ref_score, ref_token = product_select(u, K, k)
    np.testing.assert_array_equal(np.array(token), ref_token)
    np.testing.assert_array_equal(ref_token, brute_force(u, K, k)[1])
    np.testing.assert_array_equal(np.array(token)[0, 0, 0], np.sort(brute_force(u, K, k)[1][0, 0, 0]))
    assert rel_rms(to_np(score), ref_score) <= 1e-6


def test_argsort_is_stable_on_ties():
    """The tie rule rests on mx.argsort keeping equal values in index order (on this device),
    past one Metal sort block and for -0.0 against 0.0."""
    x = np.random.default_rng(0).integers(0, 3, (3, 5000)).astype(np.float32)
    x[0, ::7] = -0.0
    np.testing.assert_array_equal(np.array(mx.argsort(mx.array(-x), axis=-1)),
                                  np.argsort(-x, axis=-1, kind="stable"))
    np.testing.assert_array_equal(np.array(pk.top(mx.zeros((2, 9)), 4)), [[0, 1, 2, 3]] * 2)


# --- readout ----------------------------------------------------------------------------

@pytest.mark.parametrize("m, P, k", SHAPES)
def test_select_then_weighted_rows_match_reference(m, P, k):
    u, sub_keys, values = case(np.random.default_rng(m + k), m, P)
    score, token = pk.select(mxa(u), mxa(sub_keys), k)
    out = pk.weighted_rows(mxa(values), token, mx.square(mx.maximum(score, 0)))
    assert out.dtype == mx.float32 and out.shape == (B, T, D)
    assert rel_rms(to_np(out), reference_readout(u, sub_keys, values, k)) <= 1e-5


def test_a_token_chosen_by_two_heads_counts_twice():
    u, sub_keys, values = case(np.random.default_rng(1), 5, 1)
    twice = np.concatenate([sub_keys, sub_keys])                      # P = 2, identical heads
    one = pk.weighted_rows(mxa(values), *_selected(u, sub_keys, 4))
    two = pk.weighted_rows(mxa(values), *_selected(u, twice, 4))
    assert rel_rms(to_np(two), 2 * to_np(one)) <= 1e-6
    token = mx.array(np.full((1, 1, 2, 1), 3, np.int32))             # the same row, weights 1 and 2
    got = pk.weighted_rows(mxa(values), token, mxa(np.array([1.0, 2.0]).reshape(1, 1, 2, 1)))
    np.testing.assert_allclose(np.array(got)[0, 0], 3 * values[3].astype(np.float32), rtol=1e-6)


def _selected(u, sub_keys, k):
    score, token = pk.select(mxa(u), mxa(sub_keys), k)
    return token, mx.square(mx.maximum(score, 0))


def test_weighted_rows_of_a_quantized_table():
    """Rows gathered from mx.quantize's packed table (groups along d) and dequantized equal the
    rows of the dequantized table; the Metal entry point takes the same plain path."""
    rng = np.random.default_rng(2)
    values = mxa(rng.standard_normal((40, 64)))
    q, s, b = mx.quantize(values, group_size=32, bits=4)
    token = mx.array(rng.integers(0, 40, (2, 3, 2, 5)).astype(np.int32))
    weight = mxa(rng.random((2, 3, 2, 5)))
    quant = dict(scales=s, biases=b, group_size=32, bits=4)
    want = pk.weighted_rows(mx.dequantize(q, s, b, group_size=32, bits=4), token, weight)
    for f in (pk.weighted_rows, pk.metal_weighted_rows):
        assert rel_rms(np.array(f(q, token, weight, **quant)), np.array(want)) <= 1e-6


# --- gradients --------------------------------------------------------------------------

def _finite_differences(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[i] += eps
        lo[i] -= eps
        g[i] = (f(hi) - f(lo)) / (2 * eps)
    return g


@pytest.mark.parametrize("m, P, k", [(5, 2, 3), (3, 2, 9)])
def test_gradients_match_reference_finite_differences(m, P, k):
    """d loss / d (u, sub_keys, values) through the kept scores and rows only, vs central
    differences of the float64 reference (the selection does not move at eps = 1e-6)."""
    rng = np.random.default_rng(11)
    u, sub_keys, values = case(rng, m, P, d=6)
    g = rng.standard_normal((B, T, 6))

    def loss(u, sub_keys, values):
        score, token = pk.select(u, sub_keys, k)
        return (pk.weighted_rows(values, token, mx.square(mx.maximum(score, 0))) * mxa(g)).sum()

    grads = mx.grad(loss, argnums=(0, 1, 2))(mxa(u), mxa(sub_keys), mxa(values))
    ref = (lambda x: (reference_readout(x, sub_keys, values, k) * g).sum(),
           lambda x: (reference_readout(u, x, values, k) * g).sum(),
           lambda x: (reference_readout(u, sub_keys, x, k) * g).sum())
    for name, got, f, x in zip(("u", "sub_keys", "values"), grads, ref, (u, sub_keys, values)):
        want = _finite_differences(f, x)
        assert got.shape == x.shape and rel_rms(to_np(got), want) <= 1e-3, name
    untouched = np.setdiff1d(np.arange(m * m), product_select(u, sub_keys, k)[1])
    assert not np.array(grads[2])[untouched].any()                   # value rows never selected


# --- the Metal gather-sum ---------------------------------------------------------------

@pytest.fixture(params=["harness", "metal"])
def launch(request, monkeypatch):
    """Who runs the Metal kernel. Yields the harness's call log (None on Metal)."""
    if request.param == "metal":
        if not mx.metal.is_available():
            pytest.skip("real Metal kernels need Apple silicon (mx.metal.is_available() is False)")
        yield None
    else:
        if shutil.which("g++") is None:
            pytest.skip("the CPU harness needs g++")
        from metal_harness import mlx_launch

        fake = mlx_launch(pk.KERNEL_SOURCES, pk.KERNEL_IO)
        monkeypatch.setattr(pk, "_launch", fake)
        yield fake.calls


@pytest.mark.parametrize("n, d, lead, PK", [(25, 10, (2, 3), (2, 4)), (49, 300, (2, 2), (3, 5)),
                                            (9, 6, (1, 1), (1, 3))])
def test_metal_weighted_rows_matches_plain(launch, n, d, lead, PK):
    """float32 and bfloat16 tables; d = 300 spans two threadgroups per row (256 + a partial
    44); the last case has inputs under 8 elements (MLX's `constant` address space)."""
    rng = np.random.default_rng(d)
    values = rng.standard_normal((n, d))
    token = rng.integers(0, n, (*lead, *PK)).astype(np.int32)
    token[..., 1] = token[..., 0]                                     # a row selected twice
    weight = mxa(rng.random((*lead, *PK)))
    want64 = np.einsum("...pk,...pkd->...d", np.array(weight, np.float64), values[token])
    token = mx.array(token)
    for dt in (mx.float32, mx.bfloat16):
        got = pk.metal_weighted_rows(mxa(values, dt), token, weight)
        plain = pk.weighted_rows(mxa(values, dt), token, weight)
        assert got.dtype == mx.float32 and got.shape == (*lead, d)
        assert rel_rms(np.array(got), np.array(plain)) <= 1e-6, dt     # both sum in float32
        assert rel_rms(np.array(got), want64) <= (1e-5 if dt == mx.float32 else 3e-2), dt
    if launch is not None:
        R = int(np.prod(lead))
        assert launch == [("pk_weighted_rows", (("VT", dt),), (d, R, 1), (min(d, 256), 1, 1))
                          for dt in (mx.float32, mx.bfloat16)]


def test_metal_weighted_rows_gradients_match_plain_autograd(launch):
    rng = np.random.default_rng(5)
    n, d = 30, 12
    values, weight = mxa(rng.standard_normal((n, d))), mxa(rng.random((B, T, 3, 4)))
    token = mx.array(rng.integers(0, n, (B, T, 3, 4)).astype(np.int32))
    g = mxa(rng.standard_normal((B, T, d)))

    def loss(f):
        return lambda values, weight: (f(values, token, weight) * g).sum()

    got = mx.grad(loss(pk.metal_weighted_rows), argnums=(0, 1))(values, weight)
    want = mx.grad(loss(pk.weighted_rows), argnums=(0, 1))(values, weight)
    for name, a, b in zip(("values", "weight"), got, want):
        assert a.shape == b.shape and rel_rms(np.array(a), np.array(b)) <= 1e-6, name


def test_metal_problem_runs_the_kernel_against_the_plain_ops(launch):
    class Doubled:
        select = staticmethod(pk.select)
        weighted_rows = staticmethod(lambda *args, **kw: 2 * pk.metal_weighted_rows(*args, **kw))

    class Rejected:
        def weighted_rows(*args, **kw):
            raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: ...")

    pk.metal_problem.cache_clear()
    try:
        assert pk.metal_problem(pk.Metal) is None
        assert "weighted_rows differs from the plain ops" in pk.metal_problem(Doubled)
        assert pk.metal_problem(Rejected) == "RuntimeError: [metal::Device] Unable to build metal library from source"
        if launch is not None:
            assert launch[0][0] == "pk_weighted_rows"
    finally:
        pk.metal_problem.cache_clear()


@pytest.mark.skipif(mx.metal.is_available(), reason="Metal is available here")
def test_without_metal_the_kernel_refuses():
    from backends.mlx.kernels import MetalKernelError

    with pytest.raises(MetalKernelError, match="Apple silicon"):
        pk.metal_weighted_rows(mx.zeros((4, 8)), mx.zeros((1, 1, 1, 2), mx.int32), mx.ones((1, 1, 1, 2)))
    with pytest.raises(MetalKernelError, match="values \\[n, d\\]"):
        pk.metal_weighted_rows(mx.zeros((4, 8)), mx.zeros((1, 1, 1, 2), mx.int32), mx.ones((1, 1, 2, 1)))


# --- whole product-mode models (needs the product branch of backends/mlx/model.py) ---------

def _product_model_support():
    from backends.mlx import model as mlx_model

    return "pk" in {f.name for f in __import__("dataclasses").fields(mlx_model.Kernels)}


needs_model = pytest.mark.skipif(not _product_model_support(),
                                 reason="backends/mlx/model.py has no Kernels.pk yet (product branch of MetaLayer)")


def product_config():
    from metastate_core.config import ModelConfig

    return ModelConfig(vocab_size=150, d_model=64, n_layer=2, head_size=16, d_att=96, sse_heads=2,
                       param_mode="product", n_sub_keys=7, param_heads=3, param_topk=10)


@needs_model
@pytest.mark.parametrize("kernels", ["ops", "metal"])
def test_product_model_matches_reference(kernels, monkeypatch):
    """Prefill then decode against one float64 reference pass (float32 bounds of SPEC 6); with
    kernels="metal" the WKV and gather-sum bodies run through the CPU harness off a Mac."""
    from backends.mlx import Model
    from backends.mlx import kernels as metal
    from backends.mlx import model as mlx_model
    from metastate_core.params import random_params
    from metastate_core.reference import forward

    cfg = product_config()
    weights = random_params(cfg, 0)
    if kernels == "metal":
        if not mx.metal.is_available():
            if shutil.which("g++") is None:
                pytest.skip("the Metal CPU harness needs g++")
            from metal_harness import mlx_launch

            monkeypatch.setattr(metal, "_launch", mlx_launch(metal.KERNEL_SOURCES, metal.KERNEL_IO))
            monkeypatch.setattr(pk, "_launch", mlx_launch(pk.KERNEL_SOURCES, pk.KERNEL_IO))
        kernels = mlx_model.metal_kernels()
    model = Model.from_tensors(cfg, {k: v.astype(np.float32) for k, v in weights.items()}, kernels=kernels)
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 19))
    ref, ref_state = forward(weights, cfg, toks)
    logits, state = model(mx.array(toks[:, :17].astype(np.int32)))
    parts = [np.array(logits)]
    for t in (17, 18):
        logits, state = model(mx.array(toks[:, t:t + 1].astype(np.int32)), state)
        parts.append(np.array(logits))
    assert rel_rms(np.concatenate(parts, axis=1), ref) <= 1e-4
    assert rel_rms(np.array(state.wkv), ref_state.wkv) <= 1e-4
    steps, state = [], None                                           # the recurrent path alone
    for t in range(6):
        logits, state = model(mx.array(toks[:, t:t + 1].astype(np.int32)), state)
        steps.append(np.array(logits))
    assert rel_rms(np.concatenate(steps, axis=1), forward(weights, cfg, toks[:, :6])[0]) <= 1e-5
    if kernels != "ops" and not mx.metal.is_available():
        assert {c[0] for c in pk._launch.calls} == {"pk_weighted_rows"}


@needs_model
def test_product_model_bfloat16():
    """Against the reference run on the same bfloat16-rounded weights: rounding the weights moves
    near-tied scores across the top-k boundary (vs the float64 weights: 2.6e-2 here, a different
    selection), rounding the compute does not."""
    import ml_dtypes

    from backends.mlx import Model
    from metastate_core.params import random_params
    from metastate_core.reference import forward

    cfg = product_config()
    weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_params(cfg, 0).items()}
    model = Model.from_tensors(cfg, weights, kernels="ops")
    toks = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 12))
    ref = forward({k: v.astype(np.float64) for k, v in weights.items()}, cfg, toks)[0]
    err = rel_rms(np.array(model(mx.array(toks.astype(np.int32)))[0]), ref)
    assert 1e-4 < err <= 3e-2  # really bfloat16 (3.2e-3 measured), within the spec's bound


@needs_model
def test_product_model_falls_back_when_the_gather_kernel_fails(monkeypatch):
    """As for the WKV kernels (test_mlx_model): "auto" checks the Metal gather-sum at load
    (product_keys.metal_problem) and runs on the plain ops, with a warning, when it fails."""
    from dataclasses import replace

    from backends.mlx import Model
    from backends.mlx import model as mlx_model
    from metastate_core.errors import MetaStateError
    from metastate_core.params import random_params

    class Doubled:
        select = staticmethod(pk.select)
        weighted_rows = staticmethod(lambda *args, **kw: 2 * pk.weighted_rows(*args, **kw))

    cfg = product_config()
    weights = {k: v.astype(np.float32) for k, v in random_params(cfg, 0).items()}
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mlx_model, "metal_kernels", lambda: replace(mlx_model.OPS, name="metal", pk=Doubled))
    with pytest.warns(UserWarning, match="weighted_rows differs from the plain ops"):
        model = Model.from_tensors(cfg, weights, kernels="auto")
    assert model.kernels == "ops"
    with pytest.raises(MetaStateError, match="weighted_rows differs"):
        Model.from_tensors(cfg, weights, kernels="metal")


@needs_model
def test_quantized_product_model(tmp_path):
    """Product models quantize their value tables (groups along d; the selected rows are
    dequantized after the gather); sub_keys stay in full precision. Saved and loaded as stored."""
    from backends.mlx import Model, load, quantize, save
    from metastate_core.params import random_params
    from metastate_core.reference import forward

    cfg = product_config()
    weights = random_params(cfg, 0)
    model = quantize(Model.from_tensors(cfg, {k: v.astype(np.float32) for k, v in weights.items()},
                                        kernels="ops"), bits=8, group_size=32)
    meta = model.blocks[0].meta
    assert meta.param_values.dtype == mx.uint32 and meta.sub_keys.dtype == mx.float32
    toks = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 12))
    logits = np.array(model(mx.array(toks.astype(np.int32)))[0])
    assert 1e-4 < rel_rms(logits, forward(weights, cfg, toks)[0]) <= 2e-2
    save(model, tmp_path / "q8")
    again, _ = load(tmp_path / "q8", kernels="ops")
    np.testing.assert_array_equal(np.array(again(mx.array(toks.astype(np.int32)))[0]), logits)
