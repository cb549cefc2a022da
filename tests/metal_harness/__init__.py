"""Run MLX custom Metal kernel bodies on the CPU: see runner.py."""

from .runner import HarnessError, mlx_launch, run_kernel

__all__ = ["HarnessError", "mlx_launch", "run_kernel"]
