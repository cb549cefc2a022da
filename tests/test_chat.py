"""Chat: templates, the conversation state (carried, saved, restored, interrupted) and
`metastate chat` driven through a pseudo-terminal.

States are judged against the NumPy float64 reference run once over the whole transcript
(every turn's text and answer, as token ids), so a turn that re-read earlier turns, dropped a
token or left a turn unclosed would not match.
"""

import json
import os
import sys

import numpy as np
import pexpect
import pytest

from metastate.api import StateFileError, load, load_state
from metastate.chat import ChatSession
from metastate.cli import main
from metastate_core.chat_templates import (ChatTemplateError, clean_message, make_template,
                                           template_for)
from metastate_core.config import ModelConfig
from metastate_core.params import random_params
from metastate_core.reference import forward
from metastate_core.sampling import SamplingParams
from metastate_core.tokenizers import SentencePieceTokenizer
from weights import save_model
from weights.safetensors_io import read_file

CLI = [sys.executable, "-m", "metastate.cli"]
WORDS = "the king queen good lord my night day love speak sweet what is not and of to you me here".split()
GREEDY = SamplingParams(temperature=0.0)


def make_model(root, seed=1):
    """A random float32 model with a tiny SentencePiece tokenizer that knows no '>' (so model
    output never looks like the REPL prompt)."""
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 8)) + "." for _ in range(200)] + ["ROMEO."] * 20
    tok = SentencePieceTokenizer.train(iter(lines), 120, root / "tok" / "tokenizer.model",
                                       byte_fallback=False, user_defined_symbols=["\n"])
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layer=2, head_size=16, n_param_tokens=64,
                      sse_heads=1, tokenizer=tok.to_config())
    tensors = random_params(cfg, seed, np.float32)
    save_model(root / "model", cfg, tensors, extra_files={"tokenizer.model": root / "tok" / "tokenizer.model"})
    return root / "model", cfg, tensors


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("chat"))


from metastate_core.reference import rel_rms  # noqa: E402  (SPEC section 6)


def reference_state(tensors, cfg, ids):
    logits, state = forward(tensors, cfg, np.array(ids)[None], dtype=np.float64)
    return logits[0, -1], state


def raw(tok, ids):
    """The text of SentencePiece ids piece by piece, every space kept (decode drops the first)."""
    return "".join(tok.sp.id_to_piece(int(i)) for i in ids).replace("\u2581", " ")


def record(engine):
    """Make `engine` log every token it reads into the returned list."""
    fed, forward_ = [], engine._forward
    engine._forward = lambda ids, state: (fed.extend(ids.ravel().tolist()), forward_(ids, state))[1]
    return fed


def assert_state_matches(engine, session, tensors, cfg, transcript):
    logits, ref = reference_state(tensors, cfg, transcript)
    got = engine.state_to_arrays(session.state)
    for name in ("att_x", "meta_x", "wkv"):
        assert rel_rms(got[name], getattr(ref, name)[:, 0]) <= 1e-4, name
    assert rel_rms(session.logits, logits) <= 1e-4
    assert session.n_tokens == len(transcript)


# -- templates ------------------------------------------------------------------------------
def test_templates_render_the_documented_formats():
    world = make_template("world")
    assert world.user_turn("Hi there") == "User: Hi there\n\nAssistant:"
    play = make_template("shakespeare")
    assert play.user_turn("  Good morrow.\n\n\nHow now? ") == "ROMEO.\nGood morrow.\nHow now?\n\n"
    assert make_template("shakespeare", "HAMLET", "HORATIO").user_turn("Speak.") == "HAMLET.\nSpeak.\n\nHORATIO.\n"
    assert clean_message("a\r\n\r\nb") == "a\nb"
    for t in (world, play):
        assert t.stop == ("\n\n",)
        assert t.close_turn("an answer") == "\n\n"
        assert t.close_turn("an answer\n") == "\n"
        assert t.close_turn("an answer\n\n") == ""


def test_template_selection():
    assert template_for(None, "rwkv_world").name == "world"
    assert template_for(None, "sentencepiece").name == "shakespeare"
    assert template_for("world", "sentencepiece").name == "world"
    t = template_for({"name": "shakespeare", "user": "LEAR", "assistant": "FOOL"}, None)
    assert (t.user, t.assistant) == ("LEAR", "FOOL")
    for bad in ("chatml", {"name": "world", "colour": 1}, 3, {"user": "X"}):
        with pytest.raises(ChatTemplateError):
            template_for(bad, "sentencepiece")
    with pytest.raises(ChatTemplateError, match="no tokenizer"):
        template_for(None, None)
    with pytest.raises(ChatTemplateError, match="one-line"):
        make_template("shakespeare", "A\nB")


def test_chat_template_from_config(tmp_path, capsys):
    path, cfg, tensors = make_model(tmp_path)
    cfg.extra["chat_template"] = {"name": "world", "user": "Q", "assistant": "A"}
    save_model(path, cfg, tensors, extra_files={"tokenizer.model": tmp_path / "tok" / "tokenizer.model"})
    proc = pexpect.spawn(CLI[0], CLI[1:] + ["chat", "--model", str(path), "--backend", "numpy"],
                         encoding="utf-8", timeout=60)
    proc.expect("> ")
    assert "chat template: world (you are Q, the model is A)" in proc.before
    proc.sendeof()
    proc.expect(pexpect.EOF)


# -- the conversation state -----------------------------------------------------------------
def test_turns_carry_the_state_and_read_each_token_once(model):
    path, cfg, tensors = model
    engine, tok = load(path, "numpy")
    fed = record(engine)
    session = ChatSession(engine, tok, make_template("shakespeare"), GREEDY, max_tokens=6)
    text = ""
    for message in ("the king is here", "speak sweet lord"):
        turn = session.ask(message)
        assert turn.finish_reason == "length" and len(turn.ids) == 6
        assert not turn.text.endswith("\n")  # so the turn is closed with a blank line
        text += f"ROMEO.\n{message}\n\n" + raw(tok, turn.ids) + "\n\n"
        assert raw(tok, fed) == text  # each token read once, in order, no stray spaces
        assert_state_matches(engine, session, tensors, cfg, fed)


def test_save_reset_load_restores_the_exact_state(model, tmp_path):
    path, cfg, tensors = model
    engine, tok = load(path, "numpy")
    session = ChatSession(engine, tok, make_template("shakespeare"), GREEDY, max_tokens=5)
    session.ask("good night")
    before = {k: v.copy() for k, v in engine.state_to_arrays(session.state).items()}
    logits_before, n_before = session.logits.copy(), session.n_tokens
    file = tmp_path / "conv.safetensors"
    file.write_bytes(b"an older file")  # replaced atomically
    session.save(file)
    assert sorted(os.listdir(tmp_path)) == ["conv.safetensors"]  # no temporary left behind
    tensors_on_disk, meta = read_file(file)
    assert meta["format"] == "metastate-state" and meta["n_tokens"] == str(n_before)
    assert meta["model"] == str(path.resolve()) and len(meta["model_fingerprint"]) == 64
    assert {k: v.shape for k, v in tensors_on_disk.items()} == {
        "att_x": (2, 32), "meta_x": (2, 32), "wkv": (2, 2, 16, 16), "logits": (cfg.vocab_size,)}
    answer = session.ask("what is love").text
    logits_answered = session.logits.copy()

    session.reset()
    assert session.n_tokens == 0 and not engine.state_to_arrays(session.state)["wkv"].any()
    session.ask("what is love")
    assert rel_rms(session.logits, logits_answered) > 1e-3  # a fresh state: another distribution

    session.load(file)
    after = engine.state_to_arrays(session.state)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    np.testing.assert_array_equal(session.logits, logits_before)  # the next-token distribution
    assert session.n_tokens == n_before
    assert session.ask("what is love").text == answer
    np.testing.assert_array_equal(session.logits, logits_answered)


def test_state_file_is_backend_independent(model, tmp_path):
    path, _, _ = model
    np_engine, tok = load(path, "numpy")
    session = ChatSession(np_engine, tok, make_template("shakespeare"), GREEDY, max_tokens=5)
    session.ask("my lord")
    session.save(tmp_path / "s.safetensors")
    expected = session.ask("the queen").text
    for backend in ("torch", "mlx"):
        engine, tok = load(path, backend)
        other = ChatSession(engine, tok, make_template("shakespeare"), GREEDY, max_tokens=5)
        other.load(tmp_path / "s.safetensors")
        assert other.ask("the queen").text == expected


def test_state_file_errors(model, tmp_path):
    path, _, _ = model
    engine, tok = load(path, "numpy")
    session = ChatSession(engine, tok, make_template("shakespeare"), GREEDY, max_tokens=3)
    session.ask("the king")
    session.save(tmp_path / "s.safetensors")
    other_path, _, _ = make_model(tmp_path / "other", seed=2)  # same shapes, other weights
    other, other_tok = load(other_path, "numpy")
    with pytest.raises(StateFileError, match="another model"):
        ChatSession(other, other_tok, make_template("shakespeare")).load(tmp_path / "s.safetensors")
    data = bytearray((tmp_path / "s.safetensors").read_bytes())
    data[-7] ^= 0x55
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="checksum"):
        session.load(tmp_path / "bad.safetensors")
    with pytest.raises(StateFileError, match="not a metastate state file"):
        session.load(path / "model.safetensors")
    with pytest.raises(StateFileError, match="does not exist"):
        session.load(tmp_path / "missing.safetensors")


def test_save_state_refuses_what_it_could_not_load_back(model, tmp_path):
    """Checked before anything is written: the next token's logits, one sequence, this backend's state."""
    from metastate.api import GenerationError, save_state

    path, cfg, _ = model
    engine, _ = load(path, "numpy")
    logits, state = engine.prefill([1, 2, 3])
    file = tmp_path / "s.safetensors"
    with pytest.raises(GenerationError, match=rf"logits must be the next token's \[{cfg.vocab_size}\], got \[10\]"):
        save_state(file, engine, state, logits[:10])
    two = type(state)(*(np.concatenate([t, t], axis=1) for t in (state.att_x, state.meta_x, state.wkv)))  # 2 rows
    with pytest.raises(GenerationError, match=r"state tensor att_x is \[2, 2, 32\], expected \[2, 1, 32\]"):
        save_state(file, engine, two, logits)
    torch_engine, _ = load(path, "torch")
    with pytest.raises(GenerationError, match="not a state of a torch model: metastate_core.reference.State"):
        save_state(file, torch_engine, state, logits)
    assert not file.exists()
    save_state(file, engine, state, logits)
    assert np.array_equal(load_state(file, engine)[1], logits)


def test_a_stop_inside_a_token_leaves_the_state_at_the_stop():
    """World has tokens such as "\\n\\n " (id 3329): the stop "\\n\\n" then ends inside one, and
    the state has read a space past it. The turn is read again, ending at the stop, so the state
    holds exactly the text shown, in the template's format."""
    rwkv = pytest.importorskip("rwkv")
    from metastate.api import Engine
    from metastate_core.tokenizers import WorldTokenizer

    tok = WorldTokenizer(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    assert tok.decode([3329]) == "\n\n "

    class Recorder(Engine):
        """The state is every id read; greedy sampling follows `answer`, one token per call."""

        backend = "recorder"

        def __init__(self, answer):
            super().__init__(ModelConfig(vocab_size=65536, d_model=16, n_layer=1, head_size=16))
            self.answer, self.calls = answer, 0

        def zero_state(self):
            return ()

        def _forward(self, ids, state, every=False):  # one sequence: ids [1, T]
            logits = np.zeros((1, 65536), np.float32)
            logits[0, self.answer[min(self.calls, len(self.answer) - 1)]] = 10.0
            self.calls += 1
            return logits, state + tuple(int(i) for i in ids[0])

    engine = Recorder(tok.encode(" Hello.") + [3329] + tok.encode("more"))
    session = ChatSession(engine, tok, make_template("world"), GREEDY, max_tokens=10)
    turn = session.ask("hi")
    assert turn.text == " Hello." and turn.finish_reason == "stop"
    assert tok.decode(list(session.state)) == "User: hi\n\nAssistant: Hello.\n\n"
    assert session.n_tokens == len(session.state)


def test_interrupt_keeps_a_consistent_state(model):
    path, cfg, tensors = model
    engine, tok = load(path, "numpy")
    session = ChatSession(engine, tok, make_template("shakespeare"), GREEDY, max_tokens=1000)
    fed = record(engine)
    seen = []

    def on_text(text):
        seen.append(text)
        if len(seen) == 4:
            raise KeyboardInterrupt  # Ctrl-C while the answer is being printed

    turn = session.ask("the king is here", on_text)
    assert turn.finish_reason == "interrupted" and 4 <= len(turn.ids) < 1000
    assert raw(tok, fed) == "ROMEO.\nthe king is here\n\n" + raw(tok, turn.ids) + "\n\n"
    transcript = list(fed)
    assert_state_matches(engine, session, tensors, cfg, transcript)

    # Ctrl-C inside the model while the message is read: the turn is dropped whole
    forward_ = engine._forward

    def interrupted(ids, state):
        raise KeyboardInterrupt

    engine._forward = interrupted
    turn = session.ask("more")
    assert turn.finish_reason == "interrupted" and turn.ids == []
    engine._forward = forward_
    assert_state_matches(engine, session, tensors, cfg, transcript)


# -- `metastate chat` in a pseudo-terminal --------------------------------------------------
def spawn(path, *extra):
    proc = pexpect.spawn(CLI[0], CLI[1:] + ["chat", "--model", str(path), "--backend", "numpy",
                                              "--temperature", "0", *map(str, extra)],
                         encoding="utf-8", codec_errors="replace", timeout=60)
    proc.expect("> ")
    return proc


def say(proc, line):
    """Send a line, return what came back before the next prompt (without the echo)."""
    proc.sendline(line)
    proc.expect("> ")
    echo, _, rest = proc.before.partition("\r\n")
    assert echo == line
    return rest


def test_cli_two_turns_save_reset_load(model, tmp_path):
    path, _, _ = model
    proc = spawn(path, "--max-tokens", 8)
    assert "backend: numpy (cpu, float32" in proc.before
    first = say(proc, "the king is here")
    assert first.strip()
    assert "unknown command" in say(proc, "/nonsense")
    assert "/save FILE" in say(proc, "/help")
    file = tmp_path / "conv.safetensors"
    assert "saved the conversation state" in say(proc, f"/save {file}")
    answer = say(proc, "what is love")
    say(proc, "/reset")
    say(proc, f"/save {tmp_path / 'fresh.safetensors'}")
    fresh, meta = read_file(tmp_path / "fresh.safetensors")
    assert meta["n_tokens"] == "0" and not fresh["wkv"].any() and "logits" not in fresh
    say(proc, "what is love")
    assert "loaded the conversation state" in say(proc, f"/load {file}")
    say(proc, f"/save {tmp_path / 'again.safetensors'}")
    saved, again = read_file(file)[0], read_file(tmp_path / "again.safetensors")[0]
    assert saved.keys() == again.keys() == {"att_x", "meta_x", "wkv", "logits"}
    for name in saved:  # the exact state, and so the exact next-token distribution
        np.testing.assert_array_equal(again[name], saved[name])
    assert say(proc, "what is love") == answer
    assert "does not exist" in say(proc, f"/load {tmp_path / 'nothing'}")
    proc.sendeof()
    proc.expect(pexpect.EOF)
    proc.close()
    assert proc.exitstatus == 0


def test_cli_reads_a_line_longer_than_the_terminal_limit(model, tmp_path):
    """A terminal in canonical mode hands input() at most 4095 bytes of a line, silently: a long
    paste lost its tail. With readline the whole line arrives."""
    from metastate.api import encode_continuation

    path, _, _ = model
    message = " ".join(WORDS * 60)  # about 5,300 characters
    assert len(message) > 5000
    tok = SentencePieceTokenizer(path / "tokenizer.model")
    prompt = encode_continuation(tok, make_template("shakespeare").user_turn(message))
    proc = spawn(path, "--max-tokens", 1)
    proc.sendline(message)
    proc.expect("\n> ")
    proc.sendline(f"/save {tmp_path / 's.safetensors'}")
    proc.expect("saved the conversation state")
    proc.sendeof()
    proc.expect(pexpect.EOF)
    n = int(read_file(tmp_path / "s.safetensors")[1]["n_tokens"])
    assert len(prompt) < n <= len(prompt) + 3  # the whole message, one answer token, the turn's end


def test_cli_ctrl_c_mid_answer_then_go_on(model, tmp_path):
    path, _, _ = model
    proc = spawn(path, "--max-tokens", 1_000_000)
    proc.sendline("the king is here")
    proc.expect(r"here\r\n.{30}")  # the answer is streaming
    proc.sendintr()
    proc.expect(r"\[interrupted\]\r\n> ")
    assert "Traceback" not in proc.before
    file = tmp_path / "after.safetensors"
    assert "saved the conversation state" in say(proc, f"/save {file}")
    n_tokens = int(read_file(file)[1]["n_tokens"])
    assert n_tokens > len("the king is here".split()) + 30 // 8
    os.write(proc.child_fd, b"the \xff king\n")  # invalid UTF-8: refused, state untouched
    proc.expect("> ")
    assert "error: that line is not valid UTF-8; nothing was sent" in proc.before
    proc.sendintr()  # Ctrl-C at the prompt: a fresh prompt
    proc.expect("> ")
    proc.sendline("/help")
    proc.expect("/reset")
    proc.expect("> ")
    proc.sendeof()
    proc.expect(pexpect.EOF)
    proc.close()
    assert proc.exitstatus == 0
    assert "Traceback" not in proc.before


def test_cli_chat_bad_input(model, tmp_path, capsys):
    path, cfg, tensors = model
    rc = main(["chat", "--model", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip() == f"error: model directory {tmp_path / 'nowhere'} does not exist"
    bare = tmp_path / "bare"
    save_model(bare, cfg.replace(tokenizer=None), tensors)
    rc = main(["chat", "--model", str(bare), "--backend", "numpy"])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines()[-1] == f"error: {bare} has no tokenizer, so it cannot chat"
    (bare / "config.json").write_text(json.dumps({"format": "metastate", "vocab_size": "many"}))
    rc = main(["chat", "--model", str(bare)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "config.json" in err and "Traceback" not in err


# -- hostile state files and arguments (issue 22) ----------------------------------------------

def test_load_refuses_a_state_holding_nan_or_infinity(model, tmp_path):
    from weights.safetensors_io import write_file

    path, _, _ = model
    engine, tok = load(path, "numpy")
    session = ChatSession(engine, tok, make_template("shakespeare"), GREEDY, max_tokens=3)
    session.ask("the king")
    session.save(tmp_path / "s.safetensors")
    tensors, meta = read_file(tmp_path / "s.safetensors")
    for bad in (np.nan, np.inf):
        wkv = tensors["wkv"].copy()
        wkv[0, 0, 0, 0] = bad
        write_file(tmp_path / "bad.safetensors", dict(tensors, wkv=wkv), meta)  # a valid checksum
        with pytest.raises(StateFileError, match="'wkv' holds NaN or infinity"):
            session.load(tmp_path / "bad.safetensors")


def test_load_says_what_a_path_is(model, tmp_path):
    path, _, _ = model
    engine, tok = load(path, "numpy")
    session = ChatSession(engine, tok, make_template("shakespeare"), GREEDY, max_tokens=3)
    os.mkfifo(tmp_path / "fifo")
    for target, what in ((tmp_path, "is a directory"), (tmp_path / "fifo", "is a FIFO")):
        with pytest.raises(StateFileError, match=f"{what}, not a state file"):
            session.load(target)


def test_the_fingerprint_of_weights_without_a_checksum_is_their_data(tmp_path):
    """Two models with the same config and file sizes but other weights, written without
    checksums (as other writers do): a state of one must not load into the other."""
    from metastate.api import model_fingerprint
    from weights.safetensors_io import write_file

    cfg = ModelConfig(vocab_size=20, d_model=32, n_layer=1, head_size=16, n_param_tokens=8, sse_heads=1)
    prints = []
    for seed in (1, 2):
        d = tmp_path / f"m{seed}"
        tensors = random_params(cfg, seed, np.float32)
        save_model(d, cfg, tensors)
        write_file(d / "model.safetensors", tensors, checksum=False)
        prints.append(model_fingerprint(d, cfg))
    assert prints[0] != prints[1]


@pytest.mark.parametrize("flag", ["--presence-penalty", "--frequency-penalty"])
@pytest.mark.parametrize("value", ["1e308", "-1e308", "101", "nan", "inf"])
def test_penalties_are_bounded(model, capsys, flag, value):
    rc = main(["generate", "--model", str(model[0]), "--prompt", "the", "--max-tokens", "2", f"{flag}={value}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "[-100, 100]" in err, err


def test_save_writes_through_special_files_and_symlinks(model, tmp_path):
    path, _, _ = model
    engine, tok = load(path, "numpy")
    session = ChatSession(engine, tok, make_template("shakespeare"), GREEDY, max_tokens=3)
    session.ask("the king")
    (tmp_path / "target.state").write_bytes(b"old")
    (tmp_path / "link.state").symlink_to("target.state")
    session.save(tmp_path / "link.state")
    assert (tmp_path / "link.state").is_symlink() and read_file(tmp_path / "target.state")[1]["kind"] == "chat"
    with pytest.raises(StateFileError, match="is a directory"):
        session.save(tmp_path)
    if os.geteuid() == 0:
        import stat

        os.mknod(tmp_path / "nul", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        session.save(tmp_path / "nul")
        assert stat.S_ISCHR(os.lstat(tmp_path / "nul").st_mode)


def greedy_reference(tensors, cfg, ids, n):
    """n greedy tokens after `ids`, by the float64 reference over the whole sequence each time."""
    ids = list(ids)
    for _ in range(n):
        logits, _ = forward(tensors, cfg, np.array(ids)[None], dtype=np.float64)
        ids.append(int(np.argmax(logits[0, -1])))
    return ids[-n:]


def test_generate_and_chat_start_from_a_state_file(model, tmp_path, capsys):
    path, cfg, tensors = model
    engine, tok = load(path, "numpy")
    session = ChatSession(engine, tok, make_template("shakespeare"), GREEDY, max_tokens=4)
    fed = record(engine)
    session.ask("good night")
    file = tmp_path / "start.safetensors"
    session.save(file)
    prompt = tok.encode("the king")
    want = greedy_reference(tensors, cfg, fed + prompt, 6)
    with_state, _ = reference_state(tensors, cfg, fed + prompt)
    without, _ = reference_state(tensors, cfg, prompt)
    assert rel_rms(with_state, without) > 1e-2  # the state changes what comes next
    rc = main(["generate", "--model", str(path), "--backend", "numpy", "--prompt", "the king",
               "--temperature", "0", "--max-tokens", "6", "--state", str(file)])
    out = capsys.readouterr().out
    assert rc == 0 and out.rstrip("\n") == tok.decode(want)
    for command in (["generate", "--prompt", "x"], ["chat"]):  # a bad state file: one line, nothing run
        rc = main([*command, "--model", str(path), "--backend", "numpy", "--state", str(tmp_path / "none")])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 1 and errors == [f"error: state file {tmp_path / 'none'} does not exist"], err
        assert "Traceback" not in err
