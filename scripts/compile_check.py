"""Compile every Triton kernel of the torch backend for an NVIDIA GPU, on a machine without one.

    python scripts/compile_check.py [--arch 90 80] [--chunk-size 16] [--num-warps 4] [--json OUT]

Runs the launchers (the chunked WKV kernels forward and backward in both schedules, the
sequential and decode kernels, the fused elementwise pieces, the product-key gather-sum) on small CPU tensors with each
Triton launch replaced by a compilation for the target (Triton's own pipeline down to a cubin,
ptxas included) and prints, per kernel and configuration, registers per thread and bytes of
register spills (from `ptxas -v`), shared memory, and the programs that fit on one SM at once.
It catches what Triton's interpreter accepts and the GPU compiler does not, and shows register
pressure and occupancy before a GPU is at hand. The configurations are the GPU defaults:
bfloat16 inputs, N = 64, chunk 16, block_v 32, "tf32" dots, 4 warps (plus float32 inputs with
"tf32x3" dots and with "tf32", which the model launches with bfloat16 weights; the backward and
register-cap alternatives; the GPU block sizes of the sequential and decode kernels). A kernel
whose shared memory exceeds what an SM has counts as failed (0 blocks per SM).

Must run without TRITON_INTERPRET (the interpreter replaces compilation). Exit status 1 if any
kernel fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check.py compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32"}
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def signature_of(fn: JITFunction, args, kwargs):
    """Triton's signature, constexprs and divisibility attributes for a call of fn, specialised
    as a launch would be: None and integer 1 become constants, integers divisible by 16 and
    tensor pointers (torch allocations are 16-byte aligned) carry tt.divisibility 16."""
    values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        x = values[p.name] if p.name in values else p.default
        if p.is_constexpr or x is None or (type(x) is int and x == 1 and not p.do_not_specialize):
            sig[p.name], consts[p.name] = "constexpr", x
        elif isinstance(x, torch.Tensor):
            sig[p.name] = "*" + DTYPES[x.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(x, bool):
            sig[p.name] = "u1"
        elif isinstance(x, int):
            sig[p.name] = "i64" if abs(x) >= 2**31 else "i32"
            if x % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(x, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(x).__name__}")
    return sig, consts, attrs


def ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers and spill bytes of the one kernel in `ptx`, from ptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([str(PTXAS), f"-arch={arch}", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, out)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads")}


# Per SM: registers, shared memory (KB) and resident warps, by compute capability (7.5: T4, RTX 20xx;
# 8.0: A100; 8.6 / 8.9: RTX 30xx / 40xx, A10, L4; 9.0: H100, H200).
SM_LIMITS = {75: (65536, 64, 32), 80: (65536, 164, 64), 86: (65536, 100, 48), 89: (65536, 100, 48),
             90: (65536, 228, 64)}


def blocks_per_sm(arch: int, registers: int, shared: int, warps: int) -> int:
    """Resident programs per SM: registers are allocated per warp in units of 256 (8 a thread),
    shared memory with 1 KB reserved per block."""
    regs, smem_kb, max_warps = SM_LIMITS.get(arch, SM_LIMITS[90])
    by_regs = regs // (-(-registers // 8) * 8 * 32 * warps)
    by_smem = smem_kb * 1024 // (shared + 1024)
    return min(by_regs, by_smem, max_warps // warps, 32)


class Compiler:
    """Stands in for JITFunction.run: compiles each distinct launch for `arch` instead of running it."""

    def __init__(self, arch: int):
        self.arch, self.results, self.seen = arch, [], set()

    def __call__(self, fn: JITFunction, *args, grid, warmup, **kwargs):
        sig, consts, attrs = signature_of(fn, args, kwargs)
        warps, maxnreg = kwargs.get("num_warps", 4), kwargs.get("maxnreg")
        key = (fn.__name__, tuple(sig.items()), tuple((k, str(v)) for k, v in consts.items()),
               tuple(sorted(attrs)), warps, maxnreg)
        if key in self.seen:
            return None
        self.seen.add(key)
        config = ", ".join(f"{k}={v}" for k, v in consts.items()) + f", warps={warps}"
        config += f", maxnreg={maxnreg}" if maxnreg else ""
        div16 = [n for (i,), _ in attrs.items() if not (n := fn.arg_names[i]).endswith("_ptr")]
        config += f", {'/'.join(div16)} % 16 == 0" if div16 else ""
        dtypes = "/".join(sorted({v[1:] for v in sig.values() if v.startswith("*")}))
        row = {"kernel": fn.__name__, "config": config, "dtypes": dtypes, "arch": self.arch}
        try:
            compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", self.arch, 32),
                                      options={"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})})
            row |= ptxas_usage(compiled.asm["ptx"], f"sm_{self.arch}a" if self.arch >= 90 else f"sm_{self.arch}")
            row["shared"] = compiled.metadata.shared  # dynamic shared memory (Triton's), not ptxas's static
            row["blocks_per_sm"] = blocks_per_sm(self.arch, row["registers"], row["shared"], warps)
        except Exception as e:  # noqa: BLE001 - reported per kernel
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        self.results.append(row)
        return None


def launch_everything(chunk_size=16, num_warps=4):
    """Call every launcher once per configuration the GPU path uses (outputs are never read);
    chunk_size and num_warps apply to the chunked WKV kernels. Block sizes are the GPU defaults
    (the CPU's differ), and two sequence lengths give the chunk count both specialisations."""
    from backends.cuda.ops.elementwise import fused
    from backends.cuda.ops.wkv7 import chunk_wkv7, triton_state_read, triton_wkv7, triton_wkv7_step
    from backends.cuda.ops.wkv7.fused_recurrent import default_decode_rows
    from backends.cuda.ops.wkv7.sequential import default_block_rows

    B, T, H, N, d = 1, 64, 2, 64, 128
    gpu = torch.device("cuda")

    def through(fn, dtype, length=T, **kw):
        xs = [torch.zeros(B, length, H, N, dtype=dtype, requires_grad=True) for _ in range(6)]
        q = torch.zeros(B, length, H, N, dtype=dtype, requires_grad=True)
        y, sT, read = fn(*xs, torch.zeros(B, H, N, N, requires_grad=True), **kw)
        (y.float().sum() + read(q).float().sum() + sT.sum()).backward()

    chunked = dict(block_v=32, chunk_size=chunk_size, num_warps=num_warps)
    for options in ({}, {"fused_backward": True}, {"seq_maxnreg": 128}):
        for length in (T, 16 * chunk_size):  # 4 chunks, then 16 (a multiple of 16)
            through(chunk_wkv7, torch.bfloat16, length, precision="tf32", **chunked, **options)
        through(chunk_wkv7, torch.float32, precision="tf32x3", **chunked, **options)
    through(chunk_wkv7, torch.float32, precision="tf32", **chunked)  # the model's launch with bf16 weights
    through(triton_wkv7, torch.bfloat16, block_rows=default_block_rows(N, gpu))
    S = torch.zeros(B, H, N, N)
    step_in = [torch.zeros(B, H, N, dtype=torch.bfloat16) for _ in range(6)]
    triton_wkv7_step(S, *step_in, block_rows=default_decode_rows(N, gpu))
    triton_state_read(S, step_in[0], block_rows=default_decode_rows(N, gpu))
    x = torch.zeros(B, T, d, requires_grad=True)
    g = lambda *s: torch.zeros(*s, requires_grad=True)  # noqa: E731
    eps = 64e-5  # the GroupNorm / SSE epsilon at N = 64 (ModelConfig.eps_group_norm)
    for low in (torch.bfloat16, torch.float16):  # bf16 training; fp16 (older GPUs)
        fused.token_shift_mix(x, g(B, d), g(6, d), low).float().sum().backward()
        fused.group_norm_bonus_gate(g(B, T, d // N, N), g(B, T, d // N, N), g(B, T, d // N, N),
                                    g(B, T, d // N, N), g(B, T, d), g(d // N, N), g(d), g(d), eps,
                                    low).float().sum().backward()
        fused.sse_norm_gate(x, g(B, T, d // N, N), g(d), eps, low).float().sum().backward()
        fused.relu_square(g(B, T, 4 * d).to(low), low).float().sum().backward()
    kk, k_out = fused.k_prep(g(B, T, d), g(B, T, d), g(d), g(d), d // N)
    (kk.sum() + k_out.sum()).backward()
    from backends.cuda.ops.product_keys import fused as product_keys

    for low in (torch.bfloat16, torch.float32):  # the value table in bf16 (training on a GPU), float32
        values = torch.zeros(16, d, dtype=low, requires_grad=True)
        rows = product_keys.weighted_rows(values, torch.zeros(B, T, 4, 32, dtype=torch.long), g(B, T, 4, 32))
        rows.sum().backward()


def check(arch: int, chunk_size=16, num_warps=4) -> list[dict]:
    compiler = Compiler(arch)
    real = JITFunction.run
    JITFunction.run = lambda self, *a, **kw: compiler(self, *a, **kw)
    try:
        launch_everything(chunk_size, num_warps)
    finally:
        JITFunction.run = real
    return compiler.results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90],
                   help=f"compute capabilities, e.g. 90 (H100/H200) 80 (A100) 75 (T4); blocks per SM known for "
                        f"{', '.join(map(str, SM_LIMITS))}")
    p.add_argument("--chunk-size", type=int, default=16, help="of the chunked WKV kernels (16, 32, 64)")
    p.add_argument("--num-warps", type=int, default=4, help="of the chunked WKV kernels")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    rows = [r for arch in args.arch for r in check(arch, args.chunk_size, args.num_warps)]
    print(f"triton {triton.__version__}\n\n| sm | kernel | config | dtypes | registers | spill st/ld (B) | smem (B) "
          "| blocks / SM |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['arch']} | {r['kernel']} | {r['config']} | {r['dtypes']} | FAILED: {r['error']} | | |")
        else:
            print(f"| {r['arch']} | {r['kernel']} | {r['config']} | {r['dtypes']} | {r['registers']} | "
                  f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {r['blocks_per_sm']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r or r["blocks_per_sm"] == 0 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
