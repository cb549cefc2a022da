"""The run directory and its checkpoints: each rule of saving, keeping and resuming a run is a
function of the directory (and of the arrays it reads or writes) alone.

    out/metrics.jsonl loss.png train_config.json
    out/checkpoints/step-000200/   a model directory (config.json, model.safetensors, the tokenizer) and
        trainer_state.json         step, data position and fingerprint, RNG, config, skip counts, fp16 loss scale
        optimizer.npz              AdamW moments (RowAdam's row state for product value tables), RNG arrays,
                                   float32 weights if save_dtype is narrower
    out/superseded/after-step-000100/   the checkpoints of another continuation, set aside on resume

A checkpoint is written by one `weights.save_model` call (temp directory, fsync, rename), so a
kill at any moment leaves the previous checkpoints whole; stale temp directories go at the next start.
A resume checks the whole checkpoint (every value's type and range, the arrays' sizes) before
it uses any of it; retention only counts, and only deletes, checkpoints it can read.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from metastate_core.config import ModelConfig
from weights import save_model
from weights.format import write_directory
from weights.files import WeightsError, check_memory, open_regular, parse_json, read_text

from .config import PRECISIONS, TrainConfig, TrainError

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
OPT_FILE = "optimizer.npz"
MASTER = "master."  # optimizer.npz prefix of the float32 weights when save_dtype is narrower
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_MT_WORDS = 624  # words of a Mersenne Twister state (Python's random, NumPy's legacy generator)
# every key a checkpoint's trainer_state.json holds that a resume reads
STATE_KEYS = ("step", "config", "rng", "amp", "data_fingerprint", "best_val_loss", "bad_steps", "skipped_steps",
              "grad_scaler")


def finite(x):
    """x, or None for a float NaN / inf (JSON has neither)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


# -- the checkpoints of a run -----------------------------------------------------------------

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


def clean_stale(out: Path) -> None:
    """Temp and half-deleted directories left by a kill during a save or a retention sweep."""
    root = out / CKPT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def retain(out: Path, keep_last: int, keep_best: bool) -> None:
    """Delete all but the last keep_last checkpoints and, with keep_best, the lowest held-out
    loss's. Only checkpoints whose trainer_state.json reads as valid count, and only they are
    deleted: a damaged one is left as it is (with a note), never the reason a save fails or a
    good checkpoint goes."""
    good, damaged = [], []
    for p in list_checkpoints(out):
        try:
            state = read_state_json(p)
            problem = _state_problem(state, p)
        except TrainError as e:
            problem = str(e)
        if problem:
            damaged.append(p)
        else:
            good.append((p, state.get("val_loss")))
    if damaged:
        print(f"note: retention leaves alone the checkpoints it cannot read: {', '.join(p.name for p in damaged)}",
              file=sys.stderr)
    keep = {p for p, _ in good[-keep_last:]}
    scored = [(v, p) for p, v in good if v is not None]
    if keep_best and scored:
        keep.add(min(scored, key=lambda vp: vp[0])[1])
    for p, _ in good:
        if p not in keep:  # rename first: a kill mid-delete leaves a hidden dir, not a broken ckpt
            trash = p.with_name(f".deleted-{p.name}")
            os.rename(p, trash)
            shutil.rmtree(trash, ignore_errors=True)


def resume_dir(out: Path, resume: str | None, main: bool) -> Path | None:
    """The checkpoint a run continues from; None for a new run, which refuses an `out` holding
    checkpoints (it would mix its own with them, and retention would delete some of either)."""
    if not resume:
        if list_checkpoints(out):
            raise TrainError(f"{out} already holds a run's checkpoints (latest {latest_checkpoint(out)}): "
                             "continue it with --resume, or give the new run another --out")
        return None
    if resume != "auto":
        if not Path(resume).is_dir():
            raise TrainError(f"resume checkpoint {resume} does not exist")
        return Path(resume)
    if main:
        clean_stale(out)
    latest = latest_checkpoint(out)
    if latest is None:
        _no_checkpoint_yet(out, main)
    return latest


def _no_checkpoint_yet(out: Path, main: bool) -> None:
    """--resume auto in an out without checkpoints starts a new run, unless the run there
    started from a model (init_from): a new run would start from random weights instead."""
    try:
        begun = json.loads((out / "train_config.json").read_text(encoding="utf-8")).get("init_from")
    except (OSError, ValueError, AttributeError, RecursionError):
        begun = None
    if begun:
        raise TrainError(f"{out} holds no checkpoint yet, and its run started from --init-from {begun}: "
                         "start that run again (with --init-from, without --resume)")
    if main:
        print(f"note: no checkpoint in {out}: starting a new run", file=sys.stderr)


def set_aside(out: Path, resumed_from: Path, step: int) -> None:
    """out/checkpoints holds one line of steps. Resuming from an earlier checkpoint of it, the
    later ones belong to another continuation; resuming from a checkpoint elsewhere (another
    run, or out/superseded/), all of them do. They move to out/superseded/, so that
    retention (which keeps the highest steps) cannot delete this run's own checkpoints for
    them, nor `--resume auto` pick them up; nothing is deleted."""
    own = resumed_from.resolve().parent == (out / CKPT_DIR).resolve()
    later = [p for p in list_checkpoints(out) if not own or int(p.name.split("-")[1]) > step]
    if not later:
        return
    dest = out / "superseded" / f"after-step-{step:06d}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"after-step-{step:06d}-{n}")
    dest.mkdir(parents=True)
    for ckpt in later:
        os.rename(ckpt, dest / ckpt.name)
    print(f"note: resuming at step {step}: the checkpoints of another continuation "
          f"({', '.join(c.name for c in later)}) moved to {dest}", file=sys.stderr)


def trim_metrics(out: Path, step: int) -> None:
    """On resume, drop records past the checkpoint (they belonged to the killed tail)."""
    file = out / METRICS_FILE
    if not file.exists():
        return
    if step == 0:
        file.unlink()  # a fresh run in a used directory starts a fresh log
        return
    keep = [line for line in file.read_text().splitlines() if _record_step(line) <= step]
    file.write_text("".join(line + "\n" for line in keep))


def _record_step(line: str) -> float:
    """The step of a metrics line; infinity for a blank or cut-off one (a kill mid-write)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return math.inf
    return step if _is_number(step) else math.inf


# -- one checkpoint ---------------------------------------------------------------------------

def write_checkpoint(path: Path, model_cfg: ModelConfig, tensors: dict[str, np.ndarray], opt: dict[str, np.ndarray],
                     state: dict, save_dtype: str, tokenizer_file: Path) -> None:
    """A model directory of tensors in save_dtype, with the trainer state (state and this
    process's RNG states) and the optimizer arrays."""
    rng_meta, rng_arrays = rng_state()
    # the model file holds save_dtype for use; resuming needs the float32 weights themselves
    masters = {} if save_dtype == "float32" else {f"{MASTER}{n}": t for n, t in tensors.items()}
    buf = io.BytesIO()
    np.savez(buf, **opt, **rng_arrays, **masters)
    extra = {STATE_FILE: (json.dumps({**state, "rng": rng_meta}, indent=1) + "\n").encode(), OPT_FILE: buf.getvalue()}
    if tokenizer_file.is_file():
        extra[tokenizer_file.name] = tokenizer_file
    save_model(path, model_cfg, tensors, dtype=save_dtype, extra_files=extra)


def write_tuned_checkpoint(path: Path, write_tuned, opt: dict[str, np.ndarray], state: dict) -> None:
    """A tuning run's checkpoint (--tune state / lora): write_tuned(directory) writes the tuned
    tensors' files (metastate/train/tune.py), beside the trainer state and the optimizer arrays; no
    model weights (the base is read again on resume). Atomic as a model directory is."""
    rng_meta, rng_arrays = rng_state()
    buf = io.BytesIO()
    np.savez(buf, **opt, **rng_arrays)

    def fill(tmp: Path) -> None:
        write_tuned(tmp)
        for name, data in ((STATE_FILE, (json.dumps({**state, "rng": rng_meta}, indent=1) + "\n").encode()),
                           (OPT_FILE, buf.getvalue())):
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

    write_directory(path, fill)


def read_trainer_state(ckpt: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(trainer_state.json, optimizer.npz arrays) of a checkpoint, each checked whole (schema,
    types, ranges) before any of it is used; arrays load without pickles. TrainError otherwise."""
    ckpt = Path(ckpt)
    state = read_state_json(ckpt)
    arrays = _read_arrays(ckpt)
    problem = _state_problem(state, ckpt) or _arrays_problem(arrays)
    if problem:
        raise TrainError(f"corrupt training checkpoint {ckpt}: {problem}")
    return state, arrays


def read_state_json(ckpt: Path) -> dict:
    """trainer_state.json as parsed (strict JSON: a regular file, nested a few levels), unchecked."""
    try:
        return parse_json(read_text(ckpt / STATE_FILE, STATE_FILE), STATE_FILE)
    except WeightsError as e:
        if not os.path.lexists(ckpt / STATE_FILE):
            raise TrainError(f"{ckpt} is not a training checkpoint: {STATE_FILE} is missing") from None
        raise TrainError(f"corrupt training checkpoint {ckpt}: {e}") from None


def _read_arrays(ckpt: Path) -> dict[str, np.ndarray]:
    """optimizer.npz's arrays; each member's declared size is checked against the file (and the
    memory here) before it is read: numpy allocates a declared shape before reading its data."""
    file = ckpt / OPT_FILE
    try:
        with open_regular(file, OPT_FILE) as f:
            total = 0
            with zipfile.ZipFile(f) as zf:
                for info in zf.infolist():
                    with zf.open(info) as member:
                        version = np.lib.format.read_magic(member)
                        if version not in _NPY_HEADERS:
                            raise ValueError(f"{info.filename} is a .npy file of version {version}")
                        shape, _, dtype = _NPY_HEADERS[version](member)
                    nbytes = math.prod(shape) * dtype.itemsize
                    if dtype.hasobject or nbytes > info.file_size:
                        raise ValueError(f"{info.filename} declares {dtype} {list(shape)}, " + (
                            "objects" if dtype.hasobject else f"more than its {info.file_size} bytes"))
                    total += nbytes
            check_memory(total, f"{file}'s arrays")
            f.seek(0)
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
    except WeightsError as e:
        if not os.path.lexists(file):
            raise TrainError(f"{ckpt} is not a training checkpoint: {OPT_FILE} is missing") from None
        raise TrainError(f"corrupt training checkpoint {ckpt}: {e}") from None
    except (ValueError, OSError, EOFError, KeyError, TypeError, zipfile.BadZipFile, NotImplementedError) as e:
        raise TrainError(f"corrupt training checkpoint {ckpt}: {OPT_FILE}: {e}") from None


def _is_int(x, lo: int = 0, hi: int | None = None) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x and (hi is None or x <= hi)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _state_problem(state, ckpt: Path) -> str | None:
    """What is wrong with a trainer_state.json (None: nothing); every value a resume or the
    retention reads is checked for type and range."""
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        return f"{STATE_FILE} has no {', '.join(missing)}"
    config = state["config"]
    if not (isinstance(config, dict) and all(isinstance(k, str) for k in config)):
        return f"config is {_kind(config)}, not an object of settings"
    max_steps = config.get("max_steps", TrainConfig.max_steps)
    if not _is_int(max_steps, 1):
        return f"config.max_steps is {max_steps!r}, not a positive integer"
    step = state["step"]
    if not _is_int(step, 0, max_steps):
        return f"step is {step!r}, not an integer in [0, {max_steps}] (max_steps)"
    named = re.fullmatch(r"step-(\d+)", ckpt.name)
    if named and int(named.group(1)) != step:
        return f"step is {step}, but the checkpoint is named {ckpt.name}"
    for key in ("bad_steps", "skipped_steps"):
        if not _is_int(state[key], 0, step):
            return f"{key} is {state[key]!r}, not an integer in [0, {step}] (step)"
    for key in ("best_val_loss", "val_loss"):
        if state.get(key) is not None and not _is_number(state[key]):
            return f"{key} is {state[key]!r}, not a number or null"
    if state["amp"] not in PRECISIONS[1:]:
        return f"amp is {state['amp']!r}, not one of {', '.join(PRECISIONS[1:])}"
    if not isinstance(state["data_fingerprint"], str):
        return f"data_fingerprint is {_kind(state['data_fingerprint'])}, not a string"
    scaler = state["grad_scaler"]
    if not isinstance(scaler, dict):
        return f"grad_scaler is {_kind(scaler)}, not an object"
    if state["amp"] == "fp16" and not (all(_is_number(scaler.get(k)) and scaler[k] > 0 for k in
                                           ("scale", "growth_factor", "backoff_factor", "growth_interval"))
                                       and _is_int(scaler.get("_growth_tracker"))):
        return "grad_scaler is not an fp16 loss scaler's state (scale, growth and backoff factors, intervals)"
    return _rng_problem(state["rng"])


def _rng_problem(rng) -> str | None:
    """random.setstate and np.random.set_state take only their own states: checked here."""
    if not isinstance(rng, dict):
        return f"rng is {_kind(rng)}, not an object"
    py, npy = rng.get("python"), rng.get("numpy")
    if not (isinstance(py, list) and len(py) == 3 and py[0] == random.Random.VERSION and isinstance(py[1], list)
            and len(py[1]) == _MT_WORDS + 1 and all(_is_int(w, 0, 2**32 - 1) for w in py[1])
            and py[1][-1] <= _MT_WORDS and (py[2] is None or _is_number(py[2]))):
        return "rng.python is not a Python random state [version, 625 words, gauss]"
    if not (isinstance(npy, list) and len(npy) == 4 and npy[0] == "MT19937" and _is_int(npy[1], 0, _MT_WORDS)
            and _is_int(npy[2], 0, 1) and _is_number(npy[3])):
        return "rng.numpy is not a NumPy random state [\"MT19937\", position, has_gauss, gauss]"
    return None


def _arrays_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """The RNG arrays of optimizer.npz (the moments are checked against the model: optimizer_state)."""
    want = {"rng.torch": (np.uint8, (torch.get_rng_state().numel(),)), "rng.numpy": (np.uint32, (_MT_WORDS,))}
    if "rng.cuda" in arrays:
        size = torch.cuda.get_rng_state().numel() if torch.cuda.is_available() else arrays["rng.cuda"].size
        want["rng.cuda"] = (np.uint8, (size,))
    for key, (dtype, shape) in want.items():
        a = arrays.get(key)
        if a is None:
            return f"{OPT_FILE} has no {key}"
        if a.dtype != dtype or a.shape != shape:
            return f"{OPT_FILE}: {key} is {a.dtype} {list(a.shape)}, expected {np.dtype(dtype)} {list(shape)}"
    return None


def _kind(x) -> str:
    return "null" if x is None else f"of type {type(x).__name__} ({str(x)[:40]!r})"


def changed_settings(cfg: TrainConfig, state: dict, precision: str, data_id: str) -> list[str]:
    """The settings that define the loss curve and differ from a checkpoint's. The data is
    compared by content (data_fingerprint), the precision by the dtype the run computed in. A
    setting newer than the checkpoint (absent from it) had its default."""
    default = TrainConfig(data="").to_dict()
    changed = [k for k, v in cfg.to_dict().items() if k not in cfg.RESUME_FREE and k not in ("data", "precision")
               and state["config"].get(k, default[k]) != v]
    if state["amp"] != precision:
        changed.append("precision")
    if state["data_fingerprint"] != data_id:
        changed.append("data")
    return changed


def master_weights(ckpt: Path, tensors: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> dict:
    """The float32 weights to resume from: the model file's, or, when it was saved in a narrower
    save_dtype, the float32 copies kept beside the optimizer state."""
    masters = {k[len(MASTER):]: v for k, v in arrays.items() if k.startswith(MASTER)} or tensors
    for name, t in tensors.items():
        m = masters.get(name)
        if m is None or m.shape != t.shape or m.dtype != np.float32 or not np.isfinite(m).all():
            got = "missing" if m is None else f"{m.dtype} {list(m.shape)}"
            raise TrainError(f"corrupt training checkpoint {ckpt}: float32 weight {name} is {got}, "
                             f"expected float32 {list(t.shape)}, finite")
    return {name: masters[name] for name in tensors}


def optimizer_state(arrays: dict[str, np.ndarray], expect: dict[str, dict],
                    allow_fresh: bool = False) -> dict[str, dict]:
    """{parameter name: {key: tensor}} of a checkpoint's 'opt.<name>.<key>' arrays, checked against
    expect, {name: {key: (shape, torch dtype)}} of the trainable parameters (AdamW's moments, or a
    value table's RowAdam state): the fused AdamW kernel reads moments unchecked. A parameter
    without its state is refused (resuming would silently restart the optimizer), unless
    allow_fresh: then it starts with fresh moments, and a warning says so."""
    state: dict[str, dict] = {}
    for key, value in arrays.items():
        if key.startswith("opt."):
            name, _, k = key[4:].rpartition(".")
            shape, dtype = expect.get(name, {}).get(k, (None, None))
            want = None if dtype is None else np.dtype(str(dtype).removeprefix("torch."))
            if want is None or tuple(value.shape) != shape or value.dtype != want:
                raise TrainError(f"corrupt optimizer state {key}: {value.dtype} {list(value.shape)}, expected "
                                 + (f"{want} {list(shape)}" if want is not None else "no such parameter"))
            state.setdefault(name, {})[k] = torch.from_numpy(value.copy())
    for name, keys in state.items():
        if set(keys) != set(expect[name]):
            raise TrainError(f"corrupt optimizer state of {name}: has {sorted(keys)}, expected {sorted(expect[name])}")
    fresh = [name for name in expect if name not in state]
    if fresh:
        what = (f"{OPT_FILE} holds no optimizer moments for {len(fresh)} of the {len(expect)} trainable parameters "
                f"({', '.join(fresh[:3])}{', ...' if len(fresh) > 3 else ''})")
        if not allow_fresh:
            raise TrainError(f"{what}: resuming would restart the optimizer from fresh moments; pass "
                             "--allow-fresh-optimizer to resume so anyway")
        print(f"WARNING: {what}: resuming with FRESH AdamW moments for them (--allow-fresh-optimizer); the "
              "loss may jump and the run will not reproduce the uninterrupted one", file=sys.stderr)
    return state


def rng_state() -> tuple[dict, dict]:
    """(JSON part, array part) of the torch / numpy / python RNG states."""
    py = random.getstate()
    np_state = np.random.get_state()
    arrays = {"rng.torch": torch.get_rng_state().numpy(), "rng.numpy": np_state[1]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        arrays["rng.cuda"] = torch.cuda.get_rng_state().numpy()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], *np_state[2:]]}
    return meta, arrays


def set_rng_state(meta: dict, arrays: dict) -> None:
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], arrays["rng.numpy"], *n[1:]))
    torch.set_rng_state(torch.from_numpy(arrays["rng.torch"].copy()))
    if "rng.cuda" in arrays and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(arrays["rng.cuda"].copy()))


def check_tokenizer(model_dir: Path, mcfg: ModelConfig, spec: dict, tokenizer_file: Path, data: str) -> None:
    """A model may continue on data only if both use the same tokenizer (ids mean the same):
    spec and tokenizer_file are the data's (data.tokenizer_spec)."""
    tok = mcfg.tokenizer
    if tok is None:  # e.g. an imported official checkpoint: nothing to compare
        return
    if tok.get("type") != spec["type"]:
        raise TrainError(f"{model_dir}'s tokenizer is {tok.get('type')!r} and {data} was prepared with "
                         f"{spec['type']!r}: its token ids would mean other pieces. Prepare the data with "
                         f"`metastate prepare-data --tokenizer {model_dir / str(tok.get('file', ''))}`")
    file = model_dir / tok.get("file", "")
    if not (file.is_file() and tokenizer_file.is_file() and file.read_bytes() == tokenizer_file.read_bytes()):
        raise TrainError(f"{model_dir}'s tokenizer ({tok.get('file')}) is not the one {data} was "
                         f"prepared with: its token ids mean other pieces. Prepare the data with "
                         f"`metastate prepare-data --tokenizer {file}`")
