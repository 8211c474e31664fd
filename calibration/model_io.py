"""Loading a diffusers UNet2DModel and its scheduler config from a local save_pretrained directory."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.engine import InputSpec
from runtime.errors import ModelLoadError
from runtime.schedule import NoiseSchedule, load_schedule

SUPPORTED_CLASSES = ("UNet2DModel",)


@dataclass
class LoadedModel:
    """A full-precision model ready for calibration and export."""

    unet: object  # diffusers.UNet2DModel, eval mode
    schedule: NoiseSchedule
    spec: InputSpec
    source: str
    weight_sha256: str

    @property
    def null_class(self) -> int | None:
        """Class-conditional models reserve their last class embedding for the null class of guidance."""
        k = self.spec.num_class_embeds
        return None if k is None else k - 1

    @property
    def config(self) -> dict:
        return {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}

    def identity(self) -> dict:
        return {
            "class": type(self.unet).__name__,
            "config": self.config,
            "weight_sha256": self.weight_sha256,
            "source": self.source,
        }

    def wrapper(self):
        """The module every stage runs and exports: (sample, timestep, class_labels) → ε."""
        return UNetForward(self.unet)


class UNetForward(torch.nn.Module):
    """(sample, timestep, class_labels) → ε; the signature of every engine and of the exported graph."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, class_labels=None):
        return self.unet(sample, timestep, class_labels=class_labels).sample


def state_dict_sha256(module) -> str:
    """sha256 over parameter names and bytes: the model identity, independent of file format."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _resolve(model_dir: Path, scheduler: str | Path | None) -> tuple[Path, Path]:
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: model directory not found; pass a diffusers save_pretrained directory")
    if (model_dir / "unet" / "config.json").is_file():
        unet_dir = model_dir / "unet"
        sched = Path(scheduler) if scheduler else model_dir / "scheduler"
    elif (model_dir / "config.json").is_file():
        unet_dir = model_dir
        if scheduler is None:
            raise ModelLoadError(
                f"{model_dir}: bare model directory without a scheduler; pass --scheduler DIR "
                "(a diffusers scheduler directory) or use a pipeline directory with unet/ and scheduler/"
            )
        sched = Path(scheduler)
    else:
        raise ModelLoadError(
            f"{model_dir}: neither unet/config.json nor config.json found; expected a diffusers pipeline "
            "directory (unet/ + scheduler/) or a model directory saved with save_pretrained"
        )
    return unet_dir, sched


def load_model(model_dir: str | Path, scheduler: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Load a UNet2DModel (safetensors only, never a pickle, never a hub) and its noise schedule."""
    model_dir = Path(model_dir)
    unet_dir, sched_path = _resolve(model_dir, scheduler)
    try:
        cfg = json.loads((unet_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{unet_dir / 'config.json'}: not valid JSON ({e})") from e
    cls = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if cls not in SUPPORTED_CLASSES:
        raise ModelLoadError(
            f"{unet_dir / 'config.json'}: model class {cls!r} is not supported; dqc compiles {SUPPORTED_CLASSES}"
        )
    if not any(unet_dir.glob("*.safetensors")):
        raise ModelLoadError(
            f"{unet_dir}: no .safetensors weights; re-save the model with save_pretrained(safe_serialization=True)"
        )
    schedule = load_schedule(sched_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(
            str(unet_dir), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(f"{unet_dir}: cannot load UNet2DModel ({e})") from e
    unet = unet.eval().to(device)
    size = unet.config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    spec = InputSpec((unet.config.in_channels, *hw), schedule.num_train_timesteps, unet.config.num_class_embeds)
    if unet.config.class_embed_type not in (None,) and spec.num_class_embeds is None:
        raise ModelLoadError(f"{unet_dir}: class_embed_type={unet.config.class_embed_type!r} is not supported")
    return LoadedModel(unet, schedule, spec, str(model_dir), state_dict_sha256(unet))
