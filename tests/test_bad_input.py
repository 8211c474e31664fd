"""Bad input: each case raises a DqcError subclass naming the file/flag/tensor and the fix."""

import json
import shutil

import numpy as np
import pytest

from calibration.config import CalibrationConfig, parse_bits
from calibration.model_io import load_model
from runtime.bundle import load_bundle
from runtime.errors import BundleError, ConfigError, DqcError, EngineInputError, ModelLoadError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "copy")


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")


def test_malformed_model_directory(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="neither"):
        load_model(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_bare_model_directory_needs_scheduler(tiny_dir):
    with pytest.raises(ModelLoadError, match="--scheduler"):
        load_model(tiny_dir / "unet")
    assert load_model(tiny_dir / "unet", scheduler=tiny_dir / "scheduler").spec.num_class_embeds == 11


def test_weights_must_be_safetensors(tiny_dir, tmp_path):
    d = shutil.copytree(tiny_dir, tmp_path / "m")
    for f in (d / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(d)


@pytest.mark.parametrize("text", ["W8", "A8W8", "W9A8", "W8A9", "W8A1", "w1a8", ""])
def test_unsupported_bits(text):
    with pytest.raises(ConfigError, match="--bits"):
        parse_bits(text)


def test_bad_config_fields():
    with pytest.raises(ConfigError, match="--target"):
        CalibrationConfig(target="tpu")
    with pytest.raises(ConfigError, match="calib_samples"):
        CalibrationConfig(calib_samples=0)


def test_tampered_file(bundle_copy):
    with open(bundle_copy / "weights.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x7f")
    with pytest.raises(BundleError, match=r"weights\.bin.*sha256"):
        load_bundle(bundle_copy)


def test_missing_file(bundle_copy):
    (bundle_copy / "group_0.onnx").unlink()
    with pytest.raises(BundleError, match=r"group_0\.onnx.*missing"):
        load_bundle(bundle_copy)


def test_external_data_escaping_the_bundle(bundle_copy):
    import onnx

    from runtime.bundle import sha256_file

    path = bundle_copy / "group_0.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    onnx.save(model, str(path))
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"]["group_0.onnx"] = sha256_file(path)  # an attacker can rewrite the manifest too
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="leaves the bundle"):
        load_bundle(bundle_copy)


def test_manifest_file_entry_escaping(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"]["../x"] = "0" * 64
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside"):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(
    "sample, timestep, labels, match",
    [
        (np.zeros((2, 1, 8, 8), np.float64), [1, 1], [0, 0], "float32"),
        (np.zeros((2, 3, 8, 8), np.float32), [1, 1], [0, 0], "shape"),
        (np.zeros((2, 1, 8, 8), np.float32), [1, 1, 1], [0, 0], "timestep"),
        (np.zeros((2, 1, 8, 8), np.float32), [1, 1000], [0, 0], r"\[0, 1000\)"),
        (np.zeros((2, 1, 8, 8), np.float32), [-1, 3], [0, 0], "timestep"),
        (np.zeros((2, 1, 8, 8), np.float32), [1, 1], None, "class_labels"),
        (np.zeros((2, 1, 8, 8), np.float32), [1, 1], [0, 11], "class_labels"),
    ],
)
def test_engine_rejects_bad_inputs(tiny_bundle, sample, timestep, labels, match):
    engines = load_bundle(tiny_bundle).engines()
    with pytest.raises(EngineInputError, match=match):
        engines.for_timestep(0).infer(sample, np.asarray(timestep), None if labels is None else np.asarray(labels))


def test_routing_rejects_timestep_outside_schedule(tiny_bundle):
    engines = load_bundle(tiny_bundle).engines()
    with pytest.raises(EngineInputError, match="timestep 1000"):
        engines.for_timestep(1000)


def test_all_errors_share_one_root():
    for cls in (BundleError, ConfigError, EngineInputError, ModelLoadError):
        assert issubclass(cls, DqcError)
