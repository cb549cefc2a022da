"""Decoding from a CUDA graph (backends/cuda/decode_graph.py): the same logits and states as the
eager Triton path, token after token, on a GPU (scripts/gpu_check.sh runs these); clear errors
everywhere else."""

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.cuda.model import Model, ModelError  # noqa: E402
from metastate_core.config import ModelConfig  # noqa: E402
from metastate_core.params import init_params  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (scripts/gpu_check.sh runs it)")


FIELDS = ("att_x", "meta_x", "wkv")


def _model(device, dtype="float32"):
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layer=2, head_size=16, d_att=64, sse_heads=2)
    return Model.from_tensors(cfg, init_params(cfg, 5), device=device, dtype=dtype)


def test_decode_graph_refuses_a_cpu_model():
    from backends.cuda.decode_graph import DecodeGraph

    with pytest.raises(ModelError, match="CUDA graphs need the model on a CUDA device"):
        DecodeGraph(_model("cpu"))


def test_decode_graph_checks_what_the_model_checks():
    # A replay never runs Model.forward, so the graph checks tokens and state itself. The checks
    # come before any CUDA call: a graph built around a CPU model (bypassing __init__'s refusal)
    # shows them here.
    from backends.cuda.decode_graph import DecodeGraph
    from backends.cuda.model import State

    model = _model("cpu")
    graph = DecodeGraph.__new__(DecodeGraph)
    graph.model, graph.graph = model, None
    graph.tokens = torch.zeros(2, 1, dtype=torch.long)
    state = State.zeros(model.cfg, 2, torch.device("cpu"))
    with pytest.raises(ModelError, match="int64/int32 token for each of 2"):
        graph(torch.zeros(2, 1), state)
    with pytest.raises(ModelError, match=r"token ids must be in \[0, 97\), got ids from 3 to 97"):
        graph(torch.tensor([[3], [97]]), state)
    with pytest.raises(ModelError, match="state.wkv must be a float32 tensor"):
        graph(torch.tensor([[3], [4]]), replace(state, wkv=state.wkv.double()))
    with pytest.raises(ModelError, match="a batch of 2"):
        graph(torch.tensor([[3], [4]]), State.zeros(model.cfg, 3, torch.device("cpu")))


def test_load_refuses_cuda_graphs_without_cuda(tmp_path):
    from metastate.api import BackendError, load
    from weights import save_model

    cfg = ModelConfig(vocab_size=50, d_model=32, n_layer=1, head_size=16)
    save_model(tmp_path / "m", cfg, init_params(cfg, 0))
    with pytest.raises(BackendError, match="torch backend option"):
        load(tmp_path / "m", "numpy", cuda_graphs=True)
    with pytest.raises(BackendError, match="CUDA graphs need a CUDA device"):
        load(tmp_path / "m", "torch", device="cpu", cuda_graphs=True)


@needs_cuda
@pytest.mark.parametrize("batch, dtype", [(1, "float32"), (3, "bfloat16")])
def test_cuda_graph_decode_matches_eager(batch, dtype):
    from backends.cuda.decode_graph import DecodeGraph

    model = _model("cuda", dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, 97, (batch, 9), device="cuda", generator=g)
    with torch.no_grad():
        assert model.kernels == "triton"  # "auto" on a GPU
        _, state = model(prompt)
        graph = DecodeGraph(model, batch=batch)
        eager_state = graph_state = state
        before = [getattr(state, f).clone() for f in FIELDS]
        kept = []  # every output: they must not be the graph's buffers, which the next replay overwrites
        for _ in range(12):
            tok = torch.randint(0, 97, (batch, 1), device="cuda", generator=g)
            want, eager_state = model(tok, eager_state)
            got, graph_state = graph(tok, graph_state)
            kept.append((want, got, eager_state, graph_state))
        for want, got, eager, graphed in kept:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for f in FIELDS:
                torch.testing.assert_close(getattr(graphed, f), getattr(eager, f), rtol=1e-5, atol=1e-5)
        assert all(torch.equal(getattr(state, f), b) for f, b in zip(FIELDS, before))  # inputs left alone
        # the static buffers carry nothing between calls: an older state gives its own answer
        want, _ = model(tok, state)
        got, _ = graph(tok, state)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the graph reads the parameters where they are: an in-place update shows in the replay
        model.head.weight.mul_(2)
        want, _ = model(tok, state)
        got, _ = graph(tok, state)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ModelError, match="one int64/int32 token for each of"):
            graph(torch.zeros(batch + 1, 1, dtype=torch.long, device="cuda"), state)
        with pytest.raises(ModelError, match="token ids must be in"):  # not a device-side assert
            graph(torch.full((batch, 1), 97, device="cuda"), state)
        got, _ = graph(tok, state)  # and the process is still sound
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_cuda_graph_engine_generates_the_same_tokens(tmp_path):
    from metastate.api import load
    from weights import save_model

    cfg = ModelConfig(vocab_size=97, d_model=64, n_layer=2, head_size=16, d_att=64, sse_heads=2)
    save_model(tmp_path / "m", cfg, init_params(cfg, 5))
    runs = []
    for graphs in (False, True):
        engine, _ = load(tmp_path / "m", "torch", kernels="triton", cuda_graphs=graphs)
        logits, state = engine.prefill([1, 2, 3, 4, 5])
        tokens = []
        for _ in range(10):  # greedy
            tokens.append(int(np.argmax(logits)))
            logits, state = engine.step(tokens[-1], state)
        runs.append(tokens)
    assert "CUDA graphs" in engine.description
    assert runs[1] == runs[0]


@needs_cuda
def test_cuda_graph_captures_again_after_a_change_of_kernels():
    from backends.cuda.decode_graph import DecodeGraph

    model = _model("cuda")
    tok = torch.tensor([[5]], device="cuda")
    with torch.no_grad():
        _, state = model(torch.arange(9, device="cuda")[None])
        graph = DecodeGraph(model)
        graph(tok, state)
        first = graph.graph
        model.set_kernels("triton", fused=False)  # the plain elementwise pieces: other kernels
        got, _ = graph(tok, state)
        second = graph.graph
        assert second is not first
        want, _ = model(tok, state)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        graph(tok, state)
        assert graph.graph is second  # captured again once, not at every call
