"""The Meta-State trainer (PyTorch): AdamW (RowAdam for product-mode value tables), warmup +
cosine, DDP / FSDP2, exact resume.

    cfg = TrainConfig(data="data/shakespeare", out="runs/small", d_model=128, n_layer=4)
    summary = train(cfg)              # also under torchrun: one process per GPU (or CPU, gloo)

Determinism: the batch of each step is a pure function of (seed, data position) (see
`data.TokenData`), the model and optimizer are restored bit for bit, so a resumed run
reproduces the uninterrupted run's losses exactly on the same hardware and world size.
The global batch is split over ranks and micro-batches (gradient accumulation) without
changing which sequences it holds, so world size and accumulation do not change the
loss curve beyond float rounding.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backends.cuda import Model
from metastate_core.config import ModelConfig
from metastate_core.params import init_params
from weights import load_model  # imported up front: a long run never re-imports code
from weights.quantized import load_dequantized

from . import checkpoints as ckpt
from . import tune
from .checkpoints import METRICS_FILE, PLOT_FILE, finite, latest_checkpoint
from .config import TrainConfig, TrainError, amp_dtype, resolve_precision
from .data import TokenData, data_fingerprint, read_meta, tokenizer_spec
from .dist import Dist, StopRequest, TrainInterrupted, pick_device, wrap
from .plot import plot_metrics
from .sparse import RowAdam, clip_norm, reduce_rows


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup from 0 over warmup_steps, then cosine from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def decays(name: str, p: torch.Tensor) -> bool:
    """RWKV-7 rule: weight decay on the weight matrices (embedding, projections, head,
    parameter tokens); none on vectors, norms, r_k and the LoRA factors (w1, w2, a1, ...)."""
    return p.dim() >= 2 and (name.endswith(".weight") or
                             name.endswith(("meta.param_keys", "meta.sub_keys", "meta.param_values")))


def row_tables(model: Model) -> list[str]:
    """The parameters whose gradient is row-sparse: a product model's value tables (SPEC 7)."""
    return [f"blocks.{i}.meta.param_values" for i in range(model.cfg.n_layer)] if model.cfg.product else []


def param_groups(model: torch.nn.Module, weight_decay: float, exclude=()) -> list[dict]:
    """AdamW's groups of the trainable parameters, but those named in exclude."""
    params = [(name, p) for name, p in model.named_parameters()
              if p.requires_grad and name not in exclude]  # frozen: out
    return [{"params": [p for n, p in params if decays(n, p)], "weight_decay": weight_decay, "name": "decay"},
            {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0, "name": "no_decay"}]


def optimizers(model: Model, lr: float, betas: tuple[float, float], eps: float,
               weight_decay: float) -> list[torch.optim.Optimizer]:
    """[fused AdamW over the trainable parameters (param_groups), and for a product model RowAdam
    over its value tables (sparse.py; decoupled weight decay: the tables are matrices)]."""
    tables = row_tables(model)
    # fused: one kernel for every parameter's update instead of a few per tensor list
    opts = [torch.optim.AdamW(param_groups(model, weight_decay, tables), lr=lr, betas=betas, eps=eps, fused=True)]
    rows = [p for n, p in model.named_parameters() if n in tables and p.requires_grad]
    if rows:
        opts.append(RowAdam(rows, lr=lr, beta2=betas[1], eps=eps, weight_decay=weight_decay))
    return opts


def _numpy(t) -> np.ndarray:
    return torch.as_tensor(t).detach().cpu().numpy()


class Trainer:
    """One run: model, optimizer, data, and the loop. `Trainer(cfg).fit()`."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg, self.out = cfg, Path(cfg.out)
        self.device = pick_device(cfg.device)
        self.dist = Dist.from_env(self.device.type)
        W = self.dist.world
        self.precision = resolve_precision(cfg.precision, self.device)
        self.amp = amp_dtype(self.precision, self.device)  # autocast dtype; None: float32 throughout
        # float16 gradients underflow (and overflow past 65504) unless the loss is scaled; a
        # disabled scaler passes scale, unscale_, step and update through
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.sharded = cfg.fsdp and W > 1
        if self.scaler.is_enabled() and self.sharded:
            raise TrainError("fp16 loss scaling is not supported with --fsdp: use bf16, or DDP (no --fsdp)")
        if cfg.batch_size % W:
            raise TrainError(f"batch_size {cfg.batch_size} is not divisible by the world size {W}")
        self.micro = cfg.micro_batch or cfg.batch_size // W
        if (cfg.batch_size // W) % self.micro:
            raise TrainError(f"per-rank batch {cfg.batch_size // W} is not divisible by micro_batch {self.micro}")
        self.accum = cfg.batch_size // W // self.micro

        meta = read_meta(cfg.data)
        self.train_data = TokenData(cfg.data, "train", cfg.seq_len)
        self.val_data = TokenData(cfg.data, "val", cfg.seq_len)
        self.tokenizer, self.tokenizer_file = tokenizer_spec(cfg.data, meta)
        self.data_id = data_fingerprint(cfg.data, meta)

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.step, self.best, self.losses = 0, math.inf, []
        self.bad_steps = self.skipped = 0  # non-finite steps: in a row now, and in the whole run
        # the weights: a checkpoint's (resume), a model directory's (init_from) or new ones
        self.resumed_from = ckpt.resume_dir(self.out, cfg.resume, self.dist.main)
        base = cfg.init_from  # the model a state / lora run tunes
        if self.resumed_from:
            state, arrays = ckpt.read_trainer_state(self.resumed_from)
            changed = ckpt.changed_settings(cfg, state, self.precision, self.data_id)
            if changed:
                raise TrainError(f"cannot resume from {self.resumed_from}: the run's settings changed "
                                 f"({', '.join(changed)})")
            if cfg.tune == "full":
                mcfg, tensors = load_model(self.resumed_from)
                tensors = ckpt.master_weights(self.resumed_from, tensors, arrays)
            else:  # a tuning checkpoint holds the tuned tensors only: its base is read again
                base = tune.resume_base(state.get("tune"), self.resumed_from)
                mcfg, tensors = load_model(base, dtype="float32")
            self.step, self.bad_steps, self.skipped = state["step"], state["bad_steps"], state["skipped_steps"]
            best = state["best_val_loss"]  # null when no finite held-out loss was seen
            self.best = math.inf if best is None else best
        elif cfg.init_from:
            # an MLX-quantized model trains from its dequantized weights (float32 master weights)
            mcfg, tensors = load_dequantized(cfg.init_from, dtype="float32")
            ckpt.check_tokenizer(Path(cfg.init_from), mcfg, self.tokenizer, self.tokenizer_file, cfg.data)
        else:
            mcfg = cfg.model_config(meta["vocab_size"])
            tensors = init_params(mcfg, cfg.seed, np.float32)
        if mcfg.product and self.sharded:
            raise TrainError("--fsdp cannot shard a product-mode model (FSDP2 has no sparse gradients, which its "
                             "value tables have): train it with DDP (no --fsdp)")
        if mcfg.vocab_size < meta["vocab_size"]:
            raise TrainError(f"the model's vocabulary ({mcfg.vocab_size}) is smaller than the data's ({meta['vocab_size']})")
        # train_ctx_len: the longest context this model has been trained on (chat warns past it)
        ctx = max(int(mcfg.extra.get("train_ctx_len", 0)), cfg.seq_len)
        self.model_cfg = mcfg.replace(tokenizer=self.tokenizer,
                                      extra={**mcfg.extra, "train_ctx_len": ctx})
        self.raw = self._build_model(mcfg, tensors)
        # What the run trains, by cfg.tune (metastate/train/tune.py): every weight (full), the initial
        # WKV state of every layer (state) or LoRA adapters (lora), the model frozen; `net` is
        # what the loop runs. save_checkpoint writes accordingly.
        self.tuning = tune.setup(cfg.tune, self.raw, base=base, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        if self.resumed_from and cfg.tune != "full":
            self.tuning.load(self.tuning.read(self.resumed_from), self.resumed_from)
        net = self.tuning.module
        self.tables = tables = set(row_tables(self.raw)) if cfg.tune == "full" else set()
        # DDP leaves the value tables alone: their rows are averaged by reduce_rows
        self.model = wrap(net, W, self.device, cfg.fsdp, ignore=tables)
        self.names = self.tuning.names()  # trainable parameter -> its name in checkpoints
        self.opts = optimizers(net, cfg.lr, (cfg.beta1, cfg.beta2), cfg.adam_eps, cfg.weight_decay)
        self.opt = self.opts[0]  # AdamW
        self.rows = [p for n, p in net.named_parameters() if n in tables and p.requires_grad]
        if self.resumed_from:
            self._load_optimizer(arrays)
            ckpt.set_rng_state(state["rng"], arrays)
            self.scaler.load_state_dict(state["grad_scaler"])

    def _build_model(self, mcfg: ModelConfig, tensors: dict) -> Model:
        """The model, float32 on this device, and its kernels, chosen once (set_kernels: with the
        run's chunk_size and fused setting, which from_tensors does not take)."""
        model = Model.from_tensors(mcfg, tensors, device=self.device, dtype=torch.float32, kernels="ops",
                                   freeze_sse_gate=self.cfg.freeze_sse_gate)
        self.kernels = model.set_kernels(self.cfg.kernels, chunk_size=self.cfg.chunk_size,
                                         fused=None if self.cfg.fused_elementwise else False)
        return model

    def loss(self, batch: np.ndarray) -> torch.Tensor:
        """Mean next-token cross-entropy of batch [B, T + 1] (float32)."""
        x = torch.from_numpy(batch).to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            # targets: the loss a chunk of logits at a time, never all of them
            loss, _ = self.model(x[:, :-1], targets=x[:, 1:], grad_checkpoint=self.cfg.grad_checkpoint)
        return loss

    @property
    def tokens_seen(self) -> int:
        """Training tokens of the steps taken (a skipped step's data counts as used)."""
        return self.step * self.cfg.batch_size * self.cfg.seq_len

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on the global batch of this step. Returns (loss, grad norm).

        A step whose loss or gradient norm is not finite changes nothing but the step count (its
        data is used up): one overflow would otherwise make every weight NaN. Both values are
        global, so every rank skips the same steps. `bad_steps` counts such steps in a row. With
        fp16 the loss is scaled (GradScaler), and an overflow, which also lowers the scale, is
        such a step.
        """
        cfg, W = self.cfg, self.dist.world
        first = cfg.data_start + self.step * cfg.batch_size + self.dist.rank * (cfg.batch_size // W)
        for group in (g for opt in self.opts for g in opt.param_groups):
            group["lr"] = lr_at(cfg, self.step)
        total = 0.0
        for m in range(self.accum):
            batch = self.train_data.batch(first + m * self.micro, self.micro, cfg.seed)
            sync = m == self.accum - 1 or W == 1 or cfg.fsdp
            with nullcontext() if sync else self.model.no_sync():
                loss = self.loss(batch) / self.accum
                self.scaler.scale(loss).backward()
            total += float(loss.detach())
        reduce_rows(self.rows, W)  # the tables' sparse gradients: coalesced, averaged over the ranks
        for opt in self.opts:
            self.scaler.unscale_(opt)  # clip the true gradient
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = clip_norm(params, cfg.grad_clip or math.inf)  # 0: measured, not clipped; the rows count
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        loss = self.dist.all_sum([total], self.device)[0] / W
        if math.isfinite(loss) and math.isfinite(norm):
            for opt in self.opts:
                self.scaler.step(opt)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped += 1
        self.scaler.update()  # fp16: an overflow halves the scale, a run of good steps doubles it
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        return loss, norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss (nats/token) over the first eval_sequences windows."""
        self.model.eval()
        n = min(self.cfg.eval_sequences, self.val_data.n_windows)
        mine = list(range(self.dist.rank, n, self.dist.world))
        total, count = 0.0, 0
        for i in range(0, len(mine), self.micro):
            batch = np.stack([self.val_data.window(j) for j in mine[i:i + self.micro]])
            total += float(self.loss(batch)) * batch.shape[0]
            count += batch.shape[0]
        if self.sharded:  # FSDP: every rank must join every forward
            most = -(-(-(-n // self.dist.world)) // self.micro)
            for _ in range(most - -(-len(mine) // self.micro)):
                self.loss(self.val_data.window(0)[None])
        total, count = self.dist.all_sum([total, count], self.device)
        self.model.train()
        return total / count

    def fit(self) -> dict:
        """Train to max_steps; returns {"losses": per-step losses of this process's run, "val_loss",
        ...}. A SIGINT / SIGTERM / SIGHUP ends the run early with a checkpoint of the step reached,
        raising TrainInterrupted (StopRequest)."""
        cfg, main = self.cfg, self.dist.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_stale(self.out)
            if self.resumed_from:
                ckpt.set_aside(self.out, self.resumed_from, self.step)
            ckpt.trim_metrics(self.out, self.step)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (main and cfg.progress), file=sys.stderr)
        val = self._evaluate_and_log() if self.step == 0 else None
        t0, window_t, window_steps = time.time(), time.time(), 0
        last_plot, interrupted = t0, None
        with StopRequest(announce=main) as stop:
            while self.step < cfg.max_steps and not interrupted:
                loss, norm = self.train_step()
                self.losses.append(loss)
                window_steps += 1
                bar.update()
                if self.bad_steps:
                    self._skipped(loss, norm, bar)
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    now = time.time()
                    tps = window_steps * cfg.batch_size * cfg.seq_len / max(now - window_t, 1e-9)
                    window_t, window_steps = now, 0
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
                    self._log(loss=loss, lr=lr_at(cfg, self.step - 1), grad_norm=norm, tok_per_s=tps,
                              elapsed_s=now - t0, **self._scale_record())
                val = None
                last = self.step == cfg.max_steps
                if self.step % cfg.eval_interval == 0 or last:
                    val = self._evaluate_and_log()
                    self.best = min(self.best, val)
                    bar.set_postfix(loss=f"{loss:.4f}", val=f"{val:.4f}")
                    if main and cfg.plot and (last or time.time() - last_plot > 60):
                        plot_metrics(self.out / METRICS_FILE, self.out / PLOT_FILE)
                        last_plot = time.time()
                saved = self.step % cfg.save_interval == 0 or last
                if saved:
                    self.save_checkpoint(val)
                if val is not None or self.step % cfg.save_interval == 0:
                    window_t = time.time()  # tokens/s counts training time only
                interrupted = stop.agreed(self.dist, self.device) if self.step < cfg.max_steps else None
                if interrupted:
                    if not saved:
                        self.save_checkpoint(val)
                    self._log(interrupted=interrupted)
                    if main and cfg.plot:
                        plot_metrics(self.out / METRICS_FILE, self.out / PLOT_FILE)
        bar.close()
        result = {"losses": self.losses, "val_loss": val, "best_val_loss": self.best, "step": self.step,
                  "skipped_steps": self.skipped, "checkpoint": str(latest_checkpoint(self.out)) if main else None}
        if interrupted:
            raise TrainInterrupted(interrupted, result)
        return result

    def _skipped(self, loss: float, norm: float, bar) -> None:
        """Report the step just skipped; stop the run after max_bad_steps of them in a row."""
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        self._log(skipped=f"non-finite {what}", in_a_row=self.bad_steps, **self._scale_record())
        if self.dist.main:
            scale = f"; fp16 loss scale now {self.scaler.get_scale():g}" if self.scaler.is_enabled() else ""
            bar.write(f"step {self.step}: non-finite {what} ({loss if what == 'loss' else norm}), "
                      f"step skipped (no update){scale}", file=sys.stderr)
        if self.bad_steps >= self.cfg.max_bad_steps:
            last = latest_checkpoint(self.out)
            raise TrainError(
                f"step {self.step}: the loss or gradient has not been finite for {self.bad_steps} steps in a "
                f"row (each skipped, so the weights are those of step {self.step - self.bad_steps}); stopping. "
                f"Last checkpoint: {last or 'none'}. Try a lower lr or grad_clip, or check the data.")

    def _scale_record(self) -> dict:
        return {"loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}

    def _evaluate_and_log(self) -> float:
        """The held-out loss, logged (with its perplexity)."""
        val = self.evaluate()
        self._log(val_loss=val, val_ppl=math.exp(min(val, 50)))
        return val

    def _log(self, **record) -> None:
        """A metrics.jsonl record of the step reached (rank 0); NaN and inf, not JSON, as null."""
        if self.dist.main:
            record = {"step": self.step, "tokens": self.tokens_seen, **record}
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps({k: finite(v) for k, v in record.items()}) + "\n")

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, val_loss: float | None) -> Path:
        """Write checkpoints/step-NNNNNN atomically (rank 0), then apply retention."""
        tensors, opt = self._full_state()  # collective under FSDP: every rank takes part
        path = self.out / ckpt.CKPT_DIR / f"step-{self.step:06d}"
        if self.dist.main:
            state = {"step": self.step, "samples": self.cfg.data_start + self.step * self.cfg.batch_size,
                     "tokens": self.tokens_seen, "val_loss": finite(val_loss), "best_val_loss": finite(self.best),
                     "world_size": self.dist.world, "bad_steps": self.bad_steps, "skipped_steps": self.skipped,
                     "data_fingerprint": self.data_id, "amp": self.precision, "grad_scaler": self.scaler.state_dict(),
                     "config": self.cfg.to_dict(), "torch_version": torch.__version__, "tune": self.tuning.record()}
            if self.cfg.tune == "full":  # a model directory
                ckpt.write_checkpoint(path, self.model_cfg, tensors, opt, state, self.cfg.save_dtype,
                                      self.tokenizer_file)
            else:  # the tuned tensors alone: a state file, or an adapter (tune.py)
                ckpt.write_tuned_checkpoint(path, lambda d: self.tuning.write(d, tensors, self.model_cfg), opt, state)
            ckpt.retain(self.out, self.cfg.keep_last, self.cfg.keep_best)
        self.dist.barrier()
        return path

    def _full_state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(canonical tensors, optimizer arrays 'opt.<name>.<key>'), full; under FSDP gathered to
        rank 0 (with cpu_offload the other ranks get {})."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            tensors = {n: _numpy(t) for n, t in get_model_state_dict(self.model, options=opts).items()}
            opt = get_optimizer_state_dict(self.model, self.opt, options=opts).get("state", {})
        else:
            tensors = self.raw.to_tensors() if self.cfg.tune == "full" else self.tuning.tensors()
            opt = {self.names[p]: s for o in self.opts for p, s in o.state.items()}
        return tensors, {f"opt.{n}.{k}": _numpy(v) for n, s in opt.items() for k, v in s.items()}

    def _load_optimizer(self, arrays: dict[str, np.ndarray]) -> None:
        expect = {n: {k: (tuple(v.shape), v.dtype) for k, v in RowAdam.new_state(p).items()} if n in self.tables else
                  {"exp_avg": (tuple(p.shape), torch.float32), "exp_avg_sq": (tuple(p.shape), torch.float32),
                   "step": ((), torch.float32)}
                  for p, n in self.names.items() if p.requires_grad}
        state = ckpt.optimizer_state(arrays, expect, self.cfg.allow_fresh_optimizer)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            groups = get_optimizer_state_dict(self.model, self.opt, options=opts)["param_groups"]
            set_optimizer_state_dict(self.model, self.opt, {"state": state, "param_groups": groups}, options=opts)
            return
        for p, name in self.names.items():
            if name in state:
                opt = self.opts[-1] if name in self.tables else self.opt
                opt.state[p] = {k: v.to(self.device) for k, v in state[name].items()}  # fused: step too


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as described by cfg; see `Trainer.fit`."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        if trainer.dist.world > 1:
            torch.distributed.destroy_process_group()
