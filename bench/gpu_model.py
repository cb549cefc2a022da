"""The whole model on a GPU, as scripts/gpu_check.sh measures it (issue 19, item 6).

    python bench/gpu_model.py [--size 768,12,65536] [--json OUT]      # decode, then training
    python bench/gpu_model.py --summary DIR                           # the docs block from DIR

Decode: tokens per second of single-token steps carrying the state (after a 64-token prefill),
at each --decode-batch, bfloat16 and float32 weights, eager (the Triton path, a few hundred
kernel launches per token) and replayed from a CUDA graph (`backends.cuda.decode_graph`), with
the copies in and out a caller pays; then the engine a chat runs (`metastate.api`, batch 1:
logits back on the CPU every token), with and without graphs.

Training: the trainer's own set-up (`metastate train` on a GPU: float32 weights under bfloat16
autocast, the Triton kernels with the chunked WKV, fused AdamW, the chunked loss) at --batch x
--seq-len tokens per step, with all five fused elementwise pieces (the default), with all of
them as plain torch, with each one alone as plain torch, and with the loss from the whole
logits: tokens per second of full steps and of the forward alone, median of --repeats.

--summary prints one markdown block (device, versions, commands, every table of DIR's JSON
files: this script's, bench/kernels.py's, the product-key row and the profile) to paste into
docs/benchmarks.md. `--device cpu` (TRITON_INTERPRET=1, tiny --size) is a dry run: every part
runs (with --kernels triton, the Triton kernels in their interpreter), CUDA-graph rows report
their error, times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.cuda import load_model  # noqa: E402
from backends.cuda.ops.elementwise import naive  # noqa: E402
from metastate.bench import median_time, size_config, sized_model  # noqa: E402

PIECES = ("token_shift_mix", "k_prep", "group_norm_bonus_gate", "sse_norm_gate", "relu_square")
DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up call, the GPU synchronised."""
    return median_time(fn, repeats, sync)


def row_or_error(rows: list, row: dict, fn) -> None:
    """Append row with fn()'s figures, or with the error: one failing case costs only its row."""
    try:
        row.update(fn())
    except Exception as e:  # noqa: BLE001 - reported in the table
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        traceback.print_exc(limit=-2)
    rows.append(row)
    print(json.dumps(row), flush=True)


# -- decode --------------------------------------------------------------------------------------

def bench_decode(path: Path, batches, tokens: int, repeats: int, kernels: str = "auto") -> list[dict]:
    from backends.cuda.decode_graph import DecodeGraph

    rows = []
    for dtype in ("bfloat16", "float32"):
        model = load_model(path, device=DEV, dtype=dtype, kernels=kernels)
        V = model.cfg.vocab_size
        for B in batches:
            g = torch.Generator(device=DEV).manual_seed(0)
            with torch.no_grad():
                _, state = model(torch.randint(0, V, (B, 64), device=DEV, generator=g))
            steps = torch.randint(0, V, (tokens, B, 1), device=DEV, generator=g)
            for graphs in (False, True):
                def run(graphs=graphs, B=B, state=state, steps=steps):
                    step = DecodeGraph(model, batch=B) if graphs else model
                    with torch.no_grad():
                        step(steps[0], state)  # a graph captures here, outside the timing

                        def loop():
                            st = state
                            for tok in steps:
                                _, st = step(tok, st)
                        t = timed(loop, repeats)
                    return {"ms_per_step": 1e3 * t / tokens, "tok_s": B * tokens / t}
                row_or_error(rows, {"part": "decode", "dtype": dtype, "batch": B, "cuda_graphs": graphs,
                                    "kernels": model.kernels}, run)
        del model
        empty_cache()
    from metastate.api import load  # what `metastate chat` runs: logits to the CPU every token

    for graphs in (False, True):
        def engine_run(graphs=graphs):
            engine, _ = load(path, "torch", kernels=kernels, dtype="bfloat16", device=DEV, cuda_graphs=graphs, threads=1)
            _, state = engine.prefill(list(range(64)))
            engine.step(1, state)

            def loop():
                st = state
                for t in range(tokens):
                    _, st = engine.step(t % engine.cfg.vocab_size, st)
            t = timed(loop, repeats)
            return {"ms_per_step": 1e3 * t / tokens, "tok_s": tokens / t}
        row_or_error(rows, {"part": "engine", "dtype": "bfloat16", "batch": 1, "cuda_graphs": graphs}, engine_run)
    return rows


# -- training ------------------------------------------------------------------------------------

def elementwise(plain: tuple[str, ...]):
    """The fused elementwise pieces, with those named in `plain` as their plain-torch twins."""
    from backends.cuda.ops.elementwise import fused

    return SimpleNamespace(**{name: getattr(naive if name in plain else fused, name) for name in PIECES})


def bench_training(path: Path, batch: int, seq_len: int, repeats: int, kernels: str = "auto") -> list[dict]:
    # the trainer's set-up (metastate/train/loop.py): float32 weights, kernels chosen once
    # ("triton" on a GPU: chunked WKV, fused pieces), fused AdamW, bf16 autocast, chunked loss
    model = load_model(path, device=DEV, dtype="float32", kernels=kernels, layout="canonical")
    base = model.blocks[0].att.kern
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=DEV == "cuda")
    V = model.cfg.vocab_size
    tokens = torch.randint(0, V, (batch, seq_len + 1), device=DEV,
                           generator=torch.Generator(device=DEV).manual_seed(0))
    amp = lambda: torch.autocast(DEV, dtype=torch.bfloat16)  # noqa: E731
    cases = [("the trainer: every piece fused", (), False), ("every piece plain torch", PIECES, False),
             *((f"{p} plain", (p,), False) for p in PIECES), ("loss from the whole logits", (), True)]
    rows = []
    for name, plain, whole_logits in cases:
        def run(plain=plain, whole_logits=whole_logits):
            model.set_kernels(replace(base, ew=elementwise(plain)) if base.name == "triton" else base)

            def step():
                with amp():
                    if whole_logits:
                        logits, _ = model(tokens[:, :-1])
                        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
                    else:
                        loss, _ = model(tokens[:, :-1], targets=tokens[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def forward():
                with torch.no_grad(), amp():
                    model(tokens[:, :-1], last_only=True)

            if DEV == "cuda":
                torch.cuda.reset_peak_memory_stats()
            n = batch * seq_len
            out = {"train_tok_s": n / timed(step, repeats), "forward_tok_s": n / timed(forward, repeats)}
            if DEV == "cuda":
                out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            return out
        row_or_error(rows, {"part": "train", "case": name, "kernels": base.name, "batch": batch,
                            "seq_len": seq_len}, run)
        empty_cache()
    return rows


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


# -- the summary block ---------------------------------------------------------------------------

def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(x, digits=0):
    return "-" if x is None or x != x else f"{x:,.{digits}f}"  # None, NaN: not measured


def summary(out: Path) -> str:
    """The markdown block for docs/benchmarks.md from the files gpu_check.sh leaves in `out`."""
    model, kernels, product, profile = (_load(out / f) for f in ("model.json", "kernels.json", "product.json",
                                                                "profile.json"))
    meta = (model or {}).get("meta", {})
    lines = [f"### {meta.get('device', 'GPU')}: `scripts/gpu_check.sh`, {meta.get('date', '')}\n",
             f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}. Model: a fresh init of d_model, "
             f"layers, vocab = {meta.get('size', '?')}, head size 64. Commands: `bench/gpu_model.py` (decode, "
             "training), `bench/kernels.py --heads 12 32 --sweep 16/32/tf32/4` and `--product "
             "8,4096,768,1024,4,32`, `bench/profile_model.py --steps 2`.\n"]
    tests = out / "tests.log"
    if tests.is_file():
        tail = [ln.strip("= ") for ln in tests.read_text(errors="replace").splitlines()
                if any(w in ln for w in (" passed", " failed", " error"))]
        lines.append("CUDA tests: " + ("; ".join(tail) if tail else "no pytest summary line (cut off?)") + "\n")
    rows = (model or {}).get("rows", [])
    goals = []
    best = [r for r in rows if r.get("part") == "decode" and r.get("batch") == 1 and "tok_s" in r]
    if best:
        r = max(best, key=lambda r: r["tok_s"])
        goals.append(f"decode at batch 1: {r['tok_s']:,.0f} tok/s ({r['dtype']}, "
                     f"{'CUDA graph' if r['cuda_graphs'] else 'eager'}; goal >= 1,000)")
    trainer = [r for r in rows if r.get("part") == "train" and r.get("case", "").startswith("the trainer") and "train_tok_s" in r]
    if trainer:
        goals.append(f"training: {trainer[0]['train_tok_s']:,.0f} tok/s (goal >= 97,714, twice 48,857)")
    if goals:
        lines.append("Issue 19 goals: " + "; ".join(goals) + ".\n")
    dec = [r for r in rows if r.get("part") in ("decode", "engine")]
    if dec:
        lines.append("| decode, one token per step | weights | batch | CUDA graph | ms / step | tok/s |\n|---|---|---|---|---|---|")
        for r in dec:
            what = "model call" if r["part"] == "decode" else "chat engine (`metastate.api`: logits to the CPU)"
            figures = (f"{_fmt(r.get('ms_per_step'), 3)} | {_fmt(r.get('tok_s'))}" if "error" not in r
                       else f"failed: {r['error'][:80]} |")
            lines.append(f"| {what} | {r['dtype']} | {r['batch']} | {'yes' if r['cuda_graphs'] else 'no'} | {figures} |")
        lines.append("")
    train = [r for r in rows if r.get("part") == "train"]
    if train:
        first = train[0]
        lines.append(f"Training, B={first['batch']} T={first['seq_len']}, float32 weights under bf16 autocast, kernels "
                     f"{first['kernels']}, fused AdamW, chunked loss (the trainer's set-up), median of full steps:\n")
        lines.append("| case | fwd+bwd+AdamW tok/s | forward tok/s | peak MiB |\n|---|---|---|---|")
        for r in train:
            figures = (f"{_fmt(r.get('train_tok_s'))} | {_fmt(r.get('forward_tok_s'))} | {_fmt(r.get('peak_mib'))}"
                       if "error" not in r else f"failed: {r['error'][:80]} | |")
            lines.append(f"| {r['case']} | {figures} |")
        lines.append("")
    if kernels:
        lines.append("WKV + SSE readout vs fla (bf16 inputs, B 8, T 4096, N 64); y agreement with chunk_rwkv7 "
                     f"(rel_rms, fp32): {kernels.get('agreement_rel_rms')}\n")
        lines.append("| H | kernel | fwd+bwd (ms) | forward (ms) | fwd+bwd / fla |\n|---|---|---|---|---|")
        for sweep in kernels.get("sweep", []):
            fla = next((tr for name, tr, _ in sweep["rows"] if name.startswith("fla")), None)
            for name, tr, pf in sweep["rows"]:
                ratio = f"{tr / fla:.2f}" if fla and tr and not name.startswith("fla") else "-"
                lines.append(f"| {sweep['H']} | {name} | {_fmt(tr, 3)} | {_fmt(pf, 3)} | {ratio} |")
        lines.append("")
        dec = [(k, v) for k, v in kernels.items() if k.startswith("decode B=")]
        if dec:
            lines.append("| decode step, H 12 | ours (ms) | ours + SSE read (ms) | fla (ms) |\n|---|---|---|---|")
            for key, r in dec:
                lines.append(f"| {key[len('decode '):]} | {_fmt(r.get('step ours'), 4)} | {_fmt(r.get('step+read ours'), 4)} "
                             f"| {_fmt(r.get('step fla'), 4)} |")
            lines.append("")
    if product:
        lines.append("| token-parameter layer, B 8, T 4096, d 768 | forward (ms) | fwd+bwd (ms) | peak MiB |"
                     "\n|---|---|---|---|")
        for r in product.get("product", []):
            figures = (f"{_fmt(r.get('forward_ms'), 3)} | {_fmt(r.get('train_ms'), 3)} | {_fmt(r.get('peak_mib'))}"
                       if "error" not in r else f"failed: {r['error'][:80]} | |")
            lines.append(f"| {r['case']} | {figures} |")
        lines.append("")
    if profile:
        lines.append(f"Where a training step's time goes (`bench/profile_model.py`: {profile.get('dtype')} weights, "
                     f"B {profile.get('batch')}, T {profile.get('seq_len')}, kernels {profile.get('kernels')}): "
                     f"{_fmt(profile.get('ms_per_step'), 1)} ms of kernel time per step\n")
        lines.append("| group | ms / step |\n|---|---|")
        for g, t in sorted(profile.get("groups_ms", {}).items(), key=lambda kv: -kv[1]):
            lines.append(f"| {g} | {t:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="768,12,65536", help="D,L,V of a freshly initialised model (head size 64)")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--decode-tokens", type=int, default=64, help="steps per timed decode run")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--seq-len", type=int, default=1024, help="training sequence length")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "ops"),
                   help="the model's kernels (auto: triton on a GPU; a dry run passes triton)")
    p.add_argument("--skip", nargs="*", default=[], choices=("decode", "train"))
    p.add_argument("--json", help="write the rows here (after each part)")
    p.add_argument("--summary", metavar="DIR", help="print the docs block from DIR's JSON files, and nothing else")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run (TRITON_INTERPRET=1, tiny --size); times mean nothing")
    args = p.parse_args()
    if args.summary:
        print(summary(Path(args.summary)))
        return
    global DEV
    DEV = args.device
    if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the Triton kernels in their interpreter: set TRITON_INTERPRET=1")
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (--device cpu for a dry run)")
    size_config(args.size)  # checked before anything runs
    if min(args.decode_batch + [args.decode_tokens, args.batch, args.seq_len, args.repeats]) < 1:
        p.error("batches, tokens, lengths and repeats must be at least 1")
    import triton

    meta = {"device": torch.cuda.get_device_name() if DEV == "cuda" else f"CPU dry run ({platform.processor()})",
            "torch": torch.__version__, "triton": triton.__version__, "size": args.size,
            "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(meta), flush=True)
    result = {"meta": meta, "rows": []}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        path = sized_model(args.size, Path(tmp))
        if "decode" not in args.skip:
            result["rows"] += bench_decode(path, args.decode_batch, args.decode_tokens, args.repeats, args.kernels)
            save()
        if "train" not in args.skip:
            result["rows"] += bench_training(path, args.batch, args.seq_len, args.repeats, args.kernels)
            save()
    save()


if __name__ == "__main__":
    main()
