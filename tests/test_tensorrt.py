"""TensorRT backend: build config, batch profile, INT8 verification, the bundle refusals and the manifest update run
everywhere; building and running real plans needs TensorRT and a GPU (marked `gpu`)."""

import importlib.util
import inspect
import json
import os
import shutil

import numpy as np
import pytest

import tools.deploy.build as build
from runtime.bundle import Bundle, load_bundle, sha256_file
from runtime.engine import InputSpec
from runtime.errors import ConfigError, EngineInputError
from runtime.sampler import sample
from runtime.tensorrt import DEFAULT_BATCH_SIZES, MISSING_TRT, BuildError, TrtEngine, plan_paths, trt_engine_set
from runtime.trt_build import BuildConfig, int8_fallbacks, profile_shapes
from tools.deploy.build import run_build

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture
def trt_bundle(tiny_bundle, tmp_path):
    """A copy of the tiny bundle relabelled as a TensorRT-target bundle (the target is not a hashed file, so the
    copy still verifies). Its graphs keep the ort-cpu placement: good for refusals, never for a real build."""
    root = shutil.copytree(tiny_bundle, tmp_path / "trt_bundle")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["target"] = "trt"
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# --- build config ---


@pytest.mark.parametrize("sizes", [(), (0, 8), (8, 1), (1, 1, 8), (1.5, 8), ("1", 8), (True, 8), (-1, 4), 16])
def test_batch_sizes_must_be_positive_and_increasing(sizes):
    with pytest.raises(ConfigError, match="--batch-sizes"):
        BuildConfig(batch_sizes=sizes)


@pytest.mark.parametrize("field, value, flag", [("workspace_mb", 0, "--workspace-mb"),
    ("workspace_mb", 1.5, "--workspace-mb"), ("opt_batch", 64, "--opt-batch"), ("opt_batch", 0, "--opt-batch"),
    ("backend", "ort", "--backend"), ("verify_int8", 1, "verify_int8")])  # fmt: skip
def test_bad_build_fields_name_the_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        BuildConfig(**{field: value})


def test_build_config_round_trips_through_json():
    config = BuildConfig(batch_sizes=[1, 4, 8], opt_batch=4, workspace_mb=512, verify_int8=False)
    assert config.batch_sizes == (1, 4, 8)
    assert BuildConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_profile_batches_default_to_the_middle_entry():
    assert BuildConfig().profile_batches == (1, 16, 32)
    assert BuildConfig(batch_sizes=(1, 8)).profile_batches == (1, 8, 8)
    assert BuildConfig(batch_sizes=(2,)).profile_batches == (2, 2, 2)
    assert BuildConfig(batch_sizes=(1, 8, 16, 32), opt_batch=8).profile_batches == (1, 8, 32)


def test_default_profile_covers_guided_sampling_at_the_default_batch():
    """Guidance runs cond and uncond in one engine call: the profile's max must be 2x the sampling batch."""
    sampling_batch = inspect.signature(sample).parameters["batch_size"].default
    assert DEFAULT_BATCH_SIZES[0] == 1  # the last, partial batch can be any size
    assert DEFAULT_BATCH_SIZES[-1] >= 2 * sampling_batch


def test_profile_shapes_vary_only_the_batch():
    assert profile_shapes("sample", (-1, 3, 8, 8), (1, 16, 32)) == ((1, 3, 8, 8), (16, 3, 8, 8), (32, 3, 8, 8))
    assert profile_shapes("timestep", (-1,), (1, 16, 32)) == ((1,), (16,), (32,))
    with pytest.raises(BuildError, match=r"'sample'.*dynamic"):
        profile_shapes("sample", (-1, 3, -1, 8), (1, 16, 32))
    with pytest.raises(BuildError, match="scalar"):
        profile_shapes("scale", (), (1, 16, 32))


# --- INT8 verification on hand-made layer information (TensorRT's DETAILED JSON layout) ---


def _layer(name, fmt, layer_type="CaskConvolution", **extra):
    return {"Name": name, "LayerType": layer_type, "Inputs": [{"Name": "x", "Format/Datatype": fmt}],
            "Outputs": [{"Name": "y", "Format/Datatype": fmt}], **extra}  # fmt: skip


INT8_32 = "Thirty-two wide channel vectorized row major Int8 format."
ENGINE_INFO = {
    "Layers": [
        _layer("/unet/conv_in/weight_quantizer/DequantizeLinear + /unet/conv_in/Conv", INT8_32),  # fused Q/DQ + conv
        _layer("/unet/down/Conv_1 + /unet/down/Add + /unet/down/Relu", "Int8 NC/32HW32"),
        _layer("/unet/mid/Conv", "Half NCHW"),  # fell back to FP16
        _layer(
            "__myl_MulMatMul", "Int8", "kgen", Metadata="[ONNX Layer: /unet/attn/to_q/MatMul]\x1e[ONNX Layer: /a/Mul]"
        ),
        _layer("{ForeignNode[/unet/attn/to_k/MatMul.../unet/attn/Softmax]}", "Half", "Myelin"),
        _layer("Reformatting CopyNode for Input Tensor 0 to /unet/up/Conv", INT8_32, "Reformat"),
    ],
    "Bindings": ["sample", "timestep", "eps"],
}


def _q(node, op="Conv"):
    return {"node": node, "op": op, "layer": node.split("/")[2]}


def test_int8_fallbacks_finds_float_and_unverifiable_nodes():
    quantized = [_q("/unet/conv_in/Conv"), _q("/unet/down/Conv"), _q("/unet/down/Conv_1"), _q("/unet/mid/Conv"),
                 _q("/unet/attn/to_q/MatMul", "MatMul"), _q("/unet/attn/to_k/MatMul", "MatMul"),
                 _q("/unet/up/Conv")]  # fmt: skip
    out = {f["node"]: f for f in int8_fallbacks(ENGINE_INFO, quantized)}
    # /unet/down/Conv is only a prefix of /unet/down/Conv_1; /unet/up/Conv is named by a reformat copy only
    assert set(out) == {"/unet/down/Conv", "/unet/mid/Conv", "/unet/attn/to_k/MatMul", "/unet/up/Conv"}
    assert out["/unet/down/Conv"]["status"] == out["/unet/up/Conv"]["status"] == "unverified"
    float_conv = {**_q("/unet/mid/Conv"), "status": "float", "engine_layer": "/unet/mid/Conv", "input": "Half NCHW"}
    assert out["/unet/mid/Conv"] == float_conv
    assert out["/unet/attn/to_k/MatMul"]["status"] == "float"
    assert int8_fallbacks(ENGINE_INFO, []) == []


def test_fallback_message_lists_nodes_and_the_lint_hint():
    fallbacks = int8_fallbacks(ENGINE_INFO, [_q("/unet/mid/Conv"), _q("/unet/up/Conv"), _q("/unet/conv_in/Conv")])
    message = build._fallback_message("group 0 (b/group_0.onnx)", fallbacks, 3)
    assert message.startswith("group 0 (b/group_0.onnx): 2 of 3 quantized nodes are not INT8")
    assert "/unet/mid/Conv (Conv): layer '/unet/mid/Conv' takes Half NCHW" in message
    assert "/unet/up/Conv (Conv): no engine layer names this node" in message
    assert "`dqc lint BUNDLE --target trt`" in message and "--no-verify-int8" in message


def test_int8_fallbacks_refuses_names_only_layer_information():
    with pytest.raises(BuildError, match="DETAILED"):
        int8_fallbacks({"Layers": ["/unet/conv_in/Conv", "/unet/mid/Conv"]}, [_q("/unet/mid/Conv")])
    with pytest.raises(BuildError, match="DETAILED"):
        int8_fallbacks(["/unet/conv_in/Conv"], [_q("/unet/mid/Conv")])
    with pytest.raises(BuildError, match="'Layers'"):
        int8_fallbacks({"Bindings": []}, [_q("/unet/mid/Conv")])


# --- run_build refusals (no TensorRT needed) ---


def test_config_is_checked_before_the_bundle(tmp_path):
    with pytest.raises(ConfigError, match="--batch-sizes"):
        run_build(tmp_path / "no_bundle", batch_sizes=(8, 1))


def test_build_refuses_an_onnx_runtime_bundle(tiny_bundle):
    with pytest.raises(BuildError, match=r"targets ONNX Runtime.*--target trt"):
        run_build(tiny_bundle, progress=False)
    assert not (tiny_bundle / "engines").exists()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed")
def test_build_without_tensorrt_says_so_in_one_line(trt_bundle):
    with pytest.raises(BuildError) as e:
        run_build(trt_bundle, progress=False)
    assert str(e.value) == MISSING_TRT and "\n" not in str(e.value)
    assert not (trt_bundle / "engines").exists()


# --- engine set and engine, before TensorRT is touched ---


def test_engine_set_needs_built_plans(tiny_bundle):
    with pytest.raises(BuildError, match=r"no TensorRT engines; run dqc build .* --backend trt"):
        trt_engine_set(load_bundle(tiny_bundle))


def _with_engines(bundle: Bundle, plans: dict, hashed: bool = True) -> Bundle:
    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["engines"] = {"trt": {"plans": plans, "batch_sizes": [1, 4], "tensorrt_version": "10.0.0"}}
    if hashed:
        manifest["files"] |= {p: sha256_file(bundle.root / p) for p in plans.values() if (bundle.root / p).is_file()}
    return Bundle(bundle.root, manifest)


def test_engine_set_refuses_missing_or_unhashed_plans(trt_bundle):
    bundle = load_bundle(trt_bundle)
    with pytest.raises(BuildError, match=r"group_0\.plan: TensorRT plan missing; run dqc build"):
        plan_paths(_with_engines(bundle, {"0": "engines/trt/group_0.plan"}))
    (trt_bundle / "engines" / "trt").mkdir(parents=True)
    (trt_bundle / "engines" / "trt" / "group_0.plan").write_bytes(b"not a plan")
    with pytest.raises(BuildError, match="not hashed"):
        plan_paths(_with_engines(bundle, {"0": "engines/trt/group_0.plan"}, hashed=False))
    with pytest.raises(BuildError, match=r"no TensorRT plans for groups \[0\]"):
        plan_paths(_with_engines(bundle, {"7": "engines/trt/group_0.plan"}))
    ready = _with_engines(bundle, {"0": "engines/trt/group_0.plan"})
    assert plan_paths(ready)[0] == {0: trt_bundle / "engines/trt/group_0.plan"}
    if not HAS_TRT:  # the plan checks pass; loading needs TensorRT
        with pytest.raises(BuildError) as e:
            trt_engine_set(ready)
        assert str(e.value) == MISSING_TRT


def test_engine_checks_inputs_and_profile_before_touching_the_gpu(tmp_path):
    spec = InputSpec((1, 8, 8), 100, 11)
    engine = TrtEngine(tmp_path / "absent.plan", spec, batch_range=(1, 32))  # stores arguments only
    x, t, y = np.zeros((33, 1, 8, 8), np.float32), np.full(33, 5), np.zeros(33, np.int64)
    with pytest.raises(
        EngineInputError, match=r"batch 33 is outside the TensorRT profile \[1, 32\].*--batch-sizes 1,33"
    ):
        engine.infer(x, t, y)
    with pytest.raises(EngineInputError, match="float32"):
        engine.infer(x.astype(np.float64), t, y)
    with pytest.raises(EngineInputError, match="class_labels"):
        engine.infer(x[:4], t[:4])
    if not HAS_TRT:
        with pytest.raises(BuildError) as e:
            engine.infer(x[:4], t[:4], y[:4])
        assert str(e.value) == MISSING_TRT


# --- the manifest update (staged files are plain bytes here, not plans: this tests the file handling only) ---


def _stage(root, names):
    staged = root / "engines" / ".stage"
    staged.mkdir(parents=True)
    for name in names:
        (staged / name).write_bytes(name.encode())
    return staged


def _old_build(root):
    """A previous build in engines/trt with a plan the next build no longer makes."""
    old = _stage(root, ["group_0.plan", "group_9.plan"])
    os.replace(old, root / "engines" / "trt")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] |= {
        f"engines/trt/{n}": sha256_file(root / "engines/trt" / n) for n in ("group_0.plan", "group_9.plan")
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_commit_replaces_engines_and_manifest_entries(trt_bundle):
    _old_build(trt_bundle)
    staged = _stage(trt_bundle, ["group_0.plan", "timing.cache", "build.json"])
    groups = {"0": {"plan": "engines/trt/group_0.plan"}}
    build._commit(load_bundle(trt_bundle), staged, BuildConfig(batch_sizes=(1, 4)), "10.0.0", groups)
    bundle = load_bundle(trt_bundle)  # every hash verifies
    assert sorted(p.name for p in (trt_bundle / "engines" / "trt").iterdir()) == ["build.json", "group_0.plan",
                                                                                  "timing.cache"]  # fmt: skip
    assert not [f for f in bundle.manifest["files"] if f.endswith("group_9.plan")]  # the stale entry is gone
    assert bundle.manifest["engines"]["trt"] == {"mode": "per-group", "plans": {"0": "engines/trt/group_0.plan"},
        "batch_sizes": [1, 4],
        "opt_batch": 4, "tensorrt_version": "10.0.0", "build": "engines/trt/build.json"}  # fmt: skip
    assert sorted(p.name for p in (trt_bundle / "engines").iterdir()) == ["trt"]


def test_interrupted_commit_leaves_the_previous_build(trt_bundle, monkeypatch):
    _old_build(trt_bundle)
    before = (trt_bundle / "manifest.json").read_text()
    staged = _stage(trt_bundle, ["group_0.plan", "build.json"])
    real = os.replace

    def interrupt_at_manifest(src, dst):
        if str(dst).endswith("manifest.json"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(build.os, "replace", interrupt_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        build._commit(
            load_bundle(trt_bundle), staged, BuildConfig(), "10.0.0", {"0": {"plan": "engines/trt/group_0.plan"}}
        )
    monkeypatch.undo()
    assert (trt_bundle / "manifest.json").read_text() == before
    assert sorted(p.name for p in (trt_bundle / "engines" / "trt").iterdir()) == ["group_0.plan", "group_9.plan"]
    load_bundle(trt_bundle)  # still verifies


# --- real engines: TensorRT and a GPU ---


@pytest.fixture(scope="module")
def built_trt_bundle(tiny_model, tmp_path_factory):
    from calibration.calibrate import calibrate
    from calibration.config import CalibrationConfig
    from exporter.bundle_writer import write_bundle
    from tests.conftest import CALIB

    pytest.importorskip("tensorrt")
    result = calibrate(tiny_model, CalibrationConfig(**CALIB, target="trt-fp32"), progress=False)
    root = write_bundle(tiny_model, result, tmp_path_factory.mktemp("trt") / "bundle", progress=False)
    report = run_build(root, batch_sizes=(1, 4, 8), workspace_mb=256, progress=False)
    return root, report


@pytest.mark.gpu
def test_trt_engines_match_onnx_runtime(built_trt_bundle):
    pytest.importorskip("tensorrt")
    root, report = built_trt_bundle
    assert report["int8_fallbacks"] == 0
    assert (report["profile"]["min"], report["profile"]["opt"], report["profile"]["max"]) == (1, 4, 8)
    bundle = load_bundle(root)
    trt_set, ort_set = trt_engine_set(bundle), bundle.engines()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, *bundle.spec.sample_shape)).astype(np.float32)
    labels = rng.integers(0, bundle.spec.num_class_embeds, 8)
    for t in (0, bundle.spec.num_train_timesteps // 2, bundle.spec.num_train_timesteps - 1):
        ref = ort_set.for_timestep(t).infer(x, np.full(8, t), labels)
        got = trt_set.for_timestep(t).infer(x, np.full(8, t), labels)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.abs(got - ref).mean() < 0.05 * np.abs(ref).mean()  # int8 rounding ties may differ, little else
    with pytest.raises(EngineInputError, match="outside the TensorRT profile"):
        trt_set.for_timestep(0).infer(np.zeros((9, *bundle.spec.sample_shape), np.float32), np.zeros(9, np.int64),
                                      np.zeros(9, np.int64))  # fmt: skip


@pytest.mark.gpu
def test_rebuild_reuses_the_timing_cache(built_trt_bundle):
    pytest.importorskip("tensorrt")
    root, _ = built_trt_bundle
    report = run_build(root, batch_sizes=(1, 4, 8), workspace_mb=256, progress=False)
    assert report["timing_cache"]["reused"] is True
    assert load_bundle(root).manifest["engines"]["trt"]["build"] == "engines/trt/build.json"
