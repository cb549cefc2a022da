"""Input checks of the product-key ops (naive.py and fused.py), one error type. No Triton here."""

from __future__ import annotations

import torch

from metastate_core.errors import MetaStateError

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MAX_TOKENS = 2**31 - 1  # t = i*m + j and the selection's tie-break key hold a token in 31 bits


class ProductKeysInputError(MetaStateError, ValueError):
    """Inputs of the product-key ops with the wrong shape, dtype, device or range."""


def check_select(u: torch.Tensor, sub_keys: torch.Tensor, topk: int) -> None:
    """u [B, T, d], sub_keys [P, 2, m, d/2], 1 <= topk <= m*m."""
    if sub_keys.dim() != 4 or sub_keys.shape[1] != 2 or 0 in sub_keys.shape:
        raise ProductKeysInputError(f"sub_keys must be [P, 2, m, d/2], got {list(sub_keys.shape)}")
    P, _, m, h = sub_keys.shape
    if u.dim() != 3 or u.shape[-1] != 2 * h:
        raise ProductKeysInputError(f"u must be [B, T, {2 * h}] for sub_keys {list(sub_keys.shape)}, got {list(u.shape)}")
    if u.dtype not in FLOATS or sub_keys.dtype not in FLOATS:
        raise ProductKeysInputError(f"u and sub_keys must be floating point, got {u.dtype} and {sub_keys.dtype}")
    if u.device != sub_keys.device:
        raise ProductKeysInputError(f"u is on {u.device}, sub_keys on {sub_keys.device}")
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= m * m:
        raise ProductKeysInputError(f"topk must be an integer in [1, m*m = {m * m}], got {topk!r}")
    if m * m > MAX_TOKENS:
        raise ProductKeysInputError(f"m*m = {m * m} parameter tokens exceed the {MAX_TOKENS} a token id holds")


def check_rows(values: torch.Tensor, token: torch.Tensor, weight: torch.Tensor) -> None:
    """values [n, d], token [B, T, P, k] int64/int32 in [0, n), weight [B, T, P, k] float."""
    if values.dim() != 2 or values.dtype not in FLOATS:
        raise ProductKeysInputError(f"values must be a floating-point [n, d] table, got {values.dtype} "
                                    f"{list(values.shape)}")
    if token.dim() != 4 or token.dtype not in (torch.int64, torch.int32):
        raise ProductKeysInputError(f"token must be int64/int32 [B, T, P, k], got {token.dtype} {list(token.shape)}")
    if weight.shape != token.shape or weight.dtype not in FLOATS:
        raise ProductKeysInputError(f"weight must be a floating-point tensor shaped like token "
                                    f"{list(token.shape)}, got {weight.dtype} {list(weight.shape)}")
    if not values.device == token.device == weight.device:
        raise ProductKeysInputError(f"values, token and weight are on {values.device}, {token.device}, "
                                    f"{weight.device}: one device")
    # An index past the table is a device-side fault on CUDA. The check waits for the GPU, so it
    # is skipped while a CUDA graph is captured (the model's own tokens come from select).
    if token.numel() and not (token.is_cuda and torch.cuda.is_current_stream_capturing()):
        lo, hi = torch.aminmax(token)
        if lo < 0 or hi >= values.shape[0]:
            raise ProductKeysInputError(f"token ids must be in [0, {values.shape[0]}), got ids from {int(lo)} "
                                        f"to {int(hi)}")
