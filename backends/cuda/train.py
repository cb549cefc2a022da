"""The Meta-State trainer (PyTorch): AdamW, warmup + cosine, DDP / FSDP2, exact resume.

    cfg = TrainConfig(data="data/shakespeare", out="runs/small", d_model=128, n_layer=4)
    summary = train(cfg)              # also under torchrun: one process per GPU (or CPU, gloo)

Run layout (`cfg.out`):

    metrics.jsonl                     one JSON object per logged step / evaluation
    loss.png                          train and held-out loss against tokens (needs matplotlib)
    checkpoints/step-000200/          a model directory (weights.save_model: `metastate logits`,
        config.json model.safetensors   `grow`, `inspect` work on it) plus the trainer state:
        tokenizer.model
        trainer_state.json            step, data position and fingerprint, RNG states, config, skip counts, fp16 loss scale
        optimizer.npz                 AdamW moments by canonical parameter name (no pickles)

A checkpoint is written by one `weights.save_model` call (temp directory, fsync, rename), so a
kill at any moment leaves the previous checkpoints whole; stale temp directories are removed
at the next start. Retention keeps the last `keep_last` checkpoints and, with `keep_best`, the
one with the lowest held-out loss.

Determinism: the batch of each step is a pure function of (seed, data position) (see
`data.TokenData`), the model and optimizer are restored bit for bit, so a resumed run
reproduces the uninterrupted run's losses exactly on the same hardware and world size.
The global batch is split over ranks and micro-batches (gradient accumulation) without
changing which sequences it holds, so world size and accumulation do not change the
loss curve beyond float rounding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from metastate_core.config import ModelConfig
from metastate_core.errors import MetaStateError
from metastate_core.params import init_params
from weights import SUPPORTED_DTYPES, convert_dtype, load_model, save_model  # imported up front: a long run never re-imports code

from .data import TOKENIZER_FILE, TokenData, read_meta
from .model import Model, _to_numpy

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
OPT_FILE = "optimizer.npz"
MASTER = "master."  # optimizer.npz prefix of the float32 weights when save_dtype is narrower
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class TrainError(MetaStateError):
    """A training configuration or checkpoint that cannot be used."""


AMP_NAMES = {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # autocast dtype -> precision
PRECISIONS = ("auto", *AMP_NAMES.values())


def _recorded_amp(state: dict, arrays: dict) -> str:
    """The dtype a checkpoint's run computed in; before it was recorded, "auto" meant bf16 on a
    GPU (whose RNG state the checkpoint then holds) and float32 on the CPU."""
    if "amp" in state:
        return state["amp"]
    precision = state["config"].get("precision", "auto")
    if precision == "auto":
        return "bf16" if "rng.cuda" in arrays else "float32"
    return precision


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run, None for float32 throughout. "auto": bfloat16 on a GPU that
    computes it natively (compute capability 8.0 and later), float16 on older GPUs (their
    tensor cores have it; the trainer then scales the loss), float32 on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        precision = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return next(dtype for dtype, name in AMP_NAMES.items() if name == precision)


@dataclass
class TrainConfig:
    """Every setting of a run. TOML files may group keys in tables ([model], [optim], ...)."""

    data: str = ""                      # prepared data directory (`metastate prepare-data`)
    out: str = "runs/default"
    init_from: str | None = None        # start from a model directory (e.g. grown), fresh optimizer
    resume: str | None = None           # "auto" (latest checkpoint in out, if any) or a checkpoint dir
    # model (ignored with init_from / resume: the model directory's config wins)
    d_model: int = 128
    n_layer: int = 4
    head_size: int = 32
    d_att: int | None = None
    n_param_tokens: int | None = None
    sse_heads: int | None = None
    freeze_sse_gate: bool = False       # the ablation baseline: every sse_gate held at 0 (exact RWKV-7)
    # data and batch
    seq_len: int = 128
    batch_size: int = 16                # global: sequences per optimizer step, all ranks together
    micro_batch: int | None = None      # per rank per forward; None: batch_size / world (no accumulation)
    data_start: int = 0                 # first sample index (continue on unseen data after init_from)
    seed: int = 0
    # optimizer and schedule
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip: float = 1.0              # global gradient-norm bound; 0: no clipping
    max_bad_steps: int = 10             # stop after this many steps in a row with a non-finite loss or
                                        # gradient (each is skipped: no update)
    # evaluation, logging, checkpoints
    eval_interval: int = 100
    eval_sequences: int = 64            # held-out windows per evaluation (the first ones, in order)
    log_interval: int = 10
    save_interval: int = 500
    keep_last: int = 2
    keep_best: bool = True
    save_dtype: str = "float32"
    progress: bool = True
    plot: bool = True                   # loss.png at the end and at most once a minute
    # hardware
    device: str = "auto"                # auto: cuda if available, else cpu
    kernels: str = "auto"               # auto: triton on cuda, ops on cpu
    chunk_size: int = 16
    precision: str = "auto"             # auto: bf16 autocast on a GPU that has bf16 (fp16 with loss
                                        # scaling on older ones), float32 on cpu
    fsdp: bool = False                  # FSDP2 (fully_shard) instead of DDP when distributed
    grad_checkpoint: bool = False       # recompute each block in backward: less activation memory
    fused_elementwise: bool = True      # with the Triton kernels: fused elementwise pieces too

    # keys that may change between a checkpoint and its resume without changing the run
    RESUME_FREE = ("out", "resume", "init_from", "progress", "plot", "eval_interval", "log_interval",
                   "save_interval", "keep_last", "keep_best", "save_dtype", "device", "kernels",
                   "micro_batch", "fsdp", "grad_checkpoint", "fused_elementwise", "max_bad_steps")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Config file values, then `overrides` (None values ignored: flags not given)."""
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TrainError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise TrainError(f"malformed config file {path}: {e}") from None
        flat = {}
        for key, value in data.items():
            flat.update(value if isinstance(value, dict) else {key: value})
        flat.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(flat, where=str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainError(f"unknown key {unknown[0]!r} in {where}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # TOML and JSON can hold any type: check each
            _check_type(f.name, str(f.type), getattr(self, f.name))
        if not self.data:
            raise TrainError("no training data: set data (a directory from `metastate prepare-data`)")
        for name in ("seq_len", "batch_size", "max_steps", "eval_sequences", "log_interval",
                     "save_interval", "keep_last", "eval_interval", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise TrainError(f"micro_batch must be a positive integer, got {self.micro_batch}")
        if self.warmup_steps < 0 or self.data_start < 0:
            raise TrainError("warmup_steps and data_start must be >= 0")
        for name in ("lr", "min_lr", "weight_decay", "adam_eps", "grad_clip", "beta1", "beta2"):
            if not math.isfinite(getattr(self, name)):  # TOML has inf and nan
                raise TrainError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not 0 <= self.seed < 2**32:  # the range numpy's and torch's generators take
            raise TrainError(f"seed must be in [0, 2^32), got {self.seed}")
        if not self.lr > 0:
            raise TrainError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise TrainError(f"min_lr must be in [0, lr], got {self.min_lr} (lr {self.lr})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise TrainError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not (self.adam_eps > 0 and self.weight_decay >= 0 and self.grad_clip >= 0):
            raise TrainError(f"adam_eps must be > 0, weight_decay and grad_clip >= 0 (0: no clipping), got "
                             f"{self.adam_eps}, {self.weight_decay}, {self.grad_clip}")
        if self.save_dtype not in SUPPORTED_DTYPES:
            raise TrainError(f"save_dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {self.save_dtype!r}")
        if not 1 <= self.chunk_size <= 64:
            raise TrainError(f"chunk_size must be in [1, 64], got {self.chunk_size}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise TrainError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.init_from and self.resume:
            raise TrainError("init_from starts a new run and resume continues one: give only one")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.kernels not in ("auto", "ops", "triton"):
            raise TrainError(f"kernels must be auto, ops or triton, got {self.kernels!r}")


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_type(name: str, annotation: str, value) -> None:
    """value against a field annotation such as "int", "float" or "str | None"."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    kind = next(k for k in kinds if k != "None")
    if not isinstance(value, _TYPES[kind]) or (kind != "bool" and isinstance(value, bool)):
        raise TrainError(f"{name} must be {_TYPE_WORDS[kind]}, got {value!r}")


# -- schedule and parameter groups -----------------------------------------------------------

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
    return p.dim() >= 2 and (name.endswith(".weight") or name.endswith(("meta.param_keys", "meta.param_values")))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


# -- distributed ------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "Dist":
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a process group (nccl or gloo) if world > 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def all_mean(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def all_sum(self, values: list[float], device) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


class TrainInterrupted(KeyboardInterrupt):
    """A signal stopped the run after a checkpoint of the step reached was saved. A
    KeyboardInterrupt, so that a caller's `except Exception` does not carry on as if training
    had finished. .signal: its name; .result: what `Trainer.fit` returns."""

    def __init__(self, signal_name: str, result: dict):
        super().__init__(f"{signal_name} at step {result['step']}: checkpoint {result['checkpoint']}")
        self.signal, self.result = signal_name, result


class StopRequest:
    """SIGINT (Ctrl-C), SIGTERM (a scheduler's preemption) and SIGHUP (a closed terminal) during
    `Trainer.fit`: the step in progress finishes, a checkpoint is saved and the run stops
    (TrainInterrupted), so that `resume="auto"` continues it exactly. A second Ctrl-C stops at
    once, unsaved. A signal the process ignores (SIG_IGN, as nohup sets SIGHUP) stays ignored."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self, announce: bool):
        self.announce, self.received, self._previous = announce, set(), {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python's handlers live there only
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received.add(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.announce:  # os.write: a print here could re-enter a write the signal interrupted
            again = " (Ctrl-C again: stop at once, unsaved)" if signum == signal.SIGINT else ""
            os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and "
                        f"stopping{again}\n".encode())

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: not set from Python

    def agreed(self, dist: "Dist", device) -> str | None:
        """The signal that stops the run, decided alike on every rank (a signal may reach only some);
        None to go on."""
        flags = dist.all_sum([float(s in self.received) for s in self.SIGNALS], device)
        got = [s for s, f in zip(self.SIGNALS, flags) if f]
        return signal.Signals(got[-1]).name if got else None


# -- checkpoints ------------------------------------------------------------------------------

def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if re.fullmatch(r"step-\d+", p.name)  # not a copied "step-best"
             and (p / STATE_FILE).is_file() and (p / OPT_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def _clean_stale(out: Path) -> None:
    """Temp and half-deleted directories left by a kill during a save or a retention sweep."""
    root = out / CKPT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def _rng_state() -> tuple[dict, dict]:
    """(JSON part, array part) of the torch / numpy / python RNG states."""
    py = random.getstate()
    np_state = np.random.get_state()
    arrays = {"rng.torch": torch.get_rng_state().numpy(), "rng.numpy": np_state[1]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        arrays["rng.cuda"] = torch.cuda.get_rng_state().numpy()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], *np_state[2:]]}
    return meta, arrays


def _set_rng_state(meta: dict, arrays: dict) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], arrays["rng.numpy"], *n[1:]))
    torch.set_rng_state(torch.from_numpy(arrays["rng.torch"].copy()))
    if "rng.cuda" in arrays and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(arrays["rng.cuda"].copy()))


def _master_weights(ckpt: Path, tensors: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> dict:
    """The float32 weights to resume from: the model file's, or, when it was saved in a narrower
    save_dtype, the float32 copies kept beside the optimizer state."""
    masters = {k[len(MASTER):]: v for k, v in arrays.items() if k.startswith(MASTER)}
    if not masters:
        narrow = sorted({t.dtype.name for t in tensors.values()} - {"float32"})
        if narrow:
            warnings.warn(f"{ckpt} holds its weights as {narrow[0]} only (saved before float32 copies were kept): "
                          "the run continues from rounded weights, not bit for bit", stacklevel=3)
        return convert_dtype(tensors, "float32")
    for name, t in tensors.items():
        m = masters.get(name)
        if m is None or m.shape != t.shape or m.dtype != np.float32 or not np.isfinite(m).all():
            got = "missing" if m is None else f"{m.dtype} {list(m.shape)}"
            raise TrainError(f"corrupt training checkpoint {ckpt}: float32 weight {name} is {got}, "
                             f"expected float32 {list(t.shape)}, finite")
    return {name: masters[name] for name in tensors}


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_trainer_state(ckpt: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(trainer_state.json, optimizer.npz arrays) of a checkpoint; arrays load without pickles."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
        with np.load(ckpt / OPT_FILE, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError as e:
        raise TrainError(f"{ckpt} is not a training checkpoint: {Path(e.filename).name} is missing") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise TrainError(f"corrupt training checkpoint {ckpt}: {e}") from None
    missing = ([k for k in ("step", "config", "rng") if k not in state] if isinstance(state, dict) else [STATE_FILE])
    missing += [k for k in ("rng.torch", "rng.numpy") if k not in arrays]
    if missing:
        raise TrainError(f"corrupt training checkpoint {ckpt}: no {', '.join(missing)}")
    return state, arrays


class Trainer:
    """One run: model, optimizer, data, and the loop. `Trainer(cfg).fit()`."""

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        dev = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise TrainError(f"device {dev}: torch sees no CUDA GPU here (use --device cpu or auto)")
        if dev == "cuda":  # one GPU per process, chosen before NCCL starts
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if dev.startswith("cuda"):  # also for an explicit cuda:N: NCCL and Triton use the current device
            count = torch.cuda.device_count()
            if torch.device(dev).index >= count:
                raise TrainError(f"device {dev}: torch sees {count} CUDA GPU{'s' * (count > 1)} here "
                                 f"(cuda:0 to cuda:{count - 1})")
            torch.cuda.set_device(dev)
        self.dist = Dist.from_env(torch.device(dev).type)
        self.device = torch.device(dev)
        self.amp = amp_dtype(cfg.precision, self.device)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=self.amp)) if self.amp else nullcontext
        # float16 gradients underflow (and overflow past 65504) unless the loss is scaled
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        if self.scaler and cfg.fsdp and self.dist.world > 1:
            raise TrainError("fp16 loss scaling is not supported with --fsdp: use bf16, or DDP (no --fsdp)")
        self.out = Path(cfg.out)

        W = self.dist.world
        if cfg.batch_size % W:
            raise TrainError(f"batch_size {cfg.batch_size} is not divisible by the world size {W}")
        self.micro = cfg.micro_batch or cfg.batch_size // W
        if (cfg.batch_size // W) % self.micro:
            raise TrainError(f"per-rank batch {cfg.batch_size // W} is not divisible by micro_batch {self.micro}")
        self.accum = cfg.batch_size // W // self.micro

        meta = read_meta(cfg.data)
        self.train_data = TokenData(cfg.data, "train", cfg.seq_len)
        self.val_data = TokenData(cfg.data, "val", cfg.seq_len)
        self.tokenizer_file = Path(cfg.data) / meta.get("tokenizer", TOKENIZER_FILE)

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.step, self.best, resume_state, opt_arrays = 0, math.inf, None, None
        self.resumed_from: Path | None = None
        self.bad_steps = self.skipped = 0  # non-finite steps: in a row now, and in the whole run
        self.data_id = data_fingerprint(cfg.data, meta)
        ckpt = self._resume_dir()
        if ckpt is None and list_checkpoints(self.out):  # a new run would mix with (and prune) the old one's
            raise TrainError(f"{self.out} already holds a run's checkpoints (latest {latest_checkpoint(self.out)}): "
                             "continue it with --resume, or give the new run another --out")
        if ckpt is not None:
            resume_state, opt_arrays = read_trainer_state(ckpt)
            changed = self._changed_settings(resume_state, opt_arrays)
            if changed:
                raise TrainError(f"cannot resume from {ckpt}: the run's settings changed ({', '.join(changed)})")
            mcfg, tensors = load_model(ckpt)
            tensors = _master_weights(ckpt, tensors, opt_arrays)
            best = resume_state.get("best_val_loss")  # null when no finite held-out loss was seen
            self.step, self.best = resume_state["step"], math.inf if best is None else best
            self.bad_steps = resume_state.get("bad_steps", 0)
            self.skipped = resume_state.get("skipped_steps", 0)
            self.resumed_from = ckpt
        elif cfg.init_from:
            mcfg, tensors = load_model(cfg.init_from, dtype="float32")
            self._check_tokenizer(Path(cfg.init_from), mcfg)
        else:
            mcfg = ModelConfig(vocab_size=meta["vocab_size"], d_model=cfg.d_model, n_layer=cfg.n_layer,
                               head_size=cfg.head_size, d_att=cfg.d_att, n_param_tokens=cfg.n_param_tokens,
                               sse_heads=cfg.sse_heads)
            tensors = init_params(mcfg, cfg.seed, np.float32)
        if mcfg.vocab_size < meta["vocab_size"]:
            raise TrainError(f"the model's vocabulary ({mcfg.vocab_size}) is smaller than the data's ({meta['vocab_size']})")
        # train_ctx_len: the longest context this model has been trained on (chat warns past it)
        ctx = max(int(mcfg.extra.get("train_ctx_len", 0)), cfg.seq_len)
        self.model_cfg = mcfg.replace(tokenizer={"type": "sentencepiece", "file": TOKENIZER_FILE},
                                      extra={**mcfg.extra, "train_ctx_len": ctx})
        self.raw = Model.from_tensors(mcfg, tensors, device=self.device, dtype=torch.float32,
                                      freeze_sse_gate=cfg.freeze_sse_gate)
        self.kernels = self.raw.resolve_kernels(cfg.kernels)
        self.model = self._wrap(self.raw)
        self.names = {p: n for n, p in self.model.named_parameters()}
        # fused: one kernel for every parameter's update instead of a few per tensor list
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=True)
        if resume_state is not None:
            self._load_optimizer(opt_arrays)
            _set_rng_state(resume_state["rng"], opt_arrays)
            if self.scaler and resume_state.get("grad_scaler"):
                self.scaler.load_state_dict(resume_state["grad_scaler"])
        self.losses: list[float] = []

    def _changed_settings(self, state: dict, arrays: dict) -> list[str]:
        """The settings that define the loss curve and differ from a checkpoint's. The data is
        compared by content (data_fingerprint), the precision by the dtype the run computed in."""
        cfg, old = self.cfg, state["config"]
        changed = [k for k, v in cfg.to_dict().items()
                   if k not in cfg.RESUME_FREE and k not in ("data", "precision") and old.get(k) != v]
        if _recorded_amp(state, arrays) != AMP_NAMES[self.amp]:
            changed.append("precision")
        if "data_fingerprint" in state:
            if state["data_fingerprint"] != self.data_id:
                changed.append("data")
        elif Path(old.get("data", "")).resolve() != Path(cfg.data).resolve():
            changed.append("data")
        return changed

    def _check_tokenizer(self, model_dir: Path, mcfg: ModelConfig) -> None:
        """A model may continue on data only if both use the same tokenizer (ids mean the same)."""
        tok = mcfg.tokenizer
        if tok is None:  # e.g. an imported official checkpoint: nothing to compare
            return
        if tok.get("type") != "sentencepiece":
            raise TrainError(f"{model_dir}'s tokenizer is {tok.get('type')!r}; the trainer's data is tokenized by "
                             "sentencepiece only, so its token ids would mean other pieces")
        file = model_dir / tok.get("file", "")
        if not (file.is_file() and self.tokenizer_file.is_file()
                and file.read_bytes() == self.tokenizer_file.read_bytes()):
            raise TrainError(f"{model_dir}'s tokenizer ({tok.get('file')}) is not the one {self.cfg.data} was "
                             f"prepared with: its token ids mean other pieces. Prepare the data with "
                             f"`metastate prepare-data --tokenizer {file}`")

    def _resume_dir(self) -> Path | None:
        r = self.cfg.resume
        if not r:
            return None
        if r == "auto":
            _clean_stale(self.out) if self.dist.main else None
            latest = latest_checkpoint(self.out)
            if latest is None:
                self._no_checkpoint_yet()
            return latest
        if not Path(r).is_dir():
            raise TrainError(f"resume checkpoint {r} does not exist")
        return Path(r)

    def _no_checkpoint_yet(self) -> None:
        """--resume auto in an out without checkpoints starts a new run, unless the run there
        started from a model (init_from): a new run would start from random weights instead."""
        try:
            begun = json.loads((self.out / "train_config.json").read_text(encoding="utf-8")).get("init_from")
        except (OSError, ValueError, AttributeError):
            begun = None
        if begun:
            raise TrainError(f"{self.out} holds no checkpoint yet, and its run started from --init-from {begun}: "
                             "start that run again (with --init-from, without --resume)")
        if self.dist.main:
            print(f"note: no checkpoint in {self.out}: starting a new run", file=sys.stderr)

    def _set_aside_other_checkpoints(self) -> None:
        """out/checkpoints holds one line of steps. Resuming from an earlier checkpoint of it, the
        later ones belong to another continuation; resuming from a checkpoint elsewhere (another
        run, or out/superseded/), all of them do. They move to out/superseded/, so that
        retention (which keeps the highest steps) cannot delete this run's own checkpoints for
        them, nor `--resume auto` pick them up; nothing is deleted."""
        if self.resumed_from is None:
            return
        own = Path(self.resumed_from).resolve().parent == (self.out / CKPT_DIR).resolve()
        later = [p for p in list_checkpoints(self.out) if not own or int(p.name.split("-")[1]) > self.step]
        if not later:
            return
        dest = self.out / "superseded" / f"after-step-{self.step:06d}"
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"after-step-{self.step:06d}-{n}")
        dest.mkdir(parents=True)
        for ckpt in later:
            os.rename(ckpt, dest / ckpt.name)
        print(f"note: resuming at step {self.step}: the checkpoints of another continuation "
              f"({', '.join(c.name for c in later)}) moved to {dest}", file=sys.stderr)

    def _wrap(self, model: Model) -> torch.nn.Module:
        if self.dist.world == 1:
            return model
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            # TimeMix returns views (e.g. v_first); the model never updates them in place.
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            # Units that gather their parameters: each block's time mix and Meta-State layer (one
            # at a time, a lower peak than whole blocks); the root holds emb, the norms and head.
            for block in model.blocks:
                fully_shard(block.att)
                fully_shard(block.meta)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    # -- state in and out -------------------------------------------------------------------
    def _full_state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(canonical tensors, optimizer arrays 'opt.<name>.<key>'), full, on every rank."""
        if self.cfg.fsdp and self.dist.world > 1:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = get_model_state_dict(self.model, options=opts)
            osd = get_optimizer_state_dict(self.model, self.opt, options=opts)
            # with cpu_offload only rank 0 receives the full tensors; the others get {}
            tensors = {n: _to_numpy(msd[n]) for n in msd}
            opt = {f"opt.{n}.{k}": _to_numpy(torch.as_tensor(v)) for n, s in osd.get("state", {}).items()
                   for k, v in s.items()}
            return tensors, opt
        tensors = self.raw.to_tensors()
        opt = {}
        for p, s in self.opt.state.items():
            name = self.names[p].removeprefix("module.")
            for k, v in s.items():
                opt[f"opt.{name}.{k}"] = v.detach().cpu().numpy()
        return tensors, opt

    def _load_optimizer(self, arrays: dict[str, np.ndarray]) -> None:
        state: dict[str, dict] = {}
        shapes = {n: tuple(p.shape) for n, p in self.raw.named_parameters() if p.requires_grad}
        frozen = {n for n, p in self.raw.named_parameters() if not p.requires_grad}
        for key, value in arrays.items():
            if key.startswith("opt."):
                name, k = key[4:].rsplit(".", 1)
                if name in frozen:  # trained by an older version (sse_gate with sse_heads 0)
                    continue
                # the fused AdamW kernel reads moments unchecked: a wrong shape must stop here
                want = () if k == "step" else shapes.get(name)
                if want is None or tuple(value.shape) != want or value.dtype != np.float32:
                    raise TrainError(f"corrupt optimizer state {key}: {value.dtype} {list(value.shape)}, expected "
                                     + (f"float32 {list(want)}" if want is not None else "no such parameter"))
                state.setdefault(name, {})[k] = torch.from_numpy(value.copy())
        if self.cfg.fsdp and self.dist.world > 1:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            groups = get_optimizer_state_dict(self.model, self.opt, options=opts)["param_groups"]
            set_optimizer_state_dict(self.model, self.opt, {"state": state, "param_groups": groups}, options=opts)
            return
        for p, name in self.names.items():
            s = state.get(name.removeprefix("module."))
            if s is not None:
                self.opt.state[p] = {k: v.to(self.device) for k, v in s.items()}  # fused: step too

    def save_checkpoint(self, val_loss: float | None) -> Path | None:
        """Write checkpoints/step-NNNNNN atomically (rank 0), then apply retention."""
        tensors, opt = self._full_state()  # collective under FSDP: every rank takes part
        path = self.out / CKPT_DIR / f"step-{self.step:06d}"
        if self.dist.main:
            rng_meta, rng_arrays = _rng_state()
            state = {"step": self.step, "samples": self.cfg.data_start + self.step * self.cfg.batch_size,
                     "tokens": self.tokens_seen, "val_loss": _finite(val_loss),
                     "best_val_loss": _finite(self.best), "world_size": self.dist.world,
                     "bad_steps": self.bad_steps, "skipped_steps": self.skipped, "data_fingerprint": self.data_id,
                     "amp": AMP_NAMES[self.amp],
                     "grad_scaler": self.scaler.state_dict() if self.scaler else None,
                     "config": self.cfg.to_dict(), "rng": rng_meta,
                     "torch_version": torch.__version__}
            # the model file holds save_dtype for use; resuming needs the float32 weights themselves
            masters = {} if self.cfg.save_dtype == "float32" else {f"{MASTER}{n}": t for n, t in tensors.items()}
            extra = {STATE_FILE: (json.dumps(state, indent=1) + "\n").encode(),
                     OPT_FILE: _npz_bytes({**opt, **rng_arrays, **masters})}
            if self.tokenizer_file.is_file():
                extra[TOKENIZER_FILE] = self.tokenizer_file
            save_model(path, self.model_cfg, tensors, dtype=self.cfg.save_dtype, extra_files=extra)
            self._retain()
        self.dist.barrier()
        return path

    def _retain(self) -> None:
        found = list_checkpoints(self.out)
        keep = set(found[-self.cfg.keep_last:])
        if self.cfg.keep_best:
            scored = [(json.loads((p / STATE_FILE).read_text())["val_loss"], p) for p in found]
            scored = [(v, p) for v, p in scored if v is not None]
            if scored:
                keep.add(min(scored, key=lambda vp: vp[0])[1])
        for p in found:
            if p not in keep:  # rename first: a kill mid-delete leaves a hidden dir, not a broken ckpt
                trash = p.with_name(f".deleted-{p.name}")
                os.rename(p, trash)
                shutil.rmtree(trash, ignore_errors=True)

    # -- the loop ---------------------------------------------------------------------------
    def loss(self, batch: np.ndarray) -> torch.Tensor:
        """Mean next-token cross-entropy of batch [B, T + 1] (float32)."""
        x = torch.from_numpy(batch).to(self.device)
        with self.autocast():  # targets: the loss a chunk of logits at a time, never all of them
            loss, _ = self.model(x[:, :-1], targets=x[:, 1:], kernels=self.kernels, chunk_size=self.cfg.chunk_size,
                                 grad_checkpoint=self.cfg.grad_checkpoint,
                                 fused=None if self.cfg.fused_elementwise else False)
        return loss

    @property
    def tokens_seen(self) -> int:
        """Training tokens of the steps taken (a skipped step's data counts as used)."""
        return self.step * self.cfg.batch_size * self.cfg.seq_len

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
        if self.cfg.fsdp and self.dist.world > 1:  # FSDP: every rank must join every forward
            most = -(-(-(-n // self.dist.world)) // self.micro)
            for _ in range(most - -(-len(mine) // self.micro)):
                self.loss(self.val_data.window(0)[None])
        total, count = self.dist.all_sum([total, count], self.device)
        self.model.train()
        return total / count

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on the global batch of this step. Returns (loss, grad norm).

        A step whose loss or gradient norm is not finite changes nothing but the step count (its
        data is used up): one overflow would otherwise make every weight NaN. Both values are
        global, so every rank skips the same steps. `bad_steps` counts such steps in a row. With
        fp16 the loss is scaled (GradScaler), and an overflow, which also lowers the scale, is
        such a step.
        """
        cfg, W = self.cfg, self.dist.world
        per_rank = cfg.batch_size // W
        first = cfg.data_start + self.step * cfg.batch_size + self.dist.rank * per_rank
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        total = 0.0
        for m in range(self.accum):
            batch = self.train_data.batch(first + m * self.micro, self.micro, cfg.seed)
            sync = m == self.accum - 1 or W == 1 or cfg.fsdp
            ctx = nullcontext() if sync else self.model.no_sync()
            with ctx:
                loss = self.loss(batch) / self.accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler:
            self.scaler.unscale_(self.opt)  # clip the true gradient
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)  # 0: measured, not clipped
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        (loss,) = self.dist.all_mean([total], self.device)
        norm = float(norm)
        if math.isfinite(loss) and math.isfinite(norm):
            self.scaler.step(self.opt) if self.scaler else self.opt.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped += 1
        if self.scaler:
            self.scaler.update()  # an overflow halves the scale, a run of good steps doubles it
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return loss, norm

    def fit(self) -> dict:
        """Train to max_steps; returns {"losses": per-step losses of this process's run, "val_loss",
        ...}. A SIGINT / SIGTERM / SIGHUP ends the run early with a checkpoint of the step reached,
        raising TrainInterrupted (StopRequest)."""
        cfg, main = self.cfg, self.dist.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            _clean_stale(self.out)
            self._set_aside_other_checkpoints()
            self._trim_metrics()
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (main and cfg.progress), file=sys.stderr)
        val = None
        if self.step == 0:
            val = self.evaluate()
            self._log({"step": 0, "tokens": 0, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
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
                    self._log({"step": self.step, "tokens": self.tokens_seen, "loss": loss,
                               "lr": lr_at(cfg, self.step - 1), "grad_norm": norm, "tok_per_s": tps,
                               "elapsed_s": now - t0, **self._scale_record()})
                val = None
                last = self.step == cfg.max_steps
                if self.step % cfg.eval_interval == 0 or last:
                    val = self.evaluate()
                    self.best = min(self.best, val)
                    self._log({"step": self.step, "tokens": self.tokens_seen, "val_loss": val,
                               "val_ppl": math.exp(min(val, 50))})
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
                    self._log({"step": self.step, "tokens": self.tokens_seen, "interrupted": interrupted})
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
        self._log({"step": self.step, "tokens": self.tokens_seen,
                   "skipped": f"non-finite {what}", "in_a_row": self.bad_steps, **self._scale_record()})
        if self.dist.main:
            scale = f"; fp16 loss scale now {self.scaler.get_scale():g}" if self.scaler else ""
            bar.write(f"step {self.step}: non-finite {what} ({loss if what == 'loss' else norm}), "
                      f"step skipped (no update){scale}", file=sys.stderr)
        if self.bad_steps >= self.cfg.max_bad_steps:
            last = latest_checkpoint(self.out)
            raise TrainError(
                f"step {self.step}: the loss or gradient has not been finite for {self.bad_steps} steps in a "
                f"row (each skipped, so the weights are those of step {self.step - self.bad_steps}); stopping. "
                f"Last checkpoint: {last or 'none'}. Try a lower lr or grad_clip, or check the data.")

    def _scale_record(self) -> dict:
        return {"loss_scale": self.scaler.get_scale()} if self.scaler else {}

    def _log(self, record: dict) -> None:
        if self.dist.main:  # NaN and inf are not JSON: they are written as null
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")

    def _trim_metrics(self) -> None:
        """On resume, drop records past the checkpoint (they belonged to the killed tail)."""
        file = self.out / METRICS_FILE
        if not file.exists():
            return
        if self.step == 0:
            file.unlink()  # a fresh run in a used directory starts a fresh log
            return
        keep = [line for line in file.read_text().splitlines() if _record_step(line) <= self.step]
        file.write_text("".join(line + "\n" for line in keep))


def _record_step(line: str) -> float:
    """The step of a metrics line; infinity for a blank or cut-off one (a kill mid-write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def data_fingerprint(data_dir: str | Path, meta: dict) -> str:
    """What a prepared data directory holds, wherever it lies: its meta.json (token counts per
    shard, dtype, vocabulary, seed; not the source paths) and its tokenizer file."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sources"}, sort_keys=True).encode())
    tok = Path(data_dir) / meta.get("tokenizer", TOKENIZER_FILE)
    h.update(tok.read_bytes() if tok.is_file() else b"")
    return h.hexdigest()[:16]


def _finite(x):
    """x, or None for a float NaN / inf (JSON has neither)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as described by cfg; see `Trainer.fit`."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        if trainer.dist.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def read_metrics(file: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(file).read_text().splitlines() if line.strip()]


def _points(records: list[dict], key: str, min_tokens: int = 0) -> list[tuple[int, float]]:
    """(tokens, value) of the records holding key; a null value (non-finite) is a gap."""
    return [(r["tokens"], math.nan if r[key] is None else r[key])
            for r in records if key in r and r["tokens"] >= min_tokens]


def plot_metrics(metrics_file: str | Path, png: str | Path, title: str | None = None) -> bool:
    """Train / held-out loss against tokens as a PNG; False (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the loss plot", stacklevel=2)
        return False
    records = read_metrics(metrics_file)
    train_pts, val_pts = _points(records, "loss"), _points(records, "val_loss")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train_pts:
        ax.plot(*zip(*train_pts), lw=1, alpha=0.7, label="train")
    if val_pts:
        ax.plot(*zip(*val_pts), "o-", ms=3, label="held-out")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or Path(metrics_file).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png).with_name(f".{Path(png).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return True


def plot_runs(runs: dict[str, str | Path], png: str | Path, title: str = "held-out loss",
              key: str = "val_loss", min_tokens: int = 0) -> bool:
    """Held-out (or train, key="loss") loss of several runs against tokens: {label: metrics.jsonl}.

    min_tokens: leave out earlier points (zoom on the tail, where runs differ)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the plot", stacklevel=2)
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, file in runs.items():
        pts = _points(read_metrics(file), key, min_tokens)
        ax.plot(*zip(*pts), "o-" if key == "val_loss" else "-", ms=3, lw=1, label=label)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True
