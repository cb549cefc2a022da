"""`metastate eval`: loss, perplexity and bits per byte of text files; `metastate lm-eval`: the
lm-evaluation-harness command line with this model registered (metastate/lm_eval_adapter.py).

    metastate eval --model weights/default held_out.txt
    metastate eval --model runs/a --model runs/b a.txt b.txt --json
    metastate lm-eval --model metastate --model_args model=weights/default --tasks TASK.yaml

How a text is scored (the adapter scores the same way): a file is one document, and a document
follows the tokenizer's end-of-text token, the separator training puts between documents. So
every one of the text's T tokens is predicted and counted, the first one from the state after
that token, and bits per byte divide the loss of all T tokens by all the UTF-8 bytes of the
text. A tokenizer without an end-of-text token leaves the first token as context only: the
loss covers tokens 2..T (the bytes are still all the text's).

The model reads a text in chunks of `chunk` tokens, carrying the recurrent state from one to
the next: memory is one chunk's logits [chunk, V] whatever the length of the text, and the
result is the same for any chunk (up to float rounding).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metastate.api import DTYPES, KERNELS, Engine, default_model_path, load
from metastate.chat import backend_args, positive_int
from metastate_core.constants import PREFILL_STEP
from metastate_core.errors import ExtraUnavailable, MetaStateError

LOG_ROWS = 64  # logits rows turned to log-probabilities at once (float64 [64, V])


class EvalError(MetaStateError):
    """A text or an option that evaluation cannot take."""


# -- scoring ---------------------------------------------------------------------------------

@dataclass
class Scored:
    """What a model assigns to a sequence of tokens after some context.

    log_probs: natural log-probability of each token [T] float64. greedy: whether each token was
    the most likely one [T] bool. state / logits: after the last token (logits predict the next).
    """

    log_probs: np.ndarray
    greedy: np.ndarray
    state: object
    logits: np.ndarray


def document_start(model: Engine, tokenizer) -> tuple[object, np.ndarray] | None:
    """(state, next-token logits [V]) at the start of a document: after the end-of-text token.
    None when the tokenizer has no such token."""
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        return None
    logits, state = model.prefill([eos])
    return state, logits


def _log_probs(rows: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log softmax(rows)[i, targets[i]] in float64 and whether targets[i] is the argmax of row i."""
    lp, greedy = np.empty(len(targets)), np.empty(len(targets), bool)
    for i in range(0, len(targets), LOG_ROWS):
        x = rows[i:i + LOG_ROWS].astype(np.float64)
        t = targets[i:i + LOG_ROWS]
        top = x.max(axis=1)
        lse = top + np.log(np.exp(x - top[:, None]).sum(axis=1))
        picked = x[np.arange(len(t)), t]
        lp[i:i + LOG_ROWS] = picked - lse
        greedy[i:i + LOG_ROWS] = picked >= top
    return lp, greedy


def score(model: Engine, ids: Sequence[int], state, logits: np.ndarray, chunk: int = PREFILL_STEP,
          progress=None) -> Scored:
    """Score ids [T >= 1] after a context: `state` is the state after it and `logits` [V] the
    logits that predict ids[0]. The tokens go through the model `chunk` at a time, the state
    carried; progress (a tqdm bar, optional) advances by the tokens of each chunk."""
    ids = model.check_ids(ids)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise EvalError(f"the chunk must be a positive number of tokens, got {chunk!r}")
    lp, greedy = np.empty(len(ids)), np.empty(len(ids), bool)
    previous = np.asarray(logits, np.float32)[None]  # predicts the chunk's first token
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        # row i predicts piece[i + 1], and the last row the next chunk's first token
        out, state = model.forward(piece, state)
        lp[start:start + len(piece)], greedy[start:start + len(piece)] = _log_probs(
            np.concatenate([previous, out[:-1]]), piece)
        previous = out[-1:]
        if progress is not None:
            progress.update(len(piece))
    if not np.isfinite(lp).all():
        raise EvalError("the model's logits hold NaN or infinity (float16 overflow, or broken weights)")
    return Scored(lp, greedy, state, previous[0])


@dataclass
class TextScore:
    """The loss of one text: total nats over its scored tokens, and its UTF-8 bytes."""

    nats: float
    tokens: int
    bytes: int

    def summary(self) -> dict:
        loss = self.nats / self.tokens
        return {"bytes": self.bytes, "tokens": self.tokens, "loss": loss, "perplexity": math.exp(loss),
                "bits_per_byte": self.nats / math.log(2) / self.bytes}


def score_text(model: Engine, tokenizer, text: str, chunk: int = PREFILL_STEP, progress=None,
               ids: Sequence[int] | None = None) -> TextScore:
    """The loss of `text` as one document (see the module's docstring); ids: its tokens, if
    already encoded."""
    ids = tokenizer.encode(text) if ids is None else ids
    start = document_start(model, tokenizer)
    if start is None:  # no end-of-text token: the first token is context only
        if len(ids) < 2:
            raise EvalError("the text is a single token, and without an end-of-text token the first one is not scored")
        logits, state = model.prefill(ids[:1])
        start, ids = (state, logits), ids[1:]
        if progress is not None:
            progress.update(1)
    scored = score(model, ids, *start, chunk=chunk, progress=progress)
    return TextScore(-float(scored.log_probs.sum()), len(ids), len(text.encode("utf-8")))


# -- reading the texts -----------------------------------------------------------------------

def read_text_file(path) -> str:
    """The text of a regular, non-empty UTF-8 file without NUL bytes (EvalError otherwise)."""
    from weights.files import open_regular

    try:
        with open_regular(path, "text file") as f:
            data = f.read()
    except MetaStateError as e:
        raise EvalError(str(e)) from None
    if not data:
        raise EvalError(f"text file {path} is empty: nothing to score")
    if b"\0" in data:
        raise EvalError(f"{path} is a binary file (NUL byte at offset {data.index(0)}), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


# -- metastate eval ---------------------------------------------------------------------------

def evaluate_model(path, texts: dict[str, str], backend="auto", kernels="auto", dtype=None, threads="auto",
                   chunk: int = PREFILL_STEP, label: str | None = None) -> dict:
    """One model over texts {name: text}: {"model", "engine", "files": [...], "total"}."""
    from tqdm import tqdm

    model, tokenizer = load(path, backend, kernels=kernels, dtype=dtype, threads=threads)
    label = label or str(path)
    if tokenizer is None:
        raise EvalError(f"{label} has no tokenizer, so it cannot score text")
    ids = {}
    for name, text in texts.items():
        ids[name] = tokenizer.encode(text)
        if not ids[name]:
            raise EvalError(f"{name} encodes to no tokens with the tokenizer of {label}")
    print(f"{label}: {model.description}", file=sys.stderr, flush=True)
    files, total = [], TextScore(0.0, 0, 0)
    with tqdm(total=sum(map(len, ids.values())), desc=label, unit="tok", disable=None, file=sys.stderr,
              leave=False) as bar:
        for name, text in texts.items():
            s = score_text(model, tokenizer, text, chunk, bar, ids[name])
            files.append({"file": name, **s.summary()})
            total = TextScore(total.nats + s.nats, total.tokens + s.tokens, total.bytes + s.bytes)
    return {"model": label, "engine": model.description, "files": files, "total": total.summary()}


def _table(results: list[dict], several_files: bool) -> str:
    """Files down, models across: each model's tokens, loss, perplexity and bits per byte under its name."""
    columns = ("tokens", "loss", "ppl", "bits/byte")
    header = ["file", "bytes", *columns * len(results)]
    summaries = [*zip(*(r["files"] for r in results))] + ([[r["total"] for r in results]] if several_files else [])
    names = [f["file"] for f in results[0]["files"]] + ["all files"] * several_files
    rows = [[name, f"{per_model[0]['bytes']:,}",
             *(cell for s in per_model for cell in (f"{s['tokens']:,}", f"{s['loss']:.4f}", f"{s['perplexity']:.3f}",
                                                    f"{s['bits_per_byte']:.4f}"))]
            for name, per_model in zip(names, summaries)]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    titles = []
    for m, r in enumerate(results):  # a model's name spans its columns (the last one widens if it must)
        group = range(2 + len(columns) * m, 2 + len(columns) * (m + 1))
        span = sum(widths[c] for c in group) + 2 * (len(columns) - 1)
        widths[group[-1]] += max(0, len(r["model"]) - span)
        titles.append(r["model"].rjust(max(span, len(r["model"]))))

    def line(cells):
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([" " * (widths[0] + widths[1] + 2) + "  " + "  ".join(titles), line(header),
                      *(line(row) for row in rows)])


FIRST_TOKEN = ("each file is one document after the end-of-text token, so all its tokens are scored "
               "(without such a token the first is context only)")


def cmd_eval(args) -> int:
    texts = {}
    for file in args.files:  # every file is checked before any model loads
        if file in texts:
            raise EvalError(f"{file} is given twice")
        texts[file] = read_text_file(Path(file))
    models = args.model or [None]
    results = [evaluate_model(path if path is not None else default_model_path(), texts, args.backend,
                              args.kernels, args.dtype, args.threads, args.chunk,
                              label=path if path is not None else "default")
               for path in models]
    if args.json:
        print(json.dumps({"chunk": args.chunk, "first_token": FIRST_TOKEN, "results": results}, indent=1))
    else:
        print(_table(results, len(texts) > 1))
    return 0


# -- metastate lm-eval ------------------------------------------------------------------------

ADAPTER = "metastate.lm_eval_adapter:MetaStateLM"


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's command line (`lm_eval ARGV`) with the model "metastate" registered."""
    import lm_eval.models  # noqa: F401  lm-eval's own models, which it adds only to an empty registry
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.registry import model_registry

    if "metastate" not in model_registry:  # lm-eval's lazy registration: the adapter loads when looked up
        model_registry.register("metastate", target=ADAPTER)
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def cmd_lm_eval(args) -> int:
    if importlib.util.find_spec("lm_eval") is None:
        raise ExtraUnavailable("metastate lm-eval needs lm_eval (lm-evaluation-harness): pip install -e '.[eval]'")
    return run_lm_eval(args.args)


def add_parsers(subparsers) -> None:
    """Add `eval` and `lm-eval` to the `metastate` command's sub-parsers."""
    p = subparsers.add_parser(
        "eval", help="loss, perplexity and bits per byte of text files",
        description="Loss (nats per token), perplexity and bits per byte of UTF-8 text files, read in chunks "
                    "that carry the recurrent state (constant memory at any length). Each file is one document "
                    "following the end-of-text token, the separator training puts between documents, so every "
                    "token of it is scored; bits per byte = the total loss in bits / the UTF-8 bytes of the "
                    "text. With a tokenizer that has no end-of-text token the first token is context only "
                    "(the loss covers tokens 2..T). The lm-eval adapter scores texts the same way.")
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    p.add_argument("--model", action="append", metavar="DIR",
                   help="model directory; repeat it to compare models side by side (default: the shipped model)")
    backend_args(p)
    p.add_argument("--kernels", choices=KERNELS, default="auto", help="the backend's WKV kernels")
    p.add_argument("--dtype", choices=DTYPES,
                   help="weight dtype (default: as stored); float64 computes in float64 (numpy backend)")
    p.add_argument("--chunk", type=positive_int, default=PREFILL_STEP,
                   help=f"tokens per model call (default {PREFILL_STEP}); the result does not depend on it")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_eval)

    # everything after `lm-eval` goes to lm-eval as it is: no option of ours ('+' is no option prefix here)
    p = subparsers.add_parser(
        "lm-eval", add_help=False, prefix_chars="+",
        help="lm-evaluation-harness with this model registered: its arguments, e.g. --model metastate "
             "--model_args model=DIR --tasks TASK (docs/eval.md)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)
