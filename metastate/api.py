"""The public Python API: load a model on any backend, generate text, carry the recurrent state.

    model, tokenizer = load("weights/default")                 # backend auto-selected
    print(generate(model, tokenizer, "ROMEO.\\n", max_tokens=64, temperature=0.8, top_p=0.9))
    for r in stream_generate(model, tokenizer, "ROMEO.\\n", max_tokens=64):
        print(r.text, end="", flush=True)

One small interface, `Engine`, sits over the three backends (NumPy reference, torch/Triton,
MLX/Metal): `prefill` (a prompt, in pieces of `PREFILL_STEP` tokens through the sequence path,
so memory stays flat in the prompt length), `step` (one token), `forward` (the logits of every
position of some tokens after a state: scoring, `metastate eval`) and `logits` (the same from
the zero state: `compute_logits`, what `metastate logits` writes). States are opaque,
backend-native and never modified in place, so a caller can keep any earlier one. Sampling,
stop strings, streaming UTF-8 and timing live here once, on NumPy logits, for every backend.
One decode loop, `DecodeBatch`, steps any number of `GenerationSequence`s together
(`step_batch` on stacked states): `stream_generate` runs it for one prompt, `batch_generate`
for several, `metastate serve` with requests joining and leaving between steps. With
backend or threads "auto", `load` takes the fastest here, measured once per machine and model
shape (`choose_by_measurement`) and cached.
The backends are imported only when one is loaded (`_LOADERS`): adding one is an Engine
subclass and a loader.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import numbers
import os
import platform
import stat
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from metastate_core import constants, reference
from metastate_core.config import ModelConfig
from metastate_core.constants import PREFILL_STEP, WEIGHT_DTYPES, check_kernels
from metastate_core.errors import MetaStateError, install_hint
from metastate_core.sampling import Sampler, SamplingParams
from metastate_core.tokenizers import StreamDecoder, Tokenizer

STATE_FORMAT = "metastate-state"
STATE_FORMAT_VERSION = 1
BACKENDS = tuple(constants.KERNELS)
KERNELS = ("auto", *dict.fromkeys(k for offered in constants.KERNELS.values() for k in offered))  # any backend's
DTYPES = ("float64", *WEIGHT_DTYPES)


class BackendError(MetaStateError):
    """An unknown, unavailable or misused backend."""

    exit_code = 1


class BackendUnavailable(BackendError):
    """The backend exists in the design but cannot run here (its extra is missing)."""

    exit_code = 2


class GenerationError(MetaStateError, ValueError):
    """A prompt or request that generation cannot serve."""


class StateFileError(MetaStateError):
    """A conversation state file that cannot be read, or belongs to another model."""


def default_model_path() -> Path:
    """weights/default/: the model shipped with the project."""
    import weights

    return Path(weights.__file__).resolve().parent / "default"


# ------------------------------------------------------------------------------------------
# Engines: prefill / step on each backend. Logits come back as NumPy float32 [V].
# ------------------------------------------------------------------------------------------

def state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state of one sequence, backend-independent: att_x [L, d], meta_x [L, d], wkv [L, H, N, N]."""
    L, d, H, N = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_size
    return {"att_x": (L, d), "meta_x": (L, d), "wkv": (L, H, N, N)}


class Engine:
    """A loaded model on one backend: `_forward`, and the backend's `State` class (the fields of
    `state_shapes`, batched [L, B, ...], float32, immutable) with `_tensor` / `_array` to move
    one float32 array into the backend and back.

    Attributes: cfg (ModelConfig), backend ("numpy" | "torch" | "mlx"), description (e.g.
    "torch (cpu, kernels=ops)"), path (model directory or None) and fingerprint (identifies
    config and weights, checked when a saved state is loaded).
    """

    backend = ""
    description = ""
    path: Path | None = None
    fingerprint = ""
    threadable = False  # whether set_threads means anything (torch on the CPU; numpy with threadpoolctl)
    threads: int | None = None
    State: type  # the backend's State class, set by each engine

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def zero_state(self):
        """The state before any token."""
        return self.state_from_arrays({k: np.zeros(shape, np.float32) for k, shape in state_shapes(self.cfg).items()})

    def prefill(self, ids: Sequence[int], state=None, step: int = PREFILL_STEP):
        """ids [T >= 1] -> (logits of the last token [V] float32, state after all of them)."""
        ids = self.check_ids(ids)
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
            raise GenerationError(f"the prefill step must be a positive number of tokens, got {step!r}")
        state = self.zero_state() if state is None else state
        for start in range(0, len(ids), step):
            logits, state = self._forward(ids[None, start:start + step], state)
        return logits[0], state

    def step(self, token: int, state):
        """One token -> (logits [V] float32, state after it)."""
        logits, state = self._forward(self.check_ids([token])[None], self.zero_state() if state is None else state)
        return logits[0], state

    def step_batch(self, tokens: Sequence[int], state):
        """One token for each sequence of a batched state (`stack_states`): tokens [B] ->
        (logits [B, V] float32, state after them)."""
        return self._forward(self.check_ids(tokens)[:, None], state)

    def stack_states(self, states: Sequence):
        """One batched state [L, B, ...] holding the sequences of `states`, in order."""
        return self.State(**{k: self._cat([getattr(s, k) for s in states]) for k in state_shapes(self.cfg)})

    def select_state(self, state, index: Sequence[int]):
        """The sequences at batch positions `index` of a batched state, in that order (a copy)."""
        return self.State(**{k: self._cat([getattr(state, k)[:, i:i + 1] for i in index])
                             for k in state_shapes(self.cfg)})

    def forward(self, ids: Sequence[int], state=None):
        """ids [T >= 1] from `state` (None: the zero state), in one pass through the sequence
        path -> (logits float32 [T, V] of every position, state after them). Row i predicts the
        token after ids[i]; memory grows with T (`prefill` keeps only the last row)."""
        logits, state = self._forward(self.check_ids(ids)[None], self.zero_state() if state is None else state,
                                      every=True)
        return logits[0], state

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] float32 at every position of ids [T], from the zero state, in one pass."""
        return self.forward(ids)[0]

    def check_ids(self, ids) -> np.ndarray:
        return check_tokens(ids, self.cfg.vocab_size)

    def set_threads(self, n: int | None) -> None:
        """Compute with n CPU threads (None: as they are), process-wide: torch's threads, or the
        BLAS's under numpy. Nothing where the backend has no such setting."""
        if n is not None and self.threadable:
            self._set_threads(n)
            self.threads = n
            self.description = f"{self.description.split(', threads ')[0].rstrip(')')}, threads {n})"

    def _set_threads(self, n: int) -> None:
        raise NotImplementedError

    def state_to_arrays(self, state) -> dict[str, np.ndarray]:
        """Backend-independent float32 copy: att_x [L, d], meta_x [L, d], wkv [L, H, N, N] of a
        state of this engine holding one sequence (GenerationError otherwise)."""
        if not isinstance(state, self.State):
            raise GenerationError(f"not a state of a {self.backend} model: {type(state).__module__}."
                                  f"{type(state).__name__}")
        arrays = {k: np.asarray(self._array(getattr(state, k)), np.float32) for k in state_shapes(self.cfg)}
        for name, shape in state_shapes(self.cfg).items():
            want = (shape[0], 1, *shape[1:])
            if arrays[name].shape != want:
                raise GenerationError(f"state tensor {name} is {list(arrays[name].shape)}, expected {list(want)} "
                                      "(one sequence of this model)")
        return {k: a[:, 0] for k, a in arrays.items()}

    def state_from_arrays(self, arrays: dict[str, np.ndarray]):
        """This engine's state of one sequence from the arrays of `state_to_arrays`."""
        return self.State(**{k: self._tensor(np.asarray(arrays[k], np.float32)[:, None])
                             for k in state_shapes(self.cfg)})

    # -- backend specific -----------------------------------------------------------------
    def _forward(self, ids: np.ndarray, state, every: bool = False):
        """ids [B, T] through the sequence path (T == 1 may use the recurrent one) -> (logits
        float32, state): of the last token [B, V], or of every token [B, T, V] with `every`."""
        raise NotImplementedError

    def _cat(self, arrays):
        """The backend's arrays joined along axis 1 (the batch axis of a state)."""
        return np.concatenate(arrays, 1)

    def _tensor(self, a: np.ndarray):
        """A float32 NumPy array as the backend's array (a copy)."""
        raise NotImplementedError

    def _array(self, t) -> np.ndarray:
        return np.asarray(t)


class NumpyEngine(Engine):
    """The NumPy reference (`metastate_core.reference`): chunked prefill, recurrent decode."""

    backend = "numpy"
    State = reference.State

    def __init__(self, cfg: ModelConfig, tensors: dict, dtype=np.float32):
        super().__init__(cfg)
        self.dtype = np.dtype(dtype)
        # the decode layout: a decoded row runs OpenBLAS's fast kernel (docs/benchmarks.md)
        self.weights = reference.decode_layout(tensors, self.dtype)
        self.description = f"numpy (cpu, {self.dtype.name})"
        self.threadable = importlib.util.find_spec("threadpoolctl") is not None

    def _set_threads(self, n):
        from threadpoolctl import threadpool_limits

        threadpool_limits(n, user_api="blas")

    def _forward(self, ids, state, every=False):
        form = "recurrent" if ids.shape[1] == 1 else "chunked"
        logits, state = reference.forward(self.weights, self.cfg, ids, state, dtype=self.dtype, wkv=form,
                                          last_only=not every)
        return (logits if every else logits[:, -1]).astype(np.float32), state

    def logits(self, ids):
        """The reference in its defining form: the recurrence, one token at a time."""
        logits, _ = reference.forward(self.weights, self.cfg, self.check_ids(ids)[None], dtype=self.dtype)
        return logits[0].astype(np.float32)

    def _tensor(self, a):
        return a.astype(self.dtype)


class TorchEngine(Engine):
    """backends.cuda: Triton kernels on a CUDA device, the plain-torch chunked ops elsewhere."""

    backend = "torch"

    def __init__(self, model, device, cuda_graphs: bool = False):
        from backends.cuda import State

        super().__init__(model.cfg)
        self.model, self.device, self.State = model.eval(), device, State
        self.description = f"torch ({device}, kernels={model.kernels}{', CUDA graphs' if cuda_graphs else ''})"
        self.threadable = device.type == "cpu"
        self.decode_graph = None
        if cuda_graphs:  # single-token steps replayed from one graph (captured at the first)
            from backends.cuda.decode_graph import DecodeGraph

            self.decode_graph = DecodeGraph(model, batch=1)

    def _forward(self, ids, state, every=False):
        import torch

        with torch.no_grad():
            tokens = torch.as_tensor(ids, device=self.device)
            if self.decode_graph is not None and ids.shape == (1, 1):
                logits, state = self.decode_graph(tokens, state)
            else:
                logits, state = self.model(tokens, state, last_only=not every)
            return (logits if every else logits[:, -1]).float().cpu().numpy(), state

    def _set_threads(self, n):
        import torch

        torch.set_num_threads(n)

    def _tensor(self, a):
        import torch

        return torch.tensor(a, device=self.device)

    def _array(self, t):
        return t.float().cpu().numpy()

    def _cat(self, arrays):
        import torch

        return torch.cat(arrays, 1)


class MLXEngine(Engine):
    """backends.mlx: Metal kernels on Apple silicon, plain MLX ops elsewhere."""

    backend = "mlx"

    def __init__(self, model):
        import mlx.core as mx

        from backends.mlx import State

        super().__init__(model.cfg)
        self.model, self.State = model, State
        self.description = f"mlx ({'gpu' if mx.metal.is_available() else 'cpu'}, kernels={model.kernels})"

    def _forward(self, ids, state, every=False):
        import mlx.core as mx

        logits, state = self.model(mx.array(ids.astype(np.int32)), state, last_only=not every)
        logits = logits if every else logits[:, -1]
        mx.eval(logits, vars(state))  # computed now: each prefill piece's graph is freed
        return np.array(logits.astype(mx.float32)), state

    def _tensor(self, a):
        import mlx.core as mx

        return mx.array(a)

    def _cat(self, arrays):
        import mlx.core as mx

        return mx.concatenate(arrays, 1)


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------

def load(path=None, backend: str = "auto", *, kernels: str = "auto", dtype: str | None = None,
         device: str | None = None, cuda_graphs: bool = False, threads: int | str = "auto",
         ) -> tuple[Engine, Tokenizer | None]:
    """(model, tokenizer) from a model directory; `path` None is the shipped weights/default/.

    backend: "auto", "numpy", "torch" or "mlx". "auto" is the fastest backend for this model
    on this machine, measured (`choose_by_measurement`) and cached; device or cuda_graphs imply
    torch. kernels: "auto" or the backend's own ("ops", "triton", "metal"). dtype: None keeps
    the stored weights (numpy: float32 compute), or "float32" / "bfloat16" / "float16". An
    MLX-quantized model loads as stored on mlx, dequantized to float32 on numpy and torch.
    threads: CPU threads (torch's; numpy's BLAS's where threadpoolctl is installed; mlx has
    no such setting): "auto" (measured with the backend) or a number. tokenizer is None for a
    model without one. cuda_graphs: (torch on CUDA) replay each decoded token from a CUDA graph.
    """
    from metastate_core.tokenizers import load_tokenizer
    from weights import load_config

    if path is None:
        path = default_model_path()
        if not path.is_dir():
            raise GenerationError(f"no model given and the default model {path} is missing; pass a model directory")
    path = Path(path)
    cfg = load_config(path)  # fails fast, with a clear message, on a missing or broken directory
    if threads != "auto" and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1):
        raise BackendError(f"threads must be 'auto' or a positive integer, got {threads!r}")
    if backend == "auto" and (device is not None or cuda_graphs):
        backend = "torch"
    if backend != "auto" and backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: expected auto or one of {', '.join(BACKENDS)}")
    if backend != "auto":
        check_kernels(backend, kernels)
    if cuda_graphs and backend != "torch":
        raise BackendError(f"CUDA graphs are a torch backend option, and the backend is {backend}")
    args = (path, kernels, dtype, device, cuda_graphs)
    if backend == "auto" or threads == "auto":
        engine = choose_by_measurement(cfg, args, [backend] if backend != "auto" else None, threads)
    else:
        engine = _LOADERS[backend](*args)
        engine.set_threads(threads)
    engine.path = path.resolve()
    engine.fingerprint = model_fingerprint(path, engine.cfg)
    return engine, load_tokenizer(path, cfg.tokenizer)


# ------------------------------------------------------------------------------------------
# Backend and threads chosen by measurement, cached per machine and model shape
# ------------------------------------------------------------------------------------------

def policy_cache_file() -> Path:
    """$XDG_CACHE_HOME/metastate/policy.json (XDG_CACHE_HOME defaults to ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metastate" / "policy.json"


def cpu_count() -> int:
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_options() -> list[int]:
    """Thread counts worth measuring: 1, 2, 4, ... up to the CPUs that other processes leave
    free (the 1-minute load average less this process). Threads that need a CPU another
    process holds wait for it at every operation: on a 2-core machine beside one busy process,
    2 threads decoded 5-7x slower than 1, though 1.35x faster while it was quiet."""
    busy = round(max(0.0, os.getloadavg()[0] - 1)) if hasattr(os, "getloadavg") else 0
    n = max(1, cpu_count() - busy)
    return sorted({n, *(2**i for i in range(n.bit_length()) if 2**i < n)})


def race(candidates: dict, timer=time.perf_counter, rounds: int = 3, margin: float = 1.5,
         bound: float = math.inf) -> dict:
    """Median time {name: seconds} of each candidate {name: (prepare, run)}. Each round runs
    every candidate still in the race: prepare(), run() untimed (warm-up, threads switched),
    run() timed. A warm-up over 3 x margin x the fastest median so far (or `bound`, another
    race's) ends a candidate at once (a clear loser costs one run); from the second round on,
    so does a median over margin x the fastest. The median, not the best time: threads that
    wait on a busy core are slow often, not always."""
    times: dict = {name: [] for name in candidates}
    alive = list(candidates)

    def fastest():
        return min([bound, *(statistics.median(t) for t in times.values() if t)])

    for r in range(rounds):
        for name in list(alive):
            prepare, run = candidates[name]
            prepare()
            t0 = timer()
            run()
            t1 = timer()
            if t1 - t0 > 3 * margin * fastest():
                times[name].append(t1 - t0)
                alive.remove(name)
                continue
            run()
            times[name].append(timer() - t1)
        if r:
            best = fastest()
            alive = [n for n in alive if statistics.median(times[n]) <= margin * best]
    return {name: statistics.median(t) for name, t in times.items()}


DECODED_IN_A_TURN = 4  # decoded tokens in the timed turn of `choose_by_measurement`


def engine_code_digest() -> str:
    """A digest of the code behind the engines (metastate_core, backends, this file): a changed
    engine is measured anew, also in an editable install whose version stays the same."""
    root = Path(__file__).resolve().parents[1]
    files = [Path(__file__).resolve(), *sorted((root / "metastate_core").glob("*.py")),
             *sorted((root / "backends").rglob("*.py"))]
    digest = hashlib.sha256()
    for f in files:
        try:
            digest.update(f.read_bytes())
        except OSError:  # unreadable: left out (the versions in the key still tell)
            pass
    return digest.hexdigest()[:16]


def _policy_key(cfg: ModelConfig, args, backends, threads) -> str:
    """The cache key of a choice: machine, installed versions, engine code, model shape, the
    request."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    shape = {k: v for k, v in cfg.to_dict().items() if k not in ("tokenizer", "growth") and k not in cfg.extra}
    return json.dumps([platform.node(), platform.machine(), platform.processor(), cpu_count(),
                       {p: installed(p) for p in ("metastate", "numpy", "torch", "mlx")}, engine_code_digest(), shape,
                       cfg.extra.get("quantization"), [str(a) for a in args[1:]], backends, threads], sort_keys=True)


def choose_by_measurement(cfg: ModelConfig, args, backends: list[str] | None = None, threads="auto",
                          timer=time.perf_counter, cache: Path | None = None) -> Engine:
    """The engine (backend and CPU threads) that runs this model fastest here.

    args: the loaders' (path, kernels, dtype, device, cuda_graphs); backends: those to consider
    (None: every installed one that offers `kernels`); threads: "auto" (every `thread_options`
    count) or one count. A cached choice for this machine, model shape and request is loaded
    at once. Otherwise each backend is loaded in turn and its thread counts `race`d on a
    short turn (a 16-token prompt, then 4 decoded tokens: the sequence path and the step, the
    step weighted up because chat decodes more tokens than it reads; a heuristic),
    holding at most two engines at once, and the choice is cached. A backend that cannot load
    this model is passed over; an unwritable or corrupt cache is ignored.
    """
    from weights.files import available_memory

    kernels = args[1]
    backends = backends or [b for b in ("torch", "numpy", "mlx") if kernels in ("auto", *constants.KERNELS[b])
                            and (b == "numpy" or installed(b))]
    if not backends:
        raise BackendError(f"no installed backend offers kernels {kernels!r}")
    counts = thread_options() if threads == "auto" else [threads]
    cache = cache or policy_cache_file()
    key = _policy_key(cfg, args, backends, threads)
    try:
        entries = json.loads(cache.read_text())
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}

    def too_big(backend) -> BackendError | None:
        """numpy's float copy (twice a bfloat16 model) where it would not fit beside what is held
        now: the OOM killer ends a process without a word, so it is left out unloaded (unless it
        is the only backend: then its loader's own check decides)."""
        if backend != "numpy" or len(backends) == 1:
            return None
        free, need = available_memory(), numpy_engine_bytes(cfg, args[2])
        if free is not None and need > free:
            return BackendError(f"the numpy backend would need {need / 2**30:.1f} GiB while loading, "
                                f"{free / 2**30:.1f} GiB is available")
        return None

    hit = entries.get(key)
    if (isinstance(hit, dict) and hit.get("backend") in backends and (hit.get("threads") in (None, *counts))
            and not too_big(hit["backend"])):  # a cached choice that no longer fits is measured again
        engine = _LOADERS[hit["backend"]](*args)
        engine.set_threads(hit["threads"])
        return engine
    best, winner, seconds, errors = math.inf, None, {}, []
    for backend in backends:
        if error := too_big(backend):
            errors.append(error)
            continue
        try:
            engine = _LOADERS[backend](*args)
        except MetaStateError as e:  # not installed, or not for this model (dtype, quantization)
            errors.append(e)
            continue
        options = counts if engine.threadable else [None]
        if len(backends) == len(options) == 1:
            engine.set_threads(options[0])
            return engine  # nothing to choose between

        def turn(engine=engine):
            state = engine.prefill(np.arange(16) % cfg.vocab_size)[1]
            for token in range(DECODED_IN_A_TURN):
                state = engine.step(token % cfg.vocab_size, state)[1]

        times = race({n: (partial(engine.set_threads, n), turn) for n in options}, timer, bound=best)
        seconds.update({f"{backend}:{n}" if n else backend: t for n, t in times.items()})
        n = min(times, key=times.__getitem__)
        if times[n] < best:
            best, winner = times[n], (engine, n)
        del engine, turn  # a loser's weights go now: two engines in memory at most
    if winner is None:
        raise _none_can_read(cfg, backends, errors[0])
    engine, n = winner
    engine.set_threads(n)
    entries = {**dict(list(entries.items())[-63:]), key: {"backend": engine.backend, "threads": n, "seconds": seconds}}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, cache)
    except OSError:
        pass
    return engine


def installed(module: str) -> bool:
    """Whether `module` (a backend's framework: torch, mlx) can be found, without importing it."""
    return importlib.util.find_spec(module) is not None


def _none_can_read(cfg: ModelConfig, backends: list[str], error: MetaStateError) -> MetaStateError:
    """The error when no backend tried could load the model: the first one's, and for an
    MLX-quantized model (which the others read only dequantized, in float32: more memory) the
    backend that reads it as stored, or what to install for it."""
    from weights.quantized import quantization

    try:
        q = quantization(cfg)
    except MetaStateError:  # a scheme no backend reads: the loaders' own message says why
        return error
    if q is None or "mlx" in backends:
        return error
    what = f"{q['bits']}-bit MLX-quantized model"
    if not installed("mlx"):
        return BackendUnavailable(f"{error}; the mlx backend reads this {what} as stored: {install_hint('mlx')}")
    return BackendError(f"{error}; the mlx backend reads this {what} as stored: choose it with --backend mlx")


def numpy_engine_bytes(cfg: ModelConfig, dtype: str | None) -> int:
    """The memory the NumPy engine needs at its peak, while loading: its float32 weights
    (float64 with that dtype) whatever they are stored in, and beside them the stored ones
    (at most 4 bytes a parameter) they are made from."""
    from weights.format import n_params

    return n_params(cfg) * ((8 if dtype == "float64" else 4) + 4)


def _load_numpy(path, kernels, dtype, device, cuda_graphs=False):
    from weights import load_config
    from weights.files import check_memory
    from weights.quantized import load_dequantized

    if dtype not in (None, "float32", "float64", "bfloat16"):
        raise BackendError(f"dtype {dtype!r} is not available on the numpy backend (use float64, float32 or bfloat16)")
    check_memory(numpy_engine_bytes(load_config(path), dtype), "the numpy backend's float weights")
    # bfloat16: the weights rounded to bfloat16, arithmetic in float32 (numpy has no bfloat16 math);
    # an MLX-quantized model is dequantized to float32
    cfg, tensors = load_dequantized(path, dtype="bfloat16" if dtype == "bfloat16" else None)
    return NumpyEngine(cfg, tensors, np.float64 if dtype == "float64" else np.float32)


def _load_torch(path, kernels, dtype, device, cuda_graphs=False):
    try:
        import torch

        from backends.cuda import load_model
    except ImportError as e:
        raise BackendUnavailable(f"the torch backend cannot be imported ({e}): {install_hint('torch')}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise BackendError(f"unknown torch device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device}: torch sees no CUDA GPU here (leave device out, or use cpu)")
    if cuda_graphs and not str(device).startswith("cuda"):
        raise BackendError(f"CUDA graphs need a CUDA device, and the torch backend is on {device}")
    try:  # the kernels are chosen and checked now, not at the first token
        model = load_model(path, device=device, dtype=dtype, kernels=kernels)
    except RuntimeError as e:  # a device this torch build lacks (mps, xpu, ...), or out of its memory
        raise BackendError(f"cannot put the model on {device}: {str(e).strip().splitlines()[0]}") from None
    return TorchEngine(model, device, cuda_graphs)


def _load_mlx(path, kernels, dtype, device, cuda_graphs=False):
    try:
        from backends.mlx import load as mlx_load
    except ImportError as e:
        raise BackendUnavailable(f"the mlx backend cannot be imported ({e}): {install_hint('mlx')}") from None
    model, _ = mlx_load(path, kernels=kernels, dtype=dtype)
    return MLXEngine(model)


_LOADERS = {"numpy": _load_numpy, "torch": _load_torch, "mlx": _load_mlx}


def check_tokens(tokens, vocab_size: int) -> np.ndarray:
    """Token ids as int64 [T]; raises on an empty list, non-integers (1.7 is not rounded, a list
    of prompts is not flattened) or an id outside [0, vocab_size)."""
    try:
        tokens = np.asarray(tokens)
    except ValueError:  # ragged nesting
        raise GenerationError("expected one list of token ids") from None
    if tokens.ndim != 1 or tokens.size == 0:
        raise GenerationError("expected a non-empty list of token ids" if tokens.ndim <= 1 else
                              f"expected one list of token ids, got a {tokens.ndim}-d array (one sequence at a time)")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise GenerationError(f"token ids must be integers, got {tokens.dtype} values")
    bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
    if bad.size:
        raise GenerationError(f"token id {int(bad[0])} is out of range for vocab_size {vocab_size}")
    return tokens.astype(np.int64)


def compute_logits(model_dir, tokens, backend: str = "numpy", kernels: str = "auto",
                   dtype: str | None = None) -> np.ndarray:
    """Logits float32 [T, V] of one sequence of token ids [T], in one pass from the zero state
    (`metastate logits`, the parity check between backends).

    dtype None: numpy computes in float64 (the reference), torch and mlx in float32 (an
    MLX-quantized model: mlx as stored, numpy and torch dequantized); "bfloat16" rounds the
    weights to bfloat16.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    check_kernels(backend, kernels)
    if dtype is not None and dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    from weights import load_config

    cfg = load_config(model_dir)
    tokens = check_tokens(tokens, cfg.vocab_size)  # before any heavy load
    if dtype is None:
        quantized = "quantization" in cfg.extra
        dtype = "float64" if backend == "numpy" else None if quantized else "float32"
    # The engine alone: token ids need no tokenizer (a broken tokenizer file must not matter).
    return _LOADERS[backend](Path(model_dir), kernels, dtype, None).logits(tokens)


def model_fingerprint(path, cfg: ModelConfig) -> str:
    """sha256 over the model's shape config and the checksums of its weight files; a file
    without one (another writer's, MLX-quantized weights) is hashed whole."""
    from weights import WeightsError
    from weights.files import open_regular
    from weights.safetensors_io import read_header

    shape = {k: v for k, v in cfg.to_dict().items() if k not in cfg.extra}
    h = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for f in files:
        try:
            checksum = read_header(f)[1].get("checksum")
        except WeightsError:  # e.g. MLX-quantized weights (uint32), which have no checksum
            checksum = None
        if not checksum:
            digest = hashlib.sha256()
            with open_regular(f, "weight file") as data:
                for block in iter(lambda: data.read(1 << 20), b""):
                    digest.update(block)
            checksum = f"sha256:{digest.hexdigest()}"
        h.update(f"{f.name}:{checksum}".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------

@dataclass
class Response:
    """One piece of a streamed generation (mlx-lm style).

    text: new text (never ends inside a UTF-8 character; may be ""). token: the id this piece
    adds, None on the last piece. finish_reason: None while going on, then "length", "stop"
    (a stop string was produced; the text stops before it) or "eos". state / logits: the
    model state after the prompt and every token so far, and the next token's logits [V].
    """

    text: str
    token: int | None
    finish_reason: str | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    state: object
    logits: np.ndarray


class _StopMatcher:
    """Holds back text that may be the start of a stop string; reports the first full match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:  # the longest tail of buf that begins some stop string
            for n in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if s.startswith(self.buf[-n:]):
                    keep = n
                    break
        out, self.buf = (self.buf[:-keep], self.buf[-keep:]) if keep else (self.buf, "")
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _sampler(sampler: Sampler | SamplingParams | None, params: dict) -> Sampler:
    if isinstance(sampler, Sampler):
        if params:
            raise GenerationError("pass either a sampler or sampling parameters, not both")
        return sampler
    if isinstance(sampler, SamplingParams):
        return Sampler(sampler)
    return Sampler(SamplingParams(**params))


def _prompt_ids(model: Engine, tokenizer: Tokenizer | None, prompt, state) -> np.ndarray:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise GenerationError("this model has no tokenizer: pass the prompt as token ids")
        if not prompt:
            raise GenerationError("the prompt is empty: give some text")
        # text after a state continues that text: no SentencePiece space in front of it
        prompt = tokenizer.encode(prompt) if state is None else encode_continuation(tokenizer, prompt)
    return model.check_ids(prompt)


class GenerationSequence:
    """One sequence after its prompt: sampling, stop ids and strings, streaming text, counters.

    `sample` draws the next token from `logits` (None: the sequence ends there, `reason` says
    why), `advance` takes in the model's output for it and returns its piece of text, `finish`
    the last piece. `DecodeBatch` drives these; a caller that prefilled a prompt itself (the
    server, from a cached state) builds one with the prompt's ids [T], the logits [V] and state
    after them, its own `Sampler`, stop strings, stop ids, max_tokens and the prefill's seconds.
    """

    def __init__(self, model: Engine, tokenizer, ids, logits, state, sampler: Sampler, stop: Sequence[str] = (),
                 stop_ids: Sequence[int] = (), max_tokens: int = 256, prompt_s: float = 0.0):
        ids = [int(i) for i in ids]
        self.decoder = StreamDecoder(tokenizer, context=ids) if tokenizer is not None else None
        self.matcher = _StopMatcher(stop)
        self.counts = np.zeros(model.cfg.vocab_size, np.int64)
        self.sampler, self.stop_ids, self.max_tokens = sampler, set(stop_ids), max_tokens
        self.logits, self.state, self.ids, self.texts, self.reason = logits, state, [], [], None
        self.n_prompt, self.prompt_tps, self.t1 = len(ids), len(ids) / max(prompt_s, 1e-9), time.perf_counter()

    def sample(self) -> int | None:
        if len(self.ids) >= self.max_tokens:
            self.reason = "length"
            return None
        token = self.sampler(self.logits, self.counts)
        if token in self.stop_ids:
            self.reason = "eos"
            return None
        self.counts[token] += 1
        return token

    def advance(self, token: int, logits, state) -> Response:
        """The piece of text `token` adds; a stop string it completes ends the sequence ("stop")."""
        self.logits, self.state = logits, state
        self.ids.append(token)
        text, hit = self.matcher.push(self.decoder.push(token)) if self.decoder else ("", False)
        if hit:
            self.reason = "stop"
        return self.piece(text, token)

    def finish(self) -> Response:
        """The last piece, with `reason`: the text held back (none after a stop string, which
        is not shown)."""
        text = ""
        if self.decoder and self.reason != "stop":
            text = self.matcher.push(self.decoder.flush())[0] + self.matcher.flush()
        return self.piece(text, None)

    def piece(self, text: str, token: int | None) -> Response:
        self.texts.append(text)
        n = len(self.ids)
        return Response(text, token, None if token is not None else self.reason, self.n_prompt, self.prompt_tps, n,
                        n / max(time.perf_counter() - self.t1, 1e-9), self.state, self.logits)


@dataclass
class Decoded:
    """What one `DecodeBatch.step` did for one sequence: the token drawn (None: the sequence
    ended before drawing one), the logits [V] it was drawn from, and its pieces of text."""

    seq: GenerationSequence
    token: int | None
    logits: np.ndarray | None
    pieces: list[Response]


class DecodeBatch:
    """The decode loop, one step at a time, for any number of sequences (`stream_generate`
    runs one, `batch_generate` several, the server lets them join and leave between steps).

    `add` prefilled sequences whenever; `step` samples every sequence and advances those that
    drew a token with one `step_batch` call on their stacked state [L, B, ...]; `remove` takes
    some out. A sequence that ends (length, end of text, stop string) leaves the batch at that
    step with its own state in `seq.state`; the others go on unchanged. A piece carries its
    sequence's state while the batch holds that sequence alone (the batched state is then its
    own), None otherwise: splitting it out at every token would copy the batch each step.
    """

    def __init__(self, model: Engine):
        self.model = model
        self.seqs: list[GenerationSequence] = []
        self.state = None  # the stacked state of self.seqs, in order

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, *seqs: GenerationSequence) -> None:
        """Prefilled sequences join the batch (their states stacked after the others')."""
        if not seqs:
            return
        states = ([] if self.state is None else [self.state]) + [s.state for s in seqs]
        self.state = states[0] if len(states) == 1 else self.model.stack_states(states)
        self.seqs += seqs

    def remove(self, seqs: Sequence[GenerationSequence]) -> None:
        """Take sequences out of the batch, each with its own state."""
        leaving = {id(s) for s in seqs} & {id(s) for s in self.seqs} if seqs else None
        if not leaving:
            return
        if len(self.seqs) == 1:  # its state is the batch's: nothing to split
            self.seqs[0].state, self.seqs, self.state = self.state, [], None
            return
        keep = [j for j, s in enumerate(self.seqs) if id(s) not in leaving]
        for j, s in enumerate(self.seqs):
            if id(s) in leaving:
                s.state = self.model.select_state(self.state, [j])
        self.state = self.model.select_state(self.state, keep) if keep else None
        self.seqs = [self.seqs[j] for j in keep]

    def step(self) -> list[Decoded]:
        """One token for every sequence: what each did, ended ones first."""
        drawn, ended = [], []
        for seq in self.seqs:
            before = seq.logits
            token = seq.sample()
            if token is None:
                ended.append(seq)
            else:
                drawn.append(Decoded(seq, token, before, []))
        self.remove(ended)
        out = [Decoded(seq, None, None, [seq.finish()]) for seq in ended]
        if drawn:
            logits, self.state = self.model.step_batch([d.token for d in drawn], self.state)
            alone = self.state if len(drawn) == 1 else None
            for j, d in enumerate(drawn):
                d.pieces.append(d.seq.advance(d.token, logits[j], alone))
            stopped = [d for d in drawn if d.seq.reason]  # a stop string: done now, not at the next step
            self.remove([d.seq for d in stopped])
            for d in stopped:
                d.pieces.append(d.seq.finish())
        return out + drawn


def _sequences(model: Engine, tokenizer, prompts, states, max_tokens, sampler, sampling, stop, stop_ids,
               prefill_step) -> list[GenerationSequence]:
    """Check the request, then prefill each prompt from its state: one `GenerationSequence` each."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 0:
        raise GenerationError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    params = _sampler(sampler, sampling).params
    if isinstance(stop, str):  # one stop string, not its characters
        stop = (stop,)
    all_ids = [_prompt_ids(model, tokenizer, p, s) for p, s in zip(prompts, states)]
    if stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer")
    if stop_ids is None:
        eos = getattr(tokenizer, "eos_id", None)
        stop_ids = () if eos is None else (eos,)
    stop_ids = {int(i) for i in stop_ids}
    seqs = []
    for ids, state in zip(all_ids, states):
        t0 = time.perf_counter()
        logits, state = model.prefill(ids, state, prefill_step)
        one = sampler if isinstance(sampler, Sampler) and len(prompts) == 1 else Sampler(params)
        seqs.append(GenerationSequence(model, tokenizer, ids, logits, state, one, stop, stop_ids,
                                       max_tokens, time.perf_counter() - t0))
    return seqs


def stream_generate(model: Engine, tokenizer: Tokenizer | None, prompt: str | Sequence[int],
                    max_tokens: int = 256, *, sampler: Sampler | SamplingParams | None = None,
                    stop: Sequence[str] = (), stop_ids: Sequence[int] | None = None, state=None,
                    prefill_step: int = PREFILL_STEP, **sampling) -> Iterator[Response]:
    """Yield the continuation of `prompt` piece by piece; the last piece has `finish_reason`.

    prompt: text, or token ids. sampler or keyword sampling parameters (temperature, top_p,
    top_k, min_p, presence_penalty, frequency_penalty, seed; see SamplingParams; default
    temperature 1). stop: strings that end generation (excluded from the text). stop_ids:
    token ids that end it (default: the tokenizer's end-of-text id). state: the model state
    to continue from (e.g. `Response.state` of an earlier call), None for a fresh start.
    Penalties count the generated tokens. The prompt is prefilled in pieces of prefill_step.
    """
    batch = DecodeBatch(model)  # a batch of one: its state is the sequence's, carried by every piece
    batch.add(*_sequences(model, tokenizer, [prompt], [state], max_tokens, sampler, sampling, stop, stop_ids,
                          prefill_step))
    while batch:
        for d in batch.step():
            yield from d.pieces


@dataclass
class Completion:
    """One sequence of `batch_generate`: its whole text (without a stop string), token ids, why
    it ended ("length", "stop" or "eos"), and the state and next-token logits [V] after it."""

    text: str
    ids: list[int]
    finish_reason: str
    state: object
    logits: np.ndarray


def batch_generate(model: Engine, tokenizer: Tokenizer | None, prompts: Sequence[str | Sequence[int]],
                   max_tokens: int = 256, *, sampler: Sampler | SamplingParams | None = None,
                   stop: Sequence[str] = (), stop_ids: Sequence[int] | None = None,
                   states: Sequence | None = None, prefill_step: int = PREFILL_STEP, **sampling) -> list[Completion]:
    """The continuations of several prompts, decoded together: one model call per token for
    the whole batch. Arguments as for `stream_generate`; states: one state (or None) per prompt.

    Each prompt is prefilled alone from its own state (no padding, so nothing crosses between
    sequences), then the states are stacked [L, B, ...] in a `DecodeBatch`. A sequence that
    ends leaves the batch; the others go on unchanged. Each sequence samples with its own
    `Sampler` of the same parameters (a given seed restarts for each), so sequence i is what
    `stream_generate` gives for prompt i alone, up to the rounding of batched arithmetic.
    """
    if isinstance(prompts, str):
        raise GenerationError("batch_generate takes a list of prompts (stream_generate takes one)")
    states = [None] * len(prompts) if states is None else list(states)
    if len(states) != len(prompts):
        raise GenerationError(f"{len(prompts)} prompts and {len(states)} states: give one state per prompt")
    seqs = _sequences(model, tokenizer, prompts, states, max_tokens, sampler, sampling, stop, stop_ids, prefill_step)
    batch = DecodeBatch(model)
    batch.add(*seqs)
    while batch:
        batch.step()
    return [Completion("".join(s.texts), s.ids, s.reason, s.state, s.logits) for s in seqs]


def generate(model: Engine, tokenizer: Tokenizer | None, prompt: str | Sequence[int],
             max_tokens: int = 256, *, verbose: bool = False, **kwargs) -> str:
    """The text `stream_generate` produces (token ids joined by spaces without a tokenizer).
    verbose prints it as it comes, then the speeds."""
    out, last = [], None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        piece = last.text if tokenizer is not None else ("" if last.token is None else f"{last.token} ")
        out.append(piece)
        if verbose:
            print(piece, end="", flush=True)
    if verbose and last is not None:
        print(f"\nprefill: {last.prompt_tps:.1f} tok/s, decode: {last.generation_tps:.1f} tok/s")
    return "".join(out).rstrip(" ") if tokenizer is None else "".join(out)


def encode_continuation(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of `text` as it continues a document: without the space SentencePiece puts in front
    of every text it encodes (its dummy prefix), which would add one at each chat turn."""
    ids = tokenizer.encode(text)
    sp = getattr(tokenizer, "sp", None)
    if sp is None or not ids or not sp.encode("a", out_type=str)[0].startswith("\u2581"):
        return ids
    first = sp.id_to_piece(ids[0])
    if not first.startswith("\u2581"):
        return ids
    rest = first[1:]
    if not rest:
        return ids[1:]
    if sp.piece_to_id(rest) != sp.unk_id():
        return [sp.piece_to_id(rest)] + ids[1:]
    out = []  # the piece without its space is not in the vocabulary: spell it out
    for ch in rest:
        i = sp.piece_to_id(ch)
        if i == sp.unk_id():
            byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode()]
            i = byte_ids if sp.unk_id() not in byte_ids else [sp.unk_id()]
        out += i if isinstance(i, list) else [i]
    return out + ids[1:]


def context_warning(cfg: ModelConfig, n_tokens: int) -> str | None:
    """A warning when `n_tokens` exceeds the longest context seen in training (config.json's
    "train_ctx_len", if recorded). RWKV has no hard limit, so this never stops generation."""
    limit = cfg.extra.get("train_ctx_len")
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < n_tokens:
        return (f"the context ({n_tokens} tokens) is longer than any seen in training ({limit}); "
                "the output may degrade")
    return None


# ------------------------------------------------------------------------------------------
# Saving and loading a state
# ------------------------------------------------------------------------------------------

def save_state(path, model: Engine, state, logits: np.ndarray | None = None, *,
               n_tokens: int = 0, meta: dict[str, str] | None = None) -> None:
    """Write a state (and the next token's logits) to a safetensors file, atomically.

    Tensors, float32 whatever the backend: att_x [L, d], meta_x [L, d], wkv [L, H, N, N] and,
    if given, logits [V]. Metadata: format "metastate-state", format_version, model (path),
    model_fingerprint, backend (informational), n_tokens (tokens the state has read), plus `meta`.
    """
    from weights import atomic_write
    from weights.safetensors_io import write_file

    path = Path(path)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in model.state_to_arrays(state).items()}
    if logits is not None:
        tensors["logits"] = np.ascontiguousarray(logits, np.float32)
        if tensors["logits"].shape != (model.cfg.vocab_size,):
            raise GenerationError(f"logits must be the next token's [{model.cfg.vocab_size}], got "
                                  f"{list(tensors['logits'].shape)}")
    info = {"format": STATE_FORMAT, "format_version": str(STATE_FORMAT_VERSION),
            "model": str(model.path or ""), "model_fingerprint": model.fingerprint,
            "backend": model.backend, "n_tokens": str(int(n_tokens)), **(meta or {})}
    try:  # readers see the old file or the new one, never half of it
        atomic_write(path, lambda tmp: write_file(tmp, tensors, info))
    except OSError as e:
        raise StateFileError(f"cannot write {path}: {e.strerror or e}") from None


def load_state(path, model: Engine) -> tuple[object, np.ndarray | None, dict[str, str]]:
    """(state, logits or None, metadata) from a file of `save_state`; it must belong to `model`."""
    from weights.files import kind_of
    from weights.safetensors_io import read_file

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise StateFileError(f"state file {path} does not exist" if isinstance(e, FileNotFoundError) else
                             f"cannot read state file {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise StateFileError(f"{path} is {kind_of(mode)}, not a state file")
    cfg = model.cfg
    shapes = state_shapes(cfg)

    def check(entries, meta):  # the metadata and the shapes, before any data is read
        if meta.get("format") != STATE_FORMAT:
            raise StateFileError(f"{path} is not a metastate state file")
        if meta.get("format_version") != str(STATE_FORMAT_VERSION):
            raise StateFileError(f"{path} has state format version {meta.get('format_version')!r}, "
                                 f"this version reads {STATE_FORMAT_VERSION}")
        if model.fingerprint and meta.get("model_fingerprint") != model.fingerprint:
            raise StateFileError(f"{path} was saved with another model ({meta.get('model') or 'unknown'}); "
                                 "load it with that model")
        allowed = shapes | {"logits": (cfg.vocab_size,)}
        for name in [*shapes, *entries]:
            got = tuple(entries[name]["shape"]) if name in entries else "missing"
            if got != allowed.get(name):
                raise StateFileError(f"{path}: state tensor {name!r} is {got}, this model needs "
                                     f"{allowed.get(name, 'no such tensor')}")

    try:
        tensors, meta = read_file(path, check)
    except StateFileError:
        raise
    except MetaStateError as e:
        raise StateFileError(f"cannot load state: {e}") from None
    bad = next((name for name, t in tensors.items() if not np.isfinite(t).all()), None)
    if bad:  # the next message would end the chat
        raise StateFileError(f"{path}: state tensor {bad!r} holds NaN or infinity")
    logits = tensors.get("logits")
    state = model.state_from_arrays({k: tensors[k] for k in shapes})
    return state, None if logits is None else np.array(logits, np.float32), meta
