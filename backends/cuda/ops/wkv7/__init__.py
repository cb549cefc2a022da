"""WKV-7 (RWKV-7 time mix) + Self-State Encoder readout, in four implementations:

    naive_wkv7, naive_wkv7_step, state_readout
                        per-token recurrence in plain torch (naive.py): the twin every kernel is
                        tested against, and the model's plain-ops decode step
    torch_chunked_wkv7  chunked (WY) form in plain torch ops: any device, autograd
    chunk_wkv7          chunked (WY) Triton kernels on tensor cores (chunk.py): the model's
                        sequence path (see docs/kernels.md)
    triton_wkv7, triton_wkv7_step, triton_state_read
                        sequential and decode Triton kernels (triton_ops.py), same contract

Their input checks, limits (MAX_HEAD_SIZE of chunk_wkv7) and WKV7InputError live in checks.py.
Triton is imported only when a kernel is asked for, so the plain-ops path works where
triton is not installed (macOS).
"""

import importlib

from .checks import MAX_HEAD_SIZE, WKV7InputError
from .naive import decay_log, naive_wkv7, naive_wkv7_step, state_readout
from .torch_chunked import torch_chunked_wkv7

_LAZY = {"triton_wkv7": "triton_ops", "triton_wkv7_step": "triton_ops", "triton_state_read": "triton_ops",
         "CHUNK": "sequential", "chunk_wkv7": "chunk"}

__all__ = ["naive_wkv7", "naive_wkv7_step", "state_readout", "torch_chunked_wkv7", "decay_log", "MAX_HEAD_SIZE",
           "WKV7InputError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
