"""The `metastate` command end to end on a tiny model (d_model 32, vocab 50).

Logits are judged against `metastate_core.reference.forward` in float64 called directly on the
tensors the test wrote, at the tolerances of SPEC section 6.
"""

import importlib.util
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from metastate.cli import main
from metastate_core.config import ModelConfig
from metastate_core.params import param_shapes, random_params
from metastate_core.reference import forward
from weights import load_model, save_model

TOKENS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
CONSOLE_SCRIPT = Path(sys.executable).with_name("metastate")
REPO = Path(__file__).resolve().parents[1]


from metastate_core.reference import rel_rms  # noqa: E402  (SPEC section 6)


def tiny_config(**kw):
    return ModelConfig(**{"vocab_size": 50, "d_model": 32, "n_layer": 2, "head_size": 16,
                          "n_param_tokens": 64, "sse_heads": 1, **kw})


def reference_logits(tensors, cfg, tokens=TOKENS):
    logits, _ = forward(tensors, cfg, np.array(tokens)[None], dtype=np.float64)
    return logits[0]


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc, err, *fragments):
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A non-trivial random model (every path active, SSE gates non-zero), float32 on disk."""
    cfg = tiny_config()
    tensors = random_params(cfg, 0, np.float32)
    path = tmp_path_factory.mktemp("cli") / "model"
    save_model(path, cfg, tensors)
    return path, cfg, tensors


def logits_of(model_dir, tmp_path, capsys, *extra, tokens=TOKENS):
    out = tmp_path / f"logits-{len(list(tmp_path.iterdir()))}.npy"
    rc, _, err = run(["logits", "--model", model_dir, "--tokens", ",".join(map(str, tokens)),
                      "--out", out, *extra], capsys)
    assert rc == 0, err
    return np.load(out)


# -- happy paths ----------------------------------------------------------------------------
def test_init_then_inspect(tmp_path, capsys):
    out = tmp_path / "fresh"
    rc, _, err = run(["init", "--out", out, "--vocab-size", 50, "--d-model", 32, "--n-layer", 3,
                      "--head-size", 16, "--n-param-tokens", 48, "--seed", 7], capsys)
    assert rc == 0, err
    cfg, tensors = load_model(out)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.head_size, cfg.n_param_tokens) == (50, 32, 3, 16, 48)
    shapes = param_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    assert all(t.dtype == np.float32 for t in tensors.values())
    # RWKV-7 init: output projections zero, so every fresh block is the identity
    assert not tensors["blocks.1.att.output.weight"].any() and not tensors["blocks.2.meta.param_values"].any()

    rc, text, err = run(["inspect", out, "--json"], capsys)
    assert rc == 0, err
    info = json.loads(text)
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert info["parameters"]["total"] == total
    assert sum(info["parameters"]["groups"].values()) == total
    assert info["parameters"]["groups"]["embedding"] == 50 * 32
    assert info["parameters"]["groups"]["param_tokens"] == 3 * 2 * 48 * 32
    # float32, batch 1: att_x [32] + meta_x [32] + S [2 heads, 16, 16] = 576 floats
    assert info["state_bytes"]["per_layer"] == 4 * 576
    assert info["state_bytes"]["total"] == 3 * 4 * 576
    assert info["dtypes"] == {"float32": len(shapes)}
    assert info["tokenizer"] is None and info["growth"] == []
    assert info["param_tokens"] == {"mode": "dense", "per_layer": 48, "active_per_token": 48,
                                    "value_bytes": {"per_layer": 48 * 32 * 4, "total": 3 * 48 * 32 * 4}}

    rc, text, err = run(["inspect", out], capsys)
    assert rc == 0, err
    assert f"{total:,}" in text and "2,304 bytes per layer" in text and "none (token ids only)" in text


def test_logits_match_reference(model, tmp_path, capsys):
    path, cfg, tensors = model
    expected = reference_logits(tensors, cfg)
    logits = logits_of(path, tmp_path, capsys)
    assert logits.dtype == np.float32 and logits.shape == (len(TOKENS), cfg.vocab_size)
    assert rel_rms(logits, expected) <= 1e-6      # float64 compute, float32 rounding only
    logits32 = logits_of(path, tmp_path, capsys, "--dtype", "float32", "--kernels", "ops")
    assert rel_rms(logits32, expected) <= 1e-5


def test_logits_written_exactly_where_asked(model, tmp_path, capsys):
    path, cfg, _ = model
    rc, out, err = run(["logits", "--model", path, "--tokens", "1,2", "--out", tmp_path / "result"], capsys)
    assert rc == 0, err
    assert f"to {tmp_path / 'result'}\n" in out and [p.name for p in tmp_path.iterdir()] == ["result"]  # no .npy added
    assert np.load(tmp_path / "result").shape == (2, cfg.vocab_size)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_other_backends_match_reference(model, tmp_path, capsys, backend):
    """Through the CLI seam, float32: SPEC section 6 kernel-path tolerance (1e-4)."""
    path, cfg, tensors = model
    out = tmp_path / "x.npy"
    rc, _, err = run(["logits", "--model", path, "--tokens", ",".join(map(str, TOKENS)), "--backend", backend,
                      "--dtype", "float32", "--out", out], capsys)
    if rc == 2 and ("not available yet" in err or "install with" in err):
        pytest.skip(err.strip())
    assert rc == 0, err
    logits = np.load(out)
    assert logits.shape == (len(TOKENS), cfg.vocab_size)
    assert rel_rms(logits, reference_logits(tensors, cfg)) <= 1e-4


def test_grow_keeps_logits(model, tmp_path, capsys):
    path, cfg, tensors = model
    grown = tmp_path / "grown"
    rc, _, err = run(["grow", path, "--out", grown, "--param-tokens", 80, "--heads", 3, "--layers", 3,
                      "--sse-heads", 2, "--layer-position", "after0", "--seed", 1], capsys)
    assert rc == 0, err
    gcfg, gtensors = load_model(grown)
    assert (gcfg.n_param_tokens, gcfg.d_att, gcfg.n_layer, gcfg.sse_heads) == (80, 48, 3, 2)
    assert len(gcfg.growth) >= 4
    assert all(t.dtype == np.float32 for t in gtensors.values())   # on-disk dtype kept
    assert rel_rms(logits_of(grown, tmp_path, capsys), reference_logits(tensors, cfg)) <= 1e-6

    rc, _, err = run(["grow", path, "--out", tmp_path / "nothing"], capsys)
    assert_one_error(rc, err, "nothing to grow")
    rc, _, err = run(["grow", path, "--out", tmp_path / "seed", "--heads", 3, "--seed", -1], capsys)
    assert rc == 2 and "--seed: expected an integer in [0, 2^32), got '-1'" in err and "Traceback" not in err


def test_out_of_memory_is_one_line(model, tmp_path, capsys, monkeypatch):
    import metastate_core.growth

    def exhausted(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(metastate_core.growth, "init_layer", exhausted)
    rc, _, err = run(["grow", model[0], "--out", tmp_path / "huge", "--heads", 10**4], capsys)
    assert_one_error(rc, err, "out of memory")
    assert not (tmp_path / "huge").exists()


def test_convert_bfloat16(model, tmp_path, capsys):
    path, cfg, tensors = model
    bf = tmp_path / "bf16"
    rc, _, err = run(["convert", path, "--out", bf, "--dtype", "bfloat16"], capsys)
    assert rc == 0, err
    rc, text, err = run(["inspect", bf, "--json"], capsys)
    assert json.loads(text)["dtypes"] == {"bfloat16": len(tensors)}
    err_bf = rel_rms(logits_of(bf, tmp_path, capsys, "--dtype", "float32"), reference_logits(tensors, cfg))
    assert 1e-5 < err_bf <= 3e-2    # really rounded, and still within the bfloat16 tolerance

    rc, _, err = run(["convert", path, "--out", bf, "--dtype", "bfloat16"], capsys)
    assert_one_error(rc, err, "already exists")
    rc, _, err = run(["convert", path, "--out", bf, "--dtype", "float32", "--force"], capsys)
    assert rc == 0, err


def test_convert_and_grow_from_a_lone_safetensors_file(tmp_path, capsys):
    """The file's config names a tokenizer: taken from beside the file, else dropped with a note
    (an output naming a tokenizer it does not hold could not be loaded)."""
    src = REPO / "weights" / "default"
    beside = tmp_path / "beside"
    beside.mkdir()
    for name in ("model.safetensors", "tokenizer.model"):
        shutil.copy(src / name, beside / name)
    rc, _, err = run(["convert", beside / "model.safetensors", "--out", tmp_path / "conv"], capsys)
    assert rc == 0, err
    assert (tmp_path / "conv" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    (beside / "tokenizer.model").unlink()
    for cmd, extra in (("convert", []), ("grow", ["--param-tokens", "600"])):
        rc, _, err = run([cmd, beside / "model.safetensors", "--out", tmp_path / f"{cmd}-alone", *extra], capsys)
        assert rc == 0 and "the output has no tokenizer" in err, err
        assert load_model(tmp_path / f"{cmd}-alone")[0].tokenizer is None
        rc, _, err = run(["logits", "--model", tmp_path / f"{cmd}-alone", "--tokens", "1,2", "--out",
                          tmp_path / f"{cmd}.npy"], capsys)
        assert rc == 0, err


def _world_vocab(path: Path) -> None:
    """A World vocab of single bytes, 'a'..'j' first: id of 'a' is 1, of 'c' is 3."""
    first = b"abcdefghij"
    order = list(first) + [b for b in range(256) if b not in first]
    with open(path, "w", encoding="utf-8") as f:
        for i, b in enumerate(order, 1):
            f.write(f"{i} {bytes([b])!r} 1\n")


def test_convert_pth_round_trip_with_tokenizer(tmp_path, capsys):
    pytest.importorskip("torch", reason="the .pth export and import need torch: pip install -e '.[torch]'")
    cfg = tiny_config(vocab_size=257)  # the vocab below has ids 1..256
    tensors = random_params(cfg, 1, np.float32, sse=False)   # exact RWKV-7: expressible as .pth
    src = tmp_path / "rwkv7"
    save_model(src, cfg, tensors)
    pth = tmp_path / "official" / "model.pth"
    pth.parent.mkdir()
    rc, _, err = run(["convert", src, "--out", pth], capsys)
    assert rc == 0, err
    _world_vocab(pth.parent / "rwkv_vocab_v20230424.txt")

    back = tmp_path / "back"
    rc, _, err = run(["convert", pth, "--out", back], capsys)
    assert rc == 0, err
    bcfg, _ = load_model(back)
    assert bcfg.tokenizer == {"type": "rwkv_world", "file": "rwkv_vocab_v20230424.txt"}
    assert (back / "rwkv_vocab_v20230424.txt").is_file()
    expected = reference_logits(tensors, cfg)
    assert rel_rms(logits_of(back, tmp_path, capsys), expected) <= 1e-6

    # --text goes through the bundled tokenizer: "cab" -> ids 3, 1, 2
    out = tmp_path / "text.npy"
    rc, _, err = run(["logits", "--model", back, "--text", "cab", "--out", out], capsys)
    assert rc == 0, err
    assert rel_rms(np.load(out), reference_logits(tensors, cfg, [3, 1, 2])) <= 1e-6

    rc, text, err = run(["convert", back, "--to-pth", tmp_path / "again.pth"], capsys)
    assert rc == 0 and (tmp_path / "again.pth").is_file(), err
    # an imported model has the runtime's GroupNorm epsilon at any head size (16 here): no note
    assert "GroupNorm epsilon" not in text and "note: ln_x_eps" not in text
    rc, _, err = run(["logits", "--model", back, "--text", "caf\udce9", "--out", out], capsys)
    assert_one_error(rc, err, "the text is not valid UTF-8 (byte 0xe9 at character 3)")

    # re-saving a model directory carries its tokenizer along
    copy = tmp_path / "copy"
    rc, _, err = run(["convert", back, "--out", copy, "--dtype", "float16"], capsys)
    assert rc == 0, err
    assert (copy / "rwkv_vocab_v20230424.txt").read_bytes() == (back / "rwkv_vocab_v20230424.txt").read_bytes()


# -- product-key models (SPEC section 7) ----------------------------------------------------------
PRODUCT = ["--param-mode", "product", "--n-sub-keys", 6, "--param-heads", 3, "--param-topk", 5]


def test_init_and_inspect_product_model(tmp_path, capsys):
    out = tmp_path / "pk"
    rc, _, err = run(["init", "--out", out, "--vocab-size", 50, "--d-model", 32, "--n-layer", 2, "--head-size", 16,
                      *PRODUCT, "--dtype", "bfloat16"], capsys)
    assert rc == 0, err
    cfg, tensors = load_model(out)
    assert (cfg.param_mode, cfg.n_sub_keys, cfg.param_heads, cfg.param_topk, cfg.n_param_tokens) == (
        "product", 6, 3, 5, 36)
    assert tensors["blocks.1.meta.sub_keys"].shape == (3, 2, 6, 16) and "blocks.1.meta.param_keys" not in tensors
    rc, text, err = run(["inspect", out, "--json"], capsys)
    assert rc == 0, err
    info = json.loads(text)
    assert info["param_tokens"] == {"mode": "product", "per_layer": 36, "active_per_token": 15,
                                    "value_bytes": {"per_layer": 36 * 32 * 2, "total": 2 * 36 * 32 * 2}}
    assert info["parameters"]["groups"]["param_tokens"] == 2 * (3 * 2 * 6 * 16 + 36 * 32)
    assert (info["config"]["n_sub_keys"], info["config"]["param_heads"], info["config"]["param_topk"]) == (6, 3, 5)
    rc, text, err = run(["inspect", out], capsys)
    assert rc == 0, err
    assert "36 parameter tokens per layer (product keys 6^2, 3 heads x top-5), 15 active per token" in text
    assert "values     2,304 bytes per layer, 4,608 in total" in text


@pytest.mark.parametrize("flags, fragments", [
    (["--n-sub-keys", 6], ["--param-mode product goes with all of"]),
    (["--param-mode", "product", "--n-sub-keys", 6, "--param-heads", 2], ["--param-topk"]),
    (["--param-mode", "product", "--n-sub-keys", 6, "--param-heads", 0, "--param-topk", 3], ["param_heads"]),
    (["--param-mode", "product", "--n-sub-keys", 0, "--param-heads", 1, "--param-topk", 1], ["n_sub_keys"]),
    (["--param-mode", "product", "--n-sub-keys", 6, "--param-heads", 1, "--param-topk", 37], ["param_topk 37 exceeds"]),
    ([*PRODUCT, "--n-param-tokens", 40], ["n_param_tokens = n_sub_keys^2 = 36, got 40"]),
    ([*PRODUCT, "--d-model", 33, "--head-size", 11], ["d_model must be even, got 33"]),
    (["--param-mode", "sparse"], ["--param-mode", "sparse"]),
])
def test_init_product_errors(tmp_path, capsys, flags, fragments):
    rc, _, err = run(["init", "--out", tmp_path / "x", "--vocab-size", 50, *flags], capsys)
    assert_one_error(rc, err, *fragments)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def product_model(tmp_path_factory):
    cfg = tiny_config(n_param_tokens=None, param_mode="product", n_sub_keys=5, param_heads=2, param_topk=7)
    tensors = random_params(cfg, 3, np.float32)
    path = tmp_path_factory.mktemp("cli") / "product"
    save_model(path, cfg, tensors)
    return path, cfg, tensors


def test_logits_and_grow_product_model(product_model, model, tmp_path, capsys):
    path, cfg, tensors = product_model
    expected = reference_logits(tensors, cfg)
    assert rel_rms(logits_of(path, tmp_path, capsys), expected) <= 1e-6
    assert rel_rms(logits_of(path, tmp_path, capsys, "--dtype", "float32"), expected) <= 1e-5
    # heads, layers, SSE heads: exact (SPEC section 5)
    rc, _, err = run(["grow", path, "--out", tmp_path / "exact", "--heads", 3, "--layers", 3, "--sse-heads", 2], capsys)
    assert rc == 0, err
    assert rel_rms(logits_of(tmp_path / "exact", tmp_path, capsys), expected) <= 1e-6
    # sub-keys: a warm start, its measured change printed and recorded
    rc, out, err = run(["grow", path, "--out", tmp_path / "warm", "--sub-keys", 8, "--seed", 2], capsys)
    assert rc == 0, err
    gcfg, gtensors = load_model(tmp_path / "warm")
    assert (gcfg.n_sub_keys, gcfg.n_param_tokens) == (8, 64)
    record = gcfg.growth[-1]
    assert record["rule"] == "sub_keys" and (record["from"], record["to"]) == (5, 8)
    sample = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 64))   # the sample the note names
    change = rel_rms(forward(gtensors, gcfg, sample)[0], forward(tensors, cfg, sample)[0])
    assert change > 1e-4 and record["logits_rel_rms"] == pytest.approx(change, rel=1e-3)
    assert f"rel_rms {record['logits_rel_rms']:.3g} on 4 x 64 token ids drawn uniformly with seed 0" in out
    assert record["sample"] in out
    rc, _, err = run(["grow", path, "--out", tmp_path / "bad", "--param-tokens", 36], capsys)
    assert_one_error(rc, err, "--sub-keys")
    rc, _, err = run(["grow", model[0], "--out", tmp_path / "bad", "--sub-keys", 9], capsys)
    assert_one_error(rc, err, "product mode only", "--param-tokens")
    assert not (tmp_path / "bad").exists()


def test_convert_refuses_product_models_where_the_format_cannot_hold_them(product_model, tmp_path, capsys):
    path, cfg, tensors = product_model
    for argv in (["--out", tmp_path / "m.pth"], ["--to-pth", tmp_path / "m.pth"]):
        rc, _, err = run(["convert", path, *argv], capsys)
        assert_one_error(rc, err, "official RWKV-7 format", "product")
    rc, _, err = run(["convert", path, "--out", tmp_path / "q", "--quantize", "8"], capsys)
    assert rc == 0, err  # MLX quantizes the value table of a product model (sub_keys stay float)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["bits"] == 8
    rc, _, err = run(["convert", path, "--out", tmp_path / "bf", "--dtype", "bfloat16"], capsys)
    assert rc == 0, err
    bf = load_model(tmp_path / "bf")[1]
    assert all(np.array_equal(bf[k], t.astype(ml_dtypes.bfloat16)) for k, t in tensors.items())
    assert not (tmp_path / "m.pth").exists()


# -- errors ---------------------------------------------------------------------------------
@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="console script not installed beside the interpreter")
def test_console_script_errors(model, tmp_path):
    path, _, _ = model
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "config.json").write_text("{not json")
    cases = [(["inspect", tmp_path / "missing"], "missing"),
             (["logits", "--model", broken, "--tokens", "1,2", "--out", tmp_path / "x.npy"], "config.json")]
    for argv, fragment in cases:
        proc = subprocess.run([str(CONSOLE_SCRIPT), *map(str, argv)], capture_output=True, text=True, timeout=60)
        assert_one_error(proc.returncode, proc.stderr, fragment)


@pytest.mark.parametrize("argv, fragments, code", [
    (["--tokens", "1,x"], ["--tokens"], 1),
    (["--tokens", "1,50"], ["50", "out of range"], 1),
    (["--tokens", "-1"], ["-1"], 1),
    (["--tokens", "1", "--backend", "cuda"], ["--backend", "cuda"], 2),
    (["--tokens", "1", "--kernels", "triton"], ["triton", "numpy"], 1),
    (["--text", "hello"], ["no tokenizer"], 1),
])
def test_logits_errors(model, tmp_path, capsys, argv, fragments, code):
    path, _, _ = model
    rc, _, err = run(["logits", "--model", path, "--out", tmp_path / "x.npy", *argv], capsys)
    assert_one_error(rc, err, *fragments)
    assert rc == code
    assert not (tmp_path / "x.npy").exists()


def test_convert_errors(model, tmp_path, capsys):
    path, _, _ = model
    rc, _, err = run(["convert", path, "--out", tmp_path / "a", "--to-pth", tmp_path / "b.pth"], capsys)
    assert_one_error(rc, err, "exactly one of --out, --to-pth and --to-hf")
    vocab = tmp_path / "vocab.json"
    vocab.write_text("{}")
    rc, _, err = run(["convert", path, "--out", tmp_path / "c", "--tokenizer", vocab], capsys)
    assert_one_error(rc, err, "unknown tokenizer file")
    rc, _, err = run(["convert", path, "--out", path], capsys)
    assert_one_error(rc, err, "must differ")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_missing_model_in_process(tmp_path, capsys):
    rc, _, err = run(["logits", "--model", tmp_path / "nope", "--tokens", "1", "--out", tmp_path / "x.npy"], capsys)
    assert_one_error(rc, err, "nope")


# -- backends load lazily --------------------------------------------------------------------
def test_missing_backend_extra_is_named(model, monkeypatch, capsys, tmp_path):
    path, _, _ = model
    monkeypatch.setitem(sys.modules, "backends.mlx", None)  # import fails, as without the extra
    rc, _, err = run(["logits", "--model", path, "--tokens", "1,2", "--backend", "mlx", "--out", tmp_path / "x.npy"], capsys)
    assert_one_error(rc, err, "pip install -e '.[mlx]'")
    assert rc == 2 and not (tmp_path / "x.npy").exists()
    rc, _, err = run(["convert", path, "--out", tmp_path / "q", "--quantize", "8"], capsys)
    assert_one_error(rc, err, "--quantize needs the mlx backend", "pip install -e '.[mlx]'")
    assert rc == 2


NO_TORCH = "import sys; sys.modules['torch'] = None; from metastate.cli import main; sys.exit(main(sys.argv[1:]))"


def test_the_command_runs_without_torch(model, tmp_path):
    """A Mac installs only the mlx extra: every command that does not need torch must run, and
    the ones that do must say so in one line (exit 2), not crash while building the parser."""
    path, _, _ = model

    def metastate(*argv):  # import torch fails in this process, as without the extra
        return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, argv)], capture_output=True, text=True,
                              cwd=REPO, timeout=120)

    assert metastate("inspect", path).returncode == 0
    done = metastate("logits", "--model", path, "--tokens", "1,2", "--backend", "numpy", "--out", tmp_path / "x.npy")
    assert done.returncode == 0, done.stderr
    for argv in (["train", "--data", "d", "--out", "o"], ["train", "--help"]):
        done = metastate(*argv)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip() == "error: the torch backend needs torch: pip install -e '.[torch]'"
    done = metastate("prepare-data", "--corpus", "shakespeare", "--out", tmp_path / "d")  # needs no torch
    assert "torch" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "needs the torch extra" in metastate("--help").stdout


def test_bench_reports_speeds(tmp_path, capsys):
    import json

    from metastate.cli import main

    assert main(["bench", "--size", "64,1,50", "--backend", "numpy", "--prompt-len", "8",
                 "--decode", "2", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0 and result["prompt_len"] == 8
    assert main(["bench", "--size", "64,1,50", "--train", "--batch", "1", "--seq-len", "8",
                 "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train_tok_s"] > 0 and result["kernels"] == "ops" and result["fused"] is None
    assert result["loss"] == "chunked" and result["autocast"] is False
    assert main(["bench", "--size", "64,1,50", "--train", "--batch", "1", "--seq-len", "8", "--plain-loss",
                 "--autocast", "--dtype", "float32", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train_tok_s"] > 0 and result["loss"] == "plain" and result["autocast"] is True
    assert result["dtype"] == "float32"
    if importlib.util.find_spec("triton") is not None:  # the Triton scan with the plain pieces
        assert main(["bench", "--size", "64,1,50", "--train", "--kernels", "triton", "--no-fused-elementwise",
                     "--batch", "1", "--seq-len", "8", "--repeats", "1", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["train_tok_s"] > 0 and result["kernels"] == "triton" and result["fused"] is False
    assert main(["bench", "--train", "--batch", "1", "--seq-len", "4", "--repeats", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_tok_s"] > 0  # no --model: the shipped one, as without --train
    assert main(["bench", "--size", "64,1", "--repeats", "1"]) == 1
    assert "--size expects D,L,V" in capsys.readouterr().err


def test_convert_quantize_for_mlx(model, tmp_path, capsys):
    pytest.importorskip("mlx.core", reason="the mlx extra is not installed")
    path, cfg, tensors = model
    q = tmp_path / "q8"
    rc, out, err = run(["convert", path, "--out", q, "--quantize", "8", "--group-size", "32"], capsys)
    assert rc == 0, err
    assert json.loads((q / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8}
    err_q = rel_rms(logits_of(q, tmp_path, capsys, "--backend", "mlx"), reference_logits(tensors, cfg))
    assert 1e-5 < err_q <= 5e-2     # really quantized, and close
    err_np = rel_rms(logits_of(q, tmp_path, capsys), reference_logits(tensors, cfg))  # numpy dequantizes at load
    assert abs(err_np - err_q) <= 1e-3 * err_q
    rc, _, err = run(["convert", path, "--out", tmp_path / "q.pth", "--quantize", "4"], capsys)
    assert_one_error(rc, err, "--quantize writes an MLX model directory")
    other = tmp_path / "hf"  # another project's model directory is never written over
    other.mkdir()
    (other / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_size": 32000}')
    rc, _, err = run(["convert", path, "--out", other, "--quantize", "4", "--force"], capsys)
    assert_one_error(rc, err, "refusing to replace", "not a metastate model directory")
    assert os.listdir(other) == ["config.json"] and "Llama" in (other / "config.json").read_text()


def test_prepare_data_says_when_a_split_is_shorter_than_the_default_sequence(tmp_path, capsys):
    """A small corpus leaves a held-out split too short for `train`'s default --seq-len: said at
    prepare time, with the longest length that works, instead of only when training refuses it."""
    pytest.importorskip("torch")
    pytest.importorskip("sentencepiece")
    words = ["river", "stone", "light", "quiet", "north", "ember", "field", "glass", "harbor", "meadow"]
    (tmp_path / "a.txt").write_text("\n".join(" ".join(words[(i * 7 + j) % 10] for j in range(12))
                                              for i in range(30)))
    rc, out, _ = run(["prepare-data", tmp_path / "a.txt", "--out", tmp_path / "d", "--vocab-size", "300",
                      "--val-fraction", "0.05"], capsys)
    assert rc == 0
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    n_val = sum(s["tokens"] for s in meta["splits"]["val"])
    assert n_val - 1 < 128  # the setup of the case
    assert f"the held-out split has {n_val:,} tokens" in out and f"--seq-len {n_val - 1} or less" in out
    rc, out, _ = run(["prepare-data", tmp_path / "a.txt", "--out", tmp_path / "d2", "--vocab-size", "300",
                      "--val-fraction", "0.5"], capsys)
    assert rc == 0 and "note:" not in out  # both halves long enough


# -- hostile inputs (issue 22) ---------------------------------------------------------------
from fuzz import harness  # noqa: E402  (metastate in a child under resource limits)

DEFAULT = REPO / "weights" / "default"


def test_logits_out_writes_through_special_files(model, tmp_path, capsys):
    """A FIFO or device (as root, /dev/null itself) is written to, never replaced by a file;
    a symlink keeps pointing where it did."""
    path = model[0]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    rc, _, err = run(["logits", "--model", path, "--tokens", "1,2", "--out", fifo], capsys)
    reader.join(30)
    assert rc == 0 and stat.S_ISFIFO(os.lstat(fifo).st_mode), err
    assert np.load(io.BytesIO(got[0])).shape == (2, 50)
    (tmp_path / "target.npy").write_bytes(b"old")
    (tmp_path / "link.npy").symlink_to("target.npy")
    rc, _, err = run(["logits", "--model", path, "--tokens", "1,2", "--out", tmp_path / "link.npy"], capsys)
    assert rc == 0 and (tmp_path / "link.npy").is_symlink() and np.load(tmp_path / "target.npy").shape == (2, 50)
    rc, _, err = run(["logits", "--model", path, "--tokens", "1,2", "--out", tmp_path], capsys)
    assert_one_error(rc, err, "is a directory")
    if os.geteuid() != 0:
        return
    dev = tmp_path / "nul"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    rc, _, err = run(["logits", "--model", path, "--tokens", "1", "--out", dev], capsys)
    assert rc == 0 and stat.S_ISCHR(os.lstat(dev).st_mode), err
    if importlib.util.find_spec("torch"):
        rwkv7 = tmp_path / "rwkv7"
        save_model(rwkv7, model[1], random_params(model[1], 1, np.float32, sse=False))
        rc, _, err = run(["convert", rwkv7, "--to-pth", dev, "--force"], capsys)
        assert rc == 0 and stat.S_ISCHR(os.lstat(dev).st_mode), err


def test_fifos_in_a_model_directory_do_not_hang(model, tmp_path):
    for name in ("config.json", "model.safetensors"):
        d = tmp_path / name
        shutil.copytree(model[0], d)
        os.unlink(d / name)
        os.mkfifo(d / name)
        for argv in (["inspect", d], ["logits", "--model", d, "--tokens", "1", "--out", tmp_path / "x.npy"]):
            result = harness.run(argv, timeout=60)
            assert not result.problems() and "is a FIFO, not a regular file" in result.stderr, result.describe()


@pytest.mark.parametrize("flag, value", [("--layers", 10**6), ("--heads", 10**6), ("--param-tokens", 10**8)])
def test_grow_refuses_a_model_this_machine_cannot_hold(model, tmp_path, flag, value):
    """Checked against the memory of the machine, or less under an address-space limit (the
    child's is 2 GiB): refused in one line before anything is built."""
    result = harness.run(["grow", model[0], "--out", tmp_path / "huge", flag, value], timeout=60)
    assert not result.problems() and "needs about" in result.stderr, result.describe()
    assert not (tmp_path / "huge").exists()
    result = harness.run(["init", "--out", tmp_path / "huge", "--vocab-size", 50, "--n-layer", 10**6], timeout=60)
    assert not result.problems() and "needs about" in result.stderr, result.describe()


def test_convert_copies_only_tokenizer_files_it_can_trust(model, tmp_path, capsys):
    path, cfg, tensors = model
    src = tmp_path / "src"
    save_model(src, cfg.replace(vocab_size=2048, tokenizer={"type": "sentencepiece", "file": "tokenizer.model"}),
               dict(tensors, **{name: np.zeros((2048, 32), np.float32) for name in ("emb.weight", "head.weight")}))
    secret = tmp_path / "secret"
    secret.write_bytes((DEFAULT / "tokenizer.model").read_bytes())
    (src / "tokenizer.model").symlink_to(secret)  # a valid tokenizer, but outside the model
    rc, _, err = run(["convert", src, "--out", tmp_path / "a"], capsys)
    assert_one_error(rc, err, "leads outside")
    os.unlink(src / "tokenizer.model")
    (src / "tokenizer.model").write_bytes(b"garbage")
    rc, _, err = run(["convert", src, "--out", tmp_path / "b"], capsys)
    assert_one_error(rc, err, "cannot load sentencepiece model")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, tokenizer={"type": "gpt2", "file": "tokenizer.model"})))
    rc, _, err = run(["convert", src, "--out", tmp_path / "c"], capsys)
    assert_one_error(rc, err, "unknown tokenizer type 'gpt2'")
    # --tokenizer: a regular file, whose ids fit the model (vocab 50 here, 2048 pieces there)
    rc, _, err = run(["convert", path, "--out", tmp_path / "d", "--tokenizer", DEFAULT / "tokenizer.model"], capsys)
    assert_one_error(rc, err, "token ids up to 2047", "vocab_size is 50")
    os.mkfifo(tmp_path / "fifo.model")
    rc, _, err = run(["convert", path, "--out", tmp_path / "e", "--tokenizer", tmp_path / "fifo.model"], capsys)
    assert_one_error(rc, err, "is a FIFO, not a regular file")
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_inspect_json_never_prints_nan(model, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(model[0], d)
    config = json.loads((d / "config.json").read_text())
    for bad in ("NaN", "Infinity", "1e999"):
        (d / "config.json").write_text(json.dumps(config)[:-1] + f', "train_ctx_len": {bad}}}')
        rc, out, err = run(["inspect", d, "--json"], capsys)
        assert_one_error(rc, err, "config.json")
        assert out == ""


def test_a_model_path_that_is_not_utf8(tmp_path):
    bad = os.path.join(os.fsencode(tmp_path), b"bad\xff")
    shutil.copytree(DEFAULT, os.fsdecode(bad))
    for argv in (["generate", "--model", bad, "--prompt", "To be", "--max-tokens", "3", "--backend", "numpy"],
                 ["logits", "--model", bad, "--text", "To be", "--out", os.path.join(bad, b"out\xfe.npy")]):
        result = harness.run(argv, env=harness.environment(tmp_path, PYTHONIOENCODING="utf-8:strict"))
        assert result.rc == 0 and "Traceback" not in result.stderr, result.describe()


def test_closed_stdin_and_stdout(tmp_path):
    for argv, close, fragment in (
            (["chat", "--backend", "numpy"], "stdin", "standard input is closed"),
            (["generate", "--prompt", "-", "--backend", "numpy"], "stdin", "standard input is closed"),
            (["generate", "--prompt", "To be", "--max-tokens", "3", "--backend", "numpy"], "stdout",
             "standard output is closed")):
        result = harness.run(argv, close=close, env=harness.environment(tmp_path))
        assert not result.problems() and fragment in result.stderr, result.describe()
