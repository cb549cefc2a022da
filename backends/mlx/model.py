"""The Meta-State model in MLX: SPEC section 2 over whole sequences (section 3).

One self-contained file in the style of mlx-lm's models/rwkv7.py, and the twin of
backends/cuda/model.py: the same classes, methods and state (`diff` the two files to see what
differs between the frameworks). The parameter tree flattens (`mlx.utils.tree_flatten`) to the
canonical names of SPEC section 4. Dtypes: weights float32, bfloat16 or float16 (or 4/8-bit
quantized large matrices, utils.quantize); matmuls run in the weight dtype, everything else
(residual stream, norms, gates, SSE) in float32, and the WKV state and decay are float32
always (mlx-lm's rwkv7 keeps its state in the weight dtype; we do not).

Kernels are chosen once, in `Model.set_kernels`: "ops" is plain MLX on any device, Linux CPU
included (the chunked WKV of wkv.py, the elementwise pieces of elementwise.py), "metal" the
Metal kernels of `backends.mlx.kernels` (same signatures).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from metastate_core.config import ModelConfig
from metastate_core.constants import LN_EPS, KernelChoiceError, check_kernels
from metastate_core.errors import ModelError
from metastate_core.params import ATT_VECTORS_D, param_shapes, shape_mismatch

from . import elementwise, product_keys
from .wkv import metal_problem, state_read_ops, wkv7_ops, wkv7_step_ops

ModelArgs = ModelConfig  # the config dataclass of SPEC section 1
F32 = mx.float32


@dataclass(frozen=True)
class State:
    """Recurrent state of a batch (the layout of `metastate_core.reference.State`), float32."""

    att_x: mx.array   # [L, B, d]        previous ln1 output
    meta_x: mx.array  # [L, B, d]        previous ln2 output
    wkv: mx.array     # [L, B, H, N, N]  S, row = value index, column = key index

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int) -> "State":
        L, d, H, N = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_size
        z = lambda *shape: mx.zeros(shape, F32)  # noqa: E731
        return cls(z(L, batch, d), z(L, batch, d), z(L, batch, H, N, N))


@dataclass(frozen=True)
class Kernels:
    """What the model computes with, chosen once by `Model.set_kernels`."""

    name: str
    seq: Callable    # (r, w_raw, k, v, kk, a [B, T, H, N], S0) -> (y, S_T, read: q [B, T, K, N] -> S_t q_t)
    step: Callable   # (S, r, w_raw, k, v, kk, a [B, H, N]) -> (y, S after the token)
    read: Callable   # (S, q [B, K, N]) -> S q for the first K heads
    ew: ModuleType   # the elementwise pieces (elementwise.py)
    pk: ModuleType   # product keys (SPEC section 7): product_keys.py, or its Metal


OPS = Kernels("ops", wkv7_ops, wkv7_step_ops, state_read_ops, elementwise, product_keys)


def metal_kernels() -> Kernels:
    """The Metal kernels of backends.mlx.kernels (imported here: they need a Metal-capable MLX)."""
    from . import kernels as metal

    return Kernels("metal", metal.metal_wkv7, metal.metal_wkv7_step, metal.metal_state_read, elementwise,
                   product_keys.Metal)


def wkv(kern: Kernels, r, w_raw, k, v, kk, a, S0):
    """The WKV of a sequence; one token is one recurrent step (no chunks)."""
    if r.shape[1] > 1:
        return kern.seq(r, w_raw, k, v, kk, a, S0)
    y, S = kern.step(S0, *(t[:, 0] for t in (r, w_raw, k, v, kk, a)))
    return y[:, None], S, lambda q: kern.read(S, q[:, 0])[:, None]


def _wdtype(layer) -> mx.Dtype:
    """The compute dtype of a (possibly quantized) linear layer."""
    return layer["scales"].dtype if "scales" in layer else layer["weight"].dtype


def _linear(x, layer):
    """x @ W^T in the weight dtype, result float32."""
    return layer(x.astype(_wdtype(layer))).astype(F32)


def _mm(x, w):
    """x @ w (a LoRA factor stored [in, out]) in the weight dtype, result float32."""
    return (x.astype(w.dtype) @ w).astype(F32)


def _vec(*shape) -> mx.array:
    return mx.zeros(shape)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the parameter dtype."""

    def __init__(self, dims: int):
        super().__init__()
        self.weight, self.bias = _vec(dims), _vec(dims)

    def __call__(self, x):
        return mx.fast.layer_norm(x.astype(F32), self.weight.astype(F32), self.bias.astype(F32), LN_EPS)


class GroupNorm(nn.Module):
    """ln_x's parameters: per-head normalisation of y, then an affine map over H*N. Computed
    together with the bonus and the gate by `group_norm_bonus_gate`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.ln_x_eps
        self.weight, self.bias = _vec(cfg.d_att), _vec(cfg.d_att)


class TimeMix(nn.Module):
    """RWKV-7 time mix (exact), with the WKV scan's readout handed on to the SSE."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, A, H, N = cfg.d_model, cfg.d_att, cfg.n_head, cfg.head_size
        self.layer, self.n_head, self.head_size = layer, H, N
        for name in ATT_VECTORS_D:
            setattr(self, name, _vec(d))
        self.w0, self.w1, self.w2 = _vec(A), _vec(d, cfg.lora_w), _vec(cfg.lora_w, A)
        self.a0, self.a1, self.a2 = _vec(A), _vec(d, cfg.lora_a), _vec(cfg.lora_a, A)
        if layer > 0:  # layer 0 defines v_first and has no value residual
            self.v0, self.v1, self.v2 = _vec(A), _vec(d, cfg.lora_v), _vec(cfg.lora_v, A)
        self.g1, self.g2 = _vec(d, cfg.lora_g), _vec(cfg.lora_g, A)
        self.k_k, self.k_a, self.r_k = _vec(A), _vec(A), _vec(H, N)
        self.receptance, self.key, self.value = (nn.Linear(d, A, bias=False) for _ in range(3))
        self.output = nn.Linear(A, d, bias=False)
        self.ln_x = GroupNorm(cfg)

    def __call__(self, xa, prev, S0, v_first):
        """xa [B, T, d] (ln1 output, float32), prev [B, d], S0 [B, H, N, N].

        Returns the residual update [B, T, d], v_first [B, T, d_att], S_T and read(q).
        """
        B, T, _ = xa.shape
        H, N, ew = self.n_head, self.head_size, self.kern.ew
        # Nothing is kept for a backward pass here, so the mixes stay float32 and each matmul
        # casts its own input.
        dt = F32
        mix = mx.stack([getattr(self, name) for name in ATT_VECTORS_D])
        x_r, x_w, x_k, x_v, x_a, x_g = ew.token_shift_mix(xa, prev, mix, dt)
        r, k, v = _linear(x_r, self.receptance), _linear(x_k, self.key), _linear(x_v, self.value)
        w_raw = self.w0.astype(F32) + _mm(mx.tanh(_mm(x_w, self.w1)), self.w2)
        a = mx.sigmoid(self.a0.astype(F32) + _mm(_mm(x_a, self.a1), self.a2))
        g = _mm(mx.sigmoid(_mm(x_g, self.g1)), self.g2)
        kk, k = ew.k_prep(k, a, self.k_k, self.k_a, H)
        if self.layer == 0:
            v_first = v
        else:
            v = v + (v_first - v) * mx.sigmoid(self.v0.astype(F32) + _mm(_mm(x_v, self.v1), self.v2))
        r, w_raw, k, v, a = (t.reshape(B, T, H, N) for t in (r, w_raw, k, v, a))
        y, S, read = wkv(self.kern, r, w_raw, k, v, kk, a, S0)
        ln = self.ln_x
        y = ew.group_norm_bonus_gate(y, r, k, v, g, self.r_k, ln.weight, ln.bias, ln.eps, dt)
        return _linear(y, self.output), v_first, S, read


class MetaLayer(nn.Module):
    """The Meta-State layer (`blocks.i.meta`): Self-State Encoder + token-parameter layer.

    param_keys / param_values are plain arrays (canonical names); once quantized they are the
    packed uint32 matrices with `<name>_scales` and `<name>_biases` beside them.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n = cfg.d_model, cfg.n_param_tokens
        self.sse_heads, self.head_size, self.eps = cfg.sse_heads, cfg.head_size, cfg.eps_sse
        self.product, self.topk = cfg.product, cfg.param_topk
        self.x_k = _vec(d)
        if self.product:  # SPEC section 7: P heads of two sub-key tables over the halves of u
            self.sub_keys = _vec(cfg.param_heads, 2, cfg.n_sub_keys, d // 2)
        else:
            self.param_keys = _vec(n, d)
        self.param_values = _vec(n, d)
        self.sse_gate = _vec(d)
        self.group_size = self.bits = None

    def __call__(self, xm, prev, read):
        """xm [B, T, d] (ln2 output, float32), prev [B, d], read(q [B, T, K, N]) -> S_t q_t."""
        B, T, _ = xm.shape
        kern, dt = self.kern, F32
        ew = kern.ew
        u = xs = ew.token_shift_mix(xm, prev, self.x_k[None])[0]
        KN = self.sse_heads * self.head_size
        if KN:  # z_t = S_t xs_t: the state after this token as weights
            z = read(xs[..., :KN].reshape(B, T, self.sse_heads, self.head_size))
            u = ew.sse_norm_gate(xs, z, self.sse_gate, self.eps, dt)
        if self.product:   # SPEC section 7
            score, token = kern.pk.select(u, self.sub_keys, self.topk)
            return kern.pk.weighted_rows(self.param_values, token, ew.relu_square(score, F32),
                                         **self.quantized("param_values"))
        alpha = ew.relu_square(self.matmul(u, "param_keys", transpose=True), dt)
        return self.matmul(alpha, "param_values", transpose=False)

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

    def quantized(self, name: str) -> dict:
        """product_keys.weighted_rows' keywords for a quantized self.<name>; {} when not quantized."""
        if name + "_scales" not in self:
            return {}
        return dict(scales=self[name + "_scales"], biases=self[name + "_biases"], group_size=self.group_size,
                    bits=self.bits)

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine", **_):
        """nn.quantize's hook (utils.quantize): both matrices, packed, with their scales and biases."""
        if mode != "affine":
            raise ModelError(f"quantization mode {mode!r} is not supported (affine only)")
        for name in ("param_values",) if self.product else ("param_keys", "param_values"):
            q, s, b = mx.quantize(self[name], group_size=group_size, bits=bits)
            self[name], self[name + "_scales"], self[name + "_biases"] = q, s, b
        self.group_size, self.bits = group_size, bits
        return self


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        if layer == 0:
            self.ln0 = LayerNorm(cfg.d_model)
        self.ln1, self.ln2 = LayerNorm(cfg.d_model), LayerNorm(cfg.d_model)
        self.att = TimeMix(cfg, layer)
        self.meta = MetaLayer(cfg)

    def __call__(self, x, att_prev, meta_prev, S0, v_first):
        """x [B, T, d] float32 -> (x, v_first, S_T, ln1 and ln2 outputs at the last token)."""
        xa = self.ln1(x)
        dx, v_first, S, read = self.att(xa, att_prev, S0, v_first)
        x = x + dx
        xm = self.ln2(x)
        x = x + self.meta(xm, meta_prev, read)
        return x, v_first, S, xa[:, -1], xm[:, -1]


class Model(nn.Module):
    """Meta-State language model. Fill the parameters with `from_tensors` (or utils.load)."""

    def __init__(self, cfg: ModelConfig, kernels: str | Kernels = "auto"):
        super().__init__()
        self.cfg, self.layout = cfg, "canonical"
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = [Block(cfg, i) for i in range(cfg.n_layer)]
        self.ln_out = LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.set_kernels(kernels)

    def set_kernels(self, kernels: str | Kernels = "auto") -> str:
        """Choose what the model computes with: "ops", "metal" (an error where the Metal kernels
        cannot run), "auto" (Metal on a Metal GPU where the kernels import and pass their check
        against the ops for this head size, `wkv.metal_problem`; else ops, with a warning when
        the check failed) or a `Kernels`. Returns the name, also `model.kernels`."""
        if not isinstance(kernels, Kernels):
            name = check_kernels("mlx", kernels)
            kernels = OPS
            if name == "metal" and not mx.metal.is_available():
                raise KernelChoiceError("kernels='metal' needs a Metal GPU (mx.metal.is_available() is False); "
                                        "use kernels='ops'")
            if name != "ops" and mx.metal.is_available():
                kernels = _metal_or_ops(name == "metal", self.cfg.head_size, self.cfg.product)
        for block in self.blocks:
            block.att.kern = block.meta.kern = kernels
        self.kernels = kernels.name
        return self.kernels

    def set_layout(self, layout: str = "auto") -> str:
        """How the weight matrices lie in memory; their names, shapes and values never change.

        "canonical": row-major, as SPEC section 4 stores them. "decode": each matrix a token's
        products read (the linear maps, LoRA factors, head, dense parameter keys and values)
        stored so that one row times it runs the CPU's fast kernel for the dtype: the operand
        of x @ W row-major in float32 (MLX's CPU matmul reads it 2.3x faster than its
        transpose, measured), column-major in bfloat16/float16; docs/benchmarks.md. Quantized
        matrices stay as packed. "auto": decode on the CPU, canonical on a GPU. Set again
        after a change of dtype (as `set_kernels`); `utils.load` sets "auto". Returns the
        name, also `model.layout`."""
        if layout not in ("auto", "canonical", "decode"):
            raise ModelError(f"layout must be 'auto', 'canonical' or 'decode', got {layout!r}")
        if layout == "auto":
            layout = "decode" if mx.default_device() == mx.cpu else "canonical"
        low = self.head["weight"].dtype != F32
        for module, name, transposed in self._product_weights():
            column = layout == "decode" and transposed != low  # the matmul's operand is W.T when transposed
            w = module[name]
            module[name] = mx.contiguous(w.T).T if column else mx.contiguous(w)
        mx.eval(self.parameters())
        self.layout = layout
        return layout

    def _product_weights(self):
        """(module, name, used transposed) for each unquantized matrix a token multiplies:
        x @ W^T (linear maps, head, dense param_keys) or x @ W (LoRA factors, dense
        param_values)."""
        def plain(module, name):
            return name in module and f"{name}_scales" not in module and "scales" not in module

        for block in self.blocks:
            att, meta = block.att, block.meta
            for layer in (att.receptance, att.key, att.value, att.output):
                if plain(layer, "weight"):
                    yield layer, "weight", True
            for name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
                if name in att:
                    yield att, name, False
            if not meta.product:  # product mode gathers rows of param_values: row-major always
                for name, transposed in (("param_keys", True), ("param_values", False)):
                    if plain(meta, name):
                        yield meta, name, transposed
        if plain(self.head, "weight"):
            yield self.head, "weight", True

    def __call__(self, tokens, state: State | None = None, *, last_only: bool = False):
        """tokens [B, T] (or [T]; mx.array or array-like) -> (logits [B, T, V] float32, State
        after the last token).

        The input state is not modified. last_only: logits of the last position only,
        [B, 1, V] (prefill: the head's matmul for one token instead of T).
        """
        tokens = tokens if isinstance(tokens, mx.array) else mx.array(np.asarray(tokens, np.int32))
        if tokens.dtype not in (mx.int64, mx.int32) or tokens.ndim not in (1, 2):
            raise ModelError(f"tokens must be int64 or int32 ids shaped [B, T] or [T], got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        if tokens.ndim == 1:
            tokens = tokens[None]
        B, T = tokens.shape
        if T == 0:
            raise ModelError("tokens must hold at least one token per sequence")
        _check_tokens(tokens, self.cfg.vocab_size)
        if state is None:
            state = State.zeros(self.cfg, B)
        else:
            _check_state(self.cfg, state, B)
        x = self.blocks[0].ln0(self.emb(tokens))
        v_first, att_x, meta_x, wkv_out = None, [], [], []
        for l, block in enumerate(self.blocks):
            x, v_first, S, xa_last, xm_last = block(x, state.att_x[l], state.meta_x[l], state.wkv[l], v_first)
            att_x.append(xa_last)
            meta_x.append(xm_last)
            wkv_out.append(S)
        state_out = State(mx.stack(att_x), mx.stack(meta_x), mx.stack(wkv_out))
        return _linear(self.ln_out(x[:, -1:] if last_only else x), self.head), state_out

    @property
    def quantization(self) -> dict | None:
        return self.cfg.extra.get("quantization")

    # -- canonical tensors ----------------------------------------------------------------
    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: dict, *, kernels="auto") -> "Model":
        """A model from canonical name -> array (numpy, ml_dtypes.bfloat16 or mx).

        kernels: as for `set_kernels`.
        """
        problem = shape_mismatch(cfg, tensors)
        if problem:
            raise ModelError(f"tensors do not match the config: {problem}")
        model = cls(cfg, kernels)
        model.load_weights([(name, _to_mx(t)) for name, t in tensors.items()], strict=True)
        mx.eval(model.parameters())
        return model.eval()

    def to_tensors(self) -> dict[str, np.ndarray]:
        """Canonical name -> numpy array (bfloat16 as ml_dtypes.bfloat16), in canonical order."""
        if self.quantization is not None:
            raise ModelError("a quantized model has no canonical float weights")
        state = dict(tree_flatten(self.parameters()))
        return {name: _to_numpy(state[name]) for name in param_shapes(self.cfg)}


def _check_tokens(tokens: mx.array, vocab_size: int) -> None:
    # An id past the embedding would read memory that is not the embedding's.
    if tokens.size and bool(((tokens < 0) | (tokens >= vocab_size)).any()):
        raise ModelError(f"token ids must be in [0, {vocab_size}), got ids from {tokens.min().item()} to "
                         f"{tokens.max().item()}")


def _check_state(cfg: ModelConfig, state: State, batch: int) -> None:
    if not isinstance(state, State):
        raise ModelError(f"state must be a backends.mlx State (from this model or State.zeros), got "
                         f"{type(state).__module__}.{type(state).__name__}")
    L, d, H, N = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_size
    for field, shape in zip(fields(State), ((L, batch, d), (L, batch, d), (L, batch, H, N, N))):
        t = getattr(state, field.name)
        if not isinstance(t, mx.array) or tuple(t.shape) != shape or t.dtype != F32:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, mx.array) else type(t).__name__
            raise ModelError(f"state.{field.name} must be a float32 array {list(shape)} for this model and a "
                             f"batch of {batch}, got {got}")


# -- kernels ---------------------------------------------------------------------------------

def _metal_or_ops(required: bool, head_size: int, product: bool = False) -> Kernels:
    """The Metal kernels if they import and pass their check here; else an error (required) or
    the plain ops (a warning if the check failed)."""
    try:
        kernels = metal_kernels()
    except ImportError as e:
        if not required:
            return OPS
        raise KernelChoiceError(f"the Metal kernels cannot be imported: {e}") from e
    problem = metal_problem(kernels, head_size) or (product_keys.metal_problem(kernels.pk) if product else None)
    if problem is None:
        return kernels
    if required:
        raise KernelChoiceError(f"the Metal kernels failed their check on this machine: {problem}")
    warnings.warn(f"the Metal kernels failed their check on this machine ({problem}); using plain MLX ops "
                  "(correct, slower). Please report this with your macOS and MLX versions.", stacklevel=3)
    return OPS


# -- tensors in and out ----------------------------------------------------------------------

def _to_mx(t) -> mx.array:
    if isinstance(t, mx.array):
        return t
    t = np.asarray(t)
    if t.dtype.name == "bfloat16":  # ml_dtypes: reinterpret the bits
        return mx.array(t.view(np.uint16)).view(mx.bfloat16)
    return mx.array(t.astype(np.float32) if t.dtype == np.float64 else t)  # no float64 on the GPU


def _to_numpy(t: mx.array) -> np.ndarray:
    if t.dtype == mx.bfloat16:
        import ml_dtypes

        return np.array(t.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(t)
