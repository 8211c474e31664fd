"""Loading a diffusers denoiser and its scheduler config from a local save_pretrained directory; what the
denoiser is, and how it is loaded and run, is its family's (calibration.families)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from calibration.families import Family, families, family_for
from runtime.engine import InputSpec
from runtime.errors import ModelLoadError
from runtime.schedule import NoiseSchedule, load_schedule


@dataclass
class LoadedModel:
    """A full-precision model ready for calibration and export."""

    unet: object  # the denoiser (a diffusers model of its family's classes), eval mode
    schedule: NoiseSchedule
    spec: InputSpec
    source: str
    weight_sha256: str
    family: Family
    text: object | None = None  # text families: the PromptEncoder (calibration.families.text)
    vae: object | None = None  # latent pipelines: the AutoencoderKL whose decoder turns samples into images

    @property
    def null_class(self) -> int | None:
        """Class-conditional models reserve their last class embedding for the null class of guidance."""
        k = self.spec.num_class_embeds
        return None if k is None else k - 1

    @property
    def null_cond(self):
        """The unconditional side of guidance: the null class, or the empty prompt's embedding (L, D)."""
        return self.text.null_embedding if self.text is not None else self.null_class

    def prompt_embeddings(self, n: int):
        """(n, L, D): the calibration prompts' embeddings, cycled over n trajectories."""
        return self.text.calibration_embeddings(n)

    @property
    def config(self) -> dict:
        return {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}

    def identity(self) -> dict:
        return {
            "class": type(self.unet).__name__,
            "family": self.family.name,
            "config": self.config,
            "weight_sha256": self.weight_sha256,
            "source": self.source,
        }

    def wrapper(self):
        """The module every stage runs and exports: the engine inputs (`spec.names`) → the prediction."""
        return self.family.wrapper(self.unet)


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
    folders = list(dict.fromkeys(f.subfolder for f in families().values()))  # unet/, ... in pipeline layout
    found = next((model_dir / f for f in folders if (model_dir / f / "config.json").is_file()), None)
    if found is not None:
        unet_dir = found
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
            f"{model_dir}: neither {' nor '.join(f'{f}/config.json' for f in folders)} nor config.json found; "
            "expected a diffusers pipeline directory (denoiser + scheduler/) or a model directory saved with "
            "save_pretrained"
        )
    return unet_dir, sched


def load_model(model_dir: str | Path, scheduler: str | Path | None = None, device: str = "cpu",
               prompts: tuple[str, ...] = ()) -> LoadedModel:  # fmt: skip
    """Load a denoiser of a supported family (safetensors only, never a pickle, never a hub) and its noise
    schedule; for text families also the pipeline's tokenizer and text encoder, with the calibration
    `prompts`."""
    model_dir = Path(model_dir)
    unet_dir, sched_path = _resolve(model_dir, scheduler)
    try:
        cfg = json.loads((unet_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{unet_dir / 'config.json'}: not valid JSON ({e})") from e
    family = family_for(cfg.get("_class_name") if isinstance(cfg, dict) else None, unet_dir / "config.json")
    if not any(unet_dir.glob("*.safetensors")):
        raise ModelLoadError(
            f"{unet_dir}: no .safetensors weights; re-save the model with save_pretrained(safe_serialization=True)"
        )
    schedule = load_schedule(sched_path)
    if prompts and not family.text:
        raise ModelLoadError(f"{model_dir}: --calib-prompts given, but its {family.classes[0]} takes no prompts")
    text = family.load_text(model_dir, device, tuple(prompts))
    unet = family.load(unet_dir, device)
    spec = family.input_spec(unet, schedule, unet_dir, text)
    if getattr(schedule, "kind", None) == "flow" and spec.timestep_type != "float32":
        flow_classes = ", ".join(f.classes[0] for f in families().values() if f.subfolder == "transformer")
        raise ModelLoadError(f"{sched_path}: a flow-matching scheduler with a {family.classes[0]}; dqc runs flow "
                             f"matching with transformer denoisers ({flow_classes})")  # fmt: skip
    vae = load_vae(model_dir, spec) if unet_dir != model_dir else None
    return LoadedModel(unet, schedule, spec, str(model_dir), state_dict_sha256(unet), family, text, vae)


def load_vae(root: Path, spec: InputSpec):
    """The pipeline's AutoencoderKL (vae/), or None where the directory has none; its latent channels must be
    the denoiser's."""
    import os

    from calibration.families.text import check_component

    if not (root / "vae").is_dir():
        return None
    folder = check_component(root, "vae", ("AutoencoderKL",))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True, local_files_only=True,
                                            low_cpu_mem_usage=False)  # fmt: skip
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(f"{folder}: cannot load AutoencoderKL ({e})") from e
    if vae.config.latent_channels != spec.sample_shape[0]:
        raise ModelLoadError(f"{folder}: the VAE has {vae.config.latent_channels} latent channels, the denoiser "
                             f"{spec.sample_shape[0]}; the components belong to different pipelines")  # fmt: skip
    return vae.eval()
