"""A run's settings (TrainConfig), checked for type and range before anything runs, and the
precision they compute in. No torch at import: `metastate prepare-data` reads the defaults."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from metastate_core.config import ConfigError, ModelConfig
from metastate_core.errors import MetaStateError
from weights import SUPPORTED_DTYPES
from weights.files import WeightsError, check_depth, read_text

PRECISIONS = ("auto", "float32", "bf16", "fp16")
TUNE_MODES = ("full", "state", "lora")  # what a run trains: metastate/train/tune.py


class TrainError(MetaStateError):
    """A training configuration or checkpoint that cannot be used."""


@dataclass
class TrainConfig:
    """Every setting of a run. TOML files may group keys in tables ([model], [optim], ...)."""

    data: str = ""                      # prepared data directory (`metastate prepare-data`)
    out: str = "runs/default"
    init_from: str | None = None        # start from a model directory (e.g. grown), fresh optimizer
    resume: str | None = None           # "auto" (latest checkpoint in out, if any) or a checkpoint dir
    # model (ignored with init_from / resume: the model directory's config wins)
    d_model: int = 128
    n_layer: int = 4
    head_size: int = 32
    d_att: int | None = None
    n_param_tokens: int | None = None
    sse_heads: int | None = None
    param_mode: str = "dense"           # "product": product-key parameter tokens (SPEC section 7), with
    n_sub_keys: int | None = None       # m sub-keys per half (m*m tokens a layer),
    param_heads: int | None = None      # P heads,
    param_topk: int | None = None       # each reading its top k
    freeze_sse_gate: bool = False       # the ablation baseline: every sse_gate held at 0 (exact RWKV-7)
    # what is trained (metastate/train/tune.py): full, state (the initial WKV state) or lora (adapters)
    tune: str = "full"
    lora_rank: int = 8                  # lora: rank r of each adapter
    lora_alpha: float = 16.0            # lora: the update is (lora_alpha / r) B A
    # data and batch
    seq_len: int = 128
    batch_size: int = 16                # global: sequences per optimizer step, all ranks together
    micro_batch: int | None = None      # per rank per forward; None: batch_size / world (no accumulation)
    data_start: int = 0                 # first sample index (continue on unseen data after init_from)
    seed: int = 0
    # optimizer and schedule
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip: float = 1.0              # global gradient-norm bound; 0: no clipping
    max_bad_steps: int = 10             # stop after this many steps in a row with a non-finite loss or
                                        # gradient (each is skipped: no update)
    allow_fresh_optimizer: bool = False  # resume a checkpoint whose optimizer.npz lacks moments (fresh ones)
    # evaluation, logging, checkpoints
    eval_interval: int = 100
    eval_sequences: int = 64            # held-out windows per evaluation (the first ones, in order)
    log_interval: int = 10
    save_interval: int = 500
    keep_last: int = 2
    keep_best: bool = True
    save_dtype: str = "float32"
    progress: bool = True
    plot: bool = True                   # loss.png at the end and at most once a minute
    # hardware
    device: str = "auto"                # auto: cuda if available, else cpu
    kernels: str = "auto"               # auto: triton on cuda, ops on cpu
    chunk_size: int = 16
    precision: str = "auto"             # auto: bf16 autocast on a GPU that has bf16 (fp16 with loss
                                        # scaling on older ones), float32 on cpu
    fsdp: bool = False                  # FSDP2 (fully_shard) instead of DDP when distributed
    grad_checkpoint: bool = False       # recompute each block in backward: less activation memory
    fused_elementwise: bool = True      # with the Triton kernels: fused elementwise pieces too

    # keys that may change between a checkpoint and its resume without changing the run
    RESUME_FREE = ("out", "resume", "init_from", "progress", "plot", "eval_interval", "log_interval",
                   "save_interval", "keep_last", "keep_best", "save_dtype", "device", "kernels",
                   "micro_batch", "fsdp", "grad_checkpoint", "fused_elementwise", "max_bad_steps",
                   "allow_fresh_optimizer")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Config file values, then `overrides` (None values ignored: flags not given)."""
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:  # a regular file of UTF-8 text (a FIFO would block), nested a few levels at most
            data = tomllib.loads(read_text(path, "config file"))
            check_depth(data, f"config file {path}")
        except WeightsError as e:
            raise TrainError(str(e)) from None
        except tomllib.TOMLDecodeError as e:
            raise TrainError(f"malformed config file {path}: {e}") from None
        except RecursionError:
            raise TrainError(f"malformed config file {path}: nested too deeply") from None
        flat = {}
        for key, value in data.items():
            flat.update(value if isinstance(value, dict) else {key: value})
        flat.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(flat, where=str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainError(f"unknown key {unknown[0]!r} in {where}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The config of a new model of these settings."""
        return ModelConfig(vocab_size=vocab_size, d_model=self.d_model, n_layer=self.n_layer, head_size=self.head_size,
                           d_att=self.d_att, n_param_tokens=self.n_param_tokens, sse_heads=self.sse_heads,
                           param_mode=self.param_mode, n_sub_keys=self.n_sub_keys, param_heads=self.param_heads,
                           param_topk=self.param_topk)

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # TOML and JSON can hold any type: check each
            _check_type(f.name, str(f.type), getattr(self, f.name))
        if not self.data:
            raise TrainError("no training data: set data (a directory from `metastate prepare-data`)")
        for name in ("seq_len", "batch_size", "max_steps", "eval_sequences", "log_interval",
                     "save_interval", "keep_last", "eval_interval", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise TrainError(f"micro_batch must be a positive integer, got {self.micro_batch}")
        if self.warmup_steps < 0 or self.data_start < 0:
            raise TrainError("warmup_steps and data_start must be >= 0")
        for name in ("lr", "min_lr", "weight_decay", "adam_eps", "grad_clip", "beta1", "beta2"):
            if not math.isfinite(getattr(self, name)):  # TOML has inf and nan
                raise TrainError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not 0 <= self.seed < 2**32:  # the range numpy's and torch's generators take
            raise TrainError(f"seed must be in [0, 2^32), got {self.seed}")
        if not self.lr > 0:
            raise TrainError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise TrainError(f"min_lr must be in [0, lr], got {self.min_lr} (lr {self.lr})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise TrainError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not (self.adam_eps > 0 and self.weight_decay >= 0 and self.grad_clip >= 0):
            raise TrainError(f"adam_eps must be > 0, weight_decay and grad_clip >= 0 (0: no clipping), got "
                             f"{self.adam_eps}, {self.weight_decay}, {self.grad_clip}")
        if self.save_dtype not in SUPPORTED_DTYPES:
            raise TrainError(f"save_dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {self.save_dtype!r}")
        if not 1 <= self.chunk_size <= 64:
            raise TrainError(f"chunk_size must be in [1, 64], got {self.chunk_size}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise TrainError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.init_from and self.resume:
            raise TrainError("init_from starts a new run and resume continues one: give only one")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.init_from:  # the model settings (ignored with init_from), as the model checks them
            try:
                self.model_config(vocab_size=1)
            except ConfigError as e:
                raise TrainError(str(e)) from None
        if self.tune not in TUNE_MODES:
            raise TrainError(f"tune must be one of {', '.join(TUNE_MODES)}, got {self.tune!r}")
        if self.tune == "lora" and self.lora_rank < 1:
            raise TrainError(f"--tune lora needs --lora-rank >= 1, got {self.lora_rank}")
        if self.tune == "lora" and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise TrainError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if self.tune != "full" and not (self.init_from or self.resume):
            raise TrainError(f"--tune {self.tune} trains on top of a model: give it with --init-from BASE")
        if self.tune != "full" and self.fsdp:
            raise TrainError(f"--tune {self.tune} trains few parameters: run it with DDP (no --fsdp)")
        if self.kernels not in ("auto", "ops", "triton"):
            raise TrainError(f"kernels must be auto, ops or triton, got {self.kernels!r}")


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_type(name: str, annotation: str, value) -> None:
    """value against a field annotation such as "int", "float" or "str | None"."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    kind = next(k for k in kinds if k != "None")
    if not isinstance(value, _TYPES[kind]) or (kind != "bool" and isinstance(value, bool)):
        raise TrainError(f"{name} must be {_TYPE_WORDS[kind]}, got {value!r}")


def resolve_precision(precision: str, device) -> str:
    """The precision a run computes in ("float32", "bf16" or "fp16"). "auto": bf16 on a GPU that
    computes it natively (compute capability 8.0 and later), fp16 on older GPUs (their tensor
    cores have it; the trainer then scales the loss), float32 on the CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "float32"
    import torch

    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def amp_dtype(precision: str, device):
    """The autocast dtype of a run (a torch dtype), None for float32 throughout."""
    import torch

    return {"float32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(precision, device)]
