"""Quantized attention products (`--quantize-attention`): the score product q·kᵀ and the value product P·v read
quantized activations. The torch processor that models them computes what diffusers' default attention computes
when its quantizers are off; the exported graph carries a Q/DQ pair on each of the four inputs and runs them as
integer MatMuls on ONNX Runtime, matching the fake-quant reference (and not the reference without them); one
session serves every group; the TensorRT placement lints clean; off by default."""

import numpy as np
import onnx
import pytest
import torch

from calibration.calibrate import calibrate
from calibration.config import CalibrationConfig
from calibration.model_io import load_model
from calibration.qmodules import ATTENTION, ProductsProcessor, attention_points, observe_attention
from exporter.bundle_writer import write_bundle
from exporter.lint import lint_bundle
from exporter.parity import end_to_end_parity
from runtime.bundle import load_bundle
from tests.conftest import CALIB
from tools.bench.synthetic import save_dit_pipeline

BLOCKS = ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return load_model(save_dit_pipeline(tmp_path_factory.mktemp("attn") / "model", "tiny"))


def test_the_products_processor_computes_what_diffusers_attention_computes(dit, tiny_model):
    """Identity functions on the four points: the same output as AttnProcessor2_0 (float rounding only), for a
    transformer block's attention and a pixel UNet's (4-D input, group norm, residual connection); an observer
    sees each point's tensor and its removal restores the processor."""
    for model in (dit, tiny_model):
        forward = model.wrapper()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, *model.spec.sample_shape, generator=gen)
        args = (x, torch.tensor([10, 700]), torch.tensor([1, 3]))
        with torch.no_grad():
            reference = forward(*args)
            attentions = [m for _, m in model.unet.named_modules() if type(m).__name__ == "Attention"]
            defaults = [m.processor for m in attentions]
            for m in attentions:
                m.set_processor(ProductsProcessor({s: (lambda t: t) for s in ATTENTION}))
            try:
                ours = forward(*args)
            finally:
                for m, p in zip(attentions, defaults, strict=True):
                    m.set_processor(p)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    seen = {}
    handles = [observe_attention(dit.unet, f"{BLOCKS[0]}{s}", lambda t, s=s: seen.setdefault(s, t.shape))
               for s in ATTENTION]  # fmt: skip
    with torch.no_grad():
        dit.wrapper()(*args[:2], torch.tensor([1, 3]))
    for h in handles:
        h.remove()
    tokens, heads, dim = 16, 2, 16  # the tiny DiT: 4×4 patches, 2 heads of 16
    assert seen == {":q": (2, heads, tokens, dim), ":k": (2, heads, tokens, dim), ":probs": (2, heads, tokens, tokens),
                    ":v": (2, heads, tokens, dim)}  # fmt: skip
    assert type(dit.unet.get_submodule(BLOCKS[0]).processor).__name__ == "AttnProcessor2_0"


def test_quantized_products_run_as_integer_matmuls_matching_their_reference(dit, tmp_path):
    """W8A4 (a coarse activation grid, so the products' quantization shows): every attention's two products carry
    Q/DQ on both inputs, become MatMulIntegerToFloat on ONNX Runtime, and the engine follows the fake-quant
    reference that quantizes them, far closer than the reference that does not."""
    on = calibrate(dit, CalibrationConfig(bits="W8A4", attention_products=True, **CALIB), progress=False)
    off = calibrate(dit, CalibrationConfig(bits="W8A4", **CALIB), progress=False)
    assert set(attention_points(dit.unet, True)) <= set(on.group_activations(0))
    assert not set(attention_points(dit.unet, True)) & set(off.group_activations(0))
    out = write_bundle(dit, on, tmp_path / "b", progress=False)
    assert lint_bundle(out)["violations"] == 0
    manifest = load_bundle(out).manifest
    assert not [f for f in manifest["float_nodes"] if "attention" in f["reason"]]
    graph = onnx.load(str(out / "group_0.onnx"), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    for block in BLOCKS:
        scope = "/unet/" + block.replace(".attn1", "/attn1")  # /unet/transformer_blocks.0/attn1
        products = [n for n in graph.node if n.name in (f"{scope}/MatMul", f"{scope}/MatMul_1")]
        assert len(products) == 2, scope
        for n in products:
            assert [producer[i].op_type for i in n.input] == ["DequantizeLinear", "DequantizeLinear"]
    bundle = load_bundle(out)
    engine = bundle.engines(backend="ort").for_timestep(0)
    fp = dit.wrapper()
    ours = end_to_end_parity(engine, on.reference_model(dit.wrapper()), fp, dit.spec, dit.schedule)
    theirs = end_to_end_parity(engine, off.reference_model(dit.wrapper()), fp, dit.spec, dit.schedule)
    assert ours["parity_ratio"] < 0.2, ours
    assert theirs["parity_ratio"] > 3 * ours["parity_ratio"], (ours, theirs)


def test_one_session_serves_every_group_with_quantized_products(dit, tmp_path):
    """Two groups: the one-session engine (MatMulIntegerToFloat reading both activations' gathered scales) lints
    clean and gives each group's outputs as the per-group sessions do; the TensorRT placement lints clean."""
    from exporter.parity import noised_inputs

    result = calibrate(dit, CalibrationConfig(attention_products=True, groups=2, group_search="none", **CALIB),
                       progress=False)  # fmt: skip
    out = write_bundle(dit, result, tmp_path / "b", progress=False)
    report = lint_bundle(out)
    assert report["violations"] == 0 and report["single_engines"]
    bundle = load_bundle(out)
    one, per_group = bundle.engines(backend="ort"), bundle.engines(backend="ort", single=False)
    for t in (5, 500, 950):
        feeds = noised_inputs(dit.spec, dit.schedule, t, n=2, seed=0)
        args = (feeds["sample"], feeds["timestep"], feeds["class_labels"])
        np.testing.assert_array_equal(one.for_timestep(t).infer(*args), per_group.for_timestep(t).infer(*args))
    trt = calibrate(dit, CalibrationConfig(target="trt", attention_products=True, **CALIB), progress=False)
    assert lint_bundle(write_bundle(dit, trt, tmp_path / "trt", progress=False))["violations"] == 0
