"""RWKV-7-like WKV inputs shared by the Triton kernel tests (not a test module)."""

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rwkv_inputs(B, T, H, N, g: torch.Generator, dtype=torch.float32):
    """r, w_raw, k, v, kk, a [B, T, H, N] in `dtype` (unit-norm kk, a in (0, 1), decay
    pre-activations around RWKV's init) and a non-zero S0 [B, H, N, N] float32, on DEV;
    drawn from g in a fixed order, so a caller can draw more after them."""
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    r, k, v = rnd(B, T, H, N), rnd(B, T, H, N) * 0.5, rnd(B, T, H, N)
    w_raw = rnd(B, T, H, N) * 2 - 1
    kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
    a = torch.sigmoid(rnd(B, T, H, N))
    S0 = rnd(B, H, N, N) * 0.3
    return [x.to(DEV, dtype) for x in (r, w_raw, k, v, kk, a)], S0.to(DEV)
