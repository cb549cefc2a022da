"""PyTorch / Triton backend: `Model` and `load_model` (the engine over them: `metastate.api`).

Needs the `torch` extra; importing this package without torch raises `TorchUnavailable`.
"""

from __future__ import annotations

from metastate_core.errors import MetaStateError


class TorchUnavailable(MetaStateError, ImportError):
    """torch is not installed."""

    exit_code = 2  # as for every missing extra (metastate's BackendUnavailable)


try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise TorchUnavailable("the torch backend needs torch: pip install 'metastate[torch]'") from e

from .model import Model, ModelArgs, ModelError, State, load_model  # noqa: E402

__all__ = ["Model", "ModelArgs", "ModelError", "State", "TorchUnavailable", "load_model"]
