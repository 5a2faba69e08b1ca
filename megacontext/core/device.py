"""Device and dtype selection: the one place where MegaContext decides where tensors live.

Library code never picks a device itself; it takes device/dtype from its inputs (the base model's
parameters, or the tensors it is given). Entry points (CLI, API, benchmarks) call
:func:`select_device` / :func:`select_dtype` once and log the choice.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def select_device(name: str | None = None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU. Anything else is parsed by torch."""
    if name in (None, "", "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise ValueError(
                f"device={name!r} is not a valid torch device (expected 'auto', 'cpu', 'cuda', 'cuda:N')"
            ) from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={name!r} requested but CUDA is not available on this machine")
    return dev


def select_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" -> bf16 on CUDA, fp32 on CPU (bf16 matmuls on CPU are slow and lossy)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r} is not supported (expected one of auto, {', '.join(sorted(_DTYPES))})")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def log_placement(what: str, device: torch.device, dtype: torch.dtype) -> None:
    log.info("%s on %s (%s)", what, device, dtype_name(dtype))
