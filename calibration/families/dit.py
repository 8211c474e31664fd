"""The diffusion-transformer family: diffusers `DiTTransformer2DModel` (class-conditional, adaLN-Zero), as DiT
pipelines save it in `transformer/` beside `scheduler/`: a DDPM-family scheduler (ε prediction, integer
timesteps), or FlowMatchEulerDiscreteScheduler for a DiT trained with flow matching (velocity prediction, fed
t = σ·T as a float; calibration data, group tables and PTQD rows key it by runtime.engine.timestep_key).

Engine inputs: sample (B, C, H, W), timestep (B,), class_labels (B,). The label table holds the classes and,
last, the null class of guidance (DiT's class dropout), so `num_class_embeds` is num_embeds_ada_norm + 1. DiT
models trained with a learned variance (DiT-XL/2: out_channels = 2 C) predict ε in the first C channels and the
variance interpolation in the rest; the engine returns ε only, which is what dqc's samplers use (DDIM, and
DDPM with the fixed posterior variance). Reconstruction units: the transformer blocks (attention, adaLN
modulation and MLP as one BRECQ unit); the patch embedding, the final modulation and projection are units of
their own.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from calibration.families import Family
from runtime.engine import InputSpec
from runtime.errors import ModelLoadError
from runtime.schedule import NoiseSchedule


class DiTForward(nn.Module):
    """(sample, timestep, class_labels) → ε: the first `channels` output channels."""

    def __init__(self, transformer, channels: int) -> None:
        super().__init__()
        self.unet, self.channels = transformer, channels  # `unet`: the denoiser attribute every stage names

    def forward(self, sample, timestep, class_labels):
        out = self.unet(sample, timestep=timestep, class_labels=class_labels).sample
        return out[:, : self.channels] if out.shape[1] != self.channels else out


class DiT(Family):
    name = "dit"
    classes = ("DiTTransformer2DModel",)
    subfolder = "transformer"
    block_types = ("BasicTransformerBlock",)

    def input_spec(self, module: nn.Module, schedule: NoiseSchedule, where: Path, text=None) -> InputSpec:
        config = module.config
        if config.norm_type != "ada_norm_zero" or not config.num_embeds_ada_norm:
            raise ModelLoadError(f"{where}: norm_type={config.norm_type!r}, num_embeds_ada_norm="
                                 f"{config.num_embeds_ada_norm!r}: dqc compiles class-conditional DiTs "
                                 "(ada_norm_zero with class labels)")  # fmt: skip
        channels, out = config.in_channels, config.out_channels or config.in_channels
        if out not in (channels, 2 * channels):
            raise ModelLoadError(f"{where}: out_channels={out} with in_channels={channels}: expected ε ({channels}) "
                                 f"or ε and the learned variance ({2 * channels})")  # fmt: skip
        size = config.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        flow = getattr(schedule, "kind", None) == "flow"  # flow matching: fed t = σ·T, a float
        return InputSpec((channels, *hw), schedule.num_train_timesteps, int(config.num_embeds_ada_norm) + 1,
                         timestep_type="float32" if flow else "int64")  # fmt: skip

    def wrapper(self, module: nn.Module) -> nn.Module:
        return DiTForward(module, module.config.in_channels)
