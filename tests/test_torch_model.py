"""The PyTorch model (backends.cuda) against the NumPy reference, SPEC section 6 tolerances.

The plain-ops chunked path on the CPU; the Triton kernels on the GPU when there is one, else
under Triton's interpreter (tests/conftest.py).
"""

import copy
import subprocess
import sys
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.cuda import Model, ModelError, State  # noqa: E402
from backends.cuda.model import Kernels  # noqa: E402
from backends.cuda.ops import wkv7  # noqa: E402
from backends.cuda.ops.elementwise import naive as naive_elementwise  # noqa: E402
from backends.cuda.ops.product_keys import naive as naive_product_keys  # noqa: E402
from backends.cuda.ops.wkv7 import naive_wkv7, torch_chunked_wkv7  # noqa: E402
from metastate_core.config import ModelConfig  # noqa: E402
from metastate_core.constants import KernelChoiceError  # noqa: E402
from metastate_core.params import param_shapes, random_params  # noqa: E402
from metastate_core.reference import State as RefState  # noqa: E402
from metastate_core.reference import forward  # noqa: E402

try:
    from backends.cuda.ops.wkv7 import triton_wkv7  # noqa: F401

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - not written yet, or triton itself missing
    HAS_TRITON = False
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton_wkv7 not available")

# d_att != d_model (H = 3 heads of 16, d = 64) and sse_heads 2 < the maximum 3.
CFG = ModelConfig(vocab_size=64, d_model=64, n_layer=2, head_size=16, d_att=48, sse_heads=2,
                  n_param_tokens=96, lora_w=8, lora_a=8, lora_v=8, lora_g=8)
T = 37  # not a multiple of the chunk size: three chunks, the last one padded


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and immune to a busy shared CPU (OpenMP spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


from metastate_core.reference import rel_rms  # noqa: E402  (SPEC section 6)


def tokens(batch=2, length=T, seed=1, vocab=CFG.vocab_size):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def run(model, toks, state=None, **kw):
    with torch.no_grad():
        return model(torch.as_tensor(toks, device=next(model.parameters()).device), state, **kw)


STATE_FIELDS = ("att_x", "meta_x", "wkv")


def torch_state(st: RefState) -> State:
    return State(*(torch.tensor(getattr(st, name), dtype=torch.float32) for name in STATE_FIELDS))


def assert_state_close(st: State, ref: RefState, tol):
    for name in STATE_FIELDS:
        assert rel_rms(getattr(st, name), getattr(ref, name)) <= tol, name


# -- the chunked WKV op ------------------------------------------------------------------

def wkv_inputs(B, L, H, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, L, H, N, generator=g) for _ in range(3))
    w_raw = 2 * torch.randn(B, L, H, N, generator=g)  # decays across the whole (0.545, 1) range
    kk = torch.nn.functional.normalize(torch.randn(B, L, H, N, generator=g), dim=-1)
    a = torch.rand(B, L, H, N, generator=g)
    return [r, w_raw, k, v, kk, a], torch.randn(B, H, N, N, generator=g), torch.randn(B, L, 2, N, generator=g)


@pytest.mark.parametrize("length,chunk", [(37, 16), (5, 16), (40, 8), (33, 64)])
def test_chunked_matches_naive_values_and_grads(length, chunk):
    inputs, S0, q = wkv_inputs(2, length, 3, 16)
    leaves = [t.requires_grad_() for t in inputs + [S0, q]]
    y, S, read = torch_chunked_wkv7(*leaves[:6], S0=S0, chunk_size=chunk)
    z = read(q)
    y_ref, z_ref, S_ref = naive_wkv7(*leaves[:6], S0=S0, q=q)
    for out, ref in ((y, y_ref), (z, z_ref), (S, S_ref)):
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_rms(out, ref) <= 1e-5
    weights = [torch.randn_like(t) for t in (y, z, S)]

    def grads(outs):
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        return torch.autograd.grad(loss, leaves)

    for name, g, g_ref in zip("r w_raw k v kk a S0 q".split(), grads((y, z, S)), grads((y_ref, z_ref, S_ref))):
        assert rel_rms(g, g_ref) <= 1e-4, name


def test_chunked_bfloat16_inputs_compute_in_float32():
    inputs, S0, _ = wkv_inputs(1, 20, 2, 16)
    y, S, _ = torch_chunked_wkv7(*(t.bfloat16() for t in inputs), S0=S0)
    y_ref, _, S_ref = naive_wkv7(*(t.bfloat16().float() for t in inputs), S0=S0)
    assert y.dtype == S.dtype == torch.float32
    assert rel_rms(y, y_ref) <= 1e-5 and rel_rms(S, S_ref) <= 1e-5


# -- whole model vs the NumPy reference -----------------------------------------------------

@pytest.fixture(scope="module")
def meta():
    p = random_params(CFG, 0)
    return p, Model.from_tensors(CFG, p)


def test_state_dict_names_are_canonical(meta):
    p, model = meta
    shapes = param_shapes(CFG)
    assert [(n, tuple(t.shape)) for n, t in model.state_dict().items()] == list(shapes.items())
    assert "blocks.0.att.v0" not in model.state_dict()


@pytest.mark.parametrize("sse", [False, True], ids=["rwkv7", "metastate"])
def test_logits_and_state_match_reference(sse):
    p = random_params(CFG, 0, sse=sse)
    toks = tokens()
    ref, ref_st = forward(p, CFG, toks)
    logits, st = run(Model.from_tensors(CFG, p), toks)
    assert logits.dtype == torch.float32 and logits.shape == (2, T, CFG.vocab_size)
    assert rel_rms(logits, ref) <= 1e-4
    assert_state_close(st, ref_st, 1e-4)


def test_prefill_then_decode_equals_one_pass(meta):
    p, model = meta
    toks = tokens(length=24)
    ref, ref_st = forward(p, CFG, toks)
    logits, st = run(model, toks[:, :17])
    steps = [logits]
    for t in range(17, 24):
        out, st = run(model, toks[:, t:t + 1], st)
        steps.append(out)
    assert rel_rms(torch.cat(steps, 1), ref) <= 1e-4
    assert_state_close(st, ref_st, 1e-4)


def test_last_only_logits_are_the_last_row(meta):
    # prefill asks for the last position only: the same row, against the reference, same state
    p, model = meta
    toks = tokens(length=19)
    ref, ref_st = forward(p, CFG, toks)
    full, st_full = run(model, toks)
    last, st = run(model, toks, last_only=True)
    assert last.shape == (2, 1, CFG.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)
    assert rel_rms(last, ref[:, -1:]) <= 1e-4
    assert all(torch.equal(getattr(st, name), getattr(st_full, name)) for name in STATE_FIELDS)


def test_batch_rows_do_not_leak(meta):
    """Three different sequences from three different states: each row as if alone."""
    p, model = meta
    _, start = forward(p, CFG, tokens(batch=3, length=9, seed=5))
    toks = tokens(batch=3, length=20, seed=6)
    logits, st = run(model, toks, torch_state(start))
    ref, ref_st = forward(p, CFG, toks, start)
    assert rel_rms(logits, ref) <= 1e-4
    assert_state_close(st, ref_st, 1e-4)
    for b in range(3):
        alone = State(*(getattr(torch_state(start), name)[:, b:b + 1] for name in STATE_FIELDS))
        row, _ = run(model, toks[b:b + 1], alone)
        assert rel_rms(row[0], ref[b]) <= 1e-4
        assert rel_rms(row[0], logits[b]) <= 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_weights(meta, dtype):
    p, _ = meta
    toks = tokens()
    ref, _ = forward(p, CFG, toks)
    model = Model.from_tensors(CFG, p, dtype=dtype)
    assert model.emb.weight.dtype == getattr(torch, dtype)
    logits, st = run(model, toks)
    assert logits.dtype == st.wkv.dtype == torch.float32
    assert rel_rms(logits, ref) <= 3e-2


# -- gradients -------------------------------------------------------------------------------

def loss_of(model, toks):
    toks = torch.as_tensor(toks, device=next(model.parameters()).device)
    logits, _ = model(toks[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), toks[:, 1:].flatten())


def grads_of(model, toks):
    model.zero_grad()
    loss_of(model, toks).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def with_kernels(model, kernels, device="cpu", **kw):
    """A copy of the model on `device`, computing with `kernels` (the shared model keeps its own)."""
    model = copy.deepcopy(model).to(device)
    model.set_kernels(kernels, **kw)
    return model


def on_kernel_device(model, kernels="triton", **kw):
    """with_kernels where the Triton kernels run: on the GPU when there is one, else on the CPU
    (the interpreter takes CPU tensors)."""
    return with_kernels(model, kernels, "cuda" if torch.cuda.is_available() else "cpu", **kw)


def test_gradient_reaches_every_parameter(meta):
    p, _ = meta
    model = Model.from_tensors(CFG, p)
    grads = grads_of(model, tokens(length=20))
    assert set(grads) == set(param_shapes(CFG))
    dead = [n for n, g in grads.items() if g is None or not torch.any(g != 0)]
    assert not dead


def naive_kernel(r, w_raw, k, v, kk, a, S0):
    """The per-token recurrence with the sequence-path signature, for gradient parity."""
    y, _, S = naive_wkv7(r, w_raw, k, v, kk, a, S0)
    return y, S, lambda q: naive_wkv7(r, w_raw, k, v, kk, a, S0, q=q)[1]


NAIVE = Kernels("naive", naive_kernel, wkv7.naive_wkv7_step, wkv7.state_readout, naive_elementwise,
                naive_product_keys)


def test_gradients_match_naive_recurrence(meta):
    p, model = meta
    toks = tokens(length=24)
    assert model.kernels == "ops"
    ops = grads_of(model, toks)
    ops = {n: g.clone() for n, g in ops.items()}
    naive = grads_of(with_kernels(model, NAIVE), toks)
    worst = max(rel_rms(ops[n], naive[n]) for n in ops)
    assert worst <= 1e-3


def test_freeze_sse_gate_is_rwkv7_and_out_of_the_optimizer(meta):
    p, _ = meta
    model = Model.from_tensors(CFG, p, freeze_sse_gate=True)
    gates = [b.meta.sse_gate for b in model.blocks]
    assert all(not g.requires_grad and not torch.any(g) for g in gates)
    trainable = {id(t) for t in model.parameters() if t.requires_grad}
    assert not trainable & {id(g) for g in gates}
    no_sse = {n: (np.zeros_like(t) if n.endswith("sse_gate") else t) for n, t in p.items()}
    toks = tokens()
    ref, _ = forward(no_sse, CFG, toks)
    assert rel_rms(run(model, toks)[0], ref) <= 1e-4
    loss_of(model, toks).backward()
    assert all(g.grad is None for g in gates)


def test_growth_parameters_get_gradient():
    growth = pytest.importorskip("metastate_core.growth", reason="metastate_core.growth not importable yet")
    p = random_params(CFG, 0)
    toks = tokens(length=12)
    base, _ = run(Model.from_tensors(CFG, p), toks)
    K, N, A = CFG.sse_heads, CFG.head_size, CFG.d_att
    # What SPEC 5 promises at once (see metastate_core.growth's docstring): the zero output
    # columns of new heads, the zero outputs of new layers, the zero gates of new SSE heads.
    # New parameter tokens (zero keys) provably get none, so only their shapes are checked.
    cases = {
        "param_tokens": (dict(param_tokens=CFG.n_param_tokens + 8), []),
        "heads": (dict(heads=CFG.n_head + 1), [("blocks.1.att.output.weight", np.s_[:, A:])]),
        "sse_heads": (dict(sse_heads=K + 1), [("blocks.0.meta.sse_gate", np.s_[K * N:(K + 1) * N])]),
        "layers": (dict(layers=CFG.n_layer + 1), [("blocks.2.att.output.weight", np.s_[:]),
                                                  ("blocks.2.meta.param_values", np.s_[:])]),
    }
    for rule, (step, at_once) in cases.items():
        cfg, q = growth.grow(CFG, p, **step)
        model = Model.from_tensors(cfg, q)
        grown, _ = run(model, toks)
        assert rel_rms(grown, base) <= 1e-6, rule
        grads = grads_of(model, toks)
        for name, where in at_once:
            assert torch.any(grads[name][where] != 0), (rule, name)
        # Once trained (noise on every tensor), every parameter, old or new, gets gradient.
        rng = np.random.default_rng(3)
        trained = {n: t + rng.normal(0, 0.1, t.shape) for n, t in q.items()}
        grads = grads_of(Model.from_tensors(cfg, trained), toks)
        dead = [n for n, g in grads.items() if g is None or not torch.any(g != 0)]
        assert not dead, rule
        assert torch.all(grads["blocks.0.meta.param_keys"].abs().sum(1) > 0), rule  # new tokens too


# -- tensors in and out --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_to_tensors_round_trip(meta, dtype):
    p, _ = meta
    model = Model.from_tensors(CFG, p, dtype=dtype)
    out = model.to_tensors()
    assert list(out) == list(param_shapes(CFG))
    assert all(t.dtype.name == dtype for t in out.values())
    again = Model.from_tensors(CFG, out).state_dict()
    assert all(torch.equal(again[n], t) for n, t in model.state_dict().items())
    if dtype == "float32":
        assert all(np.array_equal(out[n], p[n].astype(np.float32)) for n in p)


def test_from_tensors_rejects_bad_tensors(meta):
    p, _ = meta
    with pytest.raises(ModelError, match="missing tensor 'blocks.1.att.v0'"):
        Model.from_tensors(CFG, {n: t for n, t in p.items() if n != "blocks.1.att.v0"})
    with pytest.raises(ModelError, match="blocks.0.att.r_k"):
        Model.from_tensors(CFG, {**p, "blocks.0.att.r_k": np.zeros((2, 16))})
    with pytest.raises(KernelChoiceError, match="'metal' are not available on the torch backend"):
        Model.from_tensors(CFG, p, kernels="metal")


def test_load_model_and_compute_logits(meta, tmp_path):
    from metastate.api import compute_logits
    from weights import save_model

    p, _ = meta
    save_model(tmp_path, CFG, {n: t.astype(np.float32) for n, t in p.items()})
    toks = tokens(batch=1)[0]
    ref, _ = forward(p, CFG, toks[None])
    logits = compute_logits(tmp_path, toks, "torch", kernels="ops")
    assert logits.dtype == np.float32 and logits.shape == (T, CFG.vocab_size)
    assert rel_rms(logits, ref[0]) <= 1e-4
    assert rel_rms(compute_logits(tmp_path, toks, "torch", kernels="ops", dtype="bfloat16"), ref[0]) <= 3e-2
    with pytest.raises(ModelError, match="float64"):
        compute_logits(tmp_path, toks, "torch", dtype="float64")


# -- the decode layout and in-place state writes ------------------------------------------------

def column_major(t):
    return t.dim() == 2 and t.stride() == (1, t.shape[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_layout_keeps_names_values_and_logits(meta, dtype):
    """set_layout changes strides only: each product's operand is row-major in float32 (the
    linear maps stored column-major), column-major in bfloat16 (the LoRA factors and
    param_values); canonical puts everything back."""
    p, _ = meta
    model = Model.from_tensors(CFG, p, dtype=dtype)
    toks = tokens(length=9)
    before, st_before = run(model, toks)
    params = dict(model.named_parameters())
    assert model.layout == "canonical" and model.set_layout("auto") == "decode" == model.layout  # CPU
    assert dict(model.named_parameters()) == params  # the same Parameter objects (an optimizer keeps them)
    att = model.blocks[1].att
    low = dtype != "float32"
    assert column_major(att.key.weight) != low and column_major(model.head.weight) != low
    assert column_major(model.blocks[0].meta.param_keys) != low
    assert column_major(att.w1) == low and column_major(model.blocks[0].meta.param_values) == low
    assert model.emb.weight.is_contiguous()  # rows gathered, never multiplied
    state = model.state_dict()
    assert list(state) == list(param_shapes(CFG)) and all(torch.equal(state[n], t) for n, t in params.items())
    assert all(a.flags["C_CONTIGUOUS"] for a in model.to_tensors().values())
    after, st_after = run(model, toks)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st_after.wkv, st_before.wkv, rtol=1e-5, atol=1e-5)
    assert model.set_layout("canonical") == "canonical"
    assert all(t.is_contiguous() for t in model.parameters())
    with pytest.raises(ModelError, match="layout must be"):
        model.set_layout("fast")


def test_decode_follows_a_training_step_in_the_decode_layout(meta):
    """Nothing a decoded token reads is a stale copy of a parameter: after an optimizer step
    taken in the decode layout, decode equals that of a fresh model built from the new values,
    bit for bit (the one-token path shares the module code; issue 19)."""
    p, _ = meta
    model = Model.from_tensors(CFG, p)
    model.set_layout("decode")
    toks = torch.as_tensor(tokens(length=9))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, _ = model(toks[:, :-1], targets=toks[:, 1:])
    loss.backward()
    opt.step()
    fresh = Model.from_tensors(CFG, model.to_tensors())
    fresh.set_layout("decode")
    (old, _), (a, st_a), (b, st_b) = run(Model.from_tensors(CFG, p), toks[:, :8]), run(model, toks[:, :8]), \
        run(fresh, toks[:, :8])
    assert not torch.equal(a, old)  # the step changed the model
    (a, _), (b, _) = run(model, toks[:, 8:], st_a), run(fresh, toks[:, 8:], st_b)
    assert torch.equal(a, b)


def test_load_model_sets_the_decode_layout_on_the_cpu(meta, tmp_path):
    from backends.cuda import load_model
    from weights import save_model

    p, _ = meta
    save_model(tmp_path, CFG, {n: t.astype(np.float32) for n, t in p.items()})
    assert load_model(tmp_path).layout == "decode" and column_major(load_model(tmp_path).head.weight)
    model = load_model(tmp_path, layout="canonical")  # to train it
    assert model.layout == "canonical" and all(t.is_contiguous() for t in model.parameters())


def test_decode_writes_one_new_state_and_leaves_the_old_one(meta):
    """Without autograd each layer writes its S_T into the new state (no per-layer tensors
    stacked); the state given stays as it was, and the new one equals the reference's."""
    p, model = meta
    toks = tokens(length=12)
    _, st = run(model, toks[:, :11])
    kept = State(*(getattr(st, name).clone() for name in STATE_FIELDS))
    _, new = run(model, toks[:, 11:], st)
    assert all(torch.equal(getattr(st, n), getattr(kept, n)) for n in STATE_FIELDS)
    assert new.wkv.is_contiguous() and new.wkv.data_ptr() != st.wkv.data_ptr()
    _, ref_st = forward(p, CFG, toks)
    assert_state_close(new, ref_st, 1e-4)


def test_naive_step_writes_into_out_and_matches_the_spec_update():
    (r, w_raw, k, v, kk, a), S0, _ = wkv_inputs(2, 1, 3, 8, seed=4)
    args = [t[:, 0].double() for t in (r, w_raw, k, v, kk, a)]
    S0 = S0.double()
    w = torch.exp(wkv7.decay_log(args[1]))
    sa = torch.einsum("bhij,bhj->bhi", S0, -args[4])  # SPEC section 2, term by term
    want = (S0 * w[:, :, None, :] + sa[..., None] * (args[4] * args[5])[:, :, None, :]
            + args[3][..., None] * args[2][:, :, None, :])
    y, S = wkv7.naive_wkv7_step(S0, *args)
    torch.testing.assert_close(S, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, torch.einsum("bhij,bhj->bhi", want, args[0]), rtol=1e-12, atol=1e-12)
    out = torch.empty_like(S0)
    y2, S2 = wkv7.naive_wkv7_step(S0, *args, out=out)
    assert S2 is out and torch.equal(S2, S) and torch.equal(y2, y)


def test_import_without_torch_names_the_extra():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from metastate_core.errors import MetaStateError\n"
            "try:\n    import backends.cuda\nexcept MetaStateError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install -e '.[torch]'" in out.stdout, out.stderr


def test_ops_path_runs_without_triton():
    """macOS has torch but no triton: the plain-ops model must still import and run."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\nfrom backends.cuda import Model\n"
            "from metastate_core.config import ModelConfig\n"
            "from metastate_core.params import random_params\n"
            "cfg = ModelConfig(vocab_size=8, d_model=32, n_layer=1, head_size=16)\n"
            "m = Model.from_tensors(cfg, random_params(cfg))\n"
            "print(m(torch.zeros(1, 3, dtype=torch.long))[0].shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "torch.Size([1, 3, 8])" in out.stdout, out.stderr[-500:]


# -- Triton kernels (interpreter on CPU) ---------------------------------------------------

@needs_triton
def test_triton_logits_match_reference(meta):
    p, model = meta
    model = on_kernel_device(model)
    toks = tokens(length=12)
    ref, ref_st = forward(p, CFG, toks)
    logits, st = run(model, toks)
    assert rel_rms(logits, ref) <= 1e-4
    assert_state_close(st, ref_st, 1e-4)


@needs_triton
def test_triton_prefill_then_decode(meta):
    p, model = meta
    model = on_kernel_device(model)
    toks = tokens(length=12)
    ref, ref_st = forward(p, CFG, toks)
    logits, st = run(model, toks[:, :9])
    steps = [logits]
    for t in range(9, 12):
        out, st = run(model, toks[:, t:t + 1], st)
        steps.append(out)
    assert rel_rms(torch.cat(steps, 1), ref) <= 1e-4
    assert_state_close(st, ref_st, 1e-4)


@needs_triton
@pytest.mark.parametrize("kernel", ["triton", "sequential"])
def test_triton_gradients_match_naive_recurrence(meta, kernel):
    # "triton" trains through the chunked kernels; the sequential kernel is passed as Kernels.
    sequential = Kernels("sequential", wkv7.triton_wkv7, wkv7.naive_wkv7_step, wkv7.state_readout, naive_elementwise,
                         naive_product_keys)
    p, model = meta
    toks = tokens(length=24)
    got = grads_of(on_kernel_device(model, "triton" if kernel == "triton" else sequential), toks)
    got = {n: g.cpu() for n, g in got.items()}
    naive = grads_of(with_kernels(model, NAIVE), toks)
    errs = {n: rel_rms(got[n], naive[n]) for n in got}
    assert max(errs.values()) <= 1e-3, errs


@pytest.mark.parametrize("kernels", ["ops", pytest.param("triton", marks=needs_triton)])
def test_grad_checkpoint_same_gradients_less_memory(meta, monkeypatch, kernels):
    p, model = meta
    model = on_kernel_device(model) if kernels == "triton" else model
    toks = torch.as_tensor(tokens(length=24), device=next(model.parameters()).device)
    params = dict(model.named_parameters())
    refs = {"norms": [], "states": []}
    if kernels == "triton":  # the chunk kernels' saved states, kept for backward
        from backends.cuda.ops.wkv7 import chunk

        real = chunk.chunk_wkv7_fwd

        def spy(*a, **kw):
            out = real(*a, **kw)
            refs["states"].append(weakref.ref(out[2].states))
            return out

        monkeypatch.setattr(chunk, "chunk_wkv7_fwd", spy)
    grads, alive = {}, {}

    def count_alive(*_):  # when the final norm runs, after every block
        alive[ckpt] = {k: sum(r() is not None for r in v) for k, v in refs.items()}

    hooks = [m.register_forward_hook(lambda mod, i, out: refs["norms"].append(weakref.ref(out)))
             for b in model.blocks for m in (b.ln1, b.ln2)]
    hooks.append(model.ln_out.register_forward_pre_hook(count_alive))
    for ckpt in (False, True):
        for r in refs.values():
            r.clear()
        model.zero_grad()
        logits = model(toks, grad_checkpoint=ckpt)[0]
        logits.square().mean().backward()
        grads[ckpt] = {n: t.grad.clone() for n, t in params.items()}
    for h in hooks:
        h.remove()
    # Recomputation repeats the same arithmetic: identical gradients, not merely close.
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in params)
    # With checkpoints no block activation outlives its block's forward (a view of the last
    # token would keep a whole ln1/ln2 output); without them the WKV states stay for backward.
    assert alive[True] == {"norms": 0, "states": 0}, alive
    if kernels == "triton":
        assert alive[False]["states"] == CFG.n_layer, alive


@needs_triton
@pytest.mark.parametrize("dtype,autocast,expected", [
    ("float32", False, None), ("bfloat16", False, "tf32"), ("float32", True, "tf32")])
def test_triton_dot_precision_follows_the_weights(meta, monkeypatch, dtype, autocast, expected):
    # float32 weights: float32-accurate dots (SPEC 1e-4); bfloat16 weights or autocast: TF32.
    seen = []
    real = wkv7.chunk_wkv7
    monkeypatch.setattr(wkv7, "chunk_wkv7", lambda *a, **kw: seen.append(kw["precision"]) or real(*a, **kw))
    p, _ = meta
    model = on_kernel_device(Model.from_tensors(CFG, p, dtype=dtype))  # chooses the kernels after the patch
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        run(model, tokens(length=5))
    assert seen == [expected] * CFG.n_layer


@needs_triton
@pytest.mark.parametrize("kernels,fused,expected", [
    ("triton", None, True), ("triton", False, False), ("ops", None, False), ("ops", True, True)])
def test_fused_elementwise_follows_the_arguments(meta, monkeypatch, kernels, fused, expected):
    # The fused pieces run by default with the Triton kernels and only when asked otherwise;
    # the logits are the reference's either way.
    from backends.cuda.ops.elementwise import fused as fused_module

    calls = []
    for name in ("token_shift_mix", "k_prep", "group_norm_bonus_gate", "sse_norm_gate", "relu_square"):
        real = getattr(fused_module, name)
        monkeypatch.setattr(fused_module, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    p, model = meta
    toks = tokens(length=12)
    logits, _ = run(on_kernel_device(model, kernels, fused=fused), toks)
    # per layer: two token shifts, the keys, the time-mix output, the SSE input, relu^2
    assert len(calls) == (6 * CFG.n_layer if expected else 0), calls
    assert rel_rms(logits, forward(p, CFG, toks)[0]) <= 1e-4


@needs_triton
def test_fused_elementwise_bfloat16_model(meta):
    # bfloat16 weights: the fused pieces store their outputs in bfloat16 for the matmuls.
    p, _ = meta
    toks = tokens(length=12)
    model = Model.from_tensors(CFG, p, dtype="bfloat16")
    fused_logits, _ = run(on_kernel_device(model), toks)
    plain_logits, _ = run(on_kernel_device(model, fused=False), toks)
    ref, _ = forward(p, CFG, toks)
    assert 1e-4 < rel_rms(fused_logits, ref) <= 3e-2
    # no less accurate than the plain pieces (measured 5.2e-3 vs 4.9e-3 under the interpreter,
    # which truncates to bfloat16 where a GPU rounds)
    assert rel_rms(fused_logits, ref) <= 1.5 * rel_rms(plain_logits, ref)


@needs_triton
def test_triton_head_size_128_runs_on_the_sequential_kernel(monkeypatch):
    # Past N = 64 the chunked kernels' tiles outgrow a GPU (chunk.MAX_HEAD_SIZE): the model
    # takes the sequential kernel, and still computes the reference's logits.
    cfg = ModelConfig(vocab_size=40, d_model=128, n_layer=1, head_size=128, n_param_tokens=32)
    p = random_params(cfg, 3)
    calls = []
    real = wkv7.triton_wkv7
    monkeypatch.setattr(wkv7, "triton_wkv7", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    toks = tokens(batch=1, length=5, vocab=40)
    logits, _ = run(on_kernel_device(Model.from_tensors(cfg, p)), toks)
    assert calls == [1] and rel_rms(logits, forward(p, cfg, toks)[0]) <= 1e-4


def test_kernels_for_head_sizes_the_triton_kernels_cannot_take():
    from backends.cuda.model import auto_kernels

    odd = ModelConfig(vocab_size=40, d_model=48, n_layer=1, head_size=48, n_param_tokens=8)
    model = Model.from_tensors(odd, random_params(odd, 0))
    with pytest.raises(ModelError, match="power-of-two head size in \\[16, 256\\], and this model's is 48: use "
                                         "kernels='ops'"):
        model.set_kernels("triton")
    with pytest.warns(UserWarning, match="this model's is 48: running on plain torch ops"):
        assert auto_kernels(odd, torch.device("cuda")) == "ops"
    assert auto_kernels(CFG, torch.device("cpu")) == "ops"
    if HAS_TRITON:
        assert auto_kernels(CFG, torch.device("cuda")) == "triton"


def test_fused_elementwise_needs_a_kernel_device(meta, monkeypatch):
    p, model = meta
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("CPU tensors on a CUDA machine")
    pytest.importorskip("triton")
    with pytest.raises(ModelError, match="CUDA tensors"):
        model.set_kernels("ops", fused=True)


def test_forward_refuses_what_it_cannot_compute():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layer=1, head_size=16)
    model = Model.from_tensors(cfg, random_params(cfg, 0, np.float32), dtype="float32")
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ModelError, match="at least one token"):
        model(tokens[:, :0])
    for bad in (tokens.float(), tokens.to(torch.uint8), tokens[None]):
        with pytest.raises(ModelError, match="tokens must be int64 or int32 ids"):
            model(bad)
    with pytest.raises(ModelError, match="last_only and targets"):
        model(tokens, targets=tokens, last_only=True)
    _, state = model(tokens)
    with pytest.raises(ModelError, match=r"state.wkv must be a float32 tensor \[1, 1, 2, 16, 16\].*float16"):
        model(tokens[:, :1], State(state.att_x, state.meta_x, state.wkv.half()))
    with pytest.raises(ModelError, match="a batch of 2"):
        model(torch.tensor([[1], [2]]), state)
    # an id past the embedding: a device-side assert on a GPU, a clear error here
    for ids in ([[1, 50]], [[-1, 2]]):
        with pytest.raises(ModelError, match=r"token ids must be in \[0, 50\)"):
            model(torch.tensor(ids))
    with pytest.raises(ModelError, match="state.att_x is on meta and the model on cpu"):
        model(tokens, State(*(getattr(state, name).to("meta") for name in STATE_FIELDS)))
    with pytest.raises(ModelError, match="must be a backends.cuda State.*tuple"):
        model(tokens, tuple(getattr(state, name) for name in STATE_FIELDS))
    with pytest.raises(ModelError, match=r"chunk_size must be an integer in \[1, 64\], got 0"):
        model.set_kernels("ops", chunk_size=0)
