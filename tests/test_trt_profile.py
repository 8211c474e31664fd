"""The TensorRT export profiles: Q/DQ placement TensorRT's explicit quantization fuses, a strongly typed
FP16 graph, and calibration modelling the same points (parity on the FP32 variant, which ORT runs)."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto

from exporter.parity import end_to_end_parity, layer_parity, noised_inputs
from exporter.precision import to_float_type
from exporter.qdq import insert_residual_qdq
from runtime.bundle import load_bundle
from tests.conftest import CALIB


@pytest.fixture(scope="module", params=["trt-fp32", "trt"])
def trt_bundle(request, tiny_model, tmp_path_factory):
    from calibration.calibrate import calibrate
    from calibration.config import CalibrationConfig
    from exporter.bundle_writer import write_bundle

    result = calibrate(tiny_model, CalibrationConfig(target=request.param, **CALIB), progress=False)
    bundle = write_bundle(tiny_model, result, tmp_path_factory.mktemp("trt") / "bundle", progress=False)
    return request.param, result, bundle


def _graph(bundle):
    return onnx.load(str(bundle / "group_0.onnx"))


def _const(model, name):
    for t in model.graph.initializer:
        if t.name == name:
            return onnx.numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return onnx.numpy_helper.to_array(n.attribute[0].t)
    raise KeyError(name)


def test_trt_graph_places_symmetric_int8_qdq_on_layer_inputs_and_residuals(trt_bundle):
    target, result, bundle = trt_bundle
    model = _graph(bundle)
    assert model.opset_import[0].version == 19
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            assert _const(model, node.input[2]).dtype == np.int8 and not _const(model, node.input[2]).any()
        if node.op_type == "Conv":  # input and weight dequantized, bias float, no Q on the output
            assert producers[node.input[0]].op_type == "DequantizeLinear"
            w = producers[node.input[1]]
            assert w.op_type == "DequantizeLinear" and onnx.helper.get_attribute_value(w.attribute[0]) == 0
            bias = producers.get(node.input[2]) if len(node.input) > 2 else None
            assert bias is None or bias.op_type != "DequantizeLinear", node.name
    assert not any(p.endswith(":output") for p in result.activations)  # no quantized layer outputs
    assert not any(n.name.endswith("/output/Q") for n in model.graph.node)
    residuals = [p for p in result.activations if p.endswith(":residual")]
    assert len(residuals) == 8  # every resnet of the tiny UNet
    adds = [q for q in load_bundle(bundle).manifest["quantized_nodes"] if q["op"] == "Add"]
    assert sorted(q["layer"] for q in adds) == sorted(residuals)
    for q in adds:
        add = next(n for n in model.graph.node if n.name == q["node"])
        kinds = sorted(producers[x].op_type for x in add.input)
        assert kinds == ["Conv", "DequantizeLinear"], (q, kinds)


def test_trt_fp32_layers_and_residuals_match_their_reference(trt_bundle, tiny_model):
    target, result, bundle = trt_bundle
    if target != "trt-fp32":
        pytest.skip("ONNX Runtime runs the FP32 variant of the placement exactly")
    reference = result.reference_model(tiny_model.wrapper())
    for t in (5, 950):
        feeds = noised_inputs(tiny_model.spec, tiny_model.schedule, t, n=4, seed=0)
        report = layer_parity(bundle / "group_0.onnx", reference, feeds)
        assert len(report) == len(result.weights)
        assert max(r["rel_err"] for r in report.values()) < 1e-4, report
    engine = load_bundle(bundle).engines().for_timestep(0)
    r = end_to_end_parity(engine, reference, tiny_model.wrapper(), tiny_model.spec, tiny_model.schedule)
    assert r["engine_vs_reference_error"] <= 1.5, r


def test_trt_fp16_graph_is_strongly_typed_and_keeps_the_timestep_embedding_fp32(trt_bundle):
    target, _, bundle = trt_bundle
    if target != "trt":
        pytest.skip("the FP16 profile")
    model = _graph(bundle)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    fp32 = [name for name, t in types.items() if t == TensorProto.FLOAT]
    assert fp32 and all("time_proj" in n or n.startswith("/unet/Cast") or "upsamplers" in n for n in fp32), fp32
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert _const(model, node.input[1]).dtype == np.float16, node.name
        if node.op_type in ("Conv", "Gemm", "MatMul", "InstanceNormalization"):
            assert types.get(node.input[0]) == TensorProto.FLOAT16, node.name
    io = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert io["sample"] == TensorProto.FLOAT and io["eps"] == TensorProto.FLOAT


def test_fp16_graph_computes_what_the_fp32_graph_computes(trt_bundle, tiny_model, tmp_path):
    """ONNX Runtime's CPU kernels run the FP16 graph too. FP16 rounding moves values across requantization
    boundaries, and the flips cascade (5.3 % of ‖ε‖ at t = 600 on this tiny untrained model, 1.05× the FP32
    twin's distance to the fake-quant reference), so what must hold is the quality: the FP16 graph's error
    against full precision is the FP32 twin's and the reference's, not worse."""
    target, result, bundle = trt_bundle
    if target != "trt":
        pytest.skip("the FP16 profile")
    import dataclasses

    from exporter.bundle_writer import write_bundle

    cfg = dataclasses.replace(result.config, target="trt-fp32")
    twin = write_bundle(tiny_model, dataclasses.replace(result, config=cfg), tmp_path / "fp32", progress=False)
    feeds = noised_inputs(tiny_model.spec, tiny_model.schedule, 600, n=4, seed=1)
    args = (feeds["sample"], feeds["timestep"], feeds["class_labels"])
    e16 = load_bundle(bundle).engines().for_timestep(600).infer(*args)
    e32 = load_bundle(twin).engines().for_timestep(600).infer(*args)
    assert e16.dtype == np.float32
    assert np.linalg.norm(e16 - e32) / np.linalg.norm(e32) < 0.15  # the same function, up to flips
    reference, fp = result.reference_model(tiny_model.wrapper()), tiny_model.wrapper()
    r16, r32 = (
        end_to_end_parity(load_bundle(b).engines().for_timestep(0), reference, fp, tiny_model.spec, tiny_model.schedule)
        for b in (bundle, twin)
    )
    assert r16["engine_vs_reference_error"] <= 1.5 and r16["parity_ratio"] <= 1.5, r16
    assert r16["engine_vs_reference_error"] <= 1.1 * r32["engine_vs_reference_error"], (r16, r32)


def test_residual_pass_on_a_resnet_tail_is_idempotent():
    #   x ─► conv2 ─► h ─┐
    #   r ───────────────┴► Add ─► y          (the resnet's skip Add: r is the residual)
    from calibration.quantizers import activation_params

    x = gs.Variable("x", np.float32, (1, 2, 4, 4))
    r = gs.Variable("r", np.float32, (1, 2, 4, 4))
    h, y = gs.Variable("h", np.float32), gs.Variable("y", np.float32, (1, 2, 4, 4))
    w = gs.Constant("w", np.ones((2, 2, 1, 1), np.float32))
    nodes = [
        gs.Node("Conv", "/unet/blk.0/conv2/Conv", inputs=[x, w], outputs=[h]),
        gs.Node("Add", "/unet/blk.0/Add", inputs=[r, h], outputs=[y]),
    ]
    graph = gs.Graph(nodes=nodes, inputs=[x, r], outputs=[y], opset=19)
    params = {"blk.0": activation_params(-2, 2, signed=True)}
    assert [q["layer"] for q in insert_residual_qdq(graph, params)] == ["blk.0:residual"]
    add = next(n for n in graph.nodes if n.op == "Add")
    assert add.inputs[0].inputs[0].op == "DequantizeLinear" and add.inputs[1].inputs[0].op == "Conv"
    before = len(graph.nodes)
    assert insert_residual_qdq(graph, params) == [] and len(graph.nodes) == before
    with pytest.raises(Exception, match="no skip Add"):
        insert_residual_qdq(graph, {"other": params["blk.0"]})


def test_float_type_pass_refuses_scales_fp16_cannot_hold():
    from onnx import helper

    from runtime.errors import ExportError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    inits = [onnx.numpy_helper.from_array(np.array(1e-9, np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(0, np.int8), "z")]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]  # fmt: skip
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 19)]
    )
    with pytest.raises(ExportError, match="scale s: 1e-09 is not representable in float16"):
        to_float_type(model, "float16")
    assert to_float_type(model, "float32").graph.initializer[0].data_type == TensorProto.FLOAT


def test_a_transformer_blocks_quantized_residual_is_the_same_in_torch_and_in_the_graph(tmp_path):
    """A diffusers Transformer2DModel (conv proj_in/proj_out, cross-attention) with its residual quantized:
    wrap_residuals' forward hook (proj_out(h) + Q(x)) and the exported graph with insert_residual_qdq's Q/DQ on
    the block's Add agree to float rounding on ONNX Runtime; without the quantizer they differ by its noise."""
    import onnxruntime as ort
    import torch
    from diffusers.models import Transformer2DModel

    from calibration.qmodules import ActQuant, residual_points, wrap_residuals
    from calibration.quantizers import activation_params
    from runtime.engine import session_options

    torch.manual_seed(0)

    class Unet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blk = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                          norm_num_groups=4, cross_attention_dim=12)  # fmt: skip

        def forward(self, x, c):
            return self.blk(x, encoder_hidden_states=c, return_dict=False)[0]

    class Net(torch.nn.Module):  # the block at /unet/blk/… as in a UNet's graph
        def __init__(self) -> None:
            super().__init__()
            self.unet = Unet()

        def forward(self, x, c):
            return self.unet(x, c)

    net = Net().eval()
    with torch.no_grad():  # a proj_out that is not zero, as a trained block's
        net.unet.blk.proj_out.weight.normal_(0, 0.2)
    x, c = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)
    params = activation_params(-3.0, 3.0, signed=True)
    from calibration.profiles import get_profile

    assert residual_points(net.unet, get_profile("trt")) == ["blk:residual"]
    path = tmp_path / "blk.onnx"
    torch.onnx.export(net, (x, c), str(path), input_names=["x", "c"], output_names=["y"], opset_version=19,
                      dynamo=False)  # fmt: skip
    graph = gs.import_onnx(onnx.load(str(path)))
    assert [q["layer"] for q in insert_residual_qdq(graph, {"blk": params})] == ["blk:residual"]
    quantized = tmp_path / "blk_q.onnx"
    onnx.save(gs.export_onnx(graph), str(quantized))
    session = ort.InferenceSession(str(quantized), session_options(ort), providers=["CPUExecutionProvider"])
    y_graph = session.run(["y"], {"x": x.numpy(), "c": c.numpy()})[0]
    with torch.no_grad():
        y_float = net(x, c).numpy()
        wrap_residuals(net, lambda p: ActQuant(params) if p == "blk:residual" else None, prefix="unet.")
        y_torch = net(x, c).numpy()
    step = params.scale  # 3 / 127: a rounding that flipped would show as one such step
    assert np.abs(y_graph - y_torch).max() < 1e-4, np.abs(y_graph - y_torch).max()
    assert np.abs(y_graph - y_float).max() > 0.1 * step  # the Q/DQ is really there
