"""4-bit Linear weights for TensorRT (`--w4-linear int4`, exporter.int4): TensorRT runs INT4 weights as weight-only
quantization, so every Linear's weight becomes an INT4 initializer (the int8 container's values, packed two per
byte) and its activation input loses its Q/DQ; the Convs keep theirs. The trt-fp32 graph runs on ONNX Runtime here
and matches the fake-quant reference whose Linear inputs are float; the FP16 graph lints clean for TensorRT (its
engine is built on a GPU only: tests/test_tensorrt.py)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from calibration.calibrate import calibrate
from calibration.config import CalibrationConfig
from calibration.model_io import load_model
from exporter.bundle_writer import write_bundle
from exporter.lint import lint_bundle
from exporter.parity import noised_inputs
from runtime.bundle import load_bundle
from runtime.errors import ExportError
from tests.conftest import CALIB
from tools.bench.synthetic import save_dit_pipeline


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return load_model(save_dit_pipeline(tmp_path_factory.mktemp("int4") / "model", "tiny"))


@pytest.fixture(scope="module")
def w4_fp32(dit):
    return calibrate(dit, CalibrationConfig(bits="W4A8", target="trt-fp32", **CALIB), progress=False)


def _graph(bundle):
    return onnx.load(str(bundle / "group_0.onnx"))  # external data from weights.bin


def test_int4_linears_hold_the_int8_containers_values_and_read_float_inputs(dit, w4_fp32, tmp_path):
    int8 = write_bundle(dit, w4_fp32, tmp_path / "int8", progress=False)
    int4 = write_bundle(dit, w4_fp32, tmp_path / "int4", progress=False, w4_linear="int4")
    linears = sum(1 for x in w4_fp32.layers if x.op == "linear")
    assert load_bundle(int4).manifest["w4_linear"] == {"INT4": linears}
    assert lint_bundle(int4)["violations"] == 0
    assert (int4 / "weights.bin").stat().st_size < 0.7 * (int8 / "weights.bin").stat().st_size
    g4, g8 = _graph(int4), _graph(int8)
    assert g4.opset_import[0].version == 21 and g4.ir_version >= 10
    inits4 = {t.name: t for t in g4.graph.initializer}
    inits8 = {t.name: numpy_helper.to_array(t) for t in g8.graph.initializer}
    producer = {o: n for n in g4.graph.node for o in n.output}
    seen = 0
    for node in g4.graph.node:
        dq = producer.get(node.input[1]) if node.op_type in ("MatMul", "Gemm") else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue  # the attention's activation products
        w = inits4[dq.input[0]]
        assert w.data_type == TensorProto.INT4, node.name
        np.testing.assert_array_equal(numpy_helper.to_array(w), inits8[dq.input[0].replace("/int4", "/int")])
        assert numpy_helper.to_array(inits4[dq.input[2]]).max() == 0  # symmetric
        source = producer.get(node.input[0])
        assert source is None or source.op_type != "DequantizeLinear", node.name  # weight-only: a float input
        seen += 1
    assert seen == linears
    conv = next(n for n in g4.graph.node if n.op_type == "Conv")
    assert producer[conv.input[0]].op_type == "DequantizeLinear"  # the patch embedding keeps int8 in and out


def test_the_int4_graph_computes_the_reference_with_float_linear_inputs(dit, w4_fp32, tmp_path):
    """The trt-fp32 graph, run by ONNX Runtime without its fusions, computes the reference whose Linears read float
    inputs (float rounding only), not the W4A8 reference; W4A16 on the Linears is closer to full precision. (With
    its fusions on, ONNX Runtime turns DQ(INT4) → MatMul into its own MatMulNBits, which requantizes the activations
    to int8 per block by default: not TensorRT's arithmetic, so not checked against the reference.)"""
    import onnxruntime as ort
    import torch

    out = write_bundle(dit, w4_fp32, tmp_path / "b", progress=False, w4_linear="int4")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(out / "group_0.onnx"), opts, providers=["CPUExecutionProvider"])
    refs = {"float inputs": w4_fp32.reference_model(dit.wrapper(), float_linear_inputs=True),
            "W4A8": w4_fp32.reference_model(dit.wrapper()), "FP": dit.wrapper()}  # fmt: skip
    err = dict.fromkeys(refs, 0.0)
    for t in (5, 400, 950):
        feeds = noised_inputs(dit.spec, dit.schedule, t, n=4, seed=0)
        got = session.run(None, feeds)[0]
        args = [torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "class_labels")]
        with torch.no_grad():
            for name, ref in refs.items():
                err[name] = max(err[name], float(np.abs(ref(*args).numpy() - got).max()))
    assert err["float inputs"] < 1e-5, err
    assert err["W4A8"] > 100 * err["float inputs"] and err["FP"] > err["float inputs"], err


def test_the_fp16_int4_graph_lints_clean_for_tensorrt(dit, tmp_path):
    result = calibrate(dit, CalibrationConfig(bits="W4A8", target="trt", **CALIB), progress=False)
    out = write_bundle(dit, result, tmp_path / "b", progress=False, w4_linear="int4")
    assert lint_bundle(out)["violations"] == 0
    g = _graph(out)
    scales = [t for t in g.graph.initializer if t.name.endswith("/scale") and "weight" in t.name]
    assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)


def test_int4_is_refused_where_it_cannot_work_before_any_work(dit, tmp_path):
    from tools.cli import main

    w4_ort = calibrate(dit, CalibrationConfig(bits="W4A8", **CALIB), progress=False)
    with pytest.raises(ExportError, match="--w4-linear int4: target ort-cpu; .*TensorRT's.*use nbits"):
        write_bundle(dit, w4_ort, tmp_path / "a", progress=False, w4_linear="int4")
    assert not (tmp_path / "a").exists()
    argv = ["compile", str(dit.source), "-o", str(tmp_path / "b"), "--target", "trt", "--w4-linear", "int4", "-q"]
    assert main(argv) == 2  # W8A8 has 8-bit weights
    assert not (tmp_path / "b").exists()


@pytest.mark.gpu
def test_tensorrt_builds_the_int4_bundle_and_matches_the_float_input_reference(dit, w4_fp32, tmp_path):
    """On a GPU with TensorRT: the INT4 trt-fp32 bundle builds (weight-only INT4 GEMMs), and its engine computes what
    the reference with float Linear inputs computes, to TensorRT's float rounding."""
    pytest.importorskip("tensorrt")
    import torch

    from runtime.tensorrt import trt_engine_set
    from tools.deploy.build import run_build

    out = write_bundle(dit, w4_fp32, tmp_path / "b", progress=False, w4_linear="int4")
    run_build(out, batch_sizes=(1, 4, 8), workspace_mb=256, progress=False)
    engine = trt_engine_set(load_bundle(out)).for_timestep(0)
    ref = w4_fp32.reference_model(dit.wrapper(), float_linear_inputs=True)
    for t in (5, 400, 950):
        feeds = noised_inputs(dit.spec, dit.schedule, t, n=4, seed=0)
        got = engine.infer(feeds["sample"], feeds["timestep"], feeds["class_labels"])
        with torch.no_grad():
            want = ref(*[torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "class_labels")]).numpy()
        assert np.abs(got - want).max() < 1e-2 * np.abs(want).max(), t
