"""Where a training step's time goes: torch.profiler over whole-model steps, ops grouped.

    python bench/profile_model.py [--size 768,12,65536] [--batch 8] [--seq-len 1024]
                                  [--kernels auto] [--dtype bfloat16] [--top 25] [--json OUT]
    python bench/profile_model.py --decode-ops [MODEL_DIR] [--decode-batch 1] [--dtype float32]
                                                               # operators per decoded token

Prints the top operators by self time (GPU time on CUDA, CPU time otherwise) and the share of
each group: the WKV kernels, matmuls, elementwise arithmetic (token shift, gates, norms,
activations: the candidates for fused kernels), reductions/norms, memory copies, the optimizer.
A fused kernel pays when its group is a large share: this decides it before anything is written.
--decode-ops counts the aten operators one decoded token runs (no grad, after a 64-token
prefill) and the top ones by self CPU time: on a GPU each non-view operator is a kernel launch,
which bounds decode; on a CPU the counts show the per-token overhead beside the matmuls. Counts
do not depend on how busy the machine is; the times do.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.cuda import load_model  # noqa: E402
from metastate.bench import sized_model  # noqa: E402

GROUPS = (  # first match wins; names as the profiler reports them (aten ops, Triton kernel names)
    ("fused elementwise", ("_mix_fwd", "_mix_bwd", "_gate_fwd", "_gate_bwd", "_sse_fwd", "_sse_bwd", "_relu_sq_",
                           "_kprep_", "_tokenshiftmix", "_groupnormbonusgate", "_ssenormgate", "_relusquare",
                           "_kprep")),
    ("wkv kernels", ("_prep_kernel", "_state_kernel", "_read_kernel", "_read_bwd_kernel", "_dstate_kernel",
                     "_bwd_kernel", "_fwd_kernel", "_replay_kernel", "wkv", "chunk")),
    ("optimizer", ("adam", "foreach", "_fused", "multi_tensor")),
    ("matmul", ("mm", "matmul", "gemm", "linear", "sm90", "cutlass", "nvjet")),
    ("norm / reduction", ("norm", "sum", "mean", "reduce", "softmax", "cross_entropy", "nll")),
    ("memory copy", ("copy", "cat", "to_copy", "clone", "fill", "zero", "memcpy", "memset", "contiguous",
                     "catarray")),
    ("elementwise", ("mul", "add", "sub", "div", "sigmoid", "tanh", "relu", "exp", "rsqrt", "pow", "where",
                     "neg", "elementwise", "vectorized", "lerp", "sqrt", "clamp")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


# aten operators that launch nothing: views, shape queries, allocation
VIEW_OPS = {"view", "reshape", "as_strided", "expand", "expand_as", "select", "slice", "unsqueeze",
            "squeeze", "transpose", "permute", "t", "numpy_T", "_unsafe_view", "alias", "detach",
            "lift_fresh", "empty", "empty_strided", "resolve_conj", "resolve_neg", "result_type",
            "unbind", "split", "narrow", "contiguous", "to", "_to_copy", "flatten", "unflatten"}


def decode_ops(model_dir: str | None, kernels: str, batch: int = 1, dtype: str | None = None,
               top: int = 0) -> dict:
    """Print the aten operators per decoded token: all of them, the top-level non-view ones, and
    (plain elementwise pieces) those of each piece the fused kernels replace with one launch;
    with `top`, also the top operators by self CPU time. Returns the figures."""
    from backends.cuda.ops.elementwise import naive
    from metastate.api import default_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_dir or default_model_path(), device=device, dtype=dtype)
    kernels = model.set_kernels(kernels)
    token = torch.ones(batch, 1, dtype=torch.long, device=device)
    steps = 10
    pieces = ("token_shift_mix", "k_prep", "group_norm_bonus_gate", "sse_norm_gate", "relu_square")
    real = {name: getattr(naive, name) for name in pieces}

    def labelled(name):
        def run(*args, **kw):
            with record_function(f"piece::{name}"):
                return real[name](*args, **kw)
        return run

    try:
        for name in pieces:  # the profile can then tell each piece's operators apart
            setattr(naive, name, labelled(name))
        with torch.no_grad():
            _, state = model(torch.randint(0, model.cfg.vocab_size, (batch, 64), device=device))
            model(token, state)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    model(token, state)
    finally:
        for name in pieces:
            setattr(naive, name, real[name])
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    toplevel = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    launching = [e for e in toplevel if e.name[len("aten::"):] not in VIEW_OPS]
    dt = str(model.head.weight.dtype).replace("torch.", "")
    print(f"{model_dir or 'shipped model'}, kernels={kernels}, {device}, {dt}, batch {batch}, "
          f"{torch.get_num_threads()} threads: per decoded token {len(aten) / steps:.0f} aten operators, "
          f"{len(launching) / steps:.0f} top-level non-view")
    result = {"aten_ops": len(aten) / steps, "top_level_non_view": len(launching) / steps}
    calls = {name: sum(e.name == f"piece::{name}" for e in prof.events()) / steps for name in pieces}
    if any(calls.values()):  # the plain pieces ran: count their operators
        per_piece = {name: sum(e.cpu_parent is not None and e.cpu_parent.name == f"piece::{name}" for e in launching)
                     / steps for name in pieces}
        total = sum(per_piece.values())
        print("plain elementwise pieces per decoded token (calls, top-level non-view operators): "
              + ", ".join(f"{n} {calls[n]:.0f} / {per_piece[n]:.0f}" for n in pieces)
              + f"; {total:.0f} operators where the fused kernels launch {sum(calls.values()):.0f} kernels")
    if top:  # where the CPU time goes (self time: an operator's own, without the operators it calls)
        rows = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in rows)
        print(f"aten self CPU time {total / steps / 1e3:.2f} ms per token (under the profiler)\n"
              "| op | calls / token | ms / token | share |\n|---|---|---|---|")
        for e in sorted(rows, key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"| {e.key} | {e.count / steps:.0f} | {e.self_cpu_time_total / steps / 1e3:.3f} | "
                  f"{e.self_cpu_time_total / total:.1%} |")
        result["self_ms"] = total / steps / 1e3
    return result


def self_time_us(event, cuda: bool) -> float:
    if cuda:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return event.self_cpu_time_total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="768,12,65536", help="D,L,V of a freshly initialised model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--kernels", default="auto", choices=("auto", "ops", "triton"))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 (training), as stored (decode)")
    p.add_argument("--plain-elementwise", action="store_true",
                   help="with the Triton kernels: the elementwise pieces as plain torch ops, not fused")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", help="also write the table here")
    p.add_argument("--decode-ops", nargs="?", const="", metavar="MODEL_DIR",
                   help="count the operators per decoded token instead (default: the shipped model; "
                        "--dtype as stored unless given, --top rows of self time)")
    p.add_argument("--decode-batch", type=int, default=1, help="with --decode-ops: sequences decoded together")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decode_ops is not None:
        result = decode_ops(args.decode_ops or None, args.kernels, args.decode_batch, args.dtype, args.top)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return
    args.dtype = args.dtype or "bfloat16"
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(sized_model(args.size, Path(tmp)), device=device, dtype=args.dtype)
    kernels = model.set_kernels(args.kernels, fused=False if args.plain_elementwise else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer
    V = model.cfg.vocab_size
    tokens = torch.randint(0, V, (args.batch, args.seq_len + 1), device=device)

    def step():
        loss, _ = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    # On CUDA, the GPU kernels' own rows only: each CPU op's device time repeats its kernels'.
    events = [e for e in prof.key_averages() if self_time_us(e, cuda) > 0
              and (not cuda or e.device_type != DeviceType.CPU)]
    total = sum(self_time_us(e, cuda) for e in events)
    where = torch.cuda.get_device_name() if cuda else "CPU"
    elementwise = "plain" if args.plain_elementwise or kernels == "ops" else "fused"
    print(f"{where}, model {args.size}, B={args.batch} T={args.seq_len}, {args.dtype}, kernels={kernels}, "
          f"{elementwise} elementwise: "
          f"{total / args.steps / 1e3:.1f} ms self time per step")
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + self_time_us(e, cuda)
    print("\n| group | ms / step | share |\n|---|---|---|")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {t / args.steps / 1e3:.2f} | {t / total:.1%} |")
    print("\n| op | group | calls / step | ms / step | share |\n|---|---|---|---|---|")
    rows = sorted(events, key=lambda e: -self_time_us(e, cuda))[:args.top]
    for e in rows:
        t = self_time_us(e, cuda)
        print(f"| {e.key[:70]} | {group_of(e.key)} | {e.count / args.steps:.0f} | {t / args.steps / 1e3:.3f} | "
              f"{t / total:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": where, "size": args.size, "batch": args.batch, "seq_len": args.seq_len,
            "dtype": args.dtype, "kernels": kernels, "ms_per_step": total / args.steps / 1e3,
            "groups_ms": {g: t / args.steps / 1e3 for g, t in groups.items()},
            "top": [{"op": e.key, "group": group_of(e.key), "calls": e.count / args.steps,
                     "ms": self_time_us(e, cuda) / args.steps / 1e3} for e in rows]}, indent=1))


if __name__ == "__main__":
    main()
