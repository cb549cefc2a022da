"""Tuning (`metastate train --tune state|lora`) and `metastate merge`: state tuning lowers the
loss and leaves the base alone, its state file loads in the API and chat; LoRA trains only its
adapters, resumes bit for bit, runs on 2 gloo processes like on one, merges exactly; bad
combinations are one `error:` line. A tiny model, a tiny corpus, a few steps."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from metastate.train import tune  # noqa: E402
from metastate.cli import main  # noqa: E402
from metastate.train.checkpoints import list_checkpoints  # noqa: E402
from metastate.train.config import TrainConfig, TrainError  # noqa: E402
from metastate.train.loop import Trainer, train  # noqa: E402
from weights import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory):
    """A tiny model from `metastate init`, trained a few steps (the RWKV-7 init zeroes the
    output maps, so a fresh model's state reaches no logit), with the data's tokenizer."""
    root = tmp_path_factory.mktemp("tune_base")
    assert main(["init", "--vocab-size", "300", "--d-model", "32", "--n-layer", "2", "--head-size", "16",
                 "--out", str(root / "init")]) == 0
    train(TrainConfig(data=str(data_dir), out=str(root / "run"), init_from=str(root / "init"), seq_len=16,
                      batch_size=4, max_steps=30, warmup_steps=2, lr=1e-2, eval_interval=30, save_interval=30,
                      eval_sequences=2, log_interval=10, progress=False, plot=False))
    model = root / "base"
    shutil.copytree(root / "run" / "checkpoints" / "step-000030", model)
    for name in ("trainer_state.json", "optimizer.npz"):
        (model / name).unlink()
    return model


def tiny(data_dir, out, base, **kw) -> TrainConfig:
    cfg = dict(data=str(data_dir), out=str(out), init_from=str(base), seq_len=16, batch_size=4, max_steps=6,
               warmup_steps=0, lr=3e-3, log_interval=1, eval_interval=3, save_interval=3, eval_sequences=4,
               progress=False, plot=False, tune="lora", lora_rank=4)
    cfg.update(kw)
    return TrainConfig(**cfg)


def digest(path: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.iterdir()))).hexdigest()


def canonical(name: str) -> str:
    """blocks.0.att.key.parametrizations.weight.original -> blocks.0.att.key.weight"""
    return re.sub(r"parametrizations\.(\w+)\.original$", r"\1", name)


def test_state_tuning_lowers_the_loss_and_changes_no_weight(data_dir, base, tmp_path):
    before = digest(base)
    trainer = Trainer(tiny(data_dir, tmp_path / "state", base, tune="state", lr=5e-2, min_lr=5e-2,
                           max_steps=20, eval_interval=20, save_interval=10))
    assert [n for n, p in trainer.model.named_parameters() if p.requires_grad] == ["wkv"]
    result = trainer.fit()
    vals = [json.loads(line)["val_loss"] for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line]
    assert vals[-1] < vals[0] - 1e-3  # held-out loss: the zero state's, then the learned state's
    _, weights = load_model(base)
    assert all(np.array_equal(weights[n], t) for n, t in trainer.raw.to_tensors().items())
    assert digest(base) == before
    ckpt = Path(result["checkpoint"])
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.npz", "state.safetensors", "trainer_state.json"]
    assert trainer.tuning.params["wkv"].abs().max() > 0


def test_the_tuned_state_loads_in_the_api_and_chat_and_changes_the_logits(data_dir, base, tmp_path):
    from metastate.api import load, load_state
    from metastate.chat import ChatSession
    from metastate_core.chat_templates import make_template

    trainer = Trainer(tiny(data_dir, tmp_path / "state", base, tune="state", lr=5e-2, max_steps=4,
                           eval_interval=4, save_interval=4))
    file = tune.artifact(trainer.fit()["checkpoint"], "state")
    model, tokenizer = load(base, backend="torch", kernels="ops", dtype="float32", threads=1)
    state, logits, meta = load_state(file, model)
    assert logits is None and meta["n_tokens"] == "0" and meta["kind"] == "state-tuned"
    ids = tokenizer.encode("the king speak")
    tuned, _ = model.forward(ids, state)
    plain, _ = model.forward(ids)
    assert np.abs(tuned - plain).max() > 1e-4  # the state changes the logits ...
    with torch.no_grad():  # ... to those the trainer computed with it
        ref = trainer.tuning.module(torch.tensor(ids)[None])[0][0].numpy()
    np.testing.assert_allclose(tuned, ref, rtol=1e-5, atol=1e-5)
    session = ChatSession(model, tokenizer, make_template("shakespeare"), max_tokens=2)
    session.load(file)
    assert session.n_tokens == 0
    assert np.array_equal(np.asarray(session.state.wkv), np.asarray(state.wkv))
    session.ask("the king")  # a turn from the tuned state


@pytest.mark.parametrize("mode", ["lora", "state"])
def test_tuning_changes_only_its_tensors_and_resumes_bit_for_bit(data_dir, base, tmp_path, mode):
    whole = Trainer(tiny(data_dir, tmp_path / "whole", base, tune=mode))
    full = whole.fit()
    _, weights = load_model(base)
    frozen = {canonical(n): p for n, p in whole.raw.named_parameters() if "lora_" not in n}
    assert set(frozen) == set(weights)
    assert all(np.array_equal(weights[n], p.detach().numpy()) and not p.requires_grad for n, p in frozen.items())
    trained = {n for n, p in whole.model.named_parameters() if p.requires_grad}
    assert trained == ({"wkv"} if mode == "state" else
                       {n for n in trained if n.endswith((".lora_A", ".lora_B"))})
    assert len(trained) == (1 if mode == "state" else 2 * 6 * 2)
    assert all(p.abs().max() > 0 for p in whole.tuning.params.values())  # B started at zero, S0 too

    first = train(tiny(data_dir, tmp_path / "split", base, tune=mode, keep_last=5))
    assert first["losses"] == full["losses"]
    ckpts = list_checkpoints(tmp_path / "split")
    assert [p.name for p in ckpts] == ["step-000003", "step-000006"]
    resumed = train(tiny(data_dir, tmp_path / "split", base, tune=mode, init_from=None, resume=str(ckpts[0])))
    assert resumed["losses"] == full["losses"][3:]
    name = tune.STATE_FILE if mode == "state" else tune.ADAPTER_FILE
    a = (tmp_path / "whole" / "checkpoints" / "step-000006" / name).read_bytes()
    assert a == (tmp_path / "split" / "checkpoints" / "step-000006" / name).read_bytes()
    with pytest.raises(TrainError, match="settings changed"):  # another tune mode is another run
        Trainer(tiny(data_dir, tmp_path / "split", base, tune="full" if mode == "lora" else "lora",
                     init_from=None, resume="auto"))


def test_merge_is_exact(data_dir, base, tmp_path, capsys):
    from backends.cuda import Model
    from metastate.api import load

    adapter = train(tiny(data_dir, tmp_path / "lora", base, max_steps=3, lr=1e-2))["checkpoint"]
    out = tmp_path / "merged"
    assert main(["merge", str(base), adapter, "--out", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    mcfg, weights = load_model(base, dtype="float32")
    unmerged = Model.from_tensors(mcfg, weights, dtype=torch.float32, kernels="ops")
    tuning = tune.setup("lora", unmerged, base=str(base), rank=4, alpha=16.0)
    tuning.load(tune.read_adapter(adapter)[1], adapter)
    ids = list(range(1, 40))
    with torch.no_grad():
        want = unmerged(torch.tensor(ids)[None])[0][0].numpy()
        plain = Model.from_tensors(mcfg, weights, dtype=torch.float32, kernels="ops")(torch.tensor(ids)[None])[0][0]
    model, _ = load(out, backend="torch", kernels="ops", dtype="float32", threads=1)
    got = model.logits(ids)

    def rel_rms(x, y):
        return float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(y ** 2)))

    assert rel_rms(got, want) <= 1e-5
    assert rel_rms(plain.numpy(), want) > 1e-3  # the adapters are not a no-op
    names = {n for n in load_model(out)[1]}
    assert names == set(weights) and (out / "tokenizer.model").is_file()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_combinations_are_one_error_line(data_dir, base, tmp_path, capsys):
    common = ["--data", str(data_dir), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(["train", "--tune", "lora", "--lora-rank", "0", "--init-from", str(base), *common]) != 0
    assert "--lora-rank" in _error_line(capsys)
    assert main(["train", "--tune", "state", *common]) != 0
    assert "--init-from" in _error_line(capsys)
    assert main(["train", "--tune", "prefix", "--init-from", str(base), *common]) != 0
    assert "tune must be one of" in _error_line(capsys)
    # an adapter onto another base: a model of the same shape, other weights
    adapter = train(tiny(data_dir, tmp_path / "lora", base, max_steps=1, eval_interval=1,
                         save_interval=1))["checkpoint"]
    other = tmp_path / "other"
    assert main(["init", "--vocab-size", "300", "--d-model", "32", "--n-layer", "2", "--head-size", "16",
                 "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["merge", str(other), adapter, "--out", str(tmp_path / "m")]) != 0
    assert "another model" in _error_line(capsys)
    assert not (tmp_path / "m").exists()
    assert main(["merge", str(base), str(base), "--out", str(tmp_path / "m")]) != 0  # not an adapter
    assert "not a LoRA adapter" in _error_line(capsys)


DIST_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from metastate.train.config import TrainConfig
from metastate.train.loop import train
r = train(TrainConfig(**json.loads(sys.argv[1])))
print("LOSSES", json.dumps(r["losses"] + [r["val_loss"]]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["state", "lora"])
def test_two_gloo_processes_match_one(data_dir, base, tmp_path, mode):
    cfg = tiny(data_dir, tmp_path / "dist", base, tune=mode, max_steps=3, eval_interval=3, save_interval=3)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, "-c", DIST_SCRIPT, json.dumps(cfg.to_dict())], env=env,
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    dist = json.loads(next(x for x in outs[0][0].splitlines() if x.startswith("LOSSES ")).split(" ", 1)[1])
    single = train(dataclasses.replace(cfg, out=str(tmp_path / "single")))
    np.testing.assert_allclose(dist, single["losses"] + [single["val_loss"]], rtol=1e-5)
    name = tune.STATE_FILE if mode == "state" else tune.ADAPTER_FILE
    assert (tmp_path / "dist" / "checkpoints" / "step-000003" / name).is_file()
