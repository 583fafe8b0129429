"""The torch runner: eager by default; channels-last memory (oneDNN and cuDNN run 3×3 convolutions
much faster that way), reduced precision on request."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from . import Runner, RunnerSpec, resolve_device

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, bundle: Any, spec: RunnerSpec):
        super().__init__(bundle, spec)
        self._device = resolve_device(spec.device)
        self.dtype = _DTYPES.get(spec.precision)
        if self.dtype is None:
            raise ConfigError(f"unknown precision {spec.precision!r}; use fp32, fp16 or bf16")
        if self.dtype == torch.float16 and self._device.type == "cpu":
            raise ConfigError("fp16 is not supported by torch on the CPU; use --precision fp32 or bf16")
        self.channels_last = bool(spec.option("channels_last", True))
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        model = bundle.build_model().to(self._device, dtype=self.dtype, memory_format=self.memory_format)
        self.model = model

    @property
    def device(self) -> torch.device:
        return self._device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = batch.to(self._device, dtype=self.dtype, memory_format=self.memory_format)
            return self.model(x).float()
