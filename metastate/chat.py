"""`metastate generate` and `metastate chat`, and `ChatSession`, the conversation they drive.

A conversation is one recurrent state: each turn feeds only the new message, never the earlier
turns again. Ctrl-C during an answer stops it and closes the turn, so the state is always the
state of exactly the text shown (message, answer so far, end of turn). The CLI wires these
sub-commands with `add_parsers(subparsers)`.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from metastate.api import (BACKENDS, KERNELS, Engine, GenerationError, context_warning, encode_continuation, load,
                           load_state, save_state, stream_generate)
from metastate_core.chat_templates import TEMPLATES, ChatTemplate, make_template, template_for
from metastate_core.constants import WEIGHT_DTYPES
from metastate_core.errors import MetaStateError
from metastate_core.sampling import Sampler, SamplingParams
from metastate_core.tokenizers import TokenizerError, utf8

HELP = """commands:
  /reset        forget the conversation (fresh state)
  /save FILE    write the conversation state to FILE (safetensors, see docs/chat.md)
  /load FILE    continue a conversation saved with /save (same model only)
  /help         this help
Ctrl-C stops an answer (or clears the line); Ctrl-D or /quit exits."""


class ChatError(MetaStateError):
    """A chat request that cannot be served (e.g. a model without a tokenizer)."""


@contextmanager
def _sigint_deferred():
    """Ignore Ctrl-C while the state is being brought to a consistent point (main thread only)."""
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals cannot arrive here anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@dataclass
class Turn:
    """One answer: its text as shown, its token ids and why it ended
    ("stop", "eos", "length" or "interrupted")."""

    text: str
    ids: list[int]
    finish_reason: str


class ChatSession:
    """A multi-turn conversation on one model, carrying the recurrent state across turns.

    state / logits: the state after everything so far and the next token's logits [V]
    (None before the first turn). n_tokens: tokens the state has read.
    """

    def __init__(self, model: Engine, tokenizer, template: ChatTemplate,
                 sampling: SamplingParams | None = None, max_tokens: int = 512):
        if tokenizer is None:
            raise ChatError("this model has no tokenizer, so it cannot chat")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.sampler = Sampler(sampling or SamplingParams())
        self.max_tokens = max_tokens
        self.reset()

    def reset(self) -> None:
        # one tuple, assigned at once: an interrupt never leaves half of it updated
        self._ctx = (self.model.zero_state(), None, 0)

    @property
    def state(self):
        return self._ctx[0]

    @property
    def logits(self):
        return self._ctx[1]

    @property
    def n_tokens(self) -> int:
        return self._ctx[2]

    def ask(self, message: str, on_text=None) -> Turn:
        """Answer `message`, calling on_text(piece) as text arrives. KeyboardInterrupt (from the
        model or from on_text) ends the answer early with finish_reason "interrupted"."""
        prompt = encode_continuation(self.tokenizer, self.template.user_turn(message))
        start = self._ctx
        ids, n_done, reason, shown = [], 0, "interrupted", []
        try:
            for r in stream_generate(self.model, self.tokenizer, prompt, self.max_tokens, sampler=self.sampler,
                                     stop=self.template.stop, state=start[0]):
                if r.token is not None:
                    ids.append(r.token)
                self._ctx = (r.state, r.logits, start[2] + len(prompt) + len(ids))
                n_done = len(ids)  # the state holds the prompt and ids[:n_done]
                if r.finish_reason:
                    reason = r.finish_reason
                if r.text:
                    shown.append(r.text)
                    if on_text is not None:
                        on_text(r.text)
        except KeyboardInterrupt:
            if self._ctx is start:  # still prefilling: the message was not taken in
                return Turn("", [], "interrupted")
        with _sigint_deferred():
            answer = self.tokenizer.decode(ids[:n_done])
            ends = [answer.find(s) + len(s) for s in self.template.stop if s in answer]
            if reason == "stop" and ends and min(ends) < len(answer):
                # The stop ended inside a token (World has "\n\n " and the like): the state has
                # read text past it. Read the turn again, as shown and ended at the stop.
                text = self.template.user_turn(message) + answer[:min(ends)]
                ids_read = encode_continuation(self.tokenizer, text)
                logits, state = self.model.prefill(ids_read, start[0])
                self._ctx = (state, logits, start[2] + len(ids_read))
                answer = answer[:min(ends)]
            self._close_turn(answer)
        return Turn("".join(shown), ids[:n_done], reason)

    def _close_turn(self, answer: str) -> None:
        """Feed what the template needs after an answer (its text as read), so the next turn
        starts cleanly."""
        close = self.template.close_turn(answer)
        if close:
            state, logits, n = self._ctx
            close_ids = encode_continuation(self.tokenizer, close)
            logits, state = self.model.prefill(close_ids, state)
            self._ctx = (state, logits, n + len(close_ids))

    def save(self, path) -> None:
        state, logits, n = self._ctx
        save_state(path, self.model, state, logits, n_tokens=n,
                   meta={"kind": "chat", "chat_template": self.template.name})

    def load(self, path) -> None:
        state, logits, meta = load_state(path, self.model)
        try:
            n = int(meta.get("n_tokens", "0"))
        except ValueError:
            n = 0
        self._ctx = (state, logits, n)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def _no_surrogates(text: str, what: str) -> str:
    """Text decoded with surrogateescape: refuse the bytes that were not valid UTF-8."""
    try:
        utf8(text, what)
    except TokenizerError as e:
        raise GenerationError(str(e)) from None
    return text


def _stdin_open(what: str) -> None:
    if sys.stdin is None:  # started with it closed (`0<&-`)
        raise GenerationError(f"standard input is closed: {what} reads it")


def _read_prompt(arg: str) -> str:
    if arg != "-":
        return _no_surrogates(arg, "the prompt")
    _stdin_open("--prompt -")
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GenerationError(f"the prompt read from stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} "
                              f"at offset {e.start})") from None


def _unescape(text: str) -> str:
    r"""--stop values: \n and \t as typed on a command line, \\ for a backslash."""
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def _sampling(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed)


def _load(args) -> tuple[Engine, object, SamplingParams]:
    sampling = _sampling(args)  # bad sampling values fail before the model loads
    model, tokenizer = load(args.model, args.backend, kernels=args.kernels, dtype=args.dtype,
                            cuda_graphs=args.cuda_graphs, threads=args.threads)
    print(f"backend: {model.description}", file=sys.stderr, flush=True)
    return model, tokenizer, sampling


def _warn(msg: str | None) -> None:
    if msg:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def cmd_generate(args) -> int:
    prompt = _read_prompt(args.prompt)
    if not prompt:
        raise GenerationError("the prompt is empty: give some text")
    if args.max_tokens < 0:
        raise GenerationError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    model, tokenizer, sampling = _load(args)
    if tokenizer is None:
        raise GenerationError(f"{args.model} has no tokenizer, so it cannot generate text")
    ids = tokenizer.encode(prompt)
    _warn(context_warning(model.cfg, len(ids)))
    state = None if args.state is None else load_state(args.state, model)[0]  # e.g. a state-tuned one
    last, ends_with_newline = None, True
    for last in stream_generate(model, tokenizer, ids, args.max_tokens, sampler=Sampler(sampling),
                                stop=[_unescape(s) for s in args.stop], state=state):
        if last.text:
            sys.stdout.write(last.text)
            sys.stdout.flush()
            ends_with_newline = last.text.endswith("\n")
    if not ends_with_newline:
        sys.stdout.write("\n")
    if args.verbose:
        print(f"prefill: {last.prompt_tps:.1f} tok/s, decode: {last.generation_tps:.1f} tok/s")
    sys.stdout.flush()
    return 0


def _template(args, model: Engine, tokenizer) -> ChatTemplate:
    if args.template is not None or args.user is not None or args.assistant is not None:
        name = args.template or template_for(model.cfg.extra.get("chat_template"),
                                             (model.cfg.tokenizer or {}).get("type")).name
        return make_template(name, args.user, args.assistant)
    return template_for(model.cfg.extra.get("chat_template"), (model.cfg.tokenizer or {}).get("type"))


def cmd_chat(args) -> int:
    if args.max_tokens < 1:
        raise GenerationError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    _stdin_open("chat")
    model, tokenizer, sampling = _load(args)
    if tokenizer is None:
        raise ChatError(f"{args.model or 'the model'} has no tokenizer, so it cannot chat")
    template = _template(args, model, tokenizer)
    session = ChatSession(model, tokenizer, template, sampling, args.max_tokens)
    if args.state is not None:  # start from a saved conversation or a tuned state, as /load does
        session.load(args.state)
    # Ctrl-C must stop an answer even when we were started with SIGINT ignored (a background
    # job of a non-interactive shell inherits SIG_IGN, and Python then keeps it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes become surrogates we can report
        sys.stdin.reconfigure(errors="surrogateescape")
    if sys.stdin.isatty() and sys.stdout.isatty():  # when input() uses readline at all
        try:  # input() then edits lines and keeps history, and reads lines past the terminal's
            import readline  # noqa: F401  (4095-byte canonical-mode limit, which cuts a paste)
        except ImportError:  # e.g. Windows
            pass
    who = f"you are {template.user}" + (f", the model is {template.assistant}" if template.assistant else "")
    print(f"chat template: {template.name} ({who}). /help for commands, Ctrl-D to exit.", flush=True)
    warned = False
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, like a shell
            print()
            continue
        try:
            utf8(line)
        except TokenizerError:
            print("error: that line is not valid UTF-8; nothing was sent", file=sys.stderr, flush=True)
            continue
        if line.startswith("/"):
            if _command(session, line.strip()):
                return 0
            continue
        if not line.strip():
            continue
        turn = session.ask(line, on_text=_printer())
        if turn.finish_reason == "interrupted":
            print("\n[interrupted]", flush=True)
        else:
            print(flush=True)
        if not warned:
            msg = context_warning(model.cfg, session.n_tokens)
            _warn(msg)
            warned = msg is not None


def _printer():
    """on_text for the REPL: the first piece loses its leading spaces (the World format's
    "Assistant: " space belongs to the answer's first token)."""
    started = False

    def show(text: str) -> None:
        nonlocal started
        if not started:
            text = text.lstrip(" ")
            started = bool(text)
        sys.stdout.write(text)
        sys.stdout.flush()

    return show


def _command(session: ChatSession, line: str) -> bool:
    """Run a /command; True to exit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/quit", "/exit"):
            return True
        if name == "/help":
            print(HELP)
        elif name == "/reset":
            session.reset()
            print("conversation reset")
        elif name in ("/save", "/load"):
            if not arg:
                raise ChatError(f"usage: {name} FILE")
            path = Path(arg).expanduser()
            if name == "/save":
                session.save(path)
                print(f"saved the conversation state ({session.n_tokens} tokens) to {path}")
            else:
                session.load(path)
                print(f"loaded the conversation state ({session.n_tokens} tokens) from {path}")
        else:
            raise ChatError(f"unknown command {name}; /help lists the commands")
    except MetaStateError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    except OSError as e:
        print(f"error: {e.strerror or e}: {arg}", file=sys.stderr)
    sys.stdout.flush()
    return False


def positive_int(text: str) -> int:
    """argparse type of a count: a positive integer."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def threads_arg(text: str) -> int | str:
    """argparse type of --threads: "auto" or a positive integer."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}") from None


MAX_PENALTY = 100.0


def penalty_arg(text: str) -> float:
    """argparse type of a penalty: |penalty| <= MAX_PENALTY. Logits are O(10): a penalty of 100
    already takes a repeated token's probability to e^-100, and beyond it lie only overflow
    and NaN (1e308 * count is infinite)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not abs(value) <= MAX_PENALTY:
        raise argparse.ArgumentTypeError(f"expected a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {text!r}")
    return value


def backend_args(p: argparse.ArgumentParser) -> None:
    """--backend and --threads (chat, generate, bench)."""
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="default auto: the fastest for this model here, measured once per machine and model "
                        "shape (a few decode steps each) and cached in $XDG_CACHE_HOME/metastate")
    p.add_argument("--threads", type=threads_arg, default="auto",
                   help="CPU threads of torch, or of numpy's BLAS (default auto: measured with the backend)")


def _common(p: argparse.ArgumentParser, temperature: float, top_p: float, max_tokens: int) -> None:
    p.add_argument("--model", help="model directory (default: the shipped weights/default/)")
    backend_args(p)
    p.add_argument("--kernels", choices=KERNELS, default="auto", help="the backend's WKV kernels")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, help="weight dtype (default: as stored)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="torch on an NVIDIA GPU: replay each decoded token from a CUDA graph")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens per answer (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=top_p, help=f"nucleus mass (default {top_p})")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * the top probability")
    p.add_argument("--presence-penalty", type=penalty_arg, default=0.0, help="in [-100, 100] (default 0)")
    p.add_argument("--frequency-penalty", type=penalty_arg, default=0.0, help="in [-100, 100] (default 0)")
    p.add_argument("--seed", type=int, help="random seed (default: fresh each run)")
    p.add_argument("--state", metavar="FILE",
                   help="start from a state file (chat /save, or `train --tune state`) instead of the empty state")


def add_parsers(subparsers) -> None:
    """Add `generate` and `chat` to the `metastate` command's sub-parsers."""
    p = subparsers.add_parser("generate", help="continue a prompt, streaming the text")
    p.add_argument("--prompt", required=True, help="the text to continue ('-' reads it from stdin)")
    _common(p, temperature=1.0, top_p=0.9, max_tokens=256)
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help=r"stop before this string (repeatable; \n and \t are understood)")
    p.add_argument("--verbose", action="store_true", help="print prefill and decode speed on the last line")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("chat", help="talk to the model; the state carries across turns")
    _common(p, temperature=1.0, top_p=0.5, max_tokens=512)
    p.add_argument("--template", choices=TEMPLATES,
                   help="chat format (default: config.json's chat_template, else by tokenizer)")
    p.add_argument("--user", metavar="NAME", help="the user's speaker label")
    p.add_argument("--assistant", metavar="NAME", help="the model's speaker label")
    p.set_defaults(func=cmd_chat)
