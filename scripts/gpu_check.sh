#!/usr/bin/env bash
# The GPU check (issue 19, item 6): everything the first NVIDIA GPU at hand should measure, in at
# most 8 minutes (the default timeouts add up to 500 s, each part cut off at its own):
#   1. the CUDA tests: kernels, the model and parity on CUDA (compiled, no interpreter), the
#      trainer's GPU defaults, decoding from a CUDA graph            TEST_TIMEOUT, TRAIN_TEST_TIMEOUT
#   2. the whole model at 0.1B (bench/gpu_model.py): decode at batch 1 and 64, eager and from a
#      CUDA graph, bf16 and fp32, and the chat engine; training as the trainer runs it (B 8,
#      T 1024, fp32 weights, bf16 autocast) with every fused piece, with none, with each one
#      alone plain, and with the loss from the whole logits           MODEL_TIMEOUT
#   3. the WKV kernels against flash-linear-attention (bench/kernels.py; fla-core installed, or
#      carried as wheels in bench/build/), H 12 and 32, the default chunk configuration, and
#      the decode step                                                BENCH_TIMEOUT
#   4. one product-key layer against the dense layer (issue 18)      PRODUCT_TIMEOUT
#   5. where a training step's GPU time goes (bench/profile_model.py) PROFILE_TIMEOUT
# then one markdown block for docs/benchmarks.md (bench/gpu_model.py --summary), also in
# $OUT/summary.md. Files in $OUT (default ./gpu_check_out; at most 8, as the lent GPU machine
# returns): run.log (everything printed), tests.log, model.json, kernels.json, product.json,
# profile.json, summary.md.
# Usage: scripts/gpu_check.sh [bench/kernels.py arguments; default: --heads 12 32 --sweep 16/32/tf32/4]
# Left out of the default run to fit the 8 minutes (run them by hand): the chunk-configuration
# sweep, the per-kernel breakdown and the per-piece elementwise timings of bench/kernels.py
# (--sweep with more configurations, --breakdown, --elementwise; part 2 times each fused piece
# inside whole training steps instead), and its --model rows (part 2 replaces them).
# Before spending GPU time on a changed script, dry-run it on the CPU (tests/test_bench_scripts.py
# does, in CI): TRITON_INTERPRET=1 python bench/gpu_model.py --device cpu --kernels triton
# --size 64,1,64 --batch 1 --seq-len 8 --decode-batch 1 --decode-tokens 2 --repeats 1
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/run.log") 2>&1
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
    "no 'vs fla' figures in this run"
start=$SECONDS
part() { echo; echo "=== $1 ($(( SECONDS - start )) s in)"; }

part "1. CUDA tests"
timeout "${TEST_TIMEOUT:-120}" "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_chunk.py \
    tests/test_triton_wkv7.py tests/test_fused_elementwise.py tests/test_torch_model.py tests/test_torch_product.py \
    tests/test_parity.py -k "triton or fused" > "$OUT/tests.log" 2>&1
tests=$?
tail -15 "$OUT/tests.log"
# The trainer with its GPU defaults (Triton kernels, fused pieces, bf16 autocast, chunked loss):
# bitwise resume and checkpointing; fp16 with loss scaling; the chunked loss on CUDA; decoding
# from a CUDA graph, token after token against eager decoding.
timeout "${TRAIN_TEST_TIMEOUT:-50}" "$PY" -m pytest -q -p no:cacheprovider tests/test_train.py \
    tests/test_cross_entropy.py tests/test_decode_graph.py -k "resume_reproduces or grad_checkpoint_trains or fp16_scales or cuda" \
    >> "$OUT/tests.log" 2>&1
train_tests=$?
# fla's RWKV7ForCausalLM on a `convert --to-hf` export against the float64 reference (issue 20;
# needs transformers and fla: carry their wheels in bench/build)
timeout "${FLA_TIMEOUT:-60}" "$PY" -m pytest -q -s -p no:cacheprovider tests/test_hf.py -k fla_logits_equal_ours_on_cuda \
    >> "$OUT/tests.log" 2>&1
fla_model=$?
grep -E "fla vs reference|passed|failed|skipped" "$OUT/tests.log" | tail -4
tail -15 "$OUT/tests.log"
tests=$(( tests != 0 ? tests : (train_tests != 0 ? train_tests : fla_model) ))

part "2. the model at 0.1B: decode (eager, CUDA graph) and training (each fused piece on and off)"
timeout "${MODEL_TIMEOUT:-110}" "$PY" bench/gpu_model.py --size 768,12,65536 --decode-batch 1 64 \
    --decode-tokens 32 --batch 8 --seq-len 1024 --repeats 3 --json "$OUT/model.json"
model=$?

part "3. WKV kernels vs fla"
if [ $# -eq 0 ]; then
    set -- --heads 12 32 --sweep 16/32/tf32/4
fi
timeout "${BENCH_TIMEOUT:-100}" "$PY" bench/kernels.py "$@" --json "$OUT/kernels.json"
bench=$?

part "4. one product-key layer vs the dense layer"
# B 8, T 4096, d 768, m 1024, P 4, k 32; fused kernels and plain torch (docs/kernels.md)
timeout "${PRODUCT_TIMEOUT:-25}" "$PY" bench/kernels.py --product 8,4096,768,1024,4,32 --json "$OUT/product.json"
product=$?

part "5. where a training step's time goes"
timeout "${PROFILE_TIMEOUT:-35}" "$PY" bench/profile_model.py --steps 2 --json "$OUT/profile.json" \
    | grep -v "^USDT\|^STAGE"
profile=${PIPESTATUS[0]}

part "summary for docs/benchmarks.md"
"$PY" bench/gpu_model.py --summary "$OUT" | tee "$OUT/summary.md"
echo "exit status: tests $tests, model $model, kernels $bench, product $product, profile $profile" \
     "(124: cut off by its timeout); $(( SECONDS - start )) s"
exit $(( tests != 0 ? tests : model != 0 ? model : bench != 0 ? bench : product != 0 ? product : profile ))
