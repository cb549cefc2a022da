"""Growth rules (SPEC section 5) against the NumPy float64 reference.

Exactness: logits and the old part of the final state are unchanged by every rule and every
composition. Gradient: central finite differences of a fixed scalar loss along a random
direction in one new tensor (non-zero iff the gradient there is non-zero, almost surely).
"""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metastate_core.config import ModelConfig
from metastate_core.growth import (GrowthError, grow, grow_heads, grow_layers, grow_param_tokens,
                                   grow_sse_heads, grow_sub_keys)
from metastate_core.params import param_shapes, random_params
from metastate_core.reference import forward, product_select

EXACT = 1e-12  # float64 reference: growth must be exact (SPEC 6 says 0; allow BLAS reordering)


from metastate_core.reference import rel_rms  # noqa: E402  (SPEC section 6)


def small_cfg(**kw):
    base = dict(vocab_size=29, d_model=32, n_layer=2, head_size=8, d_att=24, n_param_tokens=16,
                sse_heads=2, lora_w=8, lora_a=8, lora_v=8, lora_g=8)
    return ModelConfig(**{**base, **kw})


def tokens_for(cfg, seed=0, B=2, T=6):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T))


def snapshot(tensors):
    return {k: np.array(v, copy=True) for k, v in tensors.items()}


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def assert_state_old_part(s0, s1, layer_map, H):
    """Final state of the grown model equals the old one on the old layers and heads. Not bit for
    bit: a matmul over a longer inner dimension (new zero columns) may sum in another order."""
    for old, new in enumerate(layer_map):
        assert rel_rms(s1.att_x[new], s0.att_x[old]) <= EXACT
        assert rel_rms(s1.meta_x[new], s0.meta_x[old]) <= EXACT
        assert rel_rms(s1.wkv[new][:, :H], s0.wkv[old]) <= EXACT


class Loss:
    """sum(logits * W) for fixed random W; directional central differences."""

    def __init__(self, cfg, tensors, seed=7):
        self.cfg, self.tokens = cfg, tokens_for(cfg, seed)
        self.W = np.random.default_rng(seed).normal(size=(*self.tokens.shape, cfg.vocab_size))
        self.tensors = tensors

    def __call__(self, tensors):
        return float((forward(tensors, self.cfg, self.tokens)[0] * self.W).sum())

    def directional(self, name, mask, eps=1e-6, seed=3):
        """d loss / d tensors[name] along a random direction supported on mask."""
        t = self.tensors[name]
        D = np.random.default_rng(seed).normal(size=t.shape) * mask
        plus, minus = dict(self.tensors), dict(self.tensors)
        plus[name], minus[name] = t + eps * D, t - eps * D
        return (self(plus) - self(minus)) / (2 * eps)


# -- exactness, each rule and compositions (hypothesis) --------------------------------------

@st.composite
def configs(draw):
    d = draw(st.sampled_from([32, 48, 64]))
    N = draw(st.sampled_from([8, 16]))
    H = draw(st.integers(1, d // N + 2))
    max_sse = min(d, H * N) // N
    cfg = ModelConfig(vocab_size=draw(st.integers(17, 50)), d_model=d, n_layer=draw(st.integers(1, 3)),
                      head_size=N, d_att=H * N, n_param_tokens=draw(st.integers(4, 48)),
                      sse_heads=draw(st.integers(0, max_sse - 1)) if max_sse > 0 else 0,
                      lora_w=8, lora_a=8, lora_v=8, lora_g=8)
    return cfg


STEPS = st.lists(st.tuples(st.sampled_from(["param_tokens", "heads", "layers", "sse_heads"]),
                           st.integers(1, 3), st.sampled_from(["end", "after0"])),
                 min_size=1, max_size=4)


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), steps=STEPS, seed=st.integers(0, 2**16))
def test_growth_is_exact(cfg, steps, seed):
    p = random_params(cfg, seed, sse=True)
    tok = tokens_for(cfg, seed)
    logits0, state0 = forward(p, cfg, tok)
    before, cfg_before = snapshot(p), cfg.to_dict()
    layer_map = list(range(cfg.n_layer))  # old layer i -> its index in the grown model
    c, q, expected = cfg, p, []
    for rule, amount, position in steps:
        if rule == "param_tokens":
            old = c.n_param_tokens
            c, q = grow_param_tokens(c, q, old + 5 * amount, rng=seed)
            expected.append({"rule": rule, "from": old, "to": old + 5 * amount})
        elif rule == "heads":
            old = c.n_head
            c, q = grow_heads(c, q, old + amount, rng=seed)
            expected.append({"rule": rule, "from": old, "to": old + amount})
        elif rule == "layers":
            old = c.n_layer
            c, q = grow_layers(c, q, old + amount, position=position, rng=seed)
            if position == "after0":
                layer_map = [i if i == 0 else i + amount for i in layer_map]
            expected.append({"rule": rule, "from": old, "to": old + amount, "position": position})
        else:
            old, top = c.sse_heads, min(c.d_model, c.d_att) // c.head_size
            if old == top:
                continue
            c, q = grow_sse_heads(c, q, min(old + amount, top))
            expected.append({"rule": rule, "from": old, "to": c.sse_heads})
        assert {k: v for k, v in c.growth[-1].items() if k != "gate_zeroed"} == expected[-1]
    assert [s["rule"] for s in c.growth] == [s["rule"] for s in expected]
    c.validate()
    assert {k: v.shape for k, v in q.items()} == param_shapes(c)
    assert all(q[k].dtype == np.float64 for k in q)
    logits1, state1 = forward(q, c, tok)
    assert rel_rms(logits1, logits0) <= EXACT
    assert_state_old_part(state0, state1, layer_map, cfg.n_head)
    assert_same_tensors(p, before)  # inputs not mutated
    assert cfg.to_dict() == cfg_before


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), seed=st.integers(0, 2**16), dn=st.integers(0, 20), dh=st.integers(0, 2),
       dl=st.integers(0, 2), position=st.sampled_from(["end", "after0"]))
def test_grow_all_at_once_is_exact(cfg, seed, dn, dh, dl, position):
    p = random_params(cfg, seed, sse=True)
    tok = tokens_for(cfg, seed)
    logits0, state0 = forward(p, cfg, tok)
    top = min(cfg.d_model, (cfg.n_head + dh) * cfg.head_size) // cfg.head_size  # needs the new heads
    c, q = grow(cfg, p, param_tokens=cfg.n_param_tokens + dn, heads=cfg.n_head + dh,
                sse_heads=top, layers=cfg.n_layer + dl, layer_position=position, rng=seed)
    rules = [r for r, changed in (("param_tokens", dn), ("heads", dh), ("sse_heads", top > cfg.sse_heads),
                                  ("layers", dl)) if changed]
    assert [s["rule"] for s in c.growth] == rules  # documented order; no-ops not recorded
    assert (c.n_param_tokens, c.n_head, c.sse_heads, c.n_layer) == (
        cfg.n_param_tokens + dn, cfg.n_head + dh, top, cfg.n_layer + dl)
    assert {k: v.shape for k, v in q.items()} == param_shapes(c)
    logits1, state1 = forward(q, c, tok)
    assert rel_rms(logits1, logits0) <= EXACT
    layer_map = [i if (i == 0 or position == "end") else i + dl for i in range(cfg.n_layer)]
    assert_state_old_part(state0, state1, layer_map, cfg.n_head)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_dtype_kept_and_old_entries_bit_identical(dtype):
    cfg = small_cfg()
    p = random_params(cfg, 1, dtype=dtype)
    c, q = grow(cfg, p, param_tokens=20, heads=5, sse_heads=4, layers=4, layer_position="after0", rng=2)
    assert all(t.dtype == np.dtype(dtype) for t in q.values())
    # the old model sits inside the new one bit for bit (layers 1.. moved to 3..)
    for name, t in p.items():
        new = name.replace("blocks.1.", "blocks.3.")
        old_part = q[new][tuple(slice(0, s) for s in t.shape)]
        if name.endswith("sse_gate"):
            t = np.where(np.arange(t.shape[0]) < 2 * 8, t, 0).astype(dtype)  # channels 16..32 reset
        assert np.array_equal(old_part.view(np.uint8), t.view(np.uint8)), name
    tok = tokens_for(cfg)
    logits0, _ = forward(p, cfg, tok)
    logits1, _ = forward(q, c, tok)
    assert rel_rms(logits1, logits0) <= EXACT


# -- what each rule writes -------------------------------------------------------------------

def test_new_entries_follow_spec():
    cfg = small_cfg()
    p = random_params(cfg, 0)
    c, q = grow_param_tokens(cfg, p, 24, rng=1)
    for i in range(2):
        keys = q[f"blocks.{i}.meta.param_keys"][16:]
        assert keys.all() and np.abs(keys).max() <= 0.5 / np.sqrt(cfg.d_model)
        assert not q[f"blocks.{i}.meta.param_values"][16:].any()
    c, q = grow_heads(cfg, p, 5, rng=1)
    assert c.d_att == 40 and c.sse_heads == cfg.sse_heads
    b = "blocks.1.att."
    assert not q[b + "output.weight"][:, 24:].any()
    assert np.all(q[b + "ln_x.weight"][24:] == 1) and not q[b + "ln_x.bias"][24:].any()
    for name in ("receptance.weight", "key.weight", "value.weight"):
        assert q[b + name][24:].all()
    for name in ("w2", "a2", "v2", "g2"):
        assert np.abs(q[b + name][:, 24:]).sum(0).all(), name  # no all-zero new column
    np.testing.assert_array_equal(q[b + "r_k"][3:], -0.04)
    np.testing.assert_array_equal(q[b + "k_a"][24:], 1.02)
    c, q = grow_layers(cfg, p, 3, position="after0", rng=1)
    assert not q["blocks.1.att.output.weight"].any() and not q["blocks.1.meta.param_values"].any()
    assert "blocks.1.att.v0" in q and q["blocks.1.att.v2"].any()
    np.testing.assert_array_equal(q["blocks.2.att.key.weight"], p["blocks.1.att.key.weight"])
    c, q = grow_sse_heads(cfg, p, 3)
    gate, old = q["blocks.0.meta.sse_gate"], p["blocks.0.meta.sse_gate"]
    assert not gate[16:24].any()
    assert np.array_equal(gate[:16], old[:16]) and np.array_equal(gate[24:], old[24:])
    assert c.growth[-1] == {"rule": "sse_heads", "from": 2, "to": 3, "gate_zeroed": 2 * 8}


def test_growth_is_deterministic_in_rng():
    cfg, p = small_cfg(), random_params(small_cfg(), 0)
    a = grow(cfg, p, param_tokens=20, heads=4, layers=3, rng=5)[1]
    b = grow(cfg, p, param_tokens=20, heads=4, layers=3, rng=5)[1]
    assert_same_tensors(a, b)


# -- gradients -------------------------------------------------------------------------------

def test_new_param_tokens_get_gradient_at_once():
    """SPEC 5.1 as written (keys zero, values random) would leave the new tokens dead:
    relu(0)^2 = 0 with zero derivative. The code uses random keys and zero values instead;
    the new values then receive gradient at once (reported as a SPEC bug)."""
    cfg = small_cfg()
    c, q = grow_param_tokens(cfg, random_params(cfg, 0), 20, rng=1)
    loss = Loss(c, q)
    new = (np.arange(20) >= 16)[:, None]
    assert abs(loss.directional("blocks.1.meta.param_values", new)) > 1e-3
    assert abs(loss.directional("blocks.0.meta.param_values", new)) > 1e-3
    # the keys reach the loss only through the (zero) values: no gradient yet
    assert abs(loss.directional("blocks.1.meta.param_keys", new)) < 1e-8


def test_heads_only_output_columns_get_gradient_at_once():
    cfg = small_cfg()
    c, q = grow_heads(cfg, random_params(cfg, 0), 5, rng=1)
    loss = Loss(c, q)
    new_cols = (np.arange(c.d_att) >= cfg.d_att)
    assert abs(loss.directional("blocks.1.att.output.weight", new_cols[None, :])) > 1e-3
    assert abs(loss.directional("blocks.0.att.output.weight", new_cols[None, :])) > 1e-3
    # Every other new entry reaches the loss only through those zero columns.
    for name, mask in (("blocks.1.att.receptance.weight", new_cols[:, None]),
                       ("blocks.0.att.value.weight", new_cols[:, None]),
                       ("blocks.1.att.g2", new_cols[None, :]),
                       ("blocks.1.att.w0", new_cols)):
        assert loss.directional(name, mask) == 0.0, name


@pytest.mark.parametrize("position", ["end", "after0"])
def test_new_layers_output_and_values_get_gradient(position):
    cfg = small_cfg()
    c, q = grow_layers(cfg, random_params(cfg, 0), 3, position=position, rng=1)
    j = 2 if position == "end" else 1
    loss = Loss(c, q)
    ones = np.ones(1)
    assert abs(loss.directional(f"blocks.{j}.att.output.weight", ones)) > 1e-3
    assert abs(loss.directional(f"blocks.{j}.meta.param_values", ones)) > 1e-3
    # the rest of the block is behind these two zero matrices at first
    assert loss.directional(f"blocks.{j}.att.key.weight", ones) == 0.0
    assert loss.directional(f"blocks.{j}.meta.param_keys", ones) == 0.0


def test_new_sse_gate_entries_get_gradient():
    cfg = small_cfg()
    c, q = grow_sse_heads(cfg, random_params(cfg, 0), 3)
    loss = Loss(c, q)
    new = (np.arange(32) >= 16) & (np.arange(32) < 24)
    for i in range(2):
        assert abs(loss.directional(f"blocks.{i}.meta.sse_gate", new)) > 1e-3


# -- errors and no-ops -----------------------------------------------------------------------

def test_shrinking_and_bad_requests_raise():
    cfg = small_cfg()
    p = random_params(cfg, 0)
    with pytest.raises(GrowthError, match="cannot grow n_param_tokens from 16 to 8"):
        grow_param_tokens(cfg, p, 8)
    with pytest.raises(GrowthError, match="cannot grow n_head from 3 to 2"):
        grow_heads(cfg, p, 2)
    with pytest.raises(GrowthError, match="cannot grow n_layer from 2 to 1"):
        grow_layers(cfg, p, 1)
    with pytest.raises(GrowthError, match="cannot grow sse_heads from 2 to 1"):
        grow_sse_heads(cfg, p, 1)
    with pytest.raises(GrowthError, match=r"exceeds min\(d_model, d_att\) // head_size = 3; grow the heads"):
        grow_sse_heads(cfg, p, 4)
    with pytest.raises(GrowthError, match="layer position"):
        grow_layers(cfg, p, 3, position="before0")
    with pytest.raises(GrowthError, match="must be an integer"):
        grow_heads(cfg, p, 4.0)
    with pytest.raises(GrowthError, match="d_model cannot grow"):
        grow(cfg, p, d_model=64)
    with pytest.raises(GrowthError, match="head_size cannot grow"):
        grow(cfg, p, head_size=16)
    with pytest.raises(GrowthError, match="missing tensor 'blocks.1.meta.sse_gate'"):
        grow_heads(cfg, {k: v for k, v in p.items() if k != "blocks.1.meta.sse_gate"}, 4)
    with pytest.raises(GrowthError, match="has shape"):
        grow_heads(cfg.replace(d_att=32), p, 5)
    with pytest.raises(GrowthError, match="rng must be a numpy Generator or a seed >= 0, got -1"):
        grow(cfg, p, heads=4, rng=-1)


def test_equal_target_is_a_noop_without_record():
    cfg = small_cfg(growth=[{"rule": "heads", "from": 2, "to": 3}])
    p = random_params(cfg, 0)
    for c, q in (grow_param_tokens(cfg, p, 16), grow_heads(cfg, p, 3), grow_layers(cfg, p, 2),
                 grow_sse_heads(cfg, p, 2), grow(cfg, p, d_model=32, head_size=8)):
        assert c == cfg and c is not cfg and c.growth is not cfg.growth
        assert q is not p and q.keys() == p.keys() and all(q[k] is p[k] for k in p)


# -- product mode (SPEC sections 5 and 7) -------------------------------------------------------

@st.composite
def product_configs(draw):
    d = draw(st.sampled_from([32, 48]))
    N = draw(st.sampled_from([8, 16]))
    H = draw(st.integers(1, d // N + 1))
    m = draw(st.integers(2, 6))
    return ModelConfig(vocab_size=draw(st.integers(17, 40)), d_model=d, n_layer=draw(st.integers(1, 3)),
                       head_size=N, d_att=H * N, sse_heads=draw(st.integers(0, min(d, H * N) // N)),
                       lora_w=8, lora_a=8, lora_v=8, lora_g=8, param_mode="product", n_sub_keys=m,
                       param_heads=draw(st.integers(1, 3)), param_topk=draw(st.integers(1, m * m)))


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=product_configs(), seed=st.integers(0, 2**16), dh=st.integers(0, 2), dl=st.integers(0, 2),
       position=st.sampled_from(["end", "after0"]), more_sse=st.booleans())
def test_heads_layers_and_sse_growth_are_exact_in_product_mode(cfg, seed, dh, dl, position, more_sse):
    p = random_params(cfg, seed, sse=True)
    tok = tokens_for(cfg, seed)
    logits0, state0 = forward(p, cfg, tok)
    top = min(cfg.d_model, (cfg.n_head + dh) * cfg.head_size) // cfg.head_size
    c, q = grow(cfg, p, heads=cfg.n_head + dh, sse_heads=top if more_sse else None, layers=cfg.n_layer + dl,
                layer_position=position, rng=seed)
    assert (c.param_mode, c.n_sub_keys, c.param_heads, c.param_topk) == ("product", cfg.n_sub_keys,
                                                                         cfg.param_heads, cfg.param_topk)
    assert {k: v.shape for k, v in q.items()} == param_shapes(c)
    logits1, state1 = forward(q, c, tok)
    assert rel_rms(logits1, logits0) <= EXACT
    layer_map = [i if (i == 0 or position == "end") else i + dl for i in range(cfg.n_layer)]
    assert_state_old_part(state0, state1, layer_map, cfg.n_head)
    for j in sorted(set(range(c.n_layer)) - set(layer_map)):  # new blocks: values zero, sub-keys random
        keys = q[f"blocks.{j}.meta.sub_keys"]
        assert not q[f"blocks.{j}.meta.param_values"].any()
        assert keys.all() and np.abs(keys).max() <= 0.5 / np.sqrt(cfg.d_model)


def product_small(**kw):
    return small_cfg(n_param_tokens=None, param_mode="product", n_sub_keys=4, param_heads=2, param_topk=5, **kw)


def test_new_product_layer_values_get_gradient_at_once():
    cfg = product_small()
    c, q = grow_layers(cfg, random_params(cfg, 0), 3, rng=1)
    loss = Loss(c, q)
    assert abs(loss.directional("blocks.2.meta.param_values", np.ones(1))) > 1e-3
    assert loss.directional("blocks.2.meta.sub_keys", np.ones(1)) == 0.0  # behind the zero values


def test_param_tokens_growth_is_refused_in_product_mode_and_sub_keys_in_dense_mode():
    cfg = product_small()
    p = random_params(cfg, 0)
    for target in (16, 25):
        with pytest.raises(GrowthError, match=r"grow n_sub_keys \(`metastate grow --sub-keys M`\)"):
            grow(cfg, p, param_tokens=target)
    with pytest.raises(GrowthError, match="n_sub_keys grows in product mode only"):
        grow_sub_keys(small_cfg(), random_params(small_cfg(), 0), 5)
    with pytest.raises(GrowthError, match="cannot grow n_sub_keys from 4 to 3"):
        grow_sub_keys(cfg, p, 3)
    c, q = grow_sub_keys(cfg, p, 4)
    assert c == cfg and all(q[k] is p[k] for k in p)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, ml_dtypes.bfloat16])
def test_sub_keys_growth_reindexes_the_values(dtype):
    cfg = product_small()
    p = random_params(cfg, 0, dtype=dtype)
    before = snapshot(p)
    c, q = grow(cfg, p, sub_keys=7, layers=3, rng=2)
    assert (c.n_sub_keys, c.n_param_tokens, c.n_layer) == (7, 49, 3)
    assert c.growth == [{"rule": "sub_keys", "from": 4, "to": 7}, {"rule": "layers", "from": 2, "to": 3,
                                                                    "position": "end"}]
    assert {k: v.shape for k, v in q.items()} == param_shapes(c) and all(t.dtype == dtype for t in q.values())
    assert_same_tensors(p, before)
    for layer in range(2):
        b = f"blocks.{layer}.meta."
        keys, values = q[b + "sub_keys"], q[b + "param_values"]
        assert np.array_equal(keys[:, :, :4].view(np.uint8), p[b + "sub_keys"].view(np.uint8))
        assert keys[:, :, 4:].all() and np.abs(keys[:, :, 4:].astype(np.float64)).max() <= 0.5 / np.sqrt(32)
        old = np.arange(16)
        new_row = (old // 4) * 7 + old % 4                        # token i*m + j -> i*m' + j
        assert np.array_equal(values[new_row].view(np.uint8), p[b + "param_values"].view(np.uint8))
        assert not np.delete(values, new_row, axis=0).any()      # the 33 new tokens: zero values
        # every old token keeps its key: concat(K[p,0,i], K[p,1,j]) at its new index
        for t, t2 in zip(old, new_row):
            np.testing.assert_array_equal(np.concatenate([keys[:, 0, t2 // 7], keys[:, 1, t2 % 7]], -1),
                                          np.concatenate([p[b + "sub_keys"][:, 0, t // 4],
                                                          p[b + "sub_keys"][:, 1, t % 4]], -1))
    assert grow(cfg, p, sub_keys=7, rng=2)[1]["blocks.0.meta.sub_keys"].tobytes() == \
        grow(cfg, p, sub_keys=7, rng=2)[1]["blocks.0.meta.sub_keys"].tobytes()  # deterministic in rng


def test_sub_keys_growth_keeps_the_order_of_the_old_tokens():
    """Not function-preserving (SPEC 5): new tokens may enter a head's top-k. But the old tokens
    a head still selects are the first ones it selected before, in the same order: the old part
    of the selection is a prefix of the old selection."""
    cfg = product_small()
    p = random_params(cfg, 0)
    c, q = grow_sub_keys(cfg, p, 6, rng=3)
    u = np.random.default_rng(0).normal(size=(200, cfg.d_model))
    for k in (1, 5, 16):
        _, before = product_select(u, p["blocks.0.meta.sub_keys"], k)
        _, after = product_select(u, q["blocks.0.meta.sub_keys"], k)
        i, j = after // 6, after % 6
        is_old = (i < 4) & (j < 4)
        entered = 0
        for row_b, row_a, old in zip(before.reshape(-1, k), (i * 4 + j).reshape(-1, k), is_old.reshape(-1, k)):
            kept = row_a[old]
            assert np.array_equal(kept, row_b[:len(kept)])
            entered += k - len(kept)
        assert entered > 0  # new tokens do enter: hence a warm start, not exact
    tok = tokens_for(cfg)
    assert rel_rms(forward(q, c, tok)[0], forward(p, cfg, tok)[0]) > 1e-6
