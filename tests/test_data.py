"""Data preparation (text / folders / JSONL -> BPE -> packed shards) and deterministic batches."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metastate.train.data import DataError, TokenData, prepare_data, read_meta
from metastate_core.errors import MetaStateError
from metastate_core.tokenizers import SentencePieceTokenizer

WORDS = "the king queen lord sword crown night day love death speak hear my thou art, and. O!".split()


def _doc(rng, lines=20):
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three text files in a folder (one nested) and a JSONL file of two records."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    docs = [_doc(rng) for _ in range(5)]
    (root / "txt" / "sub").mkdir(parents=True)
    (root / "txt" / "a.txt").write_text(docs[0])
    (root / "txt" / "b.md").write_text(docs[1])
    (root / "txt" / "sub" / "c.txt").write_text(docs[2])
    (root / "txt" / "skip.bin").write_bytes(b"\x00\x01 not text")
    with open(root / "more.jsonl", "w") as f:
        for d in docs[3:]:
            f.write(json.dumps({"text": d, "id": 7}) + "\n")
    out = root / "data"
    meta = prepare_data([root / "txt", root / "more.jsonl"], out, vocab_size=400, val_fraction=0.2, seed=3)
    return docs, out, meta


def _stream(out):
    meta = read_meta(out)
    parts = [np.fromfile(out / s["file"], dtype=meta["dtype"]) for split in ("train", "val")
             for s in meta["splits"][split]]
    return np.concatenate(parts)


def test_documents_round_trip_through_the_shards(corpus):
    docs, out, meta = corpus
    tok = SentencePieceTokenizer(out / "tokenizer.model")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size and meta["documents"] == 5
    stream = _stream(out).tolist()
    assert stream[-1] == tok.eos_id
    pieces, cur = [], []
    for t in stream:
        if t == tok.eos_id:
            pieces.append(cur)
            cur = []
        else:
            cur.append(t)
    # every input document, exactly once, separated by end-of-text (order: seeded shuffle)
    assert sorted(tok.decode(p) for p in pieces) == sorted(docs)


def test_held_out_split_is_the_tail_of_the_stream(corpus):
    _, out, meta = corpus
    n_train = sum(s["tokens"] for s in meta["splits"]["train"])
    n_val = sum(s["tokens"] for s in meta["splits"]["val"])
    assert n_val == round((n_train + n_val) * 0.2)
    val = TokenData(out, "val", 8)
    assert np.array_equal(val.tokens(0, n_val), _stream(out)[n_train:])


def test_given_tokenizer_is_reused_and_shards_split(corpus, tmp_path):
    docs, out, meta = corpus
    meta2 = prepare_data([out.parent / "txt", out.parent / "more.jsonl"], tmp_path,
                         tokenizer=out / "tokenizer.model", val_fraction=0.2, seed=3, shard_tokens=100)
    assert len(meta2["splits"]["train"]) > 2
    assert np.array_equal(_stream(tmp_path), _stream(out))  # same tokenizer, same seed: same ids
    data = TokenData(tmp_path, "train", 16)
    ref = _stream(out)[:data.n_tokens].astype(np.int64)
    assert np.array_equal(data.tokens(90, 250), ref[90:250])  # across shard boundaries


def test_batches_are_a_function_of_seed_and_position(corpus):
    _, out, _ = corpus
    data = TokenData(out, "train", 16)
    n = data.n_windows
    a = data.batch(5, 4, seed=0)
    assert a.shape == (4, 17) and a.dtype == np.int64
    assert np.array_equal(a, data.batch(5, 4, seed=0))
    assert np.array_equal(a[1:], data.batch(6, 3, seed=0))
    assert not np.array_equal(a, data.batch(5, 4, seed=1))
    # windows overlap by one token: targets of window i are tokens[i*T + 1 : i*T + T + 1]
    i = data.window_index(5, 0)
    assert np.array_equal(a[0], data.tokens(i * 16, i * 16 + 17))
    # an epoch visits every window once; the next epoch is another permutation
    first = [data.window_index(s, 0) for s in range(n)]
    second = [data.window_index(s, 0) for s in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second


def test_bible_style_jsonl_groups_verses_by_chapter(tmp_path):
    rows = [("Genesis", 1, 1, "In the beginning."), ("Genesis", 1, 2, "And the earth."),
            ("Genesis", 2, 1, "Thus the heavens."), ("Exodus", 1, 1, "Now these are the names.")]
    with open(tmp_path / "kjv.jsonl", "w") as f:
        for book, ch, v, text in rows:
            f.write(json.dumps({"book": book, "chapter": ch, "verse": v, "text": text}) + "\n")
    meta = prepare_data([tmp_path / "kjv.jsonl"], tmp_path / "d", vocab_size=320, val_fraction=0.1)
    assert meta["documents"] == 3


def test_bad_inputs_raise_data_errors(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "no text key"}) + "\n")
    with pytest.raises(DataError, match="no string field 'text'"):
        prepare_data([tmp_path / "x.jsonl"], tmp_path / "d")
    with pytest.raises(DataError, match="does not exist"):
        prepare_data([tmp_path / "missing.txt"], tmp_path / "d")
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenData(tmp_path, "train", 8)
    (tmp_path / "t.txt").write_text(_doc(random.Random(0), 30))
    prepare_data([tmp_path / "t.txt"], tmp_path / "d", vocab_size=320, val_fraction=0.05)
    with pytest.raises(DataError, match="fewer than seq_len"):
        TokenData(tmp_path / "d", "val", 10_000)
    # a bad setting is refused before the existing shards are touched
    before = {f.name: f.read_bytes() for f in (tmp_path / "d").iterdir()}
    for kw, match in (({"shard_tokens": 0}, "shard_tokens must be a positive integer"),
                      ({"shard_tokens": -5}, "shard_tokens must be a positive integer"),
                      ({"vocab_size": 0}, "vocab_size must be an integer >= 2")):
        with pytest.raises(DataError, match=match):
            prepare_data([tmp_path / "t.txt"], tmp_path / "d", **kw)
    assert {f.name: f.read_bytes() for f in (tmp_path / "d").iterdir()} == before


def test_a_failed_preparation_leaves_the_data_directory_as_it_was(tmp_path):
    """Everything that can fail on the inputs (the tokenizer, the text, the size) fails before
    the directory is touched: the runs that use it keep their data and their fingerprint."""
    (tmp_path / "t.txt").write_text(_doc(random.Random(0), 30))
    prepare_data([tmp_path / "t.txt"], tmp_path / "d", vocab_size=320, val_fraction=0.05)
    before = {f.name: f.read_bytes() for f in (tmp_path / "d").iterdir()}
    (tmp_path / "tiny.txt").write_text("the king")
    (tmp_path / "t.model").write_text("the king")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')  # latin-1, not UTF-8
    (tmp_path / "lone.jsonl").write_text('{"text": "a"}\n{"text": "half an emoji \\ud83d"}\n')
    for inputs, kw, match in (
            (["t.txt"], {"tokenizer": tmp_path / "tiny.txt"}, "malformed vocabulary line .* read as an RWKV World"),
            (["t.txt"], {"tokenizer": tmp_path / "t.model"}, "cannot load sentencepiece model"),  # not a tokenizer
            (["tiny.txt"], {"tokenizer": tmp_path / "d" / "tokenizer.model"}, "too few for a training split"),
            (["bad.jsonl"], {}, r"bad.jsonl:2: not UTF-8 text"),
            (["lone.jsonl"], {}, r"lone.jsonl:2: field 'text' is not valid Unicode \(lone surrogate U\+D83D at character 14\)")):
        with pytest.raises((DataError, MetaStateError), match=match):
            prepare_data([tmp_path / i for i in inputs], tmp_path / "d", **kw)
    assert {f.name: f.read_bytes() for f in (tmp_path / "d").iterdir()} == before


def test_a_byte_order_mark_is_not_text(tmp_path):
    rng = random.Random(0)
    lines = [json.dumps({"text": _doc(rng, 5)}) for _ in range(6)]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + _doc(rng, 30).encode())
    meta = prepare_data([tmp_path / "bom.jsonl", tmp_path / "bom.txt"], tmp_path / "d", vocab_size=320)
    assert meta["documents"] == 7
    tok = SentencePieceTokenizer(tmp_path / "d" / "tokenizer.model")
    assert "\ufeff" not in tok.decode(_stream(tmp_path / "d").tolist())


@pytest.mark.parametrize("change, problem", [
    (lambda m: m.pop("splits"), "splits is not"),
    (lambda m: m["splits"]["train"][0].update(tokens="12"), "splits is not"),
    (lambda m: m["splits"]["train"][0].update(file="../../etc/passwd"), "splits is not"),
    (lambda m: m.update(dtype="bogus"), "dtype is not uint16 or uint32"),
    (lambda m: m.pop("eos_id"), "vocab_size or eos_id is not an integer")])
def test_a_damaged_meta_json_is_a_clear_error(corpus, tmp_path, change, problem):
    _, out, _ = corpus
    meta = json.loads((out / "meta.json").read_text())
    change(meta)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=f"malformed .*meta.json: {problem}"):
        TokenData(tmp_path, "train", 8)


def test_prepare_data_runs_without_torch(tmp_path):
    """`metastate prepare-data` needs numpy and sentencepiece only: here `import torch` fails."""
    (tmp_path / "a.txt").write_text(_doc(random.Random(2), 120))
    script = "import sys; sys.modules['torch'] = None; from metastate.cli import main; sys.exit(main(sys.argv[1:]))"
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script, "prepare-data", str(tmp_path / "a.txt"), "--out",
                           str(tmp_path / "d"), "--vocab-size", "300"], capture_output=True, text=True, cwd=repo,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_meta(tmp_path / "d")["vocab_size"] == 300


def _tree(d: Path) -> dict:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_mid_write_leaves_the_old_data_directory_byte_identical(tmp_path, monkeypatch, error):
    """Issue 22 item 2: the new directory is built beside the old one and swapped in at the
    end, so a full disk (or a kill: tests/fuzz/test_kill.py) while shards are written changes
    nothing, and leaves nothing behind."""
    import metastate.train.data as data

    (tmp_path / "t.txt").write_text(_doc(random.Random(0), 30))
    (tmp_path / "u.txt").write_text(_doc(random.Random(1), 30))
    prepare_data([tmp_path / "t.txt"], tmp_path / "d", vocab_size=320, shard_tokens=100)
    before = _tree(tmp_path / "d")
    real, calls = data._write_file, []

    def failing(file, write):
        calls.append(file.name)
        if len(calls) == 3:  # the tokenizer and one shard are written: the third file fails
            raise error
        real(file, write)
    monkeypatch.setattr(data, "_write_file", failing)
    with pytest.raises(DataError if isinstance(error, OSError) else KeyboardInterrupt,
                       match="No space left" if isinstance(error, OSError) else None):
        prepare_data([tmp_path / "u.txt"], tmp_path / "d", tokenizer=tmp_path / "d" / "tokenizer.model",
                     shard_tokens=100)
    assert len(calls) == 3
    assert _tree(tmp_path / "d") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "t.txt", "u.txt"]  # no temp folder left


@pytest.mark.parametrize("exchange", [True, False])  # False: the two-rename swap of macOS and others
def test_a_new_preparation_replaces_the_old_directory_whole(tmp_path, monkeypatch, exchange):
    import weights.files

    if not exchange:
        monkeypatch.setattr(weights.files, "_exchange", lambda a, b: False)
    (tmp_path / "t.txt").write_text(_doc(random.Random(0), 30))
    prepare_data([tmp_path / "t.txt"], tmp_path / "d", vocab_size=320, shard_tokens=100)
    assert len(list((tmp_path / "d").glob("train-*.bin"))) > 2
    # what killed runs left: a temp folder (removed) and nothing else of ours
    (tmp_path / ".d.tmp-0123abcd").mkdir()
    (tmp_path / ".d.tmp-0123abcd" / "train-00000.bin").write_bytes(b"half")
    meta = prepare_data([tmp_path / "t.txt"], tmp_path / "d", vocab_size=320)  # one shard a split now
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["meta.json", "tokenizer.model", "train-00000.bin",
                                                                 "val-00000.bin"]
    assert read_meta(tmp_path / "d") == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "t.txt"]


def test_what_is_not_a_data_directory_is_never_replaced(tmp_path):
    (tmp_path / "t.txt").write_text(_doc(random.Random(0), 30))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for out, match in ((tmp_path / "mine", "refusing to replace .*mine: it is a non-empty directory and not a "
                                           "prepared data directory"),
                       (tmp_path / "file", "it exists and is not a directory")):
        with pytest.raises(DataError, match=match):
            prepare_data([tmp_path / "t.txt"], out, vocab_size=320)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"
    (tmp_path / "empty").mkdir()  # an empty folder is filled
    prepare_data([tmp_path / "t.txt"], tmp_path / "empty", vocab_size=320)
    assert read_meta(tmp_path / "empty")["format"] == "metastate-tokens"


@pytest.mark.parametrize("text, problem", [("[" * 5000 + "]" * 5000, "nested too deeply"),
                                           ('{"format": NaN}', "not valid JSON")])
def test_a_hostile_meta_json_is_one_clear_error(tmp_path, text, problem):
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(DataError, match=problem):
        read_meta(tmp_path)


def test_a_fifo_meta_json_is_refused_not_waited_on(tmp_path):
    import os

    os.mkfifo(tmp_path / "meta.json")
    with pytest.raises(DataError, match="is a FIFO, not a regular file"):
        read_meta(tmp_path)


def test_a_deeply_nested_jsonl_record_is_one_clear_error(tmp_path):
    (tmp_path / "x.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="x.jsonl:1: not a JSON object"):
        prepare_data([tmp_path / "x.jsonl"], tmp_path / "d")
