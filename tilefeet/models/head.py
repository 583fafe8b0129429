"""The output activation, compiled into the network so every backend returns probabilities."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class WithActivation(nn.Module):
    """``activation(net(x))`` with ``activation`` one of ``sigmoid``, ``softmax`` (over channels) or
    ``none`` (the network's output already is probabilities: an imported network that ends in its
    own activation)."""

    def __init__(self, net: nn.Module, activation: str):
        super().__init__()
        if activation not in ("sigmoid", "softmax", "none"):
            raise ValueError(f"unknown activation {activation!r}")
        self.net = net
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if self.activation == "sigmoid":
            return torch.sigmoid(y)
        return torch.softmax(y, dim=1) if self.activation == "softmax" else y

    def train(self, mode: bool = True) -> WithActivation:
        """Also for a ``torch.export`` program's module, which refuses ``train``/``eval`` (its mode
        was fixed when it was exported: tilefeet exports in eval mode)."""
        self.training = mode
        with contextlib.suppress(NotImplementedError):
            self.net.train(mode)
        return self
