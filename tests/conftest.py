"""Shared test set-up.

Triton kernels run on the CPU under Triton's interpreter; the variable must be set before
triton is first imported, so it is set here, ahead of every test module.
"""

import os
import random
import tempfile

import pytest

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


WORDS = "the king queen lord sword crown night day love death speak hear my thou art".split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny prepared corpus (prepare-data of four 60-line documents, a 300-piece vocabulary),
    for the trainer's and tuning's tests; the documents lie beside it."""
    from metastate.train.data import prepare_data

    root = tmp_path_factory.mktemp("train_data")
    rng = random.Random(0)
    for i in range(4):
        lines = (" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(60))
        (root / f"doc{i}.txt").write_text("\n".join(lines))
    prepare_data([root], root / "data", vocab_size=300, val_fraction=0.1)
    return root / "data"
