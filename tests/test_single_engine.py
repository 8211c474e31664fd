"""One ONNX Runtime engine for every timestep group: each group's outputs exactly, no session per switch, lint
accepts its graph, one packed copy of the weights."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from runtime.bundle import load_bundle


@pytest.fixture(scope="module")
def grouped(tiny_dir, tmp_path_factory):
    """A W6A6 bundle with 3 timestep groups (b < 8: Clip bounds differ per group too) and its calibration."""
    from calibration.result import CalibrationResult
    from tools.cli import main

    out = tmp_path_factory.mktemp("single") / "b"
    calib = out.parent / "c.safetensors"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "apqdm", "--groups", "3", "--group-epochs", "1",
            "--bits", "W6A6", "--steps", "10", "--calib-samples", "8", "--calib-timesteps", "6",
            "--save-calibration", str(calib), "-q"]  # fmt: skip
    assert main(argv) == 0
    return out, CalibrationResult.load(calib)


def _inputs(spec, n=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.sample_shape)).astype(np.float32)
    return x, np.arange(n) % 10


def _first_t(bundle, g: int) -> int:
    return int(np.flatnonzero(bundle.group_of_t == g)[0])


def test_one_engine_gives_each_groups_outputs(grouped):
    bundle = load_bundle(grouped[0])
    one, per = bundle.engines(), bundle.engines(single=False)
    x, labels = _inputs(bundle.spec)
    outs = {}
    for g in range(len(bundle.manifest["groups"])):
        t = np.full(len(x), _first_t(bundle, g), np.int64)
        a, b = one.for_timestep(int(t[0])).infer(x, t, labels), per.for_timestep(int(t[0])).infer(x, t, labels)
        print(f"group {g}: max |single - per-group| = {np.abs(a - b).max()}")
        np.testing.assert_array_equal(a, b)  # the same integer kernels on the same parameters: bit for bit
        outs[g] = a
    # and the groups really differ: each call ran its own group's parameters
    t = np.full(len(x), _first_t(bundle, 0), np.int64)
    other = one.for_timestep(_first_t(bundle, 1)).single.infer(0, x, t, labels)
    np.testing.assert_array_equal(other, outs[0])
    assert not np.array_equal(one.for_timestep(_first_t(bundle, 1)).single.infer(1, x, t, labels), outs[0])


def test_one_engine_tracks_each_groups_fake_quant_reference(grouped, tiny_model):
    """Against the float64 fake-quant model with group g's scales, the single engine at group g is closer than
    at any other group (the group's parameters, not merely some parameters, are bound)."""
    from runtime.engine import TorchEngine

    path, result = grouped
    bundle = load_bundle(path)
    one = bundle.engines()
    x, labels = _inputs(bundle.spec, n=8, seed=1)
    groups = range(len(bundle.manifest["groups"]))
    for g in groups:
        t = np.full(len(x), _first_t(bundle, g), np.int64)
        ref = TorchEngine(result.reference_model(tiny_model.wrapper(), group=g), bundle.spec, dtype="float64")
        want = ref.infer(x, t, labels)
        err = {h: float(np.abs(one.for_timestep(_first_t(bundle, g)).single.infer(h, x, t, labels) - want).mean())
               for h in groups}  # fmt: skip
        print(f"group {g}: mean |engine(group h) - reference(group {g})| by h: {err}")
        assert min(err, key=err.get) == g


def test_switching_groups_creates_no_session(grouped):
    import onnxruntime as ort

    bundle = load_bundle(grouped[0])
    one = bundle.engines()
    x, labels = _inputs(bundle.spec)
    created = []
    real = ort.InferenceSession

    class Counting(real):
        def __init__(self, *a, **k):
            created.append(1)
            super().__init__(*a, **k)

    ort.InferenceSession = Counting
    try:
        for g in [0, 1, 2, 0, 2, 1, 0]:
            t = _first_t(bundle, g)
            one.for_timestep(t).infer(x, np.full(len(x), t, np.int64), labels)
    finally:
        ort.InferenceSession = real
    assert len(created) == 1
    assert len({id(one.for_timestep(_first_t(bundle, g)).single) for g in range(3)}) == 1


def test_lint_accepts_the_single_engine_graph_and_names_a_misused_input(grouped):
    from exporter.lint import lint_bundle, lint_single_engine
    from runtime.single_engine import single_graph

    report = lint_bundle(grouped[0])
    assert report["violations"] == 0, report
    assert list(report["single_engines"]) == ["0,1,2"]
    graph, tables = single_graph(load_bundle(grouped[0]))
    assert tables and all(t.shape[0] == 3 for t in tables.values())
    assert not any(n.op_type in ("Conv", "Gemm") for n in graph.graph.node)  # every quantized layer fused
    name = next(k for k in tables if k.endswith("/input/scale"))
    graph.graph.node.append(helper.make_node("Add", ["sample", name], ["misused"], name="planted"))
    found = lint_single_engine(graph, tables)
    assert [v["node"] for v in found["graph"]] == ["planted"]


def test_a_mixed_precision_bundle_shares_one_engine_per_precision(mixed_bundle):
    bundle = load_bundle(mixed_bundle)
    shared = bundle._single_groups(None)
    by_bits = {}
    for g in bundle.manifest["groups"]:
        by_bits.setdefault(g["bits"], []).append(g["id"])
    assert {tuple(v) for v in shared.values()} == {tuple(v) for v in by_bits.values() if len(v) > 1}
    x, labels = _inputs(bundle.spec)
    for bits in by_bits:  # every precision at every step: each of its groups runs
        route = bundle.route(bits)
        one, per = bundle.engines(route=route), bundle.engines(route=route, single=False)
        for t in sorted({int(np.flatnonzero(route == g)[0]) for g in set(route.tolist())}):
            tt = np.full(len(x), t, np.int64)
            a, b = one.for_timestep(t).infer(x, tt, labels), per.for_timestep(t).infer(x, tt, labels)
            np.testing.assert_array_equal(a, b)


def test_one_engine_holds_one_packed_copy_of_the_weights(grouped):
    """Resident memory in fresh processes: three per-group sessions each pack the weights; one session for all
    groups packs them once."""
    from tools.bench.speed import measure_memory

    bundle = load_bundle(grouped[0])
    single = measure_memory("ort", str(grouped[0]), bundle.spec, 8)
    split = measure_memory("ort-pergroup", str(grouped[0]), bundle.spec, 8)
    print(f"resident MB: one engine {single}, per-group sessions {split}")
    assert single["engines"] == split["engines"] == 3
    assert single["rss_mb"] < split["rss_mb"]


def test_single_is_refused_on_a_trt_bundle(tiny_model, tiny_result, tmp_path):
    import dataclasses

    from exporter.bundle_writer import write_bundle
    from runtime.errors import BundleError

    result = dataclasses.replace(tiny_result, config=dataclasses.replace(tiny_result.config, target="trt-fp32"))
    bundle = load_bundle(write_bundle(tiny_model, result, tmp_path / "trt", progress=False))
    with pytest.raises(BundleError, match="needs an ort-cpu bundle"):
        bundle.engines(single=True)
    assert bundle.engines().for_timestep(0).__class__.__name__ == "OrtEngine"  # the default: per-group sessions


def test_dqc_sample_gives_the_same_samples_on_either_engine_form(grouped, tmp_path):
    from tools.cli import main

    outs = []
    for form in ("one", "per-group"):
        out = tmp_path / f"{form}.npz"
        argv = ["sample", str(grouped[0]), "-n", "4", "--backend", "ort", "--ort-engines", form, "-o", str(out), "-q"]
        assert main(argv) == 0
        outs.append(np.load(out)["samples"])
    np.testing.assert_array_equal(*outs)
    with pytest.raises(SystemExit):  # argparse names the allowed forms
        main(["sample", str(grouped[0]), "-n", "2", "--ort-engines", "two", "-o", str(tmp_path / "x.npz")])
