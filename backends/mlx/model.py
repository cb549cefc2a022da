"""The Meta-State model in MLX: SPEC section 2 token by token, section 3 over a prompt.

One self-contained file in the style of mlx-lm's models/rwkv7.py. The parameter tree flattens
(`mlx.utils.tree_flatten`) to the canonical names of SPEC section 4. Dtypes: weights float32,
bfloat16 or float16 (or 4/8-bit quantized large matrices); matmuls run in the weight dtype,
everything else (residual stream, norms, gates, SSE) in float32, and the WKV state and decay
are float32 always (mlx-lm's rwkv7 keeps its state in the weight dtype; we do not).

The WKV recurrence is dispatched through `WKVOps` (backends/mlx/wkv.py): `kernels="ops"` is
plain MLX ops (any device, Linux CPU included), `"metal"` the Metal kernels of
`backends.mlx.kernels`, `"auto"` Metal when `mx.metal.is_available()` and the kernels import.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from metastate_core.config import ModelConfig
from metastate_core.errors import MetaStateError
from metastate_core.params import param_shapes
from weights import atomic_write
from weights.format import check_destination

from .wkv import WKVOps, resolve_kernels, wkv

ModelArgs = ModelConfig  # the config dataclass of SPEC section 1
LN_EPS = 1e-5
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
F32 = mx.float32


class ModelError(MetaStateError):
    """Weights that do not fit the config, or a request the MLX model cannot serve."""


# ------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------

def _wdtype(layer) -> mx.Dtype:
    """The compute dtype of a (possibly quantized) linear layer."""
    return layer["scales"].dtype if "scales" in layer else layer["weight"].dtype


def _linear(x, layer):
    """x @ W^T in the weight dtype, result float32."""
    return layer(x.astype(_wdtype(layer))).astype(F32)


def _mm(x, w):
    """x @ w (a LoRA factor stored [in, out]) in the weight dtype, result float32."""
    return (x.astype(w.dtype) @ w).astype(F32)


def _shift(x, prev):
    """Token shift: the previous token's value at each position. x [B, T, d], prev [B, d]."""
    return mx.concatenate([prev[:, None], x[:, :-1]], axis=1)


class LayerNorm(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.weight, self.bias = mx.ones((dims,)), mx.zeros((dims,))

    def __call__(self, x):
        return mx.fast.layer_norm(x.astype(F32), self.weight.astype(F32), self.bias.astype(F32), LN_EPS)


def group_norm(y, weight, bias, eps):
    """y [B, T, H, N] normalised per head, affine over H*N -> [B, T, H*N] float32."""
    mu = y.mean(-1, keepdims=True)
    var = mx.square(y - mu).mean(-1, keepdims=True)
    y = (y - mu) * mx.rsqrt(var + eps)
    return y.reshape(*y.shape[:-2], -1) * weight.astype(F32) + bias.astype(F32)


class TimeMix(nn.Module):
    """Exact RWKV-7 time mix (`blocks.i.att`)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        d, A, H, N = args.d_model, args.d_att, args.n_head, args.head_size
        self.layer, self.n_head, self.head_size, self.eps = layer, H, N, args.eps_group_norm
        for c in "rwkvag":
            setattr(self, f"x_{c}", mx.zeros((d,)))
        self.w0, self.w1, self.w2 = mx.zeros((A,)), mx.zeros((d, args.lora_w)), mx.zeros((args.lora_w, A))
        self.a0, self.a1, self.a2 = mx.zeros((A,)), mx.zeros((d, args.lora_a)), mx.zeros((args.lora_a, A))
        if layer > 0:
            self.v0, self.v1, self.v2 = mx.zeros((A,)), mx.zeros((d, args.lora_v)), mx.zeros((args.lora_v, A))
        self.g1, self.g2 = mx.zeros((d, args.lora_g)), mx.zeros((args.lora_g, A))
        self.k_k, self.k_a, self.r_k = mx.zeros((A,)), mx.zeros((A,)), mx.zeros((H, N))
        self.receptance = nn.Linear(d, A, bias=False)
        self.key = nn.Linear(d, A, bias=False)
        self.value = nn.Linear(d, A, bias=False)
        self.output = nn.Linear(A, d, bias=False)
        self.ln_x = LayerNorm(A)  # holds ln_x.{weight,bias}; applied per head by group_norm

    def __call__(self, xa, prev, S, v_first, ops: WKVOps):
        """xa [B, T, d] (ln1 output), prev [B, d], S [B, H, N, N] float32.

        Returns (out [B, T, d], S_T, v_first [B, T, d_att], read) with read(q [B, T, K, N]) -> S_t q_t.
        """
        B, T, _ = xa.shape
        f = lambda name: self[name].astype(F32)  # noqa: E731
        dx = _shift(xa, prev) - xa
        xr, xw, xk, xv, xa_, xg = (xa + dx * f(f"x_{c}") for c in "rwkvag")
        r, k, v = _linear(xr, self.receptance), _linear(xk, self.key), _linear(xv, self.value)
        w_raw = f("w0") + _mm(mx.tanh(_mm(xw, self.w1)), self.w2)
        a = mx.sigmoid(f("a0") + _mm(_mm(xa_, self.a1), self.a2))
        g = _mm(mx.sigmoid(_mm(xg, self.g1)), self.g2)
        kk = (k * f("k_k")).reshape(B, T, self.n_head, self.head_size)
        kk = kk / mx.maximum(mx.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
        k = k * (1 + (a - 1) * f("k_a"))
        if self.layer == 0:
            v_first = v
        else:
            v = v + (v_first - v) * mx.sigmoid(f("v0") + _mm(_mm(xv, self.v1), self.v2))
        shape = (B, T, self.n_head, self.head_size)
        r, w_raw, k, v, a = (t.reshape(shape) for t in (r, w_raw, k, v, a))
        y, S, read = wkv(ops, r, w_raw, k, v, kk, a, S)
        y = group_norm(y, self.ln_x.weight, self.ln_x.bias, self.eps)
        y = y + ((r * k * f("r_k")).sum(-1, keepdims=True) * v).reshape(B, T, -1)  # bonus
        return _linear(y * g, self.output), S, v_first, read


class MetaState(nn.Module):
    """The Meta-State layer (`blocks.i.meta`): Self-State Encoder + token-parameter layer.

    param_keys / param_values are plain arrays (canonical names); once quantized they are the
    packed uint32 matrices with `<name>_scales` and `<name>_biases` beside them.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, n = args.d_model, args.n_param_tokens
        self.sse_heads, self.head_size, self.eps = args.sse_heads, args.head_size, args.eps_group_norm
        self.x_k, self.sse_gate = mx.zeros((d,)), mx.zeros((d,))
        self.param_keys, self.param_values = mx.zeros((n, d)), mx.zeros((n, d))
        self.group_size = self.bits = None

    def matmul(self, x, name: str, transpose: bool):
        """x @ W^T (transpose) or x @ W for W = self.<name> [n, d], in the weight dtype -> float32."""
        w = self[name]
        if name + "_scales" in self:
            s, b = self[name + "_scales"], self[name + "_biases"]
            y = mx.quantized_matmul(x.astype(s.dtype), w, s, b, transpose=transpose,
                                    group_size=self.group_size, bits=self.bits)
        else:
            y = x.astype(w.dtype) @ (w.T if transpose else w)
        return y.astype(F32)

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine", **_):
        if mode != "affine":
            raise ModelError(f"quantization mode {mode!r} is not supported (affine only)")
        for name in ("param_keys", "param_values"):
            q, s, b = mx.quantize(self[name], group_size=group_size, bits=bits)
            self[name], self[name + "_scales"], self[name + "_biases"] = q, s, b
        self.group_size, self.bits = group_size, bits
        return self

    def __call__(self, xm, prev, read):
        """xm [B, T, d] (ln2 output), prev [B, d], read(q [B, T, K, N]) -> S_t q_t."""
        B, T, _ = xm.shape
        xs = xm + (_shift(xm, prev) - xm) * self.x_k.astype(F32)
        u, KN = xs, self.sse_heads * self.head_size
        if KN:  # the state after each token, read with xs as the query
            z = read(xs[..., :KN].reshape(B, T, self.sse_heads, self.head_size))
            z = z * mx.rsqrt(mx.square(z).mean(-1, keepdims=True) + self.eps)
            u = xs[..., :KN] + self.sse_gate[:KN].astype(F32) * z.reshape(B, T, KN)
            u = mx.concatenate([u, xs[..., KN:]], axis=-1)
        alpha = mx.square(nn.relu(self.matmul(u, "param_keys", transpose=True)))
        return self.matmul(alpha, "param_values", transpose=False)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        if layer == 0:
            self.ln0 = LayerNorm(args.d_model)
        self.ln1, self.ln2 = LayerNorm(args.d_model), LayerNorm(args.d_model)
        self.att = TimeMix(args, layer)
        self.meta = MetaState(args)

    def __call__(self, x, cache: "Cache", layer: int, v_first, ops: WKVOps):
        xa = self.ln1(x)
        h, cache.wkv[layer], v_first, read = self.att(xa, cache.att_x[layer], cache.wkv[layer], v_first, ops)
        cache.att_x[layer] = xa[:, -1]
        x = x + h
        xm = self.ln2(x)
        x = x + self.meta(xm, cache.meta_x[layer], read)
        cache.meta_x[layer] = xm[:, -1]
        return x, v_first


class Cache:
    """Recurrent state of a batch, per layer, float32; `Model.__call__` updates it in place.

    att_x[l] [B, d] (previous ln1 output), meta_x[l] [B, d] (previous ln2 output),
    wkv[l] [B, H, N, N] (S, row = value index). Zeros until the first call fixes B.
    """

    def __init__(self, args: ModelArgs):
        self.args = args
        L = args.n_layer
        self.att_x, self.meta_x, self.wkv = [None] * L, [None] * L, [None] * L

    def _init(self, batch: int):
        a = self.args
        d, H, N = a.d_model, a.n_head, a.head_size
        for l in range(a.n_layer):
            if self.wkv[l] is None:
                self.att_x[l], self.meta_x[l] = mx.zeros((batch, d), F32), mx.zeros((batch, d), F32)
                self.wkv[l] = mx.zeros((batch, H, N, N), F32)

    @property
    def state(self) -> list:
        """Every array of the cache (for mx.eval)."""
        return [t for t in self.att_x + self.meta_x + self.wkv if t is not None]


class Model(nn.Module):
    def __init__(self, args: ModelArgs, kernels: str = "auto"):
        super().__init__()
        self.args = args
        self.emb = nn.Embedding(args.vocab_size, args.d_model)
        self.blocks = [Block(args, i) for i in range(args.n_layer)]
        self.ln_out = LayerNorm(args.d_model)
        self.head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        self.set_kernels(kernels)

    def set_kernels(self, kernels: str = "auto") -> None:
        self.wkv_ops = resolve_kernels(kernels, self.args.head_size)

    def make_cache(self) -> Cache:
        return Cache(self.args)

    def __call__(self, tokens, cache: Cache | None = None, last_only: bool = False):
        """tokens int [B, T] (or [T]) -> logits float32 [B, T, V]; `cache` is advanced by T tokens.
        last_only: logits of the last position only, [B, 1, V] (prefill)."""
        tokens = tokens if isinstance(tokens, mx.array) else mx.array(np.asarray(tokens, np.int32))
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ModelError(f"expected tokens [B, T] with T >= 1, got shape {tuple(tokens.shape)}")
        cache = self.make_cache() if cache is None else cache
        cache._init(tokens.shape[0])
        x = self.blocks[0].ln0(self.emb(tokens).astype(F32))
        v_first = None
        for l, block in enumerate(self.blocks):
            x, v_first = block(x, cache, l, v_first, self.wkv_ops)
        return _linear(self.ln_out(x[:, -1:] if last_only else x), self.head)

    @staticmethod
    def sanitize(weights: dict) -> dict:
        """Canonical or official-export names -> this tree: drop layer 0's unused v0/v1/v2."""
        return {k: v for k, v in weights.items() if not k.startswith(("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"))}

    @property
    def quantization(self) -> dict | None:
        return self.args.extra.get("quantization")


# ------------------------------------------------------------------------------------------
# Quantization (mlx-lm conventions: affine, group size 64, recorded in config.json)
# ------------------------------------------------------------------------------------------

def _quantizable(group_size: int, weights: dict | None = None):
    """class_predicate for nn.quantize: the large matrices whose input width fits the groups
    (or, when loading, exactly those stored with scales)."""
    def predicate(path: str, module) -> bool:
        if weights is not None:
            return f"{path}.scales" in weights or f"{path}.param_keys_scales" in weights
        if isinstance(module, MetaState):
            return module.param_keys.shape[-1] % group_size == 0
        return isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % group_size == 0
    return predicate


def quantize(model: Model, bits: int = 4, group_size: int = 64, *, _weights: dict | None = None) -> Model:
    """Quantize in place: receptance/key/value/output, param_keys/param_values, emb and head
    (mlx-lm quantizes embeddings and the head too). Vectors and LoRAs stay in full precision.
    A matrix whose input width is not a multiple of group_size is left unquantized."""
    if bits not in (4, 8):
        raise ModelError(f"quantization bits must be 4 or 8, got {bits!r}")
    if group_size not in (32, 64, 128):
        raise ModelError(f"quantization group_size must be 32, 64 or 128, got {group_size!r}")
    if model.quantization is not None:
        raise ModelError(f"model is already quantized ({model.quantization})")
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=_quantizable(group_size, _weights))
    # a new config: the caller's ModelConfig may be shared with other models
    model.args = model.args.replace(extra={**model.args.extra, "quantization": {"group_size": group_size, "bits": bits}})
    return model


# ------------------------------------------------------------------------------------------
# Loading and saving
# ------------------------------------------------------------------------------------------

def _to_mx(t: np.ndarray) -> mx.array:
    if t.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: reinterpret the bits
        return mx.array(t.view(np.uint16)).view(mx.bfloat16)
    return mx.array(t.astype(np.float32) if t.dtype == np.float64 else t)  # no float64 on the GPU


def _to_np(t: mx.array) -> np.ndarray:
    if t.dtype == mx.bfloat16:
        import ml_dtypes

        return np.array(t.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(t)


def from_weights(cfg: ModelConfig, weights: dict, kernels: str = "auto") -> Model:
    """A model from canonical name -> array (numpy, ml_dtypes.bfloat16 or mx)."""
    model = Model(cfg, kernels)
    arrays = {k: v if isinstance(v, mx.array) else _to_mx(np.asarray(v)) for k, v in Model.sanitize(weights).items()}
    try:
        model.load_weights(list(arrays.items()), strict=True)
    except ValueError as e:
        raise ModelError(f"weights do not fit the config: {e}") from e
    mx.eval(model.parameters())
    return model.eval()


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [path / "model.safetensors"]


def load(path, kernels: str = "auto", dtype: str | None = None):
    """(model, tokenizer) from a model directory (config.json + safetensors), mlx-lm style.

    dtype: None keeps the stored dtype, or "float32" / "bfloat16" / "float16". A quantized
    directory ("quantization" in config.json) loads its packed weights as stored. tokenizer
    is None when config.json has `"tokenizer": null`.
    """
    from metastate_core.tokenizers import load_tokenizer
    from weights import load_config, load_model

    path = Path(path)
    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not available on the mlx backend (use {', '.join(DTYPES)})")
    cfg = load_config(path)
    q = cfg.extra.get("quantization")
    if q is None:
        cfg, tensors = load_model(path, dtype=dtype)
        model = from_weights(cfg, tensors, kernels)
    else:
        if dtype is not None:
            raise ModelError("a quantized model loads as stored: leave dtype unset")
        if not (isinstance(q, dict) and q.get("bits") in (4, 8) and isinstance(q.get("group_size"), int)):
            raise ModelError(f"config.json 'quantization' must be {{'group_size': int, 'bits': 4 | 8}}, got {q!r}")
        tensors = {}
        for f in _safetensors_files(path):
            if not f.is_file():
                raise ModelError(f"{path} has no weights file {f.name}")
            tensors.update(mx.load(str(f)))
        model = Model(cfg.replace(extra={k: v for k, v in cfg.extra.items() if k != "quantization"}), kernels)
        quantize(model, q["bits"], q["group_size"], _weights=tensors)
        try:
            model.load_weights(list(tensors.items()), strict=True)
        except ValueError as e:
            raise ModelError(f"quantized weights do not fit the config: {e}") from e
        mx.eval(model.parameters())
        model.eval()
    return model, load_tokenizer(path, cfg.tokenizer)


def canonical_weights(model: Model) -> dict[str, np.ndarray]:
    """Canonical name -> numpy array (bfloat16 as ml_dtypes.bfloat16), in SPEC order."""
    if model.quantization is not None:
        raise ModelError("a quantized model has no canonical float weights")
    flat = dict(tree_flatten(model.parameters()))
    return {name: _to_np(flat[name]) for name in param_shapes(model.args)}


def save(model: Model, path, tokenizer=None) -> None:
    """Write `model` (and the file of `tokenizer`, if given) to a model directory.

    Float models go through weights.save_model: canonical and bit-exact, so torch save ->
    MLX load -> MLX save -> torch load changes nothing. Quantized models are MLX's packed
    weights + scales + biases in model.safetensors (uint32, which the canonical writer does
    not store), with "quantization" in config.json; each file is replaced atomically.
    """
    path = Path(path)
    cfg = model.args
    tok_file = getattr(tokenizer, "path", None)
    if model.quantization is None:
        from weights import save_model

        extra = {Path(tok_file).name: tok_file} if tok_file is not None else None
        save_model(path, cfg, canonical_weights(model), extra_files=extra)
        return
    check_destination(path)  # never over a file, or a directory that is not a metastate model
    path.mkdir(parents=True, exist_ok=True)
    config = json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False) + "\n"
    meta = {"format": "metastate", "config": json.dumps(cfg.to_dict(), separators=(",", ":"))}
    arrays = dict(tree_flatten(model.parameters()))
    (path / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale index would win
    atomic_write(path / "model.safetensors", lambda f: mx.save_safetensors(f, arrays, metadata=meta))
    if tok_file is not None and Path(tok_file).resolve() != (path / Path(tok_file).name).resolve():
        atomic_write(path / Path(tok_file).name, lambda f: shutil.copyfile(tok_file, f))
    atomic_write(path / "config.json", lambda f: Path(f).write_text(config, encoding="utf-8"))


def convert(src, dst, *, bits: int | None = None, group_size: int = 64, dtype: str | None = None) -> None:
    """`metastate convert SRC --out DST [--quantize 4|8]`: load, optionally cast / quantize, save."""
    model, tokenizer = load(src, kernels="ops", dtype=dtype)
    if bits is not None:
        quantize(model, bits, group_size)
    save(model, dst, tokenizer)


