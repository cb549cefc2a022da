"""MLX backend: the model (plain ops or Metal kernels), generation, 4/8-bit quantization.

Needs the `mlx` extra; importing this package without mlx raises `MLXUnavailable`.
"""

from __future__ import annotations

from metastate_core.errors import MetaStateError


class MLXUnavailable(MetaStateError, ImportError):
    """mlx is not installed."""

    exit_code = 2  # as for every missing extra (metastate's BackendUnavailable)


try:
    import mlx.core  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise MLXUnavailable("the mlx backend needs mlx: pip install 'metastate[mlx]'") from e

from .generate import generate, prefill, stream_generate  # noqa: E402
from .model import (Cache, Model, ModelArgs, ModelError, convert, from_weights, load,  # noqa: E402
                    quantize, resolve_kernels, save)

__all__ = ["Cache", "MLXUnavailable", "Model", "ModelArgs", "ModelError", "convert",
           "from_weights", "generate", "load", "prefill", "quantize", "resolve_kernels", "save",
           "stream_generate"]
