"""Text-to-image pipelines (issue 20): a tiny random-weight Stable-Diffusion-layout pipeline (UNet2DConditionModel,
CLIPTextModel, a tokenizer whose vocabulary is made in code, AutoencoderKL, DDIM) compiles to a bundle that holds
the text encoder, tokenizer and VAE decoder, and samples from prompts without torch."""

import json
import shutil

import numpy as np
import pytest
import torch

from calibration.model_io import load_model
from exporter.parity import layer_parity, noised_inputs
from runtime.bundle import load_bundle
from runtime.engine import TorchEngine
from runtime.errors import EngineInputError, ModelLoadError
from runtime.sampler import SamplerConfig, _Noise, sample
from tests.models import tiny_text_pipeline
from tools.cli import main

TRANSFORMERS = [
    "down_blocks.0/attentions.0",
    "mid_block/attentions.0",
    "up_blocks.1/attentions.0",
    "up_blocks.1/attentions.1",
]
PROMPTS = ["a handwritten 7", "the digit seven", "seven", "a handwritten 3", "three"]
COMPILE = ["--steps", "8", "--calib-samples", "5", "--calib-timesteps", "4", "--guidance", "3", "-q"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    model_dir = tiny_text_pipeline(root / "pipe")
    prompts = root / "calib.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = root / "bundle"
    assert main(["compile", str(model_dir), "-o", str(out), "--calib-prompts", str(prompts), *COMPILE]) == 0
    return model_dir, prompts, out


@pytest.fixture(scope="module")
def text_model(text):
    return load_model(text[0], prompts=tuple(PROMPTS))


def test_the_bundle_holds_the_pipeline_components_hashed(text):
    _, _, out = text
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m["model"]["family"] == "text-unet"
    assert m["input_spec"]["inputs"] == ["sample", "timestep", "encoder_hidden_states"]
    assert bundle.spec.context_shape == (16, 32)
    parts = m["components"]
    assert parts["text_encoder"]["context_shape"] == [16, 32] and parts["calibration_prompts"] == PROMPTS
    assert parts["vae_decoder"]["image_shape"] == [3, 16, 16]
    for name in ("text_encoder.onnx", "vae_decoder.onnx", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert name in m["files"], name
    # a changed tokenizer file is caught like any other
    shutil.copytree(out, out.parent / "tampered")
    (out.parent / "tampered" / "tokenizer" / "vocab.json").write_text("{}")
    from runtime.errors import BundleError

    with pytest.raises(BundleError, match="tokenizer/vocab.json: sha256"):
        load_bundle(out.parent / "tampered")


def test_the_bundled_text_encoder_and_vae_compute_what_torch_computes(text, text_model):
    from runtime.text import PromptEncoder, VaeDecoder

    bundle = load_bundle(text[2])
    ours = PromptEncoder(bundle.root, bundle.manifest["components"])
    prompts = ["a handwritten 7", "", "three"]
    np.testing.assert_allclose(ours.encode(prompts), text_model.text.encode(prompts), atol=1e-5)
    assert ours.token_ids(prompts).tolist() == text_model.text.token_ids(prompts).tolist()
    z = np.random.default_rng(0).standard_normal((2, *bundle.spec.sample_shape)).astype(np.float32)
    vae = text_model.vae
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(z) / vae.config.scaling_factor).sample.clamp(-1, 1).numpy()
    np.testing.assert_allclose(VaeDecoder(bundle.root, bundle.manifest["components"]).decode(z), expected, atol=1e-4)


def test_the_cross_attention_layers_match_their_reference_on_integer_kernels(text, text_model):
    from calibration.calibrate import calibrate
    from calibration.config import CalibrationConfig

    cfg = CalibrationConfig(steps=8, calib_samples=5, calib_timesteps=4, guidance=3.0)
    result = calibrate(text_model, cfg, progress=False)
    reference = result.reference_model(text_model.wrapper())
    from exporter.bundle_writer import write_bundle

    out = write_bundle(text_model, result, text[2].parent / "again", progress=False)
    cross = [n for n in result.weights if ".attn2.to_" in n]
    assert len(cross) == 16  # q, k, v and out of the four transformer blocks' cross-attention
    for t in (5, 500, 950):
        feeds = noised_inputs(text_model.spec, text_model.schedule, t, n=2, seed=0)
        report = layer_parity(out / "group_0.onnx", reference, feeds)
        assert set(cross) <= set(report)
        for name, r in report.items():
            assert r["flipped"] <= 2e-3, (t, name, r)
            assert r["max_steps"] is None or r["max_steps"] <= 1.0 + 1e-3, (t, name, r)
            assert r["rel_err"] <= 2e-2, (t, name, r)


def test_dqc_sample_with_prompts_writes_images_and_latents(text, tmp_path, capsys):
    _, _, out = text
    argv = ["sample", str(out), "-n", "3", "-o", str(tmp_path / "s.npz"), "--png", str(tmp_path / "s.png"),
            "--prompt", "a handwritten 7", "--prompt", "seven seven seven seven seven", "--backend", "ort",
            "--seed", "4", "-q"]  # fmt: skip
    assert main(argv) == 0
    assert "prompt truncated" in capsys.readouterr().out
    d = np.load(tmp_path / "s.npz")
    assert d["samples"].shape == (3, 3, 16, 16) and d["latents"].shape == (3, 4, 8, 8)
    meta = json.loads(str(d["meta"]))
    assert meta["prompts"] == ["a handwritten 7", "seven seven seven seven seven", "a handwritten 7"]
    assert meta["truncated"] == ["seven seven seven seven seven"] and meta["negative_prompt"] == ""
    assert (tmp_path / "s.png").stat().st_size > 0
    # the same request again gives the same images; another negative prompt changes them
    assert main(argv[:5] + [str(tmp_path / "t.npz")] + argv[6:]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "t.npz")["samples"], d["samples"])
    assert main(argv[:5] + [str(tmp_path / "u.npz")] + argv[6:] + ["--negative-prompt", "three"]) == 0
    assert not np.array_equal(np.load(tmp_path / "u.npz")["latents"], d["latents"])


def _sd_pipeline(m, unet, model_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_pretrained(model_dir / "scheduler")
    return StableDiffusionPipeline(vae=m.vae, text_encoder=m.text.encoder, tokenizer=m.text.tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def test_dqc_sampler_follows_diffusers_stable_diffusion_pipeline_on_full_precision(text, text_model):
    """The FP UNet under dqc's sampler (prompt and empty-prompt embeddings, guidance 3, DDIM 8 steps) against
    StableDiffusionPipeline from the same initial latents: the same latents within 1e-4."""
    model_dir = text[0]
    m = text_model
    pipe = _sd_pipeline(m, m.unet, model_dir)
    prompts = ["a handwritten 7", "three"]
    x0 = _Noise(0, range(2), m.spec.sample_shape).draw()
    theirs = pipe(prompts, num_inference_steps=8, guidance_scale=3.0, eta=0.0, latents=torch.from_numpy(x0),
                  output_type="latent").images.numpy()  # fmt: skip
    engines = TorchEngine(m.wrapper(), m.spec)
    from runtime.engine import EngineSet

    run = sample(EngineSet.single(engines), m.schedule, SamplerConfig("ddim", 8, 0.0, 3.0), n=2, seed=0,
                 cond=m.text.encode(prompts), null_cond=m.null_cond, progress=False)  # fmt: skip
    np.testing.assert_allclose(run.samples, theirs, atol=1e-4)


def test_the_drop_in_unet_runs_a_stable_diffusion_pipeline_call(text, text_model):
    from runtime.interop import as_diffusers_unet

    m = text_model
    unet = as_diffusers_unet(text[2], backend="ort")
    pipe = _sd_pipeline(m, unet, text[0])
    images = pipe(["a handwritten 7"], num_inference_steps=4, guidance_scale=3.0, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    x = torch.zeros(1, *m.spec.sample_shape)
    with pytest.raises(EngineInputError, match="encoder_hidden_states"):
        unet(x, 10)


def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_prompts_and_labels_go_only_where_they_belong(text, tiny_bundle, tmp_path, capsys):
    _, prompts, out = text
    run = ["sample", str(out), "-n", "1", "-o", str(tmp_path / "s.npz"), "-q"]
    assert "--class-label: " in _refused(run + ["--class-label", "3"], capsys)
    assert "text-to-image bundle: pass --prompt" in _refused(run, capsys)
    err = _refused(["sample", str(tiny_bundle), "-n", "1", "-o", str(tmp_path / "s.npz"), "--prompt", "seven"], capsys)
    assert "--prompt: " in err and "not a text-to-image bundle; it takes --class-label" in err
    empty, latin = tmp_path / "empty.txt", tmp_path / "latin.txt"
    empty.write_text("\n \n")
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    assert "holds no prompts" in _refused(run + ["--prompts-file", str(empty)], capsys)
    assert "not UTF-8" in _refused(run + ["--prompts-file", str(latin)], capsys)
    assert not (tmp_path / "s.npz").exists()


def test_compile_refuses_what_cannot_work_before_any_work(text, tiny_dir, tmp_path, capsys):
    model_dir, prompts, _ = text
    out = str(tmp_path / "b")
    assert "calibrated on prompts; pass --calib-prompts" in _refused(["compile", str(model_dir), "-o", out, *COMPILE],
                                                                       capsys)  # fmt: skip
    err = _refused(["compile", str(tiny_dir), "-o", out, "--calib-prompts", str(prompts), *COMPILE], capsys)
    assert "--calib-prompts given, but its UNet2DModel takes no prompts" in err
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ModelLoadError, match="no text_encoder/ folder"):
        load_model(broken, prompts=("seven",))
    other = shutil.copytree(model_dir, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(index | {"text_encoder": ["transformers", "T5EncoderModel"]}))
    with pytest.raises(ModelLoadError, match="text_encoder/ is T5EncoderModel; dqc supports CLIPTextModel"):
        load_model(other, prompts=("seven",))
    assert not (tmp_path / "b").exists()


def test_text_engines_check_the_embeddings(text):
    engine = load_bundle(text[2]).engines(backend="ort").for_timestep(0)
    x, t = np.zeros((2, 4, 8, 8), np.float32), np.array([1, 2])
    with pytest.raises(EngineInputError, match="text-conditional"):
        engine.infer(x, t)
    with pytest.raises(EngineInputError, match=r"expected shape \(2, 16, 32\)"):
        engine.infer(x, t, np.zeros((2, 77, 32), np.float32))
    with pytest.raises(EngineInputError, match="float32"):
        engine.infer(x, t, np.zeros((2, 16, 32), np.float64))
    assert engine.infer(x, t, np.zeros((2, 16, 32), np.float32)).shape == x.shape


@pytest.mark.parametrize("target", ["trt", "trt-fp32"])
def test_the_text_unet_compiles_for_tensorrt_and_lints_clean(text, text_model, target, tmp_path):
    """The TensorRT profiles place Q/DQ on the cross-attention projections as on every Linear, and on the
    residual input of each transformer block's own Add (proj_out + the block's input) as on the resnets', so
    TensorRT can fuse that Add into proj_out; the FP16 graph is strongly typed and `dqc lint` finds nothing;
    the FP32 variant runs on ONNX Runtime. (Building TensorRT engines needs a GPU: tests/test_tensorrt.py.)"""
    from calibration.calibrate import calibrate
    from calibration.config import CalibrationConfig
    from exporter.bundle_writer import write_bundle
    from exporter.lint import lint_bundle

    cfg = CalibrationConfig(target=target, steps=8, calib_samples=5, calib_timesteps=4, guidance=3.0)
    result = calibrate(text_model, cfg, progress=False)
    out = write_bundle(text_model, result, tmp_path / "b", progress=False)
    report = lint_bundle(out)
    assert report["groups"][0] == [], report["groups"][0]
    quantized = load_bundle(out).manifest["quantized_nodes"]
    nodes = {q["node"] for q in quantized}
    assert any("attn2/to_k" in n for n in nodes) and any("attn2/to_v" in n for n in nodes)
    residual = sorted(q["layer"] for q in quantized if q["layer"].endswith(":residual") and "attentions" in q["layer"])
    assert residual == sorted(f"{b.replace('/', '.')}:residual" for b in TRANSFORMERS)
    if target == "trt-fp32":  # ONNX Runtime runs the FP32 placement: every layer against its fake-quant reference
        reference = result.reference_model(text_model.wrapper())
        for t in (5, 950):
            feeds = noised_inputs(text_model.spec, text_model.schedule, t, n=2, seed=0)
            report = layer_parity(out / "group_0.onnx", reference, feeds)
            assert len(report) == len(result.weights)
            # float rounding only (the up path's two conv_shortcuts measure 1.5e-4, as before the residuals)
            assert max(r["rel_err"] for r in report.values()) < 1e-3, report
            assert max(r["flipped"] for r in report.values()) == 0, report


def test_the_text_encoder_ships_w8a8_on_integer_kernels_close_to_float(text_model, tmp_path):
    from exporter.bundle_writer import ort_optimized_op_counts
    from exporter.components import write_components
    from exporter.lint import lint_model
    from runtime.text import PromptEncoder

    components = write_components(text_model, tmp_path, "w8a8")
    entry = components["text_encoder"]
    linears = [m for m in text_model.text.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert entry["precision"] == "w8a8" and entry["quantized_layers"] == len(linears) == 12
    graph = tmp_path / entry["file"]
    counts = ort_optimized_op_counts(graph, tmp_path / "optimized.onnx")
    assert counts["MatMulIntegerToFloat"] == 12  # every Linear an integer MatMul in ONNX Runtime
    assert counts["QuantizeLinear"] == 8  # per encoder layer: q/k/v share one, out_proj, fc1, fc2
    import onnx

    assert lint_model(onnx.load(str(graph)), "ort-cpu") == []
    held_out = ["a handwritten 5", "the digit four", "nine", "a picture of a 2"]  # not calibration prompts
    ours = PromptEncoder(tmp_path, components).encode(held_out)
    fp = text_model.text.encode(held_out)
    rel = np.linalg.norm(ours - fp) / np.linalg.norm(fp)
    assert 0 < rel < 0.05, rel  # measured 0.016 on this random model


def test_w8a8_text_encoder_is_refused_for_a_model_without_one(tiny_dir, tmp_path, capsys):
    out = tmp_path / "b"
    err = _refused(["compile", str(tiny_dir), "-o", str(out), "--text-encoder", "w8a8", *COMPILE], capsys)
    assert "--text-encoder w8a8" in err and "has no text encoder" in err
    assert not out.exists()


def test_latency_ratio_feeds_text_bundles_their_embeddings(text):
    from tools.deploy.pipeline import latency_ratio

    bundle = load_bundle(text[2])
    report = latency_ratio({"ours": bundle.engines().for_timestep(500)}, bundle.spec, batch=2, reps=2)
    assert report["ours"]["median_ms"] > 0


@pytest.fixture(scope="module")
def text_groups(text, tmp_path_factory):
    """The tiny pipeline compiled with 2 timestep groups (one engine serves both on ONNX Runtime)."""
    model_dir, prompts, _ = text
    out = tmp_path_factory.mktemp("text_groups") / "bundle"
    assert main(["compile", str(model_dir), "-o", str(out), "--calib-prompts", str(prompts), *COMPILE,
                 "--groups", "2"]) == 0  # fmt: skip
    return out


def test_the_prompt_part_holds_exactly_the_cross_attention_keys_and_values(text):
    """The cut (runtime.prompt_cache): the prompt part is the K and V projections of every cross-attention with
    their shared Q/DQ; the step part no longer reads encoder_hidden_states; a class model has nothing to cut."""
    from runtime.prompt_cache import split_prompt_part

    prompt, step, cut = split_prompt_part(load_bundle(text[2]).group_model(0))
    projections = sorted(n.name for n in prompt.graph.node if n.op_type == "MatMul")
    assert projections == sorted(f"/unet/{t}/transformer_blocks.0/attn2/to_{kv}/MatMul"
                                 for t in TRANSFORMERS for kv in "kv")  # fmt: skip
    assert len(cut) == 2 * len(TRANSFORMERS) and [i.name for i in prompt.graph.input] == ["encoder_hidden_states"]
    assert "encoder_hidden_states" not in {i for n in step.graph.node for i in n.input}
    assert [i.name for i in step.graph.input] == ["sample", "timestep", *cut]
    assert not {t.name for t in step.graph.initializer} & {i for n in prompt.graph.node for i in n.input
                                                          if "weight" in i}  # fmt: skip


def test_class_graphs_have_no_prompt_part(tiny_bundle):
    from runtime.prompt_cache import split_prompt_part

    assert split_prompt_part(load_bundle(tiny_bundle).group_model(0)) is None


def _requests(bundle, **engines):
    """Two requests (prompts, 8 steps, guidance 3) on one engine set: the latents, and how often each prompt
    part ran."""
    b = load_bundle(bundle)
    es = b.engines(**engines)
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(2):
        cond = rng.standard_normal((2, 16, 32), dtype=np.float32)
        runs.append(sample(es, b.schedule, SamplerConfig("ddim", 8, 0.0, 3.0), n=2, seed=0, cond=cond,
                           null_cond=np.zeros((16, 32), np.float32), progress=False).samples)  # fmt: skip
    parts = {id(e.prompt): e.prompt.runs for e in es.resident if getattr(e, "prompt", None) is not None}
    return np.stack(runs), sorted(parts.values())


@pytest.mark.parametrize("backend", ["ort", "openvino"])
@pytest.mark.parametrize("grouped", [False, True], ids=["G1", "G2"])
def test_keys_and_values_once_per_request_sample_exactly_what_the_whole_graph_samples(
    text, text_groups, backend, grouped
):  # fmt: skip
    """With the prompt part cut out (`prompt_cache`, `dqc sample --kv-once`), two requests give bit-identical
    latents to the whole graph's, on ONNX Runtime (G = 2: one engine for both groups) and OpenVINO; the prompt
    part runs once per request and group, not per step."""
    bundle = text_groups if grouped else text[2]
    # OpenVINO cuts the prompt part out of per-group models (its one model for all groups takes whole graphs)
    form = {"single": False} if backend == "openvino" else {}
    whole, none = _requests(bundle, backend=backend, prompt_cache=False, **form)
    once, runs = _requests(bundle, backend=backend, prompt_cache=True, **form)
    np.testing.assert_array_equal(once, whole)
    assert none == []
    # per request and group: G = 2 on ORT is one engine whose part keeps one entry per group
    assert runs == ([2] if not grouped else [4] if backend == "ort" else [2, 2])


def test_dqc_sample_runs_a_pipeline_directory_in_full_precision_from_prompts(text, text_model, tiny_dir, tmp_path,
                                                                           capsys):  # fmt: skip
    """`dqc sample PIPELINE_DIR --prompt` (torch, full precision): the same latents as dqc's sampler on the FP
    UNet with the pipeline's own text encoder, decoded by its own VAE; prompts go only to text models."""
    from runtime.engine import EngineSet

    model_dir, m = text[0], text_model
    argv = ["sample", str(model_dir), "-n", "2", "-o", str(tmp_path / "fp.npz"), "--png", str(tmp_path / "fp.png"),
            "--prompt", "a handwritten 7", "--prompt", "three", "--steps", "4", "--guidance", "3", "--seed", "2",
            "-q"]  # fmt: skip
    assert main(argv) == 0
    d = np.load(tmp_path / "fp.npz")
    run = sample(EngineSet.single(TorchEngine(m.wrapper(), m.spec)), m.schedule, SamplerConfig("ddim", 4, 0.0, 3.0),
                 n=2, seed=2, cond=m.text.encode(["a handwritten 7", "three"]), null_cond=m.null_cond,
                 progress=False)  # fmt: skip
    np.testing.assert_array_equal(d["latents"], run.samples)
    with torch.inference_mode():
        images = m.vae.decode(torch.from_numpy(run.samples) / m.vae.config.scaling_factor).sample.numpy()
    np.testing.assert_allclose(d["samples"], np.clip(images, -1, 1), atol=1e-6)
    assert json.loads(str(d["meta"]))["engine"]["backend"] == "torch"
    err = _refused(argv + ["--class-label", "3"], capsys)
    assert "--class-label: " in err and "is a text-to-image pipeline; pass --prompt" in err
    err = _refused(["sample", str(tiny_dir), "-n", "1", "-o", str(tmp_path / "c.npz"), "--prompt", "seven"], capsys)
    assert "not a text-to-image model; it takes --class-label" in err and not (tmp_path / "c.npz").exists()


@pytest.mark.parametrize("beside", [False, True], ids=["whole", "external-data"])
def test_the_ort_static_peer_quantizes_a_text_unet_whole_or_past_two_gib(text_model, beside, tmp_path, monkeypatch):
    """`dqc bench`'s ONNX Runtime peer on a text UNet: calibrated on prompt embeddings, its graph loads and runs
    on the exact-kernel session options, also down the > 2 GiB path (weights beside the graph, forced here)."""
    from calibration.collect import record_trajectories
    from calibration.config import CalibrationConfig
    from exporter import large_model
    from runtime.engine import OrtEngine
    from tools.bench.peer import quantize_static_peer
    from tools.deploy.pipeline import fp32_engine

    if beside:
        monkeypatch.setattr(large_model, "PROTOBUF_LIMIT", 0)
    fp32 = fp32_engine(text_model, tmp_path).path
    assert (tmp_path / "fp32.onnx.data").is_file() == beside
    cfg = CalibrationConfig(steps=8, calib_samples=2, calib_timesteps=2, guidance=3.0)
    out = quantize_static_peer(fp32, tmp_path / "static.onnx", record_trajectories(text_model, cfg, False), batch=2)
    # with the limit forced to 0 the int8 graph goes beside its weights too; the pre-processed graph's go
    assert sorted(p.name for p in tmp_path.glob("*.data")) == (["fp32.onnx.data", "static.onnx.data"] if beside
                                                              else [])  # fmt: skip
    x = np.zeros((2, *text_model.spec.sample_shape), np.float32)
    cond = text_model.prompt_embeddings(2)
    eps = OrtEngine(out, text_model.spec).infer(x, np.array([1, 900]), cond)
    ref = OrtEngine(fp32, text_model.spec).infer(x, np.array([1, 900]), cond)
    assert np.isfinite(eps).all() and np.abs(eps - ref).max() > 0  # quantized, and runs
