"""The output activation, compiled into the network so every backend returns probabilities."""

from __future__ import annotations

import torch
from torch import nn


class WithActivation(nn.Module):
    """``activation(net(x))`` with ``activation`` one of ``sigmoid`` or ``softmax`` (over channels)."""

    def __init__(self, net: nn.Module, activation: str):
        super().__init__()
        self.net = net
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return torch.sigmoid(y) if self.activation == "sigmoid" else torch.softmax(y, dim=1)
