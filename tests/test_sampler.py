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


@pytest.mark.parametrize(
    "kw", [dict(name="heun"), dict(name="euler", eta=0.5), dict(steps=0), dict(eta=-1.0), dict(guidance=-2.0)]
)
def test_bad_sampler_config(kw):
    with pytest.raises(SamplerError):
        SamplerConfig(**kw)


def test_zero_samples_rejected(tmp_path):
    _, schedule = _scheduler(tmp_path, "DDIMScheduler")
    with pytest.raises(SamplerError, match="-n 0"):
        sample(EngineSet.single(_Echo()), schedule, SamplerConfig(), n=0, progress=False)


# Stable-Diffusion-style scheduler configs (issue 20): v-prediction, leading/trailing spacing with an
# offset, ā_final = ā_0, and zero terminal SNR (which needs v-prediction)
SD_CONFIGS = [
    dict(prediction_type="epsilon", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
    dict(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
    dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
]  # fmt: skip
# not "linspace": its timesteps are not evenly spaced, and diffusers' DDIM then steps from t to t − T // steps
# where dqc steps to the next timestep it visits (NoiseSchedule.timesteps)


@pytest.mark.parametrize("config", SD_CONFIGS, ids=lambda c: f"{c['prediction_type']}-{c['timestep_spacing']}")
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_whole_ddim_run_matches_diffusers_step_for_step(tmp_path, config, eta):
    import diffusers

    diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, **config).save_pretrained(tmp_path)
    ref, schedule = diffusers.DDIMScheduler.from_pretrained(tmp_path), load_schedule(tmp_path)
    assert schedule.prediction_type == config["prediction_type"]
    ref.set_timesteps(25)
    np.testing.assert_array_equal(schedule.timesteps(25), ref.timesteps.numpy())
    # ā in float64 on both sides: diffusers keeps it in float32, whose error reaches 2e-4 at the noisy end
    np.testing.assert_allclose(schedule.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-4, atol=1e-7)
    ref.alphas_cumprod = torch.tensor(schedule.alphas_cumprod)
    ref.final_alpha_cumprod = torch.tensor(schedule.final_alpha_cumprod(), dtype=torch.float64)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)

    def model(x, t):  # a smooth stand-in for the network's prediction
        return (0.5 * np.tanh(x) + 0.1 * np.sin(t / 97.0)).astype(np.float32)

    ts = schedule.timesteps(25)
    for i, t in enumerate(ts):  # each step from the same x_t and prediction on both sides, along our trajectory
        z = rng.standard_normal(x.shape).astype(np.float32)
        prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        pred = model(x, t)
        ours = _step(schedule, SamplerConfig("ddim", 25, eta), x, pred, int(t), prev, _FixedNoise(z))
        theirs = ref.step(torch.tensor(pred), int(t), torch.tensor(x), eta=eta, variance_noise=torch.tensor(z))
        np.testing.assert_allclose(ours, theirs.prev_sample.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"step {i}, t {t}")
        x = ours


def test_v_prediction_splits_into_the_x0_and_eps_it_was_made_from(tmp_path):
    import diffusers

    diffusers.DDIMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path)
    schedule = load_schedule(tmp_path)
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 3, 8))
    for t in (0, 400, 999):
        a = schedule.alphas_cumprod[t]
        xt, v = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, np.sqrt(a) * eps - np.sqrt(1 - a) * x0
        got_x0, got_eps = schedule.split(v, xt, a)
        np.testing.assert_allclose(got_x0, x0, atol=1e-12)
        np.testing.assert_allclose(got_eps, eps, atol=1e-12)
        assert schedule.epsilon_gain(a) == pytest.approx(np.sqrt(a))


def test_unsupported_scheduler_settings_are_refused_by_name(tmp_path):
    import diffusers

    from runtime.errors import ModelLoadError

    cases = [
        (dict(prediction_type="sample"), "prediction_type='sample'"),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr needs prediction_type='v_prediction'"),
        (dict(thresholding=True), "thresholding"),
    ]
    for i, (config, match) in enumerate(cases):
        diffusers.DDIMScheduler(**config).save_pretrained(tmp_path / str(i))
        with pytest.raises(ModelLoadError, match=match):
            load_schedule(tmp_path / str(i))
