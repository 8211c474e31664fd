"""The text-conditioned diffusion-transformer family: diffusers `PixArtTransformer2DModel` (adaLN-single, self-
and cross-attention per block), saved in `transformer/` of a pipeline directory beside `tokenizer/`,
`text_encoder/` and `scheduler/` (and `vae/` for latent pipelines). A DDPM-family scheduler (ε prediction,
integer timesteps, as PixArt-α/Σ are trained) or FlowMatchEulerDiscreteScheduler (velocity prediction, fed
t = σ·T as a float, as flow-trained text transformers are).

Why PixArt and not SD3: SD3's joint attention runs text and image tokens through one attention with two sets of
projections and needs a pooled text embedding from two CLIP encoders plus T5 as a fourth engine input; PixArt's
blocks cross-attend to one text embedding, which is the engine contract the text UNets already have
(sample, timestep, encoder_hidden_states), so tokenizer, text encoder, guidance and the K/V-once cut carry over.

The text side is the pipeline's CLIP tokenizer and text encoder (calibration.families.text), the one text stack
dqc runs without torch at serving time; PixArt-α/Σ's released T5-XXL encoder is refused by name there. The
engine passes no encoder attention mask: every padded position is attended, as CLIP pipelines do (PixArt's T5
pipelines mask padding; a model trained with the mask should be served with one, which this contract lacks).

Engine inputs: sample (B, C, H, W), timestep (B,), encoder_hidden_states (B, L, D) with D the text encoder's
width (= caption_channels, projected to the transformer's width by caption_projection). Models with a learned
variance (out_channels = 2 C) return their first C channels. Reconstruction units: the transformer blocks
(self-attention, cross-attention, feed-forward and their adaLN-single modulation as one BRECQ unit); the patch
embedding, timestep and caption embeddings and the output projection are units of their own.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from calibration.families import Family
from runtime.engine import InputSpec
from runtime.errors import ModelLoadError
from runtime.schedule import NoiseSchedule


class PixArtForward(nn.Module):
    """(sample, timestep, encoder_hidden_states) → the prediction: the first `channels` output channels."""

    def __init__(self, transformer, channels: int) -> None:
        super().__init__()
        self.unet, self.channels = transformer, channels  # `unet`: the denoiser attribute every stage names

    def forward(self, sample, timestep, encoder_hidden_states):
        out = self.unet(sample, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample  # fmt: skip
        return out[:, : self.channels] if out.shape[1] != self.channels else out


class PixArt(Family):
    name = "pixart"
    classes = ("PixArtTransformer2DModel",)
    subfolder = "transformer"
    block_types = ("BasicTransformerBlock",)
    text = True

    def input_spec(self, module: nn.Module, schedule: NoiseSchedule, where: Path, text=None) -> InputSpec:
        config = module.config
        if module.use_additional_conditions:
            raise ModelLoadError(f"{where}: use_additional_conditions=True (PixArt-α's resolution and aspect-ratio "
                                 "embeddings) is not supported: the engine contract carries sample, timestep and "
                                 "encoder_hidden_states only")  # fmt: skip
        if text is None:
            raise ModelLoadError(f"{where}: a PixArtTransformer2DModel needs its pipeline's text encoder")
        length, width = text.context_shape
        expected = config.caption_channels if config.caption_channels is not None else config.cross_attention_dim
        if width != expected:
            raise ModelLoadError(
                f"{where}: the text encoder's width is {width}, the transformer's "
                f"{'caption_channels' if config.caption_channels is not None else 'cross_attention_dim'} {expected}; "
                "the components belong to different pipelines"
            )
        channels, out = config.in_channels, module.out_channels
        if out not in (channels, 2 * channels):
            raise ModelLoadError(f"{where}: out_channels={out} with in_channels={channels}: expected the prediction "
                                 f"({channels}) or it and the learned variance ({2 * channels})")  # fmt: skip
        size = config.sample_size
        flow = getattr(schedule, "kind", None) == "flow"  # flow matching: fed t = σ·T, a float
        return InputSpec((channels, size, size), schedule.num_train_timesteps, context_shape=(length, width),
                         timestep_type="float32" if flow else "int64")  # fmt: skip

    def wrapper(self, module: nn.Module) -> nn.Module:
        return PixArtForward(module, module.config.in_channels)
