"""PyTorch backend: CUDA through Triton kernels, any device through plain torch ops. `Model`,
`State` and `load_model` (the engine over them: `metastate.api`).

Needs the `torch` extra; importing this package without torch raises `ExtraUnavailable`.
"""

from metastate_core.errors import ModelError, require_extra

require_extra("torch", "torch")

from .model import Model, ModelArgs, State  # noqa: E402
from .utils import load_model  # noqa: E402

__all__ = ["Model", "ModelArgs", "ModelError", "State", "load_model"]
