"""Tokenizers: SentencePiece (models trained here) and the RWKV World vocabulary (imported models).

Both map text <-> token ids and expose the raw bytes of ids, so generation can stream text
without ever splitting a UTF-8 character (`StreamDecoder`). A model directory names its
tokenizer in config.json: `{"type": "sentencepiece" | "rwkv_world", "file": <name>}` or null.
"""

from __future__ import annotations

import ast
import codecs
import io
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from .config import is_plain_file_name
from .errors import MetaStateError


class TokenizerError(MetaStateError, ValueError):
    """A tokenizer file or spec that cannot be loaded, or ids outside the vocabulary."""


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; malformed UTF-8 becomes U+FFFD, never an exception."""
        ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of `ids` (may end inside a character)."""
        ...

    def to_config(self) -> dict: ...


class StreamDecoder:
    """Turns token ids, fed one at a time, into text that never ends inside a UTF-8 character.

    Works with any tokenizer whose `decode_bytes(a + b)` starts with `decode_bytes(a)`; the
    new bytes of a token are taken as that difference over a small window of recent ids, so
    context-dependent rules (SentencePiece drops the leading space of the first piece) hold.
    `context`: ids already in the text (e.g. the prompt) when streaming a continuation; with
    no context the first token is decoded as the start of a text, like `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        # ids since the last one that produced bytes (plus it): all decode_bytes needs to know
        self._window = [int(i) for i in context]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one id; return the text that is now complete (possibly "")."""
        before = self.tokenizer.decode_bytes(self._window) if self._window else b""
        self._window.append(int(token_id))
        new = self.tokenizer.decode_bytes(self._window)[len(before):]
        if new:
            self._window = self._window[-1:]
        return self._utf8.decode(new)

    def flush(self) -> str:
        """The rest: an incomplete trailing character becomes U+FFFD. Resets the UTF-8 state."""
        return self._utf8.decode(b"", final=True)


# --------------------------------------------------------------------------- SentencePiece

class SentencePieceTokenizer:
    """A SentencePiece model file (`tokenizer.model`)."""

    def __init__(self, path: str | Path, data: bytes | None = None):
        """data: the file's bytes, if already read (they are what is parsed)."""
        import sentencepiece as spm

        self.path = Path(path)
        data = read_file(self.path, "sentencepiece model") if data is None else data
        try:  # the bytes, not the path: sentencepiece cannot open a path that is not UTF-8
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load sentencepiece model {self.path}: {e}") from None
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.max_id = self.vocab_size - 1
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        # Byte table for decode_bytes: sentencepiece only decodes to str, which would lose
        # the partial characters that streaming needs.
        self._bytes: list[bytes] = []
        self._control = [False] * self.vocab_size
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unused(i):
                self._control[i] = True
                b = b""
            elif sp.is_byte(i):                      # "<0xE6>"
                b = bytes([int(piece[3:5], 16)])
            elif sp.is_unknown(i):
                b = sp.decode([i]).encode()          # " \u2047 "
            else:
                b = piece.replace("\u2581", " ").encode()
            self._bytes.append(b)
        # Does decoding drop the space of a leading "\u2581" (add_dummy_prefix)? Ask sp itself.
        self._strip_first = False
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if piece.startswith("\u2581") and not (self._control[i] or sp.is_byte(i) or sp.is_unknown(i)):
                self._strip_first = sp.decode([i]).encode() != self._bytes[i]
                break

    @classmethod
    def train(cls, data: Sequence[str | Path] | Iterable[str], vocab_size: int,
              out_path: str | Path, model_type: str = "bpe", **options) -> SentencePieceTokenizer:
        """Train a model and write it to `out_path` (the directory is created).

        data: a path or a list/tuple of text file paths, or any other iterable of texts (each
        split into lines).
        Defaults make any text round-trip (identity normalisation, whitespace kept, byte
        fallback for unseen characters) and training deterministic and silent; `options`
        override them (sentencepiece trainer flags).
        """
        import sentencepiece as spm

        if isinstance(data, (str, Path)):
            data = [data]
        if isinstance(data, (list, tuple)):
            for f in data:
                if not Path(f).is_file():
                    raise TokenizerError(f"tokenizer training file not found: {f}")
            texts: Iterable[str] = (Path(f).read_text(encoding="utf-8") for f in data)
        else:
            texts = data
        lines = (line for text in texts for line in text.splitlines() if line.strip())
        args = dict(
            model_type=model_type, vocab_size=int(vocab_size), byte_fallback=True,
            character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
            hard_vocab_limit=False,          # small corpora may not fill the vocabulary
            max_sentence_length=1 << 16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=1,                   # multi-threaded EM (unigram) is order-dependent
            minloglevel=2,
        )
        args.update(options)
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=buf, **args)
        except RuntimeError as e:
            raise TokenizerError(f"sentencepiece training failed: {str(e).strip()}") from None
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(buf.getvalue())
        return cls(out_path)

    def encode(self, text: str) -> list[int]:
        utf8(text)
        return self.sp.encode(text)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        parts = [self._bytes[_check_id(i, self.vocab_size)] for i in ids]
        if self._strip_first:
            for j, i in enumerate(ids):
                if not self._control[i]:       # sentencepiece skips control pieces here
                    if parts[j].startswith(b" ") and self.sp.id_to_piece(int(i)).startswith("\u2581"):
                        parts[j] = parts[j][1:]
                    break
        return b"".join(parts)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_config(self) -> dict:
        return {"type": "sentencepiece", "file": self.path.name}


# --------------------------------------------------------------------------- RWKV World

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"


class WorldTokenizer:
    """The RWKV World tokenizer: greedy longest match over the UTF-8 bytes of the text.

    Vocabulary file lines: `<id> <python str or bytes literal> <byte length>`; ids 1..65529,
    id 0 is end-of-text (decodes to nothing), the model's vocab_size is 65536.
    """

    vocab_size = 65536
    eos_id = 0

    def __init__(self, vocab_path: str | Path, data: bytes | None = None):
        """data: the file's bytes, if already read (they are what is parsed)."""
        self.path = Path(vocab_path)
        data = read_file(self.path, "RWKV World vocabulary") if data is None else data
        self._bytes: list[bytes] = [b""] * self.vocab_size
        try:
            for n, line in enumerate(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"), 1):
                self._parse_line(line.rstrip("\n"), n)
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{self.path}: not UTF-8 text ({e.reason})") from None
        # Prefix table, a flat trie: every prefix of every token -> id of that exact token,
        # or -1 if it is only a prefix. The longest match is the last hit while walking on.
        self._prefix: dict[bytes, int] = {}
        for i, tok in enumerate(self._bytes):
            for n in range(1, len(tok)):
                self._prefix.setdefault(tok[:n], -1)
            if tok:
                self._prefix[tok] = i
        if any(self._prefix.get(bytes([b]), -1) < 0 for b in range(256)):
            raise TokenizerError(f"{self.path}: vocabulary lacks single-byte tokens, cannot encode all text")
        self.max_id = max(i for i, tok in enumerate(self._bytes) if tok)

    def _parse_line(self, line: str, n: int) -> None:
        try:
            head, rest = line.split(" ", 1)
            literal, length = rest.rsplit(" ", 1)
            idx, length = int(head), int(length)
            tok = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            raise TokenizerError(f"{self.path}:{n}: malformed vocabulary line") from None
        if isinstance(tok, str):
            try:
                tok = utf8(tok)
            except TokenizerError as e:
                raise TokenizerError(f"{self.path}:{n}: {e}") from None
        if not isinstance(tok, bytes) or len(tok) != length or not tok:
            raise TokenizerError(f"{self.path}:{n}: token is not {length} bytes")
        if not 0 < idx < self.vocab_size or self._bytes[idx]:
            raise TokenizerError(f"{self.path}:{n}: bad or repeated id {idx}")
        self._bytes[idx] = tok

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(utf8(text))

    def encode_bytes(self, data: bytes) -> list[int]:
        prefix, out, pos, n = self._prefix, [], 0, len(data)
        while pos < n:
            best, end, j = -1, pos + 1, pos + 1
            while j <= n:
                i = prefix.get(data[pos:j])
                if i is None:
                    break
                if i >= 0:
                    best, end = i, j
                j += 1
            out.append(best)                     # every single byte is a token: best >= 0
            pos = end
        return out

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        # Ids without a token (0 = end-of-text, 65530.. unused) decode to nothing.
        return b"".join(self._bytes[_check_id(i, self.vocab_size)] for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_config(self) -> dict:
        return {"type": "rwkv_world", "file": self.path.name}


def utf8(text: str, what: str = "the text") -> bytes:
    """`text` as UTF-8. A lone surrogate (what Python makes of invalid UTF-8 in argv or stdin, or
    a JSON escape like \\ud83d) has no UTF-8 form, so no tokenizer can encode it."""
    if not isinstance(text, str):
        raise TokenizerError(f"can only encode text (str), got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        if 0xDC80 <= c <= 0xDCFF:  # surrogateescape's spelling of a byte that was not UTF-8
            problem = f"is not valid UTF-8 (byte 0x{c - 0xDC00:02x} at character {e.start})"
        else:
            problem = f"is not valid Unicode (lone surrogate U+{c:04X} at character {e.start})"
        raise TokenizerError(f"{what} {problem}") from None


def read_file(path: Path, what: str) -> bytes:
    """The bytes of a regular file; TokenizerError at once for anything else (a FIFO would
    block forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise TokenizerError(f"{what} not found: {path}") from None
    except OSError as e:
        raise TokenizerError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TokenizerError(f"{what} {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _check_id(i, vocab_size: int) -> int:
    i = int(i)
    if not 0 <= i < vocab_size:
        raise TokenizerError(f"token id {i} outside the vocabulary [0, {vocab_size})")
    return i


# --------------------------------------------------------------------------- loading

_TYPES = {"sentencepiece": (SentencePieceTokenizer, "tokenizer.model"),
          "rwkv_world": (WorldTokenizer, WORLD_VOCAB_FILE)}


def tokenizer_from_file(path: str | Path, data: bytes | None = None) -> SentencePieceTokenizer | WorldTokenizer:
    """The tokenizer of a file given by itself (`prepare-data --tokenizer`): an RWKV World
    vocabulary (a .txt file, rwkv_vocab_v20230424.txt) or else a SentencePiece model."""
    cls = WorldTokenizer if Path(path).suffix == ".txt" else SentencePieceTokenizer
    return cls(path, data)


def tokenizer_type(spec: dict) -> tuple[type, str]:
    """(class, file name) of a config's tokenizer entry; TokenizerError for an unknown one."""
    if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise TokenizerError(f"unknown tokenizer type {kind!r}; expected one of {sorted(_TYPES)}")
    cls, default_file = _TYPES[spec["type"]]
    name = spec.get("file", default_file)
    # A bare file name: config.json must not point outside its model directory.
    if not is_plain_file_name(name):
        raise TokenizerError(f"tokenizer file must be a plain file name, got {name!r}")
    return cls, name


def load_tokenizer(model_dir: str | Path, spec: dict | None) -> Tokenizer | None:
    """The tokenizer named by config["tokenizer"] (`spec`), its file inside `model_dir`."""
    if spec is None:
        return None
    cls, name = tokenizer_type(spec)
    path = Path(model_dir) / name
    if not os.path.lexists(path):
        raise TokenizerError(f"tokenizer file not found: {path}")
    return cls(path)
