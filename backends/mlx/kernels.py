"""Metal kernels of the WKV-7 recurrence for the MLX backend (SPEC sections 2 and 3).

One threadgroup per (batch, head) (per (batch, head, segment) for the readout), one thread
per state row i (the value index): the update is row-local,

    sa_i = sum_j S[i,j] (-kk_j);  S[i,j] = S[i,j] w_j + sa_i kk_j a_j + v_i k_j;  y_i = sum_j S[i,j] r_j

so a thread keeps its row of S in registers (N floats) and the key-indexed vectors of a step
are staged in threadgroup memory. The state is float32 whatever the input dtype; the decay is
w = exp(DECAY_SCALE * sigmoid(w_raw)), computed in float32 inside the kernels. The row update
is one header function, `wkv_row_update` (twin: `wkv7_step_ops` in wkv.py), shared by the
step, sequence, readout and backward-replay kernels.

The sequence kernel runs over time and saves the state every `save_every` tokens
(`states` [B, H, n_seg, N, N], stored key-major, i.e. transposed, so that the saves and loads
of a threadgroup are coalesced). The readout kernel replays each segment from its saved state
in parallel, so z_t = S_t q_t costs one extra pass and no O(T N^2) memory; the backward kernel
replays each segment into a scratch buffer and runs the segment in reverse. See docs/metal.md.

Every kernel body is a module-level string in `KERNEL_SOURCES` (header, source): the same
strings go to `mx.fast.metal_kernel` and to the CPU harness in tests/metal_harness.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from metastate_core.constants import DECAY_SCALE
from metastate_core.errors import MetaStateError

SAVE_EVERY = 16
MAX_HEAD_SIZE = 256  # one thread per row; also bounds the registers a row takes


class MetalKernelError(MetaStateError):
    """Bad input to a Metal kernel, or Metal is not available."""


# ---------------------------------------------------------------------------------------
# Kernel sources. Template parameters (given at call time): N head size, C save interval,
# InT the dtype of the per-token vectors (float, float16_t or bfloat16_t).

_HEADER = f"""
// log w = DECAY * sigmoid(w_raw); the decay is always computed in float32.
constant constexpr float WKV_DECAY = {DECAY_SCALE!r}f;
""" + """
inline float wkv_sigmoid(float x) { return 1.0f / (1.0f + metal::exp(-x)); }

// One token's update of the thread's state row s (value index i), the token's key-indexed
// vectors staged in threadgroup memory: s <- s diag(w) + (s . alpha) beta + v_i k,
// alpha = -kk, beta = kk a (SPEC section 2; twin: wkv7_step_ops in wkv.py).
template <int N>
inline void wkv_row_update(thread float* s, const threadgroup float* w, const threadgroup float* k,
                           const threadgroup float* alpha, const threadgroup float* beta, float v_i) {
    float sa = 0.0f;
    for (int j = 0; j < N; ++j) sa += s[j] * alpha[j];
    for (int j = 0; j < N; ++j) s[j] = s[j] * w[j] + sa * beta[j] + v_i * k[j];
}

// The row's readout s . q.
template <int N>
inline float wkv_row_dot(const thread float* s, const threadgroup float* q) {
    float acc = 0.0f;
    for (int j = 0; j < N; ++j) acc += s[j] * q[j];
    return acc;
}
"""

# Decode: one token. Grid (N, H, B), threadgroup (N, 1, 1).
_STEP = """
    const uint i = thread_position_in_threadgroup.x;
    const uint h = threadgroup_position_in_grid.y;
    const uint b = threadgroup_position_in_grid.z;
    const uint H = threadgroups_per_grid.y;
    threadgroup float tr[N], tw[N], tk[N], tal[N], tbe[N];

    const uint vec = (b * H + h) * N;
    const float kk_i = float(kk[vec + i]);
    tr[i] = float(r[vec + i]);
    tw[i] = metal::exp(WKV_DECAY * wkv_sigmoid(float(w_raw[vec + i])));
    tk[i] = float(k[vec + i]);
    tal[i] = -kk_i;
    tbe[i] = kk_i * float(a[vec + i]);
    const float v_i = float(v[vec + i]);

    const uint row = (vec + i) * N;
    float s[N];
    for (int j = 0; j < N; ++j) s[j] = S[row + j];
    threadgroup_barrier(mem_flags::mem_threadgroup);

    wkv_row_update<N>(s, tw, tk, tal, tbe, v_i);
    for (int j = 0; j < N; ++j) S_out[row + j] = s[j];
    y[vec + i] = InT(wkv_row_dot<N>(s, tr));
"""

# Decode SSE readout z = S q for the first K heads. Grid (N, K, B), threadgroup (N, 1, 1).
_STATE_READ = """
    const uint i = thread_position_in_threadgroup.x;
    const uint h = threadgroup_position_in_grid.y;
    const uint b = threadgroup_position_in_grid.z;
    const uint K = threadgroups_per_grid.y;
    const uint H = S_shape[1];
    threadgroup float tq[N];

    tq[i] = float(q[(b * K + h) * N + i]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const device float* Srow = S + ((b * H + h) * N + i) * N;
    float acc = 0.0f;
    for (int j = 0; j < N; ++j) acc += Srow[j] * tq[j];
    z[(b * K + h) * N + i] = InT(acc);
"""

# Sequence forward. Grid (N, H, B), threadgroup (N, 1, 1). The vectors of a step are double
# buffered in threadgroup memory, so one barrier per step suffices: a thread can only
# overwrite buffer p at step t + 2 after every thread has passed the barrier of step t + 1,
# i.e. finished reading buffer p at step t.
_WKV7_FWD = """
    const uint i = thread_position_in_threadgroup.x;
    const uint h = threadgroup_position_in_grid.y;
    const uint b = threadgroup_position_in_grid.z;
    const int T = r_shape[1];
    const int H = r_shape[2];
    const int n_seg = (T + C - 1) / C;
    threadgroup float tr[2][N], tw[2][N], tk[2][N], tal[2][N], tbe[2][N];

    const uint row = ((b * H + h) * N + i) * N;
    float s[N];
    for (int j = 0; j < N; ++j) s[j] = S0[row + j];
    device float* saved = states + (b * H + h) * n_seg * N * N;   // [n_seg][j][i]

    for (int t = 0; t < T; ++t) {
        const int p = t & 1;
        if (t % C == 0) {
            device float* dst = saved + (t / C) * N * N;
            for (int j = 0; j < N; ++j) dst[j * N + i] = s[j];
        }
        const uint idx = ((b * T + t) * H + h) * N + i;
        const float kk_i = float(kk[idx]);
        tr[p][i] = float(r[idx]);
        tw[p][i] = metal::exp(WKV_DECAY * wkv_sigmoid(float(w_raw[idx])));
        tk[p][i] = float(k[idx]);
        tal[p][i] = -kk_i;
        tbe[p][i] = kk_i * float(a[idx]);
        const float v_i = float(v[idx]);
        threadgroup_barrier(mem_flags::mem_threadgroup);

        wkv_row_update<N>(s, tw[p], tk[p], tal[p], tbe[p], v_i);
        y[idx] = InT(wkv_row_dot<N>(s, tr[p]));
    }
    for (int j = 0; j < N; ++j) S_T[row + j] = s[j];
"""

# Sequence readout z_t = S_t q_t for the first K heads: each threadgroup replays one segment
# from its saved state. Grid (N, K, B * n_seg), threadgroup (N, 1, 1).
_WKV7_READ = """
    const uint i = thread_position_in_threadgroup.x;
    const uint h = threadgroup_position_in_grid.y;
    const int T = q_shape[1];
    const int K = q_shape[2];
    const int H = w_raw_shape[2];
    const int n_seg = states_shape[2];
    const uint b = threadgroup_position_in_grid.z / n_seg;
    const int c = threadgroup_position_in_grid.z % n_seg;
    threadgroup float tq[2][N], tw[2][N], tk[2][N], tal[2][N], tbe[2][N];

    const device float* src = states + ((b * H + h) * n_seg + c) * N * N;
    float s[N];
    for (int j = 0; j < N; ++j) s[j] = src[j * N + i];

    const int t1 = min(c * C + C, T);
    for (int t = c * C; t < t1; ++t) {
        const int p = t & 1;
        const uint idx = ((b * T + t) * H + h) * N + i;
        const uint qdx = ((b * T + t) * K + h) * N + i;
        const float kk_i = float(kk[idx]);
        tq[p][i] = float(q[qdx]);
        tw[p][i] = metal::exp(WKV_DECAY * wkv_sigmoid(float(w_raw[idx])));
        tk[p][i] = float(k[idx]);
        tal[p][i] = -kk_i;
        tbe[p][i] = kk_i * float(a[idx]);
        const float v_i = float(v[idx]);
        threadgroup_barrier(mem_flags::mem_threadgroup);

        wkv_row_update<N>(s, tw[p], tk[p], tal[p], tbe[p], v_i);
        z[qdx] = InT(wkv_row_dot<N>(s, tq[p]));
    }
"""

# Backward of one readout o_t = S_t q_t (q = r for y, q = xs for the SSE) through the whole
# recurrence, for the first HQ = q_shape[2] heads. Grid (N, HQ, B), threadgroup (N, 1, 1).
# Thread i owns row i of dS (registers). Per segment, last to first: replay the segment from
# its saved state into `scratch` ([C + 1][j][i] per head: the state before each token and
# after the last), then walk it backwards. Per token t, with G = dS_t + do_t q_t^T:
#   row phase (thread i):    sa_i, dsa_i = G_i . beta, dv_i = G_i . k,
#                            dS_{t-1}[i,:] = G_i * w + dsa_i alpha
#   column phase (thread j): dq_j = sum_i S_t[i,j] do_i,  dw_j = sum_i G[i,j] S_{t-1}[i,j],
#                            dbeta_j = sum_i G[i,j] sa_i, dk_j = sum_i G[i,j] v_i,
#                            dalpha_j = sum_i dsa_i S_{t-1}[i,j]
# G goes through a padded threadgroup tile so that thread j reads column j; the states are
# read from scratch both by row (coalesced) and by column (one contiguous run per thread).
_WKV7_BWD = """
    const uint i = thread_position_in_threadgroup.x;
    const uint h = threadgroup_position_in_grid.y;
    const uint b = threadgroup_position_in_grid.z;
    const int T = w_raw_shape[1];
    const int H = w_raw_shape[2];
    const int HQ = q_shape[2];
    const int n_seg = states_shape[2];
    threadgroup float tq[N], tw[N], tk[N], tal[N], tbe[N];
    threadgroup float t_do[N], t_v[N], t_sa[N], t_dsa[N];
    threadgroup float tile[N][N + 1];

    float ds[N];
    const uint row = ((b * HQ + h) * N + i) * N;
    for (int j = 0; j < N; ++j) ds[j] = dS_end[row + j];
    device float* scr = scratch + (b * HQ + h) * (C + 1) * N * N;     // [C + 1][j][i]

    for (int c = n_seg - 1; c >= 0; --c) {
        const int t0 = c * C;
        const int t1 = min(t0 + C, T);
        // Replay the segment: scr[u] is the state before token t0 + u. The barrier keeps the
        // previous segment's column reads ahead of these writes.
        threadgroup_barrier(mem_flags::mem_device);
        {
            const device float* src = states + ((b * H + h) * n_seg + c) * N * N;
            float s[N];
            for (int j = 0; j < N; ++j) {
                s[j] = src[j * N + i];
                scr[j * N + i] = s[j];
            }
            for (int t = t0; t < t1; ++t) {
                const uint idx = ((b * T + t) * H + h) * N + i;
                threadgroup_barrier(mem_flags::mem_threadgroup);
                const float kk_i = float(kk[idx]);
                tw[i] = metal::exp(WKV_DECAY * wkv_sigmoid(float(w_raw[idx])));
                tk[i] = float(k[idx]);
                tal[i] = -kk_i;
                tbe[i] = kk_i * float(a[idx]);
                const float v_i = float(v[idx]);
                threadgroup_barrier(mem_flags::mem_threadgroup);
                wkv_row_update<N>(s, tw, tk, tal, tbe, v_i);
                device float* dst = scr + (t - t0 + 1) * N * N;
                for (int j = 0; j < N; ++j) dst[j * N + i] = s[j];
            }
        }
        // Other threads read these scratch rows by column below: make the writes visible.
        threadgroup_barrier(mem_flags::mem_device);
        for (int t = t1 - 1; t >= t0; --t) {
            const uint idx = ((b * T + t) * H + h) * N + i;
            const uint qdx = ((b * T + t) * HQ + h) * N + i;
            const device float* prev = scr + (t - t0) * N * N;
            const device float* cur = prev + N * N;
            threadgroup_barrier(mem_flags::mem_threadgroup);
            const float w_raw_i = float(w_raw[idx]);
            const float kk_i = float(kk[idx]);
            const float a_i = float(a[idx]);
            const float sig_i = wkv_sigmoid(w_raw_i);
            const float w_i = metal::exp(WKV_DECAY * sig_i);
            const float v_i = float(v[idx]);
            const float do_i = float(dout[qdx]);
            tq[i] = float(q[qdx]);
            tw[i] = w_i;
            tk[i] = float(k[idx]);
            tal[i] = -kk_i;
            tbe[i] = kk_i * a_i;
            t_do[i] = do_i;
            t_v[i] = v_i;
            threadgroup_barrier(mem_flags::mem_threadgroup);

            // Row phase.
            float sa = 0.0f;
            for (int j = 0; j < N; ++j) sa += prev[j * N + i] * tal[j];
            float dsa = 0.0f, dv_acc = 0.0f;
            for (int j = 0; j < N; ++j) {
                const float g = ds[j] + do_i * tq[j];
                tile[i][j] = g;
                dsa += g * tbe[j];
                dv_acc += g * tk[j];
                ds[j] = g;
            }
            for (int j = 0; j < N; ++j) ds[j] = ds[j] * tw[j] + dsa * tal[j];
            t_sa[i] = sa;
            t_dsa[i] = dsa;
            dv[qdx] = InT(dv_acc);
            threadgroup_barrier(mem_flags::mem_threadgroup);

            // Column phase: thread i now stands for key index j = i.
            const device float* prev_col = prev + i * N;
            const device float* cur_col = cur + i * N;
            float dq_acc = 0.0f, dw_acc = 0.0f, dbeta = 0.0f, dk_acc = 0.0f, dalpha = 0.0f;
            for (int r = 0; r < N; ++r) {
                const float g = tile[r][i];
                const float sp = prev_col[r];
                dq_acc += cur_col[r] * t_do[r];
                dw_acc += g * sp;
                dbeta += g * t_sa[r];
                dk_acc += g * t_v[r];
                dalpha += t_dsa[r] * sp;
            }
            dq[qdx] = InT(dq_acc);
            dw_raw[qdx] = InT(dw_acc * w_i * WKV_DECAY * sig_i * (1.0f - sig_i));
            dk[qdx] = InT(dk_acc);
            dkk[qdx] = InT(dbeta * a_i - dalpha);
            da[qdx] = InT(dbeta * kk_i);
        }
    }
    for (int j = 0; j < N; ++j) dS0[row + j] = ds[j];
"""

KERNEL_SOURCES: dict[str, tuple[str, str]] = {
    "wkv7_step": (_HEADER, _STEP),
    "wkv7_state_read": (_HEADER, _STATE_READ),
    "wkv7_fwd": (_HEADER, _WKV7_FWD),
    "wkv7_read": (_HEADER, _WKV7_READ),
    "wkv7_bwd": (_HEADER, _WKV7_BWD),
}

KERNEL_IO: dict[str, tuple[list[str], list[str]]] = {
    "wkv7_step": (["S", "r", "w_raw", "k", "v", "kk", "a"], ["y", "S_out"]),
    "wkv7_state_read": (["S", "q"], ["z"]),
    "wkv7_fwd": (["r", "w_raw", "k", "v", "kk", "a", "S0"], ["y", "S_T", "states"]),
    "wkv7_read": (["w_raw", "k", "v", "kk", "a", "q", "states"], ["z"]),
    "wkv7_bwd": (["q", "w_raw", "k", "v", "kk", "a", "states", "dout", "dS_end"],
                 ["dq", "dw_raw", "dk", "dv", "dkk", "da", "dS0", "scratch"]),
}


# ---------------------------------------------------------------------------------------
# Dispatch.

@functools.lru_cache(maxsize=None)
def _kernel(name: str, header: str, source: str, inputs: tuple, outputs: tuple):
    """Build a kernel object once; MLX compiles one library per template instance."""
    return mx.fast.metal_kernel(name=name, input_names=list(inputs), output_names=list(outputs),
                                source=source, header=header)


def launcher(sources: dict, io: dict):
    """The `_launch` of a module whose Metal kernels are `sources` (name -> (header, source))
    and `io` (name -> (input names, output names)); twin of tests/metal_harness's mlx_launch."""
    def launch(name, inputs, *, template, grid, threadgroup, output_shapes, output_dtypes,
               init_value=None):
        if not mx.metal.is_available():
            raise MetalKernelError("the Metal kernels need Apple silicon: mx.metal.is_available() is False")
        kernel = _kernel(name, *sources[name], *map(tuple, io[name]))
        return kernel(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                      output_shapes=output_shapes, output_dtypes=output_dtypes, init_value=init_value)
    return launch


# Run kernel `name` (the arguments of an mx.fast.metal_kernel call). Tests swap this function
# for the CPU harness; everything else in this module runs unchanged.
_launch = launcher(KERNEL_SOURCES, KERNEL_IO)


def _check_vectors(names, arrays, shape):
    for n, x in zip(names, arrays):
        if tuple(x.shape) != tuple(shape):
            raise MetalKernelError(f"{n} has shape {tuple(x.shape)}, expected {tuple(shape)}")
        if not mx.issubdtype(x.dtype, mx.floating):
            raise MetalKernelError(f"{n} has dtype {x.dtype}, expected a float dtype")


def _head_size(N):
    if not 1 <= N <= MAX_HEAD_SIZE:
        raise MetalKernelError(f"head size {N} is outside [1, {MAX_HEAD_SIZE}]")
    return N


def metal_wkv7_step(S, r, w_raw, k, v, kk, a):
    """Decode one token. S [B, H, N, N] (float32), r..a [B, H, N] (any float dtype).

    Returns y [B, H, N] (dtype of r) and the new state S_new [B, H, N, N] float32.
    """
    B, H, N = r.shape
    _head_size(N)
    _check_vectors("r w_raw k v kk a".split(), (r, w_raw, k, v, kk, a), (B, H, N))
    if tuple(S.shape) != (B, H, N, N):
        raise MetalKernelError(f"S has shape {tuple(S.shape)}, expected {(B, H, N, N)}")
    dt = r.dtype
    vecs = [x.astype(dt) for x in (r, w_raw, k, v, kk, a)]
    y, S_new = _launch("wkv7_step", [S.astype(mx.float32), *vecs],
                       template=[("N", N), ("InT", dt)], grid=(N, H, B), threadgroup=(N, 1, 1),
                       output_shapes=[(B, H, N), (B, H, N, N)], output_dtypes=[dt, mx.float32])
    return y, S_new


def metal_state_read(S, q):
    """SSE readout of a decode step: z = S q for the first K heads.

    S [B, H, N, N] float32, q [B, K, N] with K <= H. Returns z [B, K, N] (dtype of q).
    """
    B, K, N = q.shape
    _head_size(N)
    if S.ndim != 4 or S.shape[0] != B or S.shape[1] < K or S.shape[2:] != (N, N):
        raise MetalKernelError(f"S has shape {tuple(S.shape)}, expected ({B}, >= {K}, {N}, {N})")
    (z,) = _launch("wkv7_state_read", [S.astype(mx.float32), q],
                   template=[("N", N), ("InT", q.dtype)], grid=(N, K, B), threadgroup=(N, 1, 1),
                   output_shapes=[(B, K, N)], output_dtypes=[q.dtype])
    return z


def _bwd(q, w_raw, k, v, kk, a, states, dout, dS_end, C):
    """Gradients of sum(dout * S_t q_t) (+ <dS_end, S_T>) for the first HQ heads."""
    B, T, HQ, N = q.shape
    dt = q.dtype
    return _launch(
        "wkv7_bwd", [q, w_raw, k, v, kk, a, states, dout.astype(dt), dS_end.astype(mx.float32)],
        template=[("N", N), ("C", C), ("InT", dt)], grid=(N, HQ, B), threadgroup=(N, 1, 1),
        output_shapes=[(B, T, HQ, N)] * 6 + [(B, HQ, N, N), (B, HQ, C + 1, N, N)],
        output_dtypes=[dt] * 6 + [mx.float32, mx.float32])


@functools.lru_cache(maxsize=None)
def _sequence_ops(C: int):
    """The forward and readout of the sequence as mx.custom_function's with Metal VJPs."""

    @mx.custom_function
    def forward(r, w_raw, k, v, kk, a, S0):
        B, T, H, N = r.shape
        n_seg = -(-T // C)
        return tuple(_launch(
            "wkv7_fwd", [r, w_raw, k, v, kk, a, S0],
            template=[("N", N), ("C", C), ("InT", r.dtype)], grid=(N, H, B), threadgroup=(N, 1, 1),
            output_shapes=[(B, T, H, N), (B, H, N, N), (B, H, n_seg, N, N)],
            output_dtypes=[r.dtype, mx.float32, mx.float32]))

    @forward.vjp
    def forward_vjp(primals, cotangents, outputs):
        r, w_raw, k, v, kk, a, S0 = primals
        dy, dS_T, _ = cotangents            # `states` feeds the readout only through stop_gradient
        dr, dw, dk, dv, dkk, da, dS0, _ = _bwd(r, w_raw, k, v, kk, a, outputs[2], dy, dS_T, C)
        return dr, dw, dk, dv, dkk, da, dS0.astype(S0.dtype)

    @mx.custom_function
    def read(w_raw, k, v, kk, a, S0, q, states):
        B, T, K, N = q.shape
        n_seg = states.shape[2]
        (z,) = _launch(
            "wkv7_read", [w_raw, k, v, kk, a, q, states],
            template=[("N", N), ("C", C), ("InT", q.dtype)], grid=(N, K, B * n_seg),
            threadgroup=(N, 1, 1), output_shapes=[(B, T, K, N)], output_dtypes=[q.dtype])
        return z

    @read.vjp
    def read_vjp(primals, cotangents, outputs):
        dz = cotangents[0] if isinstance(cotangents, (list, tuple)) else cotangents
        w_raw, k, v, kk, a, S0, q, states = primals
        B, T, K, N = q.shape
        H = w_raw.shape[2]
        dS_end = mx.zeros((B, K, N, N), mx.float32)
        dq, dw, dk, dv, dkk, da, dS0, _ = _bwd(q, w_raw, k, v, kk, a, states, dz, dS_end, C)

        def pad(g, like):   # heads K..H get no gradient from this readout
            if K == H:
                return g.astype(like.dtype)
            return mx.concatenate([g.astype(like.dtype),
                                   mx.zeros(like.shape[:2] + (H - K,) + like.shape[3:], like.dtype)], 2)

        return (pad(dw, w_raw), pad(dk, k), pad(dv, v), pad(dkk, kk), pad(da, a),
                mx.concatenate([dS0, mx.zeros((B, H - K, N, N), mx.float32)], 1).astype(S0.dtype)
                if K < H else dS0.astype(S0.dtype),
                dq, mx.zeros_like(states))

    return forward, read


def metal_wkv7(r, w_raw, k, v, kk, a, S0, *, save_every: int = SAVE_EVERY):
    """WKV-7 over a sequence (prefill and training), differentiable.

    r, w_raw, k, v, kk, a: [B, T, H, N] (cast to the dtype of r); S0: [B, H, N, N] float32.
    Returns y [B, T, H, N] (dtype of r), S_T [B, H, N, N] float32, and `read`:
    read(q [B, T, K, N], K <= H) -> z [B, T, K, N] = S_t q_t for the first K heads, where S_t
    is the state after token t (the SSE readout). Gradients flow to every input, q included.
    """
    if r.ndim != 4:
        raise MetalKernelError(f"r has shape {tuple(r.shape)}, expected [B, T, H, N]")
    B, T, H, N = r.shape
    _head_size(N)
    if T < 1:
        raise MetalKernelError("the sequence is empty (T = 0)")
    if not 1 <= save_every <= 1024:
        raise MetalKernelError(f"save_every must be in [1, 1024], got {save_every}")
    _check_vectors("r w_raw k v kk a".split(), (r, w_raw, k, v, kk, a), (B, T, H, N))
    if tuple(S0.shape) != (B, H, N, N):
        raise MetalKernelError(f"S0 has shape {tuple(S0.shape)}, expected {(B, H, N, N)}")
    dt = r.dtype
    vecs = [x.astype(dt) for x in (r, w_raw, k, v, kk, a)]
    forward, read_op = _sequence_ops(save_every)
    y, S_T, states = forward(*vecs, S0.astype(mx.float32))
    states = mx.stop_gradient(states)   # the readout's VJP recomputes through S0 and the inputs

    def read(q):
        if q.ndim != 4 or q.shape[:2] != (B, T) or q.shape[3] != N or not 1 <= q.shape[2] <= H:
            raise MetalKernelError(f"q has shape {tuple(q.shape)}, expected ({B}, {T}, K <= {H}, {N})")
        return read_op(*vecs[1:], S0.astype(mx.float32), q.astype(dt), states)

    return y, S_T, read
