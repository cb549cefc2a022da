"""The elementwise pieces around the WKV scan (token shift, the keys kk and k', GroupNorm + bonus
+ gate, SSE normalisation, relu^2): plain torch in naive.py (the "ops" path and the test twins),
fused Triton kernels in fused.py (the "triton" path). Same names, same signatures.

Triton is imported only when `fused` is asked for, so the plain path runs without it (macOS).
"""

from . import naive

__all__ = ["naive"]
