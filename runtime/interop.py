"""A bundle as a drop-in denoiser for diffusers pipelines (issue 20, "diffusers interop").

    pipe = DDIMPipeline.from_pretrained(model_dir)            # or any pipeline/loop of your own
    pipe.unet = as_diffusers_unet("bundle/")                  # the quantized engines, routed by t
    images = pipe(num_inference_steps=50).images

The module answers `forward(sample, timestep, encoder_hidden_states=None, class_labels=None, return_dict=True)`
(text bundles: `pipe.unet = as_diffusers_unet(bundle)` in a StableDiffusionPipeline) like the diffusers
model it replaces, with its `config`, `dtype` and `device`, so pipeline code and any diffusers scheduler
(DDIM, DPM-Solver++, Euler, ...) keep working. Each call runs on the bundle's engines; the timestep routes
the call to its group's quantization parameters. PTQD's corrections live in dqc's own sampler
(`dqc sample`): a diffusers scheduler gets the engine's prediction uncorrected.

torch and diffusers are imported only here: the rest of the runtime runs without them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import EngineInputError


def as_diffusers_unet(bundle, backend: str = "auto", **engine_options):
    """A torch module that runs `bundle` (a path or a loaded Bundle) where a pipeline calls its UNet.
    `backend` and `engine_options` go to Bundle.engines (e.g. backend="ort", threads=2)."""
    import torch
    from diffusers.configuration_utils import FrozenDict
    from diffusers.models.unets.unet_2d import UNet2DOutput

    from runtime.bundle import Bundle, load_bundle

    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(Path(bundle))
    engines = bundle.engines(backend=backend, **engine_options)
    spec = engines.spec

    class BundleUNet(torch.nn.Module):
        """The bundle's engines behind a diffusers UNet's call signature (float32, on the CPU host)."""

        def __init__(self) -> None:
            super().__init__()
            self.config = FrozenDict(bundle.manifest["model"].get("config", {}))
            self.engines = engines
            self.bundle_path = str(bundle.root)

        @property
        def dtype(self) -> torch.dtype:
            return torch.float32

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

        def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None, return_dict: bool = True,
                    **unused):  # fmt: skip
            x = sample.detach().to("cpu", torch.float32).numpy()
            t = np.asarray(timestep.detach().cpu() if torch.is_tensor(timestep) else timestep).astype(np.int64)
            t = np.broadcast_to(t.reshape(-1) if t.ndim else t, (x.shape[0],))
            if len(np.unique(t)) != 1:
                raise EngineInputError(
                    f"timestep: one training timestep per call (the group routing is per step), got {np.unique(t)}"
                )
            cond = None
            if spec.condition == "encoder_hidden_states":
                if encoder_hidden_states is None:
                    raise EngineInputError("encoder_hidden_states: the bundle's model is text-conditional; pass the "
                                           "prompt embeddings to the UNet call")  # fmt: skip
                cond = encoder_hidden_states.detach().to("cpu", torch.float32).numpy()
            elif class_labels is not None:
                cond = np.asarray(class_labels.detach().cpu() if torch.is_tensor(class_labels) else class_labels)
                cond = np.broadcast_to(cond.astype(np.int64).reshape(-1), (x.shape[0],))
            elif spec.num_class_embeds is not None:
                raise EngineInputError(
                    "class_labels: the bundle's model is class-conditional; pass class_labels to the UNet call"
                )
            out = self.engines.for_timestep(int(t[0])).infer(np.ascontiguousarray(x), t.copy(), cond)
            out = torch.from_numpy(np.ascontiguousarray(out)).to(sample.device, sample.dtype)
            return UNet2DOutput(sample=out) if return_dict else (out,)

    return BundleUNet()
