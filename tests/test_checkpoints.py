"""Issue 22 items 4 and 5: a damaged training checkpoint is refused whole, in one line, before
any of it is used; a damaged older checkpoint never breaks a later save's retention; an
optimizer.npz without its moments is refused unless --allow-fresh-optimizer."""

import json
import random
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from metastate.cli import main  # noqa: E402
from metastate.train.checkpoints import list_checkpoints, read_trainer_state  # noqa: E402
from metastate.train.config import TrainConfig, TrainError  # noqa: E402
from metastate.train.data import prepare_data  # noqa: E402
from metastate.train.loop import Trainer, train  # noqa: E402

WORDS = "the king queen lord sword crown night day love death speak hear my thou art".split()
SETTINGS = dict(d_model=32, n_layer=1, head_size=16, seq_len=16, batch_size=2, max_steps=6, warmup_steps=1,
                log_interval=1, eval_interval=2, save_interval=2, eval_sequences=1, keep_last=3, progress=False,
                plot=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run of 6 steps with checkpoints at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("ckpt")
    rng = random.Random(0)
    (root / "doc.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(80)))
    prepare_data([root / "doc.txt"], root / "data", vocab_size=300, val_fraction=0.1)
    train(config(root / "data", root / "run"))
    assert [p.name for p in list_checkpoints(root / "run")] == ["step-000002", "step-000004", "step-000006"]
    return root


def config(data, out, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), **{**SETTINGS, **kw})


def copy_run(run, tmp_path) -> Path:
    shutil.copytree(run / "run", tmp_path / "run")
    return tmp_path / "run" / "checkpoints" / "step-000006"


def set_state(ckpt: Path, change) -> None:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    change(state)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def set_arrays(ckpt: Path, change) -> None:
    with np.load(ckpt / "optimizer.npz") as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    np.savez(ckpt / "optimizer.npz", **arrays)


def resume_error(run, tmp_path, capsys, **kw) -> str:
    """The one line `metastate train --resume` prints for the damaged run in tmp_path (exit 1)."""
    argv = ["train", "--data", str(run / "data"), "--out", str(tmp_path / "run"), "--resume"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items() if not isinstance(v, bool)]
    argv += ["--no-progress", "--no-plot", *(f"--{k.replace('_', '-')}" for k, v in kw.items() if v is True)]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


STATE_DAMAGE = {  # the values issue 22 lists, and the neighbours of each
    "step-string": (lambda s: s.update(step="abc"), "step is 'abc', not an integer in"),
    "step-negative": (lambda s: s.update(step=-5), "step is -5"),
    "step-fraction": (lambda s: s.update(step=3.5), "step is 3.5"),
    "step-huge-float": (lambda s: s.update(step=1e30), "step is 1e"),
    "step-huge-int": (lambda s: s.update(step=10**30), r"step is 10{30}, not an integer in \[0, 6\]"),
    "step-bool": (lambda s: s.update(step=True), "step is True"),
    "step-other-name": (lambda s: s.update(step=4), "step is 4, but the checkpoint is named step-000006"),
    "config-string": (lambda s: s.update(config="d_model=32"), "config is of type str"),
    "config-list": (lambda s: s.update(config=[1]), "config is of type list"),
    "config-max-steps": (lambda s: s["config"].update(max_steps="6"), "config.max_steps is '6'"),
    "rng-missing": (lambda s: s.pop("rng"), "trainer_state.json has no rng"),
    "rng-string": (lambda s: s.update(rng="seed"), "rng is of type str"),
    "rng-python-short": (lambda s: s["rng"]["python"][1].pop(), "rng.python is not"),
    "rng-python-word": (lambda s: s["rng"]["python"][1].__setitem__(3, -1), "rng.python is not"),
    "rng-python-type": (lambda s: s["rng"].update(python={"a": 1}), "rng.python is not"),
    "rng-python-version": (lambda s: s["rng"]["python"].__setitem__(0, 2), "rng.python is not"),
    "rng-numpy-name": (lambda s: s["rng"]["numpy"].__setitem__(0, "PCG64"), "rng.numpy is not"),
    "rng-numpy-pos": (lambda s: s["rng"]["numpy"].__setitem__(1, 625), "rng.numpy is not"),
    "best-string": (lambda s: s.update(best_val_loss="low"), "best_val_loss is 'low', not a number or null"),
    "best-list": (lambda s: s.update(best_val_loss=[1.0]), "best_val_loss is"),
    "val-string": (lambda s: s.update(val_loss="x"), "val_loss is 'x'"),
    "bad-steps": (lambda s: s.update(bad_steps=7), r"bad_steps is 7, not an integer in \[0, 6\]"),
    "skipped-none": (lambda s: s.update(skipped_steps=None), "skipped_steps is None"),
    "amp": (lambda s: s.update(amp="fp8"), "amp is 'fp8'"),
    "fingerprint": (lambda s: s.update(data_fingerprint=5), "data_fingerprint is of type int"),
    "scaler": (lambda s: s.update(grad_scaler="x"), "grad_scaler is of type str"),
    "not-an-object": (lambda s: (s.clear(), s.update({"x": 1})), "trainer_state.json has no step, config"),
}


@pytest.mark.parametrize("name", list(STATE_DAMAGE))
def test_a_damaged_trainer_state_is_refused_in_one_line(run, tmp_path, capsys, name):
    change, message = STATE_DAMAGE[name]
    ckpt = copy_run(run, tmp_path)
    set_state(ckpt, change)
    with pytest.raises(TrainError, match=f"corrupt training checkpoint .*step-000006: {message}"):
        read_trainer_state(ckpt)
    if name in ("step-string", "config-string", "rng-missing", "best-string"):  # the CLI: one line, exit 1
        assert "corrupt training checkpoint" in resume_error(run, tmp_path, capsys)


@pytest.mark.parametrize("text, message", [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                           ('{"step": NaN}', "not valid JSON"), ("", "not valid JSON")])
def test_a_trainer_state_that_is_not_json_is_refused(run, tmp_path, text, message):
    ckpt = copy_run(run, tmp_path)
    (ckpt / "trainer_state.json").write_text(text)
    with pytest.raises(TrainError, match=message):
        read_trainer_state(ckpt)


ARRAY_DAMAGE = {
    "torch-short": (lambda a: a.update({"rng.torch": a["rng.torch"][:100]}),
                    r"rng.torch is uint8 \[100\], expected uint8"),
    "torch-dtype": (lambda a: a.update({"rng.torch": a["rng.torch"].astype(np.int64)}), "rng.torch is int64"),
    "numpy-short": (lambda a: a.update({"rng.numpy": a["rng.numpy"][:5]}), r"rng.numpy is uint32 \[5\]"),
    "numpy-dtype": (lambda a: a.update({"rng.numpy": a["rng.numpy"].astype(np.float64)}), "rng.numpy is float64"),
    "numpy-2d": (lambda a: a.update({"rng.numpy": a["rng.numpy"].reshape(2, 312)}), r"rng.numpy is uint32 \[2, 312\]"),
    "torch-missing": (lambda a: a.pop("rng.torch"), "optimizer.npz has no rng.torch"),
}


@pytest.mark.parametrize("name", list(ARRAY_DAMAGE))
def test_damaged_rng_arrays_are_refused_in_one_line(run, tmp_path, capsys, name):
    change, message = ARRAY_DAMAGE[name]
    ckpt = copy_run(run, tmp_path)
    set_arrays(ckpt, change)
    with pytest.raises(TrainError, match=message):
        read_trainer_state(ckpt)
    if name == "torch-short":
        assert message.split(" is")[0] in resume_error(run, tmp_path, capsys)


def test_an_array_declaring_more_than_its_file_holds_is_refused_before_it_is_read(run, tmp_path):
    """numpy allocates an array's declared shape before reading it: a 1 KB member declaring
    2^40 floats would ask for 8 TiB."""
    ckpt = copy_run(run, tmp_path)
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1099511627776,), }"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 1024
    with zipfile.ZipFile(ckpt / "optimizer.npz", "a") as z:
        z.writestr("huge.npy", npy)
    with pytest.raises(TrainError, match=r"huge.npy declares float64 \[1099511627776\], more than its"):
        read_trainer_state(ckpt)
    (ckpt / "optimizer.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(TrainError, match="corrupt training checkpoint .*optimizer.npz"):
        read_trainer_state(ckpt)


def test_a_damaged_older_checkpoint_never_breaks_a_later_save(run, tmp_path, capsys):
    """Retention reads every checkpoint's trainer_state.json: a damaged one is left alone (and
    named), the save and the retention of the good ones go on."""
    copy_run(run, tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(ckpts / "step-000002", ckpts / "step-000001")
    (ckpts / "step-000001" / "trainer_state.json").write_text('{"step": 1, "val_loss": ')  # cut short
    set_state(ckpts / "step-000002", lambda s: s.update(val_loss="low"))  # min() of "low" and a float: TypeError
    shutil.rmtree(ckpts / "step-000006")  # killed before it: resume from step 4
    capsys.readouterr()
    result = train(config(run / "data", tmp_path / "run", resume="auto", keep_last=1, keep_best=False))
    assert result["step"] == 6
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000001", "step-000002", "step-000006"]
    assert "retention leaves alone the checkpoints it cannot read: step-000001, step-000002" in capsys.readouterr().err


def test_retention_deletes_only_good_checkpoints_and_keeps_the_newest(run, tmp_path):
    from metastate.train.checkpoints import retain

    copy_run(run, tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    set_state(ckpts / "step-000004", lambda s: s.update(step="abc"))
    retain(tmp_path / "run", keep_last=1, keep_best=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000004", "step-000006"]
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]


def _without_moments(ckpt: Path) -> None:
    set_arrays(ckpt, lambda a: [a.pop(k) for k in list(a) if k.startswith("opt.")])


def test_an_optimizer_without_its_moments_is_refused(run, tmp_path, capsys):
    ckpt = copy_run(run, tmp_path)
    _without_moments(ckpt)
    with pytest.raises(TrainError, match="optimizer.npz holds no optimizer moments for .* --allow-fresh-optimizer"):
        Trainer(config(run / "data", tmp_path / "run", resume="auto"))
    assert "--allow-fresh-optimizer" in resume_error(run, tmp_path, capsys)
    # some moments only: refused as well
    ckpt2 = tmp_path / "run" / "checkpoints" / "step-000004"
    set_arrays(ckpt2, lambda a: [a.pop(f"opt.emb.weight.{k}") for k in ("exp_avg", "exp_avg_sq", "step")])
    shutil.rmtree(ckpt)
    with pytest.raises(TrainError, match=r"for 1 of the \d+ trainable parameters \(emb.weight\)"):
        Trainer(config(run / "data", tmp_path / "run", resume="auto"))


def test_allow_fresh_optimizer_resumes_with_fresh_moments_and_a_warning(run, tmp_path, capsys):
    ckpt = copy_run(run, tmp_path)
    shutil.rmtree(ckpt)
    _without_moments(tmp_path / "run" / "checkpoints" / "step-000004")
    capsys.readouterr()
    trainer = Trainer(config(run / "data", tmp_path / "run", resume="auto", allow_fresh_optimizer=True))
    assert "WARNING" in capsys.readouterr().err and trainer.step == 4
    assert not trainer.opt.state  # fresh: AdamW fills its moments at the first step
    assert trainer.fit()["step"] == 6
    normal = Trainer(config(run / "data", run / "run", resume=str(run / "run" / "checkpoints" / "step-000004")))
    assert len(normal.opt.state) == len(list(normal.raw.parameters()))  # the moments restored as usual
