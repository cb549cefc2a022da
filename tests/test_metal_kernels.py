"""The Metal kernels of backends/mlx/kernels.py against the NumPy float64 reference.

Each test runs twice: through the CPU harness (tests/metal_harness: the same kernel strings
compiled with g++, launched with the grid and threadgroup the MLX wrapper asks for, by
swapping kernels._launch), and through mx.fast.metal_kernel on Apple silicon. A backend
that is not available here is skipped with the reason.
"""

from __future__ import annotations

import shutil

import ml_dtypes
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from backends.mlx import kernels as K  # noqa: E402
from metal_harness import HarnessError, mlx_launch, run_kernel  # noqa: E402
from metastate_core.constants import DECAY_SCALE  # noqa: E402
from metastate_core.reference import RecurrentWKV, sigmoid  # noqa: E402

B, T, H, N = 2, 37, 2, 32   # T = 2 * 16 + 5: the last segment is partial


from metastate_core.reference import rel_rms  # noqa: E402  (SPEC section 6)


def to_np(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


@pytest.fixture(params=["harness", "metal"])
def launch(request, monkeypatch):
    """Who runs the kernels. Yields the harness's call log (None on Metal)."""
    if request.param == "metal":
        if not mx.metal.is_available():
            pytest.skip("real Metal kernels need Apple silicon (mx.metal.is_available() is False)")
        yield None
    else:
        if shutil.which("g++") is None:
            pytest.skip("the CPU harness needs g++")
        fake = mlx_launch(K.KERNEL_SOURCES, K.KERNEL_IO)
        monkeypatch.setattr(K, "_launch", fake)
        yield fake.calls


def make_inputs(rng, shape, S_shape):
    """Per-token vectors as the model produces them (kk unit per head, a in (0, 1)) and a
    non-zero initial state whose scale keeps the readouts O(1)."""
    r, w_raw, k, v = (rng.standard_normal(shape) for _ in range(4))
    kk = rng.standard_normal(shape)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    a = sigmoid(rng.standard_normal(shape))
    S0 = 0.3 * rng.standard_normal(S_shape)
    return r, w_raw, k, v, kk, a, S0


def reference(r, w_raw, k, v, kk, a, S0):
    w = np.exp(DECAY_SCALE * sigmoid(w_raw))
    return RecurrentWKV(S0, w, k, v, kk, a)


def mxa(x, dtype=mx.float32):
    return mx.array(np.asarray(x, np.float32)).astype(dtype)


# --- decode -------------------------------------------------------------------------------

def test_step_matches_reference(launch):
    rng = np.random.default_rng(0)
    r, w_raw, k, v, kk, a, S = make_inputs(rng, (B, H, N), (B, H, N, N))
    y, S_new = K.metal_wkv7_step(mxa(S), *(mxa(x) for x in (r, w_raw, k, v, kk, a)))
    ref = reference(*(x[:, None] for x in (r, w_raw, k, v, kk, a)), S)
    assert y.dtype == mx.float32 and S_new.dtype == mx.float32
    assert rel_rms(to_np(y), ref.read(r[:, None])[:, 0]) <= 1e-5
    assert rel_rms(to_np(S_new), ref.final_state) <= 1e-5
    if launch is not None:
        assert launch == [("wkv7_step", (("N", N), ("InT", mx.float32)), (N, H, B), (N, 1, 1))]


def test_step_half_precision_inputs(launch):
    rng = np.random.default_rng(1)
    r, w_raw, k, v, kk, a, S = make_inputs(rng, (B, H, N), (B, H, N, N))
    ref = reference(*(x[:, None] for x in (r, w_raw, k, v, kk, a)), S)
    for dt in (mx.float16, mx.bfloat16):
        y, S_new = K.metal_wkv7_step(mxa(S), *(mxa(x, dt) for x in (r, w_raw, k, v, kk, a)))
        assert y.dtype == dt and S_new.dtype == mx.float32
        assert rel_rms(to_np(y), ref.read(r[:, None])[:, 0]) <= 3e-2
        assert rel_rms(to_np(S_new), ref.final_state) <= 3e-2


def test_state_read_first_heads(launch):
    rng = np.random.default_rng(2)
    S = rng.standard_normal((B, H, N, N))
    q = rng.standard_normal((B, 1, N))
    z = K.metal_state_read(mxa(S), mxa(q))
    assert z.shape == (B, 1, N)
    assert rel_rms(to_np(z), np.einsum("bhij,bhj->bhi", S[:, :1], q)) <= 1e-5


# --- sequence -----------------------------------------------------------------------------

@pytest.mark.parametrize("n, save_every", [(32, 16), (32, 5), (64, 16)])
def test_sequence_matches_reference(launch, n, save_every):
    rng = np.random.default_rng(3)
    r, w_raw, k, v, kk, a, S0 = make_inputs(rng, (B, T, H, n), (B, H, n, n))
    q = rng.standard_normal((B, T, 1, n))
    y, S_T, read = K.metal_wkv7(*(mxa(x) for x in (r, w_raw, k, v, kk, a, S0)), save_every=save_every)
    z = read(mxa(q))
    ref = reference(r, w_raw, k, v, kk, a, S0)
    assert rel_rms(to_np(y), ref.read(r)) <= 1e-4
    assert rel_rms(to_np(S_T), ref.final_state) <= 1e-4
    assert rel_rms(to_np(z), ref.read(q)) <= 1e-4
    if launch is not None:
        n_seg = -(-T // save_every)
        tmpl = (("N", n), ("C", save_every), ("InT", mx.float32))
        assert launch == [("wkv7_fwd", tmpl, (n, H, B), (n, 1, 1)),
                          ("wkv7_read", tmpl, (n, 1, B * n_seg), (n, 1, 1))]


def test_sequence_batch_elements_do_not_leak(launch):
    rng = np.random.default_rng(4)
    args = make_inputs(rng, (B, T, H, N), (B, H, N, N))
    q = rng.standard_normal((B, T, H, N))
    y, S_T, read = K.metal_wkv7(*(mxa(x) for x in args))
    z = read(mxa(q))
    changed = [x.copy() for x in args]
    for x in changed:
        x[0] = rng.standard_normal(x[0].shape)     # another sequence in slot 0 only
    y2, S_T2, read2 = K.metal_wkv7(*(mxa(x) for x in changed))
    z2 = read2(mxa(q))
    for before, after in ((y, y2), (S_T, S_T2), (z, z2)):
        before, after = np.array(before), np.array(after)
        assert np.array_equal(before[1], after[1])
        assert not np.allclose(before[0], after[0])


def test_sequence_bfloat16_inputs(launch):
    rng = np.random.default_rng(5)
    r, w_raw, k, v, kk, a, S0 = make_inputs(rng, (B, T, H, N), (B, H, N, N))
    q = rng.standard_normal((B, T, H, N))
    y, S_T, read = K.metal_wkv7(*(mxa(x, mx.bfloat16) for x in (r, w_raw, k, v, kk, a)), mxa(S0))
    z = read(mxa(q, mx.bfloat16))
    ref = reference(r, w_raw, k, v, kk, a, S0)
    assert y.dtype == mx.bfloat16 and S_T.dtype == mx.float32 and z.dtype == mx.bfloat16
    assert rel_rms(to_np(y), ref.read(r)) <= 3e-2
    assert rel_rms(to_np(S_T), ref.final_state) <= 3e-2
    assert rel_rms(to_np(z), ref.read(q)) <= 3e-2


# --- backward -----------------------------------------------------------------------------

def torch_twin_loss(r, w_raw, k, v, kk, a, S0, q, gy, gS, gz):
    """sum(gy y) + sum(gS S_T) + sum(gz z) by the spec's per-token recurrence, in torch."""
    import torch

    w = torch.exp(DECAY_SCALE * torch.sigmoid(w_raw))
    S, loss, K_ = S0, 0.0, q.shape[2]
    for t in range(r.shape[1]):
        sa = torch.einsum("bhij,bhj->bhi", S, -kk[:, t])
        S = (S * w[:, t, :, None, :] + sa[..., None] * (kk[:, t] * a[:, t])[..., None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        loss = loss + (torch.einsum("bhij,bhj->bhi", S, r[:, t]) * gy[:, t]).sum()
        loss = loss + (torch.einsum("bhij,bhj->bhi", S[:, :K_], q[:, t]) * gz[:, t]).sum()
    return loss + (S * gS).sum()


@pytest.mark.parametrize("heads_read", [1, H])
def test_backward_matches_autograd(launch, heads_read):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    inputs = list(make_inputs(rng, (B, T, H, N), (B, H, N, N)))
    inputs.append(rng.standard_normal((B, T, heads_read, N)))          # q
    gy = rng.standard_normal((B, T, H, N))
    gS = rng.standard_normal((B, H, N, N))
    gz = rng.standard_normal((B, T, heads_read, N))

    def loss(r, w_raw, k, v, kk, a, S0, q):
        y, S_T, read = K.metal_wkv7(r, w_raw, k, v, kk, a, S0)
        return (y * mxa(gy)).sum() + (S_T * mxa(gS)).sum() + (read(q) * mxa(gz)).sum()

    grads = mx.grad(loss, argnums=list(range(8)))(*(mxa(x) for x in inputs))

    tin = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in inputs]
    torch_twin_loss(*tin, *(torch.tensor(g) for g in (gy, gS, gz))).backward()
    names = "r w_raw k v kk a S0 q".split()
    for name, g, t in zip(names, grads, tin):
        assert g.shape == tuple(t.shape), name
        assert rel_rms(to_np(g), t.grad.numpy()) <= 1e-3, name


# --- errors and the harness itself ---------------------------------------------------------

def test_bad_shapes_raise():
    x = mx.zeros((B, T, H, N))
    S0 = mx.zeros((B, H, N, N))
    with pytest.raises(K.MetalKernelError, match="k has shape"):
        K.metal_wkv7(x, x, x[:, :, :1], x, x, x, S0)
    with pytest.raises(K.MetalKernelError, match="S0 has shape"):
        K.metal_wkv7(x, x, x, x, x, x, S0[:, :1])
    with pytest.raises(K.MetalKernelError, match="S has shape"):
        K.metal_wkv7_step(S0[:1], *(x[:, 0] for _ in range(6)))


@pytest.mark.skipif(mx.metal.is_available(), reason="Metal is available here")
def test_without_metal_the_kernels_refuse():
    x = mx.zeros((B, H, N))
    with pytest.raises(K.MetalKernelError, match="Apple silicon"):
        K.metal_wkv7_step(mx.zeros((B, H, N, N)), x, x, x, x, x, x)


_SELFTEST = """
    // Reverse the group's values through threadgroup memory, then sum each simdgroup.
    const uint i = thread_position_in_threadgroup.x;
    const uint n = threads_per_threadgroup.x;
    const uint g = threadgroup_position_in_grid.x;
    threadgroup float buf[1024];
    buf[i] = x[thread_position_in_grid.x] * SCALE;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    rev[thread_position_in_grid.x] = buf[n - 1 - i];
    float s = simd_sum(buf[i]);
    if (thread_index_in_simdgroup == 0)
        sums[g * 4 + simdgroup_index_in_threadgroup] = s + float(x_shape[0]) * 0.0f;
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU harness needs g++")
def test_harness_threadgroups_barriers_and_simd_sum():
    """Groups of 80 threads (2 full simdgroups + 16 lanes) and a partial last group."""
    x = np.arange(200, dtype=np.float32)
    rev, sums = run_kernel("selftest", "", _SELFTEST, ["x"], ["rev", "sums"], [x],
                           template=[("SCALE", 2)], grid=(200, 1, 1), threadgroup=(80, 1, 1),
                           output_shapes=[(200,), (12,)], output_dtypes=[np.float32, np.float32],
                           init_value=-1.0)
    want_rev, want_sums = np.empty(200), np.full(12, -1.0)
    for g, (lo, hi) in enumerate([(0, 80), (80, 160), (160, 200)]):
        want_rev[lo:hi] = 2 * x[lo:hi][::-1]
        for s, start in enumerate(range(lo, hi, 32)):
            want_sums[g * 4 + s] = 2 * x[start:min(start + 32, hi)].sum()
    np.testing.assert_array_equal(rev, want_rev)
    np.testing.assert_array_equal(sums, want_sums)
    with pytest.raises(HarnessError, match="g\\+\\+ failed"):
        run_kernel("broken", "", "out[0] = undefined_name;", ["x"], ["out"], [x],
                   grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                   output_dtypes=[np.float32])


def test_harness_bfloat16_rounds_to_nearest_even():
    """The compat bfloat16_t converts as ml_dtypes does (round to nearest even)."""
    if shutil.which("g++") is None:
        pytest.skip("the CPU harness needs g++")
    x = np.random.default_rng(7).standard_normal(64).astype(np.float32)
    x[:4] = [1.00390625, 1.01171875, -3.0e38, 1e-40]          # ties and extremes
    (out,) = run_kernel("cast", "", "out[thread_position_in_grid.x] = bfloat16_t(x[thread_position_in_grid.x]);",
                        ["x"], ["out"], [x], grid=(64, 1, 1), threadgroup=(32, 1, 1),
                        output_shapes=[(64,)], output_dtypes=[ml_dtypes.bfloat16])
    np.testing.assert_array_equal(out.view(np.uint16), x.astype(ml_dtypes.bfloat16).view(np.uint16))
