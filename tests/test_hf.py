"""Hugging Face / fla RWKV-7 directories: `metastate convert DIR --to-hf OUT` and back (issue 20).

The names and shapes expected here are written out from fla's modules (`RWKV7ForCausalLM`:
`RWKV7Attention`, its LoRA's nn.Sequential, `RWKV7FeedForward`), not taken from weights/hf.py;
logits are judged by the float64 reference on the tensors the test wrote.
"""

import importlib.util
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from metastate.cli import main
from metastate_core.config import ModelConfig
from metastate_core.params import random_params
from metastate_core.reference import forward, rel_rms
from weights import load_model, save_model
from weights.safetensors_io import read_header, write_file

TOKENS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
VOCAB = "rwkv_vocab_v20230424.txt"


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc, err, *fragments, code=1):
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def world_vocab(path: Path) -> None:
    """A World vocabulary of the 256 single bytes (ids 1..256) and two longer tokens."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(256):
            f.write(f"{i + 1} {bytes([i])!r} 1\n")
        f.write("257 'ab' 2\n258 'abc' 3\n")


def exact_rwkv7(tmp_path, name="model", dtype=np.float32, tokenizer=True, **sizes):
    cfg = ModelConfig(**{"vocab_size": 300, "d_model": 64, "n_layer": 2, "head_size": 32, **sizes})
    tensors = random_params(cfg, 7, dtype, sse=False)
    extra = None
    if tokenizer:
        world_vocab(tmp_path / VOCAB)
        cfg = cfg.replace(tokenizer={"type": "rwkv_world", "file": VOCAB})
        extra = {VOCAB: tmp_path / VOCAB}
    save_model(tmp_path / name, cfg, tensors, extra_files=extra)
    return tmp_path / name, cfg, tensors


def fla_names(d: int, n_layer: int, lora: dict, H: int, N: int, n: int, V: int) -> dict:
    """fla's RWKV7ForCausalLM state dict, name -> shape (nn.Linear weights are [out, in])."""
    out = {"model.embeddings.weight": [V, d], "model.norm.weight": [d], "model.norm.bias": [d],
           "lm_head.weight": [V, d], "model.layers.0.pre_norm.weight": [d], "model.layers.0.pre_norm.bias": [d]}
    for i in range(n_layer):
        b = f"model.layers.{i}."
        for norm in ("attn_norm", "ffn_norm"):
            out.update({b + f"{norm}.weight": [d], b + f"{norm}.bias": [d]})
        out.update({b + f"attn.x_{c}": [1, 1, d] for c in "rwkvag"})
        out.update({b + "attn.k_k": [d], b + "attn.k_a": [d], b + "attn.r_k": [H, N]})
        out.update({b + f"attn.{c}_proj.weight": [d, d] for c in "rkvo"})
        for c in ("w", "a", "v", "g") if i else ("w", "a", "g"):
            out.update({b + f"attn.{c}_lora.lora.0.weight": [lora[c], d],
                        b + f"attn.{c}_lora.lora.2.weight": [d, lora[c]]})
            if c != "g":
                out[b + f"attn.{c}_lora.lora.2.bias"] = [d]
        out.update({b + "attn.g_norm.weight": [d], b + "attn.g_norm.bias": [d]})
        out.update({b + "ffn.x_k": [d], b + "ffn.key.weight": [n, d], b + "ffn.value.weight": [d, n]})
    return out


def test_export_writes_fla_names_config_and_tokenizer(tmp_path, capsys):
    src, cfg, tensors = exact_rwkv7(tmp_path)
    out = tmp_path / "hf"
    rc, text, err = run(["convert", src, "--to-hf", out], capsys)
    assert rc == 0, err
    assert "Hugging Face" in text
    entries, meta = read_header(out / "model.safetensors")
    assert meta["format"] == "pt"  # what transformers requires of a safetensors file
    lora = {"w": cfg.lora_w, "a": cfg.lora_a, "v": cfg.lora_v, "g": cfg.lora_g}
    expected = fla_names(64, 2, lora, 2, 32, cfg.n_param_tokens, 300)
    assert {k: e["shape"] for k, e in entries.items()} == expected
    hf = load_model_hf(out)
    assert np.array_equal(hf["model.layers.1.attn.w_lora.lora.0.weight"], tensors["blocks.1.att.w1"].T)
    assert np.array_equal(hf["model.layers.1.attn.v_lora.lora.2.bias"], tensors["blocks.1.att.v0"])
    assert np.array_equal(hf["model.layers.0.attn.x_g"][0, 0], tensors["blocks.0.att.x_g"])
    assert np.array_equal(hf["model.layers.1.ffn.value.weight"], tensors["blocks.1.meta.param_values"].T)
    assert np.array_equal(hf["model.layers.0.pre_norm.bias"], tensors["blocks.0.ln0.bias"])

    config = json.loads((out / "config.json").read_text())
    want = {"model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"], "vocab_size": 300, "hidden_size": 64,
            "num_hidden_layers": 2, "head_dim": 32, "intermediate_size": cfg.n_param_tokens,
            "decay_low_rank_dim": cfg.lora_w, "a_low_rank_dim": cfg.lora_a, "v_low_rank_dim": cfg.lora_v,
            "gate_low_rank_dim": cfg.lora_g, "norm_eps": 1e-5, "tie_word_embeddings": False}
    assert {k: config[k] for k in want} == want
    # the tokenizer: the vocab file for the way back, a tokenizer.json for AutoTokenizer
    assert (out / VOCAB).read_bytes() == (tmp_path / VOCAB).read_bytes()
    if importlib.util.find_spec("tokenizers"):  # installed with transformers, which reads the directory
        assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def load_model_hf(path):
    from weights.safetensors_io import read_file

    return read_file(path / "model.safetensors")[0]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16], ids=lambda d: np.dtype(d).name)
def test_round_trip_is_bit_identical(tmp_path, capsys, dtype):
    src, cfg, tensors = exact_rwkv7(tmp_path, dtype=dtype, sse_heads=1)
    rc, _, err = run(["convert", src, "--to-hf", tmp_path / "hf"], capsys)
    assert rc == 0, err
    rc, _, err = run(["convert", tmp_path / "hf", "--out", tmp_path / "back"], capsys)
    assert rc == 0, err
    back_cfg, back = load_model(tmp_path / "back")
    assert back_cfg == cfg
    assert (tmp_path / "back" / "config.json").read_text() == (src / "config.json").read_text()
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert all(back[k].dtype == t.dtype and np.array_equal(back[k], t) for k, t in tensors.items())
    assert (tmp_path / "back" / VOCAB).read_bytes() == (tmp_path / VOCAB).read_bytes()


def test_import_of_a_directory_written_as_fla_writes_it(tmp_path, capsys):
    """An fla-hub style directory (no metastate config in it; tensors written here, by the test's
    own reading of fla's names) imports with RWKV-7's logits."""
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layer=3, head_size=32)
    p = random_params(cfg, 3, np.float32, sse=False)
    hf = {"model.embeddings.weight": p["emb.weight"], "lm_head.weight": p["head.weight"],
          "model.norm.weight": p["ln_out.weight"], "model.norm.bias": p["ln_out.bias"],
          "model.layers.0.pre_norm.weight": p["blocks.0.ln0.weight"],
          "model.layers.0.pre_norm.bias": p["blocks.0.ln0.bias"]}
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        hf.update({h + "attn_norm.weight": p[b + "ln1.weight"], h + "attn_norm.bias": p[b + "ln1.bias"],
                   h + "ffn_norm.weight": p[b + "ln2.weight"], h + "ffn_norm.bias": p[b + "ln2.bias"]})
        hf.update({h + f"attn.x_{c}": p[b + f"att.x_{c}"][None, None] for c in "rwkvag"})
        hf.update({h + f"attn.{c}": p[b + f"att.{c}"] for c in ("k_k", "k_a", "r_k")})
        for ours, theirs in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj")):
            hf[h + f"attn.{theirs}.weight"] = p[b + f"att.{ours}.weight"]
        for c in ("w", "a", "v", "g") if i else ("w", "a", "g"):
            hf[h + f"attn.{c}_lora.lora.0.weight"] = np.ascontiguousarray(p[b + f"att.{c}1"].T)
            hf[h + f"attn.{c}_lora.lora.2.weight"] = np.ascontiguousarray(p[b + f"att.{c}2"].T)
            if c != "g":
                hf[h + f"attn.{c}_lora.lora.2.bias"] = p[b + f"att.{c}0"]
        hf.update({h + "attn.g_norm.weight": p[b + "att.ln_x.weight"], h + "attn.g_norm.bias": p[b + "att.ln_x.bias"],
                   h + "ffn.x_k": p[b + "meta.x_k"], h + "ffn.key.weight": p[b + "meta.param_keys"],
                   h + "ffn.value.weight": np.ascontiguousarray(p[b + "meta.param_values"].T)})
    src = tmp_path / "fla-hub"
    src.mkdir()
    write_file(src / "model.safetensors", hf, {"format": "pt"}, checksum=False)
    (src / "config.json").write_text(json.dumps({
        "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "attn_mode": "chunk", "hidden_size": 64,
        "hidden_ratio": 4.0, "intermediate_size": 256, "num_hidden_layers": 3, "head_dim": 32, "num_heads": None,
        "decay_low_rank_dim": cfg.lora_w, "gate_low_rank_dim": cfg.lora_g, "a_low_rank_dim": cfg.lora_a,
        "v_low_rank_dim": cfg.lora_v, "hidden_act": "sqrelu", "norm_first": True, "norm_bias": True,
        "norm_eps": 1e-5, "attn": None, "value_dim": [64, 64, 64], "vocab_size": 300, "torch_dtype": "float32",
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0}))
    world_vocab(src / VOCAB)
    rc, text, err = run(["convert", src, "--out", tmp_path / "ours"], capsys)
    assert rc == 0, err
    assert "fla's GroupNorm epsilon is head_dim * norm_eps = 0.00032" in text  # head size 32: noted
    got_cfg, got = load_model(tmp_path / "ours")
    assert got_cfg.ln_x_eps == 64e-5 and got_cfg.tokenizer == {"type": "rwkv_world", "file": VOCAB}
    assert all(not got[f"blocks.{i}.meta.sse_gate"].any() for i in range(3))
    expected = forward(p, cfg, np.array([TOKENS]))[0]
    assert rel_rms(forward(got, got_cfg, np.array([TOKENS]))[0], expected) == 0


# -- refusals: each one line ----------------------------------------------------------------
def test_only_exact_rwkv7_models_leave(tmp_path, capsys):
    src, cfg, tensors = exact_rwkv7(tmp_path, tokenizer=False)
    sse = dict(tensors, **{"blocks.1.meta.sse_gate": np.full(64, 0.1, np.float32)})
    save_model(tmp_path / "sse", cfg, sse)
    rc, _, err = run(["convert", tmp_path / "sse", "--to-hf", tmp_path / "a"], capsys)
    assert_one_error(rc, err, "Hugging Face", "blocks.1.meta.sse_gate is non-zero")

    wide = ModelConfig(vocab_size=300, d_model=64, n_layer=1, head_size=32, d_att=128)
    save_model(tmp_path / "wide", wide, random_params(wide, 0, np.float32, sse=False))
    rc, _, err = run(["convert", tmp_path / "wide", "--to-hf", tmp_path / "b"], capsys)
    assert_one_error(rc, err, "Hugging Face", "d_att 128 != d_model 64")

    rc, _, err = run(["init", "--out", tmp_path / "product", "--vocab-size", 50, "--d-model", 32, "--n-layer", 1,
                      "--head-size", 16, "--param-mode", "product", "--n-sub-keys", 4, "--param-heads", 1,
                      "--param-topk", 2], capsys)
    assert rc == 0, err
    rc, _, err = run(["convert", tmp_path / "product", "--to-hf", tmp_path / "c"], capsys)
    assert_one_error(rc, err, "Hugging Face", "product")
    assert not any((tmp_path / x).exists() for x in "abc")

    rc, _, err = run(["convert", src, "--to-hf", tmp_path / "d", "--to-pth", tmp_path / "d.pth"], capsys)
    assert_one_error(rc, err, "exactly one of --out, --to-pth and --to-hf", code=2)


def hf_dir(tmp_path, capsys, **config_changes):
    src, _, _ = exact_rwkv7(tmp_path, tokenizer=False)
    out = tmp_path / "hf"
    if not out.exists():
        assert run(["convert", src, "--to-hf", out], capsys)[0] == 0
    config = json.loads((out / "config.json").read_text())
    config.pop("metastate_config")
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("change, fragments", [
    ({"model_type": "rwkv6"}, ["model_type 'rwkv6'", "only 'rwkv7'"]),
    ({"norm_eps": 1e-6}, ["norm_eps = 1e-06", "LayerNorm epsilon"]),
    ({"hidden_act": "relu"}, ["hidden_act = 'relu'"]),
    ({"attn": {"layers": [0], "num_heads": 2}}, ["hybrid attention"]),
    ({"value_dim": [128, 128]}, ["value_dim"]),
    ({"intermediate_size": 128}, ["ffn.key.weight", "shape"]),
])
def test_import_refuses_what_is_not_plain_rwkv7(tmp_path, capsys, change, fragments):
    src = hf_dir(tmp_path, capsys, **change)
    rc, _, err = run(["convert", src, "--out", tmp_path / "x"], capsys)
    assert_one_error(rc, err, *fragments)
    assert not (tmp_path / "x").exists()


def test_a_pickle_is_never_opened(tmp_path, capsys, monkeypatch):
    src = hf_dir(tmp_path, capsys)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must not be loaded")
    import pickle

    monkeypatch.setattr(pickle, "load", None)  # any attempt would fail differently
    monkeypatch.setitem(sys.modules, "torch", None)
    rc, _, err = run(["convert", src, "--out", tmp_path / "x"], capsys)
    assert_one_error(rc, err, "pytorch_model.bin", "pickle", "safetensors")


def test_a_hub_id_says_how_to_download_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(["convert", "fla-hub/rwkv7-0.1B-world", "--out", "x"], capsys)
    assert_one_error(rc, err, "hf download fla-hub/rwkv7-0.1B-world --local-dir DIR", "never downloads")
    rc, _, err = run(["convert", "no/such/dir", "--out", "x"], capsys)  # a path, not an id: not found
    assert_one_error(rc, err, "No such file")


def test_other_commands_say_how_to_import_a_hugging_face_directory(tmp_path, capsys):
    src = hf_dir(tmp_path, capsys)
    for argv in (["inspect", src], ["logits", "--model", src, "--tokens", "1", "--out", tmp_path / "l.npy"]):
        rc, _, err = run(argv, capsys)
        assert_one_error(rc, err, "Hugging Face model directory", f"metastate convert {src} --out DIR")


def test_force_replaces_an_exported_directory_but_not_a_foreign_one(tmp_path, capsys):
    src, _, _ = exact_rwkv7(tmp_path, tokenizer=False)
    out = tmp_path / "hf"
    assert run(["convert", src, "--to-hf", out], capsys)[0] == 0
    rc, _, err = run(["convert", src, "--to-hf", out, "--force"], capsys)
    assert rc == 0, err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "llama"}')
    rc, _, err = run(["convert", src, "--to-hf", foreign, "--force"], capsys)
    assert_one_error(rc, err, "refusing to replace")
    assert (foreign / "config.json").read_text() == '{"model_type": "llama"}'


# -- transformers + fla (CPU: loading only; fla's forward needs a GPU) ----------------------
def test_transformers_loads_it_with_no_missing_or_unexpected_keys(tmp_path, capsys):
    pytest.importorskip("fla", reason="pip install flash-linear-attention")
    import torch
    from transformers import AutoModelForCausalLM

    src, cfg, tensors = exact_rwkv7(tmp_path, n_layer=3)
    rc, _, err = run(["convert", src, "--to-hf", tmp_path / "hf"], capsys)
    assert rc == 0, err
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(model).__name__ == "RWKV7ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.2.attn.a_lora.lora.2.weight"], torch.from_numpy(tensors["blocks.2.att.a2"].T))
    assert torch.equal(sd["model.layers.1.attn.r_k"], torch.from_numpy(tensors["blocks.1.att.r_k"]))
    assert torch.equal(sd["lm_head.weight"], torch.from_numpy(tensors["head.weight"]))
    assert model.config.head_dim == 32 and model.config.intermediate_size == cfg.n_param_tokens


def test_fla_logits_equal_ours_on_cuda(tmp_path, capsys):
    """fla's RWKV7ForCausalLM on the exported directory (scripts/gpu_check.sh): its recurrent
    path (T < 64, no grad) and its chunked one (T >= 64, TF32 matmuls in its float32 path)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("fla's RWKV-7 runs Triton kernels even on the CPU: it needs a CUDA GPU")
    pytest.importorskip("fla", reason="pip install flash-linear-attention")
    from transformers import AutoModelForCausalLM

    # head size 64: fla's GroupNorm epsilon (head_dim * norm_eps) is then the model's ln_x_eps
    src, cfg, tensors = exact_rwkv7(tmp_path, vocab_size=1000, d_model=256, n_layer=3, head_size=64)
    rc, _, err = run(["convert", src, "--to-hf", tmp_path / "hf"], capsys)
    assert rc == 0, err
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).cuda().eval()
    rng = np.random.default_rng(2)
    for T, bound in ((16, 1e-4), (100, 5e-3)):
        tokens = rng.integers(0, cfg.vocab_size, T)
        with torch.no_grad():
            theirs = model(torch.tensor(tokens[None], device="cuda")).logits[0].float().cpu().numpy()
        err = rel_rms(theirs, forward(tensors, cfg, tokens[None])[0][0])
        print(f"fla vs reference, T {T}: rel_rms {err:.3g}")
        assert err <= bound, (T, err)


def test_the_world_tokenizer_json_encodes_as_we_do(tmp_path, capsys):
    """AutoTokenizer on the exported tokenizer.json: the same ids as WorldTokenizer with the
    real World vocabulary (from the `rwkv` package), on this repository's docs and on random
    mixes of whitespace and multi-byte characters; linear time on long text."""
    import time

    from metastate_core.tokenizers import WorldTokenizer

    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("rwkv")
    vocab = Path(spec.origin).parent / VOCAB if spec and spec.origin else None
    if vocab is None or not vocab.is_file():
        pytest.skip("the World vocabulary ships with the rwkv package")
    src, _, _ = exact_rwkv7(tmp_path, vocab_size=65536, d_model=32, n_layer=1, head_size=32, tokenizer=False)
    rc, _, err = run(["convert", src, "--to-hf", tmp_path / "hf", "--tokenizer", vocab], capsys)
    assert rc == 0, err
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = WorldTokenizer(vocab)
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "README.md").read_text() + (repo / "docs" / "spec.md").read_text()
    start = time.perf_counter()
    ids = theirs.encode(text)
    assert time.perf_counter() - start < 5  # one unsplit word of 50k characters takes minutes
    assert ids == ours.encode(text)
    rng = np.random.default_rng(0)
    alphabet = list(" \t\n\r\x0b\x0ca.,!é日本語🤖")
    for _ in range(300):
        s = "".join(rng.choice(alphabet, rng.integers(1, 30)))
        assert theirs.encode(s) == ours.encode(s), repr(s)
        assert theirs.decode(ours.encode(s)) == s
