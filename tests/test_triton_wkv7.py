"""Triton WKV-7 kernels vs the plain-torch twin (naive_wkv7) and the float64 NumPy reference.

On a machine without CUDA the kernels run under Triton's interpreter (tests/conftest.py), so
shapes stay small; on CUDA the same tests run on the GPU.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from backends.cuda.ops.wkv7 import (  # noqa: E402
    WKV7InputError,
    decay_log,
    naive_wkv7,
    triton_state_read,
    triton_wkv7,
    triton_wkv7_step,
)
from metastate_core.errors import MetaStateError  # noqa: E402
from metastate_core.reference import RecurrentWKV  # noqa: E402

from wkv_inputs import DEV, rwkv_inputs  # noqa: E402

NAMES = ("r", "w_raw", "k", "v", "kk", "a")


from metastate_core.reference import rel_rms  # noqa: E402  (SPEC section 6)


def make_inputs(B, T, H, N, seed=0, dtype=torch.float32):
    return rwkv_inputs(B, T, H, N, torch.Generator().manual_seed(seed), dtype)


def run_triton(ins, S0, q, gy, gz, gS, **kw):
    """Values and gradients of <y,gy> + <z,gz> + <S_T,gS> through the kernels."""
    ins = [x.detach().clone().requires_grad_() for x in ins]
    S0 = S0.detach().clone().requires_grad_()
    y, sT, read = triton_wkv7(*ins, S0, **kw)
    loss = (y.float() * gy).sum() + (sT * gS).sum()
    z = None
    if q is not None:
        q = q.detach().clone().requires_grad_()
        z = read(q)
        loss = loss + (z.float() * gz).sum()
    loss.backward()
    grads = [x.grad for x in ins] + [S0.grad] + ([q.grad] if q is not None else [])
    return (y, z, sT), grads


def run_naive(ins, S0, q, gy, gz, gS):
    ins = [x.detach().float().clone().requires_grad_() for x in ins]
    S0 = S0.detach().clone().requires_grad_()
    qq = None if q is None else q.detach().float().clone().requires_grad_()
    y, z, sT = naive_wkv7(*ins, S0, qq)
    loss = (y * gy).sum() + (sT * gS).sum() + (0 if z is None else (z * gz).sum())
    loss.backward()
    grads = [x.grad for x in ins] + [S0.grad] + ([qq.grad] if q is not None else [])
    return (y, z, sT), grads


def check_against_naive(B, T, H, N, K, seed=0, **kw):
    ins, S0 = make_inputs(B, T, H, N, seed)
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(B, T, K, N, generator=g).to(DEV) if K else None
    gy, gz, gS = (torch.randn(*s, generator=g).to(DEV)
                  for s in ((B, T, H, N), (B, T, max(K, 1), N), (B, H, N, N)))
    (y, z, sT), grads = run_triton(ins, S0, q, gy, gz, gS, **kw)
    (y_n, z_n, sT_n), grads_n = run_naive(ins, S0, q, gy, gz, gS)
    assert rel_rms(y, y_n) <= 1e-4
    assert rel_rms(sT, sT_n) <= 1e-4
    if K:
        assert rel_rms(z, z_n) <= 1e-4
    names = NAMES + ("S0",) + (("q",) if K else ())
    errs = {n: rel_rms(gt, gn) for n, gt, gn in zip(names, grads, grads_n)}
    assert all(e <= 1e-3 for e in errs.values()), errs
    return ins, S0, q, (y, z, sT)


def test_sequence_values_and_grads_n64_t45():
    # T = 45: the last chunk is partial (masked tail); K = 1 < H: the readout covers head 0 only.
    ins, S0, q, (y, z, sT) = check_against_naive(2, 45, 2, 64, K=1)
    # And against the float64 NumPy reference (SPEC section 6, kernel path: 1e-4).
    np_ins = [x.double().cpu().numpy() for x in ins]
    w = np.exp(decay_log(ins[1]).double().cpu().numpy())
    ref = RecurrentWKV(S0.double().cpu().numpy(), w, np_ins[2], np_ins[3], np_ins[4], np_ins[5])
    y_ref = ref.read(np_ins[0])
    assert rel_rms(y, y_ref) <= 1e-4
    assert rel_rms(z, ref.read(q.double().cpu().numpy())) <= 1e-4
    assert rel_rms(sT, ref.final_state) <= 1e-4


def test_sequence_n32_t64():
    # T a multiple of the chunk; K = H (every head read).
    check_against_naive(1, 64, 2, 32, K=2, seed=1)


def test_sequence_row_blocks():
    # Two row blocks per head: key-indexed gradients are summed with atomics; K = H.
    # (Atomics are slow under the interpreter, hence the small shape.)
    check_against_naive(1, 20, 2, 16, K=2, seed=1, block_rows=8)


def test_sequence_without_readout_n16():
    # read never called (sse_heads = 0); smallest supported head size.
    check_against_naive(1, 20, 2, 16, K=0, seed=2)


def test_readout_unused_in_loss_gives_no_readout_gradient():
    ins, S0 = make_inputs(1, 17, 2, 16, seed=3)
    ins = [x.requires_grad_() for x in ins]
    y, sT, read = triton_wkv7(*ins, S0)
    read(torch.randn(1, 17, 1, 16, device=DEV))  # z dropped: the loss does not depend on it
    y.sum().backward()
    ref = [x.detach().clone().requires_grad_() for x in ins]
    naive_wkv7(*ref, S0)[0].sum().backward()
    for x, xr in zip(ins, ref):
        assert rel_rms(x.grad, xr.grad) <= 1e-3


def test_batch_rows_do_not_leak():
    B, T, H, N = 2, 23, 2, 32
    ins, S0 = make_inputs(B, T, H, N, seed=4)
    q = torch.randn(B, T, H, N, device=DEV)
    y, sT, read = triton_wkv7(*ins, S0)
    z = read(q)
    for b in range(B):
        y1, sT1, read1 = triton_wkv7(*[x[b:b + 1] for x in ins], S0[b:b + 1])
        z1 = read1(q[b:b + 1])
        # Same kernel, same arithmetic per sequence: identical, not merely close.
        assert torch.equal(y[b:b + 1], y1) and torch.equal(sT[b:b + 1], sT1)
        assert torch.equal(z[b:b + 1], z1)


def test_step_kernel_matches_sequence_and_prefill_carry():
    B, T, H, N = 2, 21, 2, 32
    ins, S0 = make_inputs(B, T, H, N, seed=5)
    q = torch.randn(B, T, 1, N, device=DEV)
    y, sT, read = triton_wkv7(*ins, S0)
    z = read(q)
    # Prefill the first 9 tokens with the sequence kernel, decode the rest one token at a time.
    _, S, _ = triton_wkv7(*[x[:, :9] for x in ins], S0)
    for t in range(9, T):
        yt = triton_wkv7_step(S, *[x[:, t] for x in ins])
        zt = triton_state_read(S, q[:, t])
        assert rel_rms(yt, y[:, t]) <= 1e-5
        assert rel_rms(zt, z[:, t]) <= 1e-5
    assert rel_rms(S, sT) <= 1e-5


def test_bfloat16_inputs():
    B, T, H, N = 2, 20, 2, 16
    ins, S0 = make_inputs(B, T, H, N, seed=6)
    q = torch.randn(B, T, H, N, device=DEV)
    g = torch.Generator().manual_seed(7)
    gy, gz, gS = (torch.randn(*s, generator=g).to(DEV) for s in ((B, T, H, N), (B, T, H, N), (B, H, N, N)))
    bf, qb = [x.bfloat16() for x in ins], q.bfloat16()
    (y, z, sT), grads = run_triton(bf, S0, qb, gy, gz, gS)
    # Reference: float32 math on the same bf16-rounded inputs, so only the kernel's rounding counts.
    (y_n, z_n, sT_n), grads_n = run_naive(bf, S0, qb, gy, gz, gS)
    assert y.dtype == torch.bfloat16 and sT.dtype == torch.float32
    for out, ref in ((y, y_n), (z, z_n), (sT, sT_n)):
        assert rel_rms(out, ref) <= 3e-2
    for gt, gn, x in zip(grads, grads_n, bf + [S0, qb]):
        assert gt.dtype == x.dtype
        assert rel_rms(gt, gn) <= 3e-2


def test_input_errors():
    ins, S0 = make_inputs(1, 4, 2, 16)
    with pytest.raises(MetaStateError, match="shape"):
        triton_wkv7(ins[0][:, :, :1], *ins[1:])
    with pytest.raises(WKV7InputError, match="S0"):
        triton_wkv7(*ins, S0.double())
    with pytest.raises(WKV7InputError, match="head size"):
        triton_wkv7(*[x[..., :12] for x in ins])
    _, _, read = triton_wkv7(*ins)
    with pytest.raises(WKV7InputError, match="K <= 2"):
        read(torch.zeros(1, 4, 3, 16, device=DEV))
    read(torch.zeros(1, 4, 1, 16, device=DEV))
    with pytest.raises(WKV7InputError, match="once"):
        read(torch.zeros(1, 4, 1, 16, device=DEV))
    S = torch.zeros(1, 2, 16, 16, device=DEV)
    with pytest.raises(WKV7InputError, match="float32"):
        triton_wkv7_step(S.half(), *[x[:, 0] for x in ins])


@pytest.mark.parametrize("rows", [0, 12, 32, -8])
def test_block_rows_must_divide_the_head(rows):
    """Each entry point checks its block_rows: 32 rows at N = 16 would launch no program and return
    uninitialised memory; 12 fails inside Triton; 0 is not "the default"."""
    ins, S0 = make_inputs(1, 4, 2, 16)
    step = [x[:, 0] for x in ins]
    calls = (lambda: triton_wkv7(*ins, block_rows=rows),
             lambda: triton_wkv7_step(S0.clone(), *step, block_rows=rows),
             lambda: triton_state_read(S0, step[0], block_rows=rows))
    for call in calls:
        with pytest.raises(WKV7InputError, match=f"block_rows = {rows} must be a power of two dividing N = 16"):
            call()


def test_sequence_past_32_bit_offsets_is_refused():
    """The sequential kernel indexes tokens in 32 bits: a sequence of 2^31 elements per batch row
    is refused before any memory is touched (expanded views: nothing is allocated)."""
    x = torch.zeros(1, 1, 1, 1, device=DEV).expand(1, 2**25, 1, 64)
    with pytest.raises(WKV7InputError, match="use chunk_wkv7"):
        triton_wkv7(x, x, x, x, x, x)
