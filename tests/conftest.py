from __future__ import annotations

import pytest

from tests.models import tiny_pipeline

CALIB = dict(steps=10, calib_samples=8, calib_timesteps=5, batch_size=16)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from calibration.model_io import load_model

    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def tiny_result(tiny_model):
    from calibration.calibrate import calibrate
    from calibration.config import CalibrationConfig

    return calibrate(tiny_model, CalibrationConfig(**CALIB), progress=False)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model, tiny_result, tmp_path_factory):
    from exporter.bundle_writer import write_bundle

    return write_bundle(tiny_model, tiny_result, tmp_path_factory.mktemp("b") / "bundle", progress=False)


@pytest.fixture(scope="session")
def mixed_bundle(tiny_dir, tmp_path_factory):
    """A W8A8 + W8A4 bundle with PTQD statistics of both."""
    from tools.cli import main

    out = tmp_path_factory.mktemp("mixed") / "b"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--bits", "W8A8", "--mixed-bits", "W8A4", "--steps", "6",
            "--eta", "1", "--calib-samples", "4", "--calib-timesteps", "3", "--ptqd", "--ptqd-samples", "4",
            "-q"]  # fmt: skip
    assert main(argv) == 0
    return out
