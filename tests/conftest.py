"""Shared test set-up.

Triton kernels run on the CPU under Triton's interpreter; the variable must be set before
triton is first imported, so it is set here, ahead of every test module.
"""

import os
import tempfile

# load(backend="auto") times the backends once and caches the choice under XDG_CACHE_HOME: the
# tests keep theirs in a fresh folder, never in the user's cache
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="metastate-test-cache-"))

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
