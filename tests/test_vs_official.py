"""bench/vs_official.py end to end on a tiny model: every worker runs and reports, ratios are
paired by precision. Times here mean nothing (the script is run for its figures by hand)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("rwkv")

ROOT = Path(__file__).resolve().parents[1]


def test_vs_official_dry_run(tmp_path):
    out = tmp_path / "vs.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ["--size", "64,2,300", "--prompt-len", "8", "--decode", "4", "--rounds", "1", "--official", "float32",
            "bfloat16:1", "--ours", "numpy:float32:1", "torch:bfloat16:1", "--json", str(out)]
    done = subprocess.run([sys.executable, "bench/vs_official.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    engines = {r["spec"]: r for r in result["engines"]}
    assert set(engines) == {"rwkv:float32", "rwkv:bfloat16:1", "numpy:float32:1", "torch:bfloat16:1"}
    assert engines["rwkv:bfloat16:1"]["engine"] == "rwkv RWKV_x070 cpu bf16, threads 1"
    assert engines["torch:bfloat16:1"]["engine"].startswith("ours torch (cpu")
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and len(r["rounds"]) == 1 for r in engines.values())
    assert [(r["ours"], r["official"]) for r in result["ratios"]] == [("numpy:float32:1", "rwkv:float32"),
                                                                      ("torch:bfloat16:1", "rwkv:bfloat16:1")]
    assert "numpy:float32:1 / rwkv:float32: prefill" in done.stdout


def test_vs_official_refuses_a_model_with_an_sse(tmp_path):
    """The shipped model reads its state (sse_gate != 0): exported only with --zero-sse-gates."""
    done = subprocess.run([sys.executable, "bench/vs_official.py", "--rounds", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0 and "sse_gate is non-zero" in done.stderr
