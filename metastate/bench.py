"""`metastate bench`: prefill / decode speed of any backend, and training speed of torch.

    metastate bench --model DIR --backend torch --prompt-len 512 --decode 64 --decode-batch 4 16
    metastate bench --size 768,12,65536 --backend torch --train --batch 8 --seq-len 1024

Every figure is a median over repeats, taken after a warm-up. Speed claims in docs/ come
from this command or bench/kernels.py, never from tests.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from metastate_core.constants import WEIGHT_DTYPES
from metastate_core.errors import ExtraUnavailable, MetaStateError, install_hint

from .api import KERNELS, default_model_path
from .chat import backend_args


class BenchError(MetaStateError):
    """Bad benchmark arguments."""


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="measure prefill/decode (any backend) or training (torch) speed")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory (default: the shipped model)")
    src.add_argument("--size", metavar="D,L,V", help="a freshly initialised model of d_model D, L layers, "
                     "vocab V (head size 64) instead of a directory")
    backend_args(p)
    p.add_argument("--kernels", default="auto", choices=KERNELS)
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, help="default: as stored")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length (generation mode)")
    p.add_argument("--decode", type=int, default=32, help="decode steps (generation mode)")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[], metavar="B",
                   help="generation: also decode B sequences together (tok/s of all of them)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="generation, torch on an NVIDIA GPU: decode from a CUDA graph")
    p.add_argument("--train", action="store_true", help="measure forward+backward+AdamW (torch)")
    p.add_argument("--batch", type=int, default=4, help="training batch")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length")
    p.add_argument("--grad-checkpoint", action="store_true", help="training: recompute blocks in backward")
    p.add_argument("--no-fused-elementwise", dest="fused_elementwise", action="store_false",
                   help="training with --kernels triton: plain torch ops for the elementwise pieces "
                        "(the 'before' of the fused kernels)")
    p.add_argument("--plain-loss", action="store_true",
                   help="training: cross-entropy from the whole [B, T, V] logits (the 'before' of the "
                        "chunked loss the trainer uses)")
    p.add_argument("--autocast", action="store_true",
                   help="training: forward and loss under bfloat16 autocast (with --dtype float32 this is "
                        "what `metastate train` runs on a GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)


def median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up: compilation, allocator
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_memory_mib(backend: str) -> float | None:
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    if platform.system() == "Linux":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS
    return None


def bench_generation(path, backend, kernels, dtype, prompt_len, decode, repeats, cuda_graphs=False,
                     threads="auto", batches=()) -> dict:
    """Prefill and decode tok/s; first_token_ms: from a 16-token prompt to the first token's
    text (`stream_generate`: prefill, sampling, one step); decode_tok_s_bB: B sequences at once."""
    from metastate.api import load, stream_generate

    t0 = time.perf_counter()
    engine, _ = load(path, backend, kernels=kernels, dtype=dtype, cuda_graphs=cuda_graphs, threads=threads)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    V = engine.cfg.vocab_size
    prompt = rng.integers(0, V, prompt_len)
    prefill_s = median_time(lambda: engine.prefill(prompt), repeats)
    first_s = median_time(lambda: next(stream_generate(engine, None, prompt[:16], 1, temperature=0)), repeats)
    _, state = engine.prefill(prompt)
    result = {"mode": "generation", "engine": engine.description, "load_s": load_s, "prompt_len": prompt_len,
              "prefill_tok_s": prompt_len / prefill_s, "first_token_ms": 1e3 * first_s}
    for B in (1, *batches):
        states = engine.stack_states([state] * B)

        def decode_loop():
            st = state if B == 1 else states
            for tok in rng.integers(0, V, (decode, B)):
                st = engine.step(int(tok[0]), st)[1] if B == 1 else engine.step_batch(tok, st)[1]

        result["decode_tok_s" if B == 1 else f"decode_tok_s_b{B}"] = B * decode / median_time(decode_loop, repeats)
    return {**result, "peak_memory_mib": _peak_memory_mib(engine.backend)}


def bench_training(path, kernels, dtype, batch, seq_len, repeats, grad_checkpoint=False, fused=None,
                   plain_loss=False, autocast=False, threads="auto") -> dict:
    """fused: the model's elementwise pieces as fused kernels (None: the model's default).
    plain_loss: the loss from the whole [B, T, V] logits instead of the model's chunked loss.
    autocast: run forward and loss under bfloat16 autocast (`metastate train` on a GPU does, with
    float32 weights). threads: torch's CPU threads ("auto": torch's default)."""
    try:
        import torch

        from backends.cuda import load_model
    except ImportError as e:
        raise ExtraUnavailable(f"training benchmarks need the torch backend ({e}): {install_hint('torch')}") from None
    if threads != "auto":
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # this measurement's peak, not an earlier one's in the same process
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_model(path, device=device, dtype=dtype)
    kernels = model.set_kernels(kernels, fused=fused)
    from metastate.train.loop import optimizers  # as the trainer: fused AdamW, RowAdam for product value tables

    opts = optimizers(model, 1e-4, (0.9, 0.99), 1e-8, 0.0)
    V = model.cfg.vocab_size
    tokens = torch.randint(0, V, (batch, seq_len + 1), device=device)

    amp = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)  # noqa: E731

    def training_loss():
        if plain_loss:
            logits, _ = model(tokens[:, :-1], grad_checkpoint=grad_checkpoint)
            return torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        loss, _ = model(tokens[:, :-1], targets=tokens[:, 1:], grad_checkpoint=grad_checkpoint)  # as the trainer
        return loss

    def train_step():
        with amp():
            loss = training_loss()
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def forward_only():
        with torch.no_grad(), amp():
            model(tokens[:, :-1])

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = batch * seq_len
    return {"mode": "training", "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "kernels": kernels, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "batch": batch, "seq_len": seq_len, "grad_checkpoint": grad_checkpoint, "fused": fused,
            "loss": "plain" if plain_loss else "chunked", "autocast": autocast,
            "forward_tok_s": n / median_time(forward_only, repeats, sync),
            "train_tok_s": n / median_time(train_step, repeats, sync),
            "peak_memory_mib": _peak_memory_mib("torch")}


def size_config(size: str):
    """The ModelConfig of a model of size "D,L,V" (head size 64)."""
    from metastate_core.config import ModelConfig

    try:
        d, L, V = (int(x) for x in size.split(","))
    except ValueError:
        raise BenchError(f"--size expects D,L,V (e.g. 768,12,65536), got {size!r}") from None
    return ModelConfig(vocab_size=V, d_model=d, n_layer=L, head_size=64)


def sized_model(size: str, tmp: Path) -> Path:
    """A freshly initialised model directory under tmp of size "D,L,V" (head size 64)."""
    from metastate_core.params import init_params
    from weights import save_model

    cfg = size_config(size)
    save_model(tmp / "model", cfg, init_params(cfg, 0))
    return tmp / "model"


def cmd_bench(args) -> int:
    for name in ("prompt_len", "decode", "batch", "seq_len", "repeats"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    if any(b < 1 for b in args.decode_batch):
        raise BenchError("--decode-batch sizes must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        path = sized_model(args.size, Path(tmp)) if args.size else args.model or default_model_path()
        if args.train:
            if args.backend not in ("auto", "torch"):
                raise BenchError("--train measures the torch backend only")
            result = bench_training(path, args.kernels, args.dtype, args.batch, args.seq_len, args.repeats,
                                    args.grad_checkpoint, fused=None if args.fused_elementwise else False,
                                    plain_loss=args.plain_loss, autocast=args.autocast, threads=args.threads)
        else:
            result = bench_generation(path, args.backend, args.kernels, args.dtype, args.prompt_len,
                                      args.decode, args.repeats, args.cuda_graphs, args.threads, args.decode_batch)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value:,.1f}" if isinstance(value, float) else f"{key:>16}: {value}")
    return 0


