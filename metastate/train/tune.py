"""Tuning a model without retraining it whole (`metastate train --tune state|lora|full`) and
`metastate merge BASE ADAPTER --out DST`.

What a run trains and what its checkpoints write is decided here, by the tune mode:

    full   every weight (the trainer as it always was); a checkpoint is a model directory
    state  the initial WKV state of every layer, S0 [L, H, N, N] float32, the model frozen; a
           checkpoint holds `state.safetensors`, a state file as `metastate.api.save_state`
           writes it (chat /load, serve --state, api.load_state read it)
    lora   rank-r adapters W + (alpha / r) B A on the time-mix maps (receptance, key, value,
           output) and the dense parameter-token matrices (param_keys, param_values), the base
           frozen; a checkpoint holds `adapter.safetensors` + `adapter.json` (rank, alpha,
           targets, the base's path and fingerprint), which `metastate merge` folds into the base

A state or lora run starts from a base model (`--init-from BASE`); its checkpoints hold only
the tuned tensors (plus the trainer state and optimizer arrays), and a resume loads the base
again from the path its checkpoint names, checked by fingerprint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metastate.train.config import TUNE_MODES, TrainError

STATE_FILE = "state.safetensors"          # a state-tuning checkpoint's state (api.save_state's format)
ADAPTER_FILE = "adapter.safetensors"      # a LoRA checkpoint's adapters
ADAPTER_META = "adapter.json"             # ... and what they belong to
ADAPTER_FORMAT = "metastate-lora"
ADAPTER_FORMAT_VERSION = 1
LORA_MAPS = ("receptance", "key", "value", "output")


class TuneError(TrainError):
    """A tuning run, adapter or merge that cannot go ahead."""


# ------------------------------------------------------------------------------------------
# What a run trains
# ------------------------------------------------------------------------------------------

def lora_targets(cfg) -> list[str]:
    """Canonical names of the matrices that get an adapter: each layer's time-mix maps and the
    dense parameter-token matrices."""
    names = []
    for i in range(cfg.n_layer):
        names += [f"blocks.{i}.att.{m}.weight" for m in LORA_MAPS]
        names += [f"blocks.{i}.meta.param_keys", f"blocks.{i}.meta.param_values"]
    return names


def lora_delta(A, B, scale: float):
    """The update an adapter adds to its matrix, (alpha / r) B A, in float32 (merge and the
    training forward compute it alike, so merged and unmerged logits agree)."""
    return scale * (B @ A)


def _lora_module():
    import torch
    from torch import nn

    class LoRA(nn.Module):
        """A weight parametrization W -> W + scale B A (B starts at zero: the base at first)."""

        def __init__(self, shape, rank: int, scale: float, device):
            super().__init__()
            out, inp = shape
            self.scale = scale
            self.lora_A = nn.Parameter(torch.empty(rank, inp, device=device, dtype=torch.float32))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) start
            self.lora_B = nn.Parameter(torch.zeros(out, rank, device=device, dtype=torch.float32))

        def forward(self, W):
            with torch.autocast(W.device.type, enabled=False):  # the update in float32 under bf16 runs too
                return W + lora_delta(self.lora_A, self.lora_B, self.scale).to(W.dtype)

    return LoRA


def _initial_state_module():
    import torch
    from torch import nn

    from backends.cuda.model import State

    class InitialState(nn.Module):
        """The model run from a learned initial WKV state S0 [L, H, N, N] (every sequence of a
        batch starts from it; att_x and meta_x start at zero, as after no token)."""

        def __init__(self, model):
            super().__init__()
            c = self.cfg = model.cfg
            self.model = model
            self.wkv = nn.Parameter(torch.zeros(c.n_layer, c.n_head, c.head_size, c.head_size,
                                                device=model.head.weight.device, dtype=torch.float32))

        def forward(self, tokens, state=None, **kw):
            B = tokens.shape[0] if tokens.dim() == 2 else 1
            L, d = self.model.cfg.n_layer, self.model.cfg.d_model
            zero = torch.zeros(L, B, d, device=self.wkv.device, dtype=torch.float32)
            S0 = self.wkv.unsqueeze(1).expand(L, B, *self.wkv.shape[1:]).contiguous()
            return self.model(tokens, State(zero, zero, S0), **kw)

    return InitialState


@dataclass
class Tuning:
    """What a run trains (params), what it runs (module: the model, or the model behind its
    learned initial state) and what a checkpoint of it writes (`write`)."""

    mode: str
    module: object                     # torch.nn.Module the loop calls (and DDP wraps)
    params: dict = field(default_factory=dict)   # saved name -> trainable parameter (state, lora)
    base: str = ""                     # the base model directory (state, lora)
    base_fingerprint: str = ""
    rank: int = 0
    alpha: float = 0.0

    def names(self) -> dict:
        """Trainable parameter -> the name its checkpoint arrays ('opt.<name>.<key>') carry."""
        if self.mode == "full":
            return {p: n for n, p in self.module.named_parameters()}
        return {p: n for n, p in self.params.items()}

    def tensors(self) -> dict[str, np.ndarray]:
        """The tuned tensors, float32, by saved name."""
        return {n: p.detach().cpu().numpy().astype(np.float32, copy=True) for n, p in self.params.items()}

    def load(self, tensors: dict[str, np.ndarray], where) -> None:
        """Set the tuned tensors from a checkpoint's (every one present, shape checked)."""
        import torch

        for name, p in self.params.items():
            t = tensors.get(name)
            if t is None or tuple(t.shape) != tuple(p.shape) or not np.isfinite(t).all():
                got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
                raise TuneError(f"corrupt tuning checkpoint {where}: {name} is {got}, expected float32 "
                                f"{list(p.shape)}, finite")
            with torch.no_grad():
                p.copy_(torch.from_numpy(np.asarray(t, np.float32)))

    def record(self) -> dict:
        """What trainer_state.json keeps of the tuning (a resume finds the base by it)."""
        return {"mode": self.mode, "base": self.base, "base_fingerprint": self.base_fingerprint,
                "rank": self.rank, "alpha": self.alpha}

    def write(self, directory: Path, tensors: dict[str, np.ndarray], model_cfg) -> None:
        """Write the tuned tensors' file(s) into a checkpoint directory being built."""
        from weights.safetensors_io import write_file

        directory = Path(directory)
        if self.mode == "state":
            from metastate.api import STATE_FORMAT, STATE_FORMAT_VERSION

            S = tensors["wkv"]
            zero = np.zeros((model_cfg.n_layer, model_cfg.d_model), np.float32)
            write_file(directory / STATE_FILE, {"att_x": zero, "meta_x": zero, "wkv": S},
                       {"format": STATE_FORMAT, "format_version": str(STATE_FORMAT_VERSION), "model": self.base,
                        "model_fingerprint": self.base_fingerprint, "backend": "torch", "n_tokens": "0",
                        "kind": "state-tuned"})
        elif self.mode == "lora":
            meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION, "rank": self.rank,
                    "alpha": self.alpha, "scale": self.alpha / self.rank,
                    "targets": sorted({n.rsplit(".", 1)[0] for n in tensors}, key=_canonical_order(model_cfg)),
                    "base": self.base, "base_fingerprint": self.base_fingerprint}
            write_file(directory / ADAPTER_FILE, tensors, {"format": ADAPTER_FORMAT})
            with open(directory / ADAPTER_META, "w", encoding="utf-8") as f:
                f.write(json.dumps(meta, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def read(self, directory: Path) -> dict[str, np.ndarray]:
        """The tuned tensors a checkpoint directory holds (by saved name)."""
        if self.mode == "state":
            from weights.safetensors_io import read_file

            tensors, meta = _read(directory / STATE_FILE, read_file)
            if meta.get("model_fingerprint") != self.base_fingerprint:
                raise TuneError(f"{directory / STATE_FILE} belongs to another base model than {self.base}")
            return {"wkv": tensors.get("wkv")}
        meta, tensors = read_adapter(directory)
        if meta["base_fingerprint"] != self.base_fingerprint:
            raise TuneError(f"{directory} holds adapters of another base model ({meta['base']}) than {self.base}")
        return tensors


def _read(path: Path, read_file):
    from weights.files import WeightsError

    try:
        return read_file(path)
    except WeightsError as e:
        raise TuneError(f"corrupt tuning checkpoint: {e}") from None


def _canonical_order(cfg):
    order = {n: i for i, n in enumerate(lora_targets(cfg))}
    return lambda n: order.get(n, len(order))


def base_fingerprint(path) -> str:
    from metastate.api import model_fingerprint
    from weights import load_config

    return model_fingerprint(path, load_config(path))


def setup(mode: str, model, *, base: str | None, rank: int = 0, alpha: float = 0.0) -> Tuning:
    """Make `model` (a backends.cuda Model, float32, on its device) train as `mode` says:
    which parameters are trainable, and what the loop runs. The model's own parameters are
    frozen for state and lora (requires_grad False)."""
    if mode == "full":
        return Tuning("full", model)
    if not base:
        raise TuneError(f"--tune {mode} trains on top of a model: give it with --init-from BASE")
    base = str(Path(base).resolve())
    for p in model.parameters():
        p.requires_grad_(False)
    fingerprint = base_fingerprint(base)
    if mode == "state":
        module = _initial_state_module()(model)
        return Tuning("state", module, {"wkv": module.wkv}, base, fingerprint)
    if mode != "lora":
        raise TuneError(f"unknown tune mode {mode!r}: expected one of {', '.join(TUNE_MODES)}")
    if model.cfg.product:
        raise TuneError("--tune lora needs dense parameter tokens: a product-mode model's value tables are "
                        "gathered by rows (tune it with --tune state or full)")
    if rank < 1:
        raise TuneError(f"--tune lora needs --lora-rank >= 1, got {rank}")
    from torch.nn.utils import parametrize

    LoRA = _lora_module()
    params = {}
    for name in lora_targets(model.cfg):
        owner_name, attr = name.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        W = getattr(owner, attr)
        lora = LoRA(tuple(W.shape), rank, alpha / rank, W.device)
        parametrize.register_parametrization(owner, attr, lora)
        params[f"{name}.lora_A"], params[f"{name}.lora_B"] = lora.lora_A, lora.lora_B
    return Tuning("lora", model, params, base, fingerprint, rank, alpha)


def resume_base(record: dict, where) -> str:
    """The base model a tuning checkpoint was trained on, found again by its path and checked by
    its fingerprint."""
    base = record.get("base") if isinstance(record, dict) else None
    if not isinstance(base, str) or not base:
        raise TuneError(f"corrupt tuning checkpoint {where}: trainer_state.json names no base model")
    if not Path(base).is_dir():
        raise TuneError(f"the base model of {where}, {base}, is gone: a tuning run resumes on its base")
    if base_fingerprint(base) != record.get("base_fingerprint"):
        raise TuneError(f"the base model {base} changed since {where} was saved (its fingerprint differs): "
                        "a tuning run resumes only on the base it started from")
    return base


def artifact(checkpoint, mode: str) -> Path | None:
    """The file (state) or directory (lora) of a checkpoint that others use."""
    if checkpoint is None or mode == "full":
        return None
    return Path(checkpoint) / STATE_FILE if mode == "state" else Path(checkpoint)


# ------------------------------------------------------------------------------------------
# Adapters and merge
# ------------------------------------------------------------------------------------------

def read_adapter(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter.json, tensors) of an adapter directory (a LoRA checkpoint) or its
    adapter.safetensors; every target's A [r, in] and B [out, r] present and finite."""
    from weights.files import WeightsError, parse_json, read_text
    from weights.safetensors_io import read_file

    path = Path(path)
    directory = path.parent if path.is_file() else path
    if not (directory / ADAPTER_META).is_file():
        raise TuneError(f"{path} is not a LoRA adapter: {directory / ADAPTER_META} is missing")
    try:
        meta = parse_json(read_text(directory / ADAPTER_META, ADAPTER_META), ADAPTER_META)
        tensors, _ = read_file(directory / ADAPTER_FILE)
    except WeightsError as e:
        raise TuneError(f"cannot read the adapter {directory}: {e}") from None
    ok = (isinstance(meta, dict) and meta.get("format") == ADAPTER_FORMAT
          and meta.get("format_version") == ADAPTER_FORMAT_VERSION and isinstance(meta.get("targets"), list)
          and isinstance(meta.get("rank"), int) and meta["rank"] >= 1
          and isinstance(meta.get("scale"), (int, float)) and math.isfinite(meta["scale"])
          and isinstance(meta.get("base_fingerprint"), str))
    if not ok:
        raise TuneError(f"{directory / ADAPTER_META} is not a metastate LoRA adapter description "
                        f"(format {ADAPTER_FORMAT!r} version {ADAPTER_FORMAT_VERSION})")
    r = meta["rank"]
    for name in meta["targets"]:
        A, B = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if A is None or B is None or A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r \
                or not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise TuneError(f"corrupt adapter {directory}: {name}'s lora_A / lora_B are missing, not rank {r} "
                            "or not finite")
    return meta, {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def merged_weights(base, weights: dict, adapter) -> dict:
    """The base model's weights (canonical names -> arrays, as read from `base`) with the
    adapter folded in: W + scale * B @ A for each target, float32. The adapter must have been
    trained on this base (its fingerprint)."""
    import torch

    meta, tensors = read_adapter(adapter)
    if base_fingerprint(base) != meta["base_fingerprint"]:
        raise TuneError(f"the adapter {adapter} was trained on another model ({meta.get('base') or 'unknown'}), "
                        f"not on {base}: merge it into that base")
    merged = dict(weights)
    for name in meta["targets"]:
        if name not in weights:
            raise TuneError(f"the adapter names {name}, which {base} does not have")
        W = torch.from_numpy(np.asarray(weights[name], np.float32))
        A, B = torch.from_numpy(tensors[f"{name}.lora_A"]), torch.from_numpy(tensors[f"{name}.lora_B"])
        if (B.shape[0], A.shape[1]) != tuple(W.shape):
            raise TuneError(f"the adapter's {name} is {B.shape[0]}x{A.shape[1]}, the base's {list(W.shape)}")
        merged[name] = (W + lora_delta(A, B, float(meta["scale"]))).numpy()
    return merged
