"""The model directory of SPEC section 4: config.json + safetensors weights (+ tokenizer files).

    DIR/config.json                    cfg.to_dict(), pretty-printed
    DIR/model.safetensors              every tensor, canonical order (param_shapes)
      or model-0000K-of-0000M.safetensors + model.safetensors.index.json (HF layout)
    DIR/<extra files>                  e.g. tokenizer.model

Each safetensors file repeats {"format": "metastate", "config": <json>} in its header metadata
and carries a CRC-32 checksum that is verified on load. Saving is atomic: the directory is
built beside the target, fsynced, then renamed (or swapped) into place.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
from pathlib import Path

import numpy as np

from metastate_core.config import ARCHITECTURE, FORMAT_NAME, ModelConfig, is_plain_file_name, legacy_ln_x_eps
from metastate_core.errors import MetaStateError
from metastate_core.params import param_shapes, shape_mismatch

from . import safetensors_io as st
from .files import (WeightsError, build_beside, clean_leftovers, fresh_temp, fsync_dir, kind_of, open_regular,
                    parse_json, read_text, release)

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# -- dtypes and validation -------------------------------------------------------------------

def dtype_name(dtype) -> str:
    """'float32' | 'bfloat16' | 'float16' for a name or NumPy dtype; WeightsError otherwise."""
    if isinstance(dtype, str) and dtype in SUPPORTED_DTYPES:
        return dtype
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in SUPPORTED_DTYPES:
        raise WeightsError(f"unsupported dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
    return name


def convert_dtype(tensors: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """A new dict with every array cast to `dtype` (no copy where it already matches).

    Raises WeightsError when a finite value overflows the target (e.g. |x| > 65504 in float16).
    """
    target = np_dtype(dtype_name(dtype))
    out = {}
    for name, t in tensors.items():
        t = np.asarray(t)
        if t.dtype == target:
            out[name] = t
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            c = t.astype(target)
        if _narrows(t.dtype, target) and not _all_finite(c) and _all_finite(t):
            raise WeightsError(f"tensor {name!r} overflows {target.name} "
                               f"(max |value| {float(np.max(np.abs(t.astype(np.float64)))):.6g})")
        out[name] = c
    return out


def validate_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    """Check names, shapes, dtypes and finiteness against `cfg`; WeightsError names the first problem.

    In memory any floating dtype passes (float64 included); saving needs SUPPORTED_DTYPES.
    """
    problem = shape_mismatch(cfg, tensors)
    if problem:
        raise WeightsError(f"{problem} for this config")
    for name, t in tensors.items():
        if not isinstance(t, np.ndarray):
            raise WeightsError(f"tensor {name!r} is a {type(t).__name__}, expected a numpy array")
        if not _is_float(t.dtype):
            raise WeightsError(f"tensor {name!r} has unsupported dtype {t.dtype}; "
                               f"supported: {', '.join(SUPPORTED_DTYPES)}")
        if not _all_finite(t):
            bad = np.argwhere(~np.isfinite(t))[0]
            raise WeightsError(f"tensor {name!r} has non-finite values (NaN or Inf), first at index "
                               f"{tuple(int(i) for i in bad)}")


def _all_finite(t: np.ndarray) -> bool:
    # One float64 reduction (NaN and Inf propagate) is cheaper than a boolean mask;
    # only when it overflows do we look element by element.
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.sum(t, dtype=np.float64)
    return bool(np.isfinite(total)) or bool(np.isfinite(t).all())


def np_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a SUPPORTED_DTYPES name (ml_dtypes, slow to import, only for bfloat16)."""
    return st.np_dtype(st.CODES[name]).newbyteorder("=")


def _is_float(d: np.dtype) -> bool:
    return np.issubdtype(d, np.floating) or d.name == "bfloat16"


def _narrows(src: np.dtype, dst: np.dtype) -> bool:
    """Can a finite value of src overflow to Inf in dst?"""
    return _is_float(src) and _max(dst) < _max(src)


def _max(d: np.dtype) -> float:
    if d.name == "bfloat16":
        import ml_dtypes

        return float(ml_dtypes.finfo(d).max)
    return float(np.finfo(d).max)


# -- reading ---------------------------------------------------------------------------------

def load_config(path: str | os.PathLike) -> ModelConfig:
    """The config of a model directory (its config.json) or of a single .safetensors file."""
    path = Path(path)
    if path.is_file() and path.suffix in (".pth", ".pt"):
        raise WeightsError(f"{path} is a PyTorch checkpoint, not a metastate model: import it with "
                           f"`metastate convert {path} --out DIR`")
    if path.is_file():
        _, meta = st.read_header(path)
        if "config" not in meta:
            raise WeightsError(f"{path} has no metastate config in its header; load its model directory")
        return _parse_config(meta["config"], f"the header config of {path}")
    _check_model_dir(path)
    file = path / CONFIG_FILE
    if not os.path.lexists(file):
        raise WeightsError(f"{path} is not a model directory: it has no {CONFIG_FILE}")
    data = parse_json(read_text(file, "model config"), str(file))
    if isinstance(data, dict) and "model_type" in data and "format" not in data:
        raise WeightsError(f"{path} is a Hugging Face model directory (model_type {data['model_type']!r}), not a "
                           f"metastate one: import it with `metastate convert {path} --out DIR`")
    return _parse_config(data, str(file))


def _parse_config(data, where: str) -> ModelConfig:
    if isinstance(data, (str, bytes)):
        data = parse_json(data, where)
    try:
        return ModelConfig.from_dict(data)
    except MetaStateError as e:  # ConfigError
        raise WeightsError(f"invalid {where}: {e}") from e
    except (TypeError, ValueError) as e:  # e.g. a field of the wrong JSON type
        raise WeightsError(f"malformed {where}: {e}") from e


def load_model(path: str | os.PathLike, *, dtype: str | None = None,
               validate: bool = True) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a model directory (or a single self-describing .safetensors file).

    dtype None keeps the stored dtypes (bfloat16 arrays are ml_dtypes.bfloat16); otherwise
    every tensor is cast. validate checks names, shapes and finiteness against the config.
    Returns (cfg, tensors) with tensors in canonical order when validated.
    """
    target = None if dtype is None else dtype_name(dtype)
    path = Path(path)
    cfg = load_config(path)
    quantized = cfg.extra.get("quantization")
    if quantized:
        bits = quantized.get("bits", "?") if isinstance(quantized, dict) else "?"
        raise WeightsError(f"{path} holds {bits}-bit MLX-quantized weights: weights.quantized.load_dequantized "
                           f"reads them, or write a float copy with `metastate convert {path} --out DIR --dtype float32`")
    if path.is_file():
        if validate:
            _check_sizes(cfg, [path], f"the header config of {path}")
        tensors, _ = st.read_file(path, _expect(cfg, path) if validate else None)
    else:
        tensors = _read_weights(path, cfg, validate)
    if validate:
        validate_tensors(cfg, tensors)
        tensors = {name: tensors[name] for name in param_shapes(cfg)}
    if target is not None:
        tensors = convert_dtype(tensors, target)
    return cfg, tensors


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise WeightsError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise WeightsError(f"{path} is neither a model directory nor a .safetensors file")


def _check_saved_config(cfg: ModelConfig, meta: dict[str, str], file: Path) -> None:
    """config.json against the config a weight file was saved with (its header's): shapes catch
    most edits, but not sse_heads, and config.json has no checksum."""
    if "config" not in meta:  # not written by metastate
        return
    saved = parse_json(meta["config"], f"config in the header of {file}")
    # fields a file may predate: dense parameter tokens, and the GroupNorm epsilon it was made with
    defaults = {"param_mode": "dense", "ln_x_eps": legacy_ln_x_eps(saved) if isinstance(saved, dict) else None}
    changed = [k for k in ARCHITECTURE
               if isinstance(saved, dict) and saved.get(k, defaults.get(k)) != getattr(cfg, k)]
    if changed:
        k = changed[0]
        was = saved.get(k, defaults.get(k))
        raise WeightsError(f"{file.parent / CONFIG_FILE} says {k} = {getattr(cfg, k)!r}, but the weights were saved "
                           f"with {k} = {was!r}: the config was edited or damaged (grow a model with "
                           "`metastate grow`)")


def _read_weights(path: Path, cfg: ModelConfig, validate: bool) -> dict[str, np.ndarray]:
    single, index = path / WEIGHTS_FILE, path / INDEX_FILE
    if os.path.lexists(single) and os.path.lexists(index):
        raise WeightsError(f"{path} holds both {WEIGHTS_FILE} and {INDEX_FILE}; remove the stale one")
    if not os.path.lexists(index):
        if not os.path.lexists(single):
            raise WeightsError(f"{path} has no weights: neither {WEIGHTS_FILE} nor {INDEX_FILE}")
        files, weight_map, total = {WEIGHTS_FILE: single}, None, None
    else:
        weight_map, total = _read_index(path, index)
        files = {shard: _inside(path, shard) for shard in dict.fromkeys(weight_map.values())}
        for shard, file in files.items():
            if not os.path.lexists(file):
                raise WeightsError(f"shard {shard!r} listed in {INDEX_FILE} is missing from {path}")
    if validate:
        _check_sizes(cfg, list(files.values()), str(path / CONFIG_FILE))
    tensors: dict[str, np.ndarray] = {}
    for shard, file in files.items():
        expect = _expect(cfg, file) if validate else None

        def check(entries, meta, shard=shard, file=file, expect=expect):
            _check_saved_config(cfg, meta, file)  # before the shapes: it says what was edited
            stray = [n for n in entries if weight_map is not None and weight_map.get(n) != shard]
            if stray:
                raise WeightsError(f"tensor {stray[0]!r} found in shard {shard!r} but {INDEX_FILE} maps it to "
                                   f"{weight_map.get(stray[0])!r}")
            if expect is not None:
                expect(entries, meta)

        tensors.update(st.read_file(file, check)[0])
    absent = [n for n in weight_map or () if n not in tensors]
    if absent:
        raise WeightsError(f"tensor {absent[0]!r} listed in {INDEX_FILE} is not in shard {weight_map[absent[0]]!r}")
    nbytes = sum(t.nbytes for t in tensors.values())
    if total is not None and total != nbytes:
        raise WeightsError(f"{INDEX_FILE} metadata.total_size is {total}, but the shards hold {nbytes} bytes")
    return tensors


def n_params(cfg: ModelConfig) -> int:
    """The number of parameters of a model, from its sizes alone (cheap for any n_layer)."""
    one, two = (sum(math.prod(s) for s in param_shapes(cfg.replace(n_layer=n)).values()) for n in (1, 2))
    return one + (cfg.n_layer - 1) * (two - one)  # blocks 1.. are alike; block 0 lacks v0/v1/v2


def _check_sizes(cfg: ModelConfig, files: list[Path], where: str) -> None:
    """Weight files too small for the config (2 bytes a parameter at least) are refused from
    their sizes: a forged config must not make the reader build or read a giant model."""
    stored = 0
    for file in files:
        with open_regular(file, "weight file") as f:
            stored += os.fstat(f.fileno()).st_size
    n = n_params(cfg)
    if 2 * n > stored:
        raise WeightsError(f"{where} describes a model of {n:,} parameters, but its weight files hold {stored:,} "
                           "bytes: the config or the weights are damaged")


def _expect(cfg: ModelConfig, file: Path):
    """A read_file check: the file's tensors must be tensors of cfg, with their shapes."""
    shapes = param_shapes(cfg)

    def check(entries, meta):
        for name, e in entries.items():
            if name not in shapes:
                raise WeightsError(f"{file}: unexpected tensor {name!r} for this config")
            if tuple(e["shape"]) != shapes[name]:
                raise WeightsError(f"{file}: tensor {name!r} has shape {e['shape']}, expected {list(shapes[name])} "
                                   "for this config")
    return check


def _read_index(path: Path, index: Path) -> tuple[dict[str, str], int | None]:
    data = parse_json(read_text(index, "shard index"), str(index))
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not (isinstance(weight_map, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise WeightsError(f"malformed {index}: 'weight_map' must map tensor names to file names")
    meta = data.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    if total is not None and not (isinstance(total, int) and not isinstance(total, bool)):
        raise WeightsError(f"malformed {index}: metadata.total_size must be an integer")
    for shard in dict.fromkeys(weight_map.values()):
        _inside(path, shard)  # reject escapes before touching any file
    return weight_map, total


def _inside(root: Path, name: str) -> Path:
    """root/name, refusing names that resolve outside root (absolute, '..', escaping symlinks)."""
    if not name or os.path.isabs(name) or "\0" in name:
        raise WeightsError(f"{INDEX_FILE} names shard {name!r} outside the model directory {root}")
    file, real_root = Path(os.path.realpath(root / name)), Path(os.path.realpath(root))  # loops stay unresolved
    if not file.is_relative_to(real_root) or file == real_root:
        raise WeightsError(f"{INDEX_FILE} names shard {name!r} outside the model directory {root}")
    return file


# -- writing ---------------------------------------------------------------------------------

def _shard_name(k: int, m: int) -> str:
    return f"model-{k:05d}-of-{m:05d}.safetensors"


def _reserved(name: str) -> bool:
    return name in (CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE) or (
        name.startswith("model-") and name.endswith(".safetensors"))


def config_json(cfg: ModelConfig) -> str:
    """config.json's text; ValueError if a value is NaN or infinite (that would not be JSON)."""
    return json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def weights_metadata(cfg: ModelConfig) -> dict[str, str]:
    """The safetensors header metadata of every weight file: the format's name and the config."""
    return {"format": FORMAT_NAME, "config": json.dumps(cfg.to_dict(), separators=(",", ":"))}


def save_model(path: str | os.PathLike, cfg: ModelConfig, tensors: dict[str, np.ndarray], *,
               dtype: str | None = None, max_shard_bytes: int = 2 * 1024**3,
               extra_files: dict[str, str | os.PathLike | bytes] | None = None) -> None:
    """Write a model directory atomically: an interruption leaves the old model or none, never half.

    tensors: canonical names -> arrays (param_shapes(cfg)). dtype None keeps each tensor's
    dtype (which must then be float32, bfloat16 or float16). Above max_shard_bytes of
    weights the model is split into shards. extra_files: file name -> source path or bytes.
    An existing model directory at `path` is replaced as a whole.
    """
    target = None if dtype is None else dtype_name(dtype)
    validate_tensors(cfg, tensors)
    if target is None:
        for name in param_shapes(cfg):
            if tensors[name].dtype.name not in SUPPORTED_DTYPES:
                raise WeightsError(f"tensor {name!r} has dtype {tensors[name].dtype}, which the weight format "
                                   f"cannot store; pass dtype= one of {', '.join(SUPPORTED_DTYPES)}")
    if not (isinstance(max_shard_bytes, int) and max_shard_bytes > 0):
        raise WeightsError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    extra = dict(extra_files or {})
    for name in extra:
        if not is_plain_file_name(name) or _reserved(name):
            raise WeightsError(f"invalid extra file name {name!r}: use a plain file name that is not "
                               "config.json or a weight file")

    try:
        config_json(cfg)
    except ValueError as e:
        raise WeightsError(f"cannot save a config holding NaN or infinity: {e}") from None

    write_directory(path, lambda tmp: _write_model(tmp, cfg, tensors, target, max_shard_bytes, extra))


def write_directory(path: str | os.PathLike, fill) -> None:
    """Build a model folder with fill(tmp) beside `path`, then swap it in whole (section 4.6):
    an interruption leaves the old folder or the new one. Refuses what check_destination does."""
    path = Path(os.path.realpath(path))
    check_destination(path)
    build_beside(path, fill, lambda e: WeightsError(f"cannot save model to {path}: {e}"))


def check_destination(path: Path) -> None:
    """Refuse to save a model where it would replace a file or a directory that is not a
    metastate model (WeightsError)."""
    if path.exists() and not path.is_dir():
        raise WeightsError(f"cannot save model to {path}: it exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not _is_model_dir(path):
        raise WeightsError(f"refusing to replace {path}: it is a non-empty directory and not a metastate model "
                           f"directory (its {CONFIG_FILE} is missing or not a metastate config)")


def _is_model_dir(path: Path) -> bool:
    """What save_model may replace as a whole: a directory whose config.json says "format":
    "metastate" (every one this library writes does). Loading also takes a hand-written config
    without it, but replacing a directory on that guess could destroy another project's model
    (a Hugging Face config.json also has a vocab_size). A Hugging Face directory this library
    exported (`metastate convert --to-hf`) names its source config under "metastate_config"."""
    try:
        data = parse_json(read_text(path / CONFIG_FILE), CONFIG_FILE)
    except WeightsError:
        return False
    return isinstance(data, dict) and (data.get("format") == FORMAT_NAME or
                                       isinstance(data.get("metastate_config"), dict))


def _write_model(tmp: Path, cfg, tensors, target, max_shard_bytes, extra) -> None:
    names = list(param_shapes(cfg))
    itemsize = {n: ITEMSIZE[target] if target else tensors[n].dtype.itemsize for n in names}
    shards, size = [[]], 0  # greedy in canonical order; an oversized tensor gets its own shard
    for n in names:
        nbytes = tensors[n].size * itemsize[n]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    text = config_json(cfg)
    meta = weights_metadata(cfg)
    files = [WEIGHTS_FILE] if len(shards) == 1 else [_shard_name(k + 1, len(shards)) for k in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        part = {n: tensors[n] for n in shard}
        if target:
            part = convert_dtype(part, target)
        st.write_file(tmp / file, part, meta)
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.nbytes for t in part.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_bytes(tmp / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
    _write_bytes(tmp / CONFIG_FILE, text.encode("utf-8"))
    for name, source in extra.items():
        if isinstance(source, (bytes, bytearray, memoryview)):
            _write_bytes(tmp / name, bytes(source))
        else:
            try:
                with open(source, "rb") as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
            except FileNotFoundError:
                raise WeightsError(f"extra file {name!r}: source {source} does not exist") from None


def _write_bytes(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write) -> None:
    """Replace the file at `path` by what write(tmp) writes to a temp path beside it (same
    suffix: some writers add theirs), fsynced: a reader sees the old file or the new, never half
    of one. The file gets the mode a plain open() would (mkstemp's is owner-only). A symlink
    is followed; a FIFO or character device (/dev/null) is written to as it is, never replaced;
    any other special file is refused. OSError on failure, with no temp file left."""
    path = Path(os.path.realpath(path))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        write(str(path))
        return
    if not stat.S_ISREG(mode):
        raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL, f"it is {kind_of(mode)}", str(path))
    clean_leftovers(path)
    # os.open's mode, which the umask trims as for open(), not mkstemp's owner-only one
    tmp, held = fresh_temp(path, path.suffix,
                           lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        release(held)
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
