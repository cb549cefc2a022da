"""Loading, saving and 4/8-bit quantization of the MLX model (mlx-lm keeps these in its utils).

Quantization follows mlx-lm's conventions: affine, group size 64, recorded in config.json.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from metastate_core.constants import WEIGHT_DTYPES
from metastate_core.errors import ModelError
from weights.format import config_json, weights_metadata, write_directory
from weights.quantized import QUANT_BITS, QUANT_GROUP_SIZES, read_layout

from .model import MetaLayer, Model


def _quantizable(group_size: int, weights: dict | None = None):
    """class_predicate for nn.quantize: the large matrices whose input width fits the groups
    (or, when loading, exactly those stored with scales)."""
    def predicate(path: str, module) -> bool:
        if weights is not None:
            return f"{path}.scales" in weights or f"{path}.param_values_scales" in weights
        if isinstance(module, MetaLayer):
            return module.param_values.shape[-1] % group_size == 0
        return isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % group_size == 0
    return predicate


def quantize(model: Model, bits: int = 4, group_size: int = 64, *, _weights: dict | None = None) -> Model:
    """Quantize in place: receptance/key/value/output, param_keys/param_values, emb and head
    (mlx-lm quantizes embeddings and the head too). Vectors and LoRAs stay in full precision.
    A matrix whose input width is not a multiple of group_size is left unquantized."""
    if bits not in QUANT_BITS:
        raise ModelError(f"quantization bits must be {' or '.join(map(str, QUANT_BITS))}, got {bits!r}")
    if group_size not in QUANT_GROUP_SIZES:
        raise ModelError(f"quantization group_size must be {', '.join(map(str, QUANT_GROUP_SIZES))}, "
                         f"got {group_size!r}")
    if model.quantization is not None:
        raise ModelError(f"model is already quantized ({model.quantization})")
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=_quantizable(group_size, _weights))
    # a new config: the caller's ModelConfig may be shared with other models
    model.cfg = model.cfg.replace(extra={**model.cfg.extra, "quantization": {"group_size": group_size, "bits": bits}})
    return model


def load(path, kernels: str = "auto", dtype: str | None = None, layout: str = "auto"):
    """(model, tokenizer) from a model directory (config.json + safetensors), mlx-lm style.

    dtype: None keeps the stored dtype, or "float32" / "bfloat16" / "float16". A quantized
    directory ("quantization" in config.json) loads its packed weights as stored. tokenizer
    is None when config.json has `"tokenizer": null`. layout: as for `Model.set_layout`.
    """
    from metastate_core.tokenizers import load_tokenizer
    from weights import load_config, load_model

    path = Path(path)
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ModelError(f"dtype {dtype!r} is not available on the mlx backend (use {', '.join(WEIGHT_DTYPES)})")
    cfg = load_config(path)
    q = cfg.extra.get("quantization")
    if q is None:
        cfg, tensors = load_model(path, dtype=dtype)
        model = Model.from_tensors(cfg, tensors, kernels=kernels)
    else:
        if dtype is not None:
            raise ModelError("a quantized model loads as stored: leave dtype unset")
        cfg, q, files = read_layout(path)  # names, shapes, packing and file structure, before any data
        tensors = {}
        for f in files:
            tensors.update(mx.load(str(f)))
        bad = next((n for n, a in tensors.items() if a.dtype != mx.uint32 and not mx.isfinite(a).all().item()), None)
        if bad is not None:  # as weights.load_model refuses them in a float model
            raise ModelError(f"{path}: tensor {bad!r} has non-finite values (NaN or Inf)")
        model = Model(cfg.replace(extra={k: v for k, v in cfg.extra.items() if k != "quantization"}), kernels)
        quantize(model, q["bits"], q["group_size"], _weights=tensors)
        try:
            model.load_weights(list(tensors.items()), strict=True)
        except ValueError as e:
            raise ModelError(f"quantized weights do not fit the config: {e}") from e
        mx.eval(model.parameters())
        model.eval()
    model.set_layout(layout)
    return model, load_tokenizer(path, cfg.tokenizer)


def save(model: Model, path, tokenizer=None) -> None:
    """Write `model` (and the file of `tokenizer`, if given) to a model directory.

    Float models go through weights.save_model: canonical and bit-exact, so torch save ->
    MLX load -> MLX save -> torch load changes nothing. Quantized models are MLX's packed
    weights + scales + biases in model.safetensors (uint32, which the canonical writer does
    not store), with "quantization" in config.json; the directory is replaced as a whole, as
    weights.save_model replaces one (an interruption leaves the old model or the new).
    """
    path = Path(path)
    cfg = model.cfg
    tok_file = getattr(tokenizer, "path", None)
    if model.quantization is None:
        from weights import save_model

        extra = {Path(tok_file).name: tok_file} if tok_file is not None else None
        save_model(path, cfg, model.to_tensors(), extra_files=extra)
        return
    config, meta = config_json(cfg), weights_metadata(cfg)
    arrays = dict(tree_flatten(model.parameters()))

    def fill(tmp: Path) -> None:
        files = [tmp / "model.safetensors", tmp / "config.json"]
        mx.save_safetensors(str(files[0]), arrays, metadata=meta)
        files[1].write_text(config, encoding="utf-8")
        if tok_file is not None:  # read before the swap, also where it lies in `path` itself
            files.append(tmp / Path(tok_file).name)
            shutil.copyfile(tok_file, files[-1])
        for file in files:  # on disk before the swap: a crash after it must not find them empty
            with open(file, "rb") as f:
                os.fsync(f.fileno())

    write_directory(path, fill)  # built beside, swapped in whole; never over a non-model directory


def convert(src, dst, *, bits: int | None = None, group_size: int = 64, dtype: str | None = None) -> None:
    """`metastate convert SRC --out DST [--quantize 4|8]`: load, optionally cast / quantize, save."""
    model, tokenizer = load(src, kernels="ops", dtype=dtype)
    if bits is not None:
        quantize(model, bits, group_size)
    save(model, dst, tokenizer)
