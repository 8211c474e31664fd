"""The text-conditioned transformer family (calibration.families.pixart): a tiny random PixArtTransformer2DModel
pipeline built in code (CLIP text stack, VAE, flow-matching or DDIM scheduler) compiles for ort-cpu and the
TensorRT placement, every Linear (patch embedding, timestep and caption embeddings, self- and cross-attention
q/k/v with one shared Q/DQ, out projections, MLP, output projection) is quantized and matches its fake-quant
reference on the engine, the blocks are the reconstruction units, the bundle samples from prompts close to the
full-precision pipeline with the prompt's keys and values computed once per request, and what the engine contract
cannot carry is refused by name."""

import json
import shutil

import numpy as np
import pytest
import torch

from calibration.calibrate import calibrate
from calibration.config import CalibrationConfig
from calibration.model_io import load_model
from exporter.bundle_writer import write_bundle
from exporter.parity import layer_parity, noised_inputs
from runtime.bundle import load_bundle
from runtime.errors import ModelLoadError
from tools.bench.synthetic import save_pixart_pipeline
from tools.cli import main

PROMPTS = ("a handwritten 7", "the digit seven", "seven", "a handwritten 3", "three")
CALIB = dict(steps=8, calib_samples=5, calib_timesteps=4, guidance=3.0, sampler="euler")
BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                 "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")  # fmt: skip


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return save_pixart_pipeline(tmp_path_factory.mktemp("pixart") / "pipe")


@pytest.fixture(scope="module")
def pixart(pixart_dir):
    return load_model(pixart_dir, prompts=PROMPTS)


def test_the_wrapper_returns_the_prediction_diffusers_computes(pixart, pixart_dir):
    """Flow matching feeds float t; the learned-variance half is dropped; a DDIM-scheduled PixArt takes integers."""
    assert pixart.family.name == "pixart" and pixart.spec.names == ["sample", "timestep", "encoder_hidden_states"]
    assert pixart.spec.context_shape == (16, 32) and pixart.spec.timestep_type == "float32" and pixart.vae is not None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, *pixart.spec.sample_shape, generator=gen)
    t, cond = torch.tensor([2.5, 500.0, 999.0]), torch.from_numpy(pixart.prompt_embeddings(3))
    with torch.no_grad():
        ours = pixart.wrapper()(x, t, cond)
        theirs = pixart.unet(x, encoder_hidden_states=cond, timestep=t,
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample  # fmt: skip
    assert theirs.shape[1] == 2 * ours.shape[1] == 8
    assert torch.equal(ours, theirs[:, :4])
    ddim = save_pixart_pipeline(pixart_dir.parent / "ddim", flow=False, vae=False)
    assert load_model(ddim).spec.timestep_type == "int64"


@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_every_linear_is_quantized_and_matches_its_reference(pixart, target, tmp_path):
    """Both placements lint clean; q/k/v of each self-attention read one input Q/DQ, the k and v of every
    cross-attention the projected caption's one; on ort-cpu every layer runs as its fake-quant reference does
    (integer kernels: rounding ties at most)."""
    from exporter.lint import lint_bundle

    result = calibrate(pixart, CalibrationConfig(target=target, **CALIB), progress=False)
    names = set(result.weights)
    for block in ("transformer_blocks.0", "transformer_blocks.1"):
        assert {f"{block}.{layer}" for layer in BLOCK_LINEARS} <= names
    assert {"pos_embed.proj", "proj_out", "adaln_single.linear", "caption_projection.linear_1",
            "caption_projection.linear_2", "adaln_single.emb.timestep_embedder.linear_1"} <= names  # fmt: skip
    out = write_bundle(pixart, result, tmp_path / "b", progress=False)
    assert lint_bundle(out)["violations"] == 0
    shared = load_bundle(out).manifest["shared_input_qdq"]
    for block in ("transformer_blocks.0", "transformer_blocks.1"):
        assert shared[f"{block}.attn1.to_k"] == shared[f"{block}.attn1.to_v"] == f"{block}.attn1.to_q"
        # every block's cross-attention reads the one projected caption: one Q/DQ for all their k and v
        assert shared[f"{block}.attn2.to_v"] == "transformer_blocks.0.attn2.to_k", shared
    if target == "trt":
        return
    reference = result.reference_model(pixart.wrapper())
    for t in (5, 500, 950):
        feeds = noised_inputs(pixart.spec, pixart.schedule, t, n=2, seed=0)
        report = layer_parity(out / "group_0.onnx", reference, feeds)
        assert len(report) == len(result.weights)
        for name, r in report.items():
            assert r["flipped"] <= 2e-3 and r["rel_err"] <= 2e-2, (t, name, r)


def test_the_blocks_are_the_reconstruction_units(pixart):
    from calibration.calibrate import example_inputs
    from calibration.qmodules import quantizable_layers
    from calibration.reconstruct import reconstruction_units

    layers = quantizable_layers(pixart.unet)
    units = reconstruction_units(pixart.wrapper(), layers, example_inputs(pixart, seed=0), pixart.family.block_types)
    blocks = [u for u in units if u.name.startswith("unet.transformer_blocks.")]
    assert [u.name for u in blocks] == ["unet.transformer_blocks.0", "unet.transformer_blocks.1"]
    for u in blocks:  # self- and cross-attention and the MLP; adaLN-single modulates from outside the block
        assert sorted(x.removeprefix(u.name.removeprefix("unet.") + ".") for x in u.layers) == sorted(BLOCK_LINEARS)


def test_a_pixart_bundle_samples_from_prompts_close_to_full_precision(pixart_dir, tmp_path):
    """Groups and PTQD on the velocity, Euler 8 steps, guidance 3: the W8A8 bundle's latents on ONNX Runtime follow
    the FP pipeline's (torch) from the same prompts and noise; the prompt part (caption projection and the
    cross-attention K/V) runs once per request and gives the whole graph's latents exactly."""
    from runtime.sampler import SamplerConfig, sample

    prompts, bundle = tmp_path / "p.txt", tmp_path / "b"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert main(["compile", str(pixart_dir), "-o", str(bundle), "--calib-prompts", str(prompts), "--steps", "8",
                 "--calib-samples", "5", "--calib-timesteps", "4", "--guidance", "3", "--groups", "2", "--ptqd",
                 "--ptqd-samples", "8", "-q"]) == 0  # fmt: skip
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["family"] == "pixart" and manifest["calibration"]["sampler"] == "euler"
    common = [
        "--prompt",
        "a handwritten 7",
        "--prompt",
        "three",
        "-n",
        "4",
        "--seed",
        "3",
        "--steps",
        "8",
        "--guidance",
        "3",
        "-q",
    ]
    assert main(["sample", str(bundle), "-o", str(tmp_path / "q.npz"), "--backend", "ort", *common]) == 0
    assert main(["sample", str(pixart_dir), "-o", str(tmp_path / "fp.npz"), *common]) == 0
    q, fp = np.load(tmp_path / "q.npz"), np.load(tmp_path / "fp.npz")
    assert q["latents"].shape == fp["latents"].shape == (4, 4, 8, 8) and q["samples"].shape == (4, 3, 16, 16)
    assert np.median(np.abs(q["latents"] - fp["latents"])) < 0.02 * np.median(np.abs(fp["latents"]))
    assert main(["sample", str(bundle), "-o", str(tmp_path / "kv.npz"), "--backend", "ort", "--kv-once", *common]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "kv.npz")["latents"], q["latents"])
    assert main(["sample", str(pixart_dir), "-o", str(tmp_path / "x.npz"), "--kv-once", *common]) == 2  # a model dir
    b = load_bundle(bundle)
    cond = np.random.default_rng(0).standard_normal((2, 16, 32), dtype=np.float32)
    runs = {}
    for cached in (True, False):
        es = b.engines(backend="ort", prompt_cache=cached)
        runs[cached] = sample(es, b.schedule, SamplerConfig("euler", 8, 0.0, 3.0), n=2, seed=0, cond=cond,
                              null_cond=np.zeros((16, 32), np.float32), progress=False).samples  # fmt: skip
    np.testing.assert_array_equal(runs[True], runs[False])


def test_what_the_contract_cannot_carry_is_refused_by_name(pixart_dir, tmp_path):
    d = shutil.copytree(pixart_dir, tmp_path / "m")
    config_file = d / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"use_additional_conditions": True}))
    with pytest.raises(ModelLoadError, match="use_additional_conditions=True"):
        load_model(d)
    config_file.write_text(json.dumps(config))
    model = load_model(d, prompts=PROMPTS)
    other = type("OtherEncoder", (), {"context_shape": (16, 48)})()  # another pipeline's text encoder
    with pytest.raises(ModelLoadError, match="text encoder's width is 48, the transformer's caption_channels 32"):
        model.family.input_spec(model.unet, model.schedule, d / "transformer", other)
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps(index | {"text_encoder": ["transformers", "T5EncoderModel"]}))
    with pytest.raises(ModelLoadError, match="text_encoder/ is T5EncoderModel; dqc supports CLIPTextModel"):
        load_model(d)
    shutil.rmtree(d / "text_encoder")
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="no text_encoder/ folder"):
        load_model(d)
