"""PyTorch / Triton backend: `Model`, `load_model` and the CLI's `compute_logits`.

Needs the `torch` extra; importing this package without torch raises `TorchUnavailable`.
"""

from __future__ import annotations

from metastate_core.errors import MetaStateError


class TorchUnavailable(MetaStateError, ImportError):
    """torch is not installed."""


try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise TorchUnavailable("the torch backend needs torch: pip install 'metastate[torch]'") from e

from .model import Model, ModelArgs, ModelError, State, load_model  # noqa: E402

__all__ = ["Model", "ModelArgs", "ModelError", "State", "TorchUnavailable", "compute_logits", "load_model"]

_DTYPES = {None: "float32", "float32": "float32", "bfloat16": "bfloat16"}


def compute_logits(model_dir, tokens, *, kernels: str = "auto", dtype: str | None = None):
    """Logits float32 numpy [T, V] of one sequence of token ids [T].

    kernels: "auto" (Triton on a CUDA device, else plain ops), "ops" or "triton".
    dtype: None or "float32" (weights cast to float32), or "bfloat16".
    """
    import numpy as np

    if kernels not in ("auto", "ops", "triton"):
        raise ModelError(f"kernels {kernels!r} are not available on the torch backend (use auto, ops or triton)")
    if dtype not in _DTYPES:
        raise ModelError(f"dtype {dtype!r} is not available on the torch backend (use float32 or bfloat16)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kernels == "auto":
        kernels = "triton" if device == "cuda" else "ops"
    model = load_model(model_dir, device=device, dtype=_DTYPES[dtype]).eval()
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device)
    with torch.no_grad():
        logits, _ = model(tokens[None], kernels=kernels)
    return logits[0].float().cpu().numpy()
