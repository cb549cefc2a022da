"""The model directory format (SPEC section 4): layout, interop, validation, corruption, atomicity."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import weights
import weights.safetensors_io as st
from metastate_core.config import ConfigError, ModelConfig
from metastate_core.errors import MetaStateError
from metastate_core.params import init_params, param_shapes, random_params
from weights import (SUPPORTED_DTYPES, WeightsError, convert_dtype, load_config, load_model, save_model,
                     validate_tensors)

NP = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig(vocab_size=16, d_model=32, n_layer=2, head_size=16, lora_w=4, lora_a=4, lora_v=4,
                       lora_g=8, n_param_tokens=16, tokenizer={"type": "test"})


@pytest.fixture(scope="module")
def params(cfg):
    return random_params(cfg, 0, np.float32)


def bits(t: np.ndarray) -> bytes:
    return np.ascontiguousarray(t).view(np.uint8).tobytes()


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert bits(a[k]) == bits(b[k]), k


def raw_header(file: Path) -> tuple[int, dict]:
    """Parse a safetensors header by hand (independent of the reader under test)."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n])


def write_raw(file: Path, header: dict, data: bytes, length: int | None = None):
    """A hand-made safetensors file, for malformed inputs the writer never produces."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# -- layout and round trips ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_roundtrip_and_layout(tmp_path, cfg, params, dtype):
    save_model(tmp_path / "m", cfg, params, dtype=dtype)
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "m/config.json").read_text()) == cfg.to_dict()
    n, header = raw_header(tmp_path / "m/model.safetensors")
    assert (8 + n) % 8 == 0
    meta = header.pop("__metadata__")
    assert meta["format"] == "metastate" and json.loads(meta["config"]) == cfg.to_dict()
    assert meta["checksum"].startswith("crc32:") and meta["checksum_meta"].startswith("crc32:")  # config too
    assert list(header) == list(param_shapes(cfg))  # canonical order, contiguous
    code = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    offset = 0
    for name, e in header.items():
        assert e["dtype"] == code and tuple(e["shape"]) == param_shapes(cfg)[name]
        assert e["data_offsets"][0] == offset
        offset = e["data_offsets"][1]
    cfg2, loaded = load_model(tmp_path / "m")
    assert cfg2 == cfg
    assert_same(loaded, {k: v.astype(NP[dtype]) for k, v in params.items()})


def test_load_converts_dtype(tmp_path, cfg, params):
    save_model(tmp_path / "m", cfg, params)
    _, loaded = load_model(tmp_path / "m", dtype="bfloat16")
    assert_same(loaded, {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()})
    assert_same(convert_dtype(loaded, "float32"), {k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
                                                   for k, v in params.items()})


def test_single_file_is_self_describing(tmp_path, cfg, params):
    save_model(tmp_path / "m", cfg, params)
    file = tmp_path / "m/model.safetensors"
    assert load_config(file) == cfg
    cfg2, loaded = load_model(file)
    assert cfg2 == cfg
    assert_same(loaded, params)


def test_no_file_handle_left_open(tmp_path, cfg, params):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    save_model(tmp_path / "m", cfg, params)
    before = len(os.listdir("/proc/self/fd"))
    _, loaded = load_model(tmp_path / "m")
    assert len(os.listdir("/proc/self/fd")) == before
    assert not any(isinstance(t, np.memmap) for t in loaded.values())


def test_our_files_load_with_safetensors_library(tmp_path, cfg, params):
    torch_st = pytest.importorskip("safetensors.torch")
    torch = pytest.importorskip("torch")
    for dtype in SUPPORTED_DTYPES:
        save_model(tmp_path / dtype, cfg, params, dtype=dtype)
        theirs = torch_st.load_file(tmp_path / dtype / "model.safetensors")
        assert list(theirs) == list(params) or sorted(theirs) == sorted(params)
        for k, v in params.items():
            t = theirs[k]
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            assert bits(t.numpy()) == bits(v.astype(NP[dtype])), k


def test_safetensors_library_files_load_with_ours(tmp_path, cfg, params):
    torch_st = pytest.importorskip("safetensors.torch")
    torch = pytest.importorskip("torch")
    src = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2).half(),
           "empty": torch.zeros(0, 4)}
    torch_st.save_file(src, tmp_path / "x.safetensors", metadata={"format": "pt"})
    got, meta = st.read_file(tmp_path / "x.safetensors")
    assert meta == {"format": "pt"}
    assert got["b"].dtype == np.dtype(ml_dtypes.bfloat16) and got["empty"].shape == (0, 4)
    for k, v in src.items():
        ref = v.view(torch.int16).numpy() if v.dtype == torch.bfloat16 else v.numpy()
        assert bits(got[k]) == bits(ref), k
    # A whole model written by the library (no checksum, its own order) loads as a model directory.
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch_st.save_file({k: torch.from_numpy(v) for k, v in params.items()}, d / "model.safetensors")
    cfg2, loaded = load_model(d)
    assert cfg2 == cfg
    assert_same(loaded, params)


def test_save_load_save_is_byte_identical(tmp_path, cfg, params):
    for shard in (2 * 1024**3, 3000):
        a, b = tmp_path / f"a{shard}", tmp_path / f"b{shard}"
        save_model(a, cfg, params, dtype="bfloat16", max_shard_bytes=shard, extra_files={"tokenizer.model": b"tok"})
        cfg2, loaded = load_model(a)
        save_model(b, cfg2, loaded, max_shard_bytes=shard, extra_files={"tokenizer.model": a / "tokenizer.model"})
        assert files_of(a) == files_of(b)


def test_sharding(tmp_path, cfg, params):
    limit = 3000
    save_model(tmp_path / "m", cfg, params, max_shard_bytes=limit)
    names = sorted(os.listdir(tmp_path / "m"))
    assert "model.safetensors" not in names
    index = json.loads((tmp_path / "m/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    m = len(shards)
    assert m > 2 and shards == [f"model-{k:05d}-of-{m:05d}.safetensors" for k in range(1, m + 1)]
    assert names == sorted(["config.json", "model.safetensors.index.json", *shards])
    assert list(index["weight_map"]) == list(param_shapes(cfg))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in params.values())
    for shard in shards:
        _, header = raw_header(tmp_path / "m" / shard)
        header.pop("__metadata__")
        assert set(header) == {k for k, f in index["weight_map"].items() if f == shard}
        nbytes = sum(params[k].nbytes for k in header)
        assert nbytes <= limit or len(header) == 1  # only a single oversized tensor may exceed it
    cfg2, loaded = load_model(tmp_path / "m")
    assert cfg2 == cfg
    assert_same(loaded, params)


def test_extra_files(tmp_path, cfg, params):
    src = tmp_path / "tok.model"
    src.write_bytes(b"\x00sentencepiece")
    save_model(tmp_path / "m", cfg, params, extra_files={"tokenizer.model": src, "vocab.txt": b"a b c"})
    assert (tmp_path / "m/tokenizer.model").read_bytes() == b"\x00sentencepiece"
    assert (tmp_path / "m/vocab.txt").read_bytes() == b"a b c"
    for bad in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors", "../x", "a/b", ""):
        with pytest.raises(WeightsError, match="invalid extra file name"):
            save_model(tmp_path / "n", cfg, params, extra_files={bad: b"x"})
    with pytest.raises(WeightsError, match="does not exist"):
        save_model(tmp_path / "n", cfg, params, extra_files={"tokenizer.model": tmp_path / "nope"})
    assert not (tmp_path / "n").exists()


def test_weights_error_is_metastate_error():
    assert issubclass(WeightsError, MetaStateError)
    assert set(weights.__all__) >= {"WeightsError", "save_model", "load_model", "load_config", "validate_tensors",
                                    "convert_dtype", "import_official_pth", "export_official_pth",
                                    "SUPPORTED_DTYPES"}
    assert SUPPORTED_DTYPES == ("float32", "bfloat16", "float16")


def test_format_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import weights, weights.format; "
            "assert weights.load_model")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- validation: each failure has its own message ---------------------------------------------

def test_validate_missing_unexpected_shape(cfg, params):
    validate_tensors(cfg, params)
    p = dict(params)
    del p["blocks.1.att.v0"]
    with pytest.raises(WeightsError, match=r"missing tensor 'blocks.1.att.v0'"):
        validate_tensors(cfg, p)
    p = dict(params, **{"blocks.0.att.v0": params["blocks.1.att.v0"]})
    with pytest.raises(WeightsError, match=r"unexpected tensor 'blocks.0.att.v0'"):
        validate_tensors(cfg, p)
    p = dict(params, **{"head.weight": params["head.weight"].T.copy()})
    with pytest.raises(WeightsError, match=r"tensor 'head.weight' has shape \[32, 16\], expected \[16, 32\]"):
        validate_tensors(cfg, p)
    p = dict(params, **{"head.weight": params["head.weight"].astype(np.int32)})
    with pytest.raises(WeightsError, match=r"tensor 'head.weight' has unsupported dtype int32"):
        validate_tensors(cfg, p)


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_validate_non_finite_names_tensor(cfg, params, bad, dtype):
    t = params["blocks.1.att.w1"].astype(NP[dtype])
    t[3, 2] = bad
    with pytest.raises(WeightsError, match=r"tensor 'blocks.1.att.w1' has non-finite values .* index \(3, 2\)"):
        validate_tensors(cfg, dict(params, **{"blocks.1.att.w1": t}))


def test_validate_accepts_huge_finite_values(cfg, params):
    # the fast check sums in float64: values whose sum overflows must not be flagged
    t = np.full(params["emb.weight"].shape, 1e307)
    with np.errstate(over="ignore"):
        assert not np.isfinite(t.sum())
    validate_tensors(cfg, dict(params, **{"emb.weight": t}))


def test_save_rejects_bad_input(tmp_path, cfg, params):
    p = dict(params)
    del p["ln_out.bias"]
    with pytest.raises(WeightsError, match="missing tensor 'ln_out.bias'"):
        save_model(tmp_path / "m", cfg, p)
    with pytest.raises(WeightsError, match="unsupported dtype 'int8'"):
        save_model(tmp_path / "m", cfg, params, dtype="int8")
    with pytest.raises(WeightsError, match="has dtype float64, which the weight format cannot store"):
        save_model(tmp_path / "m", cfg, {k: v.astype(np.float64) for k, v in params.items()})
    big = dict(params, **{"blocks.0.att.w0": params["blocks.0.att.w0"] * 0 + 1e5})
    with pytest.raises(WeightsError, match="tensor 'blocks.0.att.w0' overflows float16"):
        save_model(tmp_path / "m", cfg, big, dtype="float16")
    assert not (tmp_path / "m").exists() and os.listdir(tmp_path) == []


def test_convert_dtype_errors(params):
    with pytest.raises(WeightsError, match="unsupported dtype 'int8'"):
        convert_dtype(params, "int8")
    with pytest.raises(WeightsError, match="overflows float16"):
        convert_dtype({"x": np.array([1e6], np.float32)}, "float16")
    assert convert_dtype({"x": np.array([1e6], np.float32)}, "bfloat16")["x"].dtype == NP["bfloat16"]


def test_load_rejects_bad_dtype_request(tmp_path, cfg, params):
    save_model(tmp_path / "m", cfg, params)
    with pytest.raises(WeightsError, match="unsupported dtype 'int8'"):
        load_model(tmp_path / "m", dtype="int8")


def _model_with_file(tmp_path, cfg, tensors_torch, torch_st):
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch_st.save_file(tensors_torch, d / "model.safetensors")
    return d


@pytest.mark.parametrize("torch_dtype, code", [("float64", "F64"), ("int32", "I32")])
def test_load_rejects_unsupported_file_dtype(tmp_path, cfg, params, torch_dtype, code):
    torch_st = pytest.importorskip("safetensors.torch")
    torch = pytest.importorskip("torch")
    t = {k: torch.from_numpy(v) for k, v in params.items()}
    t["ln_out.weight"] = t["ln_out.weight"].to(getattr(torch, torch_dtype))
    d = _model_with_file(tmp_path, cfg, t, torch_st)
    with pytest.raises(WeightsError, match=f"tensor 'ln_out.weight' has unsupported dtype '{code}'"):
        load_model(d)


def test_load_missing_unexpected_shape(tmp_path, cfg, params):
    d = tmp_path / "m"
    save_model(d, cfg, params)
    p = {k: v for k, v in params.items() if k != "blocks.0.meta.sse_gate"}
    st.write_file(d / "model.safetensors", p)
    with pytest.raises(WeightsError, match="missing tensor 'blocks.0.meta.sse_gate'"):
        load_model(d)
    st.write_file(d / "model.safetensors", dict(params, extra=np.zeros(2, np.float32)))
    with pytest.raises(WeightsError, match="unexpected tensor 'extra'"):
        load_model(d)
    _, loaded = load_model(d, validate=False)  # validate=False returns what is there
    assert "extra" in loaded
    st.write_file(d / "model.safetensors", dict(params, **{"ln_out.bias": np.zeros(3, np.float32)}))
    with pytest.raises(WeightsError, match=r"tensor 'ln_out.bias' has shape \[3\], expected \[32\]"):
        load_model(d)
    nan = params["emb.weight"].copy()
    nan[1, 1] = np.nan
    st.write_file(d / "model.safetensors", dict(params, **{"emb.weight": nan}))
    with pytest.raises(WeightsError, match="tensor 'emb.weight' has non-finite values"):
        load_model(d)


def test_corrupted_headers(tmp_path):
    f = tmp_path / "x.safetensors"
    data = np.arange(6, dtype=np.float32).tobytes()
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    write_raw(f, ok, data)
    assert st.read_file(f)[0]["b"].tolist() == [2, 3, 4, 5]
    cases = [
        (dict(ok), data, 10**6, "header length 1000000 runs past the end of the file"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, data[:20], None, "run past the end"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [4], "data_offsets": [4, 20]}}, data, None, "'a' and 'b' overlap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}}, data, None, "gap of 4 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}}, data, None, "do not cover the buffer"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, data[:8], None, "span 8 bytes, but F32 [3] needs 12"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, data[:8], None, "invalid data_offsets"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, data[:8], None, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2]}}, data[:8], None, "needs dtype, shape and data_offsets"),
        ({"__metadata__": {"x": 1}}, b"", None, "__metadata__ must map strings to strings"),
        ([1, 2], b"", None, "header is not a JSON object"),
    ]
    for header, payload, length, message in cases:
        write_raw(f, header, payload, length)
        with pytest.raises(WeightsError, match=re.escape(message)):
            st.read_file(f)
    f.write_bytes(b"\x05\x00\x00")
    with pytest.raises(WeightsError, match="shorter than the 8-byte header length"):
        st.read_file(f)
    f.write_bytes(struct.pack("<Q", 8) + b'{"a": 1 ')
    with pytest.raises(WeightsError, match="header is not valid JSON"):
        st.read_file(f)
    f.write_bytes(struct.pack("<Q", 15) + b'{"a":{},"a":{}}')
    with pytest.raises(WeightsError, match="duplicate key 'a'"):
        st.read_file(f)


def test_checksum_detects_flipped_data(tmp_path, cfg, params):
    save_model(tmp_path / "m", cfg, params)
    f = tmp_path / "m/model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x10
    f.write_bytes(raw)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_model(tmp_path / "m")


def test_checksum_covers_the_config_and_config_json_must_match_it(tmp_path, cfg, params):
    """sse_heads changes the computation but no tensor shape: a damaged or edited value would
    load silently wrong. In a file's header the checksum covers it; config.json (no checksum) is
    held against the header of every weight file."""
    save_model(tmp_path / "m", cfg, params)
    f = tmp_path / "m/model.safetensors"
    raw = f.read_bytes()
    assert raw.count(b'\\"sse_heads\\":2') == 1
    f.write_bytes(raw.replace(b'\\"sse_heads\\":2', b'\\"sse_heads\\":0'))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_model(f)
    save_model(tmp_path / "m", cfg, params, max_shard_bytes=3000, extra_files={"tokenizer.model": b"x"})
    text = (tmp_path / "m/config.json").read_text()
    (tmp_path / "m/config.json").write_text(text.replace('"sse_heads": 2', '"sse_heads": 0'))
    with pytest.raises(WeightsError, match=r"config.json says sse_heads = 0, but the weights were saved with "
                                           r"sse_heads = 2.*metastate grow"):
        load_model(tmp_path / "m")
    edited = json.loads(text) | {"chat_template": "plain", "tokenizer": {"type": "test", "file": "tokenizer.model"}}
    (tmp_path / "m/config.json").write_text(json.dumps(edited))  # fields outside the computation may change
    assert load_model(tmp_path / "m")[0].extra["chat_template"] == "plain"


def test_files_written_before_the_metadata_checksum_still_verify(tmp_path):
    """The shipped model was written before checksum_meta existed."""
    shipped = Path(__file__).resolve().parents[1] / "weights" / "default" / "model.safetensors"
    assert "checksum_meta" not in st.read_header(shipped)[1]
    load_model(shipped.parent)
    raw = bytearray(shipped.read_bytes())
    raw[-5] ^= 0x01
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        st.read_file(tmp_path / "flipped.safetensors")


def test_malformed_config(tmp_path, cfg, params):
    d = tmp_path / "m"
    save_model(d, cfg, params)
    (d / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="malformed .*config.json: not valid JSON"):
        load_model(d)
    (d / "config.json").write_text(json.dumps(dict(cfg.to_dict(), d_model="wide")))
    with pytest.raises(WeightsError, match="invalid .*config.json: config field 'd_model' must be a positive integer"):
        load_config(d)
    for field, value in (("d_model", -32), ("d_model", 10**400), ("head_size", 1e300), ("d_att", True)):
        (d / "config.json").write_text(json.dumps(dict(cfg.to_dict(), d_att=None, lora_w=None) | {field: value}))
        with pytest.raises(WeightsError, match=f"config field '{field}' must be a positive integer below 2\\^31"):
            load_config(d)  # checked before the sizes derived from it are computed
    (d / "config.json").write_text(json.dumps(dict(cfg.to_dict(), tokenizer={"type": "test", "file": 5})))
    with pytest.raises(WeightsError, match="'tokenizer.file' must be a plain file name"):
        load_config(d)
    (d / "config.json").write_text(json.dumps(dict(cfg.to_dict(), tokenizer={"file": "../../etc/passwd"})))
    with pytest.raises(WeightsError, match="'tokenizer.file' must be a plain file name"):
        load_config(d)
    (d / "config.json").write_text(json.dumps(dict(cfg.to_dict(), growth=5)))
    with pytest.raises(WeightsError, match="invalid .*config.json: config field .growth. must be a list"):
        load_config(d)
    (d / "config.json").write_text(json.dumps(dict(cfg.to_dict(), format_version=99)))
    with pytest.raises(WeightsError, match="format_version 99 is newer than this library supports"):
        load_model(d)
    (d / "config.json").unlink()
    with pytest.raises(WeightsError, match="not a model directory: it has no config.json"):
        load_model(d)


def test_missing_paths(tmp_path, cfg, params):
    with pytest.raises(WeightsError, match="model directory .*nope does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(WeightsError, match="model directory .*nope does not exist"):
        load_config(tmp_path / "nope")
    d = tmp_path / "m"
    save_model(d, cfg, params)
    (d / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="has no weights"):
        load_model(d)


def test_index_errors(tmp_path, cfg, params):
    d = tmp_path / "m"
    save_model(d, cfg, params, max_shard_bytes=3000)
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = next(iter(index["weight_map"]))
    shard = index["weight_map"][first]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((d / shard).read_bytes())
    (d / "link.safetensors").symlink_to(outside)

    def with_map(name):
        index_file.write_text(json.dumps({"metadata": index["metadata"],
                                          "weight_map": dict(index["weight_map"], **{first: name})}))

    for escape in (str(outside), "../outside.safetensors", "link.safetensors", "a\0b.safetensors"):
        with_map(escape)
        with pytest.raises(WeightsError, match="outside the model directory"):
            load_model(d)
    (d / "link.safetensors").unlink()
    index_file.write_text(json.dumps(index))
    (d / shard).unlink()
    with pytest.raises(WeightsError, match=f"shard '{shard}' listed in model.safetensors.index.json is missing"):
        load_model(d)
    save_model(d, cfg, params, max_shard_bytes=3000)
    index_file.write_text(json.dumps(dict(index, metadata={"total_size": 5})))
    with pytest.raises(WeightsError, match="total_size is 5"):
        load_model(d)
    index_file.write_text("[")
    with pytest.raises(WeightsError, match="malformed"):
        load_model(d)
    save_model(d, cfg, params, max_shard_bytes=3000)
    second = [k for k, v in index["weight_map"].items() if v != shard][0]
    index_file.write_text(json.dumps(dict(index, weight_map=dict(index["weight_map"], **{second: shard}))))
    with pytest.raises(WeightsError, match=f"tensor '{second}' found in shard"):
        load_model(d)
    save_model(d, cfg, params, max_shard_bytes=3000)
    save_model(tmp_path / "single", cfg, params)
    os.link(tmp_path / "single/model.safetensors", d / "model.safetensors")
    with pytest.raises(WeightsError, match="holds both"):
        load_model(d)


# -- corruption fuzz -------------------------------------------------------------------------

def test_fuzz_truncation_and_bit_flips(tmp_path, cfg, params):
    """Every corrupted file either loads exactly the original tensors or raises WeightsError."""
    d = tmp_path / "m"
    save_model(d, cfg, params, dtype="bfloat16")
    f = d / "model.safetensors"
    original = f.read_bytes()
    _, reference = load_model(d)
    n = struct.unpack("<Q", original[:8])[0]
    rng = np.random.default_rng(1234)
    outcomes = {"truncate": [0, 0], "header": [0, 0], "data": [0, 0], "multi": [0, 0]}  # [loaded, raised]
    for case in range(260):
        raw = bytearray(original)
        kind = ("truncate", "header", "data", "multi")[case % 4]
        if kind == "truncate":
            raw = raw[:int(rng.integers(0, len(raw)))]
        else:
            span = {"header": (0, 8 + n), "data": (8 + n, len(raw)), "multi": (0, len(raw))}[kind]
            for _ in range(1 if kind != "multi" else int(rng.integers(2, 6))):
                raw[int(rng.integers(*span))] ^= int(rng.integers(1, 256))
        f.write_bytes(bytes(raw))
        try:
            _, got = load_model(d)
        except WeightsError:
            outcomes[kind][1] += 1
            continue
        assert_same(got, reference)
        outcomes[kind][0] += 1
    # A checksum catches every change to the data and every truncation.
    assert outcomes["truncate"][0] == 0 and outcomes["data"][0] == 0, outcomes
    assert outcomes["header"][1] > 0 and outcomes["multi"][1] > 0, outcomes


# -- atomic saves ----------------------------------------------------------------------------

def _visible(parent: Path) -> list[str]:
    return sorted(p for p in os.listdir(parent) if not p.startswith("."))


def test_interrupted_save_keeps_old_model(tmp_path, cfg, params, monkeypatch):
    d = tmp_path / "m"
    save_model(d, cfg, params, extra_files={"tokenizer.model": b"old"})
    before = files_of(d)
    real, calls = st.write_file, []

    def failing(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption after the first shard")
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "write_file", failing)
    new = {k: v + 1 for k, v in params.items()}
    with pytest.raises(KeyboardInterrupt):
        save_model(d, cfg, new, max_shard_bytes=3000)
    assert len(calls) == 2 and Path(calls[0]).parent != d  # the first shard went to a temporary folder
    assert files_of(d) == before and os.listdir(tmp_path) == ["m"]  # temporary folder removed
    _, loaded = load_model(d)
    assert_same(loaded, params)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path / "fresh", cfg, new, max_shard_bytes=3000)
    assert os.listdir(tmp_path) == ["m"]  # no half-written new model either


def no_exchange(monkeypatch) -> None:
    """No renameat2(RENAME_EXCHANGE), as on macOS: the folder swap of weights.files takes two
    renames."""
    import weights.files

    monkeypatch.setattr(weights.files, "_exchange", lambda a, b: False)


@pytest.mark.parametrize("swap", ["exchange", "two_renames"])
def test_save_replaces_model_and_refuses_other_directories(tmp_path, cfg, params, monkeypatch, swap):
    if swap == "two_renames":  # the path taken where renameat2(RENAME_EXCHANGE) is unavailable
        no_exchange(monkeypatch)
    d = tmp_path / "m"
    save_model(d, cfg, params, max_shard_bytes=3000, extra_files={"tokenizer.model": b"x"})
    new = {k: v * 2 for k, v in params.items()}
    save_model(d, cfg, new)  # a sharded model replaced by a single file: nothing stale remains
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    assert_same(load_model(d)[1], new)
    assert os.listdir(tmp_path) == ["m"]
    other = tmp_path / "docs"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(WeightsError, match="refusing to replace"):
        save_model(other, cfg, params)
    assert (other / "notes.txt").read_text() == "keep me"
    (other / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')  # another project's model
    with pytest.raises(WeightsError, match="refusing to replace .*not a metastate model directory"):
        save_model(other, cfg, params)
    assert sorted(os.listdir(other)) == ["config.json", "notes.txt"]
    os.unlink(other / "config.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsError, match="exists and is not a directory"):
        save_model(tmp_path / "file", cfg, params)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model(empty, cfg, params)
    assert_same(load_model(empty)[1], params)


def test_a_failed_second_rename_puts_the_old_model_back(tmp_path, cfg, params, monkeypatch):
    """Where the two paths cannot be exchanged in one step (macOS), the old model moves aside
    first; if the new one then cannot take its place, the old one returns."""
    no_exchange(monkeypatch)
    d = tmp_path / "m"
    save_model(d, cfg, params)
    real = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise PermissionError(13, "simulated", str(dst))
        return real(src, dst)

    monkeypatch.setattr(weights.format.os, "rename", rename)
    with pytest.raises(WeightsError, match="simulated"):
        save_model(d, cfg, {k: v * 2 for k, v in params.items()})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m"]
    assert_same(load_model(d)[1], params)


def test_atomic_write_gives_an_ordinary_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        weights.atomic_write(tmp_path / "x.bin", lambda tmp: Path(tmp).write_bytes(b"new"))
    finally:
        os.umask(old)
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o644  # mkstemp's own is 0o600
    assert os.listdir(tmp_path) == ["x.bin"]
    with pytest.raises(ZeroDivisionError):
        weights.atomic_write(tmp_path / "x.bin", lambda tmp: 1 / 0)
    assert (tmp_path / "x.bin").read_bytes() == b"new" and os.listdir(tmp_path) == ["x.bin"]


def test_a_pth_where_a_model_is_expected(tmp_path):
    (tmp_path / "m.pth").write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(WeightsError, match="is a PyTorch checkpoint, not a metastate model: .*metastate convert"):
        load_model(tmp_path / "m.pth")


_BIG_SAVE = textwrap.dedent("""
    import sys, numpy as np
    from metastate_core.config import ModelConfig
    from metastate_core.params import param_shapes
    from weights import save_model
    cfg = ModelConfig(vocab_size=65536, d_model=64, n_layer=1, head_size=16, lora_w=4, lora_a=4, lora_v=4,
                      lora_g=4, n_param_tokens=64)
    tensors = {n: np.full(s, 0.5, np.float32) for n, s in param_shapes(cfg).items()}
    save_model(sys.argv[1], cfg, tensors, max_shard_bytes=1 << 20)
""")


def test_sigkill_during_save_keeps_old_model(tmp_path, cfg, params):
    d = tmp_path / "m"
    save_model(d, cfg, params)
    before = files_of(d)
    proc = subprocess.Popen([sys.executable, "-c", _BIG_SAVE, str(d)])
    deadline, killed = time.monotonic() + 60, False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = [p for p in tmp_path.iterdir() if p.name.startswith(".m.tmp-")]
            if tmp and any(tmp[0].iterdir()):  # the save is under way: some shards written
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.001)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait()
    assert killed and proc.returncode == -signal.SIGKILL, "the save finished before it could be interrupted"
    assert files_of(d) == before
    assert _visible(tmp_path) == ["m"]  # leftovers, if any, are hidden temporary folders
    cfg2, loaded = load_model(d)
    assert cfg2 == cfg
    assert_same(loaded, params)


def test_ln_x_eps_defaults_to_the_official_value_and_older_configs_keep_theirs(tmp_path):
    # SPEC section 1: new models (and imports) use 64e-5; a config.json written before the field
    # existed means head_size * 1e-5, so the shipped model (head size 32) keeps its logits
    assert ModelConfig(vocab_size=10, d_model=64, head_size=32).ln_x_eps == 64e-5
    shipped = load_config(Path(__file__).resolve().parent.parent / "weights" / "default")
    assert "ln_x_eps" not in json.loads((Path(__file__).resolve().parent.parent / "weights" / "default" /
                                        "config.json").read_text())
    assert shipped.head_size == 32 and shipped.ln_x_eps == 32e-5
    cfg = ModelConfig(vocab_size=10, d_model=32, n_layer=1, head_size=16, ln_x_eps=1e-3)
    save_model(tmp_path / "m", cfg, init_params(cfg))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["ln_x_eps"] == 1e-3
    assert load_config(tmp_path / "m").ln_x_eps == 1e-3
    for bad in (0, -1e-5, float("nan"), float("inf"), True, "1e-5"):
        with pytest.raises(ConfigError, match="ln_x_eps"):
            ModelConfig(vocab_size=10, d_model=32, head_size=16, ln_x_eps=bad)


# -- hostile inputs (issue 22) ---------------------------------------------------------------

def _needs_root():
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")


def test_atomic_write_writes_through_special_files_and_never_replaces_them(tmp_path):
    _needs_root()
    dev = tmp_path / "nul"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a second /dev/null
    weights.atomic_write(dev, lambda tmp: Path(tmp).write_bytes(b"gone"))
    assert stat.S_ISCHR(os.lstat(dev).st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    weights.atomic_write(fifo, lambda tmp: Path(tmp).write_bytes(b"through the pipe"))
    reader.join(10)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (tmp_path / "target").write_bytes(b"old")
    (tmp_path / "link").symlink_to("target")
    weights.atomic_write(tmp_path / "link", lambda tmp: Path(tmp).write_bytes(b"new"))
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["fifo", "link", "nul", "target"]


def test_names_of_up_to_255_bytes_save(tmp_path, cfg, params):
    for n in (242, 255):
        d = tmp_path / ("m" * n)
        save_model(d, cfg, params)
        save_model(d, cfg, params)  # replaced: the swap's temporary names fit too
        assert_same(load_model(d)[1], params)
        weights.atomic_write(tmp_path / ("x" * (n - 4) + ".npy"), lambda tmp: Path(tmp).write_bytes(b"1"))
        weights.atomic_write(tmp_path / ("é" * (n // 2)), lambda tmp: Path(tmp).write_bytes(b"2"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_a_save_cleans_what_a_killed_save_left_and_restores_an_orphaned_old_model(tmp_path, cfg, params):
    d = tmp_path / "m"
    save_model(d, cfg, params)
    # killed in the middle of a save: a half-written temporary folder, and a temporary file
    (tmp_path / ".m.tmp-0123abcd").mkdir()
    (tmp_path / ".m.tmp-0123abcd" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".x.npy.tmp-89abcdef.npy").write_bytes(b"half")
    # killed between the two renames of the fallback swap: no model at "old", the old model aside
    save_model(tmp_path / "old", cfg, params)
    os.rename(tmp_path / "old", tmp_path / ".old.old-00112233")
    save_model(tmp_path / ".old.tmp-00112233", cfg, {k: v + 1 for k, v in params.items()})
    keep = tmp_path / ".keep.tmp-notours"  # not a name we make
    keep.write_text("x")
    save_model(tmp_path / "new", cfg, params)
    assert sorted(os.listdir(tmp_path)) == [".keep.tmp-notours", "m", "new", "old"]
    assert_same(load_model(tmp_path / "old")[1], params)
    (tmp_path / ".y.tmp-44556677").write_bytes(b"half")
    weights.atomic_write(tmp_path / "z", lambda tmp: Path(tmp).write_bytes(b"z"))  # a file's save cleans too
    assert sorted(os.listdir(tmp_path)) == [".keep.tmp-notours", "m", "new", "old", "z"]


def test_a_save_in_progress_is_not_cleaned_away(tmp_path, cfg, params):
    """Another process's save holds a lock on its temporary folder: it is left alone."""
    d = tmp_path / "m"
    script = textwrap.dedent(f"""
        import json, sys, numpy as np, weights.safetensors_io as st
        from metastate_core.config import ModelConfig
        from metastate_core.params import random_params
        from weights import save_model
        real = st.write_file
        def slow(*a, **k):
            print("writing", flush=True)
            sys.stdin.readline()
            return real(*a, **k)
        st.write_file = slow
        cfg = ModelConfig.from_dict(json.loads({json.dumps(cfg.to_dict())!r}))
        save_model({str(d)!r}, cfg, random_params(cfg, 0, np.float32))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        save_model(tmp_path / "other", cfg, params)
        assert [p for p in os.listdir(tmp_path) if p.startswith(".m.tmp-")]  # still there
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert sorted(os.listdir(tmp_path)) == ["m", "other"]


def test_header_dtype_of_the_wrong_json_type(tmp_path):
    f = tmp_path / "x.safetensors"
    for dtype in (["F32"], {"F32": 1}, 5, None):
        write_raw(f, {"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
        with pytest.raises(WeightsError, match="unsupported dtype"):
            st.read_file(f)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [100_000, 200])
def test_deeply_nested_json_is_refused_in_one_line(tmp_path, cfg, params, depth):
    d = tmp_path / "m"
    save_model(d, cfg, params, max_shard_bytes=3000)
    config = (d / "config.json").read_text()
    (d / "config.json").write_text(config.replace('"growth": []', f'"growth": [], "notes": {_nested(depth)}'))
    with pytest.raises(WeightsError, match="nested too deeply"):
        load_config(d)
    (d / "config.json").write_text(config)
    (d / "model.safetensors.index.json").write_text(f'{{"metadata": {_nested(depth)}, "weight_map": {{}}}}')
    with pytest.raises(WeightsError, match="nested too deeply"):
        load_model(d)


def test_nan_and_infinity_are_not_json(tmp_path, cfg, params):
    d = tmp_path / "m"
    save_model(d, cfg, params)
    config = (d / "config.json").read_text()
    for bad in ("NaN", "-Infinity", "1e999"):
        (d / "config.json").write_text(config.replace('"growth": []', f'"growth": [], "train_ctx_len": {bad}'))
        with pytest.raises(WeightsError, match="config.json.*not .*JSON"):
            load_config(d)


def _sparse_model(d: Path, cfg, params, extra_bytes: int, checksum=False):
    """A model directory whose weight file declares `extra_bytes` more of tensor data than the
    config needs, stored as a hole: a small file on disk, a large one to a reader."""
    save_model(d, cfg, params)
    f = d / "model.safetensors"
    st.write_file(f, params, {"format": "metastate", "config": json.dumps(cfg.to_dict())}, checksum=checksum)
    n, header = raw_header(f)
    size = f.stat().st_size - 8 - n
    header["extra"] = {"dtype": "F32", "shape": [extra_bytes // 4], "data_offsets": [size, size + extra_bytes]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = f.read_bytes()[8 + n:]
    with open(f, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw + data)
        out.truncate(8 + len(raw) + len(data) + extra_bytes)


LIMITED = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from weights import WeightsError, load_model
    try:
        load_model(sys.argv[1])
    except WeightsError as e:
        print(e)
""")


def _load_limited(d: Path) -> subprocess.CompletedProcess:
    """load_model(d) in a child that may use 1 GiB of address space."""
    return subprocess.run([sys.executable, "-c", LIMITED, str(d)], capture_output=True, text=True, timeout=120)


def test_a_small_file_declaring_gigabytes_is_refused_before_its_data_is_read(tmp_path, cfg, params):
    d = tmp_path / "m"
    _sparse_model(d, cfg, params, 3 << 30)
    assert os.stat(d / "model.safetensors").st_blocks * 512 < 1 << 20  # a hole, not data
    run = _load_limited(d)
    assert run.returncode == 0 and "unexpected tensor 'extra'" in run.stdout, run.stdout + run.stderr
    # a config.json describing an enormous model next to small weights: refused from the sizes alone
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, n_layer=2**31 - 1)))
    start = time.monotonic()
    run = _load_limited(d)
    assert run.returncode == 0 and "config.json" in run.stdout, run.stdout + run.stderr
    assert time.monotonic() - start < 30


def test_tensors_are_read_one_at_a_time_after_the_names_are_checked(tmp_path, cfg, params, monkeypatch):
    d = tmp_path / "m"
    save_model(d, cfg, params)
    sizes = []
    real = np.empty

    def empty(shape, *a, **k):
        sizes.append(int(np.prod(shape)))
        return real(shape, *a, **k)

    monkeypatch.setattr(np, "empty", empty)
    _, loaded = load_model(d)
    monkeypatch.undo()
    assert_same(loaded, params)
    assert max(sizes) == max(t.nbytes for t in params.values())  # no buffer for the whole file


def test_fifos_and_devices_are_not_opened_as_model_files(tmp_path, cfg, params):
    """A FIFO would block a reader forever: only regular files are opened. (The child process
    and its timeout keep a regression from hanging the test run.)"""
    code = textwrap.dedent("""
        import sys
        from weights import WeightsError, load_model
        try:
            load_model(sys.argv[1])
        except WeightsError as e:
            print(e)
    """)
    for name in ("config.json", "model.safetensors"):
        d = tmp_path / name.split(".")[0]
        save_model(d, cfg, params)
        os.unlink(d / name)
        os.mkfifo(d / name)
        run = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=60)
        assert f"{name} is a FIFO, not a regular file" in run.stdout, run.stdout + run.stderr
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(WeightsError, match="is a directory"):
        st.read_file(tmp_path / "dir.safetensors")


def test_importing_weights_leaves_ml_dtypes_for_bfloat16(tmp_path, cfg, params):
    code = ("import sys, weights, numpy as np; from weights import load_model; "
            "load_model(sys.argv[1]); print('ml_dtypes' in sys.modules)")
    save_model(tmp_path / "f32", cfg, params)
    save_model(tmp_path / "bf16", cfg, params, dtype="bfloat16")
    for name, imported in (("f32", "False"), ("bf16", "True")):
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], capture_output=True, text=True,
                             timeout=60)
        assert run.stdout.strip() == imported, run.stdout + run.stderr


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_cgroup_memory_limit_counts_as_available_memory(tmp_path, version):
    """A container's --memory limit, which /proc/meminfo does not show: limit less usage, read
    where /proc/self/cgroup points, else at the hierarchy's root; no limit is None."""
    from weights.files import _cgroup_free

    names = {"v2": ("", "memory.max", "memory.current", "max"),
             "v1": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", str(2**63 - 4096))}
    controllers, limit, usage, unlimited = names[version]
    mount = tmp_path / "sys"
    folder = mount / ("memory" if version == "v1" else "") / "box"
    folder.mkdir(parents=True)
    cgroup = tmp_path / "cgroup"
    cgroup.write_text(f"5:cpu:/box\n0:{controllers}:/box\n" if version == "v1" else f"0:{controllers}:/box\n")
    (folder / limit).write_text("1000000\n")
    (folder / usage).write_text("250000\n")
    assert _cgroup_free(cgroup, mount) == 750000
    (folder / limit).write_text(unlimited + "\n")
    assert _cgroup_free(cgroup, mount) is None
    cgroup.write_text(f"0:{controllers}:/elsewhere\n")  # a container sees its own group at the root
    (folder.parent / limit).write_text("4000\n")
    (folder.parent / usage).write_text("1000\n")
    assert _cgroup_free(cgroup, mount) == 3000
    assert _cgroup_free(tmp_path / "missing", mount) is None
