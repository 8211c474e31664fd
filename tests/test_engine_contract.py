"""One contract for every Engine backend (ONNX Runtime sessions, OpenVINO compiled models, the torch fake-quant
reference, TensorRT plans):
the same inputs are accepted and refused alike, outputs are float32 of the sample's shape, and a batch computes
what its samples compute one by one."""

import numpy as np
import pytest

from exporter.parity import noised_inputs
from runtime.bundle import load_bundle
from runtime.engine import TorchEngine
from runtime.errors import EngineInputError


def _ort(tiny_model, tiny_result, tiny_bundle, tmp_path_factory):
    return load_bundle(tiny_bundle).engines().for_timestep(0)


def _openvino(tiny_model, tiny_result, tiny_bundle, tmp_path_factory):
    return load_bundle(tiny_bundle).engines(backend="openvino").for_timestep(0)


def _torch(tiny_model, tiny_result, tiny_bundle, tmp_path_factory):
    return TorchEngine(tiny_result.reference_model(tiny_model.wrapper()), tiny_model.spec, dtype="float64")


def _trt(tiny_model, tiny_result, tiny_bundle, tmp_path_factory):
    pytest.importorskip("tensorrt")
    import dataclasses

    from exporter.bundle_writer import write_bundle
    from tools.deploy.build import run_build

    result = dataclasses.replace(tiny_result, config=dataclasses.replace(tiny_result.config, target="trt-fp32"))
    bundle = write_bundle(tiny_model, result, tmp_path_factory.mktemp("trt") / "bundle", progress=False)
    run_build(bundle, batch_sizes=(1, 4, 8), progress=False)
    return load_bundle(bundle).engines(backend="trt").for_timestep(0)


BACKENDS = [
    pytest.param(_ort, id="ort"),
    pytest.param(_openvino, id="openvino"),
    pytest.param(_torch, id="torch-reference"),
    pytest.param(_trt, id="trt", marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKENDS)
def engine(request, tiny_model, tiny_result, tiny_bundle, tmp_path_factory):
    return request.param(tiny_model, tiny_result, tiny_bundle, tmp_path_factory)


def test_outputs_are_float32_of_the_sample_shape_and_deterministic(engine, tiny_model):
    feeds = noised_inputs(tiny_model.spec, tiny_model.schedule, 400, n=3, seed=0)
    args = (feeds["sample"], feeds["timestep"], feeds["class_labels"])
    eps = engine.infer(*args)
    assert eps.dtype == np.float32 and eps.shape == feeds["sample"].shape and np.isfinite(eps).all()
    np.testing.assert_array_equal(engine.infer(*args), eps)


def test_a_batch_computes_what_its_samples_compute_alone(engine, tiny_model):
    feeds = noised_inputs(tiny_model.spec, tiny_model.schedule, 700, n=4, seed=1)
    together = engine.infer(feeds["sample"], feeds["timestep"], feeds["class_labels"])
    for i in range(4):
        alone = engine.infer(feeds["sample"][i : i + 1], feeds["timestep"][i : i + 1], feeds["class_labels"][i : i + 1])
        np.testing.assert_allclose(alone[0], together[i], rtol=1e-4, atol=1e-5)


def test_the_float32_reference_moves_only_by_whole_output_steps_with_the_batch(tiny_model, tiny_result):
    """What float32 does guarantee: batch-dependent kernels may flip roundings inside the network (see
    TorchEngine), but the output stays on its quantization grid, so a sample alone and in a batch differ by
    whole output steps."""
    engine = TorchEngine(tiny_result.reference_model(tiny_model.wrapper()), tiny_model.spec)
    step = tiny_result.activations["conv_out:output"][0].scale
    for t in (100, 700):
        feeds = noised_inputs(tiny_model.spec, tiny_model.schedule, t, n=4, seed=1)
        args = (feeds["sample"], feeds["timestep"], feeds["class_labels"])
        together = engine.infer(*args)
        for i in range(4):
            steps = (engine.infer(*(a[i : i + 1] for a in args))[0] - together[i]) / step
            np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda x, t, c: (x.astype(np.float64), t, c), "float32"),
        (lambda x, t, c: (x[:, :, :4], t, c), "shape"),
        (lambda x, t, c: (x, np.full(len(t), 1000), c), r"\[0, 1000\)"),
        (lambda x, t, c: (x, t.astype(np.float32), c), "integer training timesteps"),
        (lambda x, t, c: (x, t, None), "class-conditional"),
        (lambda x, t, c: (x, t, np.full(len(c), 99)), "class_labels"),
    ],
)
def test_every_backend_refuses_bad_inputs_alike(engine, tiny_model, edit, match):
    feeds = noised_inputs(tiny_model.spec, tiny_model.schedule, 100, n=2, seed=2)
    with pytest.raises(EngineInputError, match=match):
        engine.infer(*edit(feeds["sample"], feeds["timestep"], feeds["class_labels"]))
