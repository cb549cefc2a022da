"""The Meta-State model in PyTorch: SPEC section 2 over whole sequences (section 3).

One self-contained file in the style of mlx-lm's models/*.py. Module attributes carry the
canonical names of SPEC section 4, so `Model.state_dict()` keys are exactly the weight format's
tensor names. Dtypes: weights float32 / bfloat16 / float16; every matmul runs in the weight
dtype, everything else (residual stream, norms, gates, SSE) in float32, and the WKV state and
decay are float32 always.

The WKV sequence kernel is chosen per call: `kernels="ops"` is the plain-torch chunked form
(`ops.wkv7.torch_chunked`), `"triton"` the Triton kernels (sequences: the chunked kernels
`ops.wkv7.chunk_wkv7`, same signature, for head sizes up to 64, the sequential `triton_wkv7`
past that; decode: the fused step), or any callable with that
signature (tests substitute the naive recurrence or the sequential `triton_wkv7`). The
elementwise pieces around the scan (token shift, the keys kk and k', GroupNorm + bonus + gate,
SSE normalisation, relu^2) are plain torch (`ops.elementwise.naive`) or fused Triton kernels (`.fused`, the
default with "triton"); either way they are handed to the blocks in a `Kernels` tuple.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from metastate_core.config import ModelConfig
from metastate_core.errors import MetaStateError
from metastate_core.params import ATT_VECTORS_D, param_shapes, shape_mismatch

from .ops.cross_entropy import chunked as chunked_cross_entropy
from .ops.elementwise import naive as naive_elementwise
from .ops.wkv7.naive import naive_wkv7_step, state_readout
from .ops.wkv7.torch_chunked import torch_chunked_wkv7

ModelArgs = ModelConfig  # the config dataclass of SPEC section 1
LN_EPS = 1e-5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(MetaStateError):
    """Tensors that do not fit the config, or a request the torch model cannot serve."""


class State(NamedTuple):
    """Recurrent state of a batch (the layout of `metastate_core.reference.State`), float32."""

    att_x: torch.Tensor   # [L, B, d]        previous ln1 output
    meta_x: torch.Tensor  # [L, B, d]        previous ln2 output
    wkv: torch.Tensor     # [L, B, H, N, N]  S, row = value index, column = key index

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, device=None) -> "State":
        L, d, H, N = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_size
        z = lambda *shape: torch.zeros(*shape, device=device, dtype=torch.float32)  # noqa: E731
        return cls(z(L, batch, d), z(L, batch, d), z(L, batch, H, N, N))


class Kernels(NamedTuple):
    """What one forward call computes with: the WKV sequence function and the elementwise module
    (`ops.elementwise.naive` or `.fused`, same function names and signatures)."""

    wkv: Callable
    ew: object


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """x @ W^T in the weight dtype, result float32."""
    return F.linear(x.to(layer.weight.dtype), layer.weight).float()


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w (a LoRA factor stored [in, out]) in the weight dtype, result float32."""
    return (x.to(w.dtype) @ w).float()


def _vec(n: int, *shape) -> nn.Parameter:
    return nn.Parameter(torch.zeros(n, *shape))


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the parameter dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), LN_EPS)


class GroupNorm(nn.Module):
    """ln_x's parameters: per-head normalisation of y, then an affine map over H*N. Computed
    together with the bonus and the gate by `group_norm_bonus_gate`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps_group_norm
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

    def forward(self, xa, prev, S0, v_first, kern: Kernels):
        """xa [B, T, d] (ln1 output, float32), prev [B, d], S0 [B, H, N, N].

        Returns the residual update [B, T, d], v_first [B, T, d_att], S_T and read(q).
        """
        B, T, _ = xa.shape
        H, N = self.n_head, self.head_size
        # Each mix feeds matmuls only, so it is stored in their dtype (x_v feeds two: value and
        # the v LoRA, so with bfloat16 weights its two gradients add in bfloat16).
        dt = self.receptance.weight.dtype
        mix = torch.stack([getattr(self, f"x_{c}") for c in "rwkvag"])
        x_r, x_w, x_k, x_v, x_a, x_g = kern.ew.token_shift_mix(xa, prev, mix, dt).unbind(0)
        r, k, v = _linear(x_r, self.receptance), _linear(x_k, self.key), _linear(x_v, self.value)
        w_raw = self.w0.float() + _mm(torch.tanh(_mm(x_w, self.w1)), self.w2)
        a = torch.sigmoid(self.a0.float() + _mm(_mm(x_a, self.a1), self.a2))
        g = _mm(torch.sigmoid(_mm(x_g, self.g1)), self.g2)
        kk, k = kern.ew.k_prep(k, a, self.k_k, self.k_a, H)
        if self.layer == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0.float() + _mm(_mm(x_v, self.v1), self.v2))
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        r, w_raw, k, v, a = map(heads, (r, w_raw, k, v, a))
        y, S, read = kern.wkv(r, w_raw, k, v, kk, a, S0)
        ln = self.ln_x
        y = kern.ew.group_norm_bonus_gate(y, r, k, v, g, self.r_k, ln.weight, ln.bias, ln.eps, dt)
        return _linear(y, self.output), v_first, S, read


class MetaLayer(nn.Module):
    """The Meta-State layer: token-parameter attention with the Self-State Encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n = cfg.d_model, cfg.n_param_tokens
        self.sse_heads, self.head_size, self.eps = cfg.sse_heads, cfg.head_size, cfg.eps_group_norm
        self.x_k = _vec(d)
        self.param_keys, self.param_values = _vec(n, d), _vec(n, d)
        self.sse_gate = _vec(d)

    def forward(self, xm, prev, read, ew, use_sse: bool = True):
        """xm [B, T, d] (ln2 output, float32), prev [B, d], read: the WKV readout, ew: the
        elementwise module (Kernels.ew). -> [B, T, d]."""
        B, T, _ = xm.shape
        dt = self.param_keys.dtype
        u = xs = ew.token_shift_mix(xm, prev, self.x_k[None])[0]
        KN = self.sse_heads * self.head_size
        if KN and use_sse:  # z_t = S_t xs_t: the state after this token as weights
            z = read(xs[..., :KN].reshape(B, T, self.sse_heads, self.head_size))
            u = ew.sse_norm_gate(xs, z, self.sse_gate, self.eps, dt)
        alpha = ew.relu_square(u.to(dt) @ self.param_keys.T, dt)
        return _mm(alpha, self.param_values)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        if layer == 0:
            self.ln0 = LayerNorm(cfg.d_model)
        self.ln1, self.ln2 = LayerNorm(cfg.d_model), LayerNorm(cfg.d_model)
        self.att = TimeMix(cfg, layer)
        self.meta = MetaLayer(cfg)

    def forward(self, x, att_prev, meta_prev, S0, v_first, kern: Kernels, use_sse: bool):
        """x [B, T, d] float32 -> (x, v_first, S_T, ln1 and ln2 outputs at the last token)."""
        xa = self.ln1(x)
        dx, v_first, S, read = self.att(xa, att_prev, S0, v_first, kern)
        x = x + dx
        xm = self.ln2(x)
        x = x + self.meta(xm, meta_prev, read, kern.ew, use_sse=use_sse)
        # clones, not views: a view would keep the whole [B, T, d] tensors alive (checkpointing)
        return x, v_first, S, xa[:, -1].clone(), xm[:, -1].clone()


class Model(nn.Module):
    """Meta-State language model. Parameters start at zero: fill them with `from_tensors`.

    freeze_sse_gate: the ablation baseline. Every sse_gate is held at zero and out of the
    optimizer (requires_grad False) and the SSE readout is skipped: exact RWKV-7. With
    sse_heads 0 the gates, never read, are out of the optimizer too.
    """

    def __init__(self, cfg: ModelConfig, *, freeze_sse_gate: bool = False):
        super().__init__()
        self.cfg, self.freeze_sse_gate = cfg, freeze_sse_gate
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
        self._apply_freeze()

    def _apply_freeze(self):
        # With sse_heads 0 no gate is ever read: a trainable parameter without gradient would
        # stop DDP, which waits for every one.
        for block in self.blocks:
            if self.freeze_sse_gate or self.cfg.sse_heads == 0:
                block.meta.sse_gate.requires_grad_(False)
            if self.freeze_sse_gate:
                with torch.no_grad():
                    block.meta.sse_gate.zero_()

    def forward(self, tokens: torch.Tensor, state: State | None = None, *,
                kernels: str | Callable = "ops", chunk_size: int = 16, grad_checkpoint: bool = False,
                fused: bool | None = None, targets: torch.Tensor | None = None, last_only: bool = False):
        """tokens [B, T] (or [T]) -> (logits [B, T, V] float32, State after the last token).

        targets [B, T] (or [T]): return the mean cross-entropy against them (a float32 scalar)
        instead of the logits, computed a chunk of rows at a time (`ops.cross_entropy.chunked`),
        so the [B, T, V] logits and their gradient never exist at once.
        last_only: logits of the last position only, [B, 1, V] (prefill: the head's matmul for one
        token instead of T).

        The input state is not modified. kernels: "ops", "triton" or a callable with the
        signature of `torch_chunked_wkv7` (r, w_raw, k, v, kk, a, S0) -> (y, S_T, read).
        fused: the elementwise pieces as fused Triton kernels; None means "with kernels='triton'".
        chunk_size: the chunk length of the "ops" path. grad_checkpoint: keep only each block's
        input for backward and recompute the block there (activation memory of one block
        instead of all; about one more forward pass of compute).
        """
        device = self.head.weight.device
        # Triton launches on the current CUDA device, not the tensors': make it the model's.
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            return self._forward(tokens, state, kernels, chunk_size, grad_checkpoint, fused, targets, last_only)

    def _forward(self, tokens, state, kernels, chunk_size, grad_checkpoint, fused, targets, last_only):
        if tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() not in (1, 2):
            raise ModelError(f"tokens must be int64 or int32 ids shaped [B, T] or [T], got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        if tokens.dim() == 1:
            tokens = tokens[None]
        B, T = tokens.shape
        if T == 0:
            raise ModelError("tokens must hold at least one token per sequence")
        if targets is not None and last_only:
            raise ModelError("last_only and targets do not go together: the loss needs every position")
        device = self.head.weight.device
        _check_tokens(tokens, self.cfg.vocab_size)
        if state is None:
            state = State.zeros(self.cfg, B, device)
        else:
            _check_state(self.cfg, state, B, device)
        if fused is None:
            fused = kernels == "triton"
        kern = Kernels(self._wkv(kernels, T, chunk_size, device), _elementwise(fused, device))
        x = self.blocks[0].ln0(self.emb(tokens))
        v_first, att_x, meta_x, wkv_out = None, [], [], []
        recompute = grad_checkpoint and torch.is_grad_enabled()
        for l, block in enumerate(self.blocks):
            args = (x, state.att_x[l], state.meta_x[l], state.wkv[l], v_first, kern, not self.freeze_sse_gate)
            if recompute:
                x, v_first, S, xa_last, xm_last = checkpoint(block, *args, use_reentrant=False,
                                                             preserve_rng_state=False)  # no randomness
            else:
                x, v_first, S, xa_last, xm_last = block(*args)
            att_x.append(xa_last)
            meta_x.append(xm_last)
            wkv_out.append(S)
        state_out = State(torch.stack(att_x), torch.stack(meta_x), torch.stack(wkv_out))
        if targets is not None:
            return self._loss(self.ln_out(x), targets), state_out
        return _linear(self.ln_out(x[:, -1:] if last_only else x), self.head), state_out

    def _loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the head's logits for h [B, T, d] against targets."""
        if targets.dim() == 1:
            targets = targets[None]
        if targets.shape != h.shape[:2]:
            raise ModelError(f"targets must have the tokens' shape {list(h.shape[:2])}, got {list(targets.shape)}")
        # the matmul's dtype is _linear's: autocast's, else the weight's
        return chunked_cross_entropy.linear_cross_entropy(h.flatten(0, 1), self.head.weight, targets.flatten())

    def resolve_kernels(self, kernels: str) -> str:
        """`kernels` ("auto", "ops" or "triton") with auto decided for this model on its device,
        checked now (ModelError) rather than at the first call."""
        if kernels == "auto":
            kernels = auto_kernels(self.cfg, self.head.weight.device)
        self.check_kernels(kernels)
        return kernels

    def check_kernels(self, kernels: str) -> None:
        """Raise ModelError now if this model cannot run `kernels` ("ops" or "triton")."""
        if kernels not in ("ops", "triton"):
            raise ModelError(f"unknown kernels {kernels!r}: expected 'ops' or 'triton'")
        if kernels == "triton":
            _check_triton_device(self.head.weight.device)
            problem = triton_problem(self.cfg)
            if problem:
                raise ModelError(f"{problem}: use kernels='ops'")

    def _wkv(self, kernels, T: int, chunk_size: int, device: torch.device) -> Callable:
        """The WKV sequence function for this call."""
        if callable(kernels):
            return kernels
        decode = T == 1 and not torch.is_grad_enabled()  # one token: a plain step, no chunks
        self.check_kernels(kernels)
        if kernels == "ops":
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= 64:
                raise ModelError(f"chunk_size must be an integer in [1, 64], got {chunk_size!r}")
            if decode:
                return _ops_decode
            return lambda *args: torch_chunked_wkv7(*args, chunk_size=chunk_size)
        try:  # imported here: triton is needed only for these kernels
            from .ops.wkv7 import chunk_wkv7, triton_state_read, triton_wkv7, triton_wkv7_step
            from .ops.wkv7.chunk import MAX_HEAD_SIZE
        except ImportError as e:
            raise ModelError(f"the Triton WKV kernels are not available: {e}") from e
        if decode:  # one fused step, no checkpoints
            return lambda *args: _decode_step(triton_wkv7_step, triton_state_read, *args)
        if self.cfg.head_size > MAX_HEAD_SIZE:  # the chunked kernels' tiles outgrow the GPU
            return triton_wkv7
        # The WKV inputs are float32 here whatever the weights; their precision is the matmuls':
        # bfloat16/float16 weights or autocast make them that precise, and TF32 dots suffice.
        low = self.head.weight.dtype != torch.float32 or torch.is_autocast_enabled(device.type)
        precision = "tf32" if low else None  # None: float32-accurate dots for float32 inputs
        # chunked: 5x the sequential kernel's training speed (docs/kernels.md)
        return lambda *args: chunk_wkv7(*args, precision=precision)

    # -- canonical tensors ----------------------------------------------------------------
    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: dict, *, device=None, dtype=None,
                     freeze_sse_gate: bool = False) -> "Model":
        """A model from canonical name -> array (numpy, ml_dtypes.bfloat16 or torch).

        dtype: torch dtype or name; None keeps the dtype of emb.weight (float64 becomes float32).
        """
        problem = shape_mismatch(cfg, tensors)
        if problem:
            raise ModelError(f"tensors do not match the config: {problem}")
        torch_tensors = {name: _to_torch(t) for name, t in tensors.items()}
        dtype = _resolve_dtype(dtype, torch_tensors["emb.weight"].dtype)
        model = cls(cfg, freeze_sse_gate=freeze_sse_gate).to(device=device, dtype=dtype)
        model.load_state_dict(torch_tensors, strict=True)
        model._apply_freeze()
        return model

    def to_tensors(self) -> dict[str, np.ndarray]:
        """Canonical name -> numpy array (bfloat16 as ml_dtypes.bfloat16), in canonical order."""
        state = self.state_dict()
        return {name: _to_numpy(state[name]) for name in param_shapes(self.cfg)}


def _check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    # An id past the embedding is a device-side assert on CUDA, which poisons the process. The
    # check waits for the GPU, so it is skipped while a CUDA graph is captured (no waiting there).
    if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if tokens.numel() and bool(((tokens < 0) | (tokens >= vocab_size)).any()):
        raise ModelError(f"token ids must be in [0, {vocab_size}), got ids from {int(tokens.min())} to "
                         f"{int(tokens.max())}")


def _check_state(cfg: ModelConfig, state: State, batch: int, device: torch.device) -> None:
    if not isinstance(state, State):
        raise ModelError(f"state must be a backends.cuda State (from this model or State.zeros), got "
                         f"{type(state).__module__}.{type(state).__name__}")
    L, d, H, N = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_size
    want = State((L, batch, d), (L, batch, d), (L, batch, H, N, N))
    for name, t, shape in zip(State._fields, state, want):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ModelError(f"state.{name} must be a float32 tensor {list(shape)} for this model and a batch of "
                             f"{batch}, got {got}")
        if t.device != device:
            raise ModelError(f"state.{name} is on {t.device} and the model on {device}: move the state there")


def triton_problem(cfg: ModelConfig) -> str | None:
    """Why the Triton kernels cannot run this model, or None."""
    N = cfg.head_size
    if not 16 <= N <= 256 or N & (N - 1):
        return f"the Triton kernels need a power-of-two head size in [16, 256], and this model's is {N}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def auto_kernels(cfg: ModelConfig, device: torch.device) -> str:
    """kernels='auto': "triton" on a GPU where the kernels can run the model, else "ops"."""
    if device.type != "cuda":
        return "ops"
    problem = triton_problem(cfg)
    if problem:
        warnings.warn(f"{problem}: running on plain torch ops", stacklevel=2)
        return "ops"
    return "triton"


def _check_triton_device(device: torch.device) -> None:
    # Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1, as the tests do).
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ModelError(f"the Triton kernels run on CUDA tensors, and the model is on {device}: "
                         "move it to a GPU or use kernels='ops'")


def _elementwise(fused: bool, device: torch.device):
    """The module of elementwise pieces: plain torch, or the fused Triton kernels."""
    if not fused:
        return naive_elementwise
    try:
        from .ops.elementwise import fused as fused_elementwise
    except ImportError as e:
        raise ModelError(f"the fused Triton elementwise kernels are not available: {e}") from e
    _check_triton_device(device)
    return fused_elementwise


def _ops_decode(r, w_raw, k, v, kk, a, S0):
    """One token by the plain-torch recurrence step, shaped like the sequence path."""
    y, S = naive_wkv7_step(S0, r[:, 0], w_raw[:, 0], k[:, 0], v[:, 0], kk[:, 0], a[:, 0])
    return y[:, None], S, lambda q: state_readout(S, q[:, 0])[:, None]


def _decode_step(step, state_read, r, w_raw, k, v, kk, a, S0):
    """One token through the Triton decode kernels, shaped like the sequence path."""
    S = S0.clone(memory_format=torch.contiguous_format)  # the kernel updates S in place
    y = step(S, r[:, 0], w_raw[:, 0], k[:, 0], v[:, 0], kk[:, 0], a[:, 0])
    return y[:, None].float(), S, lambda q: state_read(S, q[:, 0])[:, None].float()


def _resolve_dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32 if default == torch.float64 else default
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelError(f"unsupported dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ModelError(f"unsupported dtype {dtype}: expected float32, bfloat16 or float16")
    return dtype


def _to_torch(t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    t = np.asarray(t)
    if t.dtype.name == "bfloat16":  # ml_dtypes: reinterpret the bits
        return torch.from_numpy(np.ascontiguousarray(t).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(t))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_model(path, device="cpu", dtype=None, *, freeze_sse_gate: bool = False) -> Model:
    """A model directory (SPEC section 4) -> Model on `device`; dtype None keeps the file's."""
    from weights import load_model as load_weights

    cfg, tensors = load_weights(Path(path))
    return Model.from_tensors(cfg, tensors, device=device, dtype=dtype, freeze_sse_gate=freeze_sse_gate)
