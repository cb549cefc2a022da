"""The library's error types: every failure a user can cause is one of these."""

import importlib


class MetaStateError(Exception):
    """Base of every error this library raises on bad input; the CLI prints it as one line."""


class ModelError(MetaStateError):
    """Tensors that do not fit the config, or a request a model cannot serve (any backend)."""


class ExtraUnavailable(MetaStateError, ImportError):
    """An optional dependency (a pip extra: torch, mlx) is not installed."""

    exit_code = 2  # the CLI's status for every missing extra


def require_extra(module: str, extra: str) -> None:
    """Import `module`, or raise ExtraUnavailable naming `pip install 'metastate[extra]'`."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ExtraUnavailable(f"the {extra} backend needs {module.split('.')[0]}: "
                               f"pip install 'metastate[{extra}]'") from e
