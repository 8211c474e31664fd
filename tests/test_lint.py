"""Graph lint: each target rule fires on a hand-made graph that breaks it, and names the bad node."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.lint import Violation, lint_bundle, lint_model
from runtime.errors import ConfigError


def _model(nodes, inits, opset=19, inputs=(), outputs=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "g", [x, *inputs], [y, *outputs], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _node(nodes, name):
    return next(n for n in nodes if n.name == name)


def _trt_parts(ft=np.float16):
    #   x(fp32) ─► cast_in ─► x16 ─► q_in ─► dq_in ─► conv ─► add ─► cast_out ─► y(fp32)
    #                          │                       ▲  ▲     ▲
    #                          │      w_int8 ─► dq_w ──┘  b16   │      (per-channel, axis 0)
    #                          └──► q_res ─► dq_res ────────────┘      (quantized residual)
    to = helper.np_dtype_to_tensor_dtype(np.dtype(ft))
    inits = {
        "x_scale": np.array(0.05, ft),
        "x_zp": np.array(0, np.int8),
        "w": np.array([[[[100]], [[-50]]], [[[20]], [[127]]]], np.int8),
        "w_scale": np.array([0.01, 0.02], ft),
        "w_zp": np.zeros(2, np.int8),
        "b": np.array([0.1, -0.1], ft),
    }
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], name="cast_in", to=to),
        helper.make_node("QuantizeLinear", ["x16", "x_scale", "x_zp"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wdq"], name="dq_w", axis=0),
        helper.make_node("Conv", ["xdq", "wdq", "b"], ["h"], name="conv"),
        helper.make_node("QuantizeLinear", ["x16", "x_scale", "x_zp"], ["rq"], name="q_res"),
        helper.make_node("DequantizeLinear", ["rq", "x_scale", "x_zp"], ["rdq"], name="dq_res"),
        helper.make_node("Add", ["h", "rdq"], ["s"], name="add"),
        helper.make_node("Cast", ["s"], ["y"], name="cast_out", to=TensorProto.FLOAT),
    ]
    return nodes, inits


def test_good_trt_graph_lints_clean():
    assert lint_model(_model(*_trt_parts()), "trt") == []


def test_fp32_graph_is_clean_for_trt_fp32_but_not_strongly_typed_fp16():
    model = _model(*_trt_parts(np.float32))
    assert lint_model(model, "trt-fp32") == []
    violations = lint_model(model, "trt")
    assert {v.rule for v in violations} == {"strongly-typed"}
    assert {"conv", "q_in", "dq_w", "add"} <= {v.node for v in violations}


def _uint8_activations(nodes, inits):
    inits["x_zp"] = np.array(0, np.uint8)


def _nonzero_zero_point(nodes, inits):
    inits["x_zp"] = np.array(3, np.int8)


def _zero_scale(nodes, inits):
    inits["x_scale"] = np.array(0.0, np.float16)


def _scale_from_input(nodes, inits):
    del inits["x_scale"]
    return [helper.make_tensor_value_info("x_scale", TensorProto.FLOAT16, [])], []


def _q_feeds_identity(nodes, inits):
    nodes.append(helper.make_node("Identity", ["xq"], ["xq_copy"], name="peek"))
    return [], [helper.make_tensor_value_info("xq_copy", TensorProto.INT8, [1, 2, 4, 4])]


def _weight_axis_1(nodes, inits):
    _node(nodes, "dq_w").attribute[0].i = 1


def _per_tensor_weight(nodes, inits):
    inits["w_scale"], inits["w_zp"] = np.array(0.02, np.float16), np.array(0, np.int8)


def _float_weight(nodes, inits):
    nodes.remove(_node(nodes, "dq_w"))
    _node(nodes, "conv").input[1] = "w_f"
    inits["w_f"] = np.ones((2, 2, 1, 1), np.float16)


def _residual_not_quantized(nodes, inits):
    nodes.remove(_node(nodes, "q_res"))
    nodes.remove(_node(nodes, "dq_res"))
    _node(nodes, "add").input[1] = "x16"


def _fp32_scale(nodes, inits):
    inits["x_scale"] = np.array(0.05, np.float32)


BAD_TRT = [
    (_uint8_activations, "qdq-type", "q_in"),
    (_nonzero_zero_point, "qdq-zero-point", "q_in"),
    (_zero_scale, "qdq-constant", "dq_in"),
    (_scale_from_input, "qdq-constant", "q_in"),
    (_q_feeds_identity, "qdq-pair", "q_in"),
    (_weight_axis_1, "weight-per-channel", "dq_w"),
    (_per_tensor_weight, "weight-per-channel", "dq_w"),
    (_float_weight, "quantized-input", "conv"),
    (_residual_not_quantized, "residual-add", "add"),
    (_fp32_scale, "strongly-typed", "q_in"),
]


@pytest.mark.parametrize(("mutate", "rule", "node"), BAD_TRT, ids=[m.__name__.strip("_") for m, *_ in BAD_TRT])
def test_each_trt_rule_fires_alone_and_names_the_node(mutate, rule, node):
    nodes, inits = _trt_parts()
    extra_in, extra_out = mutate(nodes, inits) or ([], [])
    violations = lint_model(_model(nodes, inits, inputs=extra_in, outputs=extra_out), "trt")
    assert {v.rule for v in violations} == {rule}, violations
    assert node in {v.node for v in violations}
    assert all(node in v.message for v in violations if v.node == node)


def test_opset_below_the_profile_is_the_one_violation():
    violations = lint_model(_model(*_trt_parts(), opset=17), "trt")
    assert [(v.rule, v.node) for v in violations] == [("opset", "graph")]
    assert "19" in violations[0].message


def test_nodes_without_names_are_labelled_by_op_and_output():
    nodes, inits = _trt_parts()
    _float_weight(nodes, inits)
    for n in nodes:
        n.name = ""
    assert [v.node for v in lint_model(_model(nodes, inits), "trt")] == ["Conv(h)"]


def _linear_model(w_axis=0):
    #   x16 ─► q ─► dq ─► Gemm(transB=1) ─► h ─┐
    #                      ▲                    ├─► MatMul (activation × activation: stays float) ─► y
    #        w_int8 ─► dq_w (axis w_axis)       │
    #   x16 ────────────────────────────────────┘  (h: [4, 3], x16ᵀ: [3, 4])
    inits = {
        "s": np.array(0.1, np.float16),
        "z": np.array(0, np.int8),
        "w": np.ones((3, 3), np.int8),
        "ws": np.full(3, 0.01, np.float16),
        "wz": np.zeros(3, np.int8),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wdq"], name="dq_w", axis=w_axis),
        helper.make_node("Gemm", ["dq", "wdq"], ["h"], name="gemm", transB=1),
        helper.make_node("Transpose", ["x"], ["xt"], name="t"),
        helper.make_node("MatMul", ["h", "xt"], ["y"], name="attn"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 4])
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_gemm_weight_per_output_channel_and_float_attention_matmul():
    assert lint_model(_linear_model(w_axis=0), "trt") == []
    violations = lint_model(_linear_model(w_axis=1), "trt")
    assert [(v.rule, v.node) for v in violations] == [("weight-per-channel", "dq_w")]


def _ort_parts(output_q=True):
    #   x ─► q_in(u8) ─► dq_in ─► conv ─► q_out(u8) ─► dq_out ─► y
    #                              ▲  ▲
    #            w_int8 ─► dq_w ───┘  └── dq_b ◄─ b_int32           (per-channel, axis 0)
    inits = {
        "x_scale": np.array(0.02, np.float32),
        "x_zp": np.array(128, np.uint8),
        "w": np.full((2, 2, 1, 1), 64, np.int8),
        "w_scale": np.array([0.01, 0.02], np.float32),
        "w_zp": np.zeros(2, np.int8),
        "b": np.array([5, -5], np.int32),
        "b_scale": np.array([0.0002, 0.0004], np.float32),
        "b_zp": np.zeros(2, np.int32),
        "y_scale": np.array(0.05, np.float32),
        "y_zp": np.array(120, np.uint8),
    }
    conv_out = "h" if output_q else "y"
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q_in"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wdq"], name="dq_w", axis=0),
        helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zp"], ["bdq"], name="dq_b", axis=0),
        helper.make_node("Conv", ["xdq", "wdq", "bdq"], [conv_out], name="conv"),
    ]
    if output_q:
        nodes += [
            helper.make_node("QuantizeLinear", ["h", "y_scale", "y_zp"], ["hq"], name="q_out"),
            helper.make_node("DequantizeLinear", ["hq", "y_scale", "y_zp"], ["y"], name="dq_out"),
        ]
    return nodes, inits


def test_ort_cpu_graph_lints_clean_and_needs_the_conv_output_q():
    assert lint_model(_model(*_ort_parts(), opset=17), "ort-cpu") == []
    violations = lint_model(_model(*_ort_parts(output_q=False), opset=17), "ort-cpu")
    assert [(v.rule, v.node) for v in violations] == [("conv-output", "conv")]
    nodes, inits = _ort_parts()
    inits["w_zp"] = np.array([0, 1], np.int8)  # asymmetric weights: ORT wants them symmetric too
    assert [(v.rule, v.node) for v in lint_model(_model(nodes, inits, opset=17), "ort-cpu")] == [
        ("qdq-zero-point", "dq_w")
    ]


def test_external_scale_that_was_not_loaded_is_reported_not_skipped():
    model = _model(*_trt_parts())
    scale = next(t for t in model.graph.initializer if t.name == "w_scale")
    scale.ClearField("raw_data")
    scale.data_location = TensorProto.EXTERNAL
    scale.external_data.add(key="location", value="weights.bin")
    violations = lint_model(model, "trt")
    assert [(v.rule, v.node) for v in violations] == [("unchecked", "dq_w")]


def test_unknown_target_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="ort-cpu"):
        lint_model(_model(*_trt_parts()), "tensorrt")


def test_lint_bundle_on_the_tiny_ort_cpu_bundle(tiny_bundle):
    report = lint_bundle(tiny_bundle)
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert report["target"] == "ort-cpu" and report["violations"] == 0
    assert set(report["groups"]) == {g["id"] for g in manifest["groups"]}
    trt = lint_bundle(tiny_bundle, "trt")
    found = [Violation(**v) for vs in trt["groups"].values() for v in vs]
    assert trt["violations"] == len(found) > 0
    assert {"qdq-type", "qdq-zero-point", "opset"} <= {v.rule for v in found}
    graph = onnx.load(str(tiny_bundle / "group_0.onnx"), load_external_data=False).graph
    assert {v.node for v in found} <= {n.name for n in graph.node} | {"graph"}
    with pytest.raises(ConfigError):
        lint_bundle(tiny_bundle, "tensorrt")
