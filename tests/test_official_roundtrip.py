"""Official RWKV-7 `.pth` import/export (SPEC section 4) and its round trips."""

from __future__ import annotations

import os
import sys

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from metastate_core.config import ModelConfig  # noqa: E402
from metastate_core.params import param_shapes, random_params  # noqa: E402
from metastate_core.errors import ExtraUnavailable  # noqa: E402
from weights import (WeightsError, export_official_pth, import_official_pth, load_model,  # noqa: E402
                     save_model)

SIZES = dict(V=20, d=32, L=3, H=2, N=16, lw=8, la=4, lv=12, lg=16, n=48)


def official_state_dict(V, d, L, H, N, lw, la, lv, lg, n, dtype=torch.float32, seed=0):
    """A random checkpoint in RWKV-LM x070's own layout, written out from the official shapes."""
    C = H * N
    shapes = {"emb.weight": (V, d), "blocks.0.ln0.weight": (d,), "blocks.0.ln0.bias": (d,)}
    for i in range(L):
        b = f"blocks.{i}."
        shapes.update({b + "ln1.weight": (d,), b + "ln1.bias": (d,), b + "ln2.weight": (d,), b + "ln2.bias": (d,)})
        shapes.update({b + f"att.x_{c}": (1, 1, d) for c in "rwkvag"})
        shapes.update({b + "att.w0": (1, 1, C), b + "att.w1": (d, lw), b + "att.w2": (lw, C),
                       b + "att.a0": (1, 1, C), b + "att.a1": (d, la), b + "att.a2": (la, C),
                       b + "att.v0": (1, 1, C), b + "att.v1": (d, lv), b + "att.v2": (lv, C),
                       b + "att.g1": (d, lg), b + "att.g2": (lg, C),
                       b + "att.k_k": (1, 1, C), b + "att.k_a": (1, 1, C), b + "att.r_k": (H, N),
                       b + "att.receptance.weight": (C, d), b + "att.key.weight": (C, d),
                       b + "att.value.weight": (C, d), b + "att.output.weight": (d, C),
                       b + "att.ln_x.weight": (C,), b + "att.ln_x.bias": (C,),
                       b + "ffn.x_k": (1, 1, d), b + "ffn.key.weight": (n, d), b + "ffn.value.weight": (d, n)})
    shapes.update({"ln_out.weight": (d,), "ln_out.bias": (d,), "head.weight": (V, d)})
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def as_numpy(t):
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def bits(a) -> bytes:
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert bits(a[k]) == bits(b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_import_maps_official_layout(tmp_path, dtype):
    sd = official_state_dict(**SIZES, dtype=dtype)
    torch.save(sd, tmp_path / "rwkv7.pth")
    cfg, t = import_official_pth(tmp_path / "rwkv7.pth")
    s = SIZES
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.head_size, cfg.d_att) == (s["V"], s["d"], s["L"], s["N"], 32)
    assert (cfg.lora_w, cfg.lora_a, cfg.lora_v, cfg.lora_g, cfg.n_param_tokens) == (
        s["lw"], s["la"], s["lv"], s["lg"], s["n"])
    assert cfg.sse_heads == min(s["H"], s["d"] // s["N"]) and cfg.tokenizer is None
    assert list(t) == list(param_shapes(cfg))
    np_dtype = as_numpy(torch.zeros(1, dtype=dtype)).dtype
    assert all(v.dtype == np_dtype for v in t.values())
    assert "blocks.0.att.v0" not in t and "blocks.1.ffn.x_k" not in t
    for i in range(s["L"]):
        b = f"blocks.{i}."
        assert bits(t[b + "meta.x_k"]) == bits(as_numpy(sd[b + "ffn.x_k"])[0, 0])
        assert bits(t[b + "meta.param_keys"]) == bits(as_numpy(sd[b + "ffn.key.weight"]))
        assert bits(t[b + "meta.param_values"]) == bits(as_numpy(sd[b + "ffn.value.weight"]).T)
        assert not np.any(t[b + "meta.sse_gate"].astype(np.float32))
        assert bits(t[b + "att.k_a"]) == bits(as_numpy(sd[b + "att.k_a"]).reshape(-1))
        assert bits(t[b + "att.r_k"]) == bits(as_numpy(sd[b + "att.r_k"]))
        assert t[b + "att.w0"].shape == (32,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pth_import_export_import_round_trip(tmp_path, dtype):
    sd = official_state_dict(**SIZES, dtype=dtype, seed=1)
    torch.save(sd, tmp_path / "a.pth")
    cfg, first = import_official_pth(tmp_path / "a.pth")
    export_official_pth(cfg, first, tmp_path / "b.pth")
    exported = torch.load(tmp_path / "b.pth", map_location="cpu", weights_only=True)
    # The export is the official checkpoint again: same names, order, shapes, dtypes and values,
    # except layer 0's unused v-LoRA, which is written as zeros of the official shapes.
    assert list(exported) == list(sd)
    for k, v in sd.items():
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
        if k in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            assert not exported[k].any(), k
        else:
            assert torch.equal(exported[k], v), k
    cfg2, second = import_official_pth(tmp_path / "b.pth")
    assert cfg2 == cfg
    assert_same(second, first)
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "b.pth"]  # no temporary file left behind


def test_import_then_save_load_is_identical(tmp_path):
    torch.save(official_state_dict(**SIZES, dtype=torch.bfloat16, seed=2), tmp_path / "a.pth")
    cfg, t = import_official_pth(tmp_path / "a.pth")
    save_model(tmp_path / "m", cfg, t)
    cfg2, loaded = load_model(tmp_path / "m")
    assert cfg2 == cfg
    assert_same(loaded, t)


def test_single_layer_model(tmp_path):
    sd = official_state_dict(**dict(SIZES, L=1), seed=3)
    torch.save(sd, tmp_path / "a.pth")
    cfg, t = import_official_pth(tmp_path / "a.pth")
    assert cfg.n_layer == 1 and cfg.lora_v == SIZES["lv"]  # layer 0's v1 gives the size
    export_official_pth(cfg, t, tmp_path / "b.pth")
    exported = torch.load(tmp_path / "b.pth", weights_only=True)
    assert exported["blocks.0.att.v1"].shape == (SIZES["d"], SIZES["lv"])
    del sd["blocks.0.att.v0"], sd["blocks.0.att.v1"], sd["blocks.0.att.v2"]
    torch.save(sd, tmp_path / "c.pth")  # without them the official rule gives lora_v
    cfg, t = import_official_pth(tmp_path / "c.pth")
    assert cfg.lora_v == 32
    export_official_pth(cfg, t, tmp_path / "d.pth")
    assert torch.load(tmp_path / "d.pth", weights_only=True)["blocks.0.att.v2"].shape == (32, 32)


def test_export_of_a_float64_rwkv7_model(tmp_path):
    cfg = ModelConfig(vocab_size=12, d_model=32, n_layer=2, head_size=16, n_param_tokens=64)
    p = random_params(cfg, 0, np.float64, sse=False)
    export_official_pth(cfg, p, tmp_path / "m.pth")
    sd = torch.load(tmp_path / "m.pth", weights_only=True)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sd["blocks.1.att.x_g"].shape == (1, 1, 32) and sd["blocks.1.ffn.value.weight"].shape == (32, 64)
    cfg2, back = import_official_pth(tmp_path / "m.pth")
    assert cfg2 == cfg
    for k, v in p.items():
        np.testing.assert_array_equal(back[k], v.astype(np.float32), err_msg=k)


def test_export_refuses_active_sse(tmp_path):
    cfg = ModelConfig(vocab_size=12, d_model=32, n_layer=2, head_size=16, n_param_tokens=64)
    p = random_params(cfg, 0, np.float32, sse=False)
    p["blocks.1.meta.sse_gate"] = p["blocks.1.meta.sse_gate"].copy()
    p["blocks.1.meta.sse_gate"][5] = 1e-3
    with pytest.raises(WeightsError, match="blocks.1.meta.sse_gate is non-zero"):
        export_official_pth(cfg, p, tmp_path / "m.pth")
    assert os.listdir(tmp_path) == []


def test_export_refuses_product_models(tmp_path, monkeypatch):
    """The official format has no product keys (SPEC section 7): refused before torch is needed."""
    cfg = ModelConfig(vocab_size=12, d_model=32, n_layer=1, head_size=16, param_mode="product", n_sub_keys=4,
                      param_heads=1, param_topk=16)
    p = random_params(cfg, 0, np.float32, sse=False)
    for torch_module in (torch, None):
        monkeypatch.setitem(sys.modules, "torch", torch_module)
        with pytest.raises(WeightsError, match="official RWKV-7 format: it has no product-key parameter tokens"):
            export_official_pth(cfg, p, tmp_path / "m.pth")
    assert os.listdir(tmp_path) == []


def test_import_rejects_unknown_and_missing_tensors(tmp_path):
    sd = official_state_dict(**SIZES)
    sd["blocks.0.ffn.s_emb.weight"] = torch.zeros(3)
    sd["blocks.2.att.lora_extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "a.pth")
    with pytest.raises(WeightsError, match="unknown tensors .*'blocks.0.ffn.s_emb.weight', 'blocks.2.att.lora_extra'"):
        import_official_pth(tmp_path / "a.pth")
    sd = official_state_dict(**SIZES)
    del sd["blocks.1.att.g2"]
    torch.save(sd, tmp_path / "b.pth")
    with pytest.raises(WeightsError, match="tensor 'blocks.1.att.g2' is missing"):
        import_official_pth(tmp_path / "b.pth")
    sd = official_state_dict(**SIZES)
    sd["blocks.1.ffn.value.weight"] = sd["blocks.1.ffn.value.weight"][:, :-1]
    torch.save(sd, tmp_path / "c.pth")
    with pytest.raises(WeightsError, match=r"'blocks.1.meta.param_values' has shape \[47, 32\], expected \[48, 32\]"):
        import_official_pth(tmp_path / "c.pth")
    sd = official_state_dict(**SIZES)
    sd["head.weight"] = sd["head.weight"].to(torch.int32)
    torch.save(sd, tmp_path / "d.pth")
    with pytest.raises(WeightsError, match="'head.weight' has dtype torch.int32"):
        import_official_pth(tmp_path / "d.pth")


class _Payload:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/metastate_pwned_by_pickle",))


def test_import_never_unpickles_objects(tmp_path):
    torch.save({"emb.weight": torch.zeros(2, 2), "x": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="cannot read .*evil.pth as a PyTorch checkpoint of plain tensors"):
        import_official_pth(tmp_path / "evil.pth")
    assert not os.path.exists("/tmp/metastate_pwned_by_pickle")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="expected a dict of tensor names to tensors"):
        import_official_pth(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        import_official_pth(tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match="does not exist"):
        import_official_pth(tmp_path / "missing.pth")


def test_missing_torch_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ExtraUnavailable, match=r"pip install -e '\.\[torch\]'"):
        import_official_pth(tmp_path / "a.pth")
    cfg = ModelConfig(vocab_size=12, d_model=32, n_layer=1, head_size=16)
    with pytest.raises(ExtraUnavailable, match=r"pip install -e '\.\[torch\]'"):
        export_official_pth(cfg, random_params(cfg, 0, sse=False), tmp_path / "a.pth")


# -- hostile checkpoints (issue 22) ------------------------------------------------------------

def test_tensors_that_would_cost_more_than_the_file_are_refused(tmp_path):
    """An expanded view stores 4 bytes and is 4 TiB materialised; a sparse tensor is no array.
    Each is refused in one line, by `metastate convert` in a child with 2 GiB of address space."""
    from fuzz.harness import run

    sd = official_state_dict(**SIZES)
    cases = {"expand": torch.zeros(1).expand(2**20, 2**20),
             "coo": torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.tensor([1.0, 2.0]), (20, 32)),
             "csr": torch.zeros(20, 32).to_sparse_csr()}
    for name, t in cases.items():
        torch.save(dict(sd, **{"emb.weight": t}), tmp_path / f"{name}.pth")
        result = run(["convert", tmp_path / f"{name}.pth", "--out", tmp_path / name])
        assert not result.problems(), result.describe()
        assert "emb.weight" in result.stderr and not (tmp_path / name).exists(), result.describe()
    with pytest.raises(WeightsError, match="overlaps itself"):
        import_official_pth(tmp_path / "expand.pth")
    for layout in ("coo", "csr"):
        with pytest.raises(WeightsError, match="sparse"):
            import_official_pth(tmp_path / f"{layout}.pth")


def test_a_checkpoint_that_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.pth")
    with pytest.raises(WeightsError, match="is a FIFO, not a regular file"):
        import_official_pth(tmp_path / "fifo.pth")
