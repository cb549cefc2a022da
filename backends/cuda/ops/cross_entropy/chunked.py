"""Linear cross-entropy in row chunks: the logits of one chunk of rows at a time.

The gradients are taken in the forward pass, chunk by chunk (softmax minus one-hot, over N, then
two matmuls), so nothing of size [N, V] outlives its chunk and backward only scales them by the
incoming gradient. Same arithmetic as the naive twin and autograd through it: logits rounded to
compute_dtype, softmax in float32 (float64 kept), the logits' gradient rounded to compute_dtype
for the two matmuls.

Except in float16: there the incoming gradient carries the loss scale (GradScaler), which must
multiply the logits' gradient before it is rounded to float16 (most of softmax / N is below
float16's range), so backward computes the logits a second time, one chunk at a time.
"""

from __future__ import annotations

import torch

from metastate_core.errors import MetaStateError

from .. import first_order_only

CHUNK_LOGITS = 2**26  # logits per chunk: 256 MB in float32, a few chunks per batch at V = 65536


class CrossEntropyInputError(MetaStateError, ValueError):
    """Hidden states, head or targets that do not fit together."""


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         compute_dtype: torch.dtype | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight^T against targets, without all the logits.

    Args:
        h: [N, d] hidden states (float32 or float64).
        weight: [V, d] the head.
        targets: [N] integer token ids in [0, V).
        compute_dtype: the matmuls' dtype (None: autocast's where it is on, as a matmul there
            gets it, else the weight's).
        chunk_rows: rows per chunk (None: CHUNK_LOGITS // V).
    Returns:
        loss: [] in the dtype of h.
    """
    _check(h, weight, targets)
    V = weight.shape[0]
    rows = chunk_rows if chunk_rows is not None else max(1, CHUNK_LOGITS // V)
    if rows < 1:
        raise CrossEntropyInputError(f"chunk_rows must be at least 1, got {rows}")
    device = weight.device.type
    dt = compute_dtype or (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype)
    targets = targets.long()
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, dt, rows)
    return _forward(h, weight, targets, dt, rows, False, False)[0]


def _check(h, weight, targets):
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise CrossEntropyInputError(f"hidden states [N, d] and head [V, d] expected, got "
                                     f"{list(h.shape)} and {list(weight.shape)}")
    if targets.shape != h.shape[:1]:
        raise CrossEntropyInputError(f"targets must be [N] = [{h.shape[0]}], got {list(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise CrossEntropyInputError(f"targets must be integer token ids, got {targets.dtype}")
    if targets.device != h.device or weight.device != h.device:
        raise CrossEntropyInputError(f"hidden states, head and targets must be on one device, got "
                                     f"{h.device}, {weight.device} and {targets.device}")
    if h.shape[0] == 0:
        raise CrossEntropyInputError("no targets: the mean cross-entropy of nothing is undefined")
    # Checked where it costs no device sync; on a GPU an id out of range is a device-side assert,
    # as in nn.Embedding and F.cross_entropy.
    if targets.device.type == "cpu":
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise CrossEntropyInputError(f"targets must lie in [0, {weight.shape[0]}), got [{lo}, {hi}]")


def _forward(h, weight, targets, dt, rows, need_dh: bool, need_dw: bool, dloss=None):
    """(loss, dh, dweight) of the mean, the gradients times dloss (None: 1) when asked for (else
    None)."""
    N = h.shape[0]
    soft_dt = torch.float64 if dt == torch.float64 else torch.float32
    w = weight.to(dt)
    total = torch.zeros((), dtype=soft_dt, device=h.device)
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=soft_dt, device=h.device) if need_dw else None
    with torch.autocast(h.device.type, enabled=False):  # the dtypes are explicit here
        for s in range(0, N, rows):
            hc, tc = h[s:s + rows].to(dt), targets[s:s + rows]
            logits = (hc @ w.T).to(soft_dt)                            # [c, V]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None])[:, 0]).sum()
            if need_dh or need_dw:
                p = logits.sub_(lse[:, None]).exp_()                   # softmax, in place
                p[torch.arange(len(tc), device=p.device), tc] -= 1.0
                p = p.div_(N) if dloss is None else p.mul_(dloss / N)
                g = p.to(dt)                                           # d mean / d logits
                if need_dh:
                    dh[s:s + rows] = g @ w
                if need_dw and dt == soft_dt:
                    dw.addmm_(g.T, hc)
                elif need_dw:  # a bf16/fp16 matmul, summed over chunks in float32
                    dw += (g.T @ hc).to(soft_dt)
    return (total / N).to(h.dtype), dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, dt, rows):
        need_dh, need_dw = ctx.needs_input_grad[:2]
        ctx.recompute = (dt, rows) if dt == torch.float16 else None  # the module docstring says why
        if ctx.recompute:
            ctx.save_for_backward(h, weight, targets)
            return _forward(h, weight, targets, dt, rows, False, False)[0]
        loss, dh, dw = _forward(h, weight, targets, dt, rows, need_dh, need_dw)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    @first_order_only
    def backward(ctx, dloss):
        need_dh, need_dw = ctx.needs_input_grad[:2]
        if ctx.recompute:
            h, weight, targets = ctx.saved_tensors
            _, dh, dw = _forward(h, weight, targets, *ctx.recompute, need_dh, need_dw, dloss.float())
            return dh, dw.to(weight.dtype) if dw is not None else None, None, None, None
        dh, dw = ctx.saved_tensors
        dh = dh * dloss.to(dh.dtype) if dh is not None else None
        dw = (dw * dloss.to(dw.dtype)).to(ctx.weight_dtype) if dw is not None else None
        return dh, dw, None, None, None
