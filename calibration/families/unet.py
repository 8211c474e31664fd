"""The pixel-space UNet family: diffusers `UNet2DModel`, unconditional or class-conditional.

Engine inputs: sample (B, C, H, W), timestep (B,), and class_labels (B,) when the model has a class
embedding. Reconstruction units: resnet and attention blocks. Shortcut splits: the decoder resnets'
1×1 shortcut convs over cat(hidden, skip).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from calibration.families import Family
from runtime.engine import InputSpec
from runtime.errors import ModelLoadError
from runtime.schedule import NoiseSchedule


class UNetForward(nn.Module):
    """(sample, timestep, class_labels) → ε; the signature of every engine and of the exported graph."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, class_labels=None):
        return self.unet(sample, timestep, class_labels=class_labels).sample


class PixelUNet(Family):
    name = "pixel-unet"
    classes = ("UNet2DModel",)
    subfolder = "unet"
    block_types = ("ResnetBlock2D", "Attention")

    def input_spec(self, module: nn.Module, schedule: NoiseSchedule, where: Path, text=None) -> InputSpec:
        config = module.config
        size = config.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        spec = InputSpec((config.in_channels, *hw), schedule.num_train_timesteps, config.num_class_embeds)
        if config.class_embed_type not in (None,) and spec.num_class_embeds is None:
            raise ModelLoadError(f"{where}: class_embed_type={config.class_embed_type!r} is not supported")
        return spec

    def wrapper(self, module: nn.Module) -> nn.Module:
        return UNetForward(module)

    def shortcut_splits(self, module: nn.Module) -> dict[str, int]:
        from calibration.shortcut import find_shortcut_splits

        return find_shortcut_splits(module)
