"""Errors of the Triton sequence kernels against float64 autograd of the naive recurrence.

    python scripts/kernel_errors.py        # CPU: Triton's interpreter; on a GPU: compiled

Prints rel_rms (SPEC section 6) of the values (y, S_T) and of the gradients of every input,
for both sequence kernels at the shapes of tests/test_triton_chunk.py's check_autograd.
The tests assert the bounds; this prints the measured figures docs/kernels.md quotes.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root), str(root / "tests")]

from test_triton_chunk import make_inputs, naive_grads, rel_rms  # noqa: E402

from backends.cuda.ops.wkv7 import chunk_wkv7, triton_wkv7  # noqa: E402

# (B, T, H, N, K readout heads, chunk size, shift of w_raw: +8 is the strongest decay)
CASES = [(2, 45, 2, 64, 1, 16, 0.0), (1, 64, 2, 32, 2, 32, 0.0), (1, 100, 2, 16, 0, 64, 8.0)]


def main():
    print("| kernel | B T H N K | C | values (max) | gradients (min..max) |\n|---|---|---|---|---|")
    def chunk_fused(*args, **kw):
        return chunk_wkv7(*args, **kw, fused_backward=True)

    kernels = (("chunk", chunk_wkv7), ("chunk, fused backward", chunk_fused), ("sequential", triton_wkv7))
    for name, fn in kernels:
        chunked = name.startswith("chunk")
        for B, T, H, N, K, C, shift in CASES:
            ins, cot = make_inputs(B, T, H, N, K, 0)
            ins[1] = ins[1] + shift
            (y_n, z_n, sT_n), grads_n = naive_grads(ins, cot, K)
            x = [t.detach().clone().requires_grad_() for t in ins]
            y, sT, read = fn(*x[:7], **({"chunk_size": C} if chunked else {}))
            loss = (y * cot[0]).sum() + (sT * cot[2]).sum()
            values = [rel_rms(y, y_n), rel_rms(sT, sT_n)]
            if K:
                z = read(x[7][:, :, :K])
                loss = loss + (z * cot[1]).sum()
                values.append(rel_rms(z, z_n))
            loss.backward()
            grads = [rel_rms(t.grad, g) for t, g in zip(x, grads_n)]
            print(f"| {name} | {B} {T} {H} {N} {K} | {C if chunked else '-'} | {max(values):.1e} | "
                  f"{min(grads):.1e}..{max(grads):.1e} |", flush=True)


if __name__ == "__main__":
    main()
