"""MLX-quantized model directories, read in plain NumPy (no MLX needed).

`metastate convert SRC --out DST --quantize 4|8` (backends/mlx/utils.py) writes the large
matrices as `mx.quantize` leaves them (affine mode), and records
`"quantization": {"group_size": g, "bits": b}` in config.json as mlx-lm does. A matrix
W [..., n] is stored as

    packed  uint32 [..., n * b / 32]   32 / b codes per word, the first in the lowest bits
    scales  [..., n / g]               the model's float dtype
    biases  [..., n / g]

and W[..., j] = scales[..., j // g] * q[..., j] + biases[..., j // g]. The names follow MLX's
modules: "X.weight" beside "X.scales" / "X.biases" (nn.QuantizedLinear / QuantizedEmbedding:
receptance, key, value, output, emb, head), and "blocks.i.meta.param_keys" beside
"..._scales" / "..._biases" (MetaLayer.to_quantized). Every other tensor is stored as usual.

`load_dequantized` gives the numpy and torch backends (and `convert`, `inspect`) an ordinary
float model from such a directory, one tensor at a time; the MLX backend reads it as stored.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from metastate_core.config import ModelConfig
from metastate_core.params import param_shapes

from . import safetensors_io as st
from .files import WeightsError, check_memory
from .format import (CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, _check_saved_config, _inside, _read_index, convert_dtype,
                     load_config, validate_tensors)

QUANT_BITS = (4, 8)             # what mx.quantize packs whole codes of into a uint32 (32 / bits per word)
QUANT_GROUP_SIZES = (32, 64, 128)  # the group sizes mx.quantize offers
PACKED_CODE = "U32"
QUANTIZED_CODES = (*st.FLOAT_CODES, PACKED_CODE)


# -- the scheme --------------------------------------------------------------------------------

def quantization(cfg: ModelConfig) -> dict | None:
    """config.json's "quantization" entry, checked: {"group_size", "bits"} (mode "affine" if
    given), or None for an ordinary model. WeightsError on anything else (e.g. bits 3)."""
    q = cfg.extra.get("quantization")
    if q is None:
        return None
    if not (isinstance(q, dict) and type(q.get("bits")) is int and q["bits"] in QUANT_BITS  # 4.0 is not a width
            and type(q.get("group_size")) is int and q["group_size"] in QUANT_GROUP_SIZES
            and q.get("mode", "affine") == "affine"):
        sizes, bits = (" | ".join(map(str, v)) for v in (QUANT_GROUP_SIZES, QUANT_BITS))
        raise WeightsError(f"config.json 'quantization' must be {{'group_size': {sizes}, 'bits': {bits}}} "
                           f"(MLX affine), got {q!r}")
    return {"group_size": q["group_size"], "bits": q["bits"]}


def float_config(cfg: ModelConfig) -> ModelConfig:
    """The config of the dequantized model: `cfg` without "quantization"."""
    return cfg.replace(extra={k: v for k, v in cfg.extra.items() if k != "quantization"})


def aux_names(name: str) -> tuple[str, str]:
    """(scales, biases) names beside the packed matrix `name`, as MLX's modules call them."""
    if name.endswith(".weight"):
        stem = name[: -len("weight")]
        return stem + "scales", stem + "biases"
    return name + "_scales", name + "_biases"


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [..., m] -> the codes uint8 [..., m * 32 / bits], in mx.quantize's order: code i
    of a word sits in its bits [i * bits, (i + 1) * bits)."""
    if bits not in QUANT_BITS:
        raise WeightsError(f"quantization bits must be {' or '.join(map(str, QUANT_BITS))}, got {bits!r}")
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    codes = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(*packed.shape[:-1], packed.shape[-1] * (32 // bits))


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """W float32 [..., n] of a packed matrix: scales * q + biases per group, in float32 (one
    rounding for the product, one for the sum): mx.dequantize bit for bit when the scales are
    float32. bfloat16 / float16 scales are widened first (mx.dequantize would round to them)."""
    q = unpack(packed, bits).reshape(*scales.shape, group_size)
    w = q * scales.astype(np.float32)[..., None]  # uint8 * float32 -> float32
    w += biases.astype(np.float32)[..., None]
    return w.reshape(*packed.shape[:-1], -1)


# -- a directory ---------------------------------------------------------------------------------

def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: model.safetensors, or the shards its index names."""
    single, index = path / WEIGHTS_FILE, path / INDEX_FILE
    if os.path.lexists(single) and os.path.lexists(index):
        raise WeightsError(f"{path} holds both {WEIGHTS_FILE} and {INDEX_FILE}; remove the stale one")
    if os.path.lexists(index):
        weight_map, _ = _read_index(path, index)
        return [_inside(path, shard) for shard in dict.fromkeys(weight_map.values())]
    if not os.path.lexists(single):
        raise WeightsError(f"{path} has no weights: neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    return [single]


def read_layout(path: str | os.PathLike) -> tuple[ModelConfig, dict, dict[Path, dict]]:
    """Check a quantized directory from config.json and the file headers alone, before any data
    is read: (config, its quantization, {file: {name: header entry}}). Every tensor of the
    config must be there, either as stored normally or packed with its scales and biases, at
    the shapes the config and the quantization give; nothing else may be. WeightsError (one
    line) names the first problem."""
    path = Path(path)
    cfg = load_config(path)
    q = quantization(cfg)
    if q is None:
        raise WeightsError(f"{path} is not quantized: its {CONFIG_FILE} has no 'quantization'")
    if path.is_file():
        raise WeightsError(f"{path}: a quantized model is read from its model directory")
    fcfg = float_config(cfg)
    shapes = param_shapes(fcfg)
    files, entries = {}, {}
    for file in weight_files(path):
        head, meta = st.read_header(file, QUANTIZED_CODES)
        _check_saved_config(fcfg, meta, file)
        files[file] = head
        for name, e in head.items():
            if name in entries:
                raise WeightsError(f"tensor {name!r} is stored twice ({file.name} and another shard)")
            entries[name] = e
    g, bits = q["group_size"], q["bits"]
    aux = {}
    for name, shape in shapes.items():
        e = entries.get(name)
        if e is None:
            raise WeightsError(f"{path}: tensor {name!r} is missing")
        if e["dtype"] != PACKED_CODE:
            if tuple(e["shape"]) != shape:
                raise WeightsError(f"{path}: tensor {name!r} has shape {e['shape']}, expected {list(shape)} "
                                   "for this config")
            continue
        n = shape[-1]
        if n % g:
            raise WeightsError(f"{path}: tensor {name!r} is packed, but its width {n} is not a multiple of the "
                               f"group size {g}")
        packed = [*shape[:-1], n * bits // 32]
        if e["shape"] != packed:
            raise WeightsError(f"{path}: packed tensor {name!r} has shape {e['shape']}, expected {packed} "
                               f"({list(shape)} at {bits} bits)")
        for a in aux_names(name):
            ea = entries.get(a)
            if ea is None:
                raise WeightsError(f"{path}: packed tensor {name!r} has no {a!r} beside it")
            if ea["dtype"] not in st.FLOAT_CODES or ea["shape"] != [*shape[:-1], n // g]:
                raise WeightsError(f"{path}: {a!r} is {ea['dtype']} {ea['shape']}, expected a float tensor of "
                                   f"shape {[*shape[:-1], n // g]} (group size {g})")
            aux[a] = name
    stray = [name for name in entries if name not in shapes and name not in aux]
    if stray:
        raise WeightsError(f"{path}: unexpected tensor {stray[0]!r} for this config")
    return cfg, q, files


def load_dequantized(path: str | os.PathLike, *, dtype: str | None = None
                     ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, tensors) of any model directory with its quantized matrices dequantized.

    An ordinary model is read as `weights.load_model` reads it (dtype None keeps the stored
    dtypes). An MLX-quantized one gives the config without "quantization" and every tensor in
    float32 (dtype None) or cast to `dtype`, in canonical order, checked as load_model checks
    (names, shapes, finite values). Files are read one at a time and each matrix is
    dequantized as soon as its file is in, so memory peaks near the float model plus one file.
    """
    from .format import load_model

    path = Path(path)
    cfg = load_config(path)
    if cfg.extra.get("quantization") is None:
        return load_model(path, dtype=dtype)
    cfg, q, files = read_layout(path)
    fcfg = float_config(cfg)
    shapes = param_shapes(fcfg)
    check_memory(4 * sum(math.prod(s) for s in shapes.values()), f"dequantizing {path} to float32")
    tensors: dict[str, np.ndarray] = {}
    for file, head in files.items():
        stored, _ = st.read_file(file, None, QUANTIZED_CODES)
        for name in [n for n in head if n in shapes]:
            t = stored.pop(name)
            if t.dtype == np.uint32:
                t = dequantize(t, *(stored.pop(a) for a in aux_names(name)), q["group_size"], q["bits"])
            tensors[name] = t.astype(np.float32, copy=False)
        del stored
    tensors = {name: tensors[name] for name in shapes}
    validate_tensors(fcfg, tensors)  # a NaN scale shows here, by name
    return fcfg, tensors if dtype is None else convert_dtype(tensors, dtype)


# -- inspect -------------------------------------------------------------------------------------

def quantization_summary(path: str | os.PathLike) -> dict | None:
    """What `metastate inspect` shows of a quantized model (None for an ordinary one), from the
    headers alone: bits, group size, the packed matrices with their bytes on disk (codes +
    scales + biases), what they would take in float32, and the dtypes on disk."""
    path = Path(path)
    if path.is_file() or load_config(path).extra.get("quantization") is None:
        return None
    cfg, q, files = read_layout(path)
    entries = {name: e for head in files.values() for name, e in head.items()}
    shapes = param_shapes(float_config(cfg))

    def nbytes(name):
        a, b = entries[name]["data_offsets"]
        return b - a

    packed = {name: {"shape": list(shapes[name]),
                     "bytes": nbytes(name) + sum(nbytes(a) for a in aux_names(name))}
              for name in shapes if entries[name]["dtype"] == PACKED_CODE}
    dtypes: dict[str, int] = {}
    for e in entries.values():
        code = st.np_dtype(e["dtype"]).name
        dtypes[code] = dtypes.get(code, 0) + 1
    values = [packed.get(n, {}).get("bytes", nbytes(n)) for n in shapes if n.endswith("meta.param_values")]
    return {"bits": q["bits"], "group_size": q["group_size"], "mode": "affine",
            "tensors": packed,
            "bytes": sum(t["bytes"] for t in packed.values()),
            "float32_bytes": sum(4 * math.prod(t["shape"]) for t in packed.values()),
            "other_bytes": sum(nbytes(n) for n in shapes if n not in packed),
            "value_bytes": {"per_layer": values[0] if values else 0, "total": sum(values)},
            "dtypes": dtypes}


def quantization_lines(summary: dict | None) -> list[str]:
    """`inspect`'s lines for a quantization_summary (none for an ordinary model): the scheme and
    sizes, then the packed matrices, one line per name with the layer number folded."""
    if not summary:
        return []
    s = summary
    lines = [f"quantized  {s['bits']}-bit MLX affine, group size {s['group_size']}: {len(s['tensors'])} matrices, "
             f"{s['bytes']:,} bytes on disk with scales and biases ({s['float32_bytes']:,} as float32); "
             f"other tensors {s['other_bytes']:,} bytes"]
    folded: dict[str, list[int]] = {}
    for name, t in s["tensors"].items():
        key = re.sub(r"^blocks\.\d+\.", "blocks.*.", name)
        n, b = folded.get(key, (0, 0))
        folded[key] = [n + 1, b + t["bytes"]]
    for key, (n, b) in folded.items():
        lines.append(f"  {key:<34} x{n:<4} {b:>14,} bytes")
    return lines
