"""WKV-7 (RWKV-7 time mix) + Self-State Encoder readout, in three implementations:

    naive_wkv7          per-token recurrence in plain torch: the twin every kernel is tested against
    torch_chunked_wkv7  chunked (WY) form in plain torch ops: any device, autograd
    triton_wkv7, triton_wkv7_step, triton_state_read
                        Triton kernels (triton_ops.py): CUDA, or the CPU interpreter in tests
    chunk_wkv7          chunked (WY) Triton kernels on tensor cores (chunk.py), same contract
                        as triton_wkv7; the model's sequence path (see docs/kernels.md)

Triton is imported only when a kernel is asked for, so the plain-ops path works where
triton is not installed (macOS).
"""

from .naive import DECAY_SCALE, decay_log, naive_wkv7
from .torch_chunked import torch_chunked_wkv7

_TRITON_NAMES = ("triton_wkv7", "triton_wkv7_step", "triton_state_read", "CHUNK", "WKV7InputError")
_CHUNK_NAMES = ("chunk_wkv7",)

__all__ = ["naive_wkv7", "torch_chunked_wkv7", "decay_log", "DECAY_SCALE", *_TRITON_NAMES, *_CHUNK_NAMES]


def __getattr__(name):
    if name in _TRITON_NAMES:
        from . import triton_ops

        return getattr(triton_ops, name)
    if name in _CHUNK_NAMES:
        from . import chunk

        return getattr(chunk, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
