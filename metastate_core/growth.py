"""Growth rules (SPEC section 5): map a model to a larger one with identical logits.

Every rule is a pure function `(cfg, tensors, target) -> (new_cfg, new_tensors)`:

- the inputs are not modified; tensors a rule does not change are passed through as the
  same array objects, changed ones are new arrays of the same dtype (float32, float64,
  float16 or ml_dtypes.bfloat16), old entries copied bit for bit;
- `new_cfg.growth` is the old history plus one record, e.g.
  `{"rule": "param_tokens", "from": 256, "to": 320}`;
- a target below the current size raises `GrowthError`; a target equal to it is a no-op
  that returns a copy of the config (no record) and the same tensors;
- new random entries follow `metastate_core.params.init_layer` (RWKV-7's training init),
  computed for the grown config, so a new channel gets the value the standard init gives
  that channel in a model built at the new size.

Which new parameters receive gradient on the first step (loss L, new logits equal to the
old ones). Checked by finite differences in tests/test_growth.py.

1. Parameter tokens (SPEC 5.1): new keys random (init_layer's scale), new values zero, as
   RWKV-7's own init does. Exact (alpha @ values adds 0), and the new values receive gradient
   at once (dL/dvalues = alpha dL/dx with alpha != 0); the keys follow once the values have
   moved. Zero keys would never learn: alpha = relu(k.u)^2 = 0 has d alpha / dk = 0.
2. Heads: the new heads reach the residual stream only through the new, zero columns of
   `att.output.weight`. Those columns receive gradient at once, dL/dWo[:, new] =
   dL/dx (y * g)[new], non-zero because the new rows of receptance/key/value and the new
   columns of g2 are random. Every other new parameter of the new heads has exactly zero
   gradient on the first step and receives gradient once those columns have moved.
3. Layers: a new block's `att.output.weight` and `meta.param_values` (zero) receive gradient
   at once (their inputs y * g and alpha are non-zero); the rest of the block reaches the
   loss only through these two and starts receiving gradient after the first step, as in
   a freshly initialised RWKV-7 block.
4. SSE heads: the new `sse_gate` entries (zero) receive gradient at once,
   dL/dgate = dL/du * z with z the (non-zero) SSE readout of the new heads.

Product mode (SPEC section 7): rules 2-4 are exact as they are; rule 1 is refused (n = m*m),
and `grow_sub_keys` (m -> m') is a warm start, not function-preserving (see its docstring).
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import MetaStateError
from .params import init_layer, param_shapes, shape_mismatch

LAYER_POSITIONS = ("end", "after0")


class GrowthError(MetaStateError, ValueError):
    """A growth step that cannot be applied (shrinking, unknown rule, tensors not matching)."""


# -- helpers ---------------------------------------------------------------------------------

def _check_tensors(cfg: ModelConfig, tensors: dict) -> None:
    problem = shape_mismatch(cfg, tensors)
    if problem:
        raise GrowthError(f"tensors do not match the config: {problem}")


def _is_noop(what: str, current: int, target) -> bool:
    """Validate a growth target; True when it equals the current size."""
    if not isinstance(target, (int, np.integer)) or isinstance(target, bool):
        raise GrowthError(f"{what} target must be an integer, got {target!r}")
    if target < current:
        raise GrowthError(f"cannot grow {what} from {current} to {target}: growth only enlarges a model")
    return target == current


def _generator(rng) -> np.random.Generator:
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError):
        raise GrowthError(f"rng must be a numpy Generator or a seed >= 0, got {rng!r}") from None


def _noop(cfg: ModelConfig, tensors: dict):
    return cfg.replace(growth=[dict(s) for s in cfg.growth], extra=dict(cfg.extra)), dict(tensors)


def _next_config(cfg: ModelConfig, record: dict, **changes) -> ModelConfig:
    # ModelConfig.__post_init__ validates the grown config.
    return cfg.replace(**changes, growth=[dict(s) for s in cfg.growth] + [record], extra=dict(cfg.extra))


def _cat(old, fresh, axis: int) -> np.ndarray:
    """old with fresh appended along axis, in old's dtype."""
    old = np.asarray(old)
    return np.concatenate([old, np.asarray(fresh).astype(old.dtype)], axis=axis)


# -- the four rules --------------------------------------------------------------------------

def grow_param_tokens(cfg: ModelConfig, tensors: dict, n_param_tokens: int, *, rng=0):
    """SPEC 5.1: n -> n' parameter tokens in every layer.

    Appends n' - n rows to `meta.param_keys` [n, d] (random, init_layer's scale) and
    `meta.param_values` [n, d] (zeros): the new tokens add nothing until their values move.
    """
    _check_tensors(cfg, tensors)
    if cfg.product:
        raise GrowthError("a product-mode model has n_sub_keys^2 parameter tokens: grow n_sub_keys "
                          "(`metastate grow --sub-keys M`) instead of the parameter tokens")
    n, d = cfg.n_param_tokens, cfg.d_model
    if _is_noop("n_param_tokens", n, n_param_tokens):
        return _noop(cfg, tensors)
    rng = _generator(rng)
    new_cfg = _next_config(cfg, {"rule": "param_tokens", "from": n, "to": int(n_param_tokens)},
                           n_param_tokens=int(n_param_tokens))
    extra = n_param_tokens - n
    out = dict(tensors)
    for i in range(cfg.n_layer):
        b = f"blocks.{i}.meta."
        scale = 0.5 / np.sqrt(d)  # init_layer's param_keys scale
        out[b + "param_keys"] = _cat(tensors[b + "param_keys"], rng.uniform(-scale, scale, (extra, d)), 0)
        out[b + "param_values"] = _cat(tensors[b + "param_values"], np.zeros((extra, d)), 0)
    return new_cfg, out


def grow_sub_keys(cfg: ModelConfig, tensors: dict, n_sub_keys: int, *, rng=0):
    """Product mode (SPEC sections 5, 7): m -> m' sub-keys per half, n = m^2 -> m'^2 tokens.

    Appends m' - m rows to each half of `meta.sub_keys` [P, 2, m, d/2] (random, init_layer's
    scale) and re-indexes `meta.param_values`: old row i*m + j moves to i*m' + j, new rows are
    zero. Every old token keeps its key and value, and the old tokens keep their order, but a
    new (zero-valued) token can push an old one out of a head's top-k: a warm start, not
    function-preserving in general (`metastate grow --sub-keys` reports the measured change).
    """
    _check_tensors(cfg, tensors)
    if not cfg.product:
        raise GrowthError("n_sub_keys grows in product mode only: a dense model grows its parameter tokens "
                          "(--param-tokens)")
    m, d = cfg.n_sub_keys, cfg.d_model
    if _is_noop("n_sub_keys", m, n_sub_keys):
        return _noop(cfg, tensors)
    rng, new = _generator(rng), int(n_sub_keys)
    new_cfg = _next_config(cfg, {"rule": "sub_keys", "from": m, "to": new}, n_sub_keys=new, n_param_tokens=new * new)
    out = dict(tensors)
    for i in range(cfg.n_layer):
        b = f"blocks.{i}.meta."
        keys, values = np.asarray(tensors[b + "sub_keys"]), np.asarray(tensors[b + "param_values"])
        scale = 0.5 / np.sqrt(d)  # init_layer's sub_keys scale
        out[b + "sub_keys"] = _cat(keys, rng.uniform(-scale, scale, (*keys.shape[:2], new - m, d // 2)), 2)
        grown = np.zeros((new, new, d), values.dtype)
        grown[:m, :m] = values.reshape(m, m, d)
        out[b + "param_values"] = grown.reshape(new * new, d)
    return new_cfg, out


def grow_heads(cfg: ModelConfig, tensors: dict, n_head: int, *, rng=0):
    """SPEC 5.2: H -> H' WKV heads, d_att = H * N -> H' * N; `sse_heads` unchanged.

    Per layer, on the new channels c in [d_att, d_att'): new rows of receptance/key/value
    weights [d_att, d], entries of w0, a0, v0, k_k, k_a [d_att], columns of w2, a2, v2, g2
    [lora, d_att] and rows of r_k [H, N] from the standard init of the grown model;
    ln_x.weight 1 and ln_x.bias 0; zero columns of att.output.weight [d, d_att].
    GroupNorm is per head, so the old heads' outputs are unchanged.
    """
    _check_tensors(cfg, tensors)
    H, N, A = cfg.n_head, cfg.head_size, cfg.d_att
    if _is_noop("n_head", H, n_head):
        return _noop(cfg, tensors)
    rng = _generator(rng)
    new_cfg = _next_config(cfg, {"rule": "heads", "from": H, "to": int(n_head)}, d_att=int(n_head) * N)
    extra = new_cfg.d_att - A
    out = dict(tensors)
    for i in range(cfg.n_layer):
        b = f"blocks.{i}.att."
        init = init_layer(new_cfg, i, rng)

        def extend(name, fresh, axis):
            out[b + name] = _cat(tensors[b + name], fresh, axis)

        for name in ("receptance.weight", "key.weight", "value.weight"):
            extend(name, init[b + name][A:], 0)
        for name in ("w0", "a0", "k_k", "k_a", "ln_x.bias") + (("v0",) if i else ()):
            extend(name, init[b + name][A:], 0)
        for name in ("w2", "a2", "g2") + (("v2",) if i else ()):
            extend(name, init[b + name][:, A:], 1)
        extend("r_k", init[b + "r_k"][H:], 0)
        extend("ln_x.weight", np.ones(extra), 0)
        extend("output.weight", np.zeros((cfg.d_model, extra)), 1)
    return new_cfg, out


def grow_layers(cfg: ModelConfig, tensors: dict, n_layer: int, *, position: str = "end", rng=0):
    """SPEC 5.3: L -> L' blocks, appended at the end or inserted after block 0.

    position "after0" puts the new blocks at indices 1 .. L'-L and renumbers the old blocks
    i >= 1 to i + L' - L. Block 0 stays first: it produces v_first and has no v0/v1/v2.
    New blocks are `init_layer` of the grown model at their new index (so with v0/v1/v2),
    with att.output.weight and meta.param_values zero: each is the identity at first.
    Their dtype is that of the same tensor in the last old block.
    """
    _check_tensors(cfg, tensors)
    if position not in LAYER_POSITIONS:
        raise GrowthError(f"layer position must be one of {LAYER_POSITIONS}, got {position!r}")
    L = cfg.n_layer
    if _is_noop("n_layer", L, n_layer):
        return _noop(cfg, tensors)
    rng = _generator(rng)
    new_cfg = _next_config(cfg, {"rule": "layers", "from": L, "to": int(n_layer), "position": position},
                           n_layer=int(n_layer))
    extra = n_layer - L
    first = L if position == "end" else 1
    out = {}
    for name, t in tensors.items():
        if name.startswith("blocks."):
            i, rest = name[len("blocks."):].split(".", 1)
            if int(i) >= first:
                name = f"blocks.{int(i) + extra}.{rest}"
        out[name] = t

    def dtype_of(rest):  # v0/v1/v2 do not exist in block 0: fall back to w0's dtype
        like = tensors.get(f"blocks.{L - 1}.{rest}", tensors[f"blocks.{L - 1}.att.w0"])
        return np.asarray(like).dtype

    for j in range(first, first + extra):
        b = f"blocks.{j}."
        init = init_layer(new_cfg, j, rng)
        # Identity at first (init_layer already zeroes both; SPEC 5.3 requires it).
        init[b + "att.output.weight"] = np.zeros_like(init[b + "att.output.weight"])
        init[b + "meta.param_values"] = np.zeros_like(init[b + "meta.param_values"])
        for name, t in init.items():
            out[name] = t.astype(dtype_of(name[len(b):]))
    return new_cfg, {name: out[name] for name in param_shapes(new_cfg)}


def grow_sse_heads(cfg: ModelConfig, tensors: dict, sse_heads: int):
    """SPEC 5.4: raise `sse_heads` K -> K' (at most min(d_model, d_att) // N).

    `meta.sse_gate` [d] is set to zero on the newly read channels [K*N, K'*N). Entries there
    had no effect before (trained or random values may be non-zero); they are zeroed so the
    logits stay identical, and the record's "gate_zeroed" counts the non-zero entries reset
    (over all layers).
    """
    _check_tensors(cfg, tensors)
    K, N = cfg.sse_heads, cfg.head_size
    if _is_noop("sse_heads", K, sse_heads):
        return _noop(cfg, tensors)
    limit = min(cfg.d_model, cfg.d_att) // N
    if sse_heads > limit:
        raise GrowthError(f"sse_heads {sse_heads} exceeds min(d_model, d_att) // head_size = {limit}"
                          + ("; grow the heads first" if cfg.d_att < cfg.d_model else ""))
    out = dict(tensors)
    zeroed = 0
    for i in range(cfg.n_layer):
        name = f"blocks.{i}.meta.sse_gate"
        gate = np.array(tensors[name])  # copy
        zeroed += int(np.count_nonzero(gate[K * N: sse_heads * N]))
        gate[K * N: sse_heads * N] = 0
        out[name] = gate
    record = {"rule": "sse_heads", "from": K, "to": int(sse_heads), "gate_zeroed": zeroed}
    return _next_config(cfg, record, sse_heads=int(sse_heads)), out


def grow(cfg: ModelConfig, tensors: dict, *, param_tokens=None, heads=None, layers=None,
         sse_heads=None, sub_keys=None, layer_position: str = "end", rng=0, d_model=None, head_size=None):
    """Apply the given growth steps in the fixed order param_tokens (or sub_keys in product
    mode), heads, sse_heads, layers.

    Heads come before sse_heads (more SSE heads may need the wider d_att); layers come last,
    so new blocks are initialised at the final width, head count and parameter-token count.
    A target of None (or equal to the current size) skips that step. d_model and head_size
    never grow (LayerNorm/GroupNorm statistics would change): any other value than the
    current one raises GrowthError.
    """
    for what, asked, current in (("d_model", d_model, cfg.d_model), ("head_size", head_size, cfg.head_size)):
        if asked is not None and asked != current:
            raise GrowthError(f"{what} cannot grow ({current} -> {asked}): LayerNorm/GroupNorm "
                              "statistics would change; grow heads, layers, param_tokens or sse_heads")
    if layer_position not in LAYER_POSITIONS:
        raise GrowthError(f"layer position must be one of {LAYER_POSITIONS}, got {layer_position!r}")
    _check_tensors(cfg, tensors)
    rng = _generator(rng)  # one stream shared by the steps
    out_cfg, out = _noop(cfg, tensors)
    if param_tokens is not None:
        out_cfg, out = grow_param_tokens(out_cfg, out, param_tokens, rng=rng)
    if sub_keys is not None:
        out_cfg, out = grow_sub_keys(out_cfg, out, sub_keys, rng=rng)
    if heads is not None:
        out_cfg, out = grow_heads(out_cfg, out, heads, rng=rng)
    if sse_heads is not None:
        out_cfg, out = grow_sse_heads(out_cfg, out, sse_heads)
    if layers is not None:
        out_cfg, out = grow_layers(out_cfg, out, layers, position=layer_position, rng=rng)
    return out_cfg, out
