"""Device and mixed precision: one autocast context and one grad scaler, no ifs in the loop."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from foldtune.config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device is '{name}' but no CUDA device is visible; use 'auto' or 'cpu'")
    return device


@dataclass
class Precision:
    """autocast() is a no-op context in fp32; the scaler is a pass-through unless fp16."""

    name: str
    device_type: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name == "auto":
        if device.type != "cuda":
            name = "fp32"
        else:
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("training.precision 'fp16' needs a CUDA device; use 'auto', 'bf16' or 'fp32'")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    # Only fp16 gradients underflow; bf16 has fp32's exponent range and needs no scaling.
    scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
    return Precision(name, device.type, dtype, scaler)
