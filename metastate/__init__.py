"""Meta-State: RWKV-7 with a Self-State Encoder. The `metastate` command lives in `metastate.cli`."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metastate")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
