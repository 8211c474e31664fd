"""The reference models shipped inside the package: the class-conditional digits DDPM (tools/reference/reference_model/,
named `reference`), the text-to-image digits pipeline (tools/reference/reference_text_model/, named `reference-text`),
the flow-matching digits DiT (tools/reference/reference_dit_model/, named `reference-dit`) and the classifier
`dqc eval` uses. Wherever a command takes a model directory, those words name them (write ./reference for a local
directory of that name)."""

from __future__ import annotations

from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent / "reference_model"
REFERENCE_TEXT_DIR = Path(__file__).resolve().parent / "reference_text_model"
REFERENCE_DIT_DIR = Path(__file__).resolve().parent / "reference_dit_model"
KEYWORD = "reference"
TEXT_KEYWORD = "reference-text"
DIT_KEYWORD = "reference-dit"
REFERENCE_GUIDANCE = 1.5  # classifier-free guidance scale the model card's figures use
REFERENCE_TEXT_GUIDANCE = 1.5  # the text pipeline's (its model card)
REFERENCE_DIT_GUIDANCE = 1.5  # the DiT's (its model card)
CALIBRATION_PROMPTS = "calibration_prompts.txt"  # the training templates × digits: what --calib-prompts defaults to
HELD_OUT_PROMPTS = "held_out_prompts.txt"  # the held-out templates × digits: evaluation only

_SHIPPED = {
    KEYWORD: (REFERENCE_DIR, "unet", REFERENCE_GUIDANCE, "dqc train-reference -o DIR"),
    TEXT_KEYWORD: (REFERENCE_TEXT_DIR, "unet", REFERENCE_TEXT_GUIDANCE, "dqc train-reference --text -o DIR"),
    DIT_KEYWORD: (REFERENCE_DIT_DIR, "transformer", REFERENCE_DIT_GUIDANCE, "dqc train-reference --dit -o DIR"),
}


def reference_dir(name: str = KEYWORD) -> Path:
    from runtime.errors import ModelLoadError

    root, part, _, train = _SHIPPED[name]
    if not (root / part / "config.json").is_file():
        raise ModelLoadError(
            f"the shipped model {name!r} is missing from {root}; reinstall dqc or train it with `{train}`"
        )
    return root


def classifier_path() -> Path:
    return REFERENCE_DIR / "classifier.safetensors"


def is_shipped(path) -> bool:
    return isinstance(path, str) and path in _SHIPPED


def resolve_model(path):
    """`reference` / `reference-text` / `reference-dit` → the shipped model directory; anything else unchanged."""
    return reference_dir(path) if is_shipped(path) else path


def card_guidance(path) -> float | None:
    """The guidance a shipped model's card measures at; None for other models."""
    return _SHIPPED[path][2] if is_shipped(path) else None


def default_calib_prompts(path) -> Path | None:
    """The calibration prompts a shipped text model is compiled with unless told (its training templates)."""
    return reference_dir(path) / CALIBRATION_PROMPTS if path == TEXT_KEYWORD else None
