"""Canonical parameter names and shapes (SPEC section 4), and initialisation."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig

ATT_VECTORS_D = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a model, name -> shape, in canonical order."""
    V, d, A, H, N = cfg.vocab_size, cfg.d_model, cfg.d_att, cfg.n_head, cfg.head_size
    shapes = {"emb.weight": (V, d), "blocks.0.ln0.weight": (d,), "blocks.0.ln0.bias": (d,)}
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        shapes.update({b + "ln1.weight": (d,), b + "ln1.bias": (d,),
                       b + "ln2.weight": (d,), b + "ln2.bias": (d,)})
        shapes.update({b + f"att.{name}": (d,) for name in ATT_VECTORS_D})
        shapes.update({b + "att.w0": (A,), b + "att.w1": (d, cfg.lora_w), b + "att.w2": (cfg.lora_w, A),
                       b + "att.a0": (A,), b + "att.a1": (d, cfg.lora_a), b + "att.a2": (cfg.lora_a, A)})
        if i > 0:
            shapes.update({b + "att.v0": (A,), b + "att.v1": (d, cfg.lora_v), b + "att.v2": (cfg.lora_v, A)})
        shapes.update({b + "att.g1": (d, cfg.lora_g), b + "att.g2": (cfg.lora_g, A),
                       b + "att.k_k": (A,), b + "att.k_a": (A,), b + "att.r_k": (H, N),
                       b + "att.receptance.weight": (A, d), b + "att.key.weight": (A, d),
                       b + "att.value.weight": (A, d), b + "att.output.weight": (d, A),
                       b + "att.ln_x.weight": (A,), b + "att.ln_x.bias": (A,)})
        shapes[b + "meta.x_k"] = (d,)
        if cfg.product:  # SPEC section 7: P heads of two sub-key tables over the halves of u
            shapes[b + "meta.sub_keys"] = (cfg.param_heads, 2, cfg.n_sub_keys, d // 2)
        else:
            shapes[b + "meta.param_keys"] = (cfg.n_param_tokens, d)
        shapes.update({b + "meta.param_values": (cfg.n_param_tokens, d), b + "meta.sse_gate": (d,)})
    shapes.update({"ln_out.weight": (d,), "ln_out.bias": (d,), "head.weight": (V, d)})
    return shapes


def orthogonal(rng: np.random.Generator, shape, gain: float) -> np.ndarray:
    rows, cols = shape
    q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    q = q * np.sign(np.diag(r))
    return gain * (q if rows >= cols else q.T)[:rows, :cols]


def init_layer(cfg: ModelConfig, layer: int, rng: np.random.Generator, n_layer: int | None = None) -> dict:
    """RWKV-7's training initialisation of one block (RWKV-LM x070), float64.

    Output projections (`att.output.weight`, `meta.param_values`) start at zero as in
    RWKV-7, so a freshly initialised block is the identity; `sse_gate` starts at zero.
    """
    L = n_layer or cfg.n_layer
    d, A, H, N = cfg.d_model, cfg.d_att, cfg.n_head, cfg.head_size
    ratio_0_to_1 = layer / max(L - 1, 1)
    ratio_1_to_almost0 = 1.0 - layer / L
    ddd = np.arange(d) / d
    n = np.arange(A)
    linear = n / max(A - 1, 1) - 0.5
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * np.abs(zigzag)
    decay = -6 + 6 * (n / max(A - 1, 1)) ** (1 + ratio_0_to_1 ** 0.3)
    b = f"blocks.{layer}."
    p = {b + "ln1.weight": np.ones(d), b + "ln1.bias": np.zeros(d),
         b + "ln2.weight": np.ones(d), b + "ln2.bias": np.zeros(d)}
    for name, power in zip(ATT_VECTORS_D, (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)):
        p[b + f"att.{name}"] = 1.0 - ddd ** (power * ratio_1_to_almost0)
    p[b + "att.w0"] = decay + 0.5 + zigzag * 2.5
    p[b + "att.w1"] = np.zeros((d, cfg.lora_w))
    p[b + "att.w2"] = orthogonal(rng, (cfg.lora_w, A), 0.1)
    p[b + "att.a0"] = -0.19 + zigzag * 0.3 + linear * 0.4
    p[b + "att.a1"] = np.zeros((d, cfg.lora_a))
    p[b + "att.a2"] = orthogonal(rng, (cfg.lora_a, A), 0.1)
    if layer > 0:
        p[b + "att.v0"] = 0.73 - linear * 0.4
        p[b + "att.v1"] = np.zeros((d, cfg.lora_v))
        p[b + "att.v2"] = orthogonal(rng, (cfg.lora_v, A), 0.1)
    p[b + "att.g1"] = np.zeros((d, cfg.lora_g))
    p[b + "att.g2"] = orthogonal(rng, (cfg.lora_g, A), 0.1)
    p[b + "att.k_k"] = 0.71 - linear * 0.1
    p[b + "att.k_a"] = np.full(A, 1.02)
    p[b + "att.r_k"] = np.full((H, N), -0.04)
    s = 1 / np.sqrt(d)
    p[b + "att.receptance.weight"] = rng.uniform(-0.5 * s, 0.5 * s, (A, d))
    p[b + "att.key.weight"] = rng.uniform(-0.05 * s, 0.05 * s, (A, d))
    p[b + "att.value.weight"] = rng.uniform(-0.5 * s, 0.5 * s, (A, d))
    p[b + "att.output.weight"] = np.zeros((d, A))
    p[b + "att.ln_x.weight"] = np.full(A, ((1 + layer) / L) ** 0.7)
    p[b + "att.ln_x.bias"] = np.zeros(A)
    p[b + "meta.x_k"] = 1.0 - ddd ** (ratio_1_to_almost0 ** 4)
    # product keys: each half-key at the dense keys' scale, so concat(K0[i], K1[j]) is a dense key
    keys = ((cfg.param_heads, 2, cfg.n_sub_keys, d // 2), "meta.sub_keys") if cfg.product else \
        ((cfg.n_param_tokens, d), "meta.param_keys")
    p[b + keys[1]] = rng.uniform(-0.5 * s, 0.5 * s, keys[0])
    p[b + "meta.param_values"] = np.zeros((cfg.n_param_tokens, d))
    p[b + "meta.sse_gate"] = np.zeros(d)
    return p


def init_params(cfg: ModelConfig, rng: np.random.Generator | int = 0, dtype=np.float32) -> dict:
    """A freshly initialised model for training, canonical names -> arrays."""
    rng = np.random.default_rng(rng)
    V, d = cfg.vocab_size, cfg.d_model
    p = {"emb.weight": rng.uniform(-1e-4, 1e-4, (V, d)),
         "blocks.0.ln0.weight": np.ones(d), "blocks.0.ln0.bias": np.zeros(d)}
    for layer in range(cfg.n_layer):
        p.update(init_layer(cfg, layer, rng))
    p["ln_out.weight"], p["ln_out.bias"] = np.ones(d), np.zeros(d)
    p["head.weight"] = orthogonal(rng, (V, d), 0.5 * np.sqrt(V / d) if V > d else 0.5)
    order = param_shapes(cfg)
    return {name: p[name].astype(dtype) for name in order}


def random_params(cfg: ModelConfig, rng: np.random.Generator | int = 0, dtype=np.float64,
                  sse: bool = True) -> dict:
    """A trained-looking random model for tests: the training init plus noise on every tensor,
    so that no path (output projections, LoRAs, SSE gate) is trivially zero.

    With sse=False every sse_gate is zero: the model is exactly RWKV-7.
    """
    rng = np.random.default_rng(rng)
    p = init_params(cfg, rng, np.float64)
    for name, t in p.items():
        scale = 0.5 / np.sqrt(t.shape[-1]) if t.ndim >= 2 else 0.1
        if name.endswith(("emb.weight", "head.weight")):
            scale = 1.0 if name == "emb.weight" else 1.0 / np.sqrt(t.shape[-1])
        p[name] = t + rng.normal(0.0, scale, t.shape)
    for name in p:
        if name.endswith("meta.sse_gate"):
            p[name] = rng.normal(0.0, 0.5, p[name].shape) if sse else np.zeros_like(p[name])
    return {name: t.astype(dtype) for name, t in p.items()}


def shape_mismatch(cfg: ModelConfig, tensors: dict) -> str | None:
    """The first way `tensors` differ from `param_shapes(cfg)` in names or shapes, or None.

    Each caller raises it as its own error type.
    """
    expected = param_shapes(cfg)
    for names, what in (([n for n in expected if n not in tensors], "missing tensor {!r}"),
                        ([n for n in tensors if n not in expected], "unexpected tensor {!r}")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            return what.format(names[0]) + more
    for name, shape in expected.items():
        actual = tuple(np.shape(tensors[name]))
        if actual != shape:
            return f"tensor {name!r} has shape {list(actual)}, expected {list(shape)}"
    return None
