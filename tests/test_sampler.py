"""The host-side sampler against diffusers' schedulers (float64 reference of the same formulas)."""

import numpy as np
import pytest
import torch

from runtime.engine import EngineSet, InputSpec
from runtime.errors import SamplerError
from runtime.sampler import SamplerConfig, _Noise, _step, sample
from runtime.schedule import load_schedule

SPEC = InputSpec((1, 4, 4), 1000, None)


def _scheduler(tmp_path, cls_name):
    import diffusers

    cls = getattr(diffusers, cls_name)
    cls(num_train_timesteps=1000, clip_sample=False).save_pretrained(tmp_path)
    return cls.from_pretrained(tmp_path), load_schedule(tmp_path)


@pytest.mark.parametrize("steps", [10, 50])
def test_timesteps_match_diffusers(tmp_path, steps):
    ref, schedule = _scheduler(tmp_path, "DDIMScheduler")
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(schedule.timesteps(steps), ref.timesteps.numpy())


class _FixedNoise(_Noise):
    def __init__(self, z):
        self.z = z

    def draw(self):
        return self.z


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(tmp_path, eta):
    ref, schedule = _scheduler(tmp_path, "DDIMScheduler")
    ref.set_timesteps(20)
    rng = np.random.default_rng(0)
    x, eps, z = (rng.standard_normal((2, 1, 4, 4)) for _ in range(3))
    ts = schedule.timesteps(20)
    for i in (0, 10, 19):
        t, prev = int(ts[i]), int(ts[i + 1]) if i + 1 < len(ts) else -1
        ours = _step(schedule, SamplerConfig("ddim", 20, eta), x, eps, t, prev, _FixedNoise(z))
        theirs = ref.step(torch.tensor(eps), t, torch.tensor(x), eta=eta, variance_noise=torch.tensor(z)).prev_sample
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-5)


def test_ddpm_step_matches_diffusers(tmp_path):
    ref, schedule = _scheduler(tmp_path, "DDPMScheduler")
    ref.set_timesteps(1000)
    rng = np.random.default_rng(1)
    x, eps, z = (rng.standard_normal((2, 1, 4, 4)) for _ in range(3))
    for t in (999, 500, 1, 0):
        ours = _step(schedule, SamplerConfig("ddpm", 1000), x, eps, t, t - 1, _FixedNoise(z))
        gen = _TorchNoise(z)
        theirs = ref.step(torch.tensor(eps), t, torch.tensor(x), generator=gen).prev_sample
        # diffusers keeps ā_t in float32 (we use float64): at t = 999, ā ≈ 4e-5 and its error shows at 1e-4
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-3, atol=1e-4)


class _TorchNoise:
    """diffusers draws DDPM noise with randn_tensor(generator=…); feed it our z instead."""

    def __init__(self, z):
        self.z = z


@pytest.fixture(autouse=True)
def _patch_randn(monkeypatch):
    import diffusers.schedulers.scheduling_ddpm as ddpm

    real = ddpm.randn_tensor

    def fake(shape, generator=None, **kw):
        if isinstance(generator, _TorchNoise):
            return torch.tensor(generator.z)
        return real(shape, generator=generator, **kw)

    monkeypatch.setattr(ddpm, "randn_tensor", fake)


class _Echo:
    """An engine whose ε is a fixed function of its input (for batch-invariance checks)."""

    spec = SPEC

    def infer(self, sample, timestep, class_labels=None):
        return 0.1 * sample


def test_noise_is_per_sample_so_batch_size_does_not_matter(tmp_path):
    _, schedule = _scheduler(tmp_path, "DDIMScheduler")
    engines = EngineSet.single(_Echo())
    cfg = SamplerConfig("ddim", 10, 1.0)
    a = sample(engines, schedule, cfg, n=5, seed=3, batch_size=5, progress=False).samples
    b = sample(engines, schedule, cfg, n=5, seed=3, batch_size=2, progress=False).samples
    np.testing.assert_array_equal(a, b)
    c = sample(engines, schedule, cfg, n=5, seed=4, batch_size=5, progress=False).samples
    assert not np.allclose(a, c)


@pytest.mark.parametrize("kw", [dict(name="euler"), dict(steps=0), dict(eta=-1.0), dict(guidance=-2.0)])
def test_bad_sampler_config(kw):
    with pytest.raises(SamplerError):
        SamplerConfig(**kw)


def test_zero_samples_rejected(tmp_path):
    _, schedule = _scheduler(tmp_path, "DDIMScheduler")
    with pytest.raises(SamplerError, match="-n 0"):
        sample(EngineSet.single(_Echo()), schedule, SamplerConfig(), n=0, progress=False)
