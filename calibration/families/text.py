"""The text side of a text-to-image pipeline directory, in torch: the tokenizer and text encoder that turn
prompts into the UNet's encoder_hidden_states, for calibration (the runtime encodes with the bundle's own
ONNX text encoder, runtime.text).

A pipeline directory in diffusers' save_pretrained layout names its components in model_index.json; dqc
reads `tokenizer/` (CLIPTokenizer) and `text_encoder/` (CLIPTextModel, safetensors), and refuses any other
class by name. Prompts are padded to the tokenizer's max length and truncated past it, as Stable Diffusion
pipelines do; the embedding is the encoder's last hidden state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from runtime.errors import ModelLoadError

TEXT_COMPONENTS = {"tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"), "text_encoder": ("CLIPTextModel",)}


def component_classes(root: Path) -> dict[str, str]:
    """{component: class name} from model_index.json (empty when the directory has none)."""
    index = root / "model_index.json"
    if not index.is_file():
        return {}
    try:
        entries = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{index}: not valid JSON ({e})") from e
    return {k: v[1] for k, v in entries.items() if isinstance(v, list) and len(v) == 2 and isinstance(v[1], str)}


def check_component(root: Path, name: str, supported: tuple[str, ...]) -> Path:
    """The folder of a required component, refused naming what is missing or unsupported."""
    folder = root / name
    declared = component_classes(root).get(name)
    if declared is not None and declared not in supported:
        raise ModelLoadError(f"{root}: component {name}/ is {declared}; dqc supports {', '.join(supported)} there")
    if not folder.is_dir():
        raise ModelLoadError(
            f"{root}: no {name}/ folder; a text-conditional UNet needs the pipeline's {name} "
            f"({' or '.join(supported)}) in diffusers' save_pretrained layout"
        )
    return folder


class PromptEncoder:
    """Prompts → encoder_hidden_states (n, L, D) float32 with the pipeline's own tokenizer and text encoder.
    `prompts`: the calibration prompts, cycled over calibration trajectories."""

    def __init__(self, root: Path, device: str = "cpu", prompts: tuple[str, ...] = ()) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as e:
            raise ModelLoadError(f"text pipelines need transformers ({e}); pip install 'transformers>=4.40'") from e

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.root = Path(root)
        tok_dir = check_component(self.root, "tokenizer", TEXT_COMPONENTS["tokenizer"])
        enc_dir = check_component(self.root, "text_encoder", TEXT_COMPONENTS["text_encoder"])
        if not any(enc_dir.glob("*.safetensors")):
            raise ModelLoadError(f"{enc_dir}: no .safetensors weights; re-save it with save_pretrained")
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ModelLoadError(f"{tok_dir}: cannot load CLIPTokenizer ({e})") from e
        try:
            self.encoder = CLIPTextModel.from_pretrained(str(enc_dir), use_safetensors=True, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise ModelLoadError(f"{enc_dir}: cannot load CLIPTextModel ({e})") from e
        self.encoder = self.encoder.eval().to(device)
        self.device, self.prompts = device, tuple(prompts)
        self.tokenizer_dir, self.encoder_dir = tok_dir, enc_dir
        self._cache: dict[str, np.ndarray] = {}

    @property
    def context_shape(self) -> tuple[int, int]:
        """(L, D): the tokenizer's max length and the encoder's width."""
        return int(self.tokenizer.model_max_length), int(self.encoder.config.hidden_size)

    def token_ids(self, prompts: list[str]) -> np.ndarray:
        """(n, L) int64: padded to L, truncated past it."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.context_shape[0],
                             truncation=True, return_tensors="np").input_ids  # fmt: skip
        return np.asarray(ids, dtype=np.int64)

    def encode(self, prompts: list[str]) -> np.ndarray:
        """(n, L, D) float32 last hidden states, one encoder pass per distinct prompt."""
        import torch

        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            ids = torch.from_numpy(self.token_ids(new)).to(self.device)
            with torch.inference_mode():
                hidden = self.encoder(input_ids=ids).last_hidden_state.float().cpu().numpy()
            self._cache.update(zip(new, hidden, strict=True))
        return np.stack([self._cache[p] for p in prompts]).astype(np.float32)

    @property
    def null_embedding(self) -> np.ndarray:
        """(L, D): the empty prompt, the unconditional side of classifier-free guidance."""
        return self.encode([""])[0]

    def calibration_embeddings(self, n: int) -> np.ndarray:
        """(n, L, D): the calibration prompts cycled over n trajectories."""
        if not self.prompts:
            raise ModelLoadError(
                f"{self.root}: a text-conditional model is calibrated on prompts; pass --calib-prompts FILE "
                "(one prompt per line)"
            )
        return self.encode([self.prompts[i % len(self.prompts)] for i in range(n)])
