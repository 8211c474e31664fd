"""A text bundle's pipeline around the denoiser, without torch: the tokenizer (transformers' CLIPTokenizer, which
runs on the `tokenizers` library), the text encoder and the VAE decoder on ONNX Runtime (exporter.components).

`PromptEncoder.encode` turns prompts into encoder_hidden_states once per request; prompts past the tokenizer's
limit are truncated, as diffusers' pipelines do, and `truncated` lists them so the caller can say so.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.errors import BundleError, ConfigError, EngineError


def _session(path: Path, threads: int = 0):
    import onnxruntime as ort

    from runtime.engine import _describe, default_providers, session_options

    opts = session_options(ort)
    opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=default_providers())
    except Exception as e:
        raise EngineError(f"{path}: ONNX Runtime cannot load it ({_describe(e)})") from None


def note_truncated(tokenizer, prompts: list[str], max_length: int, truncated: list[str]) -> None:
    """Append to `truncated` each prompt longer than the tokenizer's limit, once."""
    for p in prompts:
        if p not in truncated and len(tokenizer(p, verbose=False).input_ids) > max_length:
            truncated.append(p)


class PromptEncoder:
    """Prompts → (n, L, D) float32 embeddings with the bundle's tokenizer and text encoder graph."""

    def __init__(self, root: Path, components: dict, threads: int = 0) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import CLIPTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError as e:
            raise BundleError(f"{root}: text bundles tokenize with transformers ({e}); pip install transformers") from e
        hf_logging.disable_progress_bar()
        entry, tok = components["text_encoder"], components["tokenizer"]
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(root / tok["folder"]), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise BundleError(f"{root / tok['folder']}: cannot load the bundle's tokenizer ({e})") from e
        self.max_length = int(tok["max_length"])
        self.context_shape = tuple(entry["context_shape"])
        self.session = _session(root / entry["file"], threads)
        self.truncated: list[str] = []
        self._cache: dict[str, np.ndarray] = {}

    def token_ids(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="np").input_ids  # fmt: skip
        note_truncated(self.tokenizer, prompts, self.max_length, self.truncated)
        return np.asarray(ids, np.int64)

    def encode(self, prompts: list[str]) -> np.ndarray:
        """(n, L, D): one text-encoder pass over the distinct prompts."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            hidden = self.session.run(["last_hidden_state"], {"input_ids": self.token_ids(new)})[0]
            self._cache.update(zip(new, hidden.astype(np.float32), strict=True))
        return np.stack([self._cache[p] for p in prompts])


class VaeDecoder:
    """Latents as the sampler ends them → images (n, 3, H, W) in [−1, 1], batch by batch."""

    def __init__(self, root: Path, components: dict, threads: int = 0) -> None:
        entry = components["vae_decoder"]
        self.image_shape = tuple(entry["image_shape"])
        self.session = _session(root / entry["file"], threads)

    def decode(self, latents: np.ndarray, batch_size: int = 8) -> np.ndarray:
        out = [self.session.run(["images"], {"latents": latents[lo : lo + batch_size]})[0]
               for lo in range(0, len(latents), batch_size)]  # fmt: skip
        return np.clip(np.concatenate(out), -1, 1).astype(np.float32)


def read_prompts(path: str | Path, flag: str = "--prompts-file") -> list[str]:
    """One prompt per non-empty line of a UTF-8 file; a missing, empty or non-UTF-8 file is refused naming
    `flag`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file; give a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        where = f"{e.reason} at byte {e.start}"
        raise ConfigError(f"{flag} {path}: not UTF-8 text ({where}); re-save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{flag} {path}: holds no prompts; write one prompt per line")
    return prompts
