"""The numbers every backend shares (SPEC sections 1 and 2), each defined here and only here.

Kernels take them from here too: Triton as `tl.constexpr(DECAY_SCALE)`, Metal sources as
text formatted from these values, so a kernel cannot drift from the reference.
"""

from __future__ import annotations

from .errors import MetaStateError

DECAY_SCALE = -0.6065306597126334  # -exp(-0.5): w = exp(DECAY_SCALE * sigmoid(w_raw)) lies in (0.545, 1)
LN_EPS = 1e-5                      # LayerNorm (ln0, ln1, ln2, ln_out)
LN_X_EPS = 64e-5                   # GroupNorm (ln_x) default: the official runtime's at every head size
L2_EPS = 1e-12                     # kk = x / max(|x|, L2_EPS) (F.normalize's default)
MAX_CHUNK = 64                     # longest WKV chunk: 1 / prod(w) < exp(0.6065 * 64) ~ 7e16 stays finite in float32
PREFILL_STEP = 512                 # prompt tokens per model call: prefill memory flat in the prompt length

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # weights on disk and in the torch / MLX models

# The kernels each backend offers besides "auto" (chosen once, when a model is built or loaded).
KERNELS = {"numpy": ("ops",), "torch": ("ops", "triton"), "mlx": ("ops", "metal")}


class KernelChoiceError(MetaStateError, ValueError):
    """Kernels that a backend does not have, or that cannot run here."""


def check_kernels(backend: str, kernels) -> str:
    """`kernels` if `backend` offers it ("auto" always), else KernelChoiceError."""
    offered = ("auto", *KERNELS[backend])
    if kernels not in offered:
        raise KernelChoiceError(f"kernels {kernels!r} are not available on the {backend} backend "
                                f"(use {', '.join(offered)})")
    return kernels
