"""The tiny random-weight text pipeline of the tests: how far dqc's pieces are from diffusers' and torch's.
Usage: python docs/issue20/text_checks.py WORKDIR"""

import sys
from pathlib import Path

import numpy as np
import torch

from calibration.model_io import load_model
from runtime.bundle import load_bundle
from runtime.engine import EngineSet, TorchEngine
from runtime.sampler import SamplerConfig, _Noise, sample
from runtime.text import PromptEncoder, VaeDecoder
from tools.bench.synthetic import save_text_pipeline
from tools.cli import main

work = Path(sys.argv[1])
pipe_dir = save_text_pipeline(work / "pipe", "tiny")
prompts = ["a handwritten 7", "the digit seven", "seven", "a handwritten 3", "three"]
(work / "calib.txt").write_text("\n".join(prompts))
out = work / "bundle"
main(["compile", str(pipe_dir), "-o", str(out), "--calib-prompts", str(work / "calib.txt"), "--steps", "8",
      "--calib-samples", "5", "--calib-timesteps", "4", "--guidance", "3", "-q", "--force"])  # fmt: skip
m = load_model(pipe_dir, prompts=tuple(prompts))
bundle = load_bundle(out)
parts = bundle.manifest["components"]
test = ["a handwritten 9", "", "nine"]
enc = np.abs(PromptEncoder(bundle.root, parts).encode(test) - m.text.encode(test)).max()
z = np.random.default_rng(0).standard_normal((4, *bundle.spec.sample_shape)).astype(np.float32)
with torch.no_grad():
    ref = m.vae.decode(torch.from_numpy(z) / m.vae.config.scaling_factor).sample.clamp(-1, 1).numpy()
vae = np.abs(VaeDecoder(bundle.root, parts).decode(z) - ref).max()

from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402

sd = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text.encoder, tokenizer=m.text.tokenizer, unet=m.unet,
                             scheduler=DDIMScheduler.from_pretrained(pipe_dir / "scheduler"), safety_checker=None,
                             feature_extractor=None, requires_safety_checker=False)  # fmt: skip
x0 = _Noise(0, range(3), m.spec.sample_shape).draw()
theirs = sd(test[::2] + ["seven"], num_inference_steps=8, guidance_scale=3.0, latents=torch.from_numpy(x0),
            output_type="latent").images.numpy()  # fmt: skip
cond = m.text.encode(test[::2] + ["seven"])
ours = sample(EngineSet.single(TorchEngine(m.wrapper(), m.spec)), m.schedule, SamplerConfig("ddim", 8, 0.0, 3.0),
              n=3, seed=0, cond=cond, null_cond=m.null_cond, progress=False).samples  # fmt: skip
q = sample(bundle.engines(backend="ort"), bundle.schedule, SamplerConfig("ddim", 8, 0.0, 3.0), n=3, seed=0,
           cond=cond, null_cond=m.null_cond, progress=False).samples  # fmt: skip
print(f"text encoder ONNX vs torch: max |diff| {enc:.2e}")
print(f"VAE decoder ONNX vs torch: max |diff| {vae:.2e}")
print(
    f"dqc sampler (FP torch) vs StableDiffusionPipeline, DDIM 8 steps, guidance 3: max |diff| "
    f"{np.abs(ours - theirs).max():.2e} (latents std {theirs.std():.3f})"
)
print(f"W8A8 bundle on ORT vs FP, same seeds: latent RMSE {np.sqrt(np.mean((q - ours) ** 2)):.4f}")
