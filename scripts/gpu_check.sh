#!/usr/bin/env bash
# GPU check of the Triton WKV-7 kernels: the kernel tests compiled for CUDA (no interpreter),
# then the benchmark against flash-linear-attention. Usage: scripts/gpu_check.sh [bench args]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" || exit 1
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton_wkv7.py --durations=5
tests=$?
"$PY" bench/kernels.py "$@"
bench=$?
exit $(( tests != 0 ? tests : bench ))
