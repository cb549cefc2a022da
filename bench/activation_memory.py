"""Activation memory of a training step: what autograd keeps for backward, per token per layer.

    python bench/activation_memory.py --size 768,2 [--kernels ops|triton] [--autocast] [--plain-elementwise]
    TRITON_INTERPRET=1 python bench/activation_memory.py --kernels triton --autocast   # on a CPU

Counts the tensors saved for backward (torch.autograd.graph.saved_tensors_hooks), each storage
once, parameters left out, during one forward of the model with its loss (as the trainer runs
it), at two sequence lengths; the difference divided by the extra tokens and the layers is the
cost of one more token in one layer. Per-step constants (the bfloat16 copies autocast makes of
the weights) cancel. Rows group the saved tensors by the line of backends/ that saved them.
Exact bytes on any device, so it runs on a CPU; a GPU's peak memory adds the allocator's and
the backward pass's own temporaries.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.cuda.model import Model  # noqa: E402
from metastate_core.config import ModelConfig  # noqa: E402
from metastate_core.params import init_params  # noqa: E402

BACKENDS = str(Path(__file__).resolve().parents[1] / "backends")


def _saver() -> str:
    """The innermost line of backends/ on the stack: what saved the tensor."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(BACKENDS):
            return f"{Path(frame.filename).name}:{frame.lineno} {(frame.line or '').strip()[:60]}"
    return "?"


def saved_bytes(model: Model, T: int, autocast: bool) -> dict[str, int]:
    """Bytes kept for backward by one forward + loss over [1, T] tokens, by saving line."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, str]] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (storage.nbytes(), _saver())
        return t

    device = model.head.weight.device
    tokens = torch.randint(0, model.cfg.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss, _ = model(tokens[:, :-1], targets=tokens[:, 1:])
    del loss
    by_line: dict[str, int] = collections.Counter()
    for nbytes, line in seen.values():
        by_line[line] += nbytes
    return by_line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="768,2", metavar="D,L", help="d_model, layers (head size 64)")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--kernels", default="ops", choices=("ops", "triton"))
    p.add_argument("--autocast", action="store_true", help="bfloat16 autocast, float32 weights (the trainer on a GPU)")
    p.add_argument("--plain-elementwise", action="store_true", help="with triton: plain torch elementwise pieces")
    p.add_argument("--lengths", default="32,64", metavar="T1,T2", help="the two sequence lengths")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    d, L = (int(x) for x in args.size.split(","))
    T1, T2 = (int(x) for x in args.lengths.split(","))
    if not 0 < T1 < T2:
        p.error("--lengths needs 0 < T1 < T2")
    cfg = ModelConfig(vocab_size=args.vocab, d_model=d, n_layer=L, head_size=64)
    model = Model.from_tensors(cfg, init_params(cfg, 0), device=args.device, dtype=torch.float32)
    model.set_kernels(args.kernels, fused=False if args.plain_elementwise else None)
    small, large = (saved_bytes(model, T, args.autocast) for T in (T1, T2))
    scale = 1 / ((T2 - T1) * L * 1024)
    rows = sorted(((large.get(k, 0) - small.get(k, 0)) * scale, k) for k in set(small) | set(large))
    total = sum(kb for kb, _ in rows)
    print(f"d_model {d}, {L} layers, kernels={args.kernels}{', bf16 autocast' if args.autocast else ''}"
          f"{', plain elementwise' if args.plain_elementwise else ''}: {total:.1f} KB per token per layer "
          f"kept for backward (embedding, final norm and loss shared out over the layers)\n")
    print("| KB / token / layer | saved at |\n|---:|---|")
    for kb, line in reversed(rows):
        if abs(kb) >= 0.05:
            print(f"| {kb:.2f} | `{line}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
