"""The trainer on product-mode models (SPEC section 7): the value tables' row-sparse updates
(RowAdam), exact resume with their optimizer state, DDP on gloo against one process, the memory
of the tables' optimizer state, skips of a non-finite sparse gradient, FSDP refused."""

import importlib.util
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_train import _launch, tiny  # noqa: E402  (data_dir: the fixture of conftest.py)

from backends.cuda.ops.product_keys import naive  # noqa: E402
from metastate.train import loop  # noqa: E402
from metastate.train.checkpoints import list_checkpoints, read_trainer_state  # noqa: E402
from metastate.train.config import TrainConfig, TrainError  # noqa: E402
from metastate.train.dist import Dist  # noqa: E402
from metastate.train.loop import Trainer, train  # noqa: E402
from metastate.train.sparse import RowAdam  # noqa: E402
from weights import load_model  # noqa: E402

PRODUCT = dict(param_mode="product", n_sub_keys=8, param_heads=2, param_topk=4)


def ptiny(data_dir, out, **kw):
    return tiny(data_dir, out, **{**PRODUCT, **kw})


def _row_state(trainer):
    """{table name: {key: tensor copy}} of the tables' RowAdam state."""
    return {trainer.names[p]: {k: v.clone() for k, v in s.items()} for p, s in trainer.opts[-1].state.items()}


def test_a_tiny_product_model_learns(data_dir, tmp_path):
    trainer = Trainer(ptiny(data_dir, tmp_path, max_steps=8, lr=1e-2))
    tables = {f"blocks.{i}.meta.param_values" for i in range(2)}
    in_adamw = {trainer.names[p] for g in trainer.opt.param_groups for p in g["params"]}
    assert not tables & in_adamw and {"blocks.0.meta.sub_keys", "blocks.1.meta.sub_keys"} <= in_adamw
    assert {trainer.names[p] for p in trainer.opts[-1].param_groups[0]["params"]} == tables
    result = trainer.fit()
    losses = result["losses"]
    assert np.mean(losses[-3:]) < losses[0] - 0.1, losses
    assert all(bool((b.meta.param_values != 0).any()) for b in trainer.raw.blocks)  # trained from zero


def test_grad_checkpoint_and_the_triton_kernels_train_the_same_run(data_dir, tmp_path):
    ops = train(ptiny(data_dir, tmp_path / "ops", max_steps=3, save_interval=3))
    again = train(ptiny(data_dir, tmp_path / "ckpt", max_steps=3, save_interval=3, grad_checkpoint=True))
    assert again["losses"] == ops["losses"]  # recomputation repeats the same arithmetic
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    tri = train(ptiny(data_dir, tmp_path / "tri", max_steps=3, save_interval=3, kernels="triton"))  # interpreter
    np.testing.assert_allclose(tri["losses"], ops["losses"], rtol=1e-5)


def test_an_optimizer_step_changes_only_the_selected_rows(data_dir, tmp_path, monkeypatch):
    trainer = Trainer(ptiny(data_dir, tmp_path, max_steps=8, micro_batch=2))  # 2 micro-batches a step
    for _ in range(3):  # a state where some rows have history
        trainer.train_step()
    selected = []
    real = naive.select
    monkeypatch.setattr(naive, "select", lambda *a: selected.append(real(*a)) or selected[-1])
    tables = [b.meta.param_values for b in trainer.raw.blocks]
    before = [t.detach().clone() for t in tables]
    state = _row_state(trainer)
    trainer.train_step()
    after = _row_state(trainer)
    assert len(selected) == 4  # 2 micro-batches x 2 layers, in order
    for i, (t, old) in enumerate(zip(tables, before)):
        name = f"blocks.{i}.meta.param_values"
        read = torch.zeros(t.shape[0], dtype=torch.bool)
        read[torch.cat([selected[i][1].flatten(), selected[2 + i][1].flatten()])] = True
        assert 0 < int(read.sum()) < t.shape[0]
        assert torch.equal(t[~read], old[~read])  # bit-identical, their optimizer state too
        assert torch.equal(after[name]["exp_avg_sq"][~read], state[name]["exp_avg_sq"][~read])
        assert torch.equal(after[name]["last"][~read], state[name]["last"][~read])
        assert (after[name]["last"][read] == 4).all() and int(after[name]["step"]) == 4
        assert (t[read] != old[read]).any(1).all()  # every row read moved


def test_row_adam_is_adam_without_first_moment_on_one_float_per_row():
    """RowAdam's rows equal a dense reference that steps every row with a zero gradient where
    unread (the second moment decays) but moves and decays only rows read."""
    torch.manual_seed(0)
    n, d, lr, b2, eps, wd = 6, 3, 0.1, 0.9, 1e-8, 0.5
    table = torch.nn.Parameter(torch.randn(n, d))
    opt = RowAdam([table], lr=lr, beta2=b2, eps=eps, weight_decay=wd)
    ref, v = table.detach().clone().double(), torch.zeros(n, dtype=torch.float64)
    for t, rows in enumerate(([0, 2], [2, 3], [5], [0, 5, 2], [1]), start=1):
        g = torch.randn(len(rows), d)
        table.grad = torch.sparse_coo_tensor(torch.tensor([rows]), g, (n, d), check_invariants=True)
        opt.step()
        dense = torch.zeros(n, d, dtype=torch.float64)
        dense[rows] = g.double()
        v = b2 * v + (1 - b2) * dense.square().mean(1)
        step = lr * dense / ((v / (1 - b2 ** t)).sqrt() + eps)[:, None]
        ref[rows] = ref[rows] * (1 - lr * wd) - step[rows]
        s = opt.state[table]
        decayed = s["exp_avg_sq"].double() * b2 ** (t - s["last"].double())
        np.testing.assert_allclose(decayed, v, rtol=1e-6)
        np.testing.assert_allclose(table.detach().double(), ref, rtol=1e-6)
    assert s["last"].tolist() == [4, 5, 4, 2, 0, 4]


def test_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path):
    full = train(ptiny(data_dir, tmp_path / "full", keep_last=1, micro_batch=2))
    train(ptiny(data_dir, tmp_path / "split", keep_last=5, micro_batch=2))
    first = list_checkpoints(tmp_path / "split")[0]
    _, arrays = read_trainer_state(first)
    assert arrays["opt.blocks.0.meta.param_values.exp_avg_sq"].shape == (64,)
    assert arrays["opt.blocks.0.meta.param_values.last"].dtype == np.int32
    assert "opt.blocks.0.meta.param_values.exp_avg" not in arrays
    resumed = train(ptiny(data_dir, tmp_path / "split", resume=str(first), micro_batch=2))
    assert resumed["losses"] == full["losses"][3:]
    a = load_model(tmp_path / "full" / "checkpoints" / "step-000006")[1]
    b = load_model(tmp_path / "split" / "checkpoints" / "step-000006")[1]
    assert all(np.array_equal(a[n], b[n]) for n in a)
    for name, value in read_trainer_state(tmp_path / "full" / "checkpoints" / "step-000006")[1].items():
        if name.startswith("opt."):
            other = read_trainer_state(tmp_path / "split" / "checkpoints" / "step-000006")[1][name]
            assert np.array_equal(value, other), name


def test_a_damaged_row_state_is_a_clear_error(data_dir, tmp_path):
    train(ptiny(data_dir, tmp_path / "run", max_steps=2, save_interval=2))
    ckpt = list_checkpoints(tmp_path / "run")[0]
    with np.load(ckpt / "optimizer.npz") as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(ckpt / "optimizer.npz", **{**arrays, "opt.blocks.1.meta.param_values.last":
                                        arrays["opt.blocks.1.meta.param_values.last"].astype(np.float32)})
    with pytest.raises(TrainError, match=r"optimizer state opt.blocks.1.meta.param_values.last: float32 \[64\], "
                                         r"expected int32 \[64\]"):
        Trainer(ptiny(data_dir, tmp_path / "run", max_steps=2, save_interval=2, resume="auto"))
    del arrays["opt.blocks.1.meta.param_values.last"]
    np.savez(ckpt / "optimizer.npz", **arrays)
    with pytest.raises(TrainError, match=r"state of blocks.1.meta.param_values: has \['exp_avg_sq', 'step'\]"):
        Trainer(ptiny(data_dir, tmp_path / "run", max_steps=2, save_interval=2, resume="auto"))


def test_two_gloo_processes_match_one(data_dir, tmp_path):
    kw = dict(max_steps=4, save_interval=2, eval_interval=2, eval_sequences=3)
    dist_losses = _launch(ptiny(data_dir, tmp_path / "dist", micro_batch=1, **kw))  # accumulation on each rank
    single = train(ptiny(data_dir, tmp_path / "single", **kw))
    np.testing.assert_allclose(dist_losses, single["losses"] + [single["val_loss"]], rtol=1e-5)
    a = load_model(tmp_path / "dist" / "checkpoints" / "step-000004")[1]
    b = load_model(tmp_path / "single" / "checkpoints" / "step-000004")[1]
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-4, atol=1e-6, err_msg=n)
    rows = [read_trainer_state(tmp_path / run / "checkpoints" / "step-000004")[1] for run in ("dist", "single")]
    key = "opt.blocks.0.meta.param_values.last"
    assert np.array_equal(rows[0][key], rows[1][key])  # the same rows read, at the same steps


def test_fsdp_refuses_a_product_model_in_one_line(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(Dist, "from_env", classmethod(lambda cls, device_type: cls(0, 2)))  # as under torchrun
    with pytest.raises(TrainError, match=r"^--fsdp cannot shard a product-mode model .* with DDP \(no --fsdp\)$"):
        Trainer(ptiny(data_dir, tmp_path, fsdp=True))


@pytest.mark.parametrize("m", [16, 64])
def test_the_tables_optimizer_state_is_8_bytes_a_row(data_dir, tmp_path, m):
    """RowAdam keeps a float32 second moment and an int32 step per row: 8 m^2 bytes per table
    (2/d of the table; Adam's moments would be 8 d m^2), 16x more at m = 64 than at m = 16."""
    trainer = Trainer(ptiny(data_dir, tmp_path, n_sub_keys=m))
    trainer.train_step()
    for p, state in trainer.opts[-1].state.items():
        assert p.shape == (m * m, 32)
        assert sum(t.numel() * t.element_size() for t in state.values()) == 8 * m * m + 4  # + the step count
    assert len(trainer.opts[-1].state) == 2
    assert not any(p.shape[0] == m * m for p in trainer.opt.state)  # no table in AdamW


def test_a_non_finite_sparse_gradient_skips_the_step(data_dir, tmp_path, monkeypatch):
    real = loop.reduce_rows

    def poisoned(params, world):
        real(params, world)
        if trainer.step == 2:
            params[1].grad._values()[0, 0] = math.nan  # the value table of layer 1 alone

    monkeypatch.setattr(loop, "reduce_rows", poisoned)
    trainer = Trainer(ptiny(data_dir, tmp_path, max_steps=4))
    trainer.train_step(), trainer.train_step()
    before = {n: p.detach().clone() for n, p in trainer.raw.named_parameters()}
    rows = _row_state(trainer)
    loss, norm = trainer.train_step()
    assert math.isfinite(loss) and math.isnan(norm) and trainer.skipped == 1
    assert all(torch.equal(p, before[n]) for n, p in trainer.raw.named_parameters())
    assert all(torch.equal(v, rows[n][k]) for n, s in _row_state(trainer).items() for k, v in s.items())
    trainer.train_step()
    assert trainer.skipped == 1 and int(trainer.opts[-1].state[trainer.rows[0]]["step"]) == 3


def test_gradient_clipping_counts_the_sparse_rows(data_dir, tmp_path, monkeypatch):
    def total(params):  # every gradient made dense: the norm clipping must see
        return math.sqrt(sum(float(p.grad.to_dense().square().sum()) for p in params if p.grad is not None))

    seen, real = {}, loop.clip_norm

    def recording(params, max_norm):
        sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
        seen.update(rows=total(sparse), before=total(params), dense=total([p for p in params if p.grad is not None and not p.grad.is_sparse]))
        norm = real(params, max_norm)
        seen.update(rows_after=total(sparse), after=total(params))
        return norm

    monkeypatch.setattr(loop, "clip_norm", recording)
    trainer = Trainer(ptiny(data_dir, tmp_path, grad_clip=0.5, lr=1e-2))
    for _ in range(4):  # past the first steps' large gradients of the embedding
        _, norm = trainer.train_step()
    assert norm == pytest.approx(seen["before"], rel=1e-5) and norm > 0.5
    assert norm != pytest.approx(seen["dense"], rel=1e-4)  # the rows' share (here ~3e-4) counts
    assert seen["after"] == pytest.approx(0.5, rel=1e-4)  # clipped, the rows with the rest
    assert seen["rows_after"] == pytest.approx(seen["rows"] * 0.5 / norm, rel=1e-4)


@pytest.mark.parametrize("settings, message", [
    (dict(param_topk=65), r"param_topk 65 exceeds the 64 parameter tokens"),
    (dict(param_mode="dense"), r"'n_sub_keys' is for param_mode 'product' only"),
    (dict(param_mode="mixed"), r"'param_mode' must be 'dense' or 'product'")])
def test_bad_product_settings_are_refused_before_training(data_dir, tmp_path, settings, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig.from_dict({**ptiny(data_dir, tmp_path).to_dict(), **settings})
