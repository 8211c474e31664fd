"""Tiny models built in code, registered once for every test (random weights, ≤ 1 M parameters)."""

from __future__ import annotations

from pathlib import Path

from tools.bench.synthetic import build_unet, save_pipeline


def tiny_unet(num_class_embeds: int | None = 11, seed: int = 0):
    return build_unet("tiny", seed=seed, num_class_embeds=num_class_embeds)


def tiny_pipeline(root: Path, num_class_embeds: int | None = 11, seed: int = 0) -> Path:
    return save_pipeline(tiny_unet(num_class_embeds, seed), root)


def tiny_text_pipeline(root: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    from tools.bench.synthetic import save_text_pipeline

    return save_text_pipeline(root, "tiny", seed, prediction_type=prediction_type)
