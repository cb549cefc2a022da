"""Product-key parameter tokens (SPEC section 7) in the NumPy reference and the weight format.

The judges are independent of `reference.product_select`: the dense model of SPEC section 2
with materialised keys, and a brute-force top-k over all m*m sums ordered by (-score, token).
"""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import weights.safetensors_io as sio
from metastate_core.config import ConfigError, ModelConfig
from metastate_core.params import init_params, param_shapes, random_params
from metastate_core.reference import forward, product_select, rel_rms
from weights import WeightsError, load_model, save_model

EXACT = 1e-12  # float64 reference (SPEC section 6)
WKV_FORMS = ("recurrent", "chunked")


def product_cfg(m=5, P=2, k=7, **kw):
    base = dict(vocab_size=23, d_model=16, n_layer=2, head_size=8, lora_w=8, lora_a=8, lora_v=8, lora_g=8,
                sse_heads=1, param_mode="product", n_sub_keys=m, param_heads=P, param_topk=k)
    return ModelConfig(**{**base, **kw})


def tokens_for(cfg, seed=0, B=2, T=9):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T))


def brute_force(u, sub_keys, k):
    """Every head's k best of all m*m sums sL[i] + sR[j], ties to the smaller t = i*m + j."""
    P, _, m, h = sub_keys.shape
    lead = u.shape[:-1]
    u = u.reshape(-1, u.shape[-1])
    score = np.empty((len(u), P, k))
    token = np.empty((len(u), P, k), np.int64)
    for b in range(len(u)):
        for p in range(P):
            sL = sub_keys[p, 0] @ u[b, :h]
            sR = sub_keys[p, 1] @ u[b, h:]
            sums = (sL[:, None] + sR[None, :]).reshape(-1)          # index i*m + j
            order = np.lexsort((np.arange(m * m), -sums))[:k]       # by -score, then by token
            score[b, p], token[b, p] = sums[order], order
    return score.reshape(*lead, P, k), token.reshape(*lead, P, k)


def assert_selects(u, sub_keys, k):
    score, token = product_select(u, sub_keys, k)
    want_score, want_token = brute_force(u, sub_keys, k)
    np.testing.assert_array_equal(token, want_token)
    np.testing.assert_allclose(score, want_score, rtol=1e-13, atol=1e-13)  # einsum vs matmul rounding
    return token


def dense_equivalent(cfg, tensors):
    """The dense model of SPEC section 2 with param_keys[i*m + j] = concat(K[0,0,i], K[0,1,j])."""
    m, d = cfg.n_sub_keys, cfg.d_model
    dense = cfg.replace(param_mode="dense", n_sub_keys=None, param_heads=None, param_topk=None)
    out = {}
    for name, t in tensors.items():
        if name.endswith("meta.sub_keys"):
            K = t[0]
            keys = np.concatenate([np.repeat(K[0], m, axis=0), np.tile(K[1], (m, 1))], axis=1)
            assert keys.shape == (m * m, d)
            out[name.replace("sub_keys", "param_keys")] = keys
        else:
            out[name] = t
    return dense, {name: out[name] for name in param_shapes(dense)}


# -- P = 1, k = m*m is the dense layer ---------------------------------------------------------

@pytest.mark.parametrize("wkv", WKV_FORMS)
@pytest.mark.parametrize("m", [3, 5])
def test_full_topk_single_head_is_the_dense_model(wkv, m):
    cfg = product_cfg(m=m, P=1, k=m * m, d_model=24, d_att=16)
    p = random_params(cfg, m)
    dense, q = dense_equivalent(cfg, p)
    tok = tokens_for(cfg, m)
    logits, state = forward(p, cfg, tok, wkv=wkv)
    want, want_state = forward(q, dense, tok, wkv=wkv)
    assert rel_rms(logits, want) <= EXACT
    for a, b in zip((state.att_x, state.meta_x, state.wkv), (want_state.att_x, want_state.meta_x, want_state.wkv)):
        assert rel_rms(a, b) <= EXACT
    # not vacuous: a smaller k reads fewer tokens and changes the logits
    assert rel_rms(forward(p, cfg.replace(param_topk=m), tok, wkv=wkv)[0], want) > 1e-6


def test_a_token_chosen_by_two_heads_counts_twice():
    """Two identical heads read the same tokens: the layer adds each value twice, so it equals
    one head with the value table doubled."""
    two = product_cfg(m=4, P=2, k=5)
    p = random_params(two, 3)
    for i in range(two.n_layer):
        keys = p[f"blocks.{i}.meta.sub_keys"]
        p[f"blocks.{i}.meta.sub_keys"] = np.stack([keys[0], keys[0]])
    one = two.replace(param_heads=1)
    q = dict(p)
    for i in range(two.n_layer):
        q[f"blocks.{i}.meta.sub_keys"] = p[f"blocks.{i}.meta.sub_keys"][:1]
        q[f"blocks.{i}.meta.param_values"] = 2 * p[f"blocks.{i}.meta.param_values"]
    tok = tokens_for(two, 1)
    logits = forward(p, two, tok)[0]
    assert rel_rms(logits, forward(q, one, tok)[0]) <= EXACT
    once = {k: p[k] if k.endswith("param_values") else v for k, v in q.items()}   # values not doubled
    assert rel_rms(logits, forward(once, one, tok)[0]) > 1e-3


# -- the selection against brute force ---------------------------------------------------------

@pytest.mark.parametrize("m, P, k", [
    (5, 1, 3),      # m not a power of two, k not a power of two, k < m
    (7, 3, 11),     # k > m, P > 1
    (6, 2, 1),      # k = 1
    (3, 2, 9),      # k = m*m
    (5, 4, 24),     # k = m*m - 1
    (1, 2, 1),      # a single token
])
def test_selection_is_the_brute_force_top_k(m, P, k):
    rng = np.random.default_rng(m * 100 + k)
    h = 6
    u = rng.normal(size=(3, 4, 2 * h))
    sub_keys = rng.normal(size=(P, 2, m, h))
    token = assert_selects(u, sub_keys, k)
    assert token.shape == (3, 4, P, k) and token.dtype.kind == "i"
    assert (np.sort(token, -1)[..., 1:] != np.sort(token, -1)[..., :-1]).all()  # k distinct tokens per head


@settings(deadline=None, max_examples=200)
@given(m=st.integers(1, 6), P=st.integers(1, 3), data=st.data(), seed=st.integers(0, 2**16))
def test_selection_with_many_ties(m, P, data, seed):
    """Small integer scores (exact in float64) make ties everywhere: the tie rule decides."""
    k = data.draw(st.integers(1, m * m))
    rng = np.random.default_rng(seed)
    h = 2
    u = rng.integers(-1, 2, (5, 2 * h)).astype(np.float64)
    sub_keys = rng.integers(-1, 2, (P, 2, m, h)).astype(np.float64)
    assert_selects(u, sub_keys, k)


def test_ties_between_equal_and_zero_rows_go_to_the_smaller_token():
    m, h = 4, 3
    u = np.ones(2 * h)
    zero = np.zeros((1, 2, m, h))
    for k in (1, 2, 5, 16):                                  # every score 0: tokens 0, 1, 2, ...
        assert assert_selects(u, zero, k).tolist() == [list(range(k))]
    # left rows all equal (every i ties); right scores 0.1, 0.4, 0.2, 0.3: j = 1, then 3, 2, 0
    K = np.zeros((1, 2, m, h))
    K[0, 0] = 1.0
    K[0, 1] = np.array([0.1, 0.4, 0.2, 0.3])[:, None] / h
    assert assert_selects(u, K, 6).tolist() == [[1, 5, 9, 13, 3, 7]]
    assert assert_selects(u, K, 2).tolist() == [[1, 5]]     # k < m: the left half ties at its cut
    # zero rows among negative ones: the zero rows (i = 1, 3; j = 0, 2) win, smaller t first
    K = -np.ones((1, 2, m, h))
    K[0, :, [1, 3]] = 0.0
    K[0, 1, [1, 3]] = -1.0
    K[0, 1, [0, 2]] = 0.0
    assert assert_selects(u, K, 4).tolist() == [[4, 6, 12, 14]]
    # two heads with identical keys select the same tokens
    assert assert_selects(u, np.concatenate([K, K]), 3).tolist() == [[4, 6, 12], [4, 6, 12]]


# -- state carry ------------------------------------------------------------------------------

@pytest.mark.parametrize("prefill_form", WKV_FORMS)
def test_prefill_then_decode_equals_one_pass(prefill_form):
    cfg = product_cfg(m=6, P=3, k=10)
    p = random_params(cfg, 5)
    tok = tokens_for(cfg, 5, B=2, T=12)
    want, want_state = forward(p, cfg, tok)
    logits, state = forward(p, cfg, tok[:, :7], wkv=prefill_form)
    steps = [logits]
    for t in range(7, 12):
        step, state = forward(p, cfg, tok[:, t:t + 1], state)
        steps.append(step)
    assert rel_rms(np.concatenate(steps, axis=1), want) <= EXACT
    for a, b in zip((state.att_x, state.meta_x, state.wkv), (want_state.att_x, want_state.meta_x, want_state.wkv)):
        assert rel_rms(a, b) <= EXACT


# -- config and format --------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(param_topk=26), "param_topk 26 exceeds the 25 parameter tokens"),
    (dict(d_model=15, head_size=5), "d_model must be even, got 15"),
    (dict(param_heads=0), "needs 'param_heads', a positive integer"),
    (dict(param_heads=-1), "needs 'param_heads', a positive integer"),
    (dict(n_sub_keys=0), "needs 'n_sub_keys', a positive integer"),
    (dict(param_topk=0), "needs 'param_topk', a positive integer"),
    (dict(param_heads=True), "needs 'param_heads', a positive integer"),
    (dict(n_param_tokens=24), "n_param_tokens = n_sub_keys^2 = 25, got 24"),
    (dict(param_mode="sparse"), "'param_mode' must be 'dense' or 'product'"),
    (dict(param_mode="dense"), "'n_sub_keys' is for param_mode 'product' only"),
])
def test_bad_configs_give_one_clear_line(changes, message):
    with pytest.raises(ConfigError) as e:
        product_cfg(**{**dict(m=5, P=2, k=7), **changes})
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_product_configs_round_trip_and_dense_configs_do_not_name_the_fields():
    cfg = product_cfg()
    assert cfg.n_param_tokens == 25 and cfg.product
    data = cfg.to_dict()
    assert (data["param_mode"], data["n_sub_keys"], data["param_heads"], data["param_topk"]) == ("product", 5, 2, 7)
    assert ModelConfig.from_dict(json.loads(json.dumps(data))) == cfg
    dense = cfg.replace(param_mode="dense", n_sub_keys=None, param_heads=None, param_topk=None).to_dict()
    assert dense["param_mode"] == "dense" and not {"n_sub_keys", "param_heads", "param_topk"} & set(dense)
    assert not ModelConfig.from_dict({k: v for k, v in dense.items() if k != "param_mode"}).product


def test_init_shapes_and_scale():
    cfg = product_cfg(m=6, P=3, k=4, d_model=32, d_att=32)
    p = init_params(cfg, 0, np.float32)
    assert "blocks.0.meta.param_keys" not in p
    keys, values = p["blocks.1.meta.sub_keys"], p["blocks.1.meta.param_values"]
    assert keys.shape == (3, 2, 6, 16) and values.shape == (36, 32)
    assert keys.all() and np.abs(keys).max() <= 0.5 / np.sqrt(32) and not values.any()


def test_save_load_round_trip_and_wrong_shapes(tmp_path):
    cfg = product_cfg()
    p = random_params(cfg, 0, np.float32)
    save_model(tmp_path / "m", cfg, p)
    cfg2, q = load_model(tmp_path / "m")
    assert cfg2 == cfg and list(q) == list(param_shapes(cfg))
    assert all(np.array_equal(q[k], p[k]) for k in p)
    bad = [("blocks.1.meta.param_values", np.zeros((26, 16), np.float32),
            r"tensor 'blocks.1.meta.param_values' has shape \[26, 16\], expected \[25, 16\]"),
           ("blocks.0.meta.sub_keys", np.zeros((2, 2, 5, 16), np.float32),
            r"tensor 'blocks.0.meta.sub_keys' has shape \[2, 2, 5, 16\], expected \[2, 2, 5, 8\]"),
           ("blocks.0.meta.sub_keys", np.zeros((2, 5, 8), np.float32), r"has shape \[2, 5, 8\], expected \[2, 2, 5, 8\]")]
    for name, t, message in bad:
        with pytest.raises(WeightsError, match=message):
            save_model(tmp_path / "bad", cfg, {**p, name: t})
        sio.write_file(tmp_path / "m" / "model.safetensors", {**p, name: t})   # no header config: shapes judge
        with pytest.raises(WeightsError, match=message):
            load_model(tmp_path / "m")
    assert not (tmp_path / "bad").exists()
    # dense keys in a product model (or the reverse) are refused by name
    swapped = {k.replace("sub_keys", "param_keys"): np.zeros((25, 16), np.float32) if k.endswith("sub_keys") else v
               for k, v in p.items()}
    with pytest.raises(WeightsError, match="missing tensor 'blocks.0.meta.sub_keys'"):
        save_model(tmp_path / "bad", cfg, swapped)
    dense = cfg.replace(param_mode="dense", n_sub_keys=None, param_heads=None, param_topk=None)
    with pytest.raises(WeightsError, match="missing tensor 'blocks.0.meta.param_keys'"):
        save_model(tmp_path / "bad", dense, p)


def test_an_edited_config_json_is_refused_in_one_line(tmp_path):
    cfg = product_cfg()
    save_model(tmp_path / "m", cfg, random_params(cfg, 0, np.float32))
    config = tmp_path / "m" / "config.json"
    data = json.loads(config.read_text())
    for key, value, message in (("param_topk", 6, "says param_topk = 6, but the weights were saved with param_topk = 7"),
                                ("param_topk", 26, "param_topk 26 exceeds the 25 parameter tokens"),
                                ("param_heads", 0, "needs 'param_heads'")):
        config.write_text(json.dumps({**data, key: value}))
        with pytest.raises(WeightsError, match=message) as e:
            load_model(tmp_path / "m")
        assert "\n" not in str(e.value)
    # a dense model's header against a config.json that claims product mode
    dense = cfg.replace(param_mode="dense", n_sub_keys=None, param_heads=None, param_topk=None)
    save_model(tmp_path / "d", dense, random_params(dense, 0, np.float32))
    config = tmp_path / "d" / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "param_mode": "product", "n_sub_keys": 5, "param_heads": 1,
                                  "param_topk": 3}))
    with pytest.raises(WeightsError, match="says param_mode = 'product', but the weights were saved with "
                                           "param_mode = 'dense'"):
        load_model(tmp_path / "d")


def test_a_million_token_model_saves_sharded_and_loads_bit_exact(tmp_path):
    """m = 1024: 1,048,576 parameter tokens in one layer (d 4: a 16 MiB value table)."""
    cfg = ModelConfig(vocab_size=7, d_model=4, n_layer=1, head_size=4, lora_w=4, lora_a=4, lora_v=4, lora_g=4,
                      param_mode="product", n_sub_keys=1024, param_heads=2, param_topk=3)
    assert cfg.n_param_tokens == 1 << 20
    rng = np.random.default_rng(0)
    p = init_params(cfg, 0, np.float32)
    p["blocks.0.meta.param_values"] = rng.standard_normal((1 << 20, 4)).astype(np.float32)
    p["blocks.0.meta.sse_gate"] = rng.standard_normal(4).astype(np.float32)
    save_model(tmp_path / "m", cfg, p, max_shard_bytes=4 << 20)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["blocks.0.meta.param_values"]
    assert sum(f == shard for f in index["weight_map"].values()) == 1   # the oversized table: a shard of its own
    assert len(set(index["weight_map"].values())) == 3
    cfg2, q = load_model(tmp_path / "m")
    assert cfg2 == cfg
    for name, t in p.items():
        assert q[name].dtype == t.dtype and q[name].tobytes() == t.tobytes(), name
    logits, _ = forward(q, cfg2, [[1, 2, 3]], dtype=np.float32)   # it runs, at O(sqrt(n)) per token
    assert logits.shape == (1, 3, 7) and np.isfinite(logits).all()
