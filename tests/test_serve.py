"""`metastate serve`: the OpenAI HTTP API on 127.0.0.1, driven by the official `openai` client
and by raw HTTP (http.client), on the shipped model with the NumPy backend.

Expected answers come from the API's own unbatched path (`generate` / `stream_generate`, one
prompt at a time, no cache) or from a second server with the cache off, never from the
server's code; logprobs are checked against one full pass of `Engine.logits`.
"""

import http.client
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402

from metastate.api import encode_continuation, generate, load, stream_generate  # noqa: E402
from metastate.serve import Service, ServeError, StateCache, bind, make_app, require_serve_extra  # noqa: E402
from metastate_core.chat_templates import template_for  # noqa: E402
from metastate_core.constants import PREFILL_STEP  # noqa: E402

MAX_PROMPT = 256


def fresh_engine():
    return load(None, "numpy", threads=1)


@contextmanager
def running(service):
    """The service's app on a free port of 127.0.0.1, in a thread: yields (host, port)."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(make_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(30)


def client(address, key="unused"):
    return openai.OpenAI(base_url=f"http://{address[0]}:{address[1]}/v1", api_key=key, max_retries=0, timeout=120)


def post(address, path, body, headers=None, method="POST"):
    """(status, parsed JSON body) of one raw HTTP request; body bytes are sent as they are."""
    conn = http.client.HTTPConnection(*address, timeout=120)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"null")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def model():
    return fresh_engine()


@pytest.fixture(scope="module")
def server(model):
    service = Service(*model, max_prompt_tokens=MAX_PROMPT)
    with running(service) as address:
        yield address, service


def test_models_and_a_greedy_completion_with_logprobs(server, model):
    address, _ = server
    status, body = post(address, "/v1/models", None, method="GET")
    assert status == 200 and [m["id"] for m in body["data"]] == ["default"]
    engine, tok = model
    prompt = "ROMEO.\nWhat light"
    r = client(address).completions.create(model="default", prompt=prompt, max_tokens=24, temperature=0, logprobs=3)
    assert r.choices[0].text == generate(engine, tok, prompt, 24, temperature=0.0)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)), 24)
    # logprobs: the log-softmax of one pass of the recurrence over prompt + answer
    lp = r.choices[0].logprobs
    ids = tok.encode(prompt)
    answer = [p.token for p in stream_generate(engine, tok, ids, 24, temperature=0.0) if p.token is not None]
    x = engine.logits(ids + answer[:-1])[len(ids) - 1:].astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(lp.token_logprobs, logp[np.arange(24), answer], atol=1e-3)
    np.testing.assert_allclose([sorted(t.values(), reverse=True) for t in lp.top_logprobs],
                               -np.sort(-logp, -1)[:, :3], atol=1e-3)
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0


def test_stop_strings_and_a_seed(server, model):
    address, _ = server
    engine, tok = model
    c = client(address)
    free = generate(engine, tok, "JULIET.\n", 40, temperature=0.0)
    stop = free[10:13]
    r = c.completions.create(model="default", prompt="JULIET.\n", max_tokens=40, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == generate(engine, tok, "JULIET.\n", 40, temperature=0.0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    sampled = [c.completions.create(model="default", prompt="KING.\n", max_tokens=20, temperature=0.9, seed=7)
               .choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1] == generate(engine, tok, "KING.\n", 20, temperature=0.9, seed=7)


def _chat(address, turns, max_tokens=40):
    """A streamed conversation through the openai client: [(answer, usage)] per turn."""
    c, messages, out = client(address), [], []
    for message in turns:
        messages.append({"role": "user", "content": message})
        stream = c.chat.completions.create(model="default", messages=messages, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        text, usage, reasons = [], None, []
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                reasons.append(choice.finish_reason)
        assert reasons[-1] in ("stop", "length") and usage is not None
        out.append(("".join(text), usage))
        messages.append({"role": "assistant", "content": out[-1][0]})
    return out


def test_streamed_chat_reuses_cached_states_and_equals_an_uncached_run(model):
    turns = ["What light through yonder window breaks?", "Speak again, bright angel.", "Good night, good night!"]
    engine, tok = model
    cached = Service(*fresh_engine(), max_prompt_tokens=MAX_PROMPT)
    prefilled = []  # tokens each prefill of the cached server read
    prefill = cached.model.prefill
    cached.model.prefill = lambda ids, state=None, *a: prefilled.append(len(ids)) or prefill(ids, state, *a)
    with running(cached) as address:
        with_cache = _chat(address, turns)
    with running(Service(*fresh_engine(), cache_mb=0)) as address:
        without = _chat(address, turns)
    assert [t for t, _ in with_cache] == [t for t, _ in without]
    assert [u.prompt_tokens_details.cached_tokens for _, u in without] == [0, 0, 0]
    hits = [u.prompt_tokens_details.cached_tokens for _, u in with_cache]
    assert hits[0] == 0 and hits[1] > 0 and hits[2] > 0
    # the cache holds at least each earlier prompt, and only the rest was prefilled
    prompts = [u.prompt_tokens for _, u in with_cache]
    assert hits[1] >= prompts[0] and hits[2] >= prompts[1]
    assert prefilled == [n - h for n, h in zip(prompts, hits)]
    # the first turn is what the API gives for that turn alone (the template's stop ends it)
    template = template_for("shakespeare", "sentencepiece")
    ids = encode_continuation(tok, template.user_turn(turns[0]))
    alone = "".join(r.text for r in stream_generate(engine, tok, ids, 40, temperature=0.0, stop=template.stop))
    assert with_cache[0][0] == alone and with_cache[0][1].prompt_tokens == len(ids)


def _stream_completion(address, prompt, max_tokens):
    stream = client(address).completions.create(model="default", prompt=prompt, max_tokens=max_tokens,
                                                temperature=0, stream=True)
    return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def test_eight_concurrent_streams_get_their_own_answers(server, model):
    address, service = server
    engine, tok = model
    prompts = ["ROMEO.\n", "JULIET.\nO", "HAMLET.\nTo be", "KING.\nMy lords,", "First Citizen.\n",
               "MACBETH.\nIs this", "PORTIA.\nThe quality", "LEAR.\nBlow, winds"]
    lengths = [12 + 5 * i for i in range(len(prompts))]  # they leave the batch at different steps
    answers, errors = [None] * len(prompts), []
    start = threading.Barrier(len(prompts))

    def ask(i):
        try:
            start.wait()
            answers[i] = _stream_completion(address, prompts[i], lengths[i])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert answers == [generate(engine, tok, p, n, temperature=0.0) for p, n in zip(prompts, lengths)]
    assert service.scheduler.largest_batch >= 2  # they were decoded together


BAD = [  # (path, body): each must get a 4xx with an OpenAI error body
    ("/v1/completions", b'{"prompt": "a", '),                                   # invalid JSON
    ("/v1/completions", b"[1, 2]"),                                             # not an object
    ("/v1/completions", b"\xff\xfe{}"),                                         # not UTF-8
    ("/v1/completions", b"[" * 100000 + b"]" * 100000),                         # absurd nesting
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}),
    ("/v1/completions", {"prompt": "a", "max_tokens": -3}),
    ("/v1/completions", {"prompt": "a", "max_tokens": "10"}),
    ("/v1/completions", {"prompt": "a", "max_tokens": True}),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2.5}),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}),
    ("/v1/completions", {"prompt": "a", "temperature": -1}),
    ("/v1/completions", b'{"prompt": "a", "temperature": NaN}'),
    ("/v1/completions", {"prompt": "a", "top_p": 0}),
    ("/v1/completions", {"prompt": "a", "top_p": 1.5}),
    ("/v1/completions", {"prompt": "a", "stop": 5}),
    ("/v1/completions", {"prompt": "a", "stop": ["x", 1]}),
    ("/v1/completions", {"prompt": "a", "seed": "x"}),
    ("/v1/completions", {"prompt": "a", "logprobs": 99}),
    ("/v1/completions", {"prompt": "a", "n": 2}),
    ("/v1/completions", {"prompt": "a", "echo": True}),
    ("/v1/completions", {"prompt": "a", "logit_bias": [1, 2]}),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"the": 5}}),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"-1": 5}}),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"99999": 5}}),                # past the vocabulary
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 101}}),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": "up"}}),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": True}}),
    ("/v1/completions", b'{"prompt": "a", "logit_bias": {"5": NaN}}'),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 3}),
    ("/v1/completions", {"max_tokens": 5}),                                     # no prompt
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": [1, 2, 99999]}),                             # token id out of range
    ("/v1/completions", {"prompt": [[1, 2], [3]]}),
    ("/v1/completions", {"prompt": "the king " * 400}),                         # over --max-prompt-tokens
    ("/v1/completions", b'{"prompt": "\\ud800"}'),                              # a lone surrogate
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}),                     # 404: no such model
    ("/v1/completions", {"prompt": "a", "model": 7}),
    ("/v1/chat/completions", {"messages": "hello"}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}),                # no role
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "o"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream_options": 1}),
    ("/v1/nothing", {}),                                                        # 404
]


def test_malformed_requests_get_4xx_and_the_server_goes_on(server):
    address, service = server
    assert len(BAD) >= 20
    for path, body in BAD:
        status, reply = post(address, path, body)
        assert 400 <= status < 500, (path, body[:80], status, reply)
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (path, reply)
        assert "Traceback" not in error["message"]
    status, reply = post(address, "/v1/completions", None, method="GET")
    assert status == 405 and reply["error"]["message"]
    status, reply = post(address, "/v1/completions", {"prompt": "a", "max_tokens": 0})
    assert reply["error"]["param"] == "max_tokens"
    status, reply = post(address, "/v1/completions", {"prompt": "the king " * 400})
    assert reply["error"]["code"] == "context_length_exceeded"
    assert service.scheduler.thread.is_alive()
    r = client(address).chat.completions.create(model="default", messages=[{"role": "user", "content": "Hail!"}],
                                                max_tokens=5, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 5


def test_a_wrong_api_key_gets_401(model):
    with running(Service(*model, api_key="s3cret")) as address:
        status, reply = post(address, "/v1/models", None, method="GET")
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        status, _ = post(address, "/v1/completions", {"prompt": "a"}, {"Authorization": "Bearer wrong"})
        assert status == 401
        with pytest.raises(openai.AuthenticationError):
            client(address, "wrong").models.list()
        r = client(address, "s3cret").completions.create(model="default", prompt="ROMEO.\n", max_tokens=3)
        assert r.usage.completion_tokens == 3


def test_a_full_queue_gets_429_and_a_disconnected_client_frees_its_slot(model):
    service = Service(*model, max_batch=1, max_queue=1)
    scheduler = service.scheduler
    with running(service) as address:
        # A: a long streamed answer holds the only place in the batch
        conn = http.client.HTTPConnection(*address, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "ROMEO.\n", "max_tokens": 100000,
                                                                 "stream": True}))
        stream = conn.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data: ")
        # B waits in the queue (its one place) ...
        waiting = {}
        b = threading.Thread(target=lambda: waiting.update(
            reply=post(address, "/v1/completions", {"prompt": "JULIET.\n", "max_tokens": 4})))
        b.start()
        deadline = time.monotonic() + 30
        while not scheduler.pending:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # ... so C is turned away
        status, reply = post(address, "/v1/completions", {"prompt": "KING.\n", "max_tokens": 4})
        assert status == 429 and reply["error"]["code"] == "queue_full"
        assert b.is_alive()  # still waiting: A has not finished
        conn.close()  # A's client goes away mid-stream: its place goes to B
        b.join(60)
        assert waiting["reply"][0] == 200 and waiting["reply"][1]["usage"]["completion_tokens"] == 4
        deadline = time.monotonic() + 30
        while scheduler.running or scheduler.jobs:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_a_server_state_starts_every_request(model):
    engine, tok = model
    state = engine.prefill(tok.encode("ROMEO.\nBut soft, what light through yonder window breaks?\n\n"))[1]
    with running(Service(engine, tok, initial_state=state)) as address:
        r = client(address).completions.create(model="default", prompt="JULIET.\n", max_tokens=16, temperature=0)
    assert r.choices[0].text == generate(engine, tok, "JULIET.\n", 16, temperature=0.0, state=state)


def test_state_cache_longest_prefix_and_lru_by_bytes():
    cache = StateCache(max_bytes=3 * (100 + 8 * 3))
    for ids, name in (((1, 2), "a"), ((1, 2, 3), "b"), ((1, 5), "c")):
        cache.put(ids, name, np.zeros(1), nbytes=100)
    assert cache.lookup([1, 2, 3, 4])[:2] == (3, "b")
    assert cache.lookup([1, 2])[:2] == (2, "a")
    assert cache.lookup([1, 2, 4])[:2] == (2, "a")
    assert cache.lookup([9, 1, 2])[:2] == (0, None)
    cache.put((7, 7, 7), "d", np.zeros(1), nbytes=100)  # over the budget: (1, 5), least recently used, goes
    assert cache.lookup([1, 5, 1])[:2] == (0, None) and len(cache) == 3
    assert cache.bytes <= cache.max_bytes
    cache.put(tuple(range(50)), "too big", np.zeros(1), nbytes=10**6)
    assert len(cache) == 3


def test_bind_reports_a_port_in_use_in_one_line():
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(ServeError, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


def test_without_the_extra_the_error_names_the_install_command():
    require_serve_extra()  # installed here: no error
    code = ("import sys; sys.modules['starlette'] = None\n"
            "import metastate.serve as s\n"  # importable (the CLI lists `serve`) ...
            "try:\n    s.require_serve_extra()\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("ExtraUnavailable") and "pip install -e '.[serve]'" in out.stdout
    assert len(out.stdout.strip().splitlines()) == 1


def test_a_client_gone_before_a_whole_answer_frees_its_slot(model):
    service = Service(*model, max_batch=1)
    with running(service) as address:
        conn = http.client.HTTPConnection(*address, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "ROMEO.\n", "max_tokens": 100000}))
        deadline = time.monotonic() + 30
        while not service.scheduler.running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        conn.close()  # before any answer: the server notices within its poll interval
        while service.scheduler.running or service.scheduler.jobs:
            assert time.monotonic() < deadline, "the abandoned request still holds its slot"
            time.sleep(0.05)
        r = client(address).completions.create(model="default", prompt="KING.\n", max_tokens=3)
        assert r.usage.completion_tokens == 3


SERVE = ("import argparse, sys\nfrom metastate.serve import add_parsers\n"
         "parser = argparse.ArgumentParser()\nadd_parsers(parser.add_subparsers())\n"
         "args = parser.parse_args(sys.argv[1:])\nsys.exit(args.func(args))")


def test_the_serve_command_starts_answers_and_stops_on_ctrl_c(tmp_path):
    import re
    import signal

    (tmp_path / "key.txt").write_text("k\n")  # the key from a file: not in the process's arguments
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--backend", "numpy", "--threads", "1",
                             "--port", "0", "--api-key-file", str(tmp_path / "key.txt")],
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("serving" in line for line in lines):
            line = proc.stderr.readline()
            assert line, f"the server exited: {''.join(lines)}"
            lines.append(line)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", lines[-1]).group(1))
        status, reply = post(("127.0.0.1", port), "/v1/models", None, {"Authorization": "Bearer k"}, method="GET")
        assert status == 200 and reply["data"][0]["id"] == "default"
        assert post(("127.0.0.1", port), "/v1/models", None, {"Authorization": "Bearer kk"}, method="GET")[0] == 401
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_the_serve_command_checks_its_options():
    bad = [["--port", "70000"], ["--max-batch", "0"], ["--cache-mb", "-1"], ["--max-queue", "x"],
           ["--api-key", "k", "--api-key-file", "key.txt"]]
    for args in bad:
        out = subprocess.run([sys.executable, "-c", SERVE, "serve", *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr and "error:" in out.stderr, args


def test_a_failure_in_the_model_is_a_500_and_the_server_goes_on(capfd):
    engine, tok = fresh_engine()
    step_batch, calls = engine.step_batch, []

    def fails_once(tokens, state):
        calls.append(len(tokens))
        if len(calls) == 2:
            raise RuntimeError("a broken kernel")
        return step_batch(tokens, state)

    engine.step_batch = fails_once
    with running(Service(engine, tok)) as address:
        status, reply = post(address, "/v1/completions", {"prompt": "ROMEO.\n", "max_tokens": 5})
        assert status == 500 and reply["error"]["type"] == "server_error"
        assert "Traceback" not in reply["error"]["message"]
        r = client(address).completions.create(model="default", prompt="ROMEO.\n", max_tokens=5, temperature=0)
        assert r.choices[0].text == generate(engine, tok, "ROMEO.\n", 5, temperature=0.0)
    assert "a broken kernel" in capfd.readouterr().err  # the server's log has the traceback


def test_streamed_chat_logprobs_cover_the_answer(server):
    address, _ = server
    stream = client(address).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Who goes there?"}], max_tokens=6, temperature=0,
        stream=True, logprobs=True, top_logprobs=2)
    text, entries, reason = "", [], None
    for chunk in stream:
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        entries += choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
        reason = choice.finish_reason or reason
    assert reason == "length" and len(entries) == 6
    assert "".join(e.token for e in entries) == text and bytes(sum((e.bytes for e in entries), [])) == text.encode()
    for e in entries:  # greedy: each token is the most likely, and the logprobs are a distribution's
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == e.logprob >= e.top_logprobs[1].logprob and e.logprob <= 0


def test_without_a_queue_only_free_places_are_taken(model):
    service = Service(*model, max_batch=2, max_queue=0)
    with running(service) as address:
        streams = []
        for prompt in ("ROMEO.\n", "JULIET.\n"):  # two places: both run
            conn = http.client.HTTPConnection(*address, timeout=60)
            conn.request("POST", "/v1/completions", body=json.dumps({"prompt": prompt, "max_tokens": 100000,
                                                                     "stream": True}))
            reply = conn.getresponse()
            assert reply.status == 200 and reply.readline().startswith(b"data: ")
            streams.append(conn)
        status, reply = post(address, "/v1/completions", {"prompt": "KING.\n", "max_tokens": 2})
        assert status == 429
        for conn in streams:
            conn.close()
        deadline = time.monotonic() + 30
        while service.scheduler.running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert post(address, "/v1/completions", {"prompt": "KING.\n", "max_tokens": 2})[0] == 200


def test_a_long_prompt_is_read_in_pieces_between_decode_steps():
    engine, tok = fresh_engine()
    calls = []  # ("prefill", tokens) and ("step", batch size), in order
    prefill, step_batch = engine.prefill, engine.step_batch
    engine.prefill = lambda ids, state=None, *a: calls.append(("prefill", len(ids))) or prefill(ids, state, *a)
    engine.step_batch = lambda tokens, state: calls.append(("step", len(tokens))) or step_batch(tokens, state)
    long = "ROMEO.\n" + "What light through yonder window breaks? " * 150
    n = len(tok.encode(long))
    assert n > 2 * PREFILL_STEP
    service = Service(engine, tok, max_prompt_tokens=4 * n)
    with running(service) as address:
        conn = http.client.HTTPConnection(*address, timeout=60)  # a stream that keeps decoding
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "KING.\n", "max_tokens": 100000,
                                                                 "stream": True}))
        assert conn.getresponse().readline().startswith(b"data: ")
        r = client(address).completions.create(model="default", prompt=long, max_tokens=8, temperature=0)
        conn.close()
    pieces = [i for i, (kind, size) in enumerate(calls) if kind == "prefill" and size > 10]
    assert [calls[i][1] for i in pieces] == [min(PREFILL_STEP, n - k) for k in range(0, n, PREFILL_STEP)]
    assert all(("step", 1) in calls[a:b] for a, b in zip(pieces, pieces[1:]))  # the stream went on between them
    engine.prefill = prefill
    assert r.choices[0].text == generate(engine, tok, long, 8, temperature=0.0)


def test_an_api_key_file_is_one_line_of_a_regular_file(tmp_path):
    import os

    from metastate.serve import read_api_key
    from metastate_core.errors import MetaStateError

    (tmp_path / "key").write_text("  s3cret  \nsecond line\n")
    assert read_api_key(str(tmp_path / "key")) == "s3cret"
    (tmp_path / "notepad").write_bytes(b"\xef\xbb\xbfs3cret\r\n")  # a BOM and CRLF
    assert read_api_key(str(tmp_path / "notepad")) == "s3cret"
    (tmp_path / "empty").write_text("\n\n")
    (tmp_path / "long").write_text("k" * 5000)
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    os.mkfifo(tmp_path / "fifo")  # refused at once, no waiting for a writer
    for name, says in [("empty", "no key"), ("long", "over 4 KiB"), ("binary", "not UTF-8"), ("fifo", "FIFO"),
                       ("missing", "does not exist"), (".", "directory")]:
        with pytest.raises(MetaStateError, match=says):
            read_api_key(str(tmp_path / name))
    # an empty name (an unset $VARIABLE) is an error, never a server without a key
    out = subprocess.run([sys.executable, "-c", SERVE, "serve", "--port", "0", "--api-key-file", ""],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "serving" not in out.stderr, out.stderr


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    """413 by the declared length, and while a chunked body (no declared length) arrives; the
    limit is 1 MiB + 64 bytes a prompt token (MAX_PROMPT here)."""
    address, service = server
    limit = 2**20 + 64 * MAX_PROMPT
    assert service.max_body_bytes == limit
    big = json.dumps({"prompt": "a", "user": "x" * limit}).encode()
    status, reply = post(address, "/v1/completions", big)
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    # a declared length over the limit is refused at once, without waiting for a body never sent
    conn = http.client.HTTPConnection(*address, timeout=20)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Length", str(10**12))
        conn.endheaders(b"{")
        reply = conn.getresponse()
        assert reply.status == 413 and json.loads(reply.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()

    def chunked(n_chunks):  # http.client sends an iterable body with Transfer-Encoding: chunked
        yield b'{"prompt": "a", "user": "'
        for _ in range(n_chunks):
            yield b"x" * 65536
        yield b'"}'

    conn = http.client.HTTPConnection(*address, timeout=120)
    try:
        conn.request("POST", "/v1/completions", body=chunked(limit // 65536 + 2), encode_chunked=True,
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 413 and json.loads(reply.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()
    status, reply = post(address, "/v1/completions", {"prompt": "a", "max_tokens": 2, "user": "x" * (limit // 2)})
    assert status == 200 and reply["usage"]["completion_tokens"] == 2  # under it: answered


def test_logit_bias_forces_and_bans_tokens(server, model):
    """OpenAI's logit_bias, added to the logits before sampling: +100 makes one token every
    token of an answer; -100 on the unbiased greedy first token gives the runner-up of the
    model's own logits (from `Engine.logits`) instead."""
    address, _ = server
    engine, tok = model
    c, prompt = client(address), "ROMEO.\n"
    ids = tok.encode(prompt)

    def continuation(new):  # the text of token ids `new` after the prompt
        return tok.decode(ids + list(new))[len(tok.decode(ids)):]

    forced = tok.encode(" the")[-1]
    r = c.completions.create(model="default", prompt=prompt, max_tokens=6, temperature=0.7, seed=3,
                             logit_bias={str(forced): 100})
    assert r.choices[0].text == continuation([forced] * 6) and r.choices[0].text.split() == ["the"] * 6
    order = np.argsort(-engine.logits(ids)[-1].astype(np.float64))
    r = c.completions.create(model="default", prompt=prompt, max_tokens=1, temperature=0,
                             logit_bias={str(order[0]): -100})
    assert r.choices[0].text == continuation([order[1]]) != continuation([order[0]])
    r = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hail!"}], max_tokens=4,
                                  temperature=0, logit_bias={str(forced): 100})
    assert r.choices[0].message.content.split() == ["the"] * 4
