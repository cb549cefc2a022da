"""Our generation speed against the official RWKV-7 runtime (the `rwkv` package) on the same
weights, in the same run, interleaved.

    python bench/vs_official.py --size 768,12,65536         # RWKV-7 0.1B's shape, fresh init
    python bench/vs_official.py --model weights/default --zero-sse-gates

The model is exported to an official .pth (`weights.export_official_pth`: exact RWKV-7 only,
every sse_gate zero; --zero-sse-gates times a copy with them zeroed, which has the same cost:
our model still reads the state for the SSE). Each engine lives in its own worker process
(`rwkv` with RWKV_V7_ON=1 and RWKV_JIT_ON=1 set before its import, CPU fp32 and bf16; ours
through `metastate.api.load`, backend and threads as given, default auto). Every round runs
each worker once: one prefill of the prompt from the zero state, then --decode single-token
steps after it (the same random tokens for all), one worker at a time. A worker's figure is
its best round. Ratios are ours / official for the same weight precision, each of ours against each official engine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OFFICIAL = {"float32": "cpu fp32", "bfloat16": "cpu bf16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory (default: the shipped model)")
    src.add_argument("--size", metavar="D,L,V", help="a freshly initialised model (head size 64), as metastate bench")
    p.add_argument("--zero-sse-gates", action="store_true", help="time a copy of --model with every sse_gate zero")
    p.add_argument("--ours", nargs="+", default=["auto:float32", "auto:bfloat16"], metavar="BACKEND:DTYPE[:THREADS]",
                   help="our engines (default auto:float32 auto:bfloat16)")
    p.add_argument("--official", nargs="*", default=["float32", "bfloat16"], metavar="DTYPE[:THREADS]",
                   help="the rwkv package's precisions, float32 and/or bfloat16 (default both), each with "
                        "torch's thread count (default: torch's)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "MODEL"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- workers ---------------------------------------------------------------------------------
def worker(engine: str, model: str, prompt_len: int, decode: int) -> None:
    """Load one engine, then answer each 'run' line on stdin with one JSON line of times."""
    kind, dtype, *threads = engine.split(":")
    with contextlib.redirect_stdout(sys.stderr):  # the rwkv package prints as it loads
        if kind == "rwkv":
            import torch
            from rwkv.model import RWKV

            if threads:
                torch.set_num_threads(int(threads[0]))

            rwkv = RWKV(model=str(Path(model).with_suffix("")), strategy=OFFICIAL[dtype])
            vocab = rwkv.args.vocab_size
            name = f"rwkv {rwkv.__class__.__name__} {OFFICIAL[dtype]}, threads {torch.get_num_threads()}"

            def prefill(ids):
                return rwkv.forward(ids, None)[1]

            def step(token, state):
                return rwkv.forward([token], state)[1]
        else:
            from metastate.api import load

            ours, _ = load(model, kind, dtype=dtype, threads=int(threads[0]) if threads else "auto")
            vocab, name = ours.cfg.vocab_size, f"ours {ours.description}"

            def prefill(ids):
                return ours.prefill(ids)[1]

            def step(token, state):
                return ours.step(token, state)[1]
    rng = np.random.default_rng(0)
    prompt, tokens = rng.integers(0, vocab, prompt_len).tolist(), rng.integers(0, vocab, decode).tolist()

    def run():
        t0 = time.perf_counter()
        state = prefill(prompt)
        t1 = time.perf_counter()
        for token in tokens:
            state = step(token, state)
        return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1}

    for _ in range(3 if kind == "rwkv" else 1):  # warm-up (TorchScript optimises after a few calls)
        run()
    print(json.dumps({"engine": name}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(json.dumps(run()), flush=True)


class Worker:
    def __init__(self, engine: str, model: Path, args):
        env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"}
        self.label = engine
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", engine, str(model), "--prompt-len",
                                      str(args.prompt_len), "--decode", str(args.decode)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.name = self._read()["engine"]
        self.runs: list[dict] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the {self.label} worker died (its stderr is above)")
        return json.loads(line)

    def run(self) -> None:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        self.runs.append(self._read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# -- main ------------------------------------------------------------------------------------
def prepare(args, tmp: Path) -> tuple[Path, Path]:
    """(model directory to time, its official .pth)."""
    from metastate.api import default_model_path
    from metastate.bench import sized_model
    from weights import export_official_pth, load_model, save_model

    model = sized_model(args.size, tmp) if args.size else Path(args.model or default_model_path())
    cfg, tensors = load_model(model)
    if args.zero_sse_gates:
        tensors = {k: np.zeros_like(v) if k.endswith("meta.sse_gate") else v for k, v in tensors.items()}
        tokenizer = model / cfg.tokenizer["file"] if cfg.tokenizer else None
        model = tmp / "zero-sse"
        save_model(model, cfg, tensors, extra_files={tokenizer.name: tokenizer} if tokenizer else None)
    export_official_pth(cfg, tensors, tmp / "official.pth")
    return model, tmp / "official.pth"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker, args.prompt_len, args.decode)
        return 0
    if min(args.prompt_len, args.decode, args.rounds) < 1:
        raise SystemExit("error: --prompt-len, --decode and --rounds must be at least 1")
    if any(spec.split(":")[0] not in OFFICIAL for spec in args.official):
        raise SystemExit(f"error: --official takes {' or '.join(OFFICIAL)}, each with :THREADS or not")
    from metastate_core.errors import MetaStateError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            model, pth = prepare(args, Path(tmp))
        except MetaStateError as e:
            raise SystemExit(f"error: {e}" + (" (--zero-sse-gates times a copy with them zeroed)"
                                               if "sse_gate" in str(e) else "")) from None
        engines = [(f"rwkv:{d}", pth) for d in args.official] + [(spec, model) for spec in args.ours]
        workers = []
        try:
            for spec, path in engines:  # one at a time: two loads at once would time each other
                workers.append(Worker(spec, path, args))
            for _ in range(args.rounds):
                for w in workers:
                    w.run()
        finally:
            for w in workers:
                w.close()
    rows = []
    for w in workers:
        best = {k: min(r[k] for r in w.runs) for k in ("prefill_s", "decode_s")}
        rows.append({"spec": w.label, "engine": w.name, "prefill_tok_s": args.prompt_len / best["prefill_s"],
                     "decode_tok_s": args.decode / best["decode_s"],
                     "rounds": [{"prefill_tok_s": args.prompt_len / r["prefill_s"],
                                 "decode_tok_s": args.decode / r["decode_s"]} for r in w.runs]})
    print(f"prompt {args.prompt_len} tokens, decode {args.decode} tokens, best of {args.rounds} interleaved rounds")
    print(f"{'engine':<58} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for r in rows:
        print(f"{r['engine'][:58]:<58} {r['prefill_tok_s']:>14,.1f} {r['decode_tok_s']:>13,.1f}")
    ratios = []
    for theirs in (r for r in rows if r["spec"].startswith("rwkv:")):
        for r in rows:
            if r["spec"].startswith("rwkv:") or r["spec"].split(":")[1] != theirs["spec"].split(":")[1]:
                continue
            ratio = {"ours": r["spec"], "official": theirs["spec"],
                     "prefill": r["prefill_tok_s"] / theirs["prefill_tok_s"],
                     "decode": r["decode_tok_s"] / theirs["decode_tok_s"]}
            ratios.append(ratio)
            print(f"{r['spec']} / {theirs['spec']}: prefill {ratio['prefill']:.2f}x, decode {ratio['decode']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"prompt_len": args.prompt_len, "decode": args.decode,
                                               "rounds": args.rounds, "engines": rows, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
