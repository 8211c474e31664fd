"""Q-Diffusion shortcut splitting (algorithms.md, "Quantizers"): a decoder resnet's shortcut conv consumes
cat(upsampled features, skip connection), two halves whose ranges differ by orders of magnitude. The split
gives each half its own input quantizer and its own per-channel weight scales:

    conv(cat(a, b)) = conv_a(a) + conv_b(b),   W = [W_a | W_b] along the input channels, bias in conv_a

The split is realised in the model itself (`SplitConv2d`: two Conv2d and an Add), so calibration, the
fake-quant reference and the exported graph see the same two layers, "<name>.parts.0" and "<name>.parts.1".
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class SplitConv2d(nn.Module):
    """conv(x) computed as parts[0](x[:, :split]) + parts[1](x[:, split:])."""

    def __init__(self, conv: nn.Conv2d, split: int) -> None:
        super().__init__()
        if conv.groups != 1 or not 0 < split < conv.in_channels:
            raise ValueError(f"cannot split a conv with {conv.in_channels} inputs (groups={conv.groups}) at {split}")
        self.split = split
        args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        sizes = (split, conv.in_channels - split)
        parts = [nn.Conv2d(n, conv.out_channels, conv.kernel_size, bias=i == 0 and conv.bias is not None, **args)
                 for i, n in enumerate(sizes)]  # fmt: skip
        w = conv.weight.detach()
        with torch.no_grad():
            parts[0].weight.copy_(w[:, :split])
            parts[1].weight.copy_(w[:, split:])
            if conv.bias is not None:
                parts[0].bias.copy_(conv.bias.detach())
        self.parts = nn.ModuleList(parts).to(device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts[0](x[:, : self.split]) + self.parts[1](x[:, self.split :])


def find_shortcut_splits(unet: nn.Module) -> dict[str, int]:
    """{shortcut conv name: channels of the upsampled half} for every decoder resnet whose input is the
    concatenation cat(hidden, skip) (diffusers up blocks): the hidden half has the previous stage's
    output channels for the first resnet of a block and the block's own channels after it."""
    splits: dict[str, int] = {}
    up_blocks = getattr(unet, "up_blocks", None)
    mid = getattr(unet, "mid_block", None)
    if up_blocks is None or mid is None or not getattr(mid, "resnets", None):
        return splits
    prev = mid.resnets[-1].out_channels
    for b, block in enumerate(up_blocks):
        resnets = getattr(block, "resnets", [])
        for i, resnet in enumerate(resnets):
            hidden = prev if i == 0 else resnets[i - 1].out_channels
            conv = getattr(resnet, "conv_shortcut", None)
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and 0 < hidden < conv.in_channels:
                splits[f"up_blocks.{b}.resnets.{i}.conv_shortcut"] = hidden
        if resnets:
            prev = resnets[-1].out_channels
    return splits


def apply_splits(module: nn.Module, splits: dict[str, int], prefix: str = "") -> nn.Module:
    """A deep copy of `module` with each named conv (under `prefix`, e.g. "unet.") replaced by its split."""
    if not splits:
        return module
    module = copy.deepcopy(module)
    for name, split in splits.items():
        parent_name, _, child = f"{prefix}{name}".rpartition(".")
        parent = module.get_submodule(parent_name)
        conv = getattr(parent, child)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{name}: expected a Conv2d to split, found {type(conv).__name__}")
        setattr(parent, child, SplitConv2d(conv, split))
    return module
