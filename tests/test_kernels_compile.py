"""Every Triton kernel of the torch backend compiles for NVIDIA GPUs, checked without one.

Triton's interpreter (which runs the kernel tests on a CPU) accepts programs the GPU compiler
rejects; scripts/compile_check.py runs the launchers with each launch replaced by a real
compilation down to a cubin (ptxas included in the triton wheel) for Hopper (sm_90: H100,
H200), Ampere (sm_80: A100) and Turing (sm_75: T4, the oldest GPU the trainer's fp16 mode is
for: no bfloat16 or TF32 instructions, no asynchronous copies). Run in subprocesses: the test
session runs the interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_prep_kernel", "_state_kernel", "_read_kernel", "_read_bwd_kernel", "_dstate_kernel", "_bwd_kernel",
           "_fwd_kernel", "_replay_kernel", "_step_kernel", "_mix_fwd_kernel", "_mix_bwd_kernel",
           "_gate_fwd_kernel", "_gate_bwd_kernel", "_sse_fwd_kernel", "_sse_bwd_kernel", "_relu_sq_fwd_kernel",
           "_relu_sq_bwd_kernel", "_kprep_fwd_kernel", "_kprep_bwd_kernel",
           "_rows_fwd_kernel", "_weight_bwd_kernel", "_values_bwd_kernel"}


def test_every_kernel_compiles_for_sm90_sm80_and_sm75(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh compile, not a cached one
    runs = {arch: subprocess.Popen(  # one process per architecture, side by side
        [sys.executable, str(ROOT / "scripts" / "compile_check.py"), "--arch", str(arch),
         "--json", str(tmp_path / f"sm{arch}.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env) for arch in (90, 80, 75)}
    for arch, run in runs.items():
        _, err = run.communicate(timeout=900)
        assert (tmp_path / f"sm{arch}.json").exists(), err[-3000:]
        rows = json.loads((tmp_path / f"sm{arch}.json").read_text())
        failed = [f"sm_{arch} {r['kernel']} ({r['config']}): {r['error']}" for r in rows if "error" in r]
        assert not failed, "\n".join(failed)
        assert run.returncode == 0, err[-3000:]
        # every kernel was reached, and ptxas reported on each
        assert {r["kernel"] for r in rows} == KERNELS, KERNELS ^ {r["kernel"] for r in rows}
        assert all(r["registers"] > 0 for r in rows)
