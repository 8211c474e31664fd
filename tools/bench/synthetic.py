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


# Diffusion transformers (diffusers DiTTransformer2DModel, class-conditional, adaLN-Zero), 4 latent channels with the
# learned variance at 32×32 latents: "dit-s2" DiT-S/2 (depth 12, width 384, 6 heads, patch 2), "dit-xl2" DiT-XL/2
# (depth 28, width 1152, 16 heads, patch 2).
DIT_SHAPES = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2, num_layers=2,
                 sample_size=8, patch_size=2, num_embeds_ada_norm=10),
    "dit-s2": dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
                   sample_size=32, patch_size=2, num_embeds_ada_norm=1000),
    "dit-xl2": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    sample_size=32, patch_size=2, num_embeds_ada_norm=1000),
}  # fmt: skip


def save_dit_pipeline(root: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """A DiT pipeline directory (transformer/ + scheduler/, DDPM linear schedule, T = 1000), random weights."""
    import torch
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    if shape not in DIT_SHAPES:
        raise ValueError(f"unknown DiT shape {shape!r}; use one of {sorted(DIT_SHAPES)}")
    root = Path(root)
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**DIT_SHAPES[shape]).eval()
    with torch.no_grad():  # adaLN-Zero starts every block at the identity: give the random model some signal
        for name, p in model.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(root / "transformer", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).save_pretrained(
        root / "scheduler"
    )
    return root


# Text-to-image pipelines (diffusers' Stable Diffusion layout). "sd15": Stable Diffusion 1.5's UNet
# (block widths 320/640/1280/1280, cross-attention width 768, 8 heads, 4 latent channels) at 32×32 latents.
TEXT_SHAPES = {
    "tiny": dict(
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=4,
        ),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2),
        max_length=16,
        vae=dict(block_out_channels=(16, 32), norm_num_groups=8, latent_channels=4, sample_size=16),
    ),
    "sd15": dict(
        unet=dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        max_length=77,
        vae=dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=256, layers_per_block=2),
    ),
}
TOKEN_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def save_tokenizer(folder: str | Path, max_length: int) -> Path:
    """A character-level CLIP tokenizer (no merges): every character alone and word-final, plus CLIP's start and
    end tokens; made here, so nothing downloads."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(TOKEN_ALPHABET)}
    vocab |= {f"{c}</w>": len(TOKEN_ALPHABET) + i for i, c in enumerate(TOKEN_ALPHABET)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}  # fmt: skip
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def save_text_pipeline(root: str | Path, shape: str = "tiny", seed: int = 0, *, prediction_type: str = "epsilon",
                       vae: bool = True) -> Path:  # fmt: skip
    """A text-to-image pipeline directory with random weights in Stable Diffusion's layout: model_index.json,
    unet/ (UNet2DConditionModel), text_encoder/ (CLIPTextModel), tokenizer/ (CLIPTokenizer, save_tokenizer),
    vae/ (AutoencoderKL) and scheduler/ (DDIM with SD's scaled-linear betas, leading spacing, steps_offset 1)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    if shape not in TEXT_SHAPES:
        raise ValueError(f"unknown synthetic text pipeline {shape!r}; use one of {sorted(TEXT_SHAPES)}")
    spec, root = TEXT_SHAPES[shape], Path(root)
    torch.manual_seed(seed)
    UNet2DConditionModel(**spec["unet"]).eval().save_pretrained(root / "unet", safe_serialization=True)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading", prediction_type=prediction_type)  # fmt: skip
    _save_text_side(root, spec, scheduler, vae, {"_class_name": "StableDiffusionPipeline",
                                                 "unet": ["diffusers", "UNet2DConditionModel"]})  # fmt: skip
    return root


# Text-conditioned transformers (PixArtTransformer2DModel) with the CLIP text stack of TEXT_SHAPES["tiny"]
PIXART_SHAPES = {
    "tiny": dict(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # the prediction and PixArt's learned variance
        num_layers=2,
        norm_num_groups=8,
        cross_attention_dim=32,
        sample_size=8,
        patch_size=2,
        caption_channels=32,  # = the text encoder's width
        use_additional_conditions=False,
    ),
}


def save_pixart_pipeline(root: str | Path, shape: str = "tiny", seed: int = 0, *, flow: bool = True,
                         vae: bool = True) -> Path:  # fmt: skip
    """A text-conditioned transformer pipeline with random weights: transformer/ (PixArtTransformer2DModel),
    text_encoder/ + tokenizer/ (CLIP, as save_text_pipeline's tiny), vae/ and scheduler/: flow matching
    (FlowMatchEulerDiscreteScheduler, shift 3) or, flow=False, PixArt's DDPM-family DDIM (linear betas)."""
    import torch
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel

    if shape not in PIXART_SHAPES:
        raise ValueError(f"unknown synthetic PixArt shape {shape!r}; use one of {sorted(PIXART_SHAPES)}")
    root = Path(root)
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**PIXART_SHAPES[shape]).eval()
    with torch.no_grad():  # a random init whose output depends on every input: not PixArt's zeroed projections
        for name, p in model.named_parameters():
            if "proj_out" in name or "adaln_single.linear" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(root / "transformer", safe_serialization=True)
    scheduler = (FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0) if flow else
                 DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False))  # fmt: skip
    index = {"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}
    _save_text_side(root, TEXT_SHAPES["tiny"], scheduler, vae, index)
    return root


def _save_text_side(root: Path, spec: dict, scheduler, vae: bool, index: dict) -> None:
    """The components beside the denoiser: text_encoder/ (CLIPTextModel), tokenizer/, scheduler/, vae/ if asked,
    and model_index.json naming them with `index`'s pipeline class and denoiser."""
    import json

    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = 2 * len(TOKEN_ALPHABET) + 2
    text = CLIPTextConfig(vocab_size=vocab, max_position_embeddings=spec["max_length"], bos_token_id=vocab - 2,
                          eos_token_id=vocab - 1, pad_token_id=vocab - 1, **spec["text"])  # fmt: skip
    CLIPTextModel(text).eval().save_pretrained(root / "text_encoder", safe_serialization=True)
    save_tokenizer(root / "tokenizer", spec["max_length"])
    index = index | {
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    if vae:
        blocks = len(spec["vae"]["block_out_channels"])
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                      **spec["vae"]).eval().save_pretrained(root / "vae", safe_serialization=True)  # fmt: skip
        index["vae"] = ["diffusers", "AutoencoderKL"]
    scheduler.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
