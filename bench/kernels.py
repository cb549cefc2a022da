"""Benchmark the Triton WKV-7 kernels against flash-linear-attention (fla) on a CUDA GPU.

    python bench/kernels.py [--T 4096] [--B 8] [--heads 12 32] [--algorithm chunk ...]
    python bench/kernels.py --sweep 16/32/tf32/4 32/32/tf32/8 ... --heads 12
    python bench/kernels.py --product 8,4096,768,1024,4,32   # one product-key layer vs dense


Prints a markdown table (median times of triton.testing.do_bench):
  - train: forward + backward of our WKV with the SSE readout of K = H heads, vs fla's
    chunk_rwkv7 (WKV alone), bf16 inputs, N = 64;
  - prefill: forward alone, same shapes;
  - decode: one token at batch 1 and 64, our step (+ readout) vs fla's fused_recurrent_rwkv7.
fla is optional: without it only our kernels are timed. A first line checks that both compute
the same y (fla's convention: w = log decay, a = -kk, b = kk * a, state [B, H, K, V]).

`--device cpu` (with TRITON_INTERPRET=1 and tiny shapes) is a dry run: every part of the script
runs, with wall-clock times that mean nothing, so a bug in it does not cost GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import lru_cache, partial
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.cuda.ops.wkv7 import (CHUNK, chunk_wkv7, decay_log, triton_state_read, triton_wkv7,  # noqa: E402
                                    triton_wkv7_step)
from backends.cuda.ops.wkv7.checks import check_chunk_count  # noqa: E402

try:
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
except Exception as e:  # ImportError, or an fla too new/old for this torch/triton
    chunk_rwkv7 = fused_recurrent_rwkv7 = None
    print(f"fla not installed ({type(e).__name__}: {e})")

N = 64
DEV = "cuda"  # --device


def inputs(B, T, H, dtype=torch.bfloat16, grad=False):
    """RWKV-7-like inputs [B, T, H, N] on the GPU."""
    g = torch.Generator(device=DEV).manual_seed(0)
    rnd = lambda: torch.randn(B, T, H, N, device=DEV, generator=g)  # noqa: E731
    r, w_raw, k, v = rnd(), rnd() - 1, rnd() * 0.5, rnd()
    kk = torch.nn.functional.normalize(rnd(), dim=-1)
    a = torch.sigmoid(rnd())
    xs = [x.to(dtype).requires_grad_(grad) for x in (r, w_raw, k, v, kk, a)]
    return xs


def fla_failed(e: Exception) -> None:
    """fla's kernels compile at first use, not at import: one that fails there (an fla built for
    another triton) leaves the run to time ours alone."""
    global chunk_rwkv7, fused_recurrent_rwkv7
    chunk_rwkv7 = fused_recurrent_rwkv7 = None
    print(f"fla failed at first use; timing our kernels alone ({type(e).__name__}: {str(e).strip()[:200]})",
          flush=True)


def fla_args(r, w_raw, k, v, kk, a):
    """Our inputs in fla's convention: log decay, a = -kk, b = kk * a."""
    return r, decay_log(w_raw).to(r.dtype), k, v, -kk, kk * a


def ms(fn):
    if DEV == "cpu":  # dry run: one call after a warm-up
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def check_agreement(algorithm="sequential", chunk_kw=None):
    xs = inputs(2, 100, 4, dtype=torch.float32)
    y, _, _ = chunk_wkv7(*xs, **(chunk_kw or {})) if algorithm == "chunk" else triton_wkv7(*xs)
    if chunk_rwkv7 is None:
        return None
    try:
        y_fla, _ = chunk_rwkv7(*fla_args(*xs), scale=1.0, output_final_state=True)
    except Exception as e:  # noqa: BLE001 - reported, then ours alone
        fla_failed(e)
        return None
    return ((y - y_fla).pow(2).mean().sqrt() / y_fla.pow(2).mean().sqrt()).item()


def train_fns(B, T, H, block_rows=None, algorithm="sequential", chunk_kw=None, sse=True):
    """Closures over one set of inputs: {"train ours", "prefill ours"[, "train fla", "prefill fla"]}.
    "train" is forward + backward, "prefill" the forward alone; sse False leaves the readout out
    (WKV alone, fla's workload)."""
    xs = inputs(B, T, H, grad=True)
    q = torch.randn(B, T, H, N, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    gy, gz = torch.randn_like(q), torch.randn_like(q)
    S0 = torch.zeros(B, H, N, N, device=DEV)

    if algorithm == "chunk":
        wkv = lambda *a: chunk_wkv7(*a, **(chunk_kw or {}))  # noqa: E731
    else:
        wkv = lambda *a: triton_wkv7(*a, block_rows=block_rows)  # noqa: E731

    def ours():
        y, sT, read = wkv(*xs, S0)
        torch.autograd.backward([y, read(q)] if sse else [y], [gy, gz] if sse else [gy])

    def ours_fwd():
        with torch.no_grad():
            y, sT, read = wkv(*xs, S0)
            if sse:
                read(q)

    fns = {"train ours": ours, "prefill ours": ours_fwd}
    if chunk_rwkv7 is not None:
        leaves = [x.detach().requires_grad_() for x in xs]
        h0 = torch.zeros(B, H, N, N, device=DEV)

        def fla():
            y, _ = chunk_rwkv7(*fla_args(*leaves), scale=1.0, initial_state=h0, output_final_state=True)
            y.backward(gy)

        def fla_fwd():
            with torch.no_grad():
                chunk_rwkv7(*fla_args(*leaves), scale=1.0, initial_state=h0, output_final_state=True)

        fns.update({"train fla": fla, "prefill fla": fla_fwd})
    return fns


def bench_train(B, T, H, block_rows=None, with_fla=True, algorithm="sequential", chunk_kw=None, sse=True):
    """Median ms of each of train_fns' closures (fla's only with_fla)."""
    out = {}
    for name, fn in train_fns(B, T, H, block_rows, algorithm, chunk_kw, sse).items():
        if "fla" not in name:
            out[name] = ms(fn)
        elif with_fla and chunk_rwkv7 is not None:
            try:
                out[name] = ms(fn)
            except Exception as e:  # noqa: BLE001 - reported, then ours alone
                fla_failed(e)
    return out


def kernel_breakdown(B, T, H, chunk_kw, steps=3):
    """GPU time of each kernel in one forward + backward (ours with the SSE readout, fla WKV
    alone), from torch.profiler: {"ours" | "fla": [(kernel, calls, ms)], ...}, per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for who, fn in train_fns(B, T, H, algorithm="chunk", chunk_kw=chunk_kw).items():
        if not who.startswith("train"):
            continue
        try:
            fn()  # compile and warm up
        except Exception as e:  # noqa: BLE001 - fla's; ours must not fail
            if "fla" not in who:
                raise
            fla_failed(e)
            continue
        sync()
        with profile(activities=[ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
            sync()
        if DEV == "cuda":
            rows = [(e.key, e.count / steps, e.self_device_time_total / steps / 1e3) for e in prof.key_averages()
                    if e.self_device_time_total > 0 and e.device_type != DeviceType.CPU]  # kernels, not ops
        else:  # dry run: CPU operators
            rows = [(e.key, e.count / steps, e.self_cpu_time_total / steps / 1e3) for e in prof.key_averages()]
        out[who.split()[1]] = sorted(rows, key=lambda r: -r[2])
    return out


def bench_decode(B, H):
    xs = [x[:, 0] for x in inputs(B, 1, H)]
    S = torch.zeros(B, H, N, N, device=DEV)
    q = torch.randn(B, H, N, device=DEV, dtype=torch.bfloat16)
    row = {"step ours": ms(lambda: triton_wkv7_step(S, *xs)),
           "step+read ours": ms(lambda: (triton_wkv7_step(S, *xs), triton_state_read(S, q)))}
    if fused_recurrent_rwkv7 is not None:
        args = fla_args(*[x[:, None] for x in xs])
        h0 = torch.zeros(B, H, N, N, device=DEV)
        try:
            row["step fla"] = ms(lambda: fused_recurrent_rwkv7(*args, scale=1.0, initial_state=h0,
                                                               output_final_state=True))
        except Exception as e:  # noqa: BLE001 - reported, then ours alone
            fla_failed(e)
    return row


def parse_config(text):
    """'C/BV/precision/warps[/b][/rNNN]' -> chunk_wkv7 keyword arguments (b: fused_backward,
    rNNN: seq_maxnreg=NNN)."""
    from backends.cuda.ops.wkv7.chunk import Launch

    try:
        C, BV, prec, warps, *rest = text.split("/")
        kw = dict(chunk_size=int(C), block_v=int(BV), precision=prec, num_warps=int(warps))
        for flag in rest:
            if flag == "b":
                kw["fused_backward"] = True
            elif flag[:1] == "r" and flag[1:].isdigit():
                kw["seq_maxnreg"] = int(flag[1:])
            else:
                raise ValueError
    except ValueError:
        raise ValueError(f"--sweep: expected C/BV/PRECISION/WARPS[/b][/rNNN], got {text!r}") from None
    Launch.resolve(torch.device(DEV), torch.bfloat16, N, **kw)  # WKV7InputError for values the kernels refuse
    return kw


def sweep(args, saved: dict) -> list:
    """fla, our sequential kernel and each chunk configuration side by side, per H; the rows go
    into saved["sweep"], written to --json after each H."""
    print("| H | kernel | fwd+bwd (ms) | forward (ms) | fwd+bwd / fla |\n|---|---|---|---|---|")
    results = saved["sweep"] = []
    for H in args.heads:
        ref = bench_train(args.B, args.T, H, with_fla=True)
        fla = ref.get("train fla")
        rows = [("fla chunk_rwkv7 (WKV only)", fla, ref.get("prefill fla")),
                ("ours sequential (WKV+SSE)", ref["train ours"], ref["prefill ours"])]
        for name, tr, pf in rows:
            print(f"| {H} | {name} | {tr or float('nan'):.3f} | {pf or float('nan'):.3f} | "
                  f"{f'{tr / fla:.2f}' if fla and tr else '-'} |", flush=True)
        # Our WKV alone (no readout) at the first configuration: fla's workload exactly.
        r = bench_train(args.B, args.T, H, with_fla=False, algorithm="chunk", chunk_kw=parse_config(args.sweep[0]),
                        sse=False)
        tr, pf = r["train ours"], r["prefill ours"]
        rows.append((f"chunk {args.sweep[0]}, WKV only", tr, pf))
        print(f"| {H} | chunk {args.sweep[0]} (WKV only) | {tr:.3f} | {pf:.3f} | "
              f"{f'{tr / fla:.2f}' if fla else '-'} |", flush=True)
        for text in args.sweep:
            try:
                r = bench_train(args.B, args.T, H, with_fla=False, algorithm="chunk",
                                chunk_kw=parse_config(text))
            except Exception as e:  # a configuration that does not compile or fit
                print(f"| {H} | chunk {text} | failed: {type(e).__name__}: {str(e)[:80]} | | |", flush=True)
                continue
            tr, pf = r["train ours"], r["prefill ours"]
            rows.append((f"chunk {text}", tr, pf))
            print(f"| {H} | chunk {text} (WKV+SSE) | {tr:.3f} | {pf:.3f} | "
                  f"{f'{tr / fla:.2f}' if fla else '-'} |", flush=True)
            empty_cache()
        results.append({"H": H, "rows": rows})
        if args.json:  # after each H: a run cut short by its time limit keeps what it measured
            Path(args.json).write_text(json.dumps(saved, indent=1))
    return results


def bench_model(size, batch, seq_len, repeats=5):
    """Whole-model throughput (metastate bench's measurement), one run: the model's Triton
    default with bf16 weights (chunked kernels, fused elementwise pieces, chunked loss), the same
    with the elementwise pieces as plain torch ops (the before of issue point 2d), with the loss
    from the whole logits, with activation checkpointing, and as `metastate train` runs (float32
    weights, bf16 autocast). Also decode latency (batch 1, after a 64-token prefill): fused
    pieces, plain ones, and fused from a CUDA graph."""
    import tempfile

    from backends.cuda import load_model
    from backends.cuda.decode_graph import DecodeGraph
    from metastate.bench import bench_training, sized_model

    print(f"\n| model {size}, B={batch} T={seq_len} | forward tok/s | fwd+bwd+AdamW tok/s | peak MiB |"
          "\n|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = sized_model(size, Path(tmp))
        cases = (("bf16, triton (chunked, fused elementwise)", "bfloat16", {}),
                 ("bf16, plain-torch elementwise", "bfloat16", {"fused": False}),
                 ("bf16, loss from the whole logits", "bfloat16", {"plain_loss": True}),
                 ("bf16, --grad-checkpoint", "bfloat16", {"grad_checkpoint": True}),
                 ("float32 weights, bf16 autocast (the trainer)", "float32", {"autocast": True}))
        for name, dtype, options in cases:
            r = bench_training(path, "triton", dtype, batch, seq_len, repeats, **options)
            rows.append({"case": name, **r})
            print(f"| {name} | {r['forward_tok_s']:,.0f} | {r['train_tok_s']:,.0f} | {r['peak_memory_mib']:.0f} |",
                  flush=True)
            empty_cache()
        model = load_model(path, device=DEV, dtype="bfloat16", kernels="triton")
        graph = lru_cache(None)(lambda: DecodeGraph(model))  # built in its row: it needs CUDA
        print("\n| decode, batch 1, bf16 | ms / token |\n|---|---|")
        with torch.no_grad():
            _, state = model(torch.randint(0, model.cfg.vocab_size, (1, 64), device=DEV))
            token = torch.ones(1, 1, dtype=torch.long, device=DEV)
            for name, fused, step in (("fused elementwise", True, lambda: model(token, state)),
                                      ("plain-torch elementwise", False, lambda: model(token, state)),
                                      ("fused elementwise, CUDA graph", True, lambda: graph()(token, state))):
                try:
                    model.set_kernels("triton", fused=fused)
                    step()  # the graph captures here, outside the timing
                    t = ms(step)
                except Exception as e:  # one failing row must not cost the others their report
                    rows.append({"decode": name, "error": repr(e)})
                    print(f"| {name} | failed: {e!r} |", flush=True)
                    continue
                rows.append({"decode": name, "ms_per_token": t})
                print(f"| {name} | {t:.3f} |", flush=True)
    return rows


def bench_elementwise(B=8, T=1024, d=768, N=64, n_param=None):
    """Each fused elementwise piece vs its plain-torch twin at the RWKV-7 0.1B shape (d 768,
    head size 64, SSE on every head), forward and forward+backward, bf16 outputs as in the
    model. -> rows of {piece, mode, fused_ms, plain_ms}."""
    from backends.cuda.ops.elementwise import fused, naive

    H, n_param = d // N, n_param or 4 * d
    bf = torch.bfloat16
    rnd = lambda *s: torch.randn(*s, device=DEV)  # noqa: E731
    pieces = {  # name: (the function in a module, its arguments)
        "token shift, 6 mixes": (lambda m: partial(m.token_shift_mix, out_dtype=bf),
                                 (rnd(B, T, d), rnd(B, d), rnd(6, d).sigmoid())),
        "keys kk, k'": (lambda m: m.k_prep, (rnd(B, T, d), rnd(B, T, d).sigmoid(), rnd(d), rnd(d), H)),
        "GroupNorm + bonus + gate": (lambda m: partial(m.group_norm_bonus_gate, out_dtype=bf),
                                     (rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N),
                                      rnd(B, T, d), rnd(H, N), rnd(d), rnd(d), 64e-5)),
        "SSE norm + gate": (lambda m: partial(m.sse_norm_gate, out_dtype=bf),
                            (rnd(B, T, d), rnd(B, T, H, N), rnd(d), 64e-5)),
        "relu^2": (lambda m: partial(m.relu_square, out_dtype=bf), (rnd(B, T, n_param).to(bf),)),
    }
    print(f"\n| elementwise piece, B={B} T={T} d={d} | mode | fused (ms) | plain torch (ms) | fused / plain |"
          "\n|---|---|---|---|---|")
    rows = []
    for name, (pick, args) in pieces.items():
        args = [a.requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        leaves = [a for a in args if torch.is_tensor(a) and a.requires_grad]
        for mode in ("forward", "fwd+bwd"):
            times = {}
            for label, module in (("fused", fused), ("plain", naive)):
                fn = pick(module)
                if mode == "forward":
                    def run(fn=fn):
                        with torch.no_grad():
                            fn(*args)
                else:
                    outs = fn(*args)
                    cots = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]

                    def run(fn=fn, cots=cots):
                        outs = fn(*args)
                        torch.autograd.grad(outs if isinstance(outs, tuple) else (outs,), leaves, cots)
                times[label] = ms(run)
            rows.append({"piece": name, "mode": mode, "fused_ms": times["fused"], "plain_ms": times["plain"]})
            print(f"| {name} | {mode} | {times['fused']:.3f} | {times['plain']:.3f} | "
                  f"{times['fused'] / times['plain']:.2f} |", flush=True)
    return rows


def bench_product(B, T, d, m, P, k, dtype=torch.bfloat16):
    """One token-parameter layer (given its query u [B, T, d]), forward and forward+backward
    (gradients of u and every weight): product keys (SPEC section 7; select in torch, the
    gather-weighted-sum by the fused Triton kernels, and by embedding_bag) against the dense
    layer at n = 4d, bf16 weights as in the model. -> rows of {case, forward_ms, train_ms,
    peak_mib}."""
    from backends.cuda.ops.elementwise import naive as ew
    from backends.cuda.ops.product_keys import fused, naive

    g = torch.Generator(device=DEV).manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=DEV, generator=g) * scale).to(dtype)  # noqa: E731
    u = torch.randn(B, T, d, device=DEV, generator=g, requires_grad=True)
    dout = torch.randn(B, T, d, device=DEV, generator=g)
    n = 4 * d
    keys, values = rnd(n, d, scale=d ** -0.5).requires_grad_(), rnd(n, d, scale=0.1).requires_grad_()
    sub_keys = rnd(P, 2, m, d // 2, scale=d ** -0.5).requires_grad_()
    table = rnd(m * m, d, scale=0.1).requires_grad_()

    def dense():
        return ew.relu_square(u.to(dtype) @ keys.T, dtype).matmul(values).float()

    def product(pk):
        score, token = pk.select(u, sub_keys, k)
        return pk.weighted_rows(table, token, ew.relu_square(score))

    cases = {f"dense, n = {n}": (dense, [u, keys, values]),
             f"product m = {m} (n = {m * m}), P = {P}, k = {k}: fused kernels": (partial(product, fused),
                                                                               [u, sub_keys, table]),
             "the same, plain torch (embedding_bag)": (partial(product, naive), [u, sub_keys, table]),
             "the same, select alone": (lambda: naive.select(u, sub_keys, k)[0], [u, sub_keys])}
    print(f"\n| token-parameter layer, B={B} T={T} d={d}, {str(dtype).split('.')[-1]} | forward (ms) | "
          "fwd+bwd (ms) | peak MiB |\n|---|---|---|---|")
    rows = []
    for name, (fn, leaves) in cases.items():
        empty_cache()
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def forward(fn=fn):
            with torch.no_grad():
                fn()

        def train(fn=fn, leaves=leaves):
            out = fn()
            torch.autograd.grad(out, leaves, dout if out.shape == dout.shape else torch.ones_like(out))

        try:
            f, t = ms(forward), ms(train)
        except Exception as e:  # one failing row must not cost the others their report
            rows.append({"case": name, "error": repr(e)})
            print(f"| {name} | failed: {e!r} | | |", flush=True)
            continue
        peak = torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else float("nan")
        rows.append({"case": name, "forward_ms": f, "train_ms": t, "peak_mib": peak})
        print(f"| {name} | {f:.3f} | {t:.3f} | {peak:.0f} |", flush=True)
    return rows


def shape_arg(text: str, names: str) -> list[int]:
    """'8,1024' -> [8, 1024] for names 'B,T': positive integers, as many as names."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) != len(names.split(",")) or min(values) < 1:
        raise ValueError(f"expected {names} (positive integers), got {text!r}")
    return values


def check_arguments(p: argparse.ArgumentParser, args) -> None:
    """Every argument checked before the first timing: a mistake must not cost GPU time first."""
    from metastate.bench import size_config
    from metastate_core.config import ModelConfig
    from metastate_core.errors import MetaStateError

    if args.product:
        try:
            B, T, d, m, P, k = shape_arg(args.product, "B,T,D,M,P,K")
            ModelConfig(vocab_size=1, d_model=d, n_layer=1, head_size=d, param_mode="product", n_sub_keys=m,
                        param_heads=P, param_topk=k).validate()
        except (ValueError, MetaStateError) as e:
            p.error(f"--product: {e}")
    if not args.sweep and (args.model or args.breakdown or args.elementwise):
        p.error("--model, --breakdown and --elementwise go with --sweep")
    if args.T < 1 or args.B < 1 or min(args.heads) < 1:
        p.error("--T, --B and every --heads must be at least 1")
    try:
        check_chunk_count(args.T, CHUNK)  # the sequential kernel's chunks, the most any timed kernel makes
        for text in args.sweep or ():
            parse_config(text)
        if args.algorithm == "chunk" and not args.sweep:
            from backends.cuda.ops.wkv7.chunk import Launch

            Launch.resolve(torch.device(DEV), torch.bfloat16, N, args.chunk_size, args.block_v, args.precision,
                           args.num_warps)
        if args.model:
            size_config(args.model)
            shape_arg(args.model_shape, "B,T")
        if args.elementwise and shape_arg(args.elementwise_shape, "B,T,D")[2] % N:
            raise ValueError(f"--elementwise-shape: D must be a multiple of the head size {N}")
    except (ValueError, MetaStateError) as e:
        p.error(str(e))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--heads", type=int, nargs="+", default=[12, 32])
    p.add_argument("--sweep", nargs="+", metavar="C/BV/PREC/WARPS[/b][/rNNN]",
                   help="time fla, the sequential kernel and these chunk configurations")
    p.add_argument("--algorithm", choices=("sequential", "chunk"), default="sequential")
    p.add_argument("--chunk-size", type=int, default=16, help="chunk algorithm: 16, 32 or 64")
    p.add_argument("--block-v", type=int, default=None, help="chunk algorithm: value rows per program")
    p.add_argument("--precision", default=None, help="chunk algorithm: ieee, tf32x3 or tf32")
    p.add_argument("--num-warps", type=int, default=None, help="chunk algorithm: warps per program")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--model", metavar="D,L,V", help="with --sweep: also time a whole model of this size "
                   "(--model-shape, bf16): the Triton default against its plain-elementwise, whole-logits, "
                   "--grad-checkpoint and autocast variants, and decode latency")
    p.add_argument("--breakdown", action="store_true", help="with --sweep: GPU time per kernel of one "
                   "forward+backward (the first --sweep configuration, and fla), from torch.profiler")
    p.add_argument("--elementwise", action="store_true", help="with --sweep: also time each fused "
                   "elementwise piece against its plain-torch twin")
    p.add_argument("--model-shape", metavar="B,T", default="8,1024", help="with --model: batch and sequence length")
    p.add_argument("--elementwise-shape", metavar="B,T,D", default="8,1024,768",
                   help="with --elementwise: batch, sequence length, model width")
    p.add_argument("--product", metavar="B,T,D,M,P,K", help="time only one product-key layer (m sub-keys, P "
                   "heads, top k) against the dense layer at n = 4d, forward and forward+backward")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run of this script (TRITON_INTERPRET=1, tiny shapes); times mean nothing")
    args = p.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    check_arguments(p, args)
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (dry run, TRITON_INTERPRET=1)"
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}")
    if args.product:
        rows = bench_product(*shape_arg(args.product, "B,T,D,M,P,K"))
        if args.json:
            Path(args.json).write_text(json.dumps({"product": rows}, indent=1))
        return
    if args.sweep:
        # fla computes what ours does: the chunked kernels' y against chunk_rwkv7's, float32
        agree = check_agreement("chunk", parse_config(args.sweep[0]))
        print(f"y agreement with fla chunk_rwkv7 (rel_rms, fp32): {agree if agree is None else f'{agree:.2e}'}")
        results = {"agreement_rel_rms": agree}
        sweep(args, results)

        def save():  # after each part: a run cut short by its time limit keeps what it measured
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))

        if not args.no_decode:
            print("\n| decode, H=12 | ours (ms) | fla (ms) |\n|---|---|---|")
            for B in (1, 64):
                r = bench_decode(B, 12)
                results[f"decode B={B}"] = r
                for name in ("step ours", "step+read ours"):
                    print(f"| {name}, B={B} | {r[name]:.4f} | {r.get('step fla', float('nan')):.4f} |", flush=True)
            save()
        if args.breakdown:
            results["breakdown"] = {}
            for H in args.heads:
                parts = kernel_breakdown(args.B, args.T, H, parse_config(args.sweep[0]))
                results["breakdown"][f"H={H}"] = parts
                for who, rows in parts.items():
                    print(f"\n| {who}, H={H}, {args.sweep[0] if who == 'ours' else 'chunk_rwkv7'}: kernel | calls | "
                          f"ms / step |\n|---|---|---|")
                    for name, calls, t in rows[:14]:
                        print(f"| {name[:60]} | {calls:.0f} | {t:.3f} |")
                    print(f"| total | | {sum(r[2] for r in rows):.3f} |", flush=True)
                save()
        if args.elementwise:
            results["elementwise"] = bench_elementwise(*shape_arg(args.elementwise_shape, "B,T,D"))
            save()
        if args.model:
            results["model"] = bench_model(args.model, *shape_arg(args.model_shape, "B,T"))
        save()
        return
    chunk_kw = dict(chunk_size=args.chunk_size, block_v=args.block_v, precision=args.precision,
                    num_warps=args.num_warps)
    agree = check_agreement(args.algorithm, chunk_kw)
    print(f"y agreement with fla (rel_rms, fp32): {agree if agree is None else f'{agree:.2e}'}")
    print("\n| case | ours (ms) | fla (ms) | ours / fla |\n|---|---|---|---|")
    results = []

    def line(name, ours, fla):
        ratio = f"{ours / fla:.2f}" if fla else "-"
        results.append({"case": name, "ours_ms": ours, "fla_ms": fla})
        print(f"| {name} | {ours:.3f} | {f'{fla:.3f}' if fla else '-'} | {ratio} |", flush=True)

    for H in args.heads:
        r = bench_train(args.B, args.T, H, algorithm=args.algorithm, chunk_kw=chunk_kw)
        shape = f"B={args.B} T={args.T} H={H} N={N} ({args.algorithm}"
        shape += f", C={args.chunk_size})" if args.algorithm == "chunk" else ")"
        line(f"fwd+bwd, WKV+SSE(K=H) vs WKV, {shape}", r["train ours"], r.get("train fla"))
        line(f"forward (prefill), WKV+SSE vs WKV, {shape}", r["prefill ours"], r.get("prefill fla"))
        empty_cache()
    for B in () if args.no_decode else (1, 64):
        r = bench_decode(B, 12)
        line(f"decode step, B={B} H=12", r["step ours"], r.get("step fla"))
        line(f"decode step + SSE read, B={B} H=12", r["step+read ours"], r.get("step fla"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
