"""The OpenVINO backend around its Engine contract (tests/test_engine_contract.py, tests/test_parity.py): backend
choice, a missing install, precision hints, routing over groups and overlay graphs, and what a sampling run
records."""

import sys

import numpy as np
import pytest

from exporter.parity import noised_inputs
from runtime.bundle import load_bundle, resolve_backend
from runtime.cpu import int8_saturates
from runtime.engine import OrtEngine, TorchEngine
from runtime.errors import BundleError, EngineError
from runtime.openvino import MISSING_OPENVINO, OpenVinoEngine
from tools.cli import main


@pytest.fixture
def no_openvino(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError


def test_auto_times_both_cpu_backends_and_runs_the_faster(tiny_bundle, monkeypatch):
    bundle = load_bundle(tiny_bundle)
    record: dict = {}
    chosen = resolve_backend("auto", bundle, batch=4, record=record)
    assert record["batch"] == 4 and record["ort_ms"] > 0 and record["openvino_ms"] > 0
    assert chosen == record["chosen"] == min(("ort", "openvino"), key=lambda b: record[f"{b}_ms"])
    engines = bundle.engines(backend="auto", batch=2)
    kind = {"ort": OrtEngine, "openvino": OpenVinoEngine}[engines.choice["chosen"]]
    assert isinstance(engines.for_timestep(0), kind)
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert resolve_backend("auto", bundle) == "ort" and bundle.engines(backend="auto").choice is None
    with pytest.raises(BundleError, match="--backend 'onnx'.*ort .*openvino"):
        resolve_backend("onnx", bundle)


def test_a_missing_openvino_is_one_line_naming_the_backend_and_the_install(no_openvino, tiny_bundle, tmp_path, capsys):
    with pytest.raises(EngineError, match="openvino backend.*pip install openvino") as e:
        load_bundle(tiny_bundle).engines(backend="openvino")
    assert str(e.value) == MISSING_OPENVINO and "\n" not in MISSING_OPENVINO
    out = tmp_path / "s.npz"
    assert main(["sample", str(tiny_bundle), "-n", "2", "--backend", "openvino", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install openvino" in err and not out.exists()
    # auto falls back to ONNX Runtime and says so in the file
    assert main(["sample", str(tiny_bundle), "-n", "2", "-o", str(out), "-q"]) == 0
    assert "on ONNX Runtime" in capsys.readouterr().out


def test_hints_are_checked_and_bf16_is_what_runs_or_reported_as_not(tiny_model, tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(EngineError, match="--precision-hint 'fp16'"):
        bundle.engines(backend="openvino", hint="fp16")
    f32 = bundle.engines(backend="openvino", hint="f32").for_timestep(0)
    bf16 = bundle.engines(backend="openvino", hint="bf16").for_timestep(0)
    assert f32.execution_precision == "f32"
    assert bf16.execution_precision in ("bf16", "f32")  # a CPU without bf16 compiles f32 and says so
    feeds = noised_inputs(tiny_model.spec, tiny_model.schedule, 400, n=4, seed=0)
    args = (feeds["sample"], feeds["timestep"], feeds["class_labels"])
    a, b = f32.infer(*args), bf16.infer(*args)
    # bf16 float parts: the same function within bf16's 8-bit mantissa, not bit-equal
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.1
    ort = bundle.engines(backend="ort").for_timestep(0).infer(*args)
    assert np.linalg.norm(a - ort) / np.linalg.norm(ort) < 0.05


@pytest.fixture(scope="module")
def grouped(tiny_dir, tmp_path_factory):
    """Three timestep groups: group 0 a whole graph, groups 1 and 2 overlays of their scales on it."""
    out = tmp_path_factory.mktemp("ovg") / "b"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "apqdm", "--groups", "3", "--group-epochs", "1",
            "--steps", "10", "--calib-samples", "4", "--calib-timesteps", "6", "-q"]  # fmt: skip
    assert main(argv) == 0
    return out


def _same_function_on_both(bundle, fp, route=None):
    """Every step runs on the group ONNX Runtime runs it on and computes that group's function: nearer to
    ONNX Runtime's output of the same group than to any other group's (the groups differ only in their scales),
    and as far from full precision as ONNX Runtime is (rounding flips cascade through requantized layers, so
    the two are not bit-equal: test_parity bounds each layer against the fake-quant reference)."""
    ov, ort = (bundle.engines(backend=b, route=route) for b in ("openvino", "ort"))
    groups = sorted(set(ort.group_of_t.tolist()))
    fixed = {g: bundle.engines(backend="ort", route=np.full(1000, g)) for g in groups}
    err = {"openvino": 0.0, "ort": 0.0}
    for t in range(0, 1000, 37):
        g = ort.group_of(t)
        assert ov.group_of(t) == g and ov.for_timestep(t).name.endswith(f"(group {g})")
        feeds = noised_inputs(bundle.spec, bundle.schedule, t, n=4, seed=0)
        args = (feeds["sample"], feeds["timestep"], feeds.get("class_labels"))
        a = ov.for_timestep(t).infer(*args)
        dist = {h: np.linalg.norm(a - fixed[h].for_timestep(t).infer(*args)) for h in groups}
        assert dist[g] == min(dist.values()), (t, g, dist)
        eps_fp = fp.infer(*args)
        err["openvino"] += float(np.sum((a - eps_fp) ** 2))
        err["ort"] += float(np.sum((ort.for_timestep(t).infer(*args) - eps_fp) ** 2))
    assert ov.loaded_groups == groups
    assert np.sqrt(err["openvino"] / err["ort"]) <= 1.25, err
    return ov


@pytest.fixture(scope="module")
def fp(tiny_model):
    return TorchEngine(tiny_model.wrapper(), tiny_model.spec)


def test_groups_and_their_overlay_graphs_route_as_on_onnx_runtime(grouped, fp):
    bundle = load_bundle(grouped)
    assert [("base" in g) for g in bundle.manifest["groups"]] == [False, True, True]
    assert _same_function_on_both(bundle, fp).loaded_groups == [0, 1, 2]


def test_each_precision_of_a_mixed_bundle_runs_on_openvino(mixed_bundle, fp):
    bundle = load_bundle(mixed_bundle)
    for bits in bundle.manifest["precisions"]:
        _same_function_on_both(bundle, fp, bundle.route(precision=bits))


def test_a_sampling_run_records_its_backend(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", str(tiny_bundle), "-n", "2", "--backend", "openvino", "-o", str(out), "-q"]) == 0
    assert "on OpenVINO" in capsys.readouterr().out
    import json

    meta = json.loads(str(np.load(out)["meta"]))
    assert meta["engine"]["backend"] == "openvino" and meta["engine"]["precision_hint"] == "f32"
    assert meta["engine"]["weights"] == ("float" if int8_saturates() else "int8")
    assert "auto" not in meta["engine"]  # chosen by the flag, not timed
    assert main(["sample", str(tiny_bundle), "-n", "3", "-o", str(out), "-q"]) == 0
    auto = json.loads(str(np.load(out)["meta"]))["engine"]
    assert auto["auto"]["batch"] == 3 and auto["backend"] == auto["auto"]["chosen"]
    assert main(["sample", str(tiny_bundle), "-n", "2", "--backend", "ort", "-o", str(out), "-q"]) == 0
    assert json.loads(str(np.load(out)["meta"]))["engine"]["backend"] == "ort"


def test_a_graph_openvino_cannot_read_is_named(tiny_model, tmp_path):
    bad = tmp_path / "g.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(EngineError, match=f"{bad}: OpenVINO cannot read it"):
        OpenVinoEngine(bad, tiny_model.spec).infer(*_one(tiny_model))


def _one(model):
    feeds = noised_inputs(model.spec, model.schedule, 100, n=1, seed=0)
    return feeds["sample"], feeds["timestep"], feeds["class_labels"]


def test_where_int8_saturates_openvino_runs_the_bundles_weights_in_float(tiny_model, tiny_bundle, monkeypatch):
    """On an x86 CPU without VNNI, OpenVINO's u8·s8 kernels saturate (runtime.cpu): the engine set hands it the
    graphs with float weights, the layers' exact values, and says so. Forced here on any CPU."""
    from onnx import numpy_helper

    import runtime.openvino
    from runtime.openvino import dequantize_weights

    bundle = load_bundle(tiny_bundle)
    model = bundle.group_model(0, load_weights=True)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("/weight/int")]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    name = dq[0].input[0].removesuffix("/weight/int")
    w, s = inits[f"{name}/weight/int"], inits[f"{name}/weight/scale"]
    assert dequantize_weights(model) >= len(dq) > 0
    assert not any(n.op_type == "DequantizeLinear" and n.input[0].endswith("/weight/int") for n in model.graph.node)
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(floats[dq[0].output[0]], w.astype(np.float32) * s.reshape(-1, *[1] * (w.ndim - 1)))
    monkeypatch.setattr(runtime.openvino, "int8_saturates", lambda: True)
    engine = bundle.engines(backend="openvino").for_timestep(0)
    assert engine.weights == "float"
    feeds = noised_inputs(tiny_model.spec, tiny_model.schedule, 400, n=4, seed=0)
    args = (feeds["sample"], feeds["timestep"], feeds["class_labels"])
    ort = bundle.engines(backend="ort").for_timestep(0).infer(*args)
    assert np.linalg.norm(engine.infer(*args) - ort) / np.linalg.norm(ort) < 0.05
