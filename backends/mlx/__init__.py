"""MLX backend: the model (plain ops or Metal kernels), `State`, loading, saving and 4/8-bit
quantization (utils.py).

Needs the `mlx` extra; importing this package without mlx raises `ExtraUnavailable`.
"""

from metastate_core.errors import ModelError, require_extra

require_extra("mlx.core", "mlx")

from .model import Model, ModelArgs, State  # noqa: E402
from .utils import convert, load, quantize, save  # noqa: E402

__all__ = ["Model", "ModelArgs", "ModelError", "State", "convert", "load", "quantize", "save"]
