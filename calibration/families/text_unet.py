"""The text-conditioned UNet family: diffusers `UNet2DConditionModel` (Stable Diffusion 1.x/2.x layout), in a
pipeline directory with its tokenizer and text encoder (calibration.families.text).

Engine inputs: sample (B, C, H, W), timestep (B,), encoder_hidden_states (B, L, D) with L the tokenizer's
max length and D the text encoder's width (= the UNet's cross_attention_dim). Reconstruction units: the
resnet blocks and the transformer blocks (self-attention, cross-attention and feed-forward as one BRECQ unit,
as Q-Diffusion reconstructs Stable Diffusion); the transformers' proj_in/proj_out and the rest are units of
their own. Shortcut splits: the decoder resnets' 1×1 shortcut convs over cat(hidden, skip).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from calibration.families import Family
from runtime.engine import InputSpec
from runtime.errors import ModelLoadError
from runtime.schedule import NoiseSchedule

# config entries whose non-default values add inputs or embeddings the engine contract does not carry
_UNSUPPORTED = {
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "num_class_embeds": None,
}


class TextUNetForward(nn.Module):
    """(sample, timestep, encoder_hidden_states) → prediction; the signature of every engine and of the graph."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


class TextUNet(Family):
    name = "text-unet"
    classes = ("UNet2DConditionModel",)
    subfolder = "unet"
    block_types = ("ResnetBlock2D", "BasicTransformerBlock")
    text = True

    def input_spec(self, module: nn.Module, schedule: NoiseSchedule, where: Path, text=None) -> InputSpec:
        config = module.config
        for key, default in _UNSUPPORTED.items():
            if config.get(key, default) != default:
                raise ModelLoadError(f"{where}: {key}={config.get(key)!r} is not supported (dqc runs text "
                                     "conditioning through encoder_hidden_states only)")  # fmt: skip
        size = config.sample_size
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if text is None:
            raise ModelLoadError(f"{where}: a UNet2DConditionModel needs its pipeline's text encoder")
        length, width = text.context_shape
        if width != config.cross_attention_dim:
            raise ModelLoadError(
                f"{where}: the text encoder's width is {width}, the UNet's cross_attention_dim "
                f"{config.cross_attention_dim}; the components belong to different pipelines"
            )
        return InputSpec((config.in_channels, *hw), schedule.num_train_timesteps, context_shape=(length, width))

    def wrapper(self, module: nn.Module) -> nn.Module:
        return TextUNetForward(module)

    def shortcut_splits(self, module: nn.Module) -> dict[str, int]:
        from calibration.shortcut import find_shortcut_splits

        return find_shortcut_splits(module)
