"""Where the project computes and in what precision: the device a command asked for, whether it multiplies
bf16 natively, the autocast that every stage, sampling and the benches use, and (``devices.flops``) the
machine's measured matmul peak and a step's counted FLOPs."""

from __future__ import annotations

import torch

from cli import UserError

__all__ = ["resolve_device", "native_bf16", "autocast_dtype", "autocast"]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is one; asking for CUDA without one is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: CUDA with bf16 support, or a CPU with AMX tiles or
    AVX512-BF16's bf16 dot products (elsewhere CPU bf16 is emulated and slower than fp32). Hardware bf16 is not
    always the faster choice for a small model (training's ``--precision auto`` times both)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(probe is not None and bool(probe()) for probe in probes)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device``: bfloat16, or None for plain fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed precision in ``dtype`` on ``device`` (weights, optimizer and losses stay fp32), or off for None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
