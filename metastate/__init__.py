"""Meta-State: RWKV-7 with a Self-State Encoder. The `metastate` command lives in `metastate.cli`."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metastate")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["load", "generate", "stream_generate", "batch_generate", "__version__"]


def __getattr__(name):  # the Python API, imported on first use so `import metastate` stays light
    if name in ("load", "generate", "stream_generate", "batch_generate"):
        from metastate import api

        return getattr(api, name)
    raise AttributeError(f"module 'metastate' has no attribute {name!r}")
