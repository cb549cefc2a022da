"""`metastate eval` and the lm-evaluation-harness adapter on the shipped model.

Expected values come from the logits of whole sequences (`metastate logits`, or
`compute_logits`, the function behind it: the NumPy reference in float64, in one pass from
the zero state), turned into log-probabilities here with NumPy, and from token ids encoded
here with sentencepiece itself. A document follows the end-of-text token (docs/eval.md), so
the sequences below start with it.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from metastate.api import compute_logits, default_model_path
from metastate.cli import main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
HELD_OUT = DATA / "held_out.txt"  # written for these tests: in no training text
MODEL = default_model_path()
FAST = ["--backend", "numpy", "--threads", "1"]  # no backend or thread measurement


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(MODEL / "tokenizer.model"))


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def log_softmax(logits):
    x = np.asarray(logits, np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def token_log_probs(seq):
    """log p(seq[t + 1] | seq[:t + 1]) for every t, from the reference's logits of seq."""
    lp = log_softmax(compute_logits(MODEL, seq))
    return lp[np.arange(len(seq) - 1), seq[1:]]


def eval_json(capsys, *argv):
    rc, out, err = run(["eval", *FAST, "--json", *argv], capsys)
    assert rc == 0, err
    return json.loads(out)


# -- metastate eval ---------------------------------------------------------------------------

def test_perplexity_equals_that_of_metastate_logits(sp, tmp_path, capsys):
    text = HELD_OUT.read_text(encoding="utf-8")
    ids = sp.encode(text)
    seq = [sp.eos_id(), *ids]
    rc, _, err = run(["logits", "--model", MODEL, "--tokens", ",".join(map(str, seq)), "--out",
                      tmp_path / "logits.npy"], capsys)
    assert rc == 0, err
    lp = log_softmax(np.load(tmp_path / "logits.npy"))[np.arange(len(ids)), ids]  # row t predicts seq[t + 1]
    loss = -lp.mean()

    got = eval_json(capsys, "--model", MODEL, "--dtype", "float64", HELD_OUT)["results"][0]["files"][0]
    assert got["tokens"] == len(ids)
    assert got["bytes"] == len(text.encode("utf-8")) > len(text)  # bytes, not characters (an em dash)
    assert got["loss"] == pytest.approx(loss, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(-lp.sum() / math.log(2) / len(text.encode("utf-8")), rel=1e-6)


def test_chunks_do_not_change_the_result(capsys):
    whole = eval_json(capsys, "--chunk", 100000, HELD_OUT)["results"][0]["total"]
    for chunk in (1, 7, 64):
        got = eval_json(capsys, "--chunk", chunk, HELD_OUT)["results"][0]["total"]
        assert got["tokens"] == whole["tokens"]
        assert got["loss"] == pytest.approx(whole["loss"], rel=1e-6), chunk


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_other_backends_agree(backend, capsys):
    pytest.importorskip(backend)
    want = eval_json(capsys, "--dtype", "float64", HELD_OUT)["results"][0]["total"]
    rc, out, err = run(["eval", "--backend", backend, "--threads", "1", "--chunk", 100, "--json", HELD_OUT], capsys)
    assert rc == 0, err
    got = json.loads(out)["results"][0]
    assert got["engine"].startswith(backend)
    assert got["total"]["tokens"] == want["tokens"]
    assert got["total"]["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_several_models_and_files(tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("Corvino.\nWhat news from Mantua?\n", encoding="utf-8")
    one = {f: eval_json(capsys, f)["results"][0]["files"][0] for f in (HELD_OUT, other)}
    both = eval_json(capsys, "--model", MODEL, "--model", MODEL, HELD_OUT, other)["results"]
    assert len(both) == 2 and both[0]["files"] == both[1]["files"]
    assert [f["loss"] for f in both[0]["files"]] == pytest.approx([one[f]["loss"] for f in (HELD_OUT, other)])
    nats = sum(f["loss"] * f["tokens"] for f in both[0]["files"])
    tokens = sum(f["tokens"] for f in both[0]["files"])
    assert both[0]["total"]["loss"] == pytest.approx(nats / tokens)
    assert both[0]["total"]["bits_per_byte"] == pytest.approx(
        nats / math.log(2) / sum(f["bytes"] for f in both[0]["files"]))

    rc, out, _ = run(["eval", *FAST, "--model", MODEL, "--model", MODEL, HELD_OUT, other], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].count(str(MODEL)) == 2  # one heading per model, side by side
    assert lines[1].split() == ["file", "bytes"] + ["tokens", "loss", "ppl", "bits/byte"] * 2
    assert [line.split()[0] for line in lines[2:]] == [str(HELD_OUT), str(other), "all"]
    assert f"{one[HELD_OUT]['loss']:.4f}" in lines[2]


def test_bad_inputs_give_one_error_line(tmp_path, capsys):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ROMEO.\n\x00\x01\x02")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Romeo, o\u00f9 es-tu?\n".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [([tmp_path / "missing.txt"], "does not exist"), ([binary], "binary"), ([latin1], "not UTF-8"),
             ([empty], "empty"), ([fifo], "FIFO"), ([tmp_path], "directory"), ([HELD_OUT, HELD_OUT], "twice"),
             (["--model", tmp_path / "no-model", HELD_OUT], "no-model")]
    for argv, fragment in cases:
        rc, out, err = run(["eval", *FAST, *argv], capsys)
        errors = [line for line in err.splitlines() if line.startswith("error")]
        assert rc == 1 and out == "" and "Traceback" not in err, (argv, err)
        assert len(errors) == 1 and fragment in errors[0], (argv, err)
        assert err.strip().splitlines()[-1] == errors[0]
    for chunk in ("0", "-3", "x"):
        rc, _, err = run(["eval", "--chunk", chunk, HELD_OUT], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


# -- the lm-eval adapter ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm():
    pytest.importorskip("lm_eval")
    from metastate.lm_eval_adapter import MetaStateLM

    return MetaStateLM(model=str(MODEL), backend="numpy", dtype="float64", threads=1)


def request(*args):
    from lm_eval.api.instance import Instance

    kind = {1: "loglikelihood_rolling", 2: "loglikelihood"}[len(args)] if not isinstance(args[-1], dict) \
        else "generate_until"
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_is_the_sum_of_log_probs_from_the_logits(lm, sp):
    eos = sp.eos_id()
    pairs = [("Corvino.\nGood morrow, cousin. Hath the post come in\nFrom", " Mantua, or doth the rain"),
             ("Speak softly; there are ears in every", " wall"),
             ("Speak softly; there are ears in every", " horse"),  # the same context again: its state reused
             ("Tell him the truth: that I have slept ", "but ill")]  # the space goes to the continuation
    got = lm.loglikelihood([request(c, x) for c, x in pairs])
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        context, continuation = context.rstrip(" "), context[len(context.rstrip(" ")):] + continuation
        ctx, whole = sp.encode(context), sp.encode(context + continuation)
        assert whole[:len(ctx)] == ctx  # these pairs split cleanly at a token boundary
        seq = [eos, *whole]
        lp = token_log_probs(seq)[len(ctx):]  # the continuation's tokens, each after all before it
        assert ll == pytest.approx(lp.sum(), rel=1e-9, abs=1e-9)
        argmax = log_softmax(compute_logits(MODEL, seq)).argmax(axis=1)[len(ctx):len(seq) - 1]
        assert greedy == bool((argmax == np.array(seq[len(ctx) + 1:])).all())
    assert got[2][0] != got[1][0]

    # a continuation that greedy decoding produces: three tokens, each the argmax after those before
    context = "O night, thou thief of"
    seq = [eos, *sp.encode(context)]
    for _ in range(3):
        seq.append(int(compute_logits(MODEL, seq)[-1].argmax()))
    continuation = sp.decode(seq[1:])[len(context):]
    assert sp.encode(context + continuation) == seq[1:]  # it reads back as the same tokens
    (ll, greedy), = lm.loglikelihood([request(context, continuation)])
    assert greedy and ll == pytest.approx(token_log_probs(seq)[-3:].sum(), rel=1e-9)

    # an empty context: the continuation is a document of its own, its first token predicted too
    (ll, _), = lm.loglikelihood([request("", "Good morrow, cousin.")])
    assert ll == pytest.approx(token_log_probs([eos, *sp.encode("Good morrow, cousin.")]).sum(), rel=1e-9)


def test_loglikelihood_rolling_is_the_documents_and_evals(lm, sp, capsys):
    text = HELD_OUT.read_text(encoding="utf-8")
    (ll,) = lm.loglikelihood_rolling([request(text)])
    assert ll == pytest.approx(token_log_probs([sp.eos_id(), *sp.encode(text)]).sum(), rel=1e-9)
    total = eval_json(capsys, "--dtype", "float64", HELD_OUT)["results"][0]["total"]
    assert -ll == pytest.approx(total["loss"] * total["tokens"], rel=1e-9)


def test_generate_until_is_greedy_decoding(lm, sp):
    context = "Corvino.\nGood morrow, cousin."
    seq = [sp.eos_id(), *sp.encode(context)]
    n = len(seq)
    for _ in range(12):  # greedy, one whole-sequence pass per token, to the end of the text
        seq.append(int(compute_logits(MODEL, seq)[-1].argmax()))
        if seq[-1] == sp.eos_id():
            seq.pop()
            break
    text = sp.decode(seq[1:])[len(sp.decode(seq[1:n])):]
    assert text

    got = lm.generate_until([request(context, {"until": [], "max_gen_toks": 12, "do_sample": False})])
    assert got == [text]
    stop = text.strip()[:3]  # stops before the first occurrence of a stop string
    got = lm.generate_until([request(context, {"until": [stop], "max_gen_toks": 12})])
    assert got == [text[:text.index(stop)]]
    from metastate_core.errors import MetaStateError

    with pytest.raises(MetaStateError, match="num_beams"):
        lm.generate_until([request(context, {"num_beams": 4})])


def test_lm_eval_task_runs_end_to_end(sp, tmp_path):
    """`metastate lm-eval` (lm-eval's own command line, metastate registered) on the local task
    tests/data/lm_eval_task.yaml, read from a JSONL file offline; its accuracy is the one the
    reference's logits give."""
    pytest.importorskip("lm_eval")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "metastate", "lm-eval", "--model", "metastate", "--model_args",
                           f"model={MODEL},backend=numpy,dtype=float64,threads=1", "--tasks",
                           "tests/data/lm_eval_task.yaml", "--output_path", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, = out.rglob("results_*.json")
    got = json.loads(results.read_text())["results"]["metastate_local_cloze"]

    docs = [json.loads(line) for line in (DATA / "lm_eval_task.jsonl").read_text().splitlines()]
    right = []
    for doc in docs:
        ctx, scores = sp.encode(doc["context"]), []
        for choice in doc["choices"]:  # lm-eval asks for " " + choice after the context
            whole = sp.encode(doc["context"] + " " + choice)
            assert whole[:len(ctx)] == ctx
            scores.append(token_log_probs([sp.eos_id(), *whole])[len(ctx):].sum())
        right.append(int(np.argmax(scores)) == doc["label"])
    assert got["sample_len"] == len(docs)
    assert got["acc,none"] == pytest.approx(np.mean(right))


def test_lm_eval_bad_model_gives_one_error_line(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    rc, _, err = run(["lm-eval", "--model", "metastate", "--model_args", f"model={tmp_path / 'none'}",
                      "--tasks", DATA / "lm_eval_task.yaml"], capsys)
    assert rc == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after lm-eval's own log lines
    assert last.startswith("error: ") and str(tmp_path / "none") in last, err

    from metastate.lm_eval_adapter import MetaStateLM
    from metastate_core.errors import MetaStateError

    with pytest.raises(MetaStateError, match="unknown model_args pretrained"):  # a MetaStateError: one line too
        MetaStateLM(model=str(MODEL), pretrained="gpt2")


def test_lm_eval_without_the_extra(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    rc, _, err = run(["lm-eval", "--model", "metastate"], capsys)
    assert rc == 2
    assert err.strip() == "error: metastate lm-eval needs lm_eval (lm-evaluation-harness): pip install -e '.[eval]'"
