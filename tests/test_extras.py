"""A missing pip extra: one line naming `pip install -e '.[EXTRA]'` (run in a clone: no package
of this name is published) and exit status 2, from every command that needs it (issue 20)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metastate_core.config import ModelConfig
from metastate_core.errors import ExtraUnavailable, install_hint, require_extra
from metastate_core.params import random_params
from weights import save_model

REPO = Path(__file__).resolve().parents[1]
# torch unimportable in the child, as on a machine without the torch extra
NO_TORCH = "import sys; sys.modules['torch'] = None; from metastate.cli import main; sys.exit(main(sys.argv[1:]))"


def metastate_without_torch(*argv):
    return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def assert_missing_torch(done, what):
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: {what}") and done.stderr.rstrip().endswith("pip install -e '.[torch]'")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("extras")
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=1, head_size=16, n_param_tokens=32)
    save_model(root / "rwkv7", cfg, random_params(cfg, 0, np.float32, sse=False))
    save_model(root / "sse", cfg, random_params(cfg, 0, np.float32))
    (root / "model.pth").write_bytes(b"never read without torch")
    return root


def test_install_hint_names_the_command_run_in_a_clone():
    assert install_hint("torch") == "pip install -e '.[torch]'"
    with pytest.raises(ExtraUnavailable, match=r"^reading X needs no_such_module: pip install -e '\.\[mlx\]'$"):
        require_extra("no_such_module.sub", "mlx", "reading X")
    assert ExtraUnavailable.exit_code == 2


def test_pth_conversions_without_torch_exit_2(models, tmp_path):
    assert_missing_torch(metastate_without_torch("convert", models / "rwkv7", "--to-pth", tmp_path / "a.pth"),
                         "writing an official .pth checkpoint needs torch")
    assert_missing_torch(metastate_without_torch("convert", models / "model.pth", "--out", tmp_path / "b"),
                         "reading an official .pth checkpoint needs torch")
    # a model the format cannot hold is refused as such: installing torch would not help
    done = metastate_without_torch("convert", models / "sse", "--to-pth", tmp_path / "c.pth")
    assert done.returncode == 1 and "sse_gate is non-zero" in done.stderr and "pip" not in done.stderr
    assert not any(tmp_path.iterdir())


def test_bench_train_without_torch_exits_2(models):
    done = metastate_without_torch("bench", "--train", "--model", models / "rwkv7", "--repeats", 1)
    assert_missing_torch(done, "training benchmarks need the torch backend")
