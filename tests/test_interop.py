"""A bundle as a diffusers UNet (runtime.interop): a diffusers pipeline runs on it, and a whole DDIM run
through diffusers follows dqc's own sampler on the same engines from the same noise."""

import numpy as np
import pytest
import torch

from runtime.bundle import load_bundle
from runtime.errors import EngineInputError
from runtime.interop import as_diffusers_unet
from runtime.sampler import SamplerConfig, _step
from tests.models import tiny_pipeline
from tools.cli import main


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    root = tmp_path_factory.mktemp("uncond")
    model = tiny_pipeline(root / "model", num_class_embeds=None)
    out = root / "bundle"
    argv = ["compile", str(model), "-o", str(out), "--steps", "10", "--calib-samples", "4", "--calib-timesteps", "4",
            "--groups", "2", "-q"]  # fmt: skip
    assert main(argv) == 0
    return model, out


def test_a_diffusers_pipeline_runs_on_the_bundle_as_dqc_samples_it(unconditional):
    from diffusers import DDIMPipeline, DDPMScheduler

    model, out = unconditional
    unet = as_diffusers_unet(out, backend="ort")
    pipe = DDIMPipeline(unet=unet, scheduler=DDPMScheduler.from_pretrained(model / "scheduler"))
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10, eta=0.0,
                  output_type="np").images  # fmt: skip
    # dqc's sampler on the same engines, from the noise the pipeline drew
    bundle = load_bundle(out)
    engines, schedule = bundle.engines(backend="ort"), bundle.schedule
    x = torch.randn((2, *bundle.spec.sample_shape), generator=torch.Generator().manual_seed(0)).numpy()
    ts = schedule.timesteps(10)
    assert len(set(engines.group_of(int(t)) for t in ts)) == 2  # both groups serve the run
    for i, t in enumerate(ts):
        prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        pred = engines.for_timestep(int(t)).infer(x, np.full(2, t, np.int64))
        x = _step(schedule, SamplerConfig("ddim", 10, 0.0), x, pred, int(t), prev, None)
    ours = np.clip(x / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    # measured 2.4e-7 apart; a run with either group's engine at every step is 0.4 or more apart
    np.testing.assert_allclose(images, ours, atol=1e-5)


def test_the_drop_in_returns_the_engine_output_and_refuses_what_it_cannot_route(tiny_bundle):
    unet = as_diffusers_unet(tiny_bundle, backend="ort")
    bundle = load_bundle(tiny_bundle)
    x = np.random.default_rng(0).standard_normal((2, *bundle.spec.sample_shape)).astype(np.float32)
    labels = np.array([1, 4])
    expected = bundle.engines(backend="ort").for_timestep(700).infer(x, np.full(2, 700), labels)
    got = unet(torch.from_numpy(x), torch.tensor(700), class_labels=torch.from_numpy(labels)).sample
    np.testing.assert_array_equal(got.numpy(), expected)
    assert unet.config["sample_size"] == bundle.manifest["model"]["config"]["sample_size"]
    assert unet.dtype == torch.float32 and unet.device.type == "cpu"
    with pytest.raises(EngineInputError, match="class_labels"):
        unet(torch.from_numpy(x), 700)
    with pytest.raises(EngineInputError, match="one training timestep per call"):
        unet(torch.from_numpy(x), torch.tensor([10, 700]), class_labels=torch.from_numpy(labels))
