"""v-prediction models through the whole chain (issue 20): compile, sample on ONNX Runtime against the FP
model, the objective's weights, and PTQD refused before any work."""

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


def test_ptqd_is_refused_for_a_v_prediction_model_before_any_work(v_model, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["compile", str(v_model), "-o", str(out), "--ptqd", *FLAGS]) == 2
    assert "ε-prediction" in capsys.readouterr().err and not out.exists()


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
