"""Tokenizers: RWKV World against the rwkv package's own tokenizer (oracle), a trained
SentencePiece model against sentencepiece's decoder, streaming decode, loading from config."""

import os
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metastate_core.errors import MetaStateError
from metastate_core.tokenizers import (SentencePieceTokenizer, StreamDecoder, Tokenizer,
                                       TokenizerError, WorldTokenizer, load_tokenizer)

rwkv = pytest.importorskip("rwkv")
VOCAB = os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt")

SAMPLES = [
    "", "Hello, world!", "The quick brown fox jumps over the lazy dog.\n",
    "人工智能正在改变世界。我们使用RWKV模型。", "emoji 🙂🦀👨‍👩‍👧‍👦 and flags 🇯🇵🇫🇷",
    "Ünïcödé façade — naïve café; Привет, мир; مرحبا بالعالم; नमस्ते; 안녕하세요",
    "    indented\n\t\ttabs\r\n\n\n   trailing   ", " " * 300, "#" * 200 + "-" * 90,
    "def f(x):\n    return x ** 2  # square\n", "\x00\x01\x7f bytes \u2028 \ufeff",
    "数字 12345678901234567890 and 3.14159",
]
settings_ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def world_words():
    """Printable words of the World vocab, to build texts that exercise long matches."""
    out = []
    with open(VOCAB, encoding="utf-8") as f:
        for line in f:
            lit = line[line.index(" ") + 1:line.rindex(" ")]
            if lit.startswith(("'", '"')) and "\\" not in lit:
                out.append(lit[1:-1])
    return out[::7]


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer(VOCAB)


@pytest.fixture(scope="module")
def oracle():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    return TRIE_TOKENIZER(VOCAB)


WORDS = world_words()


# ------------------------------------------------------------------ RWKV World

def test_world_interface(world):
    assert isinstance(world, Tokenizer)
    assert world.vocab_size == 65536 and world.eos_id == 0
    assert world.to_config() == {"type": "rwkv_world", "file": "rwkv_vocab_v20230424.txt"}


@pytest.mark.parametrize("text", SAMPLES)
def test_world_matches_oracle(world, oracle, text):
    ids = world.encode(text)
    assert ids == oracle.encode(text)
    assert world.decode(ids) == text


@settings_
@given(st.text(max_size=200))
def test_world_matches_oracle_random_unicode(world, oracle, text):
    ids = world.encode(text)
    assert ids == oracle.encode(text)
    assert world.decode(ids) == text


@settings_
@given(st.lists(st.sampled_from(WORDS) | st.sampled_from([" ", "\n", "  ", "的", "🙂"]), max_size=60))
def test_world_matches_oracle_vocab_words(world, oracle, words):
    text = "".join(words)
    ids = world.encode(text)
    assert ids == oracle.encode(text)
    assert world.decode(ids) == text


def test_world_long_text_fast(world, oracle):
    import time
    rng = random.Random(0)
    text = "".join(rng.choice(SAMPLES[1:] + WORDS[:2000]) for _ in range(12000))
    t = time.perf_counter()
    ids = world.encode(text)
    dt = time.perf_counter() - t
    assert ids == oracle.encode(text) and world.decode(ids) == text
    assert len(text.encode()) > 30_000 and dt < 2.0


def test_world_greedy_longest_match_small_vocab(tmp_path):
    # hand-made vocab: the 256 bytes (ids 1..256), then "ab" 257, "abcd" 258, "bc" 259
    lines = [f"{b + 1} {bytes([b])!r} 1" for b in range(256)]
    lines += ["257 'ab' 2", "258 'abcd' 4", "259 'bc' 2", "260 '数' 3"]
    (tmp_path / "v.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = WorldTokenizer(tmp_path / "v.txt")
    a, c, e = 98, 100, 102                                     # ids of b"a", b"c", b"e"
    assert tok.encode("abcd") == [258]
    assert tok.encode("abce") == [257, c, e]                   # "abc" is only a prefix: back off to "ab"
    assert tok.encode("aabcdab") == [a, 258, 257]
    assert tok.encode("bcd数") == [259, 101, 260]
    assert tok.decode([258, 0, 260, 65535]) == "abcd数"        # 0 and unused ids decode to nothing


def test_world_bad_vocab_and_ids(tmp_path, world):
    (tmp_path / "bad.txt").write_text("1 'abc' 2\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="bad.txt:1"):
        WorldTokenizer(tmp_path / "bad.txt")
    (tmp_path / "short.txt").write_text("1 'a' 1\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="single-byte"):
        WorldTokenizer(tmp_path / "short.txt")
    with pytest.raises(TokenizerError):
        WorldTokenizer(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes(b"1 '\xe9' 1\n")              # not UTF-8
    with pytest.raises(TokenizerError, match="latin1.txt: not UTF-8"):
        WorldTokenizer(tmp_path / "latin1.txt")
    (tmp_path / "surrogate.txt").write_text("1 '\\ud800' 1\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="surrogate.txt:1: .*U\\+D800"):
        WorldTokenizer(tmp_path / "surrogate.txt")
    with pytest.raises(TokenizerError):
        world.decode([65536])
    with pytest.raises(TokenizerError):
        world.decode([-1])
    assert issubclass(TokenizerError, MetaStateError)


# ------------------------------------------------------------------ streaming

def stream(tok, ids, context=()):
    d = StreamDecoder(tok, context)
    parts = [d.push(i) for i in ids]
    return parts, "".join(parts) + d.flush()


def test_stream_never_splits_a_character(world):
    text = "a数🙂é"
    ids = [b + 1 for b in text.encode()]                       # one byte token per byte
    parts, out = stream(world, ids)
    assert out == text
    assert "\ufffd" not in "".join(parts)
    assert parts == ["a", "", "", "数", "", "", "", "🙂", "", "é"]


def test_stream_incomplete_tail_and_invalid_bytes(world):
    d = StreamDecoder(world)
    assert d.push(0xE6 + 1) == "" and d.push(0x95 + 1) == ""  # first 2 bytes of "数"
    assert d.flush() == "\ufffd"
    _, out = stream(world, [0xFF + 1, ord("x") + 1, 0x80 + 1])
    assert out == "\ufffdx\ufffd"


@settings_
@given(st.text(max_size=100))
def test_stream_equals_decode_world(world, text):
    ids = world.encode(text)
    parts, out = stream(world, ids)
    assert out == world.decode(ids) == text
    assert "\ufffd" not in "".join(parts) or "\ufffd" in text


@settings_
@given(st.lists(st.integers(0, 65535), max_size=40) | st.lists(st.integers(0x80, 0x100), max_size=40))
def test_stream_random_ids_never_raise(world, ids):
    _, out = stream(world, ids)                                # arbitrary, often invalid, UTF-8
    assert out == world.decode(ids)


# ------------------------------------------------------------------ SentencePiece

def corpus(seed=0, n=600):
    rng = random.Random(seed)
    words = ["the", "state", "model", "meta", "token", "über", "naïve", "数据", "模型", "🙂",
             "layer", "weights", "growth", "RWKV", "decay", "12", "345"]
    return ["".join(rng.choice(words) + rng.choice([" ", " ", ", ", ". "]) for _ in range(rng.randint(3, 12)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    (d / "a.txt").write_text("\n".join(corpus(0)), encoding="utf-8")
    (d / "b.txt").write_text("\n".join(corpus(1)), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def sp(sp_dir):
    return SentencePieceTokenizer.train([sp_dir / "a.txt", sp_dir / "b.txt"], 300, sp_dir / "tokenizer.model")


def test_sp_train_deterministic_quiet(sp_dir, tmp_path, capfd):
    capfd.readouterr()
    texts = iter(corpus(0) + corpus(1))                         # an iterator of texts, not files
    tok = SentencePieceTokenizer.train(texts, 300, tmp_path / "x" / "tokenizer.model")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    SentencePieceTokenizer.train([sp_dir / "a.txt", sp_dir / "b.txt"], 300, tmp_path / "y.model")
    SentencePieceTokenizer.train([sp_dir / "a.txt", sp_dir / "b.txt"], 300, tmp_path / "z.model")
    assert (tmp_path / "y.model").read_bytes() == (tmp_path / "z.model").read_bytes()
    assert (tmp_path / "y.model").read_bytes() == (tmp_path / "x" / "tokenizer.model").read_bytes()
    assert tok.vocab_size == 300 and tok.eos_id == 2
    assert tok.to_config() == {"type": "sentencepiece", "file": "tokenizer.model"}
    assert isinstance(tok, Tokenizer)


@pytest.mark.parametrize("text, message", [
    ("\ud800", r"not valid Unicode \(lone surrogate U\+D800 at character 0\)"),
    ("ok \udfff.", r"not valid Unicode \(lone surrogate U\+DFFF at character 3\)"),
    # invalid UTF-8 in argv reaches Python as surrogates U+DC80-DCFF: reported as the byte it was
    ("caf\udce9", r"not valid UTF-8 \(byte 0xe9 at character 3\)"),
])
def test_lone_surrogates_are_a_clear_error(world, sp, text, message):
    for tok in (world, sp):  # they have no UTF-8 form
        with pytest.raises(TokenizerError, match=message):
            tok.encode(text)


def test_sp_train_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        SentencePieceTokenizer.train([tmp_path / "nope.txt"], 300, tmp_path / "t.model")
    with pytest.raises(TokenizerError):
        SentencePieceTokenizer.train(iter(corpus(0)), 10, tmp_path / "t.model")   # below 256 bytes
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError):
        SentencePieceTokenizer(tmp_path / "junk.model")


@pytest.mark.parametrize("text", SAMPLES)
def test_sp_round_trip_samples(sp, text):
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert sp.decode(ids) == sp.sp.decode(ids)


@settings_
@given(st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)), max_size=80))
def test_sp_round_trip_random_text(sp, text):
    # U+2581 is sentencepiece's own space marker, so it comes back as " "
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    parts, out = stream(sp, ids)
    assert out == text


@settings_
@given(st.lists(st.integers(0, 299), max_size=30)
       | st.lists(st.sampled_from([0, 1, 2, *range(259, 300)]), max_size=30))  # no byte pieces
def test_sp_decode_matches_sentencepiece(sp, ids):
    raw = sp.decode_bytes(ids)
    try:
        valid = raw.decode("utf-8")
    except UnicodeDecodeError:
        valid = None    # sentencepiece gives one U+FFFD per bad byte, Python per bad sequence
    if valid is not None:
        assert sp.decode(ids) == valid == sp.sp.decode(ids)
    assert stream(sp, ids)[1] == sp.decode(ids)


def test_sp_stream_continuation_keeps_space(sp):
    # as a continuation the first piece "▁state" keeps its space; at the start it loses it
    prompt, gen = sp.encode("the model"), sp.encode("state 数据 🙂")
    full = sp.decode(prompt + gen)
    _, out = stream(sp, gen, context=prompt)
    assert out == full[len(sp.decode(prompt)):] == " state 数据 🙂"
    assert stream(sp, gen)[1] == sp.decode(gen) == "state 数据 🙂"  # no context: start of a text


# ------------------------------------------------------------------ loading

def test_load_tokenizer(tmp_path, sp, sp_dir):
    assert load_tokenizer(tmp_path, None) is None
    shutil.copy(VOCAB, tmp_path / "rwkv_vocab_v20230424.txt")
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    w = load_tokenizer(tmp_path, {"type": "rwkv_world", "file": "rwkv_vocab_v20230424.txt"})
    assert isinstance(w, WorldTokenizer) and w.encode("Hello") == [33155]
    s = load_tokenizer(tmp_path, sp.to_config())
    assert isinstance(s, SentencePieceTokenizer) and s.encode("the state") == sp.encode("the state")
    for bad in [{"type": "bpe", "file": "x"}, {"file": "tokenizer.model"}, "sentencepiece",
                {"type": "sentencepiece", "file": "missing.model"},
                {"type": "sentencepiece", "file": "../tokenizer.model"},
                {"type": "sentencepiece", "file": str(tmp_path / "tokenizer.model")}]:
        with pytest.raises(TokenizerError):
            load_tokenizer(tmp_path, bad)


# -- hostile files (issue 22) ------------------------------------------------------------------

def test_a_sentencepiece_model_at_a_path_that_is_not_utf8(tmp_path):
    src = Path(__file__).resolve().parents[1] / "weights" / "default" / "tokenizer.model"
    bad = os.path.join(os.fsencode(tmp_path), b"tok\xff.model")
    shutil.copy(src, bad)
    tok = SentencePieceTokenizer(os.fsdecode(bad))
    assert tok.decode(tok.encode("good morrow")) == "good morrow"


def test_tokenizer_files_that_are_not_regular_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for cls in (SentencePieceTokenizer, WorldTokenizer):
        for path in (tmp_path / "fifo", tmp_path):
            with pytest.raises(TokenizerError, match="not a regular file"):
                cls(path)
