"""Model configuration: SPEC section 1, with the validation every loader relies on."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import LN_X_EPS
from .errors import MetaStateError

FORMAT_NAME = "metastate"
FORMAT_VERSION = 1


class ConfigError(MetaStateError, ValueError):
    """A config that cannot describe a valid model."""


def official_lora_size(d_model: int, factor: float) -> int:
    """RWKV-7's rule for low-rank sizes: max(32, round(k*sqrt(d)/32)*32)."""
    return max(32, round(factor * math.sqrt(d_model) / 32) * 32)


LORA_FACTORS = {"lora_w": 2.5, "lora_a": 2.5, "lora_v": 1.7, "lora_g": 5.0}
SIZES = ("vocab_size", "d_model", "n_layer", "head_size", "d_att", *LORA_FACTORS, "n_param_tokens")
PARAM_MODES = ("dense", "product")
PRODUCT_FIELDS = ("n_sub_keys", "param_heads", "param_topk")  # product mode only (SPEC section 7)
# What defines the computation; the rest of a config (tokenizer, chat_template, ...) may be edited.
ARCHITECTURE = (*SIZES, "sse_heads", "ln_x_eps", "param_mode", *PRODUCT_FIELDS)


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int = 768
    n_layer: int = 12
    head_size: int = 64
    d_att: int | None = None
    lora_w: int | None = None
    lora_a: int | None = None
    lora_v: int | None = None
    lora_g: int | None = None
    n_param_tokens: int | None = None
    sse_heads: int | None = None
    ln_x_eps: float = LN_X_EPS          # GroupNorm epsilon; a config.json without it means head_size * 1e-5
    param_mode: str = "dense"           # "dense" (SPEC section 2) or "product" (product keys, section 7)
    n_sub_keys: int | None = None       # product: m sub-keys per half, n_param_tokens = m * m
    param_heads: int | None = None      # product: P heads, each reading its own top-k
    param_topk: int | None = None       # product: k tokens read per head
    tokenizer: dict | None = None
    growth: list = field(default_factory=list)
    # Keys this version does not model (e.g. "quantization" written by a backend): kept so
    # a load -> save round trip loses nothing.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # Fill defaults that depend on other fields (SPEC section 1), then validate. The fields
        # they are computed from are checked first: sqrt(-32) or round(inf) is no error message.
        for name in ("d_model", "head_size", "d_att"):
            value = getattr(self, name)
            if not (value is None and name == "d_att") and not _is_pos_int(value):
                raise ConfigError(f"config field {name!r} must be a positive integer below 2^31, got {value!r}")
        if self.d_att is None:
            self.d_att = self.d_model
        for name, factor in LORA_FACTORS.items():
            if getattr(self, name) is None:
                setattr(self, name, official_lora_size(self.d_model, factor))
        if self.param_mode == "product" and self.n_param_tokens is None and _is_pos_int(self.n_sub_keys):
            self.n_param_tokens = self.n_sub_keys ** 2
        if self.n_param_tokens is None:
            self.n_param_tokens = 4 * self.d_model
        if self.sse_heads is None and _is_pos_int(self.head_size) and _is_pos_int(self.d_att):
            self.sse_heads = min(self.d_att // self.head_size, self.d_model // self.head_size)
        if not isinstance(self.growth, (list, tuple)):
            raise ConfigError(f"config field 'growth' must be a list, got {type(self.growth).__name__}")
        self.growth = list(self.growth)
        self.validate()

    # -- derived sizes -------------------------------------------------------------------
    @property
    def n_head(self) -> int:
        return self.d_att // self.head_size

    @property
    def product(self) -> bool:
        """Parameter tokens read through product keys (SPEC section 7), not densely."""
        return self.param_mode == "product"

    @property
    def eps_sse(self) -> float:
        """The SSE readout's RMS-norm epsilon: N * 1e-5."""
        return self.head_size * 1e-5

    def state_bytes_per_layer(self, batch: int = 1) -> int:
        """float32 state: att_x [d], meta_x [d], S [H, N, N]."""
        return 4 * batch * (2 * self.d_model + self.n_head * self.head_size**2)

    def validate(self) -> None:
        for name in SIZES:
            value = getattr(self, name)
            if not _is_pos_int(value):
                raise ConfigError(f"config field {name!r} must be a positive integer below 2^31, got {value!r}")
        if isinstance(self.ln_x_eps, bool) or not isinstance(self.ln_x_eps, (int, float)) or \
                not 0 < self.ln_x_eps < math.inf:
            raise ConfigError(f"config field 'ln_x_eps' must be a positive number, got {self.ln_x_eps!r}")
        if not isinstance(self.sse_heads, int) or isinstance(self.sse_heads, bool) or self.sse_heads < 0:
            raise ConfigError(f"config field 'sse_heads' must be a non-negative integer, got {self.sse_heads!r}")
        if self.d_att % self.head_size:
            raise ConfigError(f"head_size {self.head_size} does not divide d_att {self.d_att}")
        limit = min(self.d_model, self.d_att)
        if self.sse_heads * self.head_size > limit:
            raise ConfigError(
                f"sse_heads * head_size = {self.sse_heads * self.head_size} exceeds "
                f"min(d_model, d_att) = {limit}")
        if self.tokenizer is not None and not isinstance(self.tokenizer, dict):
            raise ConfigError(f"config field 'tokenizer' must be an object or null, got {type(self.tokenizer).__name__}")
        tok = self.tokenizer or {}
        if "type" in tok and not isinstance(tok["type"], str):
            raise ConfigError(f"config field 'tokenizer.type' must be a string, got {tok['type']!r}")
        if "file" in tok and not is_plain_file_name(tok["file"]):
            raise ConfigError(f"config field 'tokenizer.file' must be a plain file name (beside config.json), got "
                              f"{tok['file']!r}")
        if not all(isinstance(step, dict) for step in self.growth):
            raise ConfigError("config field 'growth' must be a list of objects")
        self._validate_param_mode()

    def _validate_param_mode(self) -> None:
        if self.param_mode not in PARAM_MODES:
            raise ConfigError(f"config field 'param_mode' must be 'dense' or 'product', got {self.param_mode!r}")
        given = [name for name in PRODUCT_FIELDS if getattr(self, name) is not None]
        if self.param_mode == "dense":
            if given:
                raise ConfigError(f"config field {given[0]!r} is for param_mode 'product' only (this model is dense)")
            return
        for name in PRODUCT_FIELDS:
            if not _is_pos_int(getattr(self, name)):
                raise ConfigError(f"param_mode 'product' needs {name!r}, a positive integer below 2^31, got "
                                  f"{getattr(self, name)!r}")
        m, k = self.n_sub_keys, self.param_topk
        if self.n_param_tokens != m * m:
            raise ConfigError(f"product mode has n_param_tokens = n_sub_keys^2 = {m * m}, got {self.n_param_tokens}")
        if k > m * m:
            raise ConfigError(f"param_topk {k} exceeds the {m * m} parameter tokens (n_sub_keys^2)")
        if self.d_model % 2:
            raise ConfigError(f"product mode splits the query in two halves: d_model must be even, got {self.d_model}")

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        fields = dataclasses.asdict(self)
        extra = fields.pop("extra")
        if self.param_mode == "dense":  # product-only fields are absent from dense configs
            for name in PRODUCT_FIELDS:
                fields.pop(name)
        out.update(fields)
        out.update({k: v for k, v in extra.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        fmt = data.pop("format", FORMAT_NAME)
        if fmt != FORMAT_NAME:
            raise ConfigError(f"config format is {fmt!r}, expected {FORMAT_NAME!r}")
        version = data.pop("format_version", FORMAT_VERSION)
        if not _is_pos_int(version):
            raise ConfigError(f"format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ConfigError(
                f"format_version {version} is newer than this library supports ({FORMAT_VERSION}); "
                "upgrade metastate")
        known = {f.name for f in dataclasses.fields(cls)}
        # Extra keys (e.g. "quantization" written by a backend) are kept out of the
        # dataclass but must not make the config unreadable.
        known.discard("extra")
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        if "vocab_size" not in data:
            raise ConfigError("config is missing required field 'vocab_size'")
        if "ln_x_eps" not in data:  # written before the field existed: the epsilon it was made with
            data["ln_x_eps"] = legacy_ln_x_eps(data)
        return cls(**data, extra=extra)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def legacy_ln_x_eps(data: dict):
    """The GroupNorm epsilon of a config written before `ln_x_eps` existed: head_size * 1e-5."""
    head_size = data.get("head_size", 64)
    return head_size * 1e-5 if _is_pos_int(head_size) else None  # a bad head size is reported by itself


def is_plain_file_name(name) -> bool:
    """A file name with no directory part: what config.json may name, so that it never points
    outside its model directory."""
    return isinstance(name, str) and bool(name) and Path(name).name == name and name not in (".", "..")


def is_natural(value) -> bool:
    """An int >= 0 that is not a bool (JSON and TOML true would pass isinstance(x, int))."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_pos_int(value) -> bool:
    # below 2^31: any real size, and no float conversion of a 400-digit integer overflows
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31
