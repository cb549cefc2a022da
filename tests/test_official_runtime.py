"""The NumPy reference against the official RWKV-7 runtime (the `rwkv` PyPI package).

Random checkpoints in the official .pth layout go through the official runtime
(RWKV_V7_ON=1, CPU fp32) and through our importer + reference. With sse_gate zero the
Meta-State model is exactly RWKV-7, so logits must agree (SPEC section 6: rel_rms <= 1e-5).
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from metastate_core.config import ModelConfig  # noqa: E402
from metastate_core.params import random_params  # noqa: E402
from metastate_core.reference import forward  # noqa: E402
from weights import import_official_pth  # noqa: E402

SHAPES = [
    # vocab 65536, 4 layers, official LoRA sizes from the d_model rule
    dict(vocab_size=65536, d_model=128, n_layer=4),
    dict(vocab_size=1000, d_model=256, n_layer=2),
    dict(vocab_size=300, d_model=64, n_layer=5),
]


from metastate_core.reference import rel_rms  # noqa: E402  (SPEC section 6)


@pytest.fixture(scope="module")
def official_rwkv():
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "0"
    os.environ["RWKV_JIT_ON"] = "1"
    rwkv_model = pytest.importorskip("rwkv.model")
    if rwkv_model.RWKV.__name__ != "RWKV_x070":
        pytest.skip("rwkv.model was imported before RWKV_V7_ON=1 was set")
    return rwkv_model.RWKV


def official_state_dict(cfg: ModelConfig, p: dict) -> dict:
    """Canonical tensors -> the official RWKV-7 .pth layout, written out independently of
    the importer under test (vectors as [1, 1, C], ffn names, value transposed)."""
    out = {}
    for name, t in p.items():
        t = torch.tensor(t, dtype=torch.float32)
        if ".meta." in name:
            name = name.replace(".meta.x_k", ".ffn.x_k").replace(".meta.param_keys", ".ffn.key.weight")
            if name.endswith("meta.param_values"):
                name, t = name.replace("meta.param_values", "ffn.value.weight"), t.T.contiguous()
            if name.endswith("meta.sse_gate"):
                assert not t.any()
                continue
        elif any(name.endswith(f"att.{v}") for v in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a")):
            t = t.reshape(1, 1, -1)
        out[name] = t
    out["blocks.0.att.v0"] = torch.zeros(1, 1, cfg.d_att)            # unused by the runtime
    out["blocks.0.att.v1"] = torch.zeros(cfg.d_model, cfg.lora_v)
    out["blocks.0.att.v2"] = torch.zeros(cfg.lora_v, cfg.d_att)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"V{s['vocab_size']}-d{s['d_model']}-L{s['n_layer']}")
def test_reference_matches_official_runtime(shape, official_rwkv, tmp_path):
    cfg = ModelConfig(**shape)
    p = random_params(cfg, rng=shape["d_model"], sse=False)
    path = tmp_path / "model.pth"
    torch.save(official_state_dict(cfg, p), path)

    imported_cfg, tensors = import_official_pth(path)
    for field in ("vocab_size", "d_model", "n_layer", "head_size", "d_att", "lora_w", "lora_a",
                  "lora_v", "lora_g", "n_param_tokens"):
        assert getattr(imported_cfg, field) == getattr(cfg, field), field

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 14).tolist()
    official = official_rwkv(str(path)[:-4], "cpu fp32")
    with torch.no_grad():
        expected, _ = official.forward(tokens, None, full_output=True)
    ours, _ = forward(tensors, imported_cfg, np.array([tokens]))
    assert rel_rms(ours[0], expected.numpy()) <= 1e-5

    # prefill + single-token decode, on both sides
    with torch.no_grad():
        out, state = official.forward(tokens[:9], None, full_output=True)
        official_steps = [out.numpy()]
        for tok in tokens[9:]:
            out, state = official.forward([tok], state)
            official_steps.append(out.numpy()[None])
    logits, st = forward(tensors, imported_cfg, np.array([tokens[:9]]), wkv="chunked")
    ours_steps = [logits[0]]
    for tok in tokens[9:]:
        logits, st = forward(tensors, imported_cfg, np.array([[tok]]), st)
        ours_steps.append(logits[0])
    assert rel_rms(np.concatenate(ours_steps), np.concatenate(official_steps)) <= 1e-5
    # final WKV states agree too (the runtime keeps them as [H, N, N] per layer, row = value)
    for layer in range(cfg.n_layer):
        assert rel_rms(st.wkv[layer, 0], state[layer * 3 + 1].numpy()) <= 1e-5


def test_head_size_32_matches_and_an_older_epsilon_is_noted(official_rwkv, tmp_path):
    # The runtime's ln_x epsilon is 64e-5 for every head size, and so is an imported model's
    # (ln_x_eps, SPEC section 1). A model written before the field existed keeps head_size * 1e-5:
    # its logits differ from the runtime's at head size 32, and `convert` says why.
    from weights import official_runtime_caveats

    cfg = ModelConfig(vocab_size=300, d_model=64, n_layer=2, head_size=32)
    p = random_params(cfg, rng=7, sse=False)
    path = tmp_path / "model.pth"
    torch.save(official_state_dict(cfg, p), path)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 12).tolist()
    with torch.no_grad():
        expected = official_rwkv(str(path)[:-4], "cpu fp32").forward(tokens, None, full_output=True)[0].numpy()
    imported_cfg, tensors = import_official_pth(path)
    assert imported_cfg.ln_x_eps == 64e-5 and official_runtime_caveats(imported_cfg) == []
    assert rel_rms(forward(tensors, imported_cfg, np.array([tokens]))[0][0], expected) <= 1e-5

    older = {k: v for k, v in imported_cfg.to_dict().items() if k != "ln_x_eps"}  # a config.json from before
    older_cfg = ModelConfig.from_dict(older)
    assert older_cfg.ln_x_eps == 32e-5
    assert rel_rms(forward(tensors, older_cfg, np.array([tokens]))[0][0], expected) > 1e-4
    notes = official_runtime_caveats(older_cfg)
    assert len(notes) == 1 and "ln_x_eps 0.00032" in notes[0]
    grown = ModelConfig(vocab_size=300, d_model=64, n_layer=2, d_att=128)
    assert "d_att 128 != d_model 64" in official_runtime_caveats(grown)[0]
