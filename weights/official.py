"""Official RWKV-7 (x070) `.pth` checkpoints <-> canonical tensors (SPEC section 4).

The mapping is 1:1: `[1,1,C]` vectors are squeezed, the channel mix becomes the Meta-State
layer (`ffn.x_k -> meta.x_k`, `ffn.key.weight -> meta.param_keys`, `ffn.value.weight^T ->
meta.param_values`, `sse_gate = 0`), and the unused `blocks.0.att.v0/v1/v2` are dropped.
PyTorch is optional: it is imported only here, and only when called.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from metastate_core.config import ModelConfig, official_lora_size, LORA_FACTORS
from metastate_core.constants import LN_X_EPS
from metastate_core.errors import require_extra
from metastate_core.errors import MetaStateError
from metastate_core.params import param_shapes

from .files import WeightsError, check_memory, open_regular
from .format import atomic_write, np_dtype, validate_tensors

# Official vectors stored as [1, 1, C] (RWKV-LM x070 nn.Parameter shapes).
_VECTORS_3D = {"att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g",
               "att.w0", "att.a0", "att.v0", "att.k_k", "att.k_a", "ffn.x_k"}
_META_TO_FFN = {"meta.x_k": "ffn.x_k", "meta.param_keys": "ffn.key.weight", "meta.param_values": "ffn.value.weight"}
_FFN_TO_META = {v: k for k, v in _META_TO_FFN.items()}
_LAYER0_UNUSED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def _torch():
    require_extra("torch", "torch", "an official .pth checkpoint")  # exit 2, naming the extra
    import torch

    return torch


def _official_name(name: str) -> str:
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in _META_TO_FFN:
        return f"blocks.{m.group(1)}.{_META_TO_FFN[m.group(2)]}"
    return name


def _to_numpy(torch, name: str, t) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np_dtype("bfloat16"))
    if t.dtype in (torch.float32, torch.float16):
        return t.numpy()
    if t.dtype == torch.float64:
        return t.numpy().astype(np.float32)
    raise WeightsError(f"tensor {name!r} has dtype {t.dtype}; an RWKV-7 checkpoint holds floating-point weights")


def _from_numpy(torch, t: np.ndarray):
    t = np.ascontiguousarray(t)
    if t.dtype.name == "bfloat16":
        return torch.from_numpy(t.view(np.int16)).view(torch.bfloat16)
    if t.dtype == np.float64:
        t = t.astype(np.float32)
    return torch.from_numpy(t)


def _shape(sd: dict, name: str, ndim: int) -> tuple[int, ...]:
    if name not in sd:
        raise WeightsError(f"not an RWKV-7 checkpoint: tensor {name!r} is missing")
    if sd[name].ndim != ndim:
        raise WeightsError(f"tensor {name!r} has shape {list(sd[name].shape)}, expected {ndim} dimensions")
    return sd[name].shape


def infer_config(sd: dict[str, np.ndarray]) -> ModelConfig:
    """The ModelConfig of an official RWKV-7 state dict, from its tensor shapes."""
    V, d = _shape(sd, "emb.weight", 2)
    layers = {int(m.group(1)) for m in map(_BLOCK.fullmatch, sd) if m}
    if not layers:
        raise WeightsError("not an RWKV-7 checkpoint: it has no 'blocks.*' tensors")
    L = max(layers) + 1
    H, N = _shape(sd, "blocks.0.att.r_k", 2)
    if L > 1:
        lora_v = _shape(sd, "blocks.1.att.v1", 2)[1]
    elif "blocks.0.att.v1" in sd:
        lora_v = _shape(sd, "blocks.0.att.v1", 2)[1]
    else:
        lora_v = official_lora_size(d, LORA_FACTORS["lora_v"])
    try:
        return ModelConfig(
            vocab_size=V, d_model=d, n_layer=L, head_size=N,
            d_att=_shape(sd, "blocks.0.att.receptance.weight", 2)[0],
            lora_w=_shape(sd, "blocks.0.att.w1", 2)[1], lora_a=_shape(sd, "blocks.0.att.a1", 2)[1],
            lora_v=lora_v, lora_g=_shape(sd, "blocks.0.att.g1", 2)[1],
            n_param_tokens=_shape(sd, "blocks.0.ffn.key.weight", 2)[0],
            sse_heads=min(H, d // N))
    except MetaStateError as e:
        raise WeightsError(f"checkpoint shapes do not describe a valid model: {e}") from e


def from_official(sd: dict[str, np.ndarray]) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Map an official state dict (numpy arrays) to (cfg, canonical tensors)."""
    cfg = infer_config(sd)
    shapes = param_shapes(cfg)
    known = {_official_name(n) for n in shapes} | set(_LAYER0_UNUSED)
    unknown = [n for n in sd if n not in known]
    if unknown:
        raise WeightsError(f"unknown tensors in RWKV-7 checkpoint: {', '.join(map(repr, unknown[:8]))}"
                           + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    out = {}
    for name, shape in shapes.items():
        if name.endswith("meta.sse_gate"):
            out[name] = np.zeros(shape, sd["emb.weight"].dtype)  # exact RWKV-7
            continue
        src = _official_name(name)
        if src not in sd:
            raise WeightsError(f"not an RWKV-7 checkpoint: tensor {src!r} is missing")
        t = sd[src]
        if t.ndim == 3 and t.shape[:2] == (1, 1) and len(shape) == 1:
            t = t[0, 0]
        if name.endswith("meta.param_values"):
            t = np.ascontiguousarray(t.T)
        out[name] = t
    validate_tensors(cfg, out)
    return cfg, out


def official_runtime_caveats(cfg: ModelConfig) -> list[str]:
    """Why the official `rwkv` runtime would not compute this model's logits exactly, if it would not."""
    notes = []
    if cfg.d_att != cfg.d_model:
        notes.append(f"d_att {cfg.d_att} != d_model {cfg.d_model} (grown heads): the `rwkv` pip runtime sizes its "
                     "state as d_model // head_size heads and cannot run this file (RWKV-LM's trainer, with "
                     "dim_att, can)")
    if cfg.ln_x_eps != LN_X_EPS:
        notes.append(f"ln_x_eps {cfg.ln_x_eps:g}: the official runtime's GroupNorm epsilon is {LN_X_EPS:g}, so its "
                     "logits differ slightly from ours (the model predates the ln_x_eps field: head_size * 1e-5)")
    return notes


def to_official(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical tensors -> official state dict (numpy), official shapes and key order."""
    if cfg.product:
        raise WeightsError("cannot export to the official RWKV-7 format: it has no product-key parameter tokens "
                           "(this model has param_mode 'product')")
    validate_tensors(cfg, tensors)
    for i in range(cfg.n_layer):
        if np.any(np.asarray(tensors[f"blocks.{i}.meta.sse_gate"], np.float32) != 0):
            raise WeightsError(f"cannot export to the official RWKV-7 format: blocks.{i}.meta.sse_gate is non-zero "
                               "and the official runtime has no Self-State Encoder")
    out = {}
    for name in param_shapes(cfg):
        t = tensors[name]
        if name.endswith("meta.sse_gate"):
            continue
        src = _official_name(name)
        m = _BLOCK.fullmatch(src)
        if m and m.group(2) in _VECTORS_3D:
            t = t.reshape(1, 1, -1)
        if src.endswith("ffn.value.weight"):
            t = np.ascontiguousarray(t.T)
        out[src] = t
        if src == "blocks.0.att.a2":
            # Official files carry layer 0's v-LoRA although the runtime ignores it: emit zeros.
            dt, A, r = t.dtype, cfg.d_att, cfg.lora_v
            out.update({"blocks.0.att.v0": np.zeros((1, 1, A), dt), "blocks.0.att.v1": np.zeros((cfg.d_model, r), dt),
                        "blocks.0.att.v2": np.zeros((r, A), dt)})
    return out


def import_official_pth(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read an official RWKV-7 `.pth` (never unpickling arbitrary objects) as (cfg, tensors).

    Tensors keep their stored dtype (bfloat16 -> ml_dtypes.bfloat16, float16); float64 -> float32.
    The config has no tokenizer; sse_gate is zero, so the model is exactly the RWKV-7 one.
    """
    torch = _torch()
    path = Path(path)
    with open_regular(path, "checkpoint"):  # not a FIFO, a device or a directory
        pass
    try:  # mapped, not read: nothing is materialised before the checks below
        zipped = zipfile.is_zipfile(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's notes on sparse tensors
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        with zipfile.ZipFile(path) if zipped else nullcontext() as z:  # torch does not check their CRC-32s
            bad = z and z.testzip()
    except Exception as e:  # torch raises many types here: UnpicklingError, RuntimeError, EOFError, ...
        raise WeightsError(f"cannot read {path} as a PyTorch checkpoint of plain tensors: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if bad:
        raise WeightsError(f"{path}: checksum mismatch in {bad}: the file is corrupted")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise WeightsError(f"{path} is not an RWKV-7 checkpoint: expected a dict of tensor names to tensors")
    for name, t in sd.items():
        _check_dense(torch, name, t)
    check_memory(sum(t.numel() * t.element_size() for t in sd.values()), f"importing {path}")
    return from_official({k: _to_numpy(torch, k, v) for k, v in sd.items()})


def _check_dense(torch, name: str, t) -> None:
    """Refuse what could cost more memory than the file holds: a sparse tensor, or a view whose
    elements overlap in its storage (`torch.zeros(1).expand(2**20, 2**20)`: 4 bytes stored,
    4 TiB once materialised)."""
    if t.layout != torch.strided:
        raise WeightsError(f"tensor {name!r} is stored as {str(t.layout).removeprefix('torch.')}; an RWKV-7 "
                           "checkpoint holds dense tensors")
    extent = 1  # elements spanned by the dimensions taken so far, smallest stride first
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride < extent:
            raise WeightsError(f"tensor {name!r} (shape {list(t.shape)}, strides {list(t.stride())}) overlaps "
                               "itself in its storage: not a dense tensor")
        extent += stride * (size - 1)
    if t.numel() and (t.storage_offset() + extent) * t.element_size() > t.untyped_storage().nbytes():
        raise WeightsError(f"tensor {name!r} runs past the end of its storage")


def export_official_pth(cfg: ModelConfig, tensors: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write an official RWKV-7 `.pth` (atomically). Only exact RWKV-7 models: every sse_gate zero."""
    official = to_official(cfg, tensors)  # its refusals before the missing-torch one
    torch = _torch()
    sd = {name: _from_numpy(torch, t) for name, t in official.items()}
    path = Path(os.path.realpath(path))
    try:
        atomic_write(path, lambda tmp: torch.save(sd, tmp))
    except (OSError, RuntimeError) as e:  # RuntimeError: torch's writer (e.g. a pipe it cannot seek in)
        raise WeightsError(f"cannot write {path}: {str(e).splitlines()[0] if str(e) else e}") from e
