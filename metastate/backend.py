"""One seam between the CLI and the compute backends: `compute_logits`.

A backend is a function `(model_dir, tokens [T], kernels, dtype) -> logits [T, V]`. The NumPy
reference lives here; the torch and MLX backends are imported lazily from `backends.cuda` and
`backends.mlx`, which plug in by exposing

    compute_logits(model_dir, tokens, *, kernels: str, dtype: str | None) -> np.ndarray [T, V]

Adding a backend is one entry in `BACKENDS` (and, for a lazy one, `_LAZY`).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np

from metastate_core.errors import MetaStateError

BACKENDS = ("numpy", "torch", "mlx")
KERNELS = ("auto", "ops", "triton", "metal")
DTYPES = ("float64", "float32", "bfloat16")

# backend name -> (module that implements it, import name of the extra's main package)
_LAZY = {"torch": ("backends.cuda", "torch"), "mlx": ("backends.mlx", "mlx")}


class BackendError(MetaStateError):
    """An unknown, unavailable or misused backend."""

    exit_code = 1


class BackendUnavailable(BackendError):
    """The backend exists in the design but cannot run here (extra missing, not built yet)."""

    exit_code = 2


def check_tokens(tokens, vocab_size: int) -> np.ndarray:
    """Token ids as int64 [T]; raises on an empty list or an id outside [0, vocab_size)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise MetaStateError("expected a non-empty list of token ids")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise MetaStateError("token ids must be integers")
    bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
    if bad.size:
        raise MetaStateError(f"token id {int(bad[0])} is out of range for vocab_size {vocab_size}")
    return tokens.astype(np.int64)


def _numpy_logits(model_dir, tokens, kernels: str, dtype: str | None) -> np.ndarray:
    """The reference forward pass. dtype: float64 (default), float32, or bfloat16 (weights
    rounded to bfloat16, compute in float32)."""
    from metastate_core.reference import forward
    from weights import load_model

    if kernels not in ("auto", "ops"):
        raise BackendError(f"kernels {kernels!r} are not available on the numpy backend (use auto or ops)")
    dtype = dtype or "float64"
    cfg, weights = load_model(model_dir, dtype="bfloat16" if dtype == "bfloat16" else None)
    compute = np.float64 if dtype == "float64" else np.float32
    logits, _ = forward(weights, cfg, tokens[None], dtype=compute)
    return logits[0].astype(np.float32)


def _lazy_backend(name: str):
    module_name, package = _LAZY[name]

    def run(model_dir, tokens, kernels, dtype):
        if importlib.util.find_spec(package) is None:
            raise BackendUnavailable(f"the {name} backend needs {package}: install with pip install 'metastate[{name}]'")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):  # a dependency is missing
                raise BackendUnavailable(f"the {name} backend cannot be imported: {e}") from e
            module = None
        impl = getattr(module, "compute_logits", None)
        if impl is None:
            raise BackendUnavailable(f"the {name} backend is not available yet in this version")
        return np.asarray(impl(model_dir, tokens, kernels=kernels, dtype=dtype), dtype=np.float32)

    return run


_IMPLS = {"numpy": _numpy_logits, **{name: _lazy_backend(name) for name in _LAZY}}


def compute_logits(model_dir, tokens, backend: str = "numpy", kernels: str = "auto",
                   dtype: str | None = None) -> np.ndarray:
    """Logits float32 [T, V] of one sequence of token ids [T] under the model in model_dir.

    dtype None means the backend's default (float64 for numpy).
    """
    if backend not in _IMPLS:
        raise BackendError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if kernels not in KERNELS:
        raise BackendError(f"unknown kernels {kernels!r}: expected one of {', '.join(KERNELS)}")
    if dtype is not None and dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    from weights import load_config

    model_dir = Path(model_dir)
    tokens = check_tokens(tokens, load_config(model_dir).vocab_size)  # before any heavy load
    return _IMPLS[backend](model_dir, tokens, kernels, dtype)
