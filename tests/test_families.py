"""Model-family adapters (calibration.families): the pixel-UNet family is a transparent layer over diffusers,
bundles record their family and named inputs, and unsupported classes are refused naming the supported."""

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from calibration.families import family_for, supported_classes
from calibration.model_io import load_model
from runtime.bundle import load_bundle
from runtime.errors import BundleError, ModelLoadError

ROOT = Path(__file__).resolve().parents[1]


def test_the_pixel_unet_wrapper_computes_exactly_what_diffusers_computes(tiny_model):
    assert tiny_model.family.name == "pixel-unet" and tiny_model.spec.names == ["sample", "timestep", "class_labels"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, *tiny_model.spec.sample_shape, generator=gen)
    t, labels = torch.tensor([5, 500, 999]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        ours = tiny_model.wrapper()(x, t, labels)
        theirs = tiny_model.unet(x, t, class_labels=labels).sample
    assert torch.equal(ours, theirs)


def test_an_unsupported_class_is_refused_naming_what_is_supported(tiny_dir, tmp_path):
    d = shutil.copytree(tiny_dir, tmp_path / "m")
    config = json.loads((d / "unet" / "config.json").read_text())
    (d / "unet" / "config.json").write_text(json.dumps(config | {"_class_name": "UNet3DConditionModel"}))
    with pytest.raises(ModelLoadError, match="UNet3DConditionModel.*not supported.*UNet2DModel, UNet2DConditionModel"):
        load_model(d)
    assert "UNet2DModel" in supported_classes()
    with pytest.raises(ModelLoadError, match="'Nope'"):
        family_for("Nope", tmp_path)


def test_the_manifest_records_the_family_and_the_named_inputs(tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["model"]["family"] == "pixel-unet"
    assert manifest["input_spec"]["inputs"] == ["sample", "timestep", "class_labels"]
    bundle = load_bundle(tiny_bundle)
    x = np.zeros((1, *bundle.spec.sample_shape), np.float32)
    assert bundle.engines(backend="ort").for_timestep(0).infer(x, np.array([0]), np.array([1])).shape == x.shape


def test_a_manifest_whose_named_inputs_disagree_is_refused(tiny_bundle, tmp_path):
    d = shutil.copytree(tiny_bundle, tmp_path / "copy")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["input_spec"]["inputs"] = ["sample", "timestep", "encoder_hidden_states"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="input_spec.inputs"):
        load_bundle(d)


def test_calibration_never_imports_the_exporter():
    # the target profile is the contract below both stages (ARCHITECTURE.md, "Model families")
    for path in sorted((ROOT / "calibration").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "exporter" or n.startswith("exporter.") for n in names), path
