"""MLX model (plain-ops path) against the NumPy float64 reference: logits, state, dtypes,
quantization, batching, generation (metastate.api on the mlx engine) and the model directory
round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from metastate_core.config import ModelConfig  # noqa: E402
from metastate_core.errors import MetaStateError, ModelError  # noqa: E402
from metastate_core.params import param_shapes, random_params  # noqa: E402
from metastate_core.reference import forward  # noqa: E402
from metastate_core.sampling import Sampler, SamplingParams  # noqa: E402

import backends.mlx.model as mlx_model  # noqa: E402
from backends.mlx import Model, load, quantize, save  # noqa: E402
from backends.mlx.wkv import _unit_lower_inverse  # noqa: E402

V = 150
RWKV7 = ModelConfig(vocab_size=V, d_model=64, n_layer=2, head_size=16, n_param_tokens=128)
# d_att != d_model (6 heads) and sse_heads below its maximum min(6, 64 // 16) = 4
META = ModelConfig(vocab_size=V, d_model=64, n_layer=2, head_size=16, d_att=96, sse_heads=2, n_param_tokens=128)


from metastate_core.reference import rel_rms  # noqa: E402  (SPEC section 6)


def tokens(B, T, seed=1):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def run(model, toks, state=None):
    """(logits, state) as NumPy / mx arrays."""
    logits, state = model(mx.array(np.asarray(toks, np.int32)), state)
    return np.array(logits), state


def state_arrays(state):
    return {name: np.array(getattr(state, name)) for name in ("att_x", "meta_x", "wkv")}


def from_tensors(cfg, weights, kernels="ops"):
    return Model.from_tensors(cfg, weights, kernels=kernels)


@pytest.fixture(scope="module", params=["rwkv7", "meta"])
def case(request):
    cfg = RWKV7 if request.param == "rwkv7" else META
    weights = random_params(cfg, 0, sse=request.param == "meta")
    model = from_tensors(cfg, {k: v.astype(np.float32) for k, v in weights.items()})
    return cfg, weights, model


def test_parameter_tree_is_the_canonical_format(case):
    from mlx.utils import tree_flatten

    cfg, _, model = case
    flat = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert flat == param_shapes(cfg)
    assert "blocks.0.att.v0" not in flat and "blocks.1.att.v0" in flat


def test_sequence_logits_and_state_match_reference(case):
    cfg, weights, model = case
    toks = tokens(2, 37)  # 3 chunks of 16, the last one padded
    ref, ref_state = forward(weights, cfg, toks)
    logits, state = run(model, toks)
    assert rel_rms(logits, ref) <= 1e-4
    got = state_arrays(state)
    for name in ("att_x", "meta_x", "wkv"):
        assert got[name].dtype == np.float32
        assert rel_rms(got[name], getattr(ref_state, name)) <= 1e-4, name


def test_prefill_then_decode_equals_one_pass(case):
    cfg, weights, model = case
    toks = tokens(2, 30, seed=2)
    ref, ref_state = forward(weights, cfg, toks)
    logits, state = run(model, toks[:, :19])
    parts = [logits]
    for t in range(19, 30):
        logits, state = run(model, toks[:, t:t + 1], state)
        parts.append(logits)
    assert rel_rms(np.concatenate(parts, axis=1), ref) <= 1e-4
    assert rel_rms(state_arrays(state)["wkv"], ref_state.wkv) <= 1e-4
    # decode only (the recurrent path from the start) meets the recurrent tolerance
    state, steps = None, []
    for t in range(8):
        logits, state = run(model, toks[:, t:t + 1], state)
        steps.append(logits)
    assert rel_rms(np.concatenate(steps, axis=1), forward(weights, cfg, toks[:, :8])[0]) <= 1e-5


def test_last_only_logits_are_the_last_row(case):
    cfg, weights, model = case
    toks = tokens(2, 21, seed=4)
    full, full_state = run(model, toks)
    last, state = model(mx.array(toks.astype(np.int32)), last_only=True)
    last = np.array(last)
    assert last.shape == (2, 1, V)
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    assert rel_rms(last, forward(weights, cfg, toks)[0][:, -1:]) <= 1e-4
    for name, arr in state_arrays(state).items():
        np.testing.assert_array_equal(arr, state_arrays(full_state)[name])


def test_state_is_checked_and_left_alone(case):
    cfg, _, model = case
    toks = tokens(2, 5)
    _, state = run(model, toks)
    before = state_arrays(state)
    run(model, toks, state)
    assert all(np.array_equal(a, state_arrays(state)[n]) for n, a in before.items())
    with pytest.raises(ModelError, match="a batch of 3"):
        run(model, tokens(3, 2), state)
    with pytest.raises(ModelError, match="must be a backends.mlx State"):
        run(model, toks, (state.att_x, state.meta_x, state.wkv))
    with pytest.raises(ModelError, match=r"token ids must be in \[0, 150\)"):
        run(model, [[1, V]])


def test_batch_rows_are_independent(case):
    cfg, weights, model = case
    toks = tokens(3, 21, seed=3)
    both, _ = run(model, toks)
    for i in range(3):
        np.testing.assert_allclose(run(model, toks[i:i + 1])[0][0], both[i], rtol=0, atol=1e-5)
    assert rel_rms(both[1], both[0]) > 0.1  # different rows really differ


def test_unit_lower_inverse():
    rng = np.random.default_rng(0)
    M = np.tril(rng.normal(0, 0.5, (3, 16, 16)), -1).astype(np.float32)
    expected = np.linalg.inv(np.eye(16) - M.astype(np.float64))
    assert rel_rms(np.array(_unit_lower_inverse(mx.array(M))), expected) <= 1e-6


def test_bfloat16_weights():
    import ml_dtypes

    weights = random_params(META, 0)
    model = from_tensors(META, {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()})
    assert model.head.weight.dtype == mx.bfloat16
    toks = tokens(1, 24)
    err = rel_rms(run(model, toks)[0], forward(weights, META, toks)[0])
    assert 1e-4 < err <= 3e-2  # really bfloat16, within the spec's bound


def column_major(w) -> bool:
    a = np.asarray(w.view(mx.uint16) if w.dtype == mx.bfloat16 else w)  # numpy has no bfloat16 buffers
    return a.flags["F_CONTIGUOUS"] and not a.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_layout_keeps_names_values_and_logits(dtype):
    """set_layout changes strides only (the torch twin's test): each product's operand row-major
    in float32 (linear maps column-major), column-major in bfloat16 (LoRA factors, param_values)."""
    from mlx.utils import tree_flatten

    weights = {k: v.astype(np.float32) for k, v in random_params(META, 0).items()}
    model = from_tensors(META, weights)
    if dtype == "bfloat16":
        model.set_dtype(mx.bfloat16)
    toks = tokens(1, 9)
    before = run(model, toks)[0]
    values = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    assert model.layout == "canonical" and model.set_layout("auto") == "decode" == model.layout  # CPU
    low = dtype == "bfloat16"
    att, meta = model.blocks[1].att, model.blocks[0].meta
    assert column_major(att.key.weight) != low and column_major(model.head.weight) != low
    assert column_major(meta.param_keys) != low
    assert column_major(att.w1) == low and column_major(meta.param_values) == low
    after = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    assert list(after) == list(values) and all(np.array_equal(after[k], v) for k, v in values.items())
    np.testing.assert_allclose(run(model, toks)[0], before, rtol=1e-5, atol=1e-5)
    assert model.set_layout("canonical") == "canonical"
    assert not any(column_major(v) for _, v in tree_flatten(model.parameters()))
    with pytest.raises(ModelError, match="layout must be"):
        model.set_layout("fast")


def test_load_sets_the_decode_layout_on_the_cpu(tmp_path):
    from weights import save_model

    weights = random_params(META, 0)
    save_model(tmp_path / "m", META, {k: v.astype(np.float32) for k, v in weights.items()})
    model, _ = load(tmp_path / "m", kernels="ops")
    assert model.layout == "decode" and column_major(model.head.weight)
    assert load(tmp_path / "m", kernels="ops", layout="canonical")[0].layout == "canonical"


@pytest.mark.parametrize("bits, bound", [(8, 2e-2), (4, 0.25)])
def test_quantized_logit_error(bits, bound):
    weights = random_params(META, 0)
    model = quantize(from_tensors(META, weights), bits=bits, group_size=64)
    assert model.cfg.extra["quantization"] == {"group_size": 64, "bits": bits}
    assert model.blocks[0].meta.param_keys.dtype == mx.uint32 and model.head.bits == bits
    assert model.blocks[0].att.w1.dtype == mx.float32  # LoRAs stay in full precision
    toks = tokens(1, 24)
    err = rel_rms(run(model, toks)[0], forward(weights, META, toks)[0])
    assert 1e-4 < err <= bound  # measured on this model: 8-bit ~1e-2, 4-bit ~0.17


def _reference_greedy(weights, cfg, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(forward(weights, cfg, np.array(seq)[None])[0][0, -1])))
    return seq[len(prompt):]


def generated(model, prompt, n, **kw):
    """The token ids metastate.api generates on the mlx engine over `model`."""
    from metastate.api import MLXEngine, stream_generate

    return [r.token for r in stream_generate(MLXEngine(model), None, prompt, n, **kw) if r.token is not None]


def test_greedy_generation_matches_reference():
    weights = random_params(META, 4)
    model = from_tensors(META, weights)
    prompt = tokens(1, 11, seed=5)[0]
    got = generated(model, prompt, 8, temperature=0.0, prefill_step=4)  # prefill in pieces, then decode
    assert got == _reference_greedy(weights, META, prompt, 8)
    stop = got[3]
    assert generated(model, prompt, 8, temperature=0.0, stop_ids=[stop]) == got[:got.index(stop)]  # stops before it


def test_sampled_generation_uses_shared_sampler_and_counts():
    weights = random_params(META, 4)
    model = from_tensors(META, weights)
    params = SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3, seed=7)
    prompt = tokens(1, 9, seed=6)[0]
    got = generated(model, prompt, 6, sampler=params)
    sampler, counts, seq = Sampler(params), np.zeros(V), list(prompt)
    for _ in range(6):
        token = sampler(forward(weights, META, np.array(seq)[None])[0][0, -1].astype(np.float32), counts)
        counts[token] += 1
        seq.append(token)
    assert got == seq[len(prompt):]


def test_kernels_argument():
    with pytest.raises(MetaStateError, match="'cuda' are not available on the mlx backend"):
        from_tensors(META, random_params(META, 0), kernels="cuda")
    if not mx.metal.is_available():
        with pytest.raises(MetaStateError, match="Metal"):
            from_tensors(META, random_params(META, 0), kernels="metal")


def test_metal_kernels_that_fail_their_check_fall_back_to_ops(monkeypatch):
    """The Metal kernels are compiled by the Mac's own compiler at first use, which no CI here
    runs: a body it rejects, or wrong results, must not end a chat. "auto" checks them against
    the plain ops at model load and falls back with a warning; "metal" says why it cannot."""
    from dataclasses import replace

    OPS = mlx_model.OPS

    def rejected(*args):
        raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: ...")

    def doubled_step(S, *args):
        y, S = OPS.step(S, *args)
        return 2 * y, S

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    weights = random_params(META, 0)
    expected = run(from_tensors(META, weights), tokens(1, 20))[0]
    for broken, problem in ((replace(OPS, name="metal", seq=rejected, step=rejected, read=rejected),
                             "Unable to build metal library"),
                            (replace(OPS, name="metal", step=doubled_step), "step y differs")):
        monkeypatch.setattr(mlx_model, "metal_kernels", lambda: broken)
        with pytest.warns(UserWarning, match=f"Metal kernels failed their check.*{problem}.*plain MLX ops"):
            model = from_tensors(META, weights, kernels="auto")
        assert model.kernels == "ops" and model.blocks[0].att.kern is OPS
        np.testing.assert_array_equal(run(model, tokens(1, 20))[0], expected)
        with pytest.raises(MetaStateError, match=f"failed their check on this machine: .*{problem}"):
            from_tensors(META, weights, kernels="metal")
    working = replace(OPS, name="metal")
    monkeypatch.setattr(mlx_model, "metal_kernels", lambda: working)
    model = from_tensors(META, weights, kernels="auto")
    assert model.kernels == "metal" and model.blocks[0].att.kern is working


# -- model directories ---------------------------------------------------------------------

def test_directory_round_trip_is_bit_exact(tmp_path):
    import ml_dtypes
    from weights import load_model, save_model

    weights = {k: v.astype(ml_dtypes.bfloat16) if k.endswith(".weight") else v.astype(np.float32)
               for k, v in random_params(META, 0).items()}  # mixed dtypes survive too
    save_model(tmp_path / "a", META, weights)
    model, tokenizer = load(tmp_path / "a", kernels="ops")
    assert tokenizer is None and model.emb.weight.dtype == mx.bfloat16
    save(model, tmp_path / "b")
    cfg, back = load_model(tmp_path / "b")
    assert cfg.to_dict() == META.to_dict()
    for name, t in weights.items():
        assert back[name].dtype == t.dtype and back[name].tobytes() == t.tobytes(), name


def test_compute_logits_backend(tmp_path):
    from metastate.api import compute_logits
    from weights import save_model

    weights = random_params(META, 0)
    save_model(tmp_path / "m", META, {k: v.astype(np.float32) for k, v in weights.items()})
    toks = tokens(1, 20)[0]
    ref = forward(weights, META, toks[None])[0][0]
    got = compute_logits(tmp_path / "m", toks, backend="mlx", kernels="ops")
    assert got.shape == (20, V) and got.dtype == np.float32
    assert rel_rms(got, ref) <= 1e-4
    assert 1e-4 < rel_rms(compute_logits(tmp_path / "m", toks, backend="mlx", dtype="bfloat16"), ref) <= 3e-2


def test_quantized_directory_round_trip(tmp_path):
    from backends.mlx import convert
    from metastate.api import compute_logits
    from weights import save_model

    weights = random_params(META, 0)
    save_model(tmp_path / "f", META, {k: v.astype(np.float32) for k, v in weights.items()})
    convert(tmp_path / "f", tmp_path / "q8", bits=8)
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8}
    model, _ = load(tmp_path / "q8", kernels="ops")
    in_memory = quantize(from_tensors(META, weights), bits=8)
    toks = tokens(1, 20)
    np.testing.assert_array_equal(run(model, toks)[0], run(in_memory, toks)[0])  # same packed weights
    got = compute_logits(tmp_path / "q8", toks[0], "mlx", kernels="ops")
    assert rel_rms(got, forward(weights, META, toks)[0][0]) <= 2e-2
    save(model, tmp_path / "q8b")  # a loaded quantized model saves again
    np.testing.assert_array_equal(run(load(tmp_path / "q8b", kernels="ops")[0], toks)[0], run(model, toks)[0])
    with pytest.raises(MetaStateError, match="already quantized"):
        quantize(model, bits=4)


def test_metal_kernels_in_the_model_through_cpu_harness(monkeypatch):
    """kernels="metal" wiring (prefill, SSE readout, decode) with the Metal kernel bodies run on
    the CPU by tests/metal_harness; on Apple silicon the real kernels run instead."""
    import shutil

    from backends.mlx import kernels as metal

    if not mx.metal.is_available():
        harness = pytest.importorskip("metal_harness")
        if shutil.which("g++") is None:
            pytest.skip("the Metal CPU harness needs g++")
        launch = harness.mlx_launch(metal.KERNEL_SOURCES, metal.KERNEL_IO)
        monkeypatch.setattr(metal, "_launch", launch)
    weights = random_params(META, 0)
    model = from_tensors(META, weights, kernels=mlx_model.metal_kernels())
    toks = tokens(1, 19)  # small: the harness runs every GPU thread on 2 CPU cores
    ref, ref_state = forward(weights, META, toks)
    logits, state = run(model, toks[:, :17])
    parts = [logits]
    for t in range(17, 19):
        logits, state = run(model, toks[:, t:t + 1], state)
        parts.append(logits)
    assert rel_rms(np.concatenate(parts, axis=1), ref) <= 1e-4
    assert rel_rms(state_arrays(state)["wkv"], ref_state.wkv) <= 1e-4
    if not mx.metal.is_available():
        names = {call[0] for call in launch.calls}
        assert {"wkv7_fwd", "wkv7_read", "wkv7_step", "wkv7_state_read"} <= names
