"""FLOP accounting: the machine's matmul peak, measured in the same run, and a step's FLOPs, counted.

The peak is the best of several timed square matmuls (the ceiling a transformer's linear layers can
reach on this device and dtype). A step's FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``
over one real forward and backward, so attention and the output head are counted exactly rather than
estimated with 6N.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["matmul_peak_flops", "count_flops", "synchronize"]


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      n: int | None = None, seconds: float = 1.0) -> float:
    """FLOP/s of the fastest of repeated (n x n) @ (n x n) matmuls on ``device`` in ``dtype``."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm up
        a @ b
    synchronize(device)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of ``step`` (forward and backward inside it are both counted)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()
