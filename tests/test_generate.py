"""Generation (metastate.api and `metastate generate`) on tiny random models.

Greedy tokens are judged against an argmax loop over the NumPy float64 reference run on the
whole sequence each step (no state carry, no chunking), and must be the same on every backend.
Streaming, stop strings and end-of-text are checked with a scripted engine whose logits force
a known token sequence through a byte-level tokenizer.
"""

import re
import subprocess
import sys

import numpy as np
import pytest

import metastate.api as api
from metastate.api import Engine, generate, load, stream_generate
from metastate.cli import main
from metastate_core.config import ModelConfig
from metastate_core.params import random_params
from metastate_core.reference import forward
from metastate_core.sampling import SamplingParams
from metastate_core.tokenizers import SentencePieceTokenizer
from weights import save_model

CLI = [sys.executable, "-m", "metastate.cli"]
WORDS = "the king queen good lord my night day love speak sweet what is not and of to you me here".split()


def make_model(root, **extra):
    """A random float32 model (every path active) with a tiny SentencePiece tokenizer."""
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 8)) + "." for _ in range(200)]
    tok = SentencePieceTokenizer.train(iter(lines), 120, root / "tok" / "tokenizer.model",
                                       byte_fallback=False, user_defined_symbols=["\n"])
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layer=2, head_size=16, n_param_tokens=64,
                      sse_heads=1, tokenizer=tok.to_config(), extra=extra)
    tensors = random_params(cfg, 1, np.float32)
    save_model(root / "model", cfg, tensors, extra_files={"tokenizer.model": root / "tok" / "tokenizer.model"})
    return root / "model", cfg, tensors


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("gen"))


def reference_greedy(tensors, cfg, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits, _ = forward(tensors, cfg, np.array(ids)[None], dtype=np.float64)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc, err, *fragments):
    assert rc != 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert not [l for l in lines[:-1] if not l.startswith("backend: ")], err
    for f in fragments:
        assert f in lines[-1], lines[-1]


# -- greedy parity across backends ----------------------------------------------------------
PROMPT = [5, 17, 42, 3, 99, 64, 8]


@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
def test_greedy_matches_reference_on_every_backend(model, backend):
    path, cfg, tensors = model
    expected = reference_greedy(tensors, cfg, PROMPT, 16)
    engine, _ = load(path, backend)
    assert engine.backend == backend
    got = [r.token for r in stream_generate(engine, None, PROMPT, 16, temperature=0.0) if r.token is not None]
    assert got == expected


def test_prefill_in_pieces_equals_one_pass(model):
    """The prompt goes through the sequence path in pieces; the state carries between them."""
    path, cfg, tensors = model
    engine, _ = load(path, "numpy")
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, 40)
    ref_logits, ref_state = forward(tensors, cfg, ids[None], dtype=np.float64)
    for step in (7, 16, 512):
        logits, state = engine.prefill(ids, step=step)
        np.testing.assert_allclose(logits, ref_logits[0, -1], rtol=0, atol=1e-4 * np.abs(ref_logits).max())
        np.testing.assert_allclose(engine.state_to_arrays(state)["wkv"], ref_state.wkv[:, 0],
                                   rtol=0, atol=1e-4 * np.abs(ref_state.wkv).max())


def test_numpy_prefill_multiplies_the_head_for_the_last_token_only(model, monkeypatch):
    """The NumPy engine's prefill: the head's product (a 65536-token vocabulary makes it the
    largest of a prompt) for one row a piece, over weights in the decode layout."""
    import metastate_core.reference as reference

    path, cfg, tensors = model
    engine, _ = load(path, "numpy")
    assert all(engine.weights[k].T.flags["C_CONTIGUOUS"] for k in engine.weights
               if k.endswith(reference.TRANSPOSED_PRODUCTS))
    rows, product = [], reference.mm

    def counted(x, w):
        if w.shape == (cfg.d_model, cfg.vocab_size):  # the head
            rows.append(x.shape[:-1])
        return product(x, w)

    monkeypatch.setattr(reference, "mm", counted)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, 40)
    logits, _ = engine.prefill(ids, step=16)
    assert rows == [(1, 1)] * 3  # pieces of 16, 16 and 8 tokens
    ref_logits, _ = forward(tensors, cfg, ids[None], dtype=np.float64)
    np.testing.assert_allclose(logits, ref_logits[0, -1], rtol=0, atol=1e-4 * np.abs(ref_logits).max())


@pytest.mark.parametrize("backend", ["numpy", "torch", "mlx"])
def test_forward_from_a_state_gives_every_position(model, backend):
    """Engine.forward: the logits of every position of some tokens read after a state, and the
    state after them, as if the whole text were read from the start."""
    if backend != "numpy":
        pytest.importorskip(backend)
    path, cfg, tensors = model
    engine, _ = load(path, backend)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, 30)
    ref_logits, ref_state = forward(tensors, cfg, ids[None], dtype=np.float64)
    logits, state = engine.forward(ids[12:], engine.prefill(ids[:12])[1])
    assert logits.shape == (18, cfg.vocab_size) and logits.dtype == np.float32
    scale = np.abs(ref_logits).max()
    np.testing.assert_allclose(logits, ref_logits[0, 12:], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(engine.state_to_arrays(state)["wkv"], ref_state.wkv[:, 0],
                               rtol=0, atol=1e-4 * np.abs(ref_state.wkv).max())
    np.testing.assert_allclose(engine.forward(ids)[0], ref_logits[0], rtol=0, atol=1e-4 * scale)  # zero state


def test_state_continues_a_generation(model):
    """Generating in two calls (the second from the first's final state) equals one call."""
    path, _, _ = model
    engine, tok = load(path, "numpy")
    whole = [r.token for r in stream_generate(engine, tok, PROMPT, 12, temperature=0) if r.token is not None]
    first = list(stream_generate(engine, tok, PROMPT, 6, temperature=0))
    head = [r.token for r in first if r.token is not None]
    nxt = int(np.argmax(first[-1].logits))  # the final piece holds the state after all 6 tokens
    tail = [r.token for r in stream_generate(engine, tok, [nxt], 5, temperature=0, state=first[-1].state)
            if r.token is not None]
    assert head + [nxt] + tail == whole


def test_seed_and_top_k(model):
    path, _, _ = model
    engine, tok = load(path, "numpy")
    a = generate(engine, tok, "the king", 20, temperature=1.0, seed=7)
    b = generate(engine, tok, "the king", 20, temperature=1.0, seed=7)
    greedy = generate(engine, tok, "the king", 20, temperature=0.0)
    assert a == b
    assert generate(engine, tok, "the king", 20, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(engine, tok, "the king", 20, sampler=SamplingParams(temperature=0.0)) == greedy


def test_auto_backend_and_default_model(model, monkeypatch, tmp_path):
    path, _, _ = model
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the measured choice is cached there
    monkeypatch.setattr(api, "default_model_path", lambda: path)
    engine, tok = load()
    assert engine.path == path.resolve() and tok is not None
    assert engine.backend in api.BACKENDS and (tmp_path / "cache" / "metastate" / "policy.json").is_file()
    monkeypatch.setattr(api, "default_model_path", lambda: tmp_path / "absent")
    with pytest.raises(api.GenerationError, match="default model"):
        load()


# -- streaming, stop strings, end of text ---------------------------------------------------
class ByteTokenizer:
    """Ids 0..255 are bytes, 256 is end-of-text."""

    vocab_size, eos_id = 257, 256

    def encode(self, text):
        return list(text.encode())

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class Scripted(Engine):
    """Logits that make greedy sampling follow `script`; the state is the position in it."""

    backend = "scripted"

    def __init__(self, script):
        super().__init__(ModelConfig(vocab_size=257, d_model=16, n_layer=1, head_size=16))
        self.script = list(script)

    def zero_state(self):
        return 0

    def _forward(self, ids, state, every=False):  # one sequence: ids [1, T]
        state = 0 if state is None else state
        pos = state + ids.shape[1]
        logits = np.zeros((1, 257), np.float32)
        logits[0, self.script[pos] if pos < len(self.script) else 256] = 10.0
        return logits, pos


def pieces(text_after_prompt, prompt="P", **kw):
    tok = ByteTokenizer()
    script = tok.encode(prompt) + (text_after_prompt if isinstance(text_after_prompt, list)
                                   else tok.encode(text_after_prompt))
    return list(stream_generate(Scripted(script), tok, prompt, kw.pop("max_tokens", 100), temperature=0, **kw))


def test_stream_never_splits_a_character():
    out = pieces("né😀 ok")
    texts = [r.text for r in out]
    assert "".join(texts) == "né😀 ok"
    assert all("\ufffd" not in t for t in texts)
    assert out[-1].finish_reason == "eos" and out[-1].token is None
    assert [r.token for r in out[:-1]] == list("né😀 ok".encode())


def test_stop_string_is_held_back_and_excluded():
    out = pieces("ab\ncd\n\nnever", stop=["\n\n"])
    texts = [r.text for r in out]
    assert "".join(texts) == "ab\ncd"
    assert out[-1].finish_reason == "stop"
    # the lone "\n" could start the stop string: held back until "c" arrives
    assert texts[:5] == ["a", "b", "", "\nc", "d"]
    # the state has read every generated token, the stop string's included
    assert out[-1].state == 1 + len("ab\ncd\n\n")


def test_every_piece_carries_the_state_after_it():
    """chat keeps the state of the last piece it saw (an interrupted answer goes on from it)."""
    out = pieces("abcd", max_tokens=3)
    assert [r.state for r in out] == [2, 3, 4, 4]  # the prompt "P", then one token each
    assert [r.generation_tokens for r in out] == [1, 2, 3, 3]


def test_a_bare_stop_string_is_one_stop_string():
    assert "".join(r.text for r in pieces("ab\ncd\n\nnever", stop="\n\n")) == "ab\ncd"  # not "\n" and "\n"


def test_text_after_a_state_continues_it(model):
    """A text prompt with a state goes on from that text: no SentencePiece space in front of it
    (docs/chat.md continues a story this way)."""
    path, _, _ = model
    engine, tok = load(path, "numpy")
    text = "\nthe queen"
    assert tok.encode(text) != api.encode_continuation(tok, text)  # the space the tokenizer would add
    first = list(stream_generate(engine, tok, "the king", 0))[-1]
    after = list(stream_generate(engine, tok, text, 0, state=first.state))[-1]
    expected, _ = engine.prefill(api.encode_continuation(tok, text), first.state)
    assert np.array_equal(after.logits, expected) and after.prompt_tokens == len(api.encode_continuation(tok, text))


def test_length_and_eos():
    out = pieces("abcdef", max_tokens=3)
    assert "".join(r.text for r in out) == "abc" and out[-1].finish_reason == "length"
    assert out[-1].generation_tokens == 3 and out[-1].prompt_tokens == 1
    out = pieces("ab")
    assert "".join(r.text for r in out) == "ab" and out[-1].finish_reason == "eos"
    out = pieces([0xC3], max_tokens=5)  # output ends inside a character: flushed as U+FFFD
    assert out[-1].text == "\ufffd"


def test_api_errors(model):
    path, _, _ = model
    engine, tok = load(path, "numpy")
    with pytest.raises(api.GenerationError, match="empty"):
        generate(engine, tok, "", 5)
    with pytest.raises(api.GenerationError, match="empty"):
        generate(engine, tok, [], 5)
    with pytest.raises(api.GenerationError, match="out of range"):
        generate(engine, tok, [10_000], 5)
    with pytest.raises(api.MetaStateError, match="top_p"):
        generate(engine, tok, "the", 5, top_p=2.0)
    with pytest.raises(api.GenerationError, match="must be integers"):  # not rounded to [1, 2]
        generate(engine, tok, [1.7, 2.2], 5)
    with pytest.raises(api.GenerationError, match="one list of token ids"):  # a batch is not flattened
        generate(engine, tok, [[1, 2], [3, 4]], 5)
    with pytest.raises(api.GenerationError, match="prefill step must be a positive"):
        generate(engine, tok, [1, 2], 5, prefill_step=0)
    with pytest.raises(api.GenerationError, match="max_tokens must be an integer"):
        generate(engine, tok, [1, 2], True)
    out = list(stream_generate(engine, None, [1, 2], np.int64(3)))  # any integer type
    assert sum(r.token is not None for r in out) == 3 and out[-1].finish_reason == "length"


def test_torch_load_refuses_what_it_cannot_run(model, monkeypatch):
    torch = pytest.importorskip("torch")
    path, _, _ = model
    if not torch.cuda.is_available():
        with pytest.raises(api.BackendError, match="sees no CUDA GPU"):
            load(path, "torch", device="cuda")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' CPU stand-in for a GPU
        with pytest.raises(api.MetaStateError, match="Triton kernels run on CUDA tensors"):
            load(path, "torch", kernels="triton")  # at load, not at the first token
    with pytest.raises(api.BackendError, match="unknown torch device 'gpu'"):
        load(path, "torch", device="gpu")
    if not torch.backends.mps.is_available():  # a device type this torch build cannot use
        with pytest.raises(api.BackendError, match="cannot put the model on mps"):
            load(path, "torch", device="mps")


# -- `metastate generate` -------------------------------------------------------------------
def test_cli_generate_streams_and_reports_speed(model, capsys):
    path, _, _ = model
    engine, tok = load(path, "numpy")
    expected = generate(engine, tok, "the king", 12, temperature=0)
    rc, out, err = run(["generate", "--model", path, "--prompt", "the king", "--max-tokens", 12,
                        "--temperature", 0, "--backend", "numpy", "--verbose"], capsys)
    assert rc == 0, err
    assert re.fullmatch(r"backend: numpy \(cpu, float32(, threads \d+)?\)", err.strip()), err
    lines = out.splitlines()
    assert re.fullmatch(r"prefill: \d+\.\d tok/s, decode: \d+\.\d tok/s", lines[-1]), lines[-1]
    assert out[: out.rindex("\nprefill:")] == expected.rstrip("\n")


def test_cli_generate_stop_and_sampling_flags(model, capsys):
    path, _, _ = model
    engine, tok = load(path, "numpy")
    full = generate(engine, tok, "the king", 30, temperature=0.8, top_p=0.9, top_k=20, min_p=0.01,
                    presence_penalty=0.3, frequency_penalty=0.2, seed=11)
    stop = full[5:8]
    args = ["generate", "--model", path, "--prompt", "the king", "--max-tokens", 30, "--temperature", 0.8,
            "--top-p", 0.9, "--top-k", 20, "--min-p", 0.01, "--presence-penalty", 0.3,
            "--frequency-penalty", 0.2, "--seed", 11, "--backend", "numpy"]
    rc, out, err = run(args, capsys)
    assert rc == 0, err
    assert out.rstrip("\n") == full.rstrip("\n")
    rc, out, err = run(args + ["--stop", stop], capsys)
    assert rc == 0, err
    assert out.rstrip("\n") == full[: full.index(stop)].rstrip("\n")


def test_cli_generate_warns_past_training_context(tmp_path, capsys):
    path, _, _ = make_model(tmp_path, train_ctx_len=8)
    rc, out, err = run(["generate", "--model", path, "--prompt", "the king is good and my lord is here",
                        "--max-tokens", 2, "--backend", "numpy"], capsys)
    assert rc == 0, err
    warnings = [l for l in err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "longer than any seen in training (8)" in warnings[0]
    rc, _, err = run(["generate", "--model", path, "--prompt", "the", "--max-tokens", 2, "--backend", "numpy"],
                     capsys)
    assert rc == 0 and "warning" not in err


def test_cli_generate_bad_input(model, tmp_path, capsys):
    path, _, _ = model
    rc, _, err = run(["generate", "--model", tmp_path / "nowhere", "--prompt", "hi"], capsys)
    assert_one_error(rc, err, "does not exist")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in path.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the weights
    (broken / "model.safetensors").write_bytes(bytes(data))
    for backend in ("numpy", "torch"):
        rc, _, err = run(["generate", "--model", broken, "--prompt", "hi", "--backend", backend], capsys)
        assert_one_error(rc, err, "checksum")
    rc, _, err = run(["generate", "--model", path, "--prompt", "", "--backend", "numpy"], capsys)
    assert_one_error(rc, err, "empty")
    rc, _, err = run(["generate", "--model", path, "--prompt", "hi", "--top-p", "0"], capsys)
    assert_one_error(rc, err, "top_p")


def test_cli_generate_invalid_utf8_on_stdin(model):
    path, _, _ = model
    proc = subprocess.run(CLI + ["generate", "--model", str(path), "--prompt", "-", "--backend", "numpy"],
                          input=b"the king \xff\xfe", capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: the prompt read from stdin is not valid UTF-8 (byte 0xff at offset 9)"
    proc = subprocess.run(CLI + ["generate", "--model", str(path), "--prompt", "-", "--backend", "numpy",
                                 "--max-tokens", "3"], input="the king".encode(), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()


def test_other_modules_use_only_the_public_api():
    """One implementation of each idea, reached through public names: no module of metastate/
    imports a private name of metastate.api or calls an Engine's private methods."""
    import ast
    from pathlib import Path

    root = Path(api.__file__).parent
    private = {"_forward", "_tensor", "_array", "_cat", "_set_threads"}
    for path in sorted(root.rglob("*.py")):
        if path.name == "api.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "api":
                bad = [a.name for a in node.names if a.name.startswith("_")]
                assert not bad, f"{path.relative_to(root.parent)} imports {bad} from metastate.api"
            if isinstance(node, ast.Attribute) and node.attr in private:
                assert False, f"{path.relative_to(root.parent)}:{node.lineno} uses Engine.{node.attr}"
