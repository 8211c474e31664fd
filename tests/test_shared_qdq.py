"""One Q/DQ per tensor: layers that read one tensor (q/k/v of self-attention, the K/V projections of every
cross-attention, the resnets' time projections) share one input quantizer in calibration and one Q/DQ in the
graph, on both export profiles; the lint rule qdq-shared finds a tensor quantized twice."""

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from calibration.calibrate import calibrate, example_inputs
from calibration.config import CalibrationConfig
from calibration.model_io import load_model
from calibration.qmodules import quantizable_layers, tie_shared_inputs
from exporter.bundle_writer import write_bundle
from exporter.lint import lint_bundle, lint_model
from exporter.parity import layer_parity, noised_inputs
from runtime.bundle import load_bundle
from runtime.errors import ExportError
from tests.conftest import CALIB
from tests.models import tiny_text_pipeline


def _shares(layers) -> dict[str, str]:
    return {layer.name: layer.shares for layer in layers if layer.shares is not None}


def _producers(model: onnx.ModelProto) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def _layer_node(model: onnx.ModelProto, layer: str):
    """The Conv/Gemm/MatMul of a layer, by the exporter's scope names ("/unet/<module path>/<Op>")."""
    for n in model.graph.node:
        path = n.name.strip("/").split("/")
        if n.op_type in ("Conv", "Gemm", "MatMul") and path[0] == "unet" and ".".join(path[1:-1]) == layer:
            return n
    raise KeyError(layer)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return load_model(tiny_text_pipeline(tmp_path_factory.mktemp("pipe") / "p"), prompts=("a 7", "a 3", "nine"))


def test_calibration_ties_the_layers_that_read_one_tensor(tiny_model, text_model):
    shares = _shares(tie_shared_inputs(tiny_model.wrapper(), quantizable_layers(tiny_model.unet),
                                       example_inputs(tiny_model)))  # fmt: skip
    attentions = {n.rsplit(".", 1)[0] for n in shares if n.endswith((".to_k", ".to_v"))}
    assert len(attentions) == 4  # every attention block of the tiny UNet
    for a in attentions:
        assert shares[f"{a}.to_k"] == shares[f"{a}.to_v"] == f"{a}.to_q"
    projections = [n for n, _ in tiny_model.unet.named_modules() if n.endswith("time_emb_proj")]
    assert len(projections) == 8 and projections[0] not in shares
    assert all(shares[p] == projections[0] for p in projections[1:])
    assert not any(n.endswith(("conv1", "conv2", "to_out.0")) for n in shares)

    shares = _shares(tie_shared_inputs(text_model.wrapper(), quantizable_layers(text_model.unet),
                                       example_inputs(text_model)))  # fmt: skip
    kv = [n for n, _ in text_model.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(kv) == 8 and kv[0] not in shares  # one text embedding for every cross-attention
    assert all(shares[n] == kv[0] for n in kv[1:])
    assert not any(n.endswith("attn2.to_q") for n in shares)  # reads the image tokens, not the text


@pytest.mark.parametrize("groups", [1, 2])
def test_learned_steps_stay_one_quantizer_per_tensor(tiny_model, groups):
    cfg = CalibrationConfig.for_method("qdiffusion", adaround_iters=10, act_iters=10, recon_batch=8, groups=groups,
                                       group_epochs=1, **CALIB)  # fmt: skip
    result = calibrate(tiny_model, cfg, progress=False)
    shares = _shares(result.layers)
    assert len(shares) >= 16
    for g in range(result.num_groups):
        acts = result.group_activations(g)
        for layer, owner in shares.items():
            assert acts[f"{layer}:input"] == acts[f"{owner}:input"], (g, layer)
    # the LSQ pass moved them: a tie that only held at the observed ranges would be a weaker test
    observed = calibrate(tiny_model, dataclasses.replace(cfg, act_iters=0, groups=1), progress=False)
    moved = [
        p for p in shares.values() if result.group_activations(0)[f"{p}:input"] != observed.activations[f"{p}:input"][0]
    ]
    assert moved


@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_the_graph_quantizes_each_shared_tensor_once(text_model, target, tmp_path):
    result = calibrate(text_model, CalibrationConfig(target=target, **CALIB), progress=False)
    bundle = write_bundle(text_model, result, tmp_path / "b", progress=False)
    manifest = load_bundle(bundle).manifest
    shares = _shares(result.layers)
    assert manifest["shared_input_qdq"] == shares  # every tie became one Q/DQ in the graph
    model = onnx.load(str(bundle / "group_0.onnx"))
    made = _producers(model)
    for layer, owner in shares.items():
        a, b = _layer_node(model, layer), _layer_node(model, owner)
        assert a.input[0] == b.input[0] and made[a.input[0]].op_type == "DequantizeLinear", layer
    dq = made[_layer_node(model, shares[next(iter(shares))]).input[0]]
    q = made[dq.input[0]]
    assert q.op_type == "QuantizeLinear"
    # one Q per float tensor: no two Q nodes (behind their b-bit Clips) read the same tensor
    sources = [made[q.input[0]].input[0] if made.get(q.input[0]) is not None and made[q.input[0]].op_type == "Clip"
               else q.input[0] for q in model.graph.node if q.op_type == "QuantizeLinear"]  # fmt: skip
    assert len(sources) == len(set(sources))
    report = lint_bundle(bundle)
    found = [v for vs in report["groups"].values() for v in vs if v["rule"] == "qdq-shared"]
    assert found == []


def test_the_shared_layers_match_their_reference_on_integer_kernels(text_model, tmp_path):
    result = calibrate(text_model, CalibrationConfig(**CALIB), progress=False)
    bundle = write_bundle(text_model, result, tmp_path / "b", progress=False)
    feeds = noised_inputs(text_model.spec, text_model.schedule, 500, 4, 0)
    report = layer_parity(load_bundle(bundle).group_model(0, load_weights=True),
                          result.reference_model(text_model.wrapper()), feeds)  # fmt: skip
    for layer in _shares(result.layers):  # the parity probe follows a layer into the Q/DQ it shares
        assert layer in report
        assert report[layer]["rel_err"] < 1e-4, (layer, report[layer])


def test_lint_finds_a_tensor_quantized_twice(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "group_0.onnx"))
    assert not [v for v in lint_model(model, "ort-cpu") if v.rule == "qdq-shared"]
    graph = gs.import_onnx(model)
    dq = next(n for n in graph.nodes if n.op == "DequantizeLinear" and len(n.outputs[0].outputs) == 3
              and all(c.op == "MatMul" for c in n.outputs[0].outputs))  # q/k/v of one attention  # fmt: skip
    q = dq.inputs[0].inputs[0]
    reader = dq.outputs[0].outputs[2]
    q2 = gs.Node("QuantizeLinear", "again/Q", inputs=list(q.inputs), outputs=[gs.Variable("again/q", np.uint8)])
    dq2 = gs.Node("DequantizeLinear", "again/DQ", inputs=[q2.outputs[0], *dq.inputs[1:]],
                  outputs=[gs.Variable("again/dq", np.float32)])  # fmt: skip
    graph.nodes += [q2, dq2]
    reader.inputs[reader.inputs.index(dq.outputs[0])] = dq2.outputs[0]
    found = [v for v in lint_model(gs.export_onnx(graph.toposort()), "ort-cpu") if v.rule == "qdq-shared"]
    assert len(found) == 1 and found[0].node == "again/Q" and q.name in found[0].message


def test_a_result_without_ties_exports_one_qdq_per_layer_and_a_broken_tie_is_refused(tiny_model, tiny_result, tmp_path):
    untied = dataclasses.replace(tiny_result, layers=[dataclasses.replace(x, shares=None) for x in tiny_result.layers])
    bundle = write_bundle(tiny_model, untied, tmp_path / "untied", progress=False)
    assert load_bundle(bundle).manifest["shared_input_qdq"] == {}
    layer, owner = next(iter(_shares(tiny_result.layers).items()))
    acts = {p: list(v) for p, v in tiny_result.activations.items()}
    acts[f"{layer}:input"][0] = dataclasses.replace(
        acts[f"{layer}:input"][0], scale=2 * acts[f"{layer}:input"][0].scale
    )
    broken = dataclasses.replace(tiny_result, activations=acts)
    with pytest.raises(ExportError, match=f"layer {layer}: shares its input quantizer with {owner}"):
        write_bundle(tiny_model, broken, tmp_path / "broken", progress=False)
    assert not (tmp_path / "broken").exists()
