"""The rest of a text-to-image pipeline in the bundle: the text encoder and the VAE decoder as float ONNX
graphs, and the tokenizer's files, so the runtime goes from prompt to image without torch.

- `text_encoder.onnx`: input_ids (B, L) int64 → last_hidden_state (B, L, D), the UNet's encoder_hidden_states.
- `vae_decoder.onnx`: latents (B, C, h, w), as the sampler ends them → images (B, 3, H, W) in [−1, 1]
  nominal; the VAE's scaling (and shift) factor is applied inside the graph: D(z / s + shift).
- `tokenizer/`: the pipeline's tokenizer folder, copied file by file.
"""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import onnx
import torch

from exporter.onnx_export import OPSET
from runtime.errors import ExportError

TEXT_ENCODER, VAE_DECODER, TOKENIZER = "text_encoder.onnx", "vae_decoder.onnx", "tokenizer"


class _TextForward(torch.nn.Module):
    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        return self.encoder(input_ids=input_ids).last_hidden_state


class _DecodeForward(torch.nn.Module):
    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latents):
        return self.vae.decode(latents / self.scale + self.shift).sample


def _export(module: torch.nn.Module, example: torch.Tensor, inputs: str, output: str, what: str) -> onnx.ModelProto:
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.cpu().eval(), (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=[inputs], output_names=[output], do_constant_folding=True,
                              dynamic_axes={inputs: {0: "batch"}, output: {0: "batch"}})  # fmt: skip
    except Exception as e:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export failed for the {what}: {e}") from e
    return onnx.load_from_string(buf.getvalue())


def export_text_encoder(prompts) -> onnx.ModelProto:
    """The text encoder of a PromptEncoder (calibration.families.text) as a float graph."""
    length, _ = prompts.context_shape
    example = torch.from_numpy(prompts.token_ids(["a", ""]))
    assert example.shape == (2, length)
    return _export(_TextForward(prompts.encoder), example, "input_ids", "last_hidden_state", "text encoder")


def export_vae_decoder(vae, latent_shape: tuple[int, int, int]) -> onnx.ModelProto:
    """The VAE's decoder, scaling included, as a float graph."""
    return _export(_DecodeForward(vae), torch.zeros(1, *latent_shape), "latents", "images", "VAE decoder")


def write_components(model, folder: Path) -> dict:
    """Write a loaded model's pipeline components into a staged bundle `folder`; returns the manifest's
    `components` entry ({} for a bare denoiser)."""
    out = {}
    if model.text is not None:
        onnx.save(export_text_encoder(model.text), str(folder / TEXT_ENCODER))
        shutil.copytree(model.text.tokenizer_dir, folder / TOKENIZER)
        length, width = model.text.context_shape
        out["text_encoder"] = {"file": TEXT_ENCODER, "class": type(model.text.encoder).__name__,
                               "precision": "float32", "context_shape": [length, width]}  # fmt: skip
        out["tokenizer"] = {"folder": TOKENIZER, "class": type(model.text.tokenizer).__name__, "max_length": length}
        out["calibration_prompts"] = list(model.text.prompts)
    if model.vae is not None:
        c, h, w = model.spec.sample_shape
        onnx.save(export_vae_decoder(model.vae, (c, h, w)), str(folder / VAE_DECODER))
        with torch.no_grad():
            image = list(_DecodeForward(model.vae)(torch.zeros(1, c, h, w)).shape[1:])
        scale = float(model.vae.config.scaling_factor)
        out["vae_decoder"] = {"file": VAE_DECODER, "class": type(model.vae).__name__, "precision": "float32",
                              "scaling_factor": scale, "image_shape": image}  # fmt: skip
    return out
