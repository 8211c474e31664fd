"""Models built in code with random weights: the tiny test/demo model and the CIFAR-10-shaped UNet
(DDPM CIFAR-10 layout, 35.7 M parameters) for speed measurements. Saved in save_pretrained layout."""

from __future__ import annotations

from pathlib import Path

SHAPES = {
    "tiny": dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=None,
        num_class_embeds=11,
    ),
    "cifar10": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        resnet_time_scale_shift="default",
        flip_sin_to_cos=False,
        freq_shift=1,
    ),
}


def build_unet(shape: str, seed: int = 0, **overrides):
    import torch
    from diffusers import UNet2DModel

    if shape not in SHAPES:
        raise ValueError(f"unknown synthetic shape {shape!r}; use one of {sorted(SHAPES)}")
    torch.manual_seed(seed)
    return UNet2DModel(**(SHAPES[shape] | overrides)).eval()


def save_pipeline(unet, root: str | Path, clip_sample: bool = True) -> Path:
    """A pipeline directory (unet/ + scheduler/) with a DDPM linear schedule, T = 1000."""
    from diffusers import DDPMScheduler

    root = Path(root)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip_sample).save_pretrained(
        root / "scheduler"
    )
    return root
