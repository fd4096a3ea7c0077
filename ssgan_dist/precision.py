"""train.precision and train.channels_last: what the device may run, and in which format."""

from __future__ import annotations

import contextlib

import torch

from ssgan_dist.config import ConfigError


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, before any work, a precision the device cannot run."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC (faster convolutions on tensor-core GPUs) or torch's default NCHW."""
    return torch.channels_last if channels_last else torch.contiguous_format
