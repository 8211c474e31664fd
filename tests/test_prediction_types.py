"""v-prediction models through the whole chain (issue 20): compile, sample on ONNX Runtime against the FP
model, the objective's weights, and PTQD in v-space (docs/ptqd_v_prediction.md)."""

import json
import shutil

import numpy as np
import pytest

from calibration.objective import timestep_weights
from runtime.sampler import SamplerConfig
from runtime.schedule import NoiseSchedule
from tools.cli import main

FLAGS = ["--steps", "8", "--calib-samples", "4", "--calib-timesteps", "4", "-q"]


@pytest.fixture(scope="module")
def v_model(tiny_dir, tmp_path_factory):
    d = shutil.copytree(tiny_dir, tmp_path_factory.mktemp("v") / "model")
    path = d / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"prediction_type": "v_prediction"}))
    return d


def test_a_v_prediction_model_compiles_and_its_bundle_tracks_the_fp_model(v_model, tmp_path):
    out = tmp_path / "b"
    assert main(["compile", str(v_model), "-o", str(out), "--bits", "W8A8", *FLAGS]) == 0
    assert json.loads((out / "manifest.json").read_text())["schedule"]["prediction_type"] == "v_prediction"
    common = ["-n", "4", "--steps", "8", "--seed", "5", "--class-label", "3", "-q"]
    assert main(["sample", str(out), "-o", str(tmp_path / "q.npz"), "--backend", "ort", *common]) == 0
    assert main(["sample", str(v_model), "-o", str(tmp_path / "fp.npz"), *common]) == 0
    q, fp = np.load(tmp_path / "q.npz")["samples"], np.load(tmp_path / "fp.npz")["samples"]
    assert np.isfinite(q).all() and q.shape == fp.shape
    # W8A8 of a random tiny UNet: near the FP samples, far nearer than an unrelated draw is
    other = np.load(tmp_path / "fp.npz")["samples"][::-1]
    assert np.mean((q - fp) ** 2) < 0.25 * np.mean((other - fp) ** 2)


def test_ptqd_compiles_for_a_v_model_and_mixed_precision_is_refused_before_any_work(v_model, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["compile", str(v_model), "-o", str(out), "--ptqd", "--ptqd-samples", "4", "--eta", "1", *FLAGS]) == 0
    assert main(["sample", str(out), "-o", str(tmp_path / "s.npz"), "-n", "2", "--backend", "ort", "-q"]) == 0
    meta = json.loads(str(np.load(tmp_path / "s.npz")["meta"]))
    assert meta["ptqd"] == ["cnc", "bc", "vsc"]
    mixed = ["--ptqd", "--mixed-bits", "W8A4", "--eta", "1"]
    assert main(["compile", str(v_model), "-o", str(tmp_path / "m"), *mixed, *FLAGS]) == 2
    assert "predicts v_prediction" in capsys.readouterr().err and not (tmp_path / "m").exists()


class _DistortedV:
    """A 'quantized' v-model: the FP prediction times (1 + k), plus a per-channel bias and, with sigma, Gaussian
    noise (PTQD Eq. 7 written for v)."""

    def __init__(self, engine, k, bias, sigma=0.0, seed=0):
        self.engine, self.spec, self.k, self.bias, self.sigma = engine, engine.spec, k, bias, sigma
        self.rng = np.random.default_rng(seed)

    def infer(self, sample, timestep, cond=None):
        v = self.engine.infer(sample, timestep, cond)
        noise = self.sigma * self.rng.standard_normal(v.shape)
        return ((1 + self.k) * v + self.bias.reshape(1, -1, 1, 1) + noise).astype(np.float32)


def test_ptqd_in_v_recovers_planted_statistics_and_its_corrections_undo_them(v_model):
    from calibration.model_io import load_model
    from calibration.ptqd import gather
    from runtime.engine import EngineSet, TorchEngine
    from runtime.sampler import sample

    model = load_model(v_model)
    fp = TorchEngine(model.wrapper(), model.spec)
    bias = np.array([0.04])
    cfg = SamplerConfig("ddim", 6, 1.0, 1.0)
    noisy = EngineSet.single(_DistortedV(fp, 0.1, bias, sigma=0.03))
    tables = gather(model, noisy, cfg, n=64, seed=0, batch_size=64, progress=False)
    np.testing.assert_allclose(tables.k, 0.1, atol=0.01)  # measured 0.101–0.109 (n = 64)
    np.testing.assert_allclose(tables.bias[:, 0], 0.04, atol=0.01)
    np.testing.assert_allclose(tables.sigma_q, 0.03, rtol=0.1)
    # without residual noise, CNC and BC in v-space with the planted statistics give back the FP trajectory
    from runtime.ptqd import PtqdTables

    clean = EngineSet.single(_DistortedV(fp, 0.1, bias))
    ts = model.schedule.timesteps(6)
    exact = PtqdTables.checked(ts, [0.1] * 6, np.tile(bias, (6, 1)), [0.0] * 6, sampler="ddim", steps=6, eta=1.0,
                               channels=1)  # fmt: skip
    args = dict(n=3, seed=2, cond=np.full(3, 3), progress=False)
    ref = sample(EngineSet.single(fp), model.schedule, cfg, **args)
    raw = sample(clean, model.schedule, cfg, **args)
    fixed = sample(clean, model.schedule, cfg, ptqd=exact, **args)
    assert fixed.ptqd == ["cnc", "bc", "vsc"]
    assert np.abs(fixed.samples - ref.samples).max() < 1e-3 < np.abs(raw.samples - ref.samples).max()


def test_vsc_carries_the_v_residual_into_eps_units():
    """A v-residual σ enters ε as √ā_t σ (ε = √ā v + √(1−ā) x_t): the v-model's VSC step equals the ε-model's
    step with σ_q √ā_t, from the same x_t, the same implied ε and the same noise."""
    from runtime.sampler import _Noise, _step

    betas = tuple(np.linspace(1e-4, 0.02, 1000))
    eps_s, v_s = NoiseSchedule(betas, "linear"), NoiseSchedule(betas, "linear", prediction_type="v_prediction")
    cfg = SamplerConfig("ddim", 10, 1.0)
    t, prev = 500, 400
    a = eps_s.alphas_cumprod[t]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    v = rng.standard_normal(x.shape).astype(np.float32)
    eps = (np.sqrt(a) * v + np.sqrt(1 - a) * x).astype(np.float32)
    for sq in (0.02, 0.3, 5.0):  # the last one more than the sampler's own noise: VSC floors at 0
        ours = _step(v_s, cfg, x, v, t, prev, _Noise(1, range(2), (1, 4, 4)), sigma_q=sq)
        theirs = _step(eps_s, cfg, x, eps, t, prev, _Noise(1, range(2), (1, 4, 4)), sigma_q=sq * np.sqrt(a))
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_the_loss_weights_carry_a_v_error_to_eps():
    betas = tuple(np.linspace(1e-4, 0.02, 1000))
    eps, v = NoiseSchedule(betas, "linear"), NoiseSchedule(betas, "linear", prediction_type="v_prediction")
    cfg = SamplerConfig("ddim", 20)
    for how in ("x0", "xprev"):
        we, wv = timestep_weights(eps, cfg, how), timestep_weights(v, cfg, how)
        ts = eps.timesteps(cfg.steps)  # each timestep takes its nearest step's weight: compare at the steps
        ratio, abar = wv[ts] / we[ts], eps.alphas_cumprod[ts]
        np.testing.assert_allclose(ratio / ratio[0], abar / abar[0], rtol=1e-9)
    np.testing.assert_array_equal(timestep_weights(v, cfg, "eps"), timestep_weights(eps, cfg, "eps"))
