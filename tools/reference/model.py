"""The reference model shipped inside the package (tools/reference/reference_model/): a class-conditional DDPM
trained on the scikit-learn digits, and the classifier `dqc eval` uses. Wherever a command takes a model
directory, the word `reference` names it (write ./reference for a local directory of that name)."""

from __future__ import annotations

from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent / "reference_model"
KEYWORD = "reference"
REFERENCE_GUIDANCE = 1.5  # classifier-free guidance scale the model card's figures use


def reference_dir() -> Path:
    from runtime.errors import ModelLoadError

    if not (REFERENCE_DIR / "unet" / "config.json").is_file():
        raise ModelLoadError(
            f"the shipped reference model is missing from {REFERENCE_DIR}; reinstall dqc "
            "or train it with `dqc train-reference -o DIR`"
        )
    return REFERENCE_DIR


def classifier_path() -> Path:
    return REFERENCE_DIR / "classifier.safetensors"


def resolve_model(path):
    """`reference` → the shipped model directory; anything else unchanged."""
    return reference_dir() if isinstance(path, str) and path == KEYWORD else path
