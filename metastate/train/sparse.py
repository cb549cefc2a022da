"""Row-sparse value tables (product mode, SPEC section 7): a step reads P*k of the m*m value
rows per token, and the gradient of `meta.param_values` is a sparse COO tensor of those rows.
Everything here touches only them, so that a step's time and the optimizer's memory do not grow
with the table:

    reduce_rows   the gradient coalesced and, with W > 1 ranks, averaged over them by an all-gather
                  of each rank's touched rows and their indices (works on gloo and NCCL alike)
    clip_norm     global gradient-norm clipping over dense gradients and the sparse rows together
    RowAdam       the tables' optimizer: one second moment per row, decayed lazily

RowAdam (FBGEMM's row-wise idea for huge embedding tables, without a first moment). Per table
[n, d] it keeps exp_avg_sq [n] float32 (the running mean over steps of the row's mean squared
gradient) and last [n] int32 (the step that last touched the row): 8 bytes a row, 2/d of the
table (Adam's two full moments would be 2x the table). A row read at step t after last at step s:

    v   <- beta2^(t - s) v + (1 - beta2) mean(g^2)      what Adam's v would be with g = 0 between
    row <- row (1 - lr wd) - lr g / (sqrt(v / (1 - beta2^t)) + eps)

Untouched rows, their v and their `last` stay bit-identical; in particular weight decay (decoupled)
reaches a row only on the steps that read it: a row unread for many steps is not shrunk for them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def reduce_rows(params: list[torch.Tensor], world: int) -> None:
    """Each sparse gradient coalesced (accumulation concatenates entries) and, when world > 1,
    replaced by its mean over the ranks, the same on every rank."""
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.coalesce()
        if world > 1:
            g = _all_mean(g, world)
        p.grad = g


def _all_mean(g: torch.Tensor, world: int) -> torch.Tensor:
    rows, vals = g._indices()[0], g._values()
    count = torch.tensor([rows.numel()], device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    pad = max(counts) - rows.numel()  # all_gather wants equal sizes: pad, then cut each rank's own
    rows = torch.cat([rows, rows.new_zeros(pad)])
    vals = torch.cat([vals, vals.new_zeros(pad, vals.shape[1])])
    all_rows, all_vals = [torch.empty_like(rows) for _ in range(world)], [torch.empty_like(vals) for _ in range(world)]
    dist.all_gather(all_rows, rows)
    dist.all_gather(all_vals, vals)
    rows = torch.cat([r[:c] for r, c in zip(all_rows, counts)])
    vals = torch.cat([v[:c] for v, c in zip(all_vals, counts)]) / world
    return torch.sparse_coo_tensor(rows[None], vals, g.shape).coalesce()


def clip_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over every gradient, a sparse one (coalesced) counting its rows; returns the
    norm before clipping (max_norm inf: measured only)."""
    if not any(p.grad is not None and p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad._values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as clip_grad_norm_
    torch._foreach_mul_(grads, coef)
    return norm


class RowAdam(torch.optim.Optimizer):
    """The value tables' optimizer (module docstring). Gradients: coalesced sparse [n, d] COO."""

    def __init__(self, params, lr: float, beta2: float, eps: float, weight_decay: float):
        super().__init__(params, dict(lr=lr, beta2=beta2, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def new_state(p: torch.Tensor) -> dict:
        return {"step": torch.zeros((), dtype=torch.float32),
                "exp_avg_sq": torch.zeros(p.shape[0], dtype=torch.float32, device=p.device),
                "last": torch.zeros(p.shape[0], dtype=torch.int32, device=p.device)}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, b2, eps, wd = group["lr"], group["beta2"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] or self.new_state(p)
                self.state[p] = state
                state["step"] += 1
                t = int(state["step"])
                g = p.grad.coalesce()
                rows, g = g._indices()[0], g._values().float()
                decay = torch.pow(b2, (t - state["last"][rows]).float())  # steps since the row was last read
                v = state["exp_avg_sq"][rows].mul_(decay).add_(torch.linalg.vecdot(g, g), alpha=(1 - b2) / g.shape[1])
                state["exp_avg_sq"].index_copy_(0, rows, v)
                state["last"].index_fill_(0, rows, t)
                denom = v.div_(1 - b2 ** t).sqrt_().add_(eps)
                new = p[rows].float().mul_(1 - lr * wd).addcdiv_(g, denom[:, None], value=-lr)
                p.index_copy_(0, rows, new.to(p.dtype))
