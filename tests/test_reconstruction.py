"""BRECQ block reconstruction, LSQ activation steps, Q-Diffusion shortcut splits, and their bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calibration.config import CalibrationConfig
from calibration.shortcut import SplitConv2d, apply_splits, find_shortcut_splits
from runtime.errors import ConfigError
from tests.conftest import CALIB


@pytest.mark.parametrize("kernel", [1, 3])
def test_split_conv_is_the_whole_conv_in_float64(kernel):
    conv = torch.nn.Conv2d(24, 8, kernel, padding=kernel // 2).double()
    x = torch.randn(3, 24, 6, 6, dtype=torch.float64)
    split = SplitConv2d(conv, 10)
    assert split.parts[0].in_channels == 10 and split.parts[1].in_channels == 14 and split.parts[1].bias is None
    torch.testing.assert_close(split(x), conv(x), rtol=0, atol=1e-12)


def test_shortcut_splits_sit_at_the_decoder_concatenations(tiny_model):
    """Every decoder resnet with a shortcut conv is split at the upsampled half's channel count; the split
    model computes what the original does."""
    unet = tiny_model.unet
    splits = find_shortcut_splits(unet)
    expected = {f"up_blocks.{b}.resnets.{i}.conv_shortcut" for b, blk in enumerate(unet.up_blocks)
                for i in range(len(blk.resnets))}  # fmt: skip
    assert set(splits) == expected
    # what each resnet really receives: record the up blocks' concatenation halves
    halves = {}

    def hook(block_idx):
        def pre(m, args, kwargs):
            hidden, skips = (
                kwargs.get("hidden_states", args[0] if args else None),
                kwargs.get("res_hidden_states_tuple"),
            )
            skips = skips if skips is not None else args[1]
            c = hidden.shape[1]
            for i, r in enumerate(m.resnets):
                halves[f"up_blocks.{block_idx}.resnets.{i}.conv_shortcut"] = c
                c = r.out_channels
            assert len(skips) == len(m.resnets)

        return pre

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(unet.up_blocks)]
    forward = tiny_model.wrapper()
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    with torch.no_grad():
        y = forward(x, t, c)
    for h in handles:
        h.remove()
    assert halves == splits
    split_forward = apply_splits(forward, splits, prefix="unet.")
    assert isinstance(split_forward.unet.get_submodule(next(iter(splits))), SplitConv2d)
    assert not isinstance(forward.unet.get_submodule(next(iter(splits))), SplitConv2d)  # a copy was split
    with torch.no_grad():
        torch.testing.assert_close(split_forward(x, t, c), y, rtol=1e-5, atol=1e-5)


def _weight_only_error(model, result_weights, x, t, c) -> float:
    """‖ε_Q − ε_FP‖² / ‖ε_FP‖² with only the weights quantized (activations float)."""
    from calibration.qmodules import replace_layers

    def build(name, layer):
        w_int, scale = result_weights[name.removeprefix("unet.")]
        layer.weight.data = w_int.float() * scale.view(-1, *[1] * (w_int.ndim - 1))  # layer is a copy
        return layer

    forward = model.wrapper()
    quant = replace_layers(forward, build)
    with torch.no_grad():
        ref, got = forward(x, t, c), quant(x, t, c)
    return float((got - ref).pow(2).sum() / ref.pow(2).sum())


def test_brecq_reduces_network_error_versus_nearest(tiny_model):
    """3-bit weights: block reconstruction (few iterations) leaves the network output closer to full
    precision than round-to-nearest on the same per-channel scales."""
    from calibration.calibrate import calibrate

    common = dict(bits="W3A8", adaround_samples=40, recon_batch=16, **CALIB)
    nearest = calibrate(tiny_model, CalibrationConfig(**common), progress=False)
    brecq = calibrate(
        tiny_model, CalibrationConfig(weight_rounding="brecq", adaround_iters=150, **common), progress=False
    )
    for name, (w, s) in brecq.weights.items():
        w0, s0 = nearest.weights[name]
        assert torch.equal(s, s0) and int(w.abs().max()) <= 3
        assert int((w.int() - w0.int()).abs().max()) <= 1  # rounding direction only
    units = brecq.stats["reconstruction"]["weight_loss"]
    assert "mid_block.resnets.0" in units and "up_blocks.0.attentions.0" in units and "conv_in" in units
    # each unit's error on its reconstruction inputs, round-to-nearest → learned (hard) rounding
    assert sum(u["after"] for u in units.values()) < 0.9 * sum(u["before"] for u in units.values())
    assert all(u["soft"] >= 0 for u in units.values())  # the soft/hard gap is recorded per unit
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (32,), generator=g)
    c = torch.randint(0, 10, (32,), generator=g)
    e_rtn, e_brecq = (_weight_only_error(tiny_model, r.weights, x, t, c) for r in (nearest, brecq))
    print("relative output error: nearest", e_rtn, "brecq", e_brecq)
    assert e_brecq < 0.9 * e_rtn


def test_qdiffusion_w4a8_compile_end_to_end(tiny_dir, tmp_path):
    """`dqc compile --method qdiffusion --bits W4A8` (few iterations): shortcut halves are separate
    quantized convs in the graph, LSQ moved activation steps, every layer matches its fake-quant reference
    on the integer kernels, and what stayed float is listed."""
    from calibration.calibrate import calibrate
    from calibration.model_io import load_model
    from calibration.result import CalibrationResult
    from exporter.parity import layer_parity, noised_inputs
    from tools.cli import main

    out, calib = tmp_path / "b", tmp_path / "calib.safetensors"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "qdiffusion", "--bits", "W4A8",
            "--steps", "10", "--calib-samples", "8", "--calib-timesteps", "5", "--adaround-iters", "20",
            "--act-iters", "20", "--recon-batch", "8", "--save-calibration", str(calib), "-q"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    cal = manifest["calibration"]
    assert cal["method"] == "qdiffusion" and cal["weight_rounding"] == "brecq" and cal["act_iters"] == 20
    assert len(cal["shortcut_splits"]) == 4
    layers = {n["layer"] for n in manifest["quantized_nodes"]}
    for name in cal["shortcut_splits"]:
        assert {f"{name}.parts.0", f"{name}.parts.1"} <= layers and name not in layers
    assert any(n.get("node") == "class_embedding" for n in manifest["float_nodes"])

    model = load_model(tiny_dir)
    result = CalibrationResult.load(calib)
    assert result.splits == cal["shortcut_splits"]
    observed = calibrate(model, CalibrationConfig(bits="W4A8", steps=10, calib_samples=8, calib_timesteps=5,
                                                  shortcut_split=True), progress=False)  # fmt: skip
    moved = [p for p, (q,) in result.activations.items() if q.scale != observed.activations[p][0].scale]
    assert len(moved) > len(result.activations) // 2
    reference = result.reference_model(model.wrapper())
    feeds = noised_inputs(model.spec, model.schedule, 500, 4, 0)
    report = layer_parity(out / "group_0.onnx", reference, feeds)
    assert {f"{n}.parts.1" for n in cal["shortcut_splits"]} <= set(report)
    assert all(r["flipped"] <= 2e-3 for r in report.values()), report


def test_reconstruction_batch_larger_than_the_calibration_set_is_refused(tiny_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="recon_batch=64"):
        CalibrationConfig(weight_rounding="brecq", recon_batch=64, calib_samples=4, calib_timesteps=5)
    with pytest.raises(ConfigError, match="recon_batch=48"):
        CalibrationConfig.for_method("ptq4dm", recon_batch=48, adaround_samples=40)
    CalibrationConfig(recon_batch=64, calib_samples=4, calib_timesteps=5)  # nothing learned: no constraint
    from tools.cli import main

    out = tmp_path / "b"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "qdiffusion", "--recon-batch", "500",
            "--calib-samples", "4", "--steps", "10", "--calib-timesteps", "5", "-q"]  # fmt: skip
    assert main(argv) == 2
    assert "recon_batch=500" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unknown_layer_types_are_reported_and_left_float():
    from calibration.qmodules import float_modules, quantizable_layers

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ConvTranspose2d(4, 4, 2),
        torch.nn.Conv1d(4, 4, 1),
        torch.nn.GroupNorm(2, 4),
        torch.nn.Embedding(5, 4),
        torch.nn.Linear(4, 2),
    )
    assert [(q.name, q.op) for q in quantizable_layers(net)] == [("0", "conv"), ("5", "linear")]
    report = {r["node"]: r for r in float_modules(net)}
    assert set(report) == {"1", "2", "4"}
    assert "ConvTranspose2d" in report["1"]["reason"] and "Conv1d" in report["2"]["reason"]
    assert "embedding" in report["4"]["reason"]


def test_presets_set_the_published_recipes():
    q = CalibrationConfig.for_method("qdiffusion")
    p = CalibrationConfig.for_method("ptq4dm")
    assert (q.timestep_selection, q.weight_rounding, q.shortcut_split, q.act_iters) == ("uniform", "brecq", True, 5000)
    assert (p.timestep_selection, p.weight_rounding, p.shortcut_split) == ("normal", "brecq", False)
    for c in (q, p):
        assert (c.adaround_iters, c.recon_batch, c.adaround_lr, c.act_lr, c.adaround_reg) == (
            20000,
            32,
            1e-3,
            5e-3,  # relative to each step's initial value, as in the group search
            0.01,
        )
    assert CalibrationConfig.for_method("qdiffusion", shortcut_split=False).shortcut_split is False
    assert np.isclose(CalibrationConfig.for_method("naive").act_iters, 0)


def test_method_table_bench_writes_table_and_plot_and_resumes(tiny_dir, tmp_path, capsys):
    """`dqc bench --methods` on the tiny model (few samples, few iterations): every cell evaluated on the
    ORT bundle, table + PNG written; a second run reuses the finished cells instead of recompiling."""
    from PIL import Image

    from tools.cli import main

    out = tmp_path / "table"
    argv = ["bench", str(tiny_dir), "--methods", "naive,qdiffusion", "--bits", "W4A8", "--out", str(out),
            "-n", "8", "--steps", "10", "--sample-batch", "8", "--adaround-iters", "10", "--act-iters", "5",
            "--recon-batch", "8", "--calib-samples", "4", "--calib-timesteps", "3", "-q"]  # fmt: skip
    assert main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    assert [(r["method"], r["bits"]) for r in table["rows"]] == [
        ("fp", "FP32"),
        ("naive", "W4A8"),
        ("qdiffusion", "W4A8"),
    ]
    for r in table["rows"][1:]:
        assert r["fd"] > 0 and r["psnr_db"] is not None and r["calibration_seconds"] > 0 and r["device"]
    manifest = json.loads((out / "qdiffusion_W4A8" / "bundle" / "manifest.json").read_text())
    assert manifest["calibration"]["config"]["adaround_iters"] == 10
    assert Image.open(out / "fd_vs_bits.png").size == (900, 560)
    assert "| qdiffusion | W4A8 |" in (out / "table.md").read_text()
    capsys.readouterr()
    stamp = (out / "naive_W4A8" / "bundle" / "manifest.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert "compiled in" not in capsys.readouterr().out
    assert (out / "naive_W4A8" / "bundle" / "manifest.json").stat().st_mtime_ns == stamp
    assert main(["bench", str(tiny_dir), "--methods", "fancy", "--out", str(out), "-q"]) == 2


def test_interrupted_reconstruction_writes_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of block reconstruction (raised from inside its optimisation loop): exit 130,
    no bundle, no calibration file, no temp files."""
    import torch.optim

    from tools.cli import main

    steps = {"n": 0}
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        steps["n"] += 1
        if steps["n"] == 30:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    out = tmp_path / "b"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "qdiffusion", "--steps", "10",
            "--calib-samples", "4", "--calib-timesteps", "3", "--recon-batch", "4", "--adaround-iters", "20",
            "--save-calibration", str(tmp_path / "c.safetensors"), "-q"]  # fmt: skip
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert steps["n"] == 30 and list(tmp_path.iterdir()) == []


def test_rounding_temperature_anneals_after_the_warm_up():
    """No regulariser for the first 20 %, then β falls from 20 to 2: linearly (BRECQ's LinearTempDecay, the
    default), or on a cosine."""
    from calibration.adaround import annealed_beta

    for schedule in ("cosine", "linear"):
        assert annealed_beta(0, 1000, schedule=schedule) is None and annealed_beta(199, 1000, schedule=schedule) is None
        assert annealed_beta(200, 1000, schedule=schedule) == pytest.approx(20.0, abs=0.03)
        assert annealed_beta(999, 1000, schedule=schedule) == pytest.approx(2.0)
        assert annealed_beta(599, 1000, schedule=schedule) == pytest.approx(11.0, abs=0.03)
    # the cosine stays near β₀ longer, then hardens faster at the end
    assert annealed_beta(300, 1000, schedule="cosine") > annealed_beta(300, 1000)
    assert annealed_beta(900, 1000, schedule="cosine") < annealed_beta(900, 1000)
    assert annealed_beta(500, 1000) == annealed_beta(500, 1000, schedule="linear")
    with pytest.raises(ValueError, match="beta schedule 'step'"):
        annealed_beta(500, 1000, schedule="step")


@pytest.mark.parametrize("shape", [(6, 3, 4, 4), (6, 5), (6, 7, 5)])
def test_weighted_block_loss_equals_the_plain_one_at_uniform_weights(shape):
    """The LSQ pass's per-input weighting (loss_weighting) is block_loss when every weight is 1, for conv
    (N, C, H, W), linear (N, C) and attention (N, tokens, C) outputs."""
    from calibration.adaround import block_loss
    from calibration.reconstruct import _loss

    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    unit = torch.nn.Module()
    unit.add_module("block", torch.nn.Identity())
    idx = torch.arange(shape[0])
    plain = _loss(unit, "block", [x], {}, target, idx)
    weighted = _loss(unit, "block", [x], {}, target, idx, torch.ones(shape[0]))
    torch.testing.assert_close(weighted, plain)
    assert torch.isclose(plain, block_loss(x, target))
    doubled = _loss(unit, "block", [x], {}, target, idx, torch.full((shape[0],), 2.0))
    torch.testing.assert_close(doubled, 2 * plain)
