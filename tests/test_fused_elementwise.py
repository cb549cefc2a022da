"""Fused elementwise kernels (backends/cuda/ops/elementwise/fused.py) vs their plain-torch twins
(naive.py) evaluated in float64: values and every input's gradient.

Shapes are chosen to be awkward: row counts that are not a multiple of the row tile, widths
that are not a multiple of the channel tile, a batch whose rows must not see each other.
On a machine without CUDA the kernels run under Triton's interpreter (tests/conftest.py).
"""

import pytest
import torch

pytest.importorskip("triton")

from backends.cuda.ops.elementwise import fused, naive  # noqa: E402
from metastate_core.reference import rel_rms  # noqa: E402

from wkv_inputs import DEV  # noqa: E402

VALUE_TOL, GRAD_TOL = 1e-5, 1e-5  # float32 kernels against float64: rounding only


def check(name, args, cot_seed=1, **kw):
    """Both twins on the same inputs; the fused one's values and gradients against float64 naive."""
    fused_args = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    ref_args = [a.detach().double().requires_grad_(a.is_floating_point()) for a in args]
    got = getattr(fused, name)(*fused_args, **kw)
    want = getattr(naive, name)(*ref_args, **kw, out_dtype=torch.float64)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_rms(got, want) < VALUE_TOL, (name, rel_rms(got, want))
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(cot_seed), dtype=torch.float64)
    (got * cot.to(DEV, torch.float32)).sum().backward()
    (want * cot.to(DEV)).sum().backward()
    for i, (f, r) in enumerate(zip(fused_args, ref_args)):
        assert f.grad is not None and f.grad.dtype == f.dtype, (name, i)
        assert rel_rms(f.grad, r.grad) < GRAD_TOL, (name, i, rel_rms(f.grad, r.grad))
    return got


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.mark.parametrize("B,T,D,M", [(2, 45, 48, 6), (3, 17, 200, 1), (1, 1, 64, 6)])
def test_token_shift_mix(B, T, D, M):
    x, prev, mix = randn(B, T, D, seed=1), randn(B, D, seed=2), randn(M, D, seed=3).sigmoid()
    out = check("token_shift_mix", [x, prev, mix])
    # each sequence's first token mixes with its own prev, never the previous sequence's last token
    for b in range(B):
        want0 = x[b, 0] + (prev[b] - x[b, 0]) * mix
        assert torch.allclose(out[:, b, 0], want0, atol=1e-6)


@pytest.mark.parametrize("B,T,H,N", [(2, 37, 3, 32), (1, 20, 2, 64)])
def test_group_norm_bonus_gate(B, T, H, N):
    y, r, k, v = (randn(B, T, H, N, seed=s) for s in range(4))
    g = randn(B, T, H * N, seed=4)
    r_k, weight, bias = randn(H, N, seed=5), 1 + 0.1 * randn(H * N, seed=6), randn(H * N, seed=7)
    check("group_norm_bonus_gate", [y * 3 + 1, r, k, v, g, r_k, weight, bias], eps=64e-5)


# (2, 50, ...): 7 row tiles over 4 programs, so the backward's loop over tiles runs twice
@pytest.mark.parametrize("B,T,D,K,N", [(2, 29, 200, 2, 32), (1, 18, 128, 4, 32), (2, 50, 100, 3, 32)])
def test_sse_norm_gate(B, T, D, K, N):
    xs, z, gate = randn(B, T, D, seed=1), randn(B, T, K, N, seed=2), randn(D, seed=3)
    check("sse_norm_gate", [xs, z, gate], eps=64e-5)


def test_relu_square():
    h = randn(2, 37, 100, seed=1)
    h[0, 0, :10] = 0.0  # relu's kink: gradient 0 there in both
    check("relu_square", [h])


def piece_args(name):
    """Inputs of each piece at small awkward shapes (B=2, T=9, H=2, N=32, D=80)."""
    B, T, H, N, D = 2, 9, 2, 32, 80
    if name == "token_shift_mix":
        return [randn(B, T, D, seed=1), randn(B, D, seed=2), randn(6, D, seed=3).sigmoid()], {}
    if name == "group_norm_bonus_gate":
        heads = [randn(B, T, H, N, seed=s) for s in range(4)]
        return heads + [randn(B, T, H * N, seed=4), randn(H, N, seed=5), randn(H * N, seed=6),
                        randn(H * N, seed=7)], {"eps": 64e-5}
    if name == "sse_norm_gate":
        return [randn(B, T, D, seed=1), randn(B, T, 2, N, seed=2), randn(D, seed=3)], {"eps": 64e-5}
    return [randn(B, T, D, seed=1)], {}


@pytest.mark.parametrize("name", ["token_shift_mix", "group_norm_bonus_gate", "sse_norm_gate", "relu_square"])
def test_bfloat16_output(name):
    """Stored in the consumer's dtype: the float32 result rounded once, not computed in bfloat16.

    Every element is one of the two bfloat16 neighbours of the exact value (Triton's interpreter
    truncates where a GPU rounds to nearest, so "nearest" is not asserted)."""
    args, kw = piece_args(name)
    got = getattr(fused, name)(*args, **kw, out_dtype=torch.bfloat16)
    want = getattr(naive, name)(*[a.double() for a in args], **kw, out_dtype=torch.float64)
    assert got.dtype == torch.bfloat16
    spacing = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)  # bfloat16: 8-bit mantissa
    assert ((got.double() - want).abs() <= spacing).all()
    assert rel_rms(got, want) > 1e-4  # the rounding happened


@pytest.mark.parametrize("name", ["group_norm_bonus_gate", "sse_norm_gate"])
def test_head_size_must_be_a_power_of_two(name):
    from backends.cuda.ops.elementwise.fused import ElementwiseInputError

    args, kw = piece_args(name)
    args = [a[..., :24] if a.dim() == 4 else a for a in args]  # heads of 24
    with pytest.raises(ElementwiseInputError, match="power-of-two head size"):
        getattr(fused, name)(*args, **kw)
