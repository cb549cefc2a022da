"""MLX-quantized models everywhere (weights/quantized.py): the unpacking and dequantization
against mx.dequantize, the numpy and torch backends on a quantized directory against MLX's
quantized matmul, the quantization error against the float model, `inspect`'s summary, the
dequantized directory, and hostile quantized files (one error line each)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metastate.api import compute_logits
from metastate.cli import main
from metastate_core.config import ModelConfig
from metastate_core.params import param_shapes, random_params
from metastate_core.reference import forward, rel_rms
from weights import WeightsError, load_model, save_model
from weights import safetensors_io as st
from weights.quantized import dequantize, load_dequantized, quantization_lines, quantization_summary, unpack

# d_att != d_model: the output projection's width (96) is a multiple of 32 but not of 64
CFG = ModelConfig(vocab_size=150, d_model=64, n_layer=2, head_size=16, d_att=96, sse_heads=2, n_param_tokens=128)
TOKENS = np.random.default_rng(3).integers(0, 150, 40)


def mlx():
    return pytest.importorskip("mlx.core", reason="the mlx extra is not installed")


def test_unpack_reads_the_codes_lowest_bits_first():
    """Hand-packed words: code i of a word sits in bits [i * bits, (i + 1) * bits)."""
    words = np.array([[0x76543210, 0xFEDCBA98]], np.uint32)
    assert unpack(words, 4).tolist() == [list(range(16))]
    assert unpack(np.array([0x04030201, 0xFF00807F], np.uint32), 8).tolist() == [1, 2, 3, 4, 0x7F, 0x80, 0, 0xFF]
    # two groups of 8 codes at 4 bits: scale * q + bias per group
    got = dequantize(words, np.array([[0.5, 2.0]], np.float32), np.array([[-1.0, 3.0]], np.float32), 8, 4)
    assert got.dtype == np.float32
    assert got.tolist() == [[0.5 * q - 1 for q in range(8)] + [2.0 * q + 3 for q in range(8, 16)]]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_equals_mx_dequantize_bit_for_bit(bits, group_size):
    mx = mlx()
    rng = np.random.default_rng(bits * 1000 + group_size)
    for shape in [(37, 256), (3, 5, 384)]:  # rows of several scales, a 3-d tensor
        w = (rng.standard_normal(shape) * rng.uniform(1e-3, 10, (*shape[:-1], 1))).astype(np.float32)
        q, s, b = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
        want = np.array(mx.dequantize(q, s, b, group_size=group_size, bits=bits))
        got = dequantize(np.array(q), np.array(s), np.array(b), group_size, bits)
        assert got.shape == shape and got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        # bfloat16 scales and biases (a bfloat16 model): widened to float32 first, the same as
        # mx.dequantize on the widened ones (mx.dequantize itself rounds to bfloat16)
        q, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=group_size, bits=bits)
        s32, b32 = s.astype(mx.float32), b.astype(mx.float32)
        want = np.array(mx.dequantize(q, s32, b32, group_size=group_size, bits=bits))
        got = dequantize(np.array(q), np.array(s.view(mx.uint16)).view(st.np_dtype("BF16")),
                         np.array(b.view(mx.uint16)).view(st.np_dtype("BF16")), group_size, bits)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# -- a quantized model directory ------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: directory}: the float32 model and its 4- and 8-bit quantizations (MLX's convert)."""
    mlx()
    from backends.mlx import convert

    root = tmp_path_factory.mktemp("quantized")
    tensors = {k: v.astype(np.float32) for k, v in random_params(CFG, 0).items()}
    save_model(root / "f32", CFG, tensors)
    dirs = {"f32": root / "f32"}
    for bits, group_size in [(4, 64), (8, 64), (4, 32)]:
        dirs[f"q{bits}g{group_size}"] = root / f"q{bits}g{group_size}"
        convert(root / "f32", dirs[f"q{bits}g{group_size}"], bits=bits, group_size=group_size)
    return dirs


def test_each_matrix_is_within_one_quantization_step_of_the_original(models):
    """The dequantized weights against the float model's: every packed matrix off by at most
    one step (max - min) / (2^bits - 1) of its group (mx.quantize rounds to a grid whose
    larger end is exact), every other tensor exactly equal."""
    _, original = load_model(models["f32"])
    for name, bits, group_size in [("q4g64", 4, 64), ("q8g64", 8, 64), ("q4g32", 4, 32)]:
        cfg, got = load_dequantized(models[name])
        assert "quantization" not in cfg.extra and list(got) == list(param_shapes(CFG))
        packed = quantization_summary(models[name])["tensors"]
        for tname, w in original.items():
            if tname not in packed:
                np.testing.assert_array_equal(got[tname], w)
                continue
            groups = w.reshape(*w.shape[:-1], -1, group_size).astype(np.float64)
            step = (groups.max(-1) - groups.min(-1)) / (2**bits - 1)
            err = np.abs(got[tname].astype(np.float64) - w).reshape(groups.shape).max(-1)
            assert (err <= step * (1 + 1e-6) + 1e-7).all(), tname
            assert err.max() > 0, tname  # really quantized


@pytest.mark.parametrize("name", ["q4g64", "q8g64"])
def test_numpy_and_torch_logits_equal_mlx_quantized_matmul(models, name):
    """MLX computes with mx.quantized_matmul on the packed weights; numpy (float64 compute) and
    torch (float32) on the dequantized float32 weights. Same weights to the bit, so what is
    left is float32 rounding in MLX and torch: SPEC's float32 chunked-path tolerance, 1e-4
    (measured ~2e-7)."""
    pytest.importorskip("torch")
    want = compute_logits(models[name], TOKENS, "mlx")
    for backend in ("numpy", "torch"):
        got = compute_logits(models[name], TOKENS, backend)
        assert got.shape == (len(TOKENS), CFG.vocab_size)
        assert rel_rms(got, want) <= 1e-4, backend


def test_the_quantization_error_against_the_float_model(models):
    """The dequantized model's logits against the float model's (float64 reference on both):
    the quantization error, the same whether computed from the dequantized weights (numpy) or
    the packed ones (MLX), and within bounds over what was measured on this model (rel_rms
    8-bit 8.6e-3, 4-bit 0.145 at group size 64, 0.130 at 32)."""
    _, original = load_model(models["f32"])
    reference = forward(original, CFG, TOKENS[None])[0][0]
    errors = {}
    for name, bound in [("q8g64", 1.5e-2), ("q4g64", 0.2), ("q4g32", 0.18)]:
        err = rel_rms(compute_logits(models[name], TOKENS, "numpy"), reference)
        err_mlx = rel_rms(compute_logits(models[name], TOKENS, "mlx"), reference)
        assert 1e-4 < err <= bound and abs(err - err_mlx) <= 1e-3 * err, (name, err, err_mlx)
        errors[name] = err
    assert errors["q8g64"] < errors["q4g32"] < errors["q4g64"]  # more bits, smaller groups: closer


def test_auto_backend_reads_a_quantized_model(models):
    from metastate.api import load

    engine, _ = load(models["q4g64"])
    assert engine.backend in ("numpy", "torch", "mlx")
    np.testing.assert_allclose(engine.logits(TOKENS[:8]), compute_logits(models["q4g64"], TOKENS[:8], "numpy"),
                               rtol=1e-4, atol=1e-4)


def test_dequantized_directory_is_an_ordinary_model(models, tmp_path):
    """`convert Q --out DST --dtype float32`: load_dequantized then the weight format's save
    (atomic, checksummed): an ordinary directory with the same logits as the quantized one."""
    cfg, tensors = load_dequantized(models["q4g64"], dtype="float32")
    save_model(tmp_path / "deq", cfg, tensors)
    assert "quantization" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    cfg2, again = load_model(tmp_path / "deq")
    assert cfg2 == cfg and all(np.array_equal(again[k], tensors[k]) for k in tensors)
    np.testing.assert_array_equal(compute_logits(tmp_path / "deq", TOKENS, "numpy"),
                                  compute_logits(models["q4g64"], TOKENS, "numpy"))
    _, bf16 = load_dequantized(models["q4g64"], dtype="bfloat16")
    assert {t.dtype.name for t in bf16.values()} == {"bfloat16"}
    _, plain = load_dequantized(models["f32"])  # an ordinary model reads as load_model reads it
    assert all(np.array_equal(plain[k], v) for k, v in load_model(models["f32"])[1].items())


def test_inspect_summary(models):
    assert quantization_summary(models["f32"]) is None and quantization_lines(None) == []
    for name, bits, group_size in [("q4g64", 4, 64), ("q4g32", 4, 32)]:
        s = quantization_summary(models[name])
        assert (s["bits"], s["group_size"]) == (bits, group_size)
        # the matrices mlx-lm quantizes (linear maps, emb, head, parameter keys and values) whose
        # width is a multiple of the group size: the output map (width d_att 96) only at 32
        matrices = [n for n in param_shapes(CFG) if n.endswith((".weight", "param_keys", "param_values"))
                    and ".ln" not in n and "ln_out" not in n and not n.startswith("blocks.0.ln0")]
        want = [n for n in matrices if param_shapes(CFG)[n][-1] % group_size == 0]
        assert list(s["tensors"]) == want
        V, d = CFG.vocab_size, CFG.d_model
        head_bytes = V * d * bits // 8 + 2 * 4 * V * d // group_size  # codes, float32 scales and biases
        assert s["tensors"]["head.weight"] == {"shape": [V, d], "bytes": head_bytes}
        assert s["float32_bytes"] == sum(4 * np.prod(param_shapes(CFG)[n]) for n in want)
        assert s["dtypes"] == {"uint32": len(want), "float32": len(param_shapes(CFG)) + len(want)}
        lines = quantization_lines(s)
        assert lines[0].startswith(f"quantized  {bits}-bit MLX affine, group size {group_size}: {len(want)} matrices")
        assert any("blocks.*.att.key.weight" in line and "x2" in line for line in lines)
        assert any("blocks.*.att.output.weight" in line for line in lines) == (group_size == 32)


# -- hostile quantized directories --------------------------------------------------------------

def _damaged(models, tmp_path, edit_tensors=None, edit_config=None, source="q4g64"):
    mx = mlx()
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(models[source], bad)
    if edit_tensors is not None:
        arrays, meta = mx.load(str(bad / "model.safetensors"), return_metadata=True)
        edit_tensors(arrays)
        mx.save_safetensors(str(bad / "model.safetensors"), arrays, metadata=meta)
    if edit_config is not None:
        config = json.loads((bad / "config.json").read_text())
        edit_config(config)
        (bad / "config.json").write_text(json.dumps(config))
    return bad


def _trim(arrays):
    arrays["head.weight"] = arrays["head.weight"][:, :-1]


HOSTILE = {
    "wrong packed shape": (dict(edit_tensors=_trim),
                           "packed tensor 'head.weight' has shape [150, 7], expected [150, 8]"),
    "scales missing": (dict(edit_tensors=lambda a: a.pop("blocks.1.meta.param_keys_scales")),
                       "packed tensor 'blocks.1.meta.param_keys' has no 'blocks.1.meta.param_keys_scales'"),
    "biases of the wrong dtype": (dict(edit_tensors=lambda a: a.update({"emb.biases": a["emb.biases"].astype(
        a["emb.weight"].dtype)})), "'emb.biases' is U32 [150, 1], expected a float tensor"),
    "bits 3": (dict(edit_config=lambda c: c["quantization"].update(bits=3)), "'quantization' must be"),
    "bits 8 for 4-bit codes": (dict(edit_config=lambda c: c["quantization"].update(bits=8)),
                               "expected [150, 16] ([150, 64] at 8 bits)"),
    "group size 64.0": (dict(edit_config=lambda c: c["quantization"].update(group_size=64.0)),
                        "'quantization' must be"),
    "a stray tensor": (dict(edit_tensors=lambda a: a.update({"blocks.0.att.w0.scales": a["emb.scales"]})),
                       "unexpected tensor 'blocks.0.att.w0.scales'"),
    "NaN scale": (dict(edit_tensors=lambda a: a.update({"head.scales": a["head.scales"] * float("nan")})),
                  "has non-finite values"),  # numpy, torch: 'head.weight'; mlx: 'head.scales'
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_quantized_files_give_one_error_line(models, tmp_path, capsys, case):
    edits, message = HOSTILE[case]
    bad = _damaged(models, tmp_path, **edits)
    for backend in ["numpy", "torch", "mlx"]:
        rc = main(["logits", "--model", str(bad), "--tokens", "1,2", "--backend", backend,
                   "--out", str(tmp_path / "x.npy")])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (backend, err)
        assert message in lines[0], (backend, lines[0])
    assert not (tmp_path / "x.npy").exists()


def test_a_packed_tensor_in_an_ordinary_model_is_refused(models, tmp_path, capsys):
    """U32 is read only for a quantized model: without "quantization" in config.json the
    reader refuses it, in one line, as before (here a float32 tensor's bytes relabelled)."""
    mx = mlx()
    bad = _damaged(models, tmp_path, source="f32",
                   edit_tensors=lambda a: a.update({"blocks.1.att.w1": a["blocks.1.att.w1"].view(mx.uint32)}))
    with pytest.raises(WeightsError, match="tensor 'blocks.1.att.w1' has unsupported dtype 'U32'"):
        load_model(bad)
    rc = main(["logits", "--model", str(bad), "--tokens", "1", "--backend", "numpy", "--out", str(tmp_path / "x.npy")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "unsupported dtype 'U32' (supported: F32, BF16, F16)" in lines[0]
    with pytest.raises(WeightsError, match="unsupported dtype 'U32'"):
        st.read_file(bad / "model.safetensors")


# -- the command line: inspect, convert --------------------------------------------------------

def test_inspect_shows_the_quantization(models, capsys):
    assert main(["inspect", str(models["q4g32"])]) == 0
    out = capsys.readouterr().out
    assert "quantized  4-bit MLX affine, group size 32" in out and "blocks.*.att.output.weight" in out
    assert "uint32 (" in out.split("dtypes", 1)[1].splitlines()[0]
    assert main(["inspect", str(models["q8g64"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    s = info["quantization"]
    assert (s["bits"], s["group_size"]) == (8, 64) and "blocks.1.att.output.weight" not in s["tensors"]
    assert info["param_tokens"]["value_bytes"]["per_layer"] == 128 * 64 + 2 * 4 * 128  # codes, scales, biases
    assert info["parameters"]["total"] == sum(int(np.prod(s)) for s in param_shapes(CFG).values())


def test_convert_dequantizes_into_an_ordinary_model(models, tmp_path, capsys):
    out = tmp_path / "deq"
    assert main(["convert", str(models["q4g64"]), "--out", str(out), "--dtype", "float32"]) == 0
    assert "[model directory, float32]" in capsys.readouterr().out
    cfg, tensors = load_model(out)
    _, want = load_dequantized(models["q4g64"])
    assert "quantization" not in cfg.extra and all(np.array_equal(tensors[k], want[k]) for k in want)
    assert main(["convert", str(models["q4g64"]), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert {t.dtype.name for t in load_model(tmp_path / "bf16")[1].values()} == {"bfloat16"}
