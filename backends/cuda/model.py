"""The Meta-State model in PyTorch: SPEC section 2 over whole sequences (section 3).

One self-contained file in the style of mlx-lm's models/*.py, and the twin of
backends/mlx/model.py: the same classes, methods and state (`diff` the two files to see what
differs between the frameworks). Module attributes carry the canonical names of SPEC section
4, so `Model.state_dict()` keys are exactly the weight format's tensor names. Dtypes: weights
float32 / bfloat16 / float16; every matmul runs in the weight dtype, everything else (residual
stream, norms, gates, SSE) in float32, and the WKV state and decay are float32 always.

Kernels are chosen once, in `Model.set_kernels`: "ops" is plain torch on any device (the
chunked WKV `torch_chunked_wkv7`, the elementwise pieces of `ops.elementwise.naive`, product keys
`ops.product_keys.naive`), "triton" the Triton kernels (the chunked `chunk_wkv7` for head sizes
up to 64, the sequential `triton_wkv7` past that, the fused decode step, product keys
`ops.product_keys.fused`, and by default the fused elementwise pieces of
`ops.elementwise.fused`, same functions as the plain ones).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from functools import partial
from types import ModuleType
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from metastate_core.config import ModelConfig
from metastate_core.constants import LN_EPS, MAX_CHUNK, WEIGHT_DTYPES, check_kernels
from metastate_core.errors import ModelError
from metastate_core.params import ATT_VECTORS_D, param_shapes, shape_mismatch

from .ops import wkv7
from .ops.cross_entropy import chunked as chunked_cross_entropy
from .ops.elementwise import naive as naive_elementwise
from .ops.product_keys import naive as naive_product_keys

F32 = torch.float32

ModelArgs = ModelConfig  # the config dataclass of SPEC section 1


@dataclass(frozen=True)
class State:
    """Recurrent state of a batch (the layout of `metastate_core.reference.State`), float32."""

    att_x: torch.Tensor   # [L, B, d]        previous ln1 output
    meta_x: torch.Tensor  # [L, B, d]        previous ln2 output
    wkv: torch.Tensor     # [L, B, H, N, N]  S, row = value index, column = key index

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, device=None) -> "State":
        L, d, H, N = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_size
        z = lambda *shape: torch.zeros(*shape, device=device, dtype=torch.float32)  # noqa: E731
        return cls(z(L, batch, d), z(L, batch, d), z(L, batch, H, N, N))


@dataclass(frozen=True)
class Kernels:
    """What the model computes with, chosen once by `Model.set_kernels`."""

    name: str
    seq: Callable    # (r, w_raw, k, v, kk, a [B, T, H, N], S0) -> (y, S_T, read: q [B, T, K, N] -> S_t q_t)
    step: Callable   # (S, r, w_raw, k, v, kk, a [B, H, N]) -> (y, S after the token)
    read: Callable   # (S, q [B, K, N]) -> S q for the first K heads
    ew: ModuleType   # the elementwise pieces: ops.elementwise.naive or .fused (same functions)
    pk: ModuleType   # product keys (SPEC section 7): ops.product_keys.naive or .fused (same functions)

    def __deepcopy__(self, memo):  # functions and modules: a copy of the model shares them
        return self


def wkv(kern: Kernels, r, w_raw, k, v, kk, a, S0, S_out=None):
    """The WKV of a sequence; one token without autograd is one recurrent step (no chunks).
    S_out: where to write S_T (the model's new state, no autograd), or None."""
    if r.shape[1] > 1 or torch.is_grad_enabled():
        y, S, read = kern.seq(r, w_raw, k, v, kk, a, S0)
        return y, S if S_out is None else S_out.copy_(S), read
    # select/unsqueeze, not t[:, 0] / t[:, None]: Python indexing costs twice as much per call
    y, S = kern.step(S0, r.select(1, 0), w_raw.select(1, 0), k.select(1, 0), v.select(1, 0), kk.select(1, 0),
                     a.select(1, 0), out=S_out)
    return y.unsqueeze(1), S, lambda q: kern.read(S, q.select(1, 0)).unsqueeze(1)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype (no operator when it already is: a decoded token makes hundreds of these calls)."""
    return x if x.dtype == dtype else x.to(dtype)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """x @ W^T in the weight dtype, result float32 (the matmul F.linear runs, without its extra
    dispatch layers: about 4 us a call, 49 calls a decoded token at 12 layers)."""
    w = layer.weight
    return _as(_as(x, w.dtype) @ w.T, F32)


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w (a LoRA factor stored [in, out]) in the weight dtype, result float32."""
    return _as(_as(x, w.dtype) @ w, F32)


def _vec(*shape) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the parameter dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.layer_norm(_as(x, F32), self.normalized_shape, _as(self.weight, F32), _as(self.bias, F32), LN_EPS)


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

    def forward(self, xa, prev, S0, v_first, S_out=None):
        """xa [B, T, d] (ln1 output, float32), prev [B, d], S0 [B, H, N, N]; S_out: where to
        write S_T (no autograd), or None.

        Returns the residual update [B, T, d], v_first [B, T, d_att], S_T and read(q).
        """
        B, T, _ = xa.shape
        H, N, ew = self.n_head, self.head_size, self.kern.ew
        # Each mix feeds matmuls only, so it is stored in their dtype (x_v feeds two: value and
        # the v LoRA, so with bfloat16 weights its two gradients add in bfloat16).
        dt = self.receptance.weight.dtype
        mix = torch.stack([getattr(self, name) for name in ATT_VECTORS_D])
        x_r, x_w, x_k, x_v, x_a, x_g = ew.token_shift_mix(xa, prev, mix, dt).unbind(0)  # not Tensor.__iter__
        r, k, v = _linear(x_r, self.receptance), _linear(x_k, self.key), _linear(x_v, self.value)
        w_raw = _as(self.w0, F32) + _mm(torch.tanh(_mm(x_w, self.w1)), self.w2)
        a = torch.sigmoid(_as(self.a0, F32) + _mm(_mm(x_a, self.a1), self.a2))
        g = _mm(torch.sigmoid(_mm(x_g, self.g1)), self.g2)
        kk, k = ew.k_prep(k, a, self.k_k, self.k_a, H)
        if self.layer == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(_as(self.v0, F32) + _mm(_mm(x_v, self.v1), self.v2))
        r, w_raw, k, v, a = (t.reshape(B, T, H, N) for t in (r, w_raw, k, v, a))
        y, S, read = wkv(self.kern, r, w_raw, k, v, kk, a, S0, S_out)
        ln = self.ln_x
        y = ew.group_norm_bonus_gate(y, r, k, v, g, self.r_k, ln.weight, ln.bias, ln.eps, dt)
        return _linear(y, self.output), v_first, S, read


class MetaLayer(nn.Module):
    """The Meta-State layer (`blocks.i.meta`): Self-State Encoder + token-parameter layer."""

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

    def forward(self, xm, prev, read):
        """xm [B, T, d] (ln2 output, float32), prev [B, d], read(q [B, T, K, N]) -> S_t q_t."""
        B, T, _ = xm.shape
        kern, dt = self.kern, self.param_values.dtype
        ew = kern.ew
        u = xs = ew.token_shift_mix(xm, prev, self.x_k.unsqueeze(0)).select(0, 0)
        KN = self.sse_heads * self.head_size
        if KN:  # z_t = S_t xs_t: the state after this token as weights
            z = read(xs[..., :KN].reshape(B, T, self.sse_heads, self.head_size))
            u = ew.sse_norm_gate(xs, z, self.sse_gate, self.eps, dt)
        if self.product:   # SPEC section 7
            score, token = kern.pk.select(u, self.sub_keys, self.topk)
            return kern.pk.weighted_rows(self.param_values, token, ew.relu_square(score, F32))
        alpha = ew.relu_square(_as(u, dt) @ self.param_keys.T, dt)
        return _mm(alpha, self.param_values)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        if layer == 0:
            self.ln0 = LayerNorm(cfg.d_model)
        self.ln1, self.ln2 = LayerNorm(cfg.d_model), LayerNorm(cfg.d_model)
        self.att = TimeMix(cfg, layer)
        self.meta = MetaLayer(cfg)

    def forward(self, x, att_prev, meta_prev, S0, v_first, S_out=None):
        """x [B, T, d] float32 -> (x, v_first, S_T, ln1 and ln2 outputs at the last token).
        S_out: where to write S_T (no autograd), or None."""
        xa = self.ln1(x)
        dx, v_first, S, read = self.att(xa, att_prev, S0, v_first, S_out)
        x = x + dx
        xm = self.ln2(x)
        x = x + self.meta(xm, meta_prev, read)
        # clones, not views: a view would keep the whole [B, T, d] tensors alive (checkpointing);
        # one token's view keeps nothing more alive (decode: two operators a layer fewer)
        if x.shape[1] == 1:
            return x, v_first, S, xa.select(1, 0), xm.select(1, 0)
        return x, v_first, S, xa[:, -1].clone(), xm[:, -1].clone()


class Model(nn.Module):
    """Meta-State language model. Parameters start at zero: fill them with `from_tensors`.

    freeze_sse_gate: the ablation baseline. Every sse_gate is held at zero and out of the
    optimizer (requires_grad False) and the SSE readout is skipped: exact RWKV-7. With
    sse_heads 0 the gates, never read, are out of the optimizer too.
    """

    def __init__(self, cfg: ModelConfig, kernels: str | Kernels = "auto", *, freeze_sse_gate: bool = False):
        super().__init__()
        self.cfg, self.freeze_sse_gate, self.layout = cfg, freeze_sse_gate, "canonical"
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
        self._apply_freeze()
        self.set_kernels(kernels)

    def _apply_freeze(self):
        # With sse_heads 0 no gate is ever read: a trainable parameter without gradient would
        # stop DDP, which waits for every one.
        for block in self.blocks:
            if self.freeze_sse_gate or self.cfg.sse_heads == 0:
                block.meta.sse_gate.requires_grad_(False)
            if self.freeze_sse_gate:
                block.meta.sse_heads = 0  # the layer reads no state: exact RWKV-7
                with torch.no_grad():
                    block.meta.sse_gate.zero_()

    def set_kernels(self, kernels: str | Kernels = "auto", *, chunk_size: int = 16, fused: bool | None = None) -> str:
        """Choose what the model computes with: "ops", "triton", "auto" (`auto_kernels`: triton
        on a GPU where the kernels can run this model, else ops) or a `Kernels` (tests: the
        naive recurrence). Checked now (ModelError), not at the first call. chunk_size: the
        chunk length of the "ops" WKV. fused: the elementwise pieces as fused Triton kernels;
        None means "with triton". Set again after a change of device or weight dtype.
        Returns the name, also `model.kernels`."""
        if not isinstance(kernels, Kernels):
            device = self.head.weight.device
            name = check_kernels("torch", kernels)
            name = auto_kernels(self.cfg, device) if name == "auto" else name
            if name == "ops":
                if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK:
                    raise ModelError(f"chunk_size must be an integer in [1, {MAX_CHUNK}], got {chunk_size!r}")
                kernels = Kernels("ops", partial(wkv7.torch_chunked_wkv7, chunk_size=chunk_size),
                                  wkv7.naive_wkv7_step, wkv7.state_readout, naive_elementwise, naive_product_keys)
            else:
                kernels = _triton_kernels(self.cfg, device, low_weights=self.head.weight.dtype != torch.float32)
            if fused if fused is not None else name == "triton":
                kernels = replace(kernels, ew=_fused_elementwise(device))
        for block in self.blocks:
            block.att.kern = block.meta.kern = kernels
        self.kernels = kernels.name
        return self.kernels

    def set_layout(self, layout: str = "auto") -> str:
        """How the weight matrices lie in memory; their names, shapes and values never change.

        "canonical": row-major, as SPEC section 4 stores them (training: what the trainer and
        its optimizer expect). "decode": each matrix a token's products read (the linear maps,
        LoRA factors, head, dense parameter keys and values) stored so that one row times it
        runs the CPU BLAS's fast kernel for the dtype: the operand of x @ W row-major in
        float32 (MKL and OpenBLAS read it about 1.4x faster than its transpose, measured on
        AVX2), column-major in bfloat16/float16 (the other way round is 15x slower in torch's
        CPU kernels); docs/benchmarks.md. "auto": decode on a CPU, canonical elsewhere. Set
        again after a change of device or weight dtype (as `set_kernels`); `load_model` sets
        "auto". A parameter keeps its identity (its data is replaced), so an optimizer holding
        it still does. Returns the name, also `model.layout`."""
        if layout not in ("auto", "canonical", "decode"):
            raise ModelError(f"layout must be 'auto', 'canonical' or 'decode', got {layout!r}")
        if layout == "auto":
            layout = "decode" if self.head.weight.device.type == "cpu" else "canonical"
        low = self.head.weight.dtype != torch.float32
        with torch.no_grad():
            for p, transposed in self._product_weights():
                column = layout == "decode" and transposed != low  # the matmul's operand is p.T when transposed
                if p.dim() == 2 and p.is_contiguous() == column:
                    p.data = p.data.t().contiguous().t() if column else p.data.contiguous()
        self.layout = layout
        return layout

    def _product_weights(self):
        """(matrix, used transposed) for each matrix a token multiplies: x @ W^T (linear maps,
        head, dense param_keys) or x @ W (LoRA factors, dense param_values)."""
        for block in self.blocks:
            att, meta = block.att, block.meta
            for layer in (att.receptance, att.key, att.value, att.output):
                yield layer.weight, True
            for name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
                if hasattr(att, name):
                    yield getattr(att, name), False
            if not meta.product:  # product mode gathers rows of param_values: row-major always
                yield meta.param_keys, True
                yield meta.param_values, False
        yield self.head.weight, True

    def forward(self, tokens: torch.Tensor, state: State | None = None, *, last_only: bool = False,
                targets: torch.Tensor | None = None, grad_checkpoint: bool = False):
        """tokens [B, T] (or [T]) -> (logits [B, T, V] float32, State after the last token).

        The input state is not modified. last_only: logits of the last position only,
        [B, 1, V] (prefill: the head's matmul for one token instead of T).
        targets [B, T] (or [T]): return the mean cross-entropy against them (a float32 scalar)
        instead of the logits, computed a chunk of rows at a time (`ops.cross_entropy.chunked`),
        so the [B, T, V] logits and their gradient never exist at once. grad_checkpoint: keep
        only each block's input for backward and recompute the block there (activation memory
        of one block instead of all; about one more forward pass of compute).
        """
        device = self.head.weight.device
        # Triton launches on the current CUDA device, not the tensors': make it the model's.
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            return self._forward(tokens, state, last_only, targets, grad_checkpoint)

    def _forward(self, tokens, state, last_only, targets, grad_checkpoint):
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
        x = self.blocks[0].ln0(self.emb(tokens))
        v_first, att_x, meta_x, wkv_out = None, [], [], []
        recompute = grad_checkpoint and torch.is_grad_enabled()
        # Without autograd each layer writes its S_T straight into the new state (no stack copy).
        wkv_new = None if torch.is_grad_enabled() else torch.empty_like(state.wkv, memory_format=torch.contiguous_format)
        # each layer's slices in one unbind per tensor, not three indexing operators a layer
        per_layer = zip(state.att_x.unbind(0), state.meta_x.unbind(0), state.wkv.unbind(0),
                        wkv_new.unbind(0) if wkv_new is not None else self.blocks)
        for block, (att_prev, meta_prev, S0, S_out) in zip(self.blocks, per_layer):
            args = (x, att_prev, meta_prev, S0, v_first)
            if wkv_new is not None:
                x, v_first, S, xa_last, xm_last = block(*args, S_out)
            elif recompute:
                x, v_first, S, xa_last, xm_last = checkpoint(block, *args, use_reentrant=False,
                                                             preserve_rng_state=False)  # no randomness
            else:
                x, v_first, S, xa_last, xm_last = block(*args)
            att_x.append(xa_last)
            meta_x.append(xm_last)
            wkv_out.append(S)
        state_out = State(torch.stack(att_x), torch.stack(meta_x), torch.stack(wkv_out) if wkv_new is None else wkv_new)
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

    # -- canonical tensors ----------------------------------------------------------------
    @classmethod
    def from_tensors(cls, cfg: ModelConfig, tensors: dict, *, device=None, dtype=None, kernels="auto",
                     freeze_sse_gate: bool = False, share: bool = False) -> "Model":
        """A model from canonical name -> array (numpy, ml_dtypes.bfloat16 or torch).

        dtype: torch dtype or name; None keeps the dtype of emb.weight (float64 becomes float32).
        kernels: as for `set_kernels`, chosen once the model is on its device. share: parameters
        take the arrays' memory where device and dtype match instead of a copy (`load_model`'s
        freshly read arrays: the weights are in memory once, not twice, while loading).
        """
        problem = shape_mismatch(cfg, tensors)
        if problem:
            raise ModelError(f"tensors do not match the config: {problem}")
        torch_tensors = {name: _to_torch(t) for name, t in tensors.items()}
        dtype = _resolve_dtype(dtype, torch_tensors["emb.weight"].dtype)
        if share:  # parameters allocated nowhere, then assigned the tensors themselves
            with torch.device("meta"):
                model = cls(cfg, "ops", freeze_sse_gate=freeze_sse_gate)
            model.load_state_dict({name: t.to(device=device, dtype=dtype) for name, t in torch_tensors.items()},
                                  strict=True, assign=True)
        else:
            model = cls(cfg, "ops", freeze_sse_gate=freeze_sse_gate).to(device=device, dtype=dtype)
            model.load_state_dict(torch_tensors, strict=True)
        model._apply_freeze()
        model.set_kernels(kernels)
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
    lo, hi = torch.aminmax(tokens) if tokens.numel() else (0, 0)
    if int(lo) < 0 or int(hi) >= vocab_size:
        raise ModelError(f"token ids must be in [0, {vocab_size}), got ids from {int(lo)} to {int(hi)}")


def _check_state(cfg: ModelConfig, state: State, batch: int, device: torch.device) -> None:
    if not isinstance(state, State):
        raise ModelError(f"state must be a backends.cuda State (from this model or State.zeros), got "
                         f"{type(state).__module__}.{type(state).__name__}")
    L, d, H, N = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_size
    for field, shape in zip(fields(State), ((L, batch, d), (L, batch, d), (L, batch, H, N, N))):
        t = getattr(state, field.name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ModelError(f"state.{field.name} must be a float32 tensor {list(shape)} for this model and a "
                             f"batch of {batch}, got {got}")
        if t.device != device:
            raise ModelError(f"state.{field.name} is on {t.device} and the model on {device}: move the state there")


# -- kernels ---------------------------------------------------------------------------------

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


def _triton_kernels(cfg: ModelConfig, device: torch.device, low_weights: bool) -> Kernels:
    _check_triton_device(device)
    problem = triton_problem(cfg)
    if problem:
        raise ModelError(f"{problem}: use kernels='ops'")
    try:  # triton is imported only for these kernels
        seq = (wkv7.triton_wkv7 if cfg.head_size > wkv7.MAX_HEAD_SIZE  # the chunked kernels' tiles outgrow the GPU
               else partial(_chunk_wkv7, wkv7.chunk_wkv7, low_weights))  # 5x the sequential kernel's training speed
        from .ops.product_keys import fused as fused_product_keys

        return Kernels("triton", seq, partial(_step_on_copy, wkv7.triton_wkv7_step), wkv7.triton_state_read,
                       naive_elementwise, fused_product_keys)
    except ImportError as e:
        raise ModelError(f"the Triton WKV kernels are not available: {e}") from e


def _chunk_wkv7(chunk_wkv7, low_weights: bool, *args):
    # The WKV inputs are float32 here whatever the weights; their precision is the matmuls':
    # bfloat16/float16 weights or autocast make them that precise, and TF32 dots suffice
    # (None: float32-accurate dots for float32 inputs).
    low = low_weights or torch.is_autocast_enabled(args[0].device.type)
    return chunk_wkv7(*args, precision="tf32" if low else None)


def _step_on_copy(step, S0, *args, out=None):
    """A decode kernel that updates S in place, run on a copy (into `out` if given): (y, S after
    the token)."""
    S = S0.clone(memory_format=torch.contiguous_format) if out is None else out.copy_(S0)
    return step(S, *args), S


def _fused_elementwise(device: torch.device) -> ModuleType:
    try:
        from .ops.elementwise import fused
    except ImportError as e:
        raise ModelError(f"the fused Triton elementwise kernels are not available: {e}") from e
    _check_triton_device(device)
    return fused


# -- tensors in and out ----------------------------------------------------------------------

def _resolve_dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32 if default == torch.float64 else default
    names = {name: getattr(torch, name) for name in WEIGHT_DTYPES}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ModelError(f"unsupported dtype {dtype!r}: expected one of {', '.join(WEIGHT_DTYPES)}")
        return names[dtype]
    if dtype not in names.values():
        raise ModelError(f"unsupported dtype {dtype}: expected one of {', '.join(WEIGHT_DTYPES)}")
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
