"""Kernels of the torch backend: the WKV scan (wkv7/), the elementwise pieces around it
(elementwise/) and the product-key parameter tokens (product_keys/), each with a plain-torch twin."""

import functools

import torch


def at_least_f32(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 kept: the plain twins compute in float32 and, given float64 inputs,
    are the tests' exact references."""
    return t if t.dtype == torch.float64 else t.float()


def first_order_only(backward):
    """For an autograd.Function whose backward runs kernels that have no backward of their own:
    a double backward (create_graph=True) raises, where it would otherwise silently leave the
    kernels' second-order terms out (torch's once_differentiable does, for a cotangent that does
    not require grad)."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():  # backward runs with grad enabled only under create_graph=True
            raise NotImplementedError(f"{backward.__qualname__.split('.')[0].lstrip('_')} has no second derivative "
                                      "(create_graph=True): use the plain-ops path (kernels='ops') for that")
        return backward(ctx, *grads)

    return checked
