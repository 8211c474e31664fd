"""One OpenVINO compiled model for every timestep group (runtime.openvino_single): the rewrite computes each group's
function, OpenVINO still runs the quantized layers in int8, one model is compiled for all groups, and the b-bit
Clip bounds travel as inputs."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from runtime.bundle import load_bundle
from tools.cli import main

pytest.importorskip("openvino")


def _compile(tiny_dir, tmp_path_factory, bits: str):
    out = tmp_path_factory.mktemp("ov_single") / "b"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "apqdm", "--groups", "3", "--group-epochs", "1",
            "--bits", bits, "--steps", "10", "--calib-samples", "8", "--calib-timesteps", "6", "-q"]  # fmt: skip
    assert main(argv) == 0
    return load_bundle(out)


@pytest.fixture(scope="module")
def w8(tiny_dir, tmp_path_factory):
    return _compile(tiny_dir, tmp_path_factory, "W8A8")


@pytest.fixture(scope="module")
def w6(tiny_dir, tmp_path_factory):
    """Below 8 bits a float Clip to the group's b-bit grid sits in front of each quantizer: its bounds differ per
    group too."""
    return _compile(tiny_dir, tmp_path_factory, "W6A6")


def _inputs(spec, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *spec.sample_shape)).astype(np.float32), np.arange(n) % 10


def _first_t(bundle, g: int) -> int:
    return int(np.flatnonzero(bundle.group_of_t == g)[0])


def _plain_ort(model, feeds: dict) -> dict[str, np.ndarray]:
    """Every node output of `model` on ONNX Runtime with graph optimizations off: each QuantizeLinear,
    DequantizeLinear and Conv as the ONNX operators define them, in float32."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    names = [o for n in model.graph.node for o in n.output if o]
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    reads = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in reads}), strict=True))


@pytest.mark.parametrize("which", ["w8", "w6"])
def test_the_rewritten_graph_computes_each_groups_codes(which, request):
    """The one graph with group g's inputs against group g's own graph, both on the ONNX operators' reference
    semantics (ONNX Runtime, optimizations off): wherever a quantizer's input is the same float in both, the one
    graph's group-0 quantizer on the mapped input gives group g's code (Q_0(x·s_0/s_g + (z_g − z_0)·s_0) = Q_g(x)),
    but at float32 ties of x/s_g. Inputs differ only downstream of a layer whose float sum was reassociated
    (a·(W·D) against W·(a·D)), which is where the rare flipped code of the outputs comes from. And the output
    is nearer its own group's than any other group's."""
    from onnx import numpy_helper

    from runtime.engine import input_feeds
    from runtime.openvino_single import affine_graph

    bundle = request.getfixturevalue(which)
    groups = sorted(g["id"] for g in bundle.manifest["groups"])
    graph, tables = affine_graph(bundle, groups)
    if which == "w6":
        assert any(k.endswith(("clip_min", "clip_max")) for k in tables), "the b-bit Clip bounds are per-group inputs"
    x, labels = _inputs(bundle.spec)
    finals = {}
    for i, g in enumerate(groups):
        t = np.full(len(x), _first_t(bundle, g), np.int64)
        feeds = input_feeds(bundle.spec, x, t, labels)
        own_model = bundle.group_model(g, load_weights=True)
        inits = {t.name: t for t in own_model.graph.initializer}
        own = _plain_ort(own_model, feeds)
        one = _plain_ort(graph, feeds | {k: np.array(v[i]) for k, v in tables.items()})
        checked = 0
        for node in own_model.graph.node:
            if node.op_type != "QuantizeLinear":
                continue
            codes = [k for k in one if k.startswith(node.output[0] + "/ov_q")]
            scale = float(numpy_helper.to_array(inits[node.input[1]]))
            for name in codes:
                same = own[node.input[0]] == one[node.input[0]] if node.input[0] in one else None
                if same is None or own[node.output[0]].shape != one[name].shape:
                    continue
                ratio = own[node.input[0]].astype(np.float64) / scale
                tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
                wrong = same & ~tie & (own[node.output[0]] != one[name])
                assert not wrong.any(), f"group {g}, {node.output[0]}: {int(wrong.sum())} codes differ on equal inputs"
                checked += int(same.sum())
        assert checked > 1000
        finals[g] = (own["eps"], one["eps"])
    for g in groups:
        own_g, one_g = finals[g]
        err = np.abs(one_g - own_g).mean()
        print(f"{which} group {g}: mean |one - own| {err:.3g}")
        assert all(np.abs(one_g - finals[h][0]).mean() > err for h in groups if h != g)


def _int8_layers(engine) -> collections.Counter:
    rt = engine._compiled.get_runtime_model()
    kinds = collections.Counter()
    for op in rt.get_ops():
        info = op.get_rt_info()
        layer, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        if layer in ("Convolution", "MatMul", "FullyConnected"):
            kinds[layer, precision] += 1
    return kinds


def test_one_compiled_model_serves_all_groups_with_int8_layers(w8):
    """Every group's timesteps run on one compiled model (a group switch compiles nothing), whose quantized
    layers run in int8 as many as in a per-group model; on OpenVINO its outputs stay as near ONNX Runtime's as
    the per-group models' do."""
    from runtime.openvino_single import OpenVinoGroup

    one, per, ort = w8.engines(backend="openvino"), w8.engines(backend="openvino", single=False), w8.engines()
    groups = sorted(g["id"] for g in w8.manifest["groups"])
    x, labels = _inputs(w8.spec)
    engines = [one.for_timestep(_first_t(w8, g)) for g in groups]
    assert all(isinstance(e, OpenVinoGroup) for e in engines)
    assert len({id(e.single) for e in engines}) == 1
    compiled = None
    for g, e in zip(groups, engines, strict=True):
        t = np.full(len(x), _first_t(w8, g), np.int64)
        a = e.infer(x, t, labels)
        compiled = compiled or e.single.engine._compiled
        assert e.single.engine._compiled is compiled
        p, o = per.for_timestep(int(t[0])).infer(x, t, labels), ort.for_timestep(int(t[0])).infer(x, t, labels)
        rms = lambda d: float(np.sqrt(np.mean(d**2)))  # noqa: E731
        print(f"group {g}: rms one - ort {rms(a - o):.3g}, per-group - ort {rms(p - o):.3g}")
        assert rms(a - o) <= 1.5 * rms(p - o) + 1e-4 * float(np.abs(o).max())
    source = engines[0].single.engine.graph
    assert source.data is None, "the one graph's bytes (every int8 weight again) are dropped once compiled"
    profile = engines[-1].profile(x, np.full(len(x), _first_t(w8, groups[-1]), np.int64), labels, runs=1)
    assert profile["run_ms"] > 0 and profile["ops"], "a later read rebuilds the graph"
    single_kinds = _int8_layers(engines[0].single.engine)
    per_kinds = _int8_layers(per.for_timestep(0))
    quantized = sum(v for (_, prec), v in per_kinds.items() if prec in ("u8", "i8"))
    assert quantized > 0 and single_kinds == per_kinds


def test_per_group_models_on_request(w8):
    from runtime.openvino import OpenVinoEngine

    per = w8.engines(backend="openvino", single=False)
    assert isinstance(per.for_timestep(0), OpenVinoEngine)
