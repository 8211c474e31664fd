"""Calibration options: timestep selection strategies and the method presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibration.collect import normal_timesteps, random_timesteps, uniform_timesteps
from calibration.config import CalibrationConfig
from runtime.errors import ConfigError


def test_selection_strategies_pick_distinct_sampling_steps():
    ts = np.arange(990, -1, -10)  # 100 DDIM steps over T = 1000
    for chosen in (
        uniform_timesteps(ts, 20),
        random_timesteps(ts, 20, seed=0),
        normal_timesteps(ts, 20, seed=0, num_train_timesteps=1000, mean=0.2),
    ):
        assert len(chosen) == 20 and chosen <= {int(t) for t in ts}
    assert random_timesteps(ts, 20, seed=0) == random_timesteps(ts, 20, seed=0) != random_timesteps(ts, 20, seed=1)
    assert len(normal_timesteps(ts, 100, seed=0, num_train_timesteps=1000, mean=0.2)) == 100


def test_normal_selection_concentrates_below_half_t():
    """PTQ4DM: t ~ N(μ, T/2) with μ < T/2 — over many seeds the chosen steps sit lower than uniform ones."""
    ts = np.arange(990, -1, -10)
    uniform = np.mean(sorted(uniform_timesteps(ts, 10)))
    normal = np.mean([np.mean(sorted(normal_timesteps(ts, 10, s, 1000, 0.2))) for s in range(30)])
    assert normal < uniform - 50


def test_method_presets_and_overrides():
    naive = CalibrationConfig.for_method("naive", bits="W4A8", activation_range=None)
    assert (naive.method, naive.weight_range, naive.activation_range, naive.bits) == (
        "naive",
        "minmax",
        "minmax",
        "W4A8",
    )
    assert CalibrationConfig.for_method("naive", activation_range="percentile").activation_range == "percentile"
    assert CalibrationConfig.for_method("lp").weight_range == "lp"
    # the calibrated-steps default follows --steps; an explicit value is still checked against it
    assert CalibrationConfig.for_method("lp", steps=10).calib_timesteps == 10
    assert CalibrationConfig.for_method("qdiffusion", steps=50).calib_timesteps == 20
    with pytest.raises(ConfigError, match="cannot exceed steps"):
        CalibrationConfig.for_method("lp", steps=10, calib_timesteps=20)
    with pytest.raises(ConfigError, match="--method"):
        CalibrationConfig.for_method("brecq")
    with pytest.raises(ConfigError, match="timestep_selection"):
        CalibrationConfig(timestep_selection="cosine")
    with pytest.raises(ConfigError, match="normal_mean"):
        CalibrationConfig(normal_mean=0.7)


def test_naive_weights_are_round_to_nearest_on_the_full_range(tiny_model):
    from calibration.calibrate import quantize_weights
    from calibration.qmodules import quantizable_layers

    layers = quantizable_layers(tiny_model.unet)[:5]
    cfg = CalibrationConfig.for_method("naive", bits="W4A8")
    for layer in layers:
        w_int, scale = quantize_weights(tiny_model, [layer], cfg, progress=False)[layer.name]
        w = tiny_model.unet.get_submodule(layer.name).weight.detach().double()
        assert (w_int.flatten(1).abs().amax(1) == 7).all()  # every channel's max |w| maps to q_max
        expect = torch.round(w / scale.double().view(-1, *[1] * (w.ndim - 1)))
        assert np.array_equal(w_int.numpy(), expect.clamp(-7, 7).to(dtype=w_int.dtype).numpy())


def test_compile_with_method_and_selection(tiny_dir, tmp_path):
    import json

    from tools.cli import main

    out = tmp_path / "b"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "naive", "--timestep-selection", "normal",
            "--bits", "W4A8", "--steps", "10", "--calib-samples", "4", "--calib-timesteps", "3", "-q"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bits"] == "W4A8"
    assert '"naive"' in json.dumps(manifest) and '"normal"' in json.dumps(manifest)


def test_adaround_compile_keeps_parity(tiny_model, tmp_path):
    """A W4A8 bundle with AdaRound weights (few iterations): weights on the 4-bit grid, within one step of
    round-to-nearest, and the engine still matches its fake-quant reference layer by layer."""
    from calibration.calibrate import calibrate
    from exporter.bundle_writer import write_bundle
    from exporter.parity import layer_parity, noised_inputs
    from tests.conftest import CALIB

    base = CalibrationConfig(bits="W4A8", **CALIB)
    ada = CalibrationConfig(bits="W4A8", weight_rounding="adaround", adaround_iters=20, adaround_samples=32, **CALIB)
    r0, r1 = (calibrate(tiny_model, c, progress=False) for c in (base, ada))
    changed = 0
    for name, (w1, s1) in r1.weights.items():
        w0, s0 = r0.weights[name]
        assert np.array_equal(s0.numpy(), s1.numpy()) and int(w1.abs().max()) <= 7
        assert int((w1.int() - w0.int()).abs().max()) <= 1
        changed += int((w1 != w0).sum())
    assert changed > 0
    bundle = write_bundle(tiny_model, r1, tmp_path / "b", progress=False)
    reference = r1.reference_model(tiny_model.wrapper())
    feeds = noised_inputs(tiny_model.spec, tiny_model.schedule, 500, 4, 0)
    report = layer_parity(bundle / "group_0.onnx", reference, feeds)
    assert all(r["flipped"] <= 2e-3 for r in report.values())
