"""`metastate serve`: the OpenAI HTTP API over a loaded model, with a cache of recurrent states.

    metastate serve --model DIR --port 8000            # http://127.0.0.1:8000/v1
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the model's chat
template, each message encoded as `metastate chat` feeds a turn), streamed as server-sent
events with `"stream": true`. See docs/serve.md.

How a request runs. One worker thread owns the model. A request becomes a `Job` in a bounded
queue (full: 429); the worker admits jobs while the batch has room, looks up the longest
cached prefix of the prompt's token ids in the `StateCache`, prefills only the rest (a piece
at a time, between decode steps), and adds the sequence to the API's `DecodeBatch`, which
decodes every running sequence with one batched model call per token (`Engine.step_batch`)
and lets sequences join and leave between steps.
Decoding, sampling, stop strings and streaming text are the API's (`metastate.api`, the loop
`generate` and `batch_generate` run too); this module adds the queue, the cache and the HTTP
layer. A recurrent model's whole past is a fixed-size state,
so the cache keeps the state after each prompt and after each answer: the next turn of a
conversation prefills only its new tokens, whatever the conversation's length.

starlette and uvicorn are the `serve` extra. This module imports without them (so the CLI
can list `serve`); starting a server without them is one error naming the install command.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import math
import numbers
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metastate.api import (KERNELS, DecodeBatch, Engine, GenerationSequence, encode_continuation, load, load_state,
                           state_shapes)
from metastate.chat import backend_args
from metastate_core.chat_templates import TURN_END, ChatTemplate, clean_message, template_for
from metastate_core.constants import PREFILL_STEP, WEIGHT_DTYPES
from metastate_core.errors import MetaStateError, require_extra
from metastate_core.sampling import MAX_LOGIT_BIAS, Sampler, SamplingParams
from weights.files import open_regular

if TYPE_CHECKING:
    from starlette.requests import Request

DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 8             # sequences decoded together
DEFAULT_MAX_QUEUE = 64            # requests waiting for a place in the batch; more get 429
DEFAULT_MAX_PROMPT_TOKENS = 16384
DEFAULT_CACHE_MB = 256.0
COMPLETION_MAX_TOKENS = 16        # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 512             # `metastate chat`'s default answer length
MAX_TOP_LOGPROBS = 20             # OpenAI's limit
MAX_PENALTY = 2.0                 # OpenAI's range for presence_penalty / frequency_penalty
DISCONNECT_POLL_S = 0.5           # how often a non-streamed request checks that its client is still there
BODY_BYTES_PER_PROMPT_TOKEN = 64  # a request body may hold this much JSON per prompt token allowed,
BODY_BYTES_BASE = 2**20           # plus this: past that it is refused (413) before it is all read


class ServeError(MetaStateError):
    """A server that cannot start (bad options, a port in use)."""


def require_serve_extra() -> None:
    """ExtraUnavailable naming the install command unless starlette and uvicorn import. They
    are imported where used, not with this module: the CLI imports it for its parser."""
    for module in ("starlette", "uvicorn"):
        require_extra(module, "serve", "metastate serve")


# ------------------------------------------------------------------------------------------
# The state cache
# ------------------------------------------------------------------------------------------

class StateCache:
    """States after token prefixes, least recently used first out, bounded in bytes.

    Each entry is the state after reading `ids` (from the server's initial state) and the next
    token's logits. States are never modified in place, so an entry is shared, not copied.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], tuple[object, np.ndarray, int]] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()  # the worker writes; other threads may read (stats, tests)

    def lookup(self, ids: Sequence[int]) -> tuple[int, object, np.ndarray | None]:
        """(n, state, logits) of the longest cached prefix ids[:n] (n may be len(ids));
        (0, None, None) when none is cached."""
        ids = tuple(ids)
        with self.lock:
            best = max((k for k in self.entries  # the last id first: most keys differ there, no slice made
                        if len(k) <= len(ids) and ids[len(k) - 1] == k[-1] and ids[:len(k)] == k),
                       key=len, default=None)
            if best is None:
                return 0, None, None
            self.entries.move_to_end(best)
            state, logits, _ = self.entries[best]
            return len(best), state, logits

    def put(self, ids: Sequence[int], state, logits: np.ndarray, nbytes: int) -> None:
        ids = tuple(ids)
        nbytes += 8 * len(ids)  # the key
        if not ids or nbytes > self.max_bytes:
            return
        with self.lock:
            if ids in self.entries:
                self.bytes -= self.entries.pop(ids)[2]
            self.entries[ids] = (state, logits, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                self.bytes -= self.entries.popitem(last=False)[1][2]

    def __len__(self) -> int:
        return len(self.entries)


# ------------------------------------------------------------------------------------------
# Jobs and the worker that runs them
# ------------------------------------------------------------------------------------------

@dataclass
class Event:
    """What a job's client hears: new text (and the logprobs of its tokens) or the end."""

    text: str = ""
    logprobs: list = field(default_factory=list)  # [(token, logprob, [(token, logprob), ...])]
    finish_reason: str | None = None              # "stop" | "length" at the end
    error: tuple[int, str] | None = None          # (HTTP status, message)
    completion_tokens: int = 0


@dataclass(eq=False)
class Job:
    """One request: its prompt's token ids and generation settings, and the channel back."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    top_logprobs: int | None  # None: no logprobs; k: the chosen token's and the k most likely
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cached_tokens: int = 0
    cancelled: bool = False

    def emit(self, event: Event) -> None:
        """From the worker thread to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is stopping
            pass


class QueueFull(Exception):
    """Too many requests wait for a place in the batch: the new one is answered 429."""


@dataclass(eq=False)
class Prefill:
    """A job whose prompt is being read, a piece at a time between decode steps."""

    job: Job
    done: int               # prompt tokens the state has read
    state: object           # None: the empty state
    logits: np.ndarray | None
    t0: float = field(default_factory=time.perf_counter)


class Scheduler:
    """The worker thread: admits queued jobs into the batch (prefilling each from the longest
    cached prefix), decodes the batch a step at a time, caches the states after each prompt and
    each answer, and drops jobs whose client has gone."""

    def __init__(self, model: Engine, tokenizer, *, initial_state=None, cache: StateCache | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE):
        self.model, self.tokenizer, self.initial_state, self.cache = model, tokenizer, initial_state, cache
        self.max_batch, self.max_queue = max_batch, max_queue
        eos = getattr(tokenizer, "eos_id", None)
        self.stop_ids = set() if eos is None else {int(eos)}
        self.pending: deque[Job] = deque()
        self.batch = DecodeBatch(model)
        self.jobs: dict[GenerationSequence, Job] = {}  # the job of each sequence in the batch
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.prefilling: list[Prefill] = []  # jobs taken from the queue, their prompts being read
        self.largest_batch = 0  # the most sequences decoded together so far

    # -- called from request handlers -----------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cond:
            free = self.max_batch - len(self.jobs) - len(self.prefilling)  # places in the batch not yet taken
            if len(self.pending) >= self.max_queue + max(free, 0):
                raise QueueFull
            self.pending.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """The client has gone: drop the job now if it waits, at the next step if it runs."""
        with self.cond:
            job.cancelled = True
            if job in self.pending:
                self.pending.remove(job)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="metastate-serve-worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    @property
    def running(self) -> int:
        return len(self.batch)

    # -- the worker thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.stopping or self.pending or self.prefilling or len(self.batch)):
                    self.cond.wait()
                if self.stopping:
                    break
                room = self.max_batch - len(self.batch) - len(self.prefilling)
                new = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
                self.prefilling += [self._lookup(job) for job in new]
            # one piece of each prompt, then one decode step: a long prompt does not stall the streams
            for p in list(self.prefilling):
                try:
                    done = p.job.cancelled or self._prefill_piece(p)
                except Exception as e:  # noqa: BLE001  (the worker outlives any one request)
                    self._fail([p.job], e)
                    done = True
                if done:
                    with self.cond:
                        self.prefilling.remove(p)
            self.largest_batch = max(self.largest_batch, len(self.batch))
            gone = [seq for seq in self.batch.seqs if self.jobs[seq].cancelled]
            if gone:
                self.batch.remove(gone)
                for seq in gone:
                    del self.jobs[seq]
            if len(self.batch):
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001  (the batch state is suspect: start afresh)
                    self._fail(list(self.jobs.values()), e)
                    self.batch, self.jobs = DecodeBatch(self.model), {}
        with self.cond:
            for job in [*self.pending, *(p.job for p in self.prefilling), *self.jobs.values()]:
                job.emit(Event(error=(503, "the server is shutting down")))

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        """End jobs with an error: 400 for a request the model cannot serve, 500 (logged here,
        the client gets no traceback) for anything else."""
        if isinstance(e, MetaStateError):
            status, message = 400, " ".join(str(e).split())
        else:
            traceback.print_exc(file=sys.stderr)
            status, message = 500, f"internal error ({type(e).__name__})"
        for job in jobs:
            job.emit(Event(error=(status, message)))

    def _lookup(self, job: Job) -> Prefill:
        """A job's prompt, to be read from its longest cached prefix on."""
        done, state, logits = self.cache.lookup(job.ids) if self.cache is not None else (0, None, None)
        job.cached_tokens = done
        return Prefill(job, done, self.initial_state if state is None else state, logits)

    def _prefill_piece(self, p: Prefill) -> bool:
        """Read the next PREFILL_STEP tokens of a prompt (starting from its longest cached
        prefix); at its end, cache the state and start decoding. True when the prompt is done."""
        ids = p.job.ids
        if p.done < len(ids):
            piece = ids[p.done:p.done + PREFILL_STEP]
            p.logits, p.state = self.model.prefill(piece, p.state)
            p.done += len(piece)
            if p.done < len(ids):
                return False
            self._remember(ids, p.state, p.logits)
        seq = GenerationSequence(self.model, self.tokenizer, ids, p.logits, p.state, Sampler(p.job.sampling),
                                 p.job.stop, self.stop_ids, p.job.max_tokens, time.perf_counter() - p.t0)
        self.batch.add(seq)
        self.jobs[seq] = p.job
        return True

    def _step(self) -> None:
        for d in self.batch.step():
            job = self.jobs[d.seq]
            event = Event(text="".join(p.text for p in d.pieces), completion_tokens=len(d.seq.ids))
            if d.token is not None and job.top_logprobs is not None:
                event.logprobs.append(_logprobs(d.logits, d.token, job.top_logprobs))
            reason = d.pieces[-1].finish_reason if d.pieces else None
            if reason is not None:
                event.finish_reason = "length" if reason == "length" else "stop"
                self._remember(job.ids + d.seq.ids, d.seq.state, d.seq.logits)
                del self.jobs[d.seq]
            job.emit(event)

    def _remember(self, ids, state, logits) -> None:
        if self.cache is not None:  # the state's own size: float64 on numpy --dtype float64, on a GPU with torch
            nbytes = sum(getattr(state, k).nbytes for k in state_shapes(self.model.cfg)) + logits.nbytes
            self.cache.put(ids, state, logits, int(nbytes))


def _logprobs(logits: np.ndarray, token: int, k: int) -> tuple:
    """(token, its log-probability, the k most likely [(token, log-probability)]) under the
    model's distribution (the logits before any sampling setting)."""
    x = np.asarray(logits, np.float64)
    logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    top = np.argsort(-logp)[:k] if k else []
    return token, float(logp[token]), [(int(i), float(logp[i])) for i in top]


# ------------------------------------------------------------------------------------------
# Requests: checking the body, and OpenAI-style errors
# ------------------------------------------------------------------------------------------

class RequestError(Exception):
    """A request the server refuses: an OpenAI error body with this status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False,
            lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise RequestError(f"{name} must be {kind}, got {json.dumps(value)[:40]}", name)
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        top = hi if integer else format(hi, "g")
        where = (f"in {'(' if lo_open else '['}{lo:g}, {top}]" if math.isfinite(hi) else
                 f"{'>' if lo_open else '>='} {lo:g}")
        raise RequestError(f"{name} must be {kind} {where}, got {value!r}", name)
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {json.dumps(value)[:40]}", name)
    return value


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape, e.g. "\ud800"
        raise RequestError(f"{name} is not valid Unicode (a lone surrogate)", name) from None
    return value


@dataclass
class Settings:
    """The generation settings of a request, checked."""

    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    top_logprobs: int | None


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}, ids of this model's vocabulary."""
    bias = body.get("logit_bias")
    if bias is None or bias == {}:
        return None
    if not isinstance(bias, dict):
        raise RequestError("logit_bias must be an object mapping token ids to numbers", "logit_bias")
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise RequestError(f"logit_bias key {key[:40]!r} is not a token id of this model (0 to {vocab_size - 1})",
                               "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= MAX_LOGIT_BIAS:
            raise RequestError(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
                               "logit_bias")
        out[int(key)] = float(value)
    return out


def _settings(body: dict, default_max_tokens: int, chat: bool, vocab_size: int) -> Settings:
    if body.get("n") not in (None, 1):
        raise RequestError("only n = 1 is supported", "n")
    if body.get("echo") not in (None, False):  # ignoring it would change the answer's meaning silently
        raise RequestError("echo is not supported", "echo")
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    name = next((n for n in names if body.get(n) is not None), names[-1])
    max_tokens = _number(body, name, default_max_tokens, 1, math.inf, integer=True)
    sampling = SamplingParams(
        temperature=float(_number(body, "temperature", 1.0, 0, math.inf)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
        top_k=int(_number(body, "top_k", 0, 0, math.inf, integer=True)),
        min_p=float(_number(body, "min_p", 0.0, 0, 1)),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY)),
        seed=_number(body, "seed", None, 0, 2**64 - 1, integer=True),
        logit_bias=_logit_bias(body, vocab_size))
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or a list of strings", "stop")
    stop = tuple(_text(s, "stop") for s in stop)
    if chat:
        logprobs = _flag(body, "logprobs")
        k = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        if k is not None and not logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        top_logprobs = (k or 0) if logprobs else None
    else:
        top_logprobs = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    include_usage = _flag(options or {}, "include_usage")
    return Settings(max_tokens, sampling, stop, stream, include_usage, top_logprobs)


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    content = message.get("content")
    name = f"messages[{i}].content"
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RequestError(f"{name}: only text parts are supported", name)
            parts.append(_text(part.get("text"), name))
        return "".join(parts)
    return _text(content, name)


def chat_prompt(template: ChatTemplate, tokenizer, messages) -> list[int]:
    """The token ids of a conversation, ending where the model's answer begins.

    Each message is encoded apart, as `metastate chat` feeds it (`encode_continuation`): a user
    message as the template's user turn (which opens the answer), an assistant message as the
    answer text and what closes its turn, a system message as a paragraph of its own. So the
    ids of a conversation begin with the ids of every earlier request of it, which is what
    the state cache looks up.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    ids = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        text = _content(m, i)
        if role == "user":
            piece = template.user_turn(text)
        elif role == "assistant":
            piece = text + template.close_turn(text)
        elif role in ("system", "developer"):
            piece = clean_message(text) + TURN_END
        else:
            raise RequestError(f"messages[{i}].role must be system, user or assistant, got "
                               f"{json.dumps(role)[:40]}", f"messages[{i}].role")
        if piece:
            ids += encode_continuation(tokenizer, piece)
    if messages[-1].get("role") != "user":
        raise RequestError("the last message must be the user's", "messages")
    return ids


def completion_prompt(tokenizer, prompt, vocab_size: int, after_state: bool) -> list[int]:
    """A /v1/completions prompt: a string, a list of one string, or a list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not _text(prompt, "prompt"):
            raise RequestError("prompt is empty", "prompt")
        # after a loaded state the prompt continues that text: no SentencePiece space in front
        return encode_continuation(tokenizer, prompt) if after_state else tokenizer.encode(prompt)
    if (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        if not all(0 <= t < vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
        return prompt
    raise RequestError("prompt must be a string or a non-empty list of token ids (one prompt per request)",
                       "prompt")


# ------------------------------------------------------------------------------------------
# The application
# ------------------------------------------------------------------------------------------

def _json(obj, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(obj, status_code=status)


def _error(e: RequestError):
    return _json(e.body(), e.status)


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class Service:
    """The server's pieces: the model, its chat template, the scheduler, the limits."""

    def __init__(self, model: Engine, tokenizer, *, model_id: str | None = None, api_key: str | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, cache_mb: float = DEFAULT_CACHE_MB,
                 initial_state=None):
        if tokenizer is None:
            raise ServeError("the model has no tokenizer, so it cannot serve text")
        for name, value, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                                ("max_prompt_tokens", max_prompt_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
                raise ServeError(f"{name} must be an integer >= {lo}, got {value!r}")
        if not (isinstance(cache_mb, numbers.Real) and math.isfinite(cache_mb) and cache_mb >= 0):
            raise ServeError(f"cache_mb must be a number >= 0, got {cache_mb!r}")
        self.model, self.tokenizer = model, tokenizer
        self.model_id = model_id or (model.path.name if model.path else "metastate")
        self.api_key = api_key
        self.max_prompt_tokens = max_prompt_tokens
        self.max_body_bytes = BODY_BYTES_BASE + BODY_BYTES_PER_PROMPT_TOKEN * max_prompt_tokens
        self.after_state = initial_state is not None
        try:
            self.template = template_for(model.cfg.extra.get("chat_template"), (model.cfg.tokenizer or {}).get("type"))
        except MetaStateError:
            self.template = None  # no chat: /v1/chat/completions says so
        self.cache = StateCache(int(cache_mb * 2**20)) if cache_mb > 0 else None
        self.scheduler = Scheduler(model, tokenizer, initial_state=initial_state, cache=self.cache,
                                   max_batch=max_batch, max_queue=max_queue)
        self.created = int(time.time())

    # -- handlers ---------------------------------------------------------------------------
    async def models(self, request: Request):
        return _json({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request):
        if request.path_params["model"] != self.model_id:
            return _error(self._no_such_model(request.path_params["model"], None))
        return _json(self._model_card())

    async def completions(self, request: Request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request):
        return await self._generate(request, chat=True)

    # -- the shared path --------------------------------------------------------------------
    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "metastate"}

    def _no_such_model(self, name, param) -> RequestError:
        return RequestError(f"the model {name!r} does not exist: this server serves {self.model_id!r}", param,
                            404, code="model_not_found")

    async def _body(self, request: Request) -> dict:
        raw = await self._read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # bad JSON or not UTF-8; absurd nesting
            raise RequestError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError("model must be a string", "model")
        if model is not None and model != self.model_id:
            raise self._no_such_model(model, "model")
        return body

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) once it passes `max_body_bytes`: by its declared length, or
        while it arrives (a chunked body declares none), so a huge body is never held."""
        too_big = RequestError(f"the request body is over this server's limit of {self.max_body_bytes:,} bytes "
                               "(it grows with --max-prompt-tokens)", None, 413, code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def _job(self, body: dict, chat: bool) -> tuple[Job, Settings]:
        settings = _settings(body, CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS, chat, self.model.cfg.vocab_size)
        try:
            if chat:
                if self.template is None:
                    raise RequestError("this model has no chat template", "messages")
                ids = chat_prompt(self.template, self.tokenizer, body.get("messages"))
                stop = tuple(dict.fromkeys(self.template.stop + settings.stop))
            else:
                ids = completion_prompt(self.tokenizer, body.get("prompt"), self.model.cfg.vocab_size,
                                        self.after_state)
                stop = settings.stop
        except MetaStateError as e:  # the tokenizer refused the text
            raise RequestError(" ".join(str(e).split()), "messages" if chat else "prompt") from None
        if not ids:
            raise RequestError("the prompt encodes to no tokens", "messages" if chat else "prompt")
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(f"the prompt is {len(ids)} tokens, over this server's limit of "
                               f"{self.max_prompt_tokens}", "messages" if chat else "prompt",
                               code="context_length_exceeded")
        job = Job(list(ids), settings.max_tokens, settings.sampling, stop, settings.top_logprobs,
                  asyncio.get_running_loop())
        return job, settings

    async def _generate(self, request: Request, chat: bool):
        try:
            job, settings = self._job(await self._body(request), chat)
            self.scheduler.submit(job)
        except RequestError as e:
            return _error(e)
        except QueueFull:
            return _error(RequestError("the server is busy: too many requests are waiting; try again later",
                                       None, 429, "rate_limit_error", "queue_full"))
        reply = _Reply(self, job, settings, chat)
        if settings.stream:
            return _Stream(reply.stream(), self.scheduler, job)
        try:
            return await reply.whole(request)
        finally:
            self.scheduler.cancel(job)  # a no-op once it has finished


class _Reply:
    """The OpenAI response objects of one job, whole or as stream chunks."""

    def __init__(self, service: Service, job: Job, settings: Settings, chat: bool):
        self.service, self.job, self.settings, self.chat = service, job, settings, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.prev = job.ids[-1]  # the token before the next one: how its text starts depends on it
        self.offset = 0          # characters of answer so far (completions' text_offset)

    def usage(self, completion_tokens: int) -> dict:
        n = len(self.job.ids)
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.job.cached_tokens}}

    def _token_text(self, token: int, prev: int) -> bytes:
        decode = self.service.tokenizer.decode_bytes
        return decode([prev, token])[len(decode([prev])):]

    def logprobs(self, entries: list) -> dict | None:
        """The logprobs object of some tokens, in the shape of the endpoint."""
        if self.job.top_logprobs is None:
            return None
        out = []
        for token, logprob, top in entries:
            prev, self.prev = self.prev, token
            out.append((self._token_text(token, prev), logprob,
                        [(self._token_text(t, prev), lp) for t, lp in top]))
        if self.chat:
            return {"content": [{"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b),
                                 "top_logprobs": [{"token": tb.decode("utf-8", "replace"), "logprob": tlp,
                                                   "bytes": list(tb)} for tb, tlp in top]}
                                for b, lp, top in out]}
        offsets = []
        for b, _, _ in out:
            offsets.append(self.offset)
            self.offset += len(b.decode("utf-8", "replace"))
        return {"tokens": [b.decode("utf-8", "replace") for b, _, _ in out], "token_logprobs": [lp for _, lp, _ in out],
                "top_logprobs": [{tb.decode("utf-8", "replace"): tlp for tb, tlp in top} for _, _, top in out],
                "text_offset": offsets}

    def _choice(self, text: str, logprobs, finish_reason, delta: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if delta:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def _object(self, choices: list, chunk: bool = False, usage: dict | None = None) -> dict:
        kind = f"{self.object}.chunk" if chunk and self.chat else self.object
        obj = {"id": self.id, "object": kind, "created": self.created, "model": self.service.model_id,
               "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        return obj

    async def whole(self, request: Request):
        text, entries, checked = [], [], time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(self.job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                if await request.is_disconnected():
                    return _json({}, 499)  # nobody reads it; the caller cancels the job
                checked = time.monotonic()
            if event is None:
                continue
            if event.error:
                return _error(RequestError(event.error[1], None, event.error[0],
                                           "server_error" if event.error[0] >= 500 else "invalid_request_error"))
            text.append(event.text)
            entries += event.logprobs
            if event.finish_reason:
                choice = self._choice("".join(text), self.logprobs(entries), event.finish_reason, delta=False)
                return _json(self._object([choice], usage=self.usage(event.completion_tokens)))

    async def stream(self):
        if self.chat:  # the role first, as OpenAI sends it
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield _sse(self._object([first], chunk=True))
        pending = []  # logprobs of tokens whose text is not out yet (inside a character, or a held-back stop)
        while True:
            event = await self.job.events.get()
            if event.error:
                yield _sse(RequestError(event.error[1], None, event.error[0], "server_error").body())
                break
            pending += event.logprobs
            if event.text:
                yield _sse(self._object([self._choice(event.text, self.logprobs(pending), None, True)], chunk=True))
                pending = []
            if event.finish_reason:
                logprobs = self.logprobs(pending) if pending else None
                yield _sse(self._object([self._choice("", logprobs, event.finish_reason, True)], chunk=True))
                if self.settings.include_usage:
                    yield _sse(self._object([], chunk=True, usage=self.usage(event.completion_tokens)))
                break
        yield b"data: [DONE]\n\n"


class _Stream:
    """A response of server-sent events; however it ends (done, client gone), the job ends."""

    def __init__(self, content, scheduler: Scheduler, job: Job):
        from starlette.responses import StreamingResponse

        self.response = StreamingResponse(content, media_type="text/event-stream",
                                          headers={"Cache-Control": "no-cache"})
        self.scheduler, self.job = scheduler, job

    async def __call__(self, scope, receive, send):
        try:
            await self.response(scope, receive, send)
        finally:
            self.scheduler.cancel(self.job)


class _Auth:
    """ASGI middleware: every request needs `Authorization: Bearer KEY` when a key is set."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = _error(RequestError("invalid API key: send Authorization: Bearer <key>", None, 401,
                                               code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_app(service: Service):
    """The Starlette application of a `Service`; its worker runs while the app is served."""
    require_serve_extra()
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.routing import Route

    @asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        try:
            yield
        finally:
            service.scheduler.stop()

    async def http_error(request, exc):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(RequestError(f"{exc.detail}: {request.method} {request.url.path}", None, exc.status_code,
                                   code=kind))

    async def server_error(request, exc: Exception):  # logged by uvicorn; the client gets no traceback
        return _error(RequestError("internal server error", None, 500, "server_error"))

    routes = [Route("/v1/models", service.models, methods=["GET"]),
              Route("/v1/models/{model:path}", service.model, methods=["GET"]),
              Route("/v1/completions", service.completions, methods=["POST"]),
              Route("/v1/chat/completions", service.chat_completions, methods=["POST"])]
    middleware = [Middleware(_Auth, key=service.api_key)] if service.api_key else []
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.service = service
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one); ServeError when it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def _int_arg(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = lo - 1
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}{f' and <= {hi}' if hi else ''}, "
                                             f"got {text!r}")
        return n

    return parse


def _mb_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of MiB >= 0, got {text!r}")
    return value


def add_parsers(sub) -> None:
    """Add `serve` to the `metastate` command's sub-parsers."""
    p = sub.add_parser("serve", help="the OpenAI HTTP API (completions, chat) with a state cache")
    p.add_argument("--model", help="model directory (default: the shipped weights/default/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_arg(0, 65535), default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on every request")
    key.add_argument("--api-key-file", metavar="FILE",
                     help="the same, the key read from FILE's first line (not shown to other users by ps)")
    backend_args(p)
    p.add_argument("--kernels", choices=KERNELS, default="auto", help="the backend's WKV kernels")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, help="weight dtype (default: as stored)")
    p.add_argument("--max-batch", type=_int_arg(1), default=DEFAULT_MAX_BATCH,
                   help=f"requests decoded together (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-queue", type=_int_arg(0), default=DEFAULT_MAX_QUEUE,
                   help=f"requests waiting for a place in the batch; more are answered 429 (default "
                        f"{DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-prompt-tokens", type=_int_arg(1), default=DEFAULT_MAX_PROMPT_TOKENS,
                   help=f"longest prompt accepted (default {DEFAULT_MAX_PROMPT_TOKENS})")
    p.add_argument("--cache-mb", type=_mb_arg, default=DEFAULT_CACHE_MB,
                   help=f"memory for cached states, MiB (default {DEFAULT_CACHE_MB:g}; 0: no cache)")
    p.add_argument("--state", metavar="FILE",
                   help="start every request from this saved state (chat /save, or state tuning)")
    p.set_defaults(func=cmd_serve)


def read_api_key(path: str) -> str:
    """The key on the first line of a file (a regular file, at most 4 KiB), stripped."""
    if not path:
        raise ServeError("--api-key-file is empty: give the path of the file that holds the key")
    with open_regular(Path(path), "--api-key-file") as f:
        data = f.read(4097)
    if len(data) > 4096:
        raise ServeError(f"--api-key-file {path} is over 4 KiB: expected one line holding the key")
    try:
        lines = data.decode("utf-8-sig").strip().splitlines()  # utf-8-sig: a BOM (Notepad) is not the key's
    except UnicodeDecodeError:
        raise ServeError(f"--api-key-file {path} is not UTF-8 text") from None
    if not lines:
        raise ServeError(f"--api-key-file {path} holds no key on its first line")
    return lines[0].strip()


def cmd_serve(args) -> int:
    require_serve_extra()
    import uvicorn

    if args.api_key_file is not None:  # "" (an unset $VARIABLE) is refused, never "no key"
        args.api_key = read_api_key(args.api_key_file)

    sock = bind(args.host, args.port)  # before the model loads: a port in use fails at once
    with sock:
        model, tokenizer = load(args.model, args.backend, kernels=args.kernels, dtype=args.dtype,
                                threads=args.threads)
        initial_state = load_state(Path(args.state), model)[0] if args.state else None
        service = Service(model, tokenizer, api_key=args.api_key, max_batch=args.max_batch,
                          max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                          cache_mb=args.cache_mb, initial_state=initial_state)
        app = make_app(service)
        host, port = sock.getsockname()[:2]
        print(f"backend: {model.description}", file=sys.stderr)
        if not args.api_key and not ipaddress.ip_address(host).is_loopback:
            print(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use "
                  "the model", file=sys.stderr)
        url_host = f"[{host}]" if ":" in host else host
        print(f"serving {service.model_id!r} at http://{url_host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr,
              flush=True)
        try:
            uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn passes Ctrl-C on once it has shut down cleanly
            pass
    print("server stopped", file=sys.stderr)
    return 0
