"""The diffusion-transformer family (calibration.families.dit): a tiny random DiTTransformer2DModel built in code
compiles for ort-cpu and for the TensorRT placement, every Linear (patch embedding, q/k/v with one shared Q/DQ,
out projection, MLP, adaLN modulation) is quantized and matches its fake-quant reference on the engine, the
transformer blocks are the reconstruction units, and classes dqc does not compile are refused by name."""

import json
import shutil

import numpy as np
import pytest
import torch

from calibration.calibrate import calibrate
from calibration.config import CalibrationConfig
from calibration.model_io import load_model
from exporter.bundle_writer import write_bundle
from exporter.parity import end_to_end_parity, layer_parity, noised_inputs
from runtime.bundle import load_bundle
from runtime.errors import ModelLoadError
from tests.conftest import CALIB
from tools.bench.synthetic import save_dit_pipeline


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return save_dit_pipeline(tmp_path_factory.mktemp("dit") / "model", "tiny")


@pytest.fixture(scope="module")
def dit(dit_dir):
    return load_model(dit_dir)


def test_the_dit_wrapper_returns_epsilon_of_what_diffusers_computes(dit):
    assert dit.family.name == "dit" and dit.spec.names == ["sample", "timestep", "class_labels"]
    assert dit.spec.num_class_embeds == 11 and dit.null_class == 10  # 10 classes + DiT's null class, last
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, *dit.spec.sample_shape, generator=gen)
    t, labels = torch.tensor([5, 500, 999]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        ours = dit.wrapper()(x, t, labels)
        theirs = dit.unet(x, timestep=t, class_labels=labels).sample
    assert theirs.shape[1] == 2 * ours.shape[1]  # ε and the learned variance
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


@pytest.mark.parametrize("target", ["ort-cpu", "trt-fp32", "trt"])
def test_every_linear_of_the_dit_is_quantized_and_matches_its_reference(dit, target, tmp_path):
    """Both placements lint clean; the engine runs each layer as its fake-quant reference does (the FP16 trt graph
    is TensorRT's: built and run in tests/test_tensorrt.py on a GPU)."""
    from exporter.lint import lint_bundle

    result = calibrate(dit, CalibrationConfig(target=target, **CALIB), progress=False)
    names = set(result.weights)
    for block in ("transformer_blocks.0", "transformer_blocks.1"):
        for layer in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2",
                      "norm1.linear"):  # fmt: skip
            assert f"{block}.{layer}" in names
    assert {"pos_embed.proj", "proj_out_1", "proj_out_2"} <= names
    out = write_bundle(dit, result, tmp_path / "b", progress=False)
    assert lint_bundle(out)["violations"] == 0
    bundle = load_bundle(out)
    shared = bundle.manifest["shared_input_qdq"]  # layer → the layer whose input Q/DQ it reads
    for block in ("transformer_blocks.0", "transformer_blocks.1"):
        assert shared[f"{block}.attn1.to_k"] == shared[f"{block}.attn1.to_v"] == f"{block}.attn1.to_q", shared
    if target == "trt":
        return
    reference = result.reference_model(dit.wrapper())
    for t in (5, 500, 950):
        feeds = noised_inputs(dit.spec, dit.schedule, t, n=2, seed=0)
        report = layer_parity(out / "group_0.onnx", reference, feeds)
        assert len(report) == len(result.weights)
        for name, r in report.items():
            if target == "ort-cpu":  # integer kernels: rounding ties at most
                assert r["flipped"] <= 2e-3 and r["rel_err"] <= 2e-2, (t, name, r)
            else:  # float placement: float rounding only
                assert r["rel_err"] < 1e-3, (t, name, r)
    parity = end_to_end_parity(bundle.engines(backend="ort").for_timestep(0), reference, dit.wrapper(), dit.spec,
                               dit.schedule)  # fmt: skip
    assert parity["parity_ratio"] < 0.2, parity


def test_dit_blocks_are_the_reconstruction_units(dit):
    from calibration.calibrate import example_inputs
    from calibration.qmodules import quantizable_layers
    from calibration.reconstruct import reconstruction_units

    layers = quantizable_layers(dit.unet)
    units = reconstruction_units(dit.wrapper(), layers, example_inputs(dit, seed=0), dit.family.block_types)
    blocks = [u for u in units if u.name.startswith("unet.transformer_blocks.")]
    assert [u.name for u in blocks] == ["unet.transformer_blocks.0", "unet.transformer_blocks.1"]
    for u in blocks:  # q, k, v, out, the MLP's two, the adaLN modulation and the block's own timestep MLP
        assert sorted(x.removeprefix(u.name.removeprefix("unet.") + ".") for x in u.layers) == [
            "attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v", "ff.net.0.proj", "ff.net.2", "norm1.emb."
            "timestep_embedder.linear_1", "norm1.emb.timestep_embedder.linear_2", "norm1.linear"]  # fmt: skip


def test_a_dit_bundle_samples_on_onnx_runtime_close_to_full_precision(dit_dir, tmp_path):
    from tools.cli import main

    bundle, q, fp = tmp_path / "b", tmp_path / "q.npz", tmp_path / "fp.npz"
    common = ["-n", "8", "--steps", "10", "--class-label", "3", "-q"]
    assert main(["compile", str(dit_dir), "-o", str(bundle), "--steps", "10", "--calib-samples", "8",
                 "--calib-timesteps", "5", "-q"]) == 0  # fmt: skip
    assert main(["sample", str(bundle), "-o", str(q), "--backend", "ort", *common]) == 0
    assert main(["sample", str(dit_dir), "-o", str(fp), *common]) == 0
    a, b = np.load(q)["samples"], np.load(fp)["samples"]
    assert a.shape == b.shape == (8, 1, 8, 8)
    assert np.median(np.abs(a - b)) < 0.05 * np.median(np.abs(b)) + 1e-3


def test_transformer_classes_dqc_does_not_compile_are_refused_by_name(dit_dir, tmp_path):
    d = shutil.copytree(dit_dir, tmp_path / "m")
    config = json.loads((d / "transformer" / "config.json").read_text())
    (d / "transformer" / "config.json").write_text(json.dumps(config | {"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ModelLoadError, match="FluxTransformer2DModel.*not supported.*DiTTransformer2DModel"):
        load_model(d)
    (d / "transformer" / "config.json").write_text(json.dumps(config | {"norm_type": "ada_norm_single"}))
    with pytest.raises(ModelLoadError, match="cannot load DiTTransformer2DModel.*ada_norm_single"):
        load_model(d)  # diffusers' own refusal, with the folder named


@pytest.mark.parametrize("w4_linear", ["nbits", "nbits-int8"])
def test_4_bit_linear_weights_ship_packed_for_matmulnbits(dit, w4_linear, tmp_path):
    """W4: every Linear's weights packed two per byte for ONNX Runtime's MatMulNBits, the same weights as the
    int8-container graph's (float32 compute: equal to float rounding; int8 compute: activations requantized per
    block, close), the weights file smaller, the graph lint-clean."""
    import onnx

    from exporter.lint import lint_bundle

    result = calibrate(dit, CalibrationConfig(bits="W4A8", **CALIB), progress=False)
    int8 = write_bundle(dit, result, tmp_path / "int8", progress=False)
    packed = write_bundle(dit, result, tmp_path / "packed", progress=False, w4_linear=w4_linear)
    manifest = load_bundle(packed).manifest
    linears = sum(1 for n in result.weights if n != "pos_embed.proj")
    assert manifest["w4_linear"] == {"MatMulNBits": linears}
    ops = [n.op_type for n in onnx.load(str(packed / "group_0.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == linears and "MatMul" in ops  # the attention's activation products stay
    assert (packed / "weights.bin").stat().st_size < 0.7 * (int8 / "weights.bin").stat().st_size
    assert lint_bundle(packed)["violations"] == 0
    a, b = load_bundle(int8).engines(backend="ort"), load_bundle(packed).engines(backend="ort")
    for t in (5, 500, 950):
        feeds = noised_inputs(dit.spec, dit.schedule, t, n=4, seed=0)
        args = (feeds["sample"], feeds["timestep"], feeds["class_labels"])
        ref, got = a.for_timestep(t).infer(*args), b.for_timestep(t).infer(*args)
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < (1e-5 if w4_linear == "nbits" else 0.05), (t, rel)


def test_4_bit_linear_refuses_what_it_cannot_pack(dit, tmp_path):
    from runtime.errors import ExportError

    w8 = calibrate(dit, CalibrationConfig(**CALIB), progress=False)
    with pytest.raises(ExportError, match="--w4-linear nbits: --bits W8A8 has 8-bit weights"):
        write_bundle(dit, w8, tmp_path / "b", progress=False, w4_linear="nbits")
    assert not (tmp_path / "b").exists()


def test_4_bit_linear_serves_every_group_from_one_session_and_on_openvino(dit_dir, tmp_path):
    """A two-group W4A8 bundle with MatMulNBits: the one-session engine (the Gemm biases, int32 per group, feed
    DQ → Add) lints clean and samples what the per-group sessions sample; OpenVINO samples the same."""
    from exporter.lint import lint_bundle
    from tools.cli import main

    bundle = tmp_path / "b"
    assert main(["compile", str(dit_dir), "-o", str(bundle), "--bits", "W4A8", "--w4-linear", "nbits", "--groups",
                 "2", "--group-search", "none", "--steps", "10", "--calib-samples", "8", "--calib-timesteps", "5",
                 "-q"]) == 0  # fmt: skip
    report = lint_bundle(bundle)
    assert report["violations"] == 0 and report["single_engines"]
    common = ["-n", "4", "--steps", "10", "--class-label", "2", "-q"]
    runs = {"one": ["--backend", "ort"], "per-group": ["--backend", "ort", "--ort-engines", "per-group"],
            "openvino": ["--backend", "openvino"]}  # fmt: skip
    out = {}
    for name, flags in runs.items():
        if name == "openvino":
            pytest.importorskip("openvino")
        assert main(["sample", str(bundle), "-o", str(tmp_path / f"{name}.npz"), *common, *flags]) == 0
        out[name] = np.load(tmp_path / f"{name}.npz")["samples"]
    assert np.array_equal(out["one"], out["per-group"])
    if "openvino" in out:
        np.testing.assert_allclose(out["openvino"], out["one"], atol=1e-4)
