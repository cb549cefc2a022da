"""The GPU benchmark scripts run end to end as a CPU dry run (tiny shapes, Triton interpreter).

GPU time is scarce (scripts/gpu_check.sh gets one short run): a script that breaks after its
first table loses the rest of it. Times here mean nothing; what is checked is that every part
runs and reports.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def run_script(args, tmp_path, path=(), returncode=0):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, path)])}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == returncode, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


BROKEN_FLA = """
# imports, then fails at the first call, as an fla built for another triton does (its kernels
# compile at their first launch)
def chunk_rwkv7(*args, **kwargs):
    raise RuntimeError("CompilationError at the first launch")
fused_recurrent_rwkv7 = chunk_rwkv7
"""


def test_kernel_bench_dry_run_reports_every_part(tmp_path):
    # with an fla whose kernels fail at first use: reported once, then our kernels alone
    (tmp_path / "fla" / "ops" / "rwkv7").mkdir(parents=True)
    for init in ("fla", "fla/ops"):
        (tmp_path / init / "__init__.py").write_text("")
    (tmp_path / "fla" / "ops" / "rwkv7" / "__init__.py").write_text(BROKEN_FLA)
    out = tmp_path / "bench.json"
    log = run_script(["bench/kernels.py", "--device", "cpu", "--B", "1", "--T", "16", "--heads", "1", "--no-decode",
                "--sweep", "16/16/ieee/4/b/r128", "--breakdown", "--elementwise", "--elementwise-shape", "1,8,64",
                "--model", "64,1,64", "--model-shape", "1,8", "--json", str(out)], tmp_path, [tmp_path])
    assert log.count("fla failed at first use") == 1 and "CompilationError at the first launch" in log
    results = json.loads(out.read_text())
    assert results["agreement_rel_rms"] is None
    (sweep,) = results["sweep"]
    names = [row[0] for row in sweep["rows"]]
    assert names[1:] == ["ours sequential (WKV+SSE)", "chunk 16/16/ieee/4/b/r128, WKV only", "chunk 16/16/ieee/4/b/r128"]
    assert all(t > 0 for _, *times in sweep["rows"][1:] for t in times)
    kernels = [row[0] for row in results["breakdown"]["H=1"]["ours"]]
    assert {"_ChunkWKV7", "_ChunkWKV7Backward", "_ChunkRead", "_ChunkReadBackward"} <= set(kernels)
    pieces = {(r["piece"], r["mode"]) for r in results["elementwise"] if r["fused_ms"] > 0 and r["plain_ms"] > 0}
    assert len(pieces) == 10
    model = results["model"]
    trained = [r for r in model if "case" in r]
    assert len(trained) == 5 and all(r["train_tok_s"] > 0 and math.isfinite(r["forward_tok_s"]) for r in trained)
    decode = {r["decode"]: r for r in model if "decode" in r}
    assert decode["fused elementwise"]["ms_per_token"] > 0 and decode["plain-torch elementwise"]["ms_per_token"] > 0
    assert "CUDA" in decode["fused elementwise, CUDA graph"]["error"]  # reported, not fatal


@pytest.mark.parametrize("args, message", [
    (["--sweep", "16/32/tf32/4", "16/32"], "expected C/BV/PRECISION/WARPS"),
    (["--sweep", "16/48/tf32/4"], "block_v = 48 must be a power of two"),
    (["--sweep", "16/32/tf32/4", "--model", "64,1"], "--size expects D,L,V"),
    (["--sweep", "16/32/tf32/4", "--model", "64,1,64", "--model-shape", "8"], "expected B,T"),
    (["--model", "64,1,64"], "go with --sweep"),
    (["--T", "0"], "must be at least 1"),
    (["--heads", "12", "0"], "must be at least 1"),
    (["--T", str(16 * 65536)], "past the 65535 a CUDA grid dimension holds"),
])
def test_kernel_bench_refuses_bad_arguments_before_timing(tmp_path, args, message):
    log = run_script(["bench/kernels.py", "--device", "cpu", *args], tmp_path, returncode=2)
    assert message in log and "| H |" not in log  # nothing timed first


def test_product_bench_dry_run(tmp_path):
    out = tmp_path / "product.json"
    run_script(["bench/kernels.py", "--device", "cpu", "--product", "1,8,64,9,2,5", "--json", str(out)], tmp_path)
    rows = json.loads(out.read_text())["product"]
    assert len(rows) == 4 and all(r["forward_ms"] > 0 and r["train_ms"] > 0 for r in rows)


def test_profile_dry_run_groups_time(tmp_path):
    out = tmp_path / "profile.json"
    run_script(["bench/profile_model.py", "--size", "64,1,64", "--batch", "1", "--seq-len", "8", "--steps", "1",
                "--json", str(out)], tmp_path)
    profile = json.loads(out.read_text())
    groups = profile["groups_ms"]
    assert {"matmul", "optimizer"} <= set(groups) and all(v >= 0 for v in groups.values())
    assert sum(groups.values()) == pytest.approx(profile["ms_per_step"], rel=1e-6)


def test_gpu_model_dry_run_and_summary(tmp_path):
    """bench/gpu_model.py (scripts/gpu_check.sh part 2): every decode and training row runs or
    reports its error (CUDA graphs need CUDA), and --summary turns the JSON into the docs block."""
    out = tmp_path / "model.json"
    run_script(["bench/gpu_model.py", "--device", "cpu", "--kernels", "triton", "--size", "64,1,64", "--batch", "1",
                "--seq-len", "4", "--decode-batch", "1", "--decode-tokens", "1", "--repeats", "1", "--json", str(out)],
               tmp_path)
    rows = json.loads(out.read_text())["rows"]
    decode = {(r["part"], r["dtype"], r["cuda_graphs"]): r for r in rows if r["part"] in ("decode", "engine")}
    assert len(decode) == 6 and decode[("decode", "float32", False)]["tok_s"] > 0
    assert "CUDA" in decode[("decode", "bfloat16", True)]["error"] and "CUDA" in decode[("engine", "bfloat16", True)]["error"]
    train = [r for r in rows if r["part"] == "train"]
    assert [r["case"] for r in train][:2] == ["the trainer: every piece fused", "every piece plain torch"]
    assert len(train) == 8 and all(r["train_tok_s"] > 0 and r["forward_tok_s"] > 0 for r in train)
    block = run_script(["bench/gpu_model.py", "--summary", str(tmp_path)], tmp_path)
    assert "| model call | float32 | 1 | no |" in block and "| k_prep plain |" in block and "Issue 19 goals" in block
