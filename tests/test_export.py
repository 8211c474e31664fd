"""Export: Q/DQ placement, integer weights, ORT integer kernels, the bundle and its manifest."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from calibration.profiles import get_profile
from calibration.quantizers import activation_params
from exporter.bundle_writer import WEIGHTS, integer_op_summary, ort_optimized_op_counts
from exporter.qdq import LayerQuant, insert_qdq


def _three_node_graph():
    #   x ─► Conv(W, B) ─► Relu ─► y
    x = gs.Variable("x", np.float32, (1, 2, 4, 4))
    y = gs.Variable("y", np.float32, (1, 3, 4, 4))
    h = gs.Variable("h", np.float32)
    w = gs.Constant("unet.c.weight", np.full((3, 2, 1, 1), 0.5, np.float32))
    b = gs.Constant("unet.c.bias", np.array([0.1, 0.2, 0.3], np.float32))
    nodes = [
        gs.Node("Conv", "/unet/c/Conv", inputs=[x, w, b], outputs=[h]),
        gs.Node("Relu", "/unet/r/Relu", inputs=[h], outputs=[y]),
    ]
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17)


def _table():
    act = activation_params(-1, 1, signed=False)
    return {
        "c": LayerQuant(
            "conv",
            np.full((3, 2, 1, 1), 127, np.int8),
            np.full(3, 0.5 / 127, np.float32),
            act,
            act,
            np.array([5, 10, 15], np.int32),
            np.full(3, act.scale * 0.5 / 127, np.float32),
        )
    }


def test_insert_qdq_on_three_node_graph_is_idempotent():
    graph = _three_node_graph()
    report = insert_qdq(graph, _table(), get_profile("ort-cpu"))
    assert [q["layer"] for q in report["quantized"]] == ["c"]
    ops = sorted(n.op for n in graph.nodes)
    # input Q/DQ, weight DQ, bias DQ, output Q/DQ
    assert ops == sorted(
        [
            "QuantizeLinear",
            "DequantizeLinear",
            "DequantizeLinear",
            "DequantizeLinear",
            "Conv",
            "QuantizeLinear",
            "DequantizeLinear",
            "Relu",
        ]
    )
    conv = next(n for n in graph.nodes if n.op == "Conv")
    w_dq = conv.inputs[1].inputs[0]
    assert w_dq.op == "DequantizeLinear" and w_dq.inputs[0].values.dtype == np.int8 and w_dq.attrs["axis"] == 0
    assert conv.inputs[2].inputs[0].inputs[0].values.dtype == np.int32
    assert conv.outputs[0].outputs[0].op == "QuantizeLinear"
    before = len(graph.nodes)
    again = insert_qdq(graph, _table(), get_profile("ort-cpu"))
    assert again["quantized"] == [] and len(graph.nodes) == before


def test_ort_turns_every_conv_and_linear_into_an_integer_kernel(tiny_bundle, tmp_path):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    counts = ort_optimized_op_counts(tiny_bundle / "group_0.onnx", tmp_path / "opt.onnx")
    summary = integer_op_summary(counts)
    # the weights go beside the optimized graph (a graph past 2 GiB could not be written whole)
    assert (tmp_path / "opt.onnx.data").stat().st_size > (tmp_path / "opt.onnx").stat().st_size
    n_conv = sum(q["op"] == "Conv" for q in manifest["quantized_nodes"])
    n_gemm = sum(q["op"] == "Gemm" for q in manifest["quantized_nodes"])
    n_matmul = sum(q["op"] == "MatMul" for q in manifest["quantized_nodes"])
    assert counts.get("QLinearConv", 0) == n_conv > 0
    assert summary["float_conv"] == 0
    assert counts.get("QGemm", 0) == n_gemm > 0 and counts.get("Gemm", 0) == 0
    assert counts.get("MatMulIntegerToFloat", 0) + counts.get("QLinearMatMul", 0) == n_matmul > 0
    # the only float MatMuls left are the attention score/value products the manifest lists (the scores' with
    # their constant 1/√d scale fused in)
    float_matmuls = counts.get("MatMul", 0) + counts.get("FusedMatMul", 0)
    assert float_matmuls == len([f for f in manifest["float_nodes"] if f["op"] == "MatMul"])


def test_weights_are_int8_initializers_in_one_shared_file(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "group_0.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    dq_weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("weight/DQ")]
    assert dq_weights
    for n in dq_weights:
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT8
    float_weights = [
        t for t in model.graph.initializer if t.name.endswith(".weight") and t.data_type == onnx.TensorProto.FLOAT
    ]
    assert [t.name for t in float_weights] == ["unet.class_embedding.weight"]  # an embedding table, not a layer
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {WEIGHTS}


def test_manifest_describes_the_bundle(tiny_bundle, tiny_model):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["target"] == "ort-cpu" and m["bits"] == "W8A8"
    assert m["model"]["weight_sha256"] == tiny_model.weight_sha256
    assert len(m["timestep_to_group"]) == 1000 and set(m["timestep_to_group"]) == {0}
    assert set(m["files"]) == {"group_0.onnx", WEIGHTS}
    assert len(m["schedule"]["betas"]) == 1000
    assert m["calibration"]["sampler"] == "ddim" and m["calibration"]["steps"] == 10
    assert all(f["reason"] for f in m["float_nodes"])


def test_fold_shapes_makes_batch_independent_shape_values_constant():
    #   x(batch,4,2,2) ─► Shape ─► Gather(0) ─► Unsqueeze ─┐
    #                              [2, 8] ─────────────────┴► Concat ─► Reshape(x, ·) ─► y(batch,2,8)
    #                  └► Slice(-1:) ─► Cast ─► Sqrt ─► Div(1, ·) ─► Mul(y, ·) ─► z      (1/√2: a constant)
    from onnx import TensorProto, helper

    from exporter.simplify import fold_shapes

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 2, 2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    c = lambda v, name: onnx.numpy_helper.from_array(np.array(v), name)  # noqa: E731
    inits = [c(np.int64(0), "zero"), c([0], "axes"), c([2, 8], "rest"), c([-1], "start"), c([4], "end"),
             c(np.float32(1), "one")]  # fmt: skip
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
             helper.make_node("Concat", ["b1", "rest"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["y"]),
             helper.make_node("Slice", ["s", "start", "end"], ["w"]),
             helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT), helper.make_node("Sqrt", ["wf"], ["r"]),
             helper.make_node("Div", ["one", "r"], ["k"]), helper.make_node("Mul", ["y", "k"], ["z"])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [x], [z], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = fold_shapes(model)
    assert [n.op_type for n in out.graph.node] == ["Reshape", "Mul"]
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    reshape, mul = out.graph.node
    assert consts[reshape.input[1]].tolist() == [0, 2, 8]
    np.testing.assert_allclose(consts[mul.input[1]], [1 / np.sqrt(2)], rtol=1e-6)
    assert [n.op_type for n in fold_shapes(out).graph.node] == ["Reshape", "Mul"]  # idempotent
    import onnxruntime as ort

    for batch in (1, 5):
        v = np.random.default_rng(batch).standard_normal((batch, 4, 2, 2)).astype(np.float32)
        got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": v})[0]
        np.testing.assert_allclose(got, v.reshape(batch, 2, 8) / np.sqrt(2), rtol=1e-6)


def test_shape_conditioned_ifs_are_replaced_by_the_branch_they_take():
    #   x(batch,4,3) ─► Shape ─► Gather(1) ─► Equal(·, 1) ─► If ─┬ then: Squeeze(x, [1])     (x's dim 1 is 4: never)
    #                                                            └ else: Mul(x, two) ─► y
    # ONNX Runtime type-checks the then-branch and refuses the graph; inlined, it loads and computes 2x.
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from exporter.simplify import inline_shape_ifs

    c = lambda v, name: onnx.numpy_helper.from_array(np.array(v), name)  # noqa: E731
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    then = helper.make_graph([helper.make_node("Constant", [], ["axes"], value=c([1], "axes")),
                              helper.make_node("Squeeze", ["x", "axes"], ["sq"])], "then", [], [out("sq")])  # fmt: skip
    other = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["twice"])], "else", [], [out("twice")],
                              [c(np.float32(2), "two")])  # fmt: skip
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one_i"], ["d"], axis=0),
             helper.make_node("Equal", ["d", "one_i"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=other)]  # fmt: skip
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [c(np.int64(1), "one_i")]),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    model.ir_version = 8
    with pytest.raises(Exception, match="Squeeze"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inlined = inline_shape_ifs(model)
    assert [n.op_type for n in inlined.graph.node] == ["Mul"]
    session = ort.InferenceSession(inlined.SerializeToString(), providers=["CPUExecutionProvider"])
    v = np.random.default_rng(0).standard_normal((3, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": v})[0], 2 * v)
    # an If on the data stays, and the tensor its branch reads from outside (Neg's output) with it
    data_if = [helper.make_node("Neg", ["y"], ["neg"]), helper.make_node("ReduceMax", ["y"], ["m"], keepdims=0),
               helper.make_node("Greater", ["m", "zero_f"], ["positive"]),
               helper.make_node("If", ["positive"], ["z"], name="data_if",
                                then_branch=helper.make_graph([helper.make_node("Identity", ["neg"], ["a"])], "t", [],
                                                              [out("a")]),
                                else_branch=helper.make_graph([helper.make_node("Identity", ["y"], ["b"])], "e", [],
                                                              [out("b")]))]  # fmt: skip
    model.graph.node.extend(data_if)
    model.graph.initializer.append(c(np.float32(0), "zero_f"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    kept = inline_shape_ifs(model)
    assert [n.op_type for n in kept.graph.node] == ["Mul", "Neg", "ReduceMax", "Greater", "If"]
    got = ort.InferenceSession(kept.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": v})[0]
    np.testing.assert_array_equal(got, -2 * v if (2 * v).max() > 0 else 2 * v)


@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_models_past_the_protobuf_limit_take_the_external_data_path_with_the_same_bundle(
    tiny_model, tiny_result, tmp_path, monkeypatch, target
):
    """A Stable-Diffusion-sized UNet (3.4 GB) cannot be serialized as one protobuf: export, shape folding,
    version conversion, checks and ONNX Runtime's probes then work on files with external data. With the
    limit set to 0 the tiny model takes that path, and its bundle must be the one the in-memory path writes."""
    from calibration.calibrate import calibrate
    from calibration.config import CalibrationConfig
    from exporter import large_model
    from exporter.bundle_writer import write_bundle
    from exporter.lint import lint_bundle
    from runtime.bundle import load_bundle
    from tests.conftest import CALIB

    result = tiny_result if target == "ort-cpu" else calibrate(tiny_model, CalibrationConfig(target=target, **CALIB),
                                                               progress=False)  # fmt: skip
    small = write_bundle(tiny_model, result, tmp_path / "small", progress=False)
    calls = []
    real = large_model.weightless
    monkeypatch.setattr(large_model, "weightless", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(large_model, "PROTOBUF_LIMIT", 0)
    large = write_bundle(tiny_model, result, tmp_path / "large", progress=False)
    assert calls  # the external-data path ran
    monkeypatch.undo()
    a, b = load_bundle(small), load_bundle(large)
    assert a.manifest["files"] == b.manifest["files"]  # byte-identical graphs and weights
    assert lint_bundle(large)["violations"] == lint_bundle(small)["violations"]
    x = np.random.default_rng(0).standard_normal((2, *a.spec.sample_shape)).astype(np.float32)
    if target == "ort-cpu":
        t, labels = np.array([500, 500]), np.array([1, 2])
        ya = a.engines(backend="ort").for_timestep(500).infer(x, t, labels)
        yb = b.engines(backend="ort").for_timestep(500).infer(x, t, labels)
        np.testing.assert_array_equal(ya, yb)


def test_a_model_past_the_limit_is_saved_with_its_weights_beside_it(tiny_model, tmp_path, monkeypatch):
    from exporter import large_model
    from exporter.onnx_export import export_float

    fp = export_float(tiny_model)
    expected = {t.name: t.raw_data for t in fp.graph.initializer}
    monkeypatch.setattr(large_model, "PROTOBUF_LIMIT", 0)
    path = large_model.save(fp, tmp_path / "fp32.onnx")
    assert (tmp_path / "fp32.onnx.data").stat().st_size > 0.9 * sum(len(v) for v in expected.values())
    assert {t.name: t.raw_data for t in fp.graph.initializer} == expected  # the in-memory model is untouched
    loaded = onnx.load(str(path))
    assert {t.name: t.raw_data for t in loaded.graph.initializer} == expected


def test_passes_on_a_model_past_the_limit_do_not_grow_the_process(tmp_path, monkeypatch):
    """Saving, shape inference and version conversion of a large model work on a weightless copy: stripping the
    model in place and restoring it left every restored weight in protobuf's arena a second time (+ the model's
    size per pass: 3 GB per save of a DiT-XL/2-sized graph)."""
    from onnx import helper, numpy_helper

    from exporter import large_model
    from tools.bench.group_bench import rss_mb

    weight = np.arange(16 * 2**20, dtype=np.float32)  # 64 MiB
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])],
                              [numpy_helper.from_array(weight, "w")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    monkeypatch.setattr(large_model, "PROTOBUF_LIMIT", 0)
    large_model.save(model, tmp_path / "warm.onnx")
    before = rss_mb()
    for k in range(4):
        large_model.save(model, tmp_path / f"m{k}.onnx")
        large_model.infer_shapes(model)
    assert rss_mb() - before < 64  # the old in-place path grew by 8 x 64 MiB here
    loaded = onnx.load(str(tmp_path / "m3.onnx"))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight)
    converted = large_model.convert_version(model, 17)
    assert converted.opset_import[0].version == 17
    np.testing.assert_array_equal(numpy_helper.to_array(converted.graph.initializer[0]), weight)
    assert model.graph.initializer[0].raw_data == weight.tobytes()  # the in-memory model keeps its weights
