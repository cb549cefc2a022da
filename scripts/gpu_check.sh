#!/usr/bin/env bash
# GPU check of the Triton WKV-7 kernels: bench/kernels.py against flash-linear-attention (fla-core
# installed, or carried as wheels in bench/build/) with the fused elementwise pieces and the whole
# model, then the kernel and model tests compiled for CUDA (no interpreter), then a profile of
# whole-model training steps (bench/profile_model.py), and one product-key layer against the
# dense layer (issue 18). At most 600 s with the default timeouts (BENCH_TIMEOUT, TEST_TIMEOUT,
# TRAIN_TEST_TIMEOUT, PROFILE_TIMEOUT, PRODUCT_TIMEOUT).
# Logs and JSON go to $OUT (default ./gpu_check_out).
# Usage: scripts/gpu_check.sh [bench/kernels.py arguments; default: the docs/benchmarks.md sweep]
# Before spending GPU time on a changed benchmark, dry-run it on the CPU (tests/test_bench_scripts.py
# does, in CI): TRITON_INTERPRET=1 python bench/kernels.py --device cpu --B 1 --T 16 --heads 1 ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# bench/build/ is git-ignored: on the lent GPU it exists only if the run carried it (carry=["bench/build"]).
if ls bench/build/*.whl >/dev/null 2>&1 && ! "$PY" -c "import fla" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index --target /tmp/gpu_check_pk bench/build/*.whl
    export PYTHONPATH=/tmp/gpu_check_pk
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" || exit 1
"$PY" -c "import fla" 2>/dev/null || echo "WARNING: fla is not importable (were bench/build's wheels carried?):" \
    "no 'vs fla' figures in this run" | tee "$OUT/fla_missing.txt"
if [ $# -eq 0 ]; then
    set -- --heads 12 32 --sweep 16/32/tf32/4 16/32/tf32/4/r128 16/64/tf32/4 16/32/tf32/4/b 16/32/tf32/4/b/r128 --breakdown --elementwise --model 768,12,65536
fi
timeout "${BENCH_TIMEOUT:-330}" "$PY" bench/kernels.py "$@" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
bench=$?
timeout "${TEST_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_chunk.py \
    tests/test_triton_wkv7.py tests/test_fused_elementwise.py tests/test_torch_model.py tests/test_torch_product.py \
    -k "triton or fused" \
    2>&1 | tee "$OUT/tests.log" | tail -20
tests=$?
# The trainer with its GPU defaults (Triton kernels, fused pieces, bf16 autocast, chunked loss):
# bitwise resume and checkpointing; fp16 with loss scaling; the chunked loss on CUDA; decoding
# from a CUDA graph.
timeout "${TRAIN_TEST_TIMEOUT:-60}" "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py \
    tests/test_cross_entropy.py tests/test_decode_graph.py -k "resume_reproduces or grad_checkpoint_trains or fp16_scales or cuda" \
    2>&1 | tee -a "$OUT/tests.log" | tail -20
tests=$(( tests != 0 ? tests : $? ))
# The profile that shows where a training step's time goes (docs/kernels.md); last, as the least needed.
timeout "${PROFILE_TIMEOUT:-60}" "$PY" bench/profile_model.py --json "$OUT/profile.json" 2>&1 \
    | tee "$OUT/profile.log" | grep -v "^USDT\|^STAGE"
profile=${PIPESTATUS[0]}
[ "$profile" -eq 0 ] || echo "WARNING: bench/profile_model.py exited with $profile (log: $OUT/profile.log)"
# One product-key layer (B 8, T 4096, d 768, m 1024, P 4, k 32; fused kernels and plain torch) against
# the dense layer at n = 3072, forward and forward+backward (docs/kernels.md).
timeout "${PRODUCT_TIMEOUT:-30}" "$PY" bench/kernels.py --product 8,4096,768,1024,4,32 --json "$OUT/product.json" \
    2>&1 | tee "$OUT/product.log"
product=${PIPESTATUS[0]}
echo "exit status: bench $bench, tests $tests, profile $profile, product $product"
exit $(( tests != 0 ? tests : bench != 0 ? bench : profile != 0 ? profile : product ))
