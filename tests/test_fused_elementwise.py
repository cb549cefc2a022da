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
    """Both twins on the same inputs; the fused one's values and gradients against float64 naive
    (every output of a piece that has several)."""
    tensors = lambda xs: [x for x in xs if torch.is_tensor(x)]  # noqa: E731
    fused_args = [a.detach().clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a
                  for a in args]
    ref_args = [a.detach().double().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a
                for a in args]
    out64 = {} if name == "k_prep" else {"out_dtype": torch.float64}  # k_prep: float32 always
    got, want = getattr(fused, name)(*fused_args, **kw), getattr(naive, name)(*ref_args, **kw, **out64)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    g = torch.Generator().manual_seed(cot_seed)
    loss_got = loss_want = 0
    for x, w in zip(got, want):
        assert x.shape == w.shape and x.dtype == torch.float32 and w.dtype == torch.float64
        assert rel_rms(x, w) < VALUE_TOL, (name, rel_rms(x, w))
        cot = torch.randn(w.shape, generator=g, dtype=torch.float64)
        loss_got, loss_want = loss_got + (x * cot.to(DEV, torch.float32)).sum(), loss_want + (w * cot.to(DEV)).sum()
    loss_got.backward()
    loss_want.backward()
    for i, (f, r) in enumerate(zip(tensors(fused_args), tensors(ref_args))):
        assert f.grad is not None and f.grad.dtype == f.dtype, (name, i)
        assert rel_rms(f.grad, r.grad) < GRAD_TOL, (name, i, rel_rms(f.grad, r.grad))
    return got if len(got) > 1 else got[0]


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


@pytest.mark.parametrize("B,T,H,N", [(2, 37, 3, 32), (1, 20, 2, 64)])
def test_k_prep(B, T, H, N):
    k, a = randn(B, T, H * N, seed=1), randn(B, T, H * N, seed=2).sigmoid()
    k_k, k_a = 0.5 + 0.1 * randn(H * N, seed=3), randn(H * N, seed=4).sigmoid()
    kk, _ = check("k_prep", [k, a, k_k, k_a, H])
    assert torch.allclose(kk.norm(dim=-1), torch.ones(()), atol=1e-6)


def test_k_prep_zero_key():
    # A head whose k is 0: F.normalize's eps branch, kk = 0 and the gradient scaled by 1 / eps.
    H, N = 2, 32
    k, a = randn(1, 3, H * N, seed=1), randn(1, 3, H * N, seed=2).sigmoid()
    k[0, 1, :N] = 0.0
    k_k, k_a, dkk = randn(H * N, seed=3), randn(H * N, seed=4), randn(1, 3, H, N, seed=5)
    grads = []
    for module in (fused, naive):
        x = k.clone().requires_grad_()
        kk, _ = module.k_prep(x, a, k_k, k_a, H)
        assert torch.all(kk[0, 1, 0] == 0)
        (kk * dkk).sum().backward()
        grads.append(x.grad[0, 1, :N])
    assert torch.allclose(grads[0], grads[1], rtol=1e-6) and grads[0].abs().max() > 1e10


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
    if name == "k_prep":
        return [randn(B, T, D, seed=1), randn(B, T, D, seed=2).sigmoid(), randn(D, seed=3), randn(D, seed=4), 2], {}
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


@pytest.mark.parametrize("name", ["group_norm_bonus_gate", "sse_norm_gate", "k_prep"])
def test_head_size_must_be_a_power_of_two(name):
    from backends.cuda.ops.elementwise.fused import ElementwiseInputError

    args, kw = piece_args(name)  # k_prep: D = 80 over 2 heads, 40 each
    args = [a[..., :24] if torch.is_tensor(a) and a.dim() == 4 else a for a in args]  # heads of 24
    if name == "group_norm_bonus_gate":  # and the per-channel inputs to match: 2 heads of 24
        args[4:] = [args[4][..., :48], args[5][:, :24], args[6][:48], args[7][:48]]
    with pytest.raises(ElementwiseInputError, match="power-of-two head size"):
        getattr(fused, name)(*args, **kw)


@pytest.mark.parametrize("name", ["token_shift_mix", "group_norm_bonus_gate", "sse_norm_gate", "k_prep", "relu_square"])
def test_double_backward_raises(name):
    """The kernels have no second derivative: create_graph=True must raise, not leave them out
    (as a silent zero, which once_differentiable gives for a cotangent without grad)."""
    args, kw = piece_args(name)
    if name == "k_prep":
        args[-1] = 5  # heads of 16: D = 80
    leaves = [a.requires_grad_() for a in args if torch.is_tensor(a)]
    for module in (naive, fused):
        out = getattr(module, name)(*args, **kw)
        total = sum(o.sum() for o in (out if isinstance(out, tuple) else (out,)))
        if module is naive:
            torch.autograd.grad(total, leaves, create_graph=True)  # the plain twin has one
        else:
            with pytest.raises(NotImplementedError, match="no second derivative"):
                torch.autograd.grad(total, leaves, create_graph=True)


@pytest.mark.parametrize("name,bad,match", [
    ("token_shift_mix", lambda a: a.__setitem__(1, a[1][:1]), r"prev must be \[2, 80\]"),  # one batch row's state
    ("token_shift_mix", lambda a: a.__setitem__(2, a[2][:, :40]), r"mix must be \[6, 80\]"),
    ("group_norm_bonus_gate", lambda a: a.__setitem__(4, a[4][..., :32]), r"g must be \[2, 9, 64\]"),
    ("group_norm_bonus_gate", lambda a: a.__setitem__(5, a[5][:1]), r"r_k must be \[2, 32\]"),
    ("group_norm_bonus_gate", lambda a: a.__setitem__(7, a[7][:10]), r"bias must be \[64\]"),
    ("sse_norm_gate", lambda a: a.__setitem__(2, a[2][:64]), r"gate must be \[80\]"),
    ("sse_norm_gate", lambda a: a.__setitem__(1, torch.randn(2, 9, 4, 32)), "more than xs's 80"),
    ("k_prep", lambda a: a.__setitem__(4, 3), "80 channels do not split into 3 heads"),
    ("k_prep", lambda a: a.__setitem__(3, a[3][:16]), r"k_a must be \[80\]"),
    ("relu_square", None, None),
])
def test_mismatched_shapes_raise(name, bad, match):
    """The kernels index by the first input's shape: any other input that does not fit it would be
    read out of bounds, so it is refused."""
    from backends.cuda.ops.elementwise.fused import ElementwiseInputError

    args, kw = piece_args(name)
    if name == "k_prep":
        args[-1] = 5
    getattr(fused, name)(*args, **kw)  # the unmodified inputs are fine
    if bad is None:
        return
    bad(args)
    with pytest.raises(ElementwiseInputError, match=match):
        getattr(fused, name)(*args, **kw)


@pytest.mark.parametrize("name", ["token_shift_mix", "group_norm_bonus_gate", "sse_norm_gate", "k_prep", "relu_square"])
def test_no_rows(name):
    """B = 0: empty outputs, and zero parameter gradients, as the plain twin gives."""
    args, kw = piece_args(name)
    if name == "k_prep":
        args[-1] = 5
    per_sequence = lambda i, a: torch.is_tensor(a) and (a.dim() >= 3 or name == "token_shift_mix" and i == 1)  # noqa: E731
    args = [a[:0].clone() if per_sequence(i, a) else a for i, a in enumerate(args)]
    outs = {}
    for module in (naive, fused):
        leaves = [a.detach().requires_grad_() if torch.is_tensor(a) else a for a in args]
        out = getattr(module, name)(*leaves, **kw)
        out = out if isinstance(out, tuple) else (out,)
        assert all(o.numel() == 0 for o in out)
        grads = torch.autograd.grad(out, [a for a in leaves if torch.is_tensor(a)], [torch.ones_like(o) for o in out],
                                    allow_unused=True)
        outs[module] = grads
    for g_naive, g_fused in zip(outs[naive], outs[fused]):
        if g_naive is None:
            continue
        torch.testing.assert_close(g_fused, g_naive)
