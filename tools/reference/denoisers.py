"""What `dqc train-reference` optimises: the denoiser with its conditioning in one module, so that one optimiser,
one EMA and one checkpoint cover every trained part."""

from __future__ import annotations

from torch import nn


class ClassDenoiser(nn.Module):
    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x, t, labels):
        return self.unet(x, t, class_labels=labels).sample


class TextDenoiser(nn.Module):
    """UNet2DConditionModel on the last hidden state of a CLIPTextModel, both trained."""

    def __init__(self, unet, text_encoder) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x, t, input_ids):
        return self.unet(x, t, encoder_hidden_states=self.text_encoder(input_ids=input_ids).last_hidden_state).sample
