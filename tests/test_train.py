"""The trainer: schedule, parameter groups, exact resume, kill -9 during a save, DDP / FSDP2 on
gloo against one process, gradient accumulation, the sse_gate ablation flag, config files."""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from metastate.train.checkpoints import list_checkpoints, read_trainer_state  # noqa: E402
from metastate.train.config import TrainConfig, TrainError, amp_dtype  # noqa: E402
from metastate.train.data import prepare_data  # noqa: E402
from metastate.train.dist import StopRequest, TrainInterrupted  # noqa: E402
from metastate.train.loop import Trainer, decays, lr_at, param_groups, train  # noqa: E402
from metastate.train.plot import read_metrics  # noqa: E402
from weights import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny(data_dir, out, **kw) -> TrainConfig:
    base = dict(data=str(data_dir), out=str(out), d_model=32, n_layer=2, head_size=16, seq_len=16,
                batch_size=4, max_steps=6, warmup_steps=2, lr=3e-3, log_interval=1, eval_interval=3,
                save_interval=3, eval_sequences=2, progress=False, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warms_up_then_follows_a_cosine():
    cfg = TrainConfig(data="x", max_steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(cfg, 0) == pytest.approx(1e-4) and lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: cos(pi/2) = 0
    assert lr_at(cfg, 110) == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices(data_dir, tmp_path):
    trainer = Trainer(tiny(data_dir, tmp_path, freeze_sse_gate=True))
    decay_names = {n for n, p in trainer.model.named_parameters() if decays(n, p)}
    expected = {"emb.weight", "head.weight"} | {
        f"blocks.{i}.{m}" for i in range(2) for m in
        ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
         "meta.param_keys", "meta.param_values")}
    assert decay_names == expected  # no decay on LoRA factors (w1, a2, ...), r_k, norms, vectors
    groups = param_groups(trainer.model, 0.1)
    in_opt = {id(p) for g in groups for p in g["params"]}
    gates = [b.meta.sse_gate for b in trainer.raw.blocks]
    assert all(id(g) not in in_opt for g in gates)  # frozen: out of the optimizer


def test_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path):
    full = train(tiny(data_dir, tmp_path / "full", keep_last=1, keep_best=False, plot=True))
    if importlib.util.find_spec("matplotlib"):  # optional: without it the plot is skipped
        assert (tmp_path / "full" / "loss.png").stat().st_size > 1000
    first = train(tiny(data_dir, tmp_path / "split", max_steps=6, save_interval=3, keep_last=5))
    assert first["losses"] == full["losses"]
    # run again from the step-3 checkpoint of the second run: the last 3 losses must match bitwise
    ckpts = list_checkpoints(tmp_path / "split")
    assert [p.name for p in ckpts] == ["step-000003", "step-000006"]
    resumed = train(tiny(data_dir, tmp_path / "split", resume=str(ckpts[0])))
    assert resumed["losses"] == full["losses"][3:]
    a = load_model(tmp_path / "full" / "checkpoints" / "step-000006")[1]
    b = load_model(tmp_path / "split" / "checkpoints" / "step-000006")[1]
    assert all(np.array_equal(a[n], b[n]) for n in a)
    # retention keep_last=1: only the last checkpoint of the uninterrupted run is left
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["step-000006"]
    # the metrics log holds each step once, the resumed tail replacing the old one
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    state, arrays = read_trainer_state(ckpts[0])
    assert state["step"] == 3 and state["samples"] == 12 and "rng.torch" in arrays


def test_a_bfloat16_save_dtype_still_resumes_bit_for_bit(data_dir, tmp_path):
    full = train(tiny(data_dir, tmp_path / "full", save_dtype="bfloat16"))
    train(tiny(data_dir, tmp_path / "split", save_dtype="bfloat16", keep_last=5))
    first = list_checkpoints(tmp_path / "split")[0]
    stored = load_model(first)[1]
    assert {t.dtype.name for t in stored.values()} == {"bfloat16"}  # the model file is what was asked
    resumed = train(tiny(data_dir, tmp_path / "split", save_dtype="bfloat16", resume=str(first)))
    assert resumed["losses"] == full["losses"][3:]  # from the float32 copies, not the rounded weights

    def without_copies(arrays):
        return {k: v for k, v in arrays.items() if not k.startswith("master.")}

    def bad_copy(arrays):
        return {**arrays, "master.emb.weight": arrays["master.emb.weight"][:2]}

    for name, change in (("none", without_copies), ("bad", bad_copy)):
        ckpt = tmp_path / name / "checkpoints" / first.name
        shutil.copytree(first, ckpt)
        with np.load(first / "optimizer.npz") as z:
            np.savez(ckpt / "optimizer.npz", **change({k: z[k] for k in z.files}))
    with pytest.raises(TrainError, match=r"float32 weight emb.weight is bfloat16 \[300, 32\]"):
        Trainer(tiny(data_dir, tmp_path / "none", save_dtype="bfloat16", resume="auto"))
    with pytest.raises(TrainError, match=r"float32 weight emb.weight is float32 \[2, 32\]"):
        Trainer(tiny(data_dir, tmp_path / "bad", save_dtype="bfloat16", resume="auto"))


def test_resume_refuses_changed_settings(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path, max_steps=3))
    with pytest.raises(TrainError, match=r"settings changed \(lr\)"):
        Trainer(tiny(data_dir, tmp_path, max_steps=3, lr=1e-2, resume="auto"))


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import weights.safetensors_io as st
from metastate.train.config import TrainConfig
from metastate.train.loop import train

write, calls = st.write_file, []
def slow_write(path, tensors, meta):
    calls.append(path)
    if len(calls) == 2:  # the second checkpoint: half a file, then hang until killed
        Path(path).write_bytes(b"partial")
        Path(sys.argv[2]).touch()
        time.sleep(120)
    return write(path, tensors, meta)
st.write_file = slow_write
train(TrainConfig(**__import__("json").loads(sys.argv[1])))
"""


def test_kill_during_checkpoint_save_keeps_the_previous_one(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path / "run", max_steps=4, save_interval=2, eval_interval=2)
    marker = tmp_path / "saving"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.to_dict()), str(marker)],
                            env=env, cwd=REPO)
    try:
        deadline = time.time() + 90
        while not marker.exists():
            assert proc.poll() is None, "the training process ended before the second save"
            assert time.time() < deadline
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    root = tmp_path / "run" / "checkpoints"
    assert any(p.name.startswith(".step-000004") for p in root.iterdir())  # killed mid-save
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000002"]
    cfg2, tensors = load_model(root / "step-000002")
    assert cfg2.n_layer == 2 and read_trainer_state(root / "step-000002")[0]["step"] == 2
    out = train(tiny(data_dir, tmp_path / "run", max_steps=4, save_interval=2, eval_interval=2, resume="auto"))
    assert len(out["losses"]) == 2 and not any(p.name.startswith(".") for p in root.iterdir())


DIST_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from metastate.train.config import TrainConfig
from metastate.train.loop import train
r = train(TrainConfig(**json.loads(sys.argv[1])))
if r["checkpoint"]:
    print("LOSSES", json.dumps(r["losses"] + [r["val_loss"]]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(script: str, *args: str) -> tuple[list, list]:
    """Run `python -c script args` as 2 CPU processes (gloo), as torchrun would: (processes,
    their (stdout, stderr))."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs, [p.communicate(timeout=120) for p in procs]


def _launch_ranks(cfg: TrainConfig, script: str, tag: str) -> list:
    """Run script with 2 CPU processes (gloo), as torchrun would; each rank's `tag` line, as JSON
    (None for a rank that printed none)."""
    procs, outs = _run_ranks(script, json.dumps(cfg.to_dict()))
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    lines = [next((x for x in out.splitlines() if x.startswith(tag + " ")), None) for out, _ in outs]
    return [json.loads(line.split(" ", 1)[1]) if line else None for line in lines]


def _launch(cfg: TrainConfig) -> list[float]:
    """Rank 0's losses + final held-out loss of a 2-process run."""
    return _launch_ranks(cfg, DIST_SCRIPT, "LOSSES")[0]


POISON_SCRIPT = """
import hashlib, json, math, sys, torch
torch.set_num_threads(1)
from metastate.train.config import TrainConfig
from metastate.train.loop import Trainer

class NanValue(torch.autograd.Function):  # the loss NaN, its gradient untouched (finite)
    @staticmethod
    def forward(ctx, x):
        return x * math.nan
    @staticmethod
    def backward(ctx, g):
        return g

real = Trainer.loss
def loss(self, batch):  # rank 1 alone meets a NaN loss, at step 3; every gradient stays finite
    out = real(self, batch)
    return NanValue.apply(out) if self.step == 2 and self.dist.rank == 1 and self.model.training else out
Trainer.loss = loss
t = Trainer(TrainConfig(**json.loads(sys.argv[1])))
r = t.fit()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in t.raw.parameters())).hexdigest()
print("RESULT", json.dumps({"skipped": r["skipped_steps"], "losses": r["losses"], "weights": digest}))
"""


def test_a_nan_on_one_rank_is_skipped_by_every_rank(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path / "dist", max_steps=4, save_interval=4, eval_interval=4)
    ranks = _launch_ranks(cfg, POISON_SCRIPT, "RESULT")
    assert [r["skipped"] for r in ranks] == [1, 1]
    assert all(math.isnan(r["losses"][2]) and len(r["losses"]) == 4 for r in ranks)  # global loss, then on
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the replicas stay identical


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_match_one(data_dir, tmp_path, fsdp):
    cfg = tiny(data_dir, tmp_path / "dist", max_steps=4, fsdp=fsdp, save_interval=2, eval_interval=2,
               eval_sequences=3)  # 3 held-out windows: the ranks evaluate unequal shares
    dist_losses = _launch(cfg)
    single = train(tiny(data_dir, tmp_path / "single", max_steps=4, save_interval=2, eval_interval=2,
                        eval_sequences=3))
    expected = single["losses"] + [single["val_loss"]]
    np.testing.assert_allclose(dist_losses, expected, rtol=1e-5)
    # the gathered checkpoint equals the single-process one to float rounding
    a = load_model(tmp_path / "dist" / "checkpoints" / "step-000004")[1]
    b = load_model(tmp_path / "single" / "checkpoints" / "step-000004")[1]
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-4, atol=1e-6, err_msg=n)
    if fsdp:  # resume the sharded run from its step-2 checkpoint (gathered, then re-sharded)
        shutil.rmtree(tmp_path / "dist" / "checkpoints" / "step-000004")
        resumed = _launch(dataclasses.replace(cfg, resume="auto"))
        np.testing.assert_allclose(resumed, expected[2:], rtol=1e-5)


def test_ddp_trains_a_model_whose_sse_reads_no_heads(data_dir, tmp_path):
    # sse_heads 0: no sse_gate is read. DDP stops at the second step on a trainable parameter
    # without gradient, so the gates are out of the optimizer.
    cfg = tiny(data_dir, tmp_path / "dist", max_steps=3, sse_heads=0, save_interval=3, eval_interval=3)
    losses = _launch(cfg)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


class _NanGradient(torch.autograd.Function):
    """The loss unchanged, its gradient NaN: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


def _poison(monkeypatch, steps, kind):
    """The training loss (kind "loss") or its gradient ("grad") turns NaN at these 0-based steps."""
    real = Trainer.loss

    def loss(self, batch):
        out = real(self, batch)
        if self.step in steps and self.model.training:
            return out * math.nan if kind == "loss" else _NanGradient.apply(out)
        return out

    monkeypatch.setattr(Trainer, "loss", loss)


def _strict_json(line: str) -> dict:
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl: not JSON"))


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_without_an_update(data_dir, tmp_path, monkeypatch, kind):
    _poison(monkeypatch, {2}, kind)
    trainer = Trainer(tiny(data_dir, tmp_path, max_steps=4, save_interval=4, eval_interval=4))
    weights, real_step = [], trainer.train_step

    def step():
        out = real_step()
        weights.append({n: p.detach().clone() for n, p in trainer.raw.named_parameters()})
        return out

    trainer.train_step = step
    result = trainer.fit()
    assert all(torch.equal(weights[2][n], weights[1][n]) for n in weights[1])  # step 3: no update
    assert all(not torch.equal(weights[3][n], weights[2][n]) for n in ("head.weight", "emb.weight"))
    assert all(bool(torch.isfinite(w).all()) for w in weights[3].values())
    assert math.isnan(result["losses"][2]) == (kind == "loss") and result["skipped_steps"] == 1
    assert all(int(s["step"]) == 3 for s in trainer.opt.state.values())  # 4 steps, 3 updates
    records = [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    what = "loss" if kind == "loss" else "gradient norm"
    assert [r for r in records if "skipped" in r] == [
        {"step": 3, "tokens": 3 * 4 * 16, "skipped": f"non-finite {what}", "in_a_row": 1}]
    logged = next(r for r in records if r["step"] == 3 and "lr" in r)
    assert (logged["loss"] is None) == (kind == "loss") and logged["grad_norm"] is None
    state, _ = read_trainer_state(result["checkpoint"])
    assert state["skipped_steps"] == 1 and state["bad_steps"] == 0


def test_non_finite_steps_in_a_row_stop_the_run_with_a_clear_error(data_dir, tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(3, 100)), "loss")
    cfg = tiny(data_dir, tmp_path, max_steps=8, save_interval=3, eval_interval=3, max_bad_steps=2)
    with pytest.raises(TrainError, match=r"step 5: the loss or gradient has not been finite for 2 steps in a row"
                                         r" \(each skipped, so the weights are those of step 3\).*step-000003"):
        train(cfg)
    (ckpt,) = list_checkpoints(tmp_path)  # the last good checkpoint stays, nothing NaN is saved
    assert ckpt.name == "step-000003"
    assert all(np.isfinite(t).all() for t in load_model(ckpt)[1].values())
    with pytest.raises(TrainError, match="max_bad_steps must be a positive integer"):
        tiny(data_dir, tmp_path, max_bad_steps=0).validate()


def test_precision_picks_the_autocast_dtype(monkeypatch):
    gpu = torch.device("cuda")
    for capability, expected in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert amp_dtype("auto", gpu) == expected  # T4 / V100: float16; A100, H100: bfloat16
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("fp16", torch.device("cpu")) == torch.float16 and amp_dtype("float32", gpu) is None
    with pytest.raises(TrainError, match="precision must be one of auto, float32, bf16, fp16"):
        TrainConfig(data="x", precision="fp8").validate()


def test_fp16_scales_the_loss_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    f32 = train(tiny(data_dir, tmp_path / "f32", max_steps=1, save_interval=1, precision="float32"))
    _poison(monkeypatch, {1}, "grad")  # an overflow at step 2
    cfg = tiny(data_dir, tmp_path / "full", precision="fp16", max_steps=6, keep_last=5)
    full = Trainer(cfg)
    result = full.fit()
    # the forward ran in float16: close to float32, not equal
    assert result["losses"][0] != f32["losses"][0]
    assert result["losses"][0] == pytest.approx(f32["losses"][0], rel=1e-2)
    # the overflow is skipped and halves the loss scale (2^16 at first)
    assert result["skipped_steps"] == 1 and full.scaler.get_scale() == 2.0 ** 15
    assert result["losses"][-1] < result["losses"][0]
    scales = [r["loss_scale"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "lr" in r]
    assert scales == [2.0 ** 16] + [2.0 ** 15] * 5
    # resume from step 3: the scale comes back with the weights, and the losses bit for bit
    ckpt = list_checkpoints(tmp_path / "full")[0]
    resumed = Trainer(dataclasses.replace(cfg, resume=str(ckpt)))
    assert resumed.scaler.get_scale() == 2.0 ** 15
    assert resumed.fit()["losses"] == result["losses"][3:]


@pytest.mark.parametrize("setting, value, message", [
    ("lr", "abc", "lr must be a number"), ("seq_len", True, "seq_len must be an integer"),
    ("keep_best", "no", "keep_best must be true or false"), ("save_dtype", "fp16", "save_dtype must be one of"),
    ("grad_clip", -1.0, "grad_clip >= 0"), ("beta1", 2.0, "beta1 and beta2 must be in"),
    ("micro_batch", 0, "micro_batch must be a positive integer"), ("chunk_size", 0, "chunk_size must be in"),
    ("device", "gpu", "device must be auto, cpu, cuda"), ("lr", 0.0, "lr must be > 0"),
    ("lr", math.inf, "lr must be a finite number"), ("adam_eps", math.nan, "adam_eps must be a finite number"),
    ("weight_decay", math.inf, "weight_decay must be a finite number"), ("seed", -1, r"seed must be in \[0, 2\^32\)"),
    ("seed", 2**32, "seed must be in")])
def test_bad_settings_are_refused_before_training(data_dir, tmp_path, setting, value, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig.from_dict({"data": str(data_dir), setting: value})


def test_a_gpu_index_past_the_machines_gpus_is_refused(data_dir, tmp_path, monkeypatch):
    # torch.cuda.set_device would raise a bare "invalid device ordinal" from inside CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: pytest.fail(f"set_device({dev}) was called"))
    with pytest.raises(TrainError, match=r"device cuda:2: torch sees 2 CUDA GPUs here \(cuda:0 to cuda:1\)"):
        Trainer(tiny(data_dir, tmp_path / "out", device="cuda:2"))


def test_a_new_run_refuses_an_out_holding_another_runs_checkpoints(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path, max_steps=3))
    before = [p.name for p in list_checkpoints(tmp_path)]
    with pytest.raises(TrainError, match="already holds a run's checkpoints.*--resume"):
        Trainer(tiny(data_dir, tmp_path, max_steps=4, lr=5e-3))
    assert [p.name for p in list_checkpoints(tmp_path)] == before == ["step-000003"]


def test_resume_knows_the_data_by_content_and_the_precision_by_meaning(data_dir, tmp_path, monkeypatch):
    train(tiny(data_dir, tmp_path / "run", max_steps=4, save_interval=2))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)  # the same data elsewhere, given as a relative path
    monkeypatch.chdir(tmp_path)
    out = train(tiny("moved", tmp_path / "run", max_steps=4, save_interval=2, precision="float32", resume="auto"))
    assert out["step"] == 4 and len(out["losses"]) == 2  # on the CPU auto means float32
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    # the dtype the run computed in is what counts
    state_file = tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["amp"] == "float32"
    state_file.write_text(json.dumps({**state, "amp": "bf16"}))  # as if run with bf16 autocast
    with pytest.raises(TrainError, match=r"settings changed \(precision\)"):
        Trainer(tiny(data_dir, tmp_path / "run", max_steps=4, save_interval=2, resume="auto"))
    Trainer(tiny(data_dir, tmp_path / "run", max_steps=4, save_interval=2, precision="bf16", resume="auto"))
    state_file.write_text(json.dumps(state))  # float32 again: only the data differs below
    other = tmp_path / "other"
    prepare_data([data_dir.parent / "doc0.txt"], other, vocab_size=300, val_fraction=0.1)
    with pytest.raises(TrainError, match=r"settings changed \(data\)"):
        Trainer(tiny(other, tmp_path / "run", max_steps=4, save_interval=2, resume="auto"))


def test_the_cli_summary_reports_skips_and_a_finished_run(data_dir, tmp_path, capsys, monkeypatch):
    from metastate.cli import main

    _poison(monkeypatch, {0}, "loss")
    cfg = tiny(data_dir, tmp_path, max_steps=2, save_interval=2)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.to_dict().items()
             if v is not None and not isinstance(v, bool) and k != "resume"]
    assert main(["train", *flags, "--no-progress", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "trained to step 2" in out and "skipped 1 of 2 steps for a non-finite loss" in out
    assert main(["train", *flags, "--no-progress", "--no-plot", "--resume"]) == 0
    assert "already at step 2 (max_steps): nothing to train" in capsys.readouterr().out


def test_damaged_training_state_gives_clear_errors(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path / "run", max_steps=2, save_interval=2))
    good = list_checkpoints(tmp_path / "run")[0]
    cases = {}

    def damaged(name, mutate):
        ckpt = tmp_path / name / "checkpoints" / good.name
        shutil.copytree(good, ckpt)
        mutate(ckpt)
        cases[name] = ckpt

    opt = good / "optimizer.npz"
    damaged("cut", lambda c: (c / "optimizer.npz").write_bytes(opt.read_bytes()[: opt.stat().st_size // 2]))

    def rewrite(c, change):
        with np.load(opt) as z:
            arrays = {k: z[k] for k in z.files}
        change(arrays)
        np.savez(c / "optimizer.npz", **arrays)

    damaged("shape", lambda c: rewrite(c, lambda a: a.update({"opt.emb.weight.exp_avg": a["opt.emb.weight.exp_avg"][:1]})))
    damaged("rng", lambda c: rewrite(c, lambda a: a.pop("rng.torch")))
    for name, message in (("cut", "corrupt training checkpoint"), ("shape", "corrupt optimizer state opt.emb.weight.exp_avg"),
                          ("rng", "no rng.torch")):
        with pytest.raises(TrainError, match=message):
            Trainer(tiny(data_dir, tmp_path / name, max_steps=2, save_interval=2, resume="auto"))


def test_a_metrics_line_cut_by_a_kill_does_not_block_resume(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path, max_steps=4, save_interval=2))
    shutil.rmtree(tmp_path / "checkpoints" / "step-000004")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "tokens": 51')
    train(tiny(data_dir, tmp_path, max_steps=4, save_interval=2, resume="auto"))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_init_from_refuses_a_model_with_another_tokenizer(data_dir, tmp_path):
    with pytest.raises(TrainError, match="tokenizer .* is not the one .* prepare-data --tokenizer"):
        Trainer(tiny(data_dir, tmp_path, init_from=str(REPO / "weights" / "default")))


def test_grad_clip_zero_means_no_clipping(data_dir, tmp_path):
    runs = [Trainer(tiny(data_dir, tmp_path / str(clip), max_steps=2, grad_clip=clip)) for clip in (0.0, 1e9)]
    for t in runs:
        t.fit()
    a, b = (dict(t.raw.named_parameters()) for t in runs)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_gradient_accumulation_matches_the_full_batch(data_dir, tmp_path):
    full = train(tiny(data_dir, tmp_path / "a", max_steps=3, save_interval=3))
    accum = train(tiny(data_dir, tmp_path / "b", max_steps=3, save_interval=3, micro_batch=1))
    np.testing.assert_allclose(accum["losses"], full["losses"], rtol=1e-5)


def test_grad_checkpoint_trains_the_same_run(data_dir, tmp_path):
    plain = train(tiny(data_dir, tmp_path / "a", max_steps=3, save_interval=3))
    ckpt = train(tiny(data_dir, tmp_path / "b", max_steps=3, save_interval=3, grad_checkpoint=True))
    assert ckpt["losses"] == plain["losses"]  # recomputation repeats the same arithmetic


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_train_like_the_ops_path(data_dir, tmp_path):
    # The trainer through the chunked Triton kernels (the CPU interpreter without a GPU):
    # the same run as the plain-ops path up to float32 rounding.
    ops = train(tiny(data_dir, tmp_path / "a", max_steps=3, save_interval=3, kernels="ops"))
    tri = train(tiny(data_dir, tmp_path / "b", max_steps=3, save_interval=3, kernels="triton"))
    np.testing.assert_allclose(tri["losses"], ops["losses"], rtol=1e-5)
    assert tri["losses"][-1] < tri["losses"][0]  # and it learns


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("fused", [True, False])
def test_fused_elementwise_flag(data_dir, tmp_path, monkeypatch, fused):
    # --fused-elementwise (the default) runs the fused pieces with the Triton kernels;
    # --no-fused-elementwise keeps plain torch ops for them. Same run either way.
    from backends.cuda.ops.elementwise import fused as fused_module

    calls = []
    real = fused_module.relu_square
    monkeypatch.setattr(fused_module, "relu_square", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ops = train(tiny(data_dir, tmp_path / "a", max_steps=2, save_interval=2, kernels="ops"))
    tri = train(tiny(data_dir, tmp_path / "b", max_steps=2, save_interval=2, kernels="triton",
                     fused_elementwise=fused))
    np.testing.assert_allclose(tri["losses"], ops["losses"], rtol=1e-5)
    assert bool(calls) == fused


def test_freeze_sse_gate_trains_an_exact_rwkv7(data_dir, tmp_path):
    meta = train(tiny(data_dir, tmp_path / "m", max_steps=3))
    base = train(tiny(data_dir, tmp_path / "b", max_steps=3, freeze_sse_gate=True))
    gates = lambda run: [load_model(tmp_path / run / "checkpoints" / "step-000003")[1][f"blocks.{i}.meta.sse_gate"]  # noqa: E731
                         for i in range(2)]
    assert all(np.all(g == 0) for g in gates("b"))
    assert any(np.any(g != 0) for g in gates("m"))  # the gates train (from 0) when not frozen
    assert meta["losses"][0] == base["losses"][0]  # identical at init: every gate starts at 0
    assert meta["losses"][2] != base["losses"][2]


def test_init_from_continues_a_model_directory(data_dir, tmp_path):
    src = train(tiny(data_dir, tmp_path / "src", max_steps=3))
    out = train(tiny(data_dir, tmp_path / "next", max_steps=2, init_from=src["checkpoint"], data_start=12))
    first_eval = read_metrics(tmp_path / "next" / "metrics.jsonl")[0]
    assert first_eval["step"] == 0
    assert first_eval["val_loss"] == pytest.approx(src["val_loss"], rel=1e-6)  # same model, same windows
    assert out["step"] == 2


def test_init_from_a_quantized_model_trains_from_its_dequantized_weights(data_dir, tmp_path):
    pytest.importorskip("mlx.core", reason="quantizing needs the mlx extra")
    from metastate.cli import main
    from weights.quantized import load_dequantized

    src = train(tiny(data_dir, tmp_path / "src", max_steps=3))
    q = tmp_path / "q8"
    assert main(["convert", src["checkpoint"], "--out", str(q), "--quantize", "8", "--group-size", "32"]) == 0
    trainer = Trainer(tiny(data_dir, tmp_path / "next", max_steps=2, init_from=str(q)))
    start = trainer.raw.to_tensors()
    _, want = load_dequantized(q)  # checked against mx.dequantize in tests/test_quantized.py
    _, original = load_model(src["checkpoint"])
    name = "blocks.0.att.key.weight"
    np.testing.assert_array_equal(start[name], want[name])
    assert not np.array_equal(start[name], original[name])  # really the quantized weights
    assert all(np.array_equal(start[k], want[k]) for k in want)
    trainer.train_step()  # and it trains


def test_cli_config_file_and_flag_overrides(data_dir, tmp_path):
    from metastate.train_cmd import add_parsers, train_config

    (tmp_path / "c.toml").write_text(f'data = "{data_dir}"\n[model]\nd_model = 32\nn_layer = 2\n'
                                     "head_size = 16\n[optim]\nlr = 0.002\nmax_steps = 9\n")
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", str(tmp_path / "c.toml"), "--lr", "0.005",
                              "--freeze-sse-gate", "--resume"])
    cfg = train_config(args)
    assert (cfg.d_model, cfg.max_steps, cfg.lr, cfg.freeze_sse_gate, cfg.resume) == (32, 9, 0.005, True, "auto")
    (tmp_path / "bad.toml").write_text(f'data = "{data_dir}"\nlearning_rate = 1\n')
    with pytest.raises(TrainError, match="unknown key 'learning_rate'"):
        TrainConfig.from_toml(tmp_path / "bad.toml")
    assert math.isfinite(TrainConfig.from_toml(tmp_path / "c.toml").lr)


SIGNAL_SCRIPT = """
import json, os, signal, sys, torch
torch.set_num_threads(1)
from metastate.train.loop import Trainer
from metastate.cli import main

sig, at_step, rank = getattr(signal, sys.argv[1]), int(sys.argv[2]), int(os.environ.get("RANK", "0"))
# as a process started from a terminal has it: started in the background (nohup, `&`, CI), it
# inherits SIGHUP / SIGINT ignored, and the trainer leaves an ignored signal ignored
signal.signal(sig, signal.SIG_DFL)
real = Trainer.train_step
def train_step(self):  # the signal arrives in the middle of a step, on one rank only
    if self.step == at_step - 1 and rank == int(sys.argv[3]):
        os.kill(os.getpid(), sig)
    return real(self)
Trainer.train_step = train_step
sys.exit(main(["train", "--config", sys.argv[4]]))
"""


def _toml(cfg: TrainConfig, path: Path) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.to_dict().items() if v is not None))
    return path


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_saves_a_checkpoint_and_resume_continues_exactly(data_dir, tmp_path, sig):
    """Ctrl-C, a scheduler's SIGTERM or a closed terminal's SIGHUP mid-step: the step finishes, a
    checkpoint of it is saved (between the save_interval ones), the command then ends by that
    signal (so a shell script running it stops too), and a resume reproduces the uninterrupted
    run bit for bit."""
    full = train(tiny(data_dir, tmp_path / "full", max_steps=8, save_interval=100))
    cfg = tiny(data_dir, tmp_path / "run", max_steps=8, save_interval=100)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, sig, "5", "0", str(_toml(cfg, tmp_path / "c.toml"))],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == -getattr(signal, sig), done.stderr[-2000:]
    assert f"stopped by {sig} at step 5" in done.stdout and "--resume auto" in done.stdout
    assert f"{sig}: finishing this step" in done.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000005"]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1] == {"step": 5, "tokens": 5 * 4 * 16, "interrupted": sig}
    assert [r["loss"] for r in records if "loss" in r] == full["losses"][:5]
    resumed = train(tiny(data_dir, tmp_path / "run", max_steps=8, save_interval=100, resume="auto"))
    assert resumed["losses"] == full["losses"][5:]


def test_signal_to_one_rank_stops_every_rank_at_the_same_step(data_dir, tmp_path):
    """torchrun may deliver a signal to one worker only: the ranks agree, all stop after the same
    step and save it together (no rank left waiting in a collective)."""
    cfg = tiny(data_dir, tmp_path / "run", max_steps=8, save_interval=100)
    procs, outs = _run_ranks(SIGNAL_SCRIPT, "SIGTERM", "4", "1", str(_toml(cfg, tmp_path / "c.toml")))
    assert [p.returncode for p in procs] == [-signal.SIGTERM] * 2, outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "stopped by SIGTERM at step 4" in outs[0][0]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000004"]


def test_sigterm_to_torchrun_stops_its_workers_with_a_checkpoint(data_dir, tmp_path):
    """The usual way to stop a distributed run: signal torchrun, which passes SIGTERM on to every
    worker; they finish the step, agree, save it together and end before --shutdown-timeout."""
    cfg = tiny(data_dir, tmp_path / "run", max_steps=100000, save_interval=100000, eval_interval=100000)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_free_port()), "--shutdown-timeout", "60", "-m", "metastate",
                             "train", "--config", str(_toml(cfg, tmp_path / "c.toml"))],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as under a scheduler
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 90
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):  # a line may be half-written
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=50)  # well inside the shutdown timeout: the workers ended
    finally:
        proc.kill()
    assert proc.returncode != 0
    stopped = read_metrics(metrics)[-1]
    assert stopped.get("interrupted") == "SIGTERM", err[-2000:]
    assert f"stopped by SIGTERM at step {stopped['step']}" in out
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [f"step-{stopped['step']:06d}"]
    assert read_trainer_state(list_checkpoints(tmp_path / "run")[0])[0]["world_size"] == 2


def _sigterm_during_step(monkeypatch, step: int):
    """Make this process receive SIGTERM as optimizer step `step` (1-based) begins; returns the
    real Trainer.train_step."""
    real = Trainer.train_step

    def train_step(self):
        if self.step == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return real


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(data_dir, tmp_path, monkeypatch, capsys):
    """The later checkpoints belong to another continuation: left in place, retention (keeping the
    highest steps) deleted the resumed run's own checkpoint for them and a stop reported a stale
    one. They are moved aside instead, nothing deleted."""
    out = tmp_path / "run"
    train(tiny(data_dir, out, max_steps=9, keep_last=5, keep_best=False))
    ckpts = list_checkpoints(out)
    assert [p.name for p in ckpts] == ["step-000003", "step-000006", "step-000009"]
    (out / "checkpoints" / "step-best").mkdir()  # a copy under another name is not a checkpoint of the run
    real = _sigterm_during_step(monkeypatch, 4)
    with pytest.raises(TrainInterrupted) as caught:
        train(tiny(data_dir, out, max_steps=9, keep_last=1, keep_best=False, resume=str(ckpts[0])))
    assert caught.value.result["checkpoint"].endswith("step-000004")
    assert [p.name for p in list_checkpoints(out)] == ["step-000004"]
    aside = out / "superseded" / "after-step-000003"
    assert sorted(p.name for p in aside.iterdir()) == ["step-000006", "step-000009"]
    assert "another continuation (step-000006, step-000009) moved to" in capsys.readouterr().err
    # back onto the first continuation, from its step 6: the second one's step 4 goes aside in turn
    monkeypatch.setattr(Trainer, "train_step", real)
    train(tiny(data_dir, out, max_steps=9, keep_last=1, keep_best=False, resume=str(aside / "step-000006")))
    assert [p.name for p in list_checkpoints(out)] == ["step-000009"]
    assert [p.name for p in (out / "superseded" / "after-step-000006").iterdir()] == ["step-000004"]


def test_resume_auto_without_a_checkpoint(data_dir, tmp_path, capsys):
    """A new run, said so; but not when the run there began from a model and was killed before
    its first checkpoint: a new run would silently start from random weights."""
    Trainer(tiny(data_dir, tmp_path / "a", resume="auto"))
    assert "no checkpoint in" in capsys.readouterr().err
    first = train(tiny(data_dir, tmp_path / "base", max_steps=2, save_interval=2))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train_config.json").write_text(json.dumps(
        tiny(data_dir, tmp_path / "b", init_from=first["checkpoint"]).to_dict()))
    with pytest.raises(TrainError, match="no checkpoint yet, and its run started from --init-from .*step-000002"):
        Trainer(tiny(data_dir, tmp_path / "b", resume="auto"))


def test_interrupted_run_raises_for_python_callers(data_dir, tmp_path, monkeypatch):
    """train() called from Python: the stop is an exception (a KeyboardInterrupt, which `except
    Exception` does not swallow) carrying the result, after the checkpoint, with the process's
    signal handlers restored."""
    before = signal.getsignal(signal.SIGTERM)
    _sigterm_during_step(monkeypatch, 2)
    with pytest.raises(TrainInterrupted) as caught:
        train(tiny(data_dir, tmp_path / "run", max_steps=8, save_interval=100))
    assert caught.value.signal == "SIGTERM" and caught.value.result["step"] == 2
    assert isinstance(caught.value, KeyboardInterrupt) and not isinstance(caught.value, Exception)
    assert caught.value.result["checkpoint"].endswith("step-000002")
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_request_leaves_ignored_signals_ignored():
    """Under nohup (or as a background job) SIGHUP / SIGINT are ignored: training must not turn
    them back on; the others get the handler, and everything is restored afterwards."""
    before = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopRequest(announce=False) as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("content, message", [
    (b"a = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
    (b"a = " + b"{b = " * 3000 + b"1" + b"}" * 3000 + b"\n", "nested too deeply"),
    (b"lr = 1e-3\n# caf\xe9\n", r"is not UTF-8 text \(byte 15\)")])
def test_a_hostile_config_file_is_one_clear_error(tmp_path, content, message):
    """Issue 22 item 6: deeply nested TOML (a RecursionError) and TOML that is not UTF-8."""
    (tmp_path / "c.toml").write_bytes(content)
    with pytest.raises(TrainError, match=message):
        TrainConfig.from_toml(tmp_path / "c.toml")


def test_a_config_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "c.toml")
    with pytest.raises(TrainError, match="is a FIFO, not a regular file"):
        TrainConfig.from_toml(tmp_path / "c.toml")
