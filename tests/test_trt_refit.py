"""One TensorRT plan for every group, by refitting its Q/DQ scales (runtime.trt_refit): which initializers are
refitted, that writing a group's values into the first group's graph gives that group's graph (checked on ONNX
Runtime with the trt-fp32 placement), the refusals, the build plan, lint's verdict and the engine set's sharing
run everywhere; building and refitting real plans needs TensorRT and a GPU (marked `gpu`)."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.lint import lint_bundle
from runtime.bundle import load_bundle
from runtime.errors import ConfigError
from runtime.tensorrt import MISSING_TRT, BuildError, engine_factories
from runtime.trt_build import BuildConfig
from runtime.trt_refit import RefitEngine, RefitGroupEngine, precision_groups, refit_problems, refit_tables
from tests.conftest import CALIB
from tools.deploy.build import engine_plan_sets, run_build

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _compile(tiny_model, out, target):
    from calibration.calibrate import calibrate
    from calibration.config import CalibrationConfig
    from exporter.bundle_writer import write_bundle

    cfg = CalibrationConfig(target=target, groups=2, group_search="none", **CALIB)
    return write_bundle(tiny_model, calibrate(tiny_model, cfg, progress=False), out, progress=False)


@pytest.fixture(scope="module")
def trt2(tiny_model, tmp_path_factory):
    """A two-group bundle with the TensorRT Q/DQ placement in FP32 (runs on ONNX Runtime too)."""
    return _compile(tiny_model, tmp_path_factory.mktemp("refit") / "trt2", "trt-fp32")


@pytest.fixture(scope="module")
def ort2_as_trt(tiny_model, tmp_path_factory):
    """A two-group ort-cpu bundle relabelled as a TensorRT bundle: its groups also differ in zero points and int32
    biases, which TensorRT cannot refit."""
    root = _compile(tiny_model, tmp_path_factory.mktemp("refit") / "ort2", "ort-cpu")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["target"] = "trt"
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _initializers(model) -> dict[str, np.ndarray]:
    inline = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    return {t.name: numpy_helper.to_array(t) for t in inline}


def test_refit_tables_hold_each_groups_qdq_scales(trt2):
    bundle = load_bundle(trt2)
    assert precision_groups(bundle) == [[0, 1]]
    base, tables = refit_tables(bundle, [0, 1])
    assert tables, "the two groups' scales should differ"
    scale_inputs = {n.input[1] for n in base.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert set(tables) <= scale_inputs
    for g in (0, 1):
        own = _initializers(bundle.group_model(g))
        for name, table in tables.items():
            assert table.shape == (2, *own[name].shape) and table.dtype == own[name].dtype
            np.testing.assert_array_equal(table[g], own[name])


def test_first_graph_with_a_groups_scales_computes_that_group(trt2):
    """What the refitter writes is all that separates the groups: group 0's graph with group 1's table rows in
    place of its scales gives group 1's outputs bit for bit (ONNX Runtime, trt-fp32 placement)."""
    import onnxruntime as ort

    bundle = load_bundle(trt2)
    base, tables = refit_tables(bundle, [0, 1])
    refitted = bundle.group_model(0, load_weights=True)
    for t in refitted.graph.initializer:
        if t.name in tables:
            t.CopyFrom(numpy_helper.from_array(tables[t.name][1], t.name))
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((4, *bundle.spec.sample_shape)).astype(np.float32),
             "timestep": np.array([0, 3, 500, 999], np.int64),
             "class_labels": np.arange(4, dtype=np.int64) % bundle.spec.num_class_embeds}  # fmt: skip

    def run(model):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)[0]

    group1 = run(bundle.group_model(1, load_weights=True))
    np.testing.assert_array_equal(run(refitted), group1)
    assert not np.array_equal(run(bundle.group_model(0, load_weights=True)), group1)


def _qdq_conv():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "zp"),
             numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
             helper.make_node("Conv", ["xd", "w"], ["y"], name="conv")]  # fmt: skip
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))


def test_only_qdq_scales_are_refittable():
    model = _qdq_conv()
    assert refit_problems(model, ["s"]) == []
    (zp, _) = refit_problems(model, ["zp"])  # read by the Q and the DQ
    assert "'zp'" in zp and "the zero point" in zp and "only Q/DQ scales" in zp
    (w,) = refit_problems(model, ["w"])
    assert "input 1 of Conv 'conv'" in w


def test_groups_differing_beyond_scales_fall_back_or_are_refused(ort2_as_trt):
    bundle = load_bundle(ort2_as_trt)
    with pytest.raises(BuildError, match=r"cannot share one TensorRT engine.*--trt-engines per-group"):
        refit_tables(bundle, [0, 1])
    sets = engine_plan_sets(bundle, "auto")
    assert [ids for ids, _, _ in sets] == [[0], [1]]
    assert all(tables is None and why.startswith("per-group: ") for _, tables, why in sets)
    with pytest.raises(BuildError, match="cannot share one TensorRT engine"):  # before TensorRT is looked for
        run_build(ort2_as_trt, engines="refit", progress=False)


def test_build_plan_sets_per_mode(trt2):
    bundle = load_bundle(trt2)
    ((ids, tables, why),) = engine_plan_sets(bundle, "auto")
    assert ids == [0, 1] and why == "refit" and set(tables) == set(refit_tables(bundle, [0, 1])[1])
    assert engine_plan_sets(bundle, "refit")[0][0] == [0, 1]
    assert [(ids, tables) for ids, tables, _ in engine_plan_sets(bundle, "per-group")] == [([0], None), ([1], None)]


def test_trt_engines_mode_is_checked_and_named():
    assert BuildConfig().engines == "auto"
    with pytest.raises(ConfigError, match="--trt-engines"):
        BuildConfig(engines="one")
    assert BuildConfig.from_dict(BuildConfig(engines="refit").to_dict()).engines == "refit"


@pytest.mark.skipif(HAS_TRT, reason="checks the message when TensorRT is missing")
def test_refit_build_without_tensorrt_says_so_in_one_line(trt2):
    with pytest.raises(BuildError) as e:
        run_build(trt2, progress=False)
    assert str(e.value) == MISSING_TRT


def test_lint_says_whether_groups_can_share_a_plan(trt2, ort2_as_trt):
    report = lint_bundle(trt2)
    assert report["violations"] == 0
    (verdict,) = report["trt_refit"].values()
    assert verdict.startswith("refit: ") and "Q/DQ scales per group" in verdict
    (verdict,) = lint_bundle(ort2_as_trt, target="trt")["trt_refit"].values()
    assert verdict.startswith("per-group: ") and "zero point" in verdict


def test_refit_manifest_gives_every_group_one_shared_engine(trt2, tmp_path):
    """A refit entry: both groups' engines are views of one RefitEngine over one plan, made without touching
    TensorRT; switching to the other group is the first thing that needs it."""
    root = shutil.copytree(trt2, tmp_path / "b")
    bundle = load_bundle(root)
    plan = root / "engines/trt/group_0_refit.plan"
    entry = {"mode": "refit", "plans": {"0": str(plan), "1": str(plan)}, "batch_sizes": [1, 4]}
    factories = engine_factories(bundle, {0: plan, 1: plan}, entry)
    e0, e1 = factories[0](), factories[1]()
    assert isinstance(e0, RefitGroupEngine) and isinstance(e1, RefitGroupEngine)
    assert e0.refit is e1.refit and isinstance(e0.refit, RefitEngine)
    assert e0.refit.current == 0 and e0.refit.groups == [0, 1] and e0.refit.refits == 0
    e0.refit.select(0)  # the plan's own scales: nothing to do
    with pytest.raises(BuildError, match=r"no group 7"):
        e0.refit.select(7)
    if not HAS_TRT:
        with pytest.raises(BuildError, match="TensorRT is not installed"):
            e0.refit.select(1)
    per_group = engine_factories(bundle, {0: plan, 1: plan}, {"plans": {}, "batch_sizes": [1, 4]})
    assert per_group[0]().plan == plan  # no mode: per-group plans, as bundles built before refitting
    with pytest.raises(BuildError, match="engine mode 'fancy'"):
        engine_factories(bundle, {0: plan}, {"mode": "fancy"})


# --- real plans: TensorRT and an NVIDIA GPU ---


@pytest.mark.gpu
def test_refitted_plan_matches_per_group_plans(trt2, tmp_path):
    pytest.importorskip("tensorrt")
    from runtime.tensorrt import trt_engine_set

    refit_root = shutil.copytree(trt2, tmp_path / "refit")
    per_root = shutil.copytree(trt2, tmp_path / "per")
    report = run_build(refit_root, batch_sizes=(1, 4, 8), workspace_mb=256, engines="refit", progress=False)
    assert report["mode"] == "refit" and report["plans"] == 1 and report["int8_fallbacks"] == 0
    check = report["groups"]["1"]["refit_check"]
    assert check["scales"] > 0 and check["max_abs_vs_first"]["1"] > 0
    run_build(per_root, batch_sizes=(1, 4, 8), workspace_mb=256, engines="per-group", progress=False)
    refit_set, per_set = trt_engine_set(load_bundle(refit_root)), trt_engine_set(load_bundle(per_root))
    bundle = load_bundle(refit_root)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, *bundle.spec.sample_shape)).astype(np.float32)
    labels = rng.integers(0, bundle.spec.num_class_embeds, 8)
    ts = [int(np.flatnonzero(bundle.group_of_t == g)[0]) for g in (0, 1, 0)]
    outputs = []
    for t in ts:
        got = refit_set.for_timestep(t).infer(x, np.full(8, t), labels)
        ref = per_set.for_timestep(t).infer(x, np.full(8, t), labels)
        assert np.abs(got - ref).mean() < 0.05 * np.abs(ref).mean()  # two plans' tactics may round differently
        outputs.append(got)
    np.testing.assert_array_equal(outputs[0], outputs[2])  # back at group 0: bit for bit
    assert refit_set.for_timestep(ts[0]).refit.refits == 2
