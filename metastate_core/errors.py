"""The library's error types: every failure a user can cause is one of these."""

import importlib


class MetaStateError(Exception):
    """Base of every error this library raises on bad input; the CLI prints it as one line."""


class ModelError(MetaStateError):
    """Tensors that do not fit the config, or a request a model cannot serve (any backend)."""


class ExtraUnavailable(MetaStateError, ImportError):
    """An optional dependency (a pip extra: torch, mlx) is not installed."""

    exit_code = 2  # the CLI's status for every missing extra


def install_hint(extra: str) -> str:
    """The command that installs a pip extra. No package of this name is published: it is run
    in a clone of this repository."""
    return f"pip install -e '.[{extra}]'"


def require_extra(module: str, extra: str, what: str | None = None) -> None:
    """Import `module`, or raise ExtraUnavailable naming `pip install -e '.[extra]'`.

    what: what needs it, for the message (default: "the EXTRA backend")."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ExtraUnavailable(f"{what or f'the {extra} backend'} needs {module.split('.')[0]}: "
                               f"{install_hint(extra)}") from e
