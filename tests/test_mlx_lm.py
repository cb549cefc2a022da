"""mlx-lm (0.32.2, `mlx[cpu]`: its rwkv7 runs plain MLX ops on a Linux CPU) opens what
`metastate convert --to-hf` writes, generates from it, and computes our logits (issue 20).

Judges: the float64 NumPy reference on the tensors the test wrote, and the official `rwkv`
package on an official .pth. SPEC section 6's float32 bound, rel_rms <= 1e-4.
"""

import os

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm", reason="pip install mlx-lm==0.32.2")

from metastate.cli import main  # noqa: E402
from metastate_core.config import ModelConfig  # noqa: E402
from metastate_core.params import random_params  # noqa: E402
from metastate_core.reference import forward, rel_rms  # noqa: E402
from metastate_core.tokenizers import WorldTokenizer  # noqa: E402
from weights import save_model  # noqa: E402

VOCAB = "rwkv_vocab_v20230424.txt"
TOKENS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 258, 257]


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def world_vocab(path) -> None:
    """The 256 single bytes (ids 1..256) and two longer tokens: greedy matching has a choice."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(256):
            f.write(f"{i + 1} {bytes([i])!r} 1\n")
        f.write("257 'ab' 2\n258 'abc' 3\n")


def mlx_logits(model, tokens) -> np.ndarray:
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def export(tmp_path, capsys, cfg, tensors) -> tuple:
    world_vocab(tmp_path / VOCAB)
    cfg = cfg.replace(tokenizer={"type": "rwkv_world", "file": VOCAB})
    save_model(tmp_path / "ours", cfg, tensors, extra_files={VOCAB: tmp_path / VOCAB})
    run(["convert", tmp_path / "ours", "--to-hf", tmp_path / "hf"], capsys)
    return mlx_lm.load(str(tmp_path / "hf"))


@pytest.mark.parametrize("sizes", [dict(d_model=128, n_layer=3, head_size=64),
                                   dict(d_model=64, n_layer=2, head_size=32)], ids=["N64", "N32"])
def test_mlx_lm_logits_equal_ours(tmp_path, capsys, sizes):
    cfg = ModelConfig(vocab_size=300, **sizes)  # ln_x_eps 64e-5: mlx-lm's at every head size
    tensors = random_params(cfg, 11, np.float32, sse=False)
    model, _ = export(tmp_path, capsys, cfg, tensors)
    expected = forward(tensors, cfg, np.array([TOKENS]))[0][0]
    assert rel_rms(mlx_logits(model, TOKENS), expected) <= 1e-4


def test_mlx_lm_generates_our_greedy_continuation(tmp_path, capsys):
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layer=2, head_size=64)
    tensors = random_params(cfg, 5, np.float32, sse=False)
    model, tokenizer = export(tmp_path, capsys, cfg, tensors)
    ours = WorldTokenizer(tmp_path / VOCAB)
    prompt = "abcab, xyz"
    ids = ours.encode(prompt)
    assert ids[:3] == [258, 257, 45] and tokenizer.encode(prompt) == ids  # same greedy longest match
    for _ in range(6):  # greedy decoding on the reference (random weights: no near-ties expected)
        logits = forward(tensors, cfg, np.array([ids]))[0][0, -1]
        ids.append(int(np.argmax(logits)))
    new = ids[len(ours.encode(prompt)):]
    streamed = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt=prompt, max_tokens=6)]
    assert streamed == new  # mlx-lm's default sampler is greedy
    assert isinstance(mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=6), str)


@pytest.fixture(scope="module")
def official_rwkv():
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "0"
    os.environ["RWKV_JIT_ON"] = "1"
    pytest.importorskip("torch")
    rwkv_model = pytest.importorskip("rwkv.model")
    if rwkv_model.RWKV.__name__ != "RWKV_x070":
        pytest.skip("rwkv.model was imported before RWKV_V7_ON=1 was set")
    return rwkv_model.RWKV


def test_official_pth_to_ours_to_hf_to_mlx_lm_matches_the_rwkv_package(tmp_path, capsys, official_rwkv):
    import torch
    from test_official_runtime import official_state_dict  # the .pth layout written without our exporter

    cfg = ModelConfig(vocab_size=1000, d_model=128, n_layer=3)
    p = random_params(cfg, 4, sse=False)
    pth = tmp_path / "model.pth"
    torch.save(official_state_dict(cfg, p), pth)
    world_vocab(tmp_path / VOCAB)  # beside the .pth: the import bundles it
    run(["convert", pth, "--out", tmp_path / "ours"], capsys)
    run(["convert", tmp_path / "ours", "--to-hf", tmp_path / "hf"], capsys)
    model, _ = mlx_lm.load(str(tmp_path / "hf"))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 16).tolist()
    with torch.no_grad():
        expected, _ = official_rwkv(str(pth)[:-4], "cpu fp32").forward(tokens, None, full_output=True)
    assert rel_rms(mlx_logits(model, tokens), expected.float().numpy()) <= 1e-4


def test_a_sentencepiece_model_opens_with_its_tokenizer(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    from pathlib import Path

    from metastate_core.tokenizers import SentencePieceTokenizer

    spm = Path(__file__).resolve().parents[1] / "weights" / "default" / "tokenizer.model"
    cfg = ModelConfig(vocab_size=2048, d_model=64, n_layer=1, head_size=64)
    save_model(tmp_path / "ours", cfg, random_params(cfg, 2, np.float32, sse=False))
    run(["convert", tmp_path / "ours", "--to-hf", tmp_path / "hf", "--tokenizer", spm], capsys)
    _, tokenizer = mlx_lm.load(str(tmp_path / "hf"))
    text = "ROMEO:\nBut soft, what light through yonder window breaks?"
    ours = SentencePieceTokenizer(spm)
    assert tokenizer.encode(text) == ours.encode(text)
    assert tokenizer.decode(ours.encode(text)) == text


def test_what_mlx_lm_saves_comes_back(tmp_path, capsys):
    """mlx_lm.convert re-saves the export with k_k, k_a and g_norm as [H, N] and an index beside
    its one weight file: it imports to the same tensors. A quantized one is refused in one line."""
    from mlx_lm import convert

    from weights import load_model

    cfg = ModelConfig(vocab_size=300, d_model=128, n_layer=2, head_size=64)
    tensors = random_params(cfg, 8, np.float32, sse=False)
    export(tmp_path, capsys, cfg, tensors)
    convert(str(tmp_path / "hf"), mlx_path=str(tmp_path / "mlx"), dtype="float32")
    convert(str(tmp_path / "hf"), mlx_path=str(tmp_path / "mlx-q"), quantize=True, q_bits=8)
    capsys.readouterr()
    run(["convert", tmp_path / "mlx", "--out", tmp_path / "back"], capsys)
    _, back = load_model(tmp_path / "back")
    assert all(np.array_equal(back[k], t) for k, t in tensors.items())
    assert main(["convert", str(tmp_path / "mlx-q"), "--out", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "quantized weights: dequantize" in err
