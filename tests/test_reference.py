"""The NumPy reference against itself: chunked vs recurrent form, state carry, batching."""

import numpy as np
import pytest

from metastate_core.chunked import ChunkedWKV
from metastate_core.config import ConfigError, ModelConfig
from metastate_core.params import param_shapes, random_params
from metastate_core.reference import RecurrentWKV, State, forward, l2_normalize


from metastate_core.reference import rel_rms  # noqa: E402  (SPEC section 6)


def small_config(**kw):
    base = dict(vocab_size=61, d_model=64, n_layer=3, head_size=16, d_att=96, sse_heads=2,
                n_param_tokens=80, lora_w=8, lora_a=8, lora_v=8, lora_g=16)
    base.update(kw)
    return ModelConfig(**base)


def random_wkv_inputs(rng, B, T, H, N):
    w = np.exp(-0.6065306597126334 / (1 + np.exp(-3 * rng.standard_normal((B, T, H, N)))))
    k, v, q = (rng.standard_normal((B, T, H, N)) for _ in range(3))
    kk = l2_normalize(rng.standard_normal((B, T, H, N)))
    a = rng.random((B, T, H, N))
    S0 = rng.standard_normal((B, H, N, N))
    return S0, w, k, v, kk, a, q


def test_recurrent_wkv_follows_the_spec_update_rule():
    # Written out element by element from SPEC section 2, independently of the vectorised code.
    rng = np.random.default_rng(0)
    S0, w, k, v, kk, a, q = random_wkv_inputs(rng, 1, 3, 1, 4)
    S = S0[0, 0].copy()
    for t in range(3):
        sa = [sum(S[i, j] * -kk[0, t, 0, j] for j in range(4)) for i in range(4)]
        S = np.array([[S[i, j] * w[0, t, 0, j] + sa[i] * kk[0, t, 0, j] * a[0, t, 0, j]
                       + v[0, t, 0, i] * k[0, t, 0, j] for j in range(4)] for i in range(4)])
    scan = RecurrentWKV(S0, w, k, v, kk, a)
    np.testing.assert_allclose(scan.final_state[0, 0], S, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(scan.read(q)[0, -1, 0], S @ q[0, -1, 0], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("T,chunk", [(64, 16), (45, 16), (45, 7), (13, 64), (1, 16), (50, 1), (100, 64)])
def test_chunked_equals_recurrent_float64(T, chunk):
    rng = np.random.default_rng(T * 100 + chunk)
    S0, w, k, v, kk, a, q = random_wkv_inputs(rng, 2, T, 3, 16)
    rec = RecurrentWKV(S0, w, k, v, kk, a)
    chk = ChunkedWKV(S0, w, k, v, kk, a, chunk)
    assert rel_rms(chk.final_state, rec.final_state) <= 1e-10
    assert rel_rms(chk.read(q), rec.read(q)) <= 1e-10
    # a second query set over the first heads only, as the SSE reads
    assert rel_rms(chk.read(q[:, :, :2]), rec.read(q[:, :, :2])) <= 1e-10


def test_chunked_saves_the_state_at_each_chunk_start():
    rng = np.random.default_rng(3)
    S0, w, k, v, kk, a, _ = random_wkv_inputs(rng, 1, 40, 2, 8)
    rec = RecurrentWKV(S0, w, k, v, kk, a)
    chk = ChunkedWKV(S0, w, k, v, kk, a, 16)
    np.testing.assert_allclose(chk.states[:, :, 0], S0)
    np.testing.assert_allclose(chk.states[:, :, 1], rec.states[15], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(chk.states[:, :, 2], rec.states[31], rtol=1e-10, atol=1e-10)


def test_chunk_size_is_bounded():
    rng = np.random.default_rng(0)
    S0, w, k, v, kk, a, _ = random_wkv_inputs(rng, 1, 4, 1, 4)
    with pytest.raises(ValueError):
        ChunkedWKV(S0, w, k, v, kk, a, 128)


@pytest.mark.parametrize("d_att,sse_heads", [(96, 2), (64, 4), (128, 0)])
def test_model_chunked_equals_recurrent(d_att, sse_heads):
    cfg = small_config(d_att=d_att, sse_heads=sse_heads)
    p = random_params(cfg, 1)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, (2, 37))
    state = State.zeros(cfg, 2)
    state.wkv[:] = rng.standard_normal(state.wkv.shape) * 0.3
    state.att_x[:] = rng.standard_normal(state.att_x.shape)
    state.meta_x[:] = rng.standard_normal(state.meta_x.shape)
    before = state.copy()
    lr, sr = forward(p, cfg, tokens, state)
    lc, sc = forward(p, cfg, tokens, state, wkv="chunked", chunk_size=16)
    assert rel_rms(lc, lr) <= 1e-10
    for name in ("att_x", "meta_x", "wkv"):
        assert rel_rms(getattr(sc, name), getattr(sr, name)) <= 1e-10
    assert np.array_equal(state.wkv, before.wkv) and np.array_equal(state.att_x, before.att_x)


def test_prefill_then_decode_equals_one_pass():
    cfg = small_config()
    p = random_params(cfg, 4)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 30))
    full, s_full = forward(p, cfg, tokens)
    logits, s = forward(p, cfg, tokens[:, :11], wkv="chunked")
    steps = [logits]
    for t in range(11, 30):
        out, s = forward(p, cfg, tokens[:, t:t + 1], s)
        steps.append(out)
    assert rel_rms(np.concatenate(steps, 1), full) <= 1e-12
    assert rel_rms(s.wkv, s_full.wkv) <= 1e-12


def test_batch_rows_are_independent():
    cfg = small_config()
    p = random_params(cfg, 6)
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (3, 20))
    batched, st = forward(p, cfg, tokens)
    for b in range(3):
        alone, st_b = forward(p, cfg, tokens[b:b + 1])
        assert rel_rms(batched[b], alone[0]) <= 1e-13
        assert rel_rms(st.wkv[:, b], st_b.wkv[:, 0]) <= 1e-13


def test_sse_changes_the_output_and_zero_gate_removes_it():
    cfg = small_config()
    with_sse = random_params(cfg, 8)
    without = dict(with_sse)
    for i in range(cfg.n_layer):
        without[f"blocks.{i}.meta.sse_gate"] = np.zeros(cfg.d_model)
    tokens = np.arange(12)[None] % cfg.vocab_size
    a, _ = forward(with_sse, cfg, tokens)
    b, _ = forward(without, cfg, tokens)
    assert rel_rms(a, b) > 1e-3
    # with the gate zero, sse_heads has no effect: the model is exactly RWKV-7
    c, _ = forward(without, cfg.replace(sse_heads=0), tokens)
    assert rel_rms(b, c) == 0.0


def test_float32_reference_is_close_to_float64():
    cfg = small_config()
    p = random_params(cfg, 9)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 25))
    l64, _ = forward(p, cfg, tokens)
    l32, s32 = forward(p, cfg, tokens, dtype=np.float32)
    assert l32.dtype == np.float32 and s32.wkv.dtype == np.float32
    assert rel_rms(l32, l64) <= 1e-5


def test_param_shapes_match_random_params():
    cfg = small_config()
    p = random_params(cfg, 0)
    assert {k: v.shape for k, v in p.items()} == param_shapes(cfg)
    assert "blocks.0.att.v0" not in p and "blocks.1.att.v0" in p


@pytest.mark.parametrize("kw,fragment", [
    (dict(d_att=100), "does not divide d_att"),
    (dict(sse_heads=5), "exceeds"),
    (dict(n_layer=0), "'n_layer' must be a positive integer"),
    (dict(vocab_size=-3), "'vocab_size' must be a positive integer"),
    (dict(head_size=16.0), "'head_size' must be a positive integer"),
])
def test_config_validation(kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        small_config(**kw)


def test_config_round_trip_and_version():
    cfg = small_config(growth=[{"rule": "layers", "from": 2, "to": 3}])
    data = cfg.to_dict()
    assert data["format"] == "metastate" and data["format_version"] == 1
    assert ModelConfig.from_dict(data) == cfg
    with pytest.raises(ConfigError, match="newer than this library supports"):
        ModelConfig.from_dict({**data, "format_version": 2})
    with pytest.raises(ConfigError, match="missing required field 'vocab_size'"):
        ModelConfig.from_dict({k: v for k, v in data.items() if k != "vocab_size"})
    extra = ModelConfig.from_dict({**data, "quantization": {"bits": 4}})
    assert extra.to_dict()["quantization"] == {"bits": 4}


def test_official_lora_rule_defaults():
    # The official RWKV-7 0.1B (d=768) uses lora sizes 64, 64, 32, 128.
    cfg = ModelConfig(vocab_size=10, d_model=768)
    assert (cfg.lora_w, cfg.lora_a, cfg.lora_v, cfg.lora_g) == (64, 64, 32, 128)
    assert cfg.n_param_tokens == 3072 and cfg.sse_heads == 12 and cfg.d_att == 768


def test_config_rejects_a_growth_history_that_is_not_a_list():
    with pytest.raises(ConfigError, match="'growth' must be a list"):
        ModelConfig.from_dict({"vocab_size": 10, "d_model": 64, "growth": 5})


def test_rel_rms_is_the_spec_metric():
    torch = pytest.importorskip("torch")
    assert rel_rms([1.0, -2.0], [1.0, -2.0]) == 0.0
    assert rel_rms([2.0, 0.0], [1.0, 1.0]) == pytest.approx(1.0)  # rms([1, -1]) / rms([1, 1])
    assert rel_rms(torch.tensor([3.0]), np.array([2.0])) == pytest.approx(0.5)


def test_decode_layout_changes_memory_order_only():
    """The NumPy engine's layout: each x @ W^T matrix column-major (W^T a row-major operand),
    the same values, the same logits; nothing else touched."""
    from metastate_core.reference import TRANSPOSED_PRODUCTS, decode_layout

    cfg = small_config()
    w = {k: v.astype(np.float32) for k, v in random_params(cfg, 0).items()}
    laid = decode_layout(w)
    assert list(laid) == list(w) and all(np.array_equal(laid[k], w[k]) for k in w)
    moved = {k for k in w if k.endswith(TRANSPOSED_PRODUCTS)}
    assert "head.weight" in moved and "blocks.1.att.key.weight" in moved and "blocks.0.meta.param_keys" in moved
    assert all(laid[k].T.flags["C_CONTIGUOUS"] for k in moved)
    assert all(laid[k] is w[k] for k in w if k not in moved)  # no copy of the rest (param_values, LoRAs: x @ W)
    toks = np.random.default_rng(2).integers(0, cfg.vocab_size, (3, 5))
    a, sa = forward(w, cfg, toks, dtype=np.float32)
    b, sb = forward(laid, cfg, toks, dtype=np.float32)
    assert rel_rms(b, a) <= 1e-6 and rel_rms(sb.wkv, sa.wkv) <= 1e-6


def test_products_are_one_2d_product_over_all_rows():
    from metastate_core.reference import mm

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 4, 5)), rng.standard_normal((5, 7))
    np.testing.assert_allclose(mm(x, w), x @ w, rtol=1e-13, atol=1e-13)
    assert mm(x[:, :1], w).shape == (3, 1, 7)


def test_recurrent_wkv_keeps_one_state_per_token_without_copies():
    rng = np.random.default_rng(4)
    S0, w, k, v, kk, a, q = random_wkv_inputs(rng, 2, 1, 3, 8)
    scan = RecurrentWKV(S0, w, k, v, kk, a)
    assert len(scan.states) == 1 and scan.states[0] is scan.final_state  # a decoded token: S_1 only
    np.testing.assert_allclose(scan.read(q)[:, 0], np.einsum("bhij,bhj->bhi", scan.final_state, q[:, 0]))


def test_last_only_logits_are_the_last_row():
    cfg = small_config()
    w = random_params(cfg, 0)
    toks = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 7))
    full, st = forward(w, cfg, toks, wkv="chunked")
    last, st_last = forward(w, cfg, toks, wkv="chunked", last_only=True)
    assert last.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_array_equal(last, full[:, -1:])
    np.testing.assert_array_equal(st_last.wkv, st.wkv)
