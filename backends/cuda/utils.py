"""Loading a model directory into the torch model (the twin of backends/mlx/utils.py)."""

from __future__ import annotations

from pathlib import Path

from .model import Model


def load_model(path, device="cpu", dtype=None, *, kernels="auto", freeze_sse_gate: bool = False,
               layout: str = "auto") -> Model:
    """A model directory (SPEC section 4) -> Model on `device`; dtype None keeps the file's.
    kernels: as for `Model.set_kernels`. layout: as for `Model.set_layout` ("auto": the decode
    layout on a CPU; "canonical" to train the model). An MLX-quantized directory is
    dequantized to float32 as it loads (torch's CPU int8 kernels do not take MLX's groups of
    scale and bias exactly: weights/quantized.py)."""
    from weights.quantized import load_dequantized

    cfg, tensors = load_dequantized(Path(path))
    model = Model.from_tensors(cfg, tensors, device=device, dtype=dtype, kernels=kernels,
                               freeze_sse_gate=freeze_sse_gate, share=True)  # the arrays are ours alone
    model.set_layout(layout)
    return model
