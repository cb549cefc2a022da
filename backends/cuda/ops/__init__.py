"""Kernels of the torch backend: the WKV scan (wkv7/) and the elementwise pieces around it
(elementwise/), each with a plain-torch twin."""

import torch


def at_least_f32(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 kept: the plain twins compute in float32 and, given float64 inputs,
    are the tests' exact references."""
    return t if t.dtype == torch.float64 else t.float()
