"""Held-out evaluation: the noise calibration records from never coincides with the noise `dqc sample` draws,
and the sampler keeps its noise in step with the full-precision run whatever PTQD's VSC does."""

import numpy as np
import pytest

from runtime.engine import EngineSet
from runtime.errors import SamplerError
from runtime.ptqd import PtqdTables
from runtime.sampler import (
    CALIBRATION_PURPOSES,
    SamplerConfig,
    _Noise,
    calibration_noise,
    noise_rng,
    sample,
)
from tests.test_sampler import SPEC, _scheduler


def _first(rng: np.random.Generator) -> bytes:
    return rng.standard_normal(4).tobytes()


def test_the_evaluation_stream_is_the_one_samples_were_always_drawn_from():
    for seed, i in [(0, 0), (0, 5), (7, 3), (2**40, 11)]:
        expected = np.random.default_rng([seed, i]).standard_normal(8)
        np.testing.assert_array_equal(noise_rng(seed, i).standard_normal(8), expected)


def test_calibration_noise_never_coincides_with_an_evaluation_sample():
    evaluation = {_first(noise_rng(s, i)) for s in range(1000) for i in range(64)}
    assert len(evaluation) == 1000 * 64
    calibration = [
        _first(noise_rng(s, i, calibration_noise(p, d)))
        for s in range(8)
        for p in CALIBRATION_PURPOSES
        for d in range(3)
        for i in range(64)
    ]
    assert len(set(calibration)) == len(calibration), "two calibration streams coincide"
    assert not evaluation & set(calibration)


def test_recorded_calibration_trajectories_start_from_their_own_noise(tiny_model):
    from calibration.collect import record_trajectories
    from calibration.config import CalibrationConfig

    for seed in range(3):
        cfg = CalibrationConfig(steps=10, calib_samples=8, calib_timesteps=5, seed=seed)
        data = record_trajectories(tiny_model, cfg, progress=False)
        first = data.samples[0]  # the inputs of the first (noisiest) step: the initial noise x_T itself
        assert np.concatenate(data.timesteps)[0] == tiny_model.schedule.timesteps(10)[0]
        for s in range(50):
            drawn = _Noise(s, range(len(first)), tiny_model.spec.sample_shape).draw()
            assert not np.any(np.all(np.isclose(first[:, None], drawn[None]), axis=(2, 3, 4))), (seed, s)


def test_the_manifest_records_the_calibration_noise(tiny_bundle):
    import json

    noise = json.loads((tiny_bundle / "manifest.json").read_text())["calibration"]["noise"]
    assert "spawn_key" in noise["calibration"] and noise["purposes"] == list(CALIBRATION_PURPOSES)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5])
def test_seeds_outside_the_stream_range_are_refused(tmp_path, seed):
    from calibration.config import CalibrationConfig
    from runtime.errors import ConfigError

    _, schedule = _scheduler(tmp_path, "DDIMScheduler")
    with pytest.raises(SamplerError, match="--seed"):
        sample(EngineSet.single(_Zero()), schedule, SamplerConfig(), n=1, seed=seed, progress=False)
    with pytest.raises(ConfigError, match="seed"):
        CalibrationConfig(seed=seed)


class _Zero:
    spec = SPEC

    def infer(self, sample, timestep, class_labels=None):
        return np.zeros_like(sample)


def test_vsc_that_silences_a_step_keeps_later_noise_in_step(tmp_path):
    """ε = 0 makes DDIM's update x_prev = √(ā_prev/ā_t) x + σ z: the difference between a run whose VSC
    drives σ′ to 0 at one step and the plain run must afterwards only scale by √(ā_prev/ā_t), which holds
    only if both runs go on drawing the same z."""
    from runtime.sampler import step_alphas

    _, schedule = _scheduler(tmp_path, "DDIMScheduler")
    cfg = SamplerConfig("ddim", 10, 1.0)
    ts = schedule.timesteps(10)
    silenced = 3
    sigma_q = np.zeros(len(ts))
    sigma_q[silenced] = 100.0  # σ′² = σ² − λ² σ_q² < 0 → σ′ = 0 at this step only
    from runtime.ptqd import calibrated_sigma, eps_coefficient
    from runtime.sampler import noise_sigma

    a_t, a_prev = step_alphas(schedule, "ddim", int(ts[silenced]), int(ts[silenced + 1]))
    sigma = noise_sigma("ddim", 1.0, a_t, a_prev, int(ts[silenced + 1]))
    assert sigma > 0 and calibrated_sigma(sigma, eps_coefficient("ddim", a_t, a_prev, sigma), 100.0) == 0
    tables = PtqdTables.checked(ts, np.zeros(len(ts)), np.zeros((len(ts), 1)), sigma_q, sampler="ddim", steps=10,
                                eta=1.0, channels=1)  # fmt: skip
    xs = {}
    for key, ptqd in (("plain", None), ("vsc", tables)):
        seen = []
        record = lambda i, t, x, eps, lab, seen=seen: seen.append(x.copy())  # noqa: E731
        sample(EngineSet.single(_Zero()), schedule, cfg, n=3, seed=5, progress=False, ptqd=ptqd,
               ptqd_components=("vsc",), observe=record)  # fmt: skip
        xs[key] = seen
    d = [a.astype(np.float64) - b for a, b in zip(xs["vsc"], xs["plain"], strict=True)]
    assert all(np.all(v == 0) for v in d[: silenced + 1])
    assert np.abs(d[silenced + 1]).min() > 0  # the silenced step's noise is missing from the VSC run
    for i in range(silenced + 1, len(ts) - 1):
        a_t, a_prev = step_alphas(schedule, "ddim", int(ts[i]), int(ts[i + 1]))
        np.testing.assert_allclose(d[i + 1], np.sqrt(a_prev / a_t) * d[i], rtol=1e-4, atol=1e-6)
