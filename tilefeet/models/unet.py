"""A plain 2-D U-Net (Ronneberger et al. 2015) sized for whole-section inference.

``depth`` 2×2 max-pools make the tile-size divisor ``2**depth``; ``padding=1`` convolutions keep
shapes, so a tile of any divisible size maps to a probability map of the same size. The analytic
receptive field and FLOPs per pixel below are what the engine bundle and the benchmarks report.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class ConvBlock(nn.Module):
    """Two 3×3 conv → batch norm → ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1: nn.Module = nn.BatchNorm2d(c_out)  # nn.Identity once fused
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2: nn.Module = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(x)))

    def fuse(self) -> None:
        """Fold the batch norms into the convolutions (inference only: saves two passes over memory)."""
        if isinstance(self.bn1, nn.BatchNorm2d) and isinstance(self.bn2, nn.BatchNorm2d):
            self.conv1 = fuse_conv_bn_eval(self.conv1, self.bn1)
            self.conv2 = fuse_conv_bn_eval(self.conv2, self.bn2)
            self.bn1, self.bn2 = nn.Identity(), nn.Identity()


class UNet2d(nn.Module):
    """U-Net with ``depth`` down-sampling steps and ``base_channels`` doubling per level."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 16, depth: int = 4):
        super().__init__()
        self.depth = depth
        chans = [base_channels * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList()
        c_prev = in_channels
        for c in chans[:-1]:
            self.down.append(ConvBlock(c_prev, c))
            c_prev = c
        self.pool = nn.MaxPool2d(2)
        self.bottom = ConvBlock(chans[-2], chans[-1])
        self.upconv = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth)))
        self.up = nn.ModuleList(ConvBlock(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for upconv, block, skip in zip(self.upconv, self.up, reversed(skips)):
            x = block(torch.cat([upconv(x), skip], dim=1))
        return self.head(x)

    def fuse(self) -> UNet2d:
        """Fold batch norms for inference; returns ``self`` (which must be in eval mode)."""
        assert not self.training, "fuse() is for inference: call .eval() first"
        for m in self.modules():
            if isinstance(m, ConvBlock):
                m.fuse()
        return self


def unet_receptive_field(depth: int) -> int:
    """Receptive field (pixels, one axis) of :class:`UNet2d`: the path through the bottleneck.

    Each level ``l`` adds two 3×3 convs going down (4·2^l) and coming up (4·2^l), and a 2×2 pool
    (2^l); the bottleneck adds 4·2^depth; 2×2 stride-2 transposed convs add nothing.
    """
    rf = 1
    for level in range(depth):
        rf += 4 * 2**level + 2**level + 4 * 2**level
    return rf + 4 * 2**depth


def unet_flops_per_pixel(in_channels: int, out_channels: int, base_channels: int, depth: int) -> float:
    """Multiply-adds × 2 per input pixel of one forward pass (convs only; pools and ReLUs are noise)."""
    chans = [base_channels * 2**level for level in range(depth + 1)]
    flops = 0.0
    c_prev = in_channels
    for level, c in enumerate(chans[:-1]):
        flops += 2 * 9 * (c_prev * c + c * c) / 4**level
        c_prev = c
    flops += 2 * 9 * (chans[-2] * chans[-1] + chans[-1] ** 2) / 4**depth
    for level in reversed(range(depth)):
        c = chans[level]
        flops += 2 * 4 * chans[level + 1] * c / 4 ** (level + 1)  # 2×2 transposed conv, per coarse pixel
        flops += 2 * 9 * (2 * c * c + c * c) / 4**level
    flops += 2 * chans[0] * out_channels
    return flops


class UNet2dProbabilities(nn.Module):
    """:class:`UNet2d` followed by its output activation: the architecture that bioimage.io packages
    of earlier tilefeet versions name for their ``pytorch_state_dict`` weights (kept so that those
    packages still run; packages now carry TorchScript and ONNX, which need no tilefeet code). Its
    state dict is the U-Net's under ``net.``."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 16, depth: int = 4,
                 activation: str = "sigmoid"):
        super().__init__()
        from .head import WithActivation

        self.net = UNet2d(in_channels, out_channels, base_channels, depth)
        self._head = WithActivation(nn.Identity(), activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self.net(x))
