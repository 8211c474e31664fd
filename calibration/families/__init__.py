"""Model-family adapters (ARCHITECTURE.md, "Model families").

A family holds, in one place, what dqc knows about one kind of denoiser: which diffusers classes it loads
and from which folder of a pipeline directory, its named engine inputs, the module that every stage runs
and exports (the wrapper), its BRECQ reconstruction units and its Q-Diffusion shortcut splits. Calibration,
export and the torch reference ask the model's family; none of them branches on model classes.

`family_for(class_name)` finds the family of a diffusers config's `_class_name`; an unsupported class is
refused naming the classes dqc compiles.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import nn

from runtime.engine import InputSpec
from runtime.errors import ModelLoadError
from runtime.schedule import NoiseSchedule


class Family:
    """One kind of denoiser. Subclasses set the class attributes and implement `load` and `input_spec`."""

    name: ClassVar[str]  # recorded in the manifest, e.g. "pixel-unet"
    classes: ClassVar[tuple[str, ...]]  # diffusers `_class_name`s it loads
    subfolder: ClassVar[str]  # where a pipeline directory keeps the denoiser, e.g. "unet"
    block_types: ClassVar[tuple[str, ...]]  # module classes reconstructed as one BRECQ unit each
    text: ClassVar[bool] = False  # conditioned on prompts through a text encoder (load_text)

    def load(self, folder: Path, device: str) -> nn.Module:
        """The denoiser (diffusers class `classes[0]`) from its save_pretrained folder (safetensors only, local
        files only), in eval mode."""
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import diffusers

        name = self.classes[0]
        try:
            module = getattr(diffusers, name).from_pretrained(
                str(folder), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
            )
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ModelLoadError(f"{folder}: cannot load {name} ({e})") from e
        return module.eval().to(device)

    def load_text(self, root: Path, device: str, prompts: tuple[str, ...] = ()):
        """Text families: the pipeline's prompt encoder (calibration.families.text.PromptEncoder) from the
        pipeline directory `root`, with the calibration `prompts`; None for the others."""
        if not self.text:
            return None
        from calibration.families.text import PromptEncoder

        if root.name == self.subfolder or not (root / self.subfolder).is_dir():
            raise ModelLoadError(
                f"{root}: a {self.classes[0]} is compiled from its pipeline directory ({self.subfolder}/, "
                "text_encoder/, tokenizer/, scheduler/), whose text encoder makes the prompts' embeddings"
            )
        return PromptEncoder(root, device, prompts)

    def input_spec(self, module: nn.Module, schedule: NoiseSchedule, where: Path, text=None) -> InputSpec:
        """What its engines accept (`text`: load_text's encoder, which fixes the context shape); a
        configuration dqc cannot run is refused naming `where`."""
        raise NotImplementedError

    def wrapper(self, module: nn.Module) -> nn.Module:
        """The module every stage runs and exports: the engine inputs in `InputSpec.names` order → prediction."""
        raise NotImplementedError

    def shortcut_splits(self, module: nn.Module) -> dict[str, int]:
        """Q-Diffusion's shortcut splits (calibration.shortcut): {conv name: channels of its first half}."""
        return {}


def families() -> dict[str, Family]:
    from calibration.families.dit import DiT
    from calibration.families.pixart import PixArt
    from calibration.families.text_unet import TextUNet
    from calibration.families.unet import PixelUNet

    return {f.name: f for f in (PixelUNet(), TextUNet(), DiT(), PixArt())}


def supported_classes() -> tuple[str, ...]:
    return tuple(c for f in families().values() for c in f.classes)


def family_for(class_name: object, where: Path) -> Family:
    """The family that loads the diffusers class `class_name` (from the config at `where`)."""
    for family in families().values():
        if class_name in family.classes:
            return family
    raise ModelLoadError(
        f"{where}: model class {class_name!r} is not supported; dqc compiles {', '.join(supported_classes())}"
    )


def family_named(name: str) -> Family:
    """The family a manifest names."""
    try:
        return families()[name]
    except KeyError:
        raise ModelLoadError(f"model family {name!r} is unknown; this dqc knows {', '.join(families())}") from None
