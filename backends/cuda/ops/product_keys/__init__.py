"""Product-key parameter tokens (SPEC section 7): `select` (the score GEMMs of the two halves of
u, the exact top-k of the halves and of their candidate sums) and `weighted_rows` (the gather of
the selected value rows, weighted and summed). Plain torch in naive.py (the "ops" path and the
twins), Triton in fused.py (the "triton" path: the gather-weighted-sum forward and its
deterministic backward; select is naive.select). Same names, same signatures; input checks and
`ProductKeysInputError` in checks.py.

Triton is imported only when `fused` is asked for, so the plain path runs without it (macOS).
"""

from . import naive
from .checks import ProductKeysInputError

__all__ = ["naive", "ProductKeysInputError"]
