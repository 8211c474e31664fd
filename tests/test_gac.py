"""Gradient-aligned calibration (calibration.gac): the meta step on problems whose answer is known, its
gradient against finite differences, and the method on the tiny model."""

import numpy as np
import pytest
import torch

from calibration.config import CalibrationConfig
from calibration.gac import Split, learn_sample_weights, outer_loss, split_rows
from runtime.errors import ConfigError
from tests.conftest import CALIB


def _linear_loss(x: torch.Tensor, y: torch.Tensor):
    def row_loss(theta: dict, rows: torch.Tensor) -> torch.Tensor:
        return (x[rows] @ theta["w"] - y[rows]) ** 2

    return row_loss


def test_the_weights_move_toward_the_inputs_whose_gradients_the_validation_groups_share():
    # 16 training inputs: the first 8 pull w toward +1 as both validation groups do, the last 8 toward −1
    x = torch.ones(20, 1, dtype=torch.float64)
    y = torch.cat([torch.ones(8), -torch.ones(8), torch.ones(4)]).double()
    split = Split(torch.arange(16), torch.arange(16, 20), torch.tensor([0, 0, 1, 1]), 2)
    params = {"w": torch.zeros(1, dtype=torch.float64)}
    omega, record = learn_sample_weights(params, _linear_loss(x, y), split, tau=1.0, steps=30, batch=16,
                                         inner_lr=0.1, outer_lr=0.1, gm_weight=1.0,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert float(omega.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(omega[:8].sum()) > 0.75, omega
    assert record["last"]["val"] < record["first"]["val"]


def test_the_weights_do_not_depend_on_the_scale_of_the_block_loss():
    # η, λ and the cosine comparison are relative: a block whose errors are 1000× larger learns the same ω
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(40, generator=gen, dtype=torch.float64)
    split = split_rows(np.repeat(np.arange(5), 8), 0.25, 5, 0)
    params = {"w": torch.randn(3, generator=gen, dtype=torch.float64), "a": torch.tensor(0.7, dtype=torch.float64)}

    def learn(scale):
        def row_loss(theta: dict, rows: torch.Tensor) -> torch.Tensor:
            return scale * (torch.tanh(x[rows] @ theta["w"]) * theta["a"] - y[rows]) ** 2

        gen = torch.Generator().manual_seed(1)
        return learn_sample_weights(params, row_loss, split, tau=1.0, steps=10, batch=8, inner_lr=0.1,
                                    outer_lr=0.1, gm_weight=1.0, generator=gen)  # fmt: skip

    (w1, r1), (w2, r2) = learn(1.0), learn(1000.0)
    assert r1["gm_scale"] > 0 and r2["gm_scale"] == pytest.approx(1000 * r1["gm_scale"], rel=1e-9)
    assert not torch.allclose(w1, torch.full_like(w1, 1 / len(w1)), atol=1e-4)  # ω did move
    assert torch.allclose(w1, w2, rtol=1e-4, atol=0), (w1 / w2 - 1).abs().max()  # up to Adam's ε


def test_the_outer_gradient_matches_finite_differences_in_float64():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(24, generator=gen, dtype=torch.float64)

    def row_loss(theta: dict, rows: torch.Tensor) -> torch.Tensor:  # nonlinear in θ: the GM term is not 0
        return (torch.tanh(x[rows] @ theta["w"]) * theta["a"] - y[rows]) ** 2

    split = Split(torch.arange(16), torch.arange(16, 24), torch.arange(8) // 3 % 3, 3)
    params = {"w": torch.randn(3, generator=gen, dtype=torch.float64), "a": torch.tensor(0.7, dtype=torch.float64)}
    batch = torch.tensor([0, 3, 5, 6, 9, 12, 15])
    s = torch.randn(16, generator=gen, dtype=torch.float64) * 0.3

    def f(logits):
        logits = logits.clone().requires_grad_(True)
        return outer_loss(logits, 0.8, batch, params, row_loss, split.train, split, 0.2, 50.0)[0].detach()

    logits = s.clone().requires_grad_(True)
    loss, parts = outer_loss(logits, 0.8, batch, params, row_loss, split.train, split, 0.2, 50.0)
    assert abs(parts["gm"]) > 1e-6  # the gradient-matching term takes part
    (grad,) = torch.autograd.grad(loss, logits)
    h = 1e-6
    fd = torch.stack([(f(s + h * e) - f(s - h * e)) / (2 * h) for e in torch.eye(16, dtype=torch.float64)])
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-9), (grad, fd)


def test_the_validation_split_is_timestep_balanced_and_held_out():
    row_t = np.repeat(np.arange(10) * 100, 40)  # 10 calibrated timesteps × 40 inputs
    split = split_rows(row_t, 0.05, 5, seed=0)
    assert len(split.val) == 20 and set(np.bincount(split.val_group.numpy())) == {4}
    assert not set(split.train.tolist()) & set(split.val.tolist())
    assert len(split.train) + len(split.val) == len(row_t)
    groups = {g: sorted(set(row_t[split.val[split.val_group == g].numpy()])) for g in range(5)}
    assert all(max(groups[g]) < min(groups[g + 1]) for g in range(4))  # contiguous in t
    again = split_rows(row_t, 0.05, 5, seed=0)
    assert torch.equal(again.val, split.val)


GAC = dict(CALIB, calib_samples=4, weight_rounding="brecq", adaround_iters=2, act_iters=1, recon_batch=4)


def test_without_meta_steps_gac_is_qdiffusion_bit_for_bit(tiny_model):
    from calibration.calibrate import calibrate

    base = CalibrationConfig.for_method("qdiffusion", **GAC)
    off = CalibrationConfig.for_method("gac", **GAC, gac_meta_steps=0)
    a, b = (calibrate(tiny_model, c, progress=False) for c in (base, off))
    assert a.weights.keys() == b.weights.keys()
    for name in a.weights:
        assert torch.equal(a.weights[name][0], b.weights[name][0]), name
    assert a.activations == b.activations
    assert a.stats["reconstruction"]["weight_loss"] == b.stats["reconstruction"]["weight_loss"]


def test_gac_on_the_tiny_model_records_its_weights_and_reproduces_from_the_seed(tiny_model):
    from calibration.calibrate import calibrate

    cfg = CalibrationConfig.for_method("gac", **GAC, gac_meta_steps=2, gac_groups=2)
    r1, r2 = (calibrate(tiny_model, cfg, progress=False) for _ in range(2))
    record = r1.stats["reconstruction"]["gac"]
    assert record and record == r2.stats["reconstruction"]["gac"]
    for unit in record.values():
        assert sum(unit["mass"]) == pytest.approx(1.0, abs=1e-5)
        assert 0 < unit["entropy"] <= 1.0 + 1e-9 and unit["meta_steps"] == 2
    for name in r1.weights:
        assert torch.equal(r1.weights[name][0], r2.weights[name][0])


@pytest.mark.parametrize(("fields", "flag"), [
    (dict(gac_tau=0.0), "--gac-tau"),
    (dict(gac_val_share=0.0), "--gac-val-share"),
    (dict(gac_val_share=0.6), "--gac-val-share"),
    (dict(gac_groups=1), "--gac-groups"),
    (dict(gac_groups=6), "--gac-groups"),  # more than the 5 calibrated timesteps
    (dict(weight_rounding="nearest"), "--weight-rounding brecq"),
    (dict(gac_meta_steps=-1), "--gac-meta-steps"),
    (dict(gac_match="l2"), "--gac-match"),
])  # fmt: skip
def test_bad_gac_settings_are_refused_naming_the_flag(fields, flag):
    with pytest.raises(ConfigError, match=flag):
        CalibrationConfig.for_method("gac", **(GAC | fields))


def test_compile_refuses_a_bad_gac_flag_before_any_work(tiny_dir, tmp_path, capsys):
    from tools.cli import main

    out = tmp_path / "b"
    assert main(["compile", str(tiny_dir), "-o", str(out), "--method", "gac", "--gac-tau", "-1", "-q"]) == 2
    assert "--gac-tau" in capsys.readouterr().err and not out.exists()


def test_compile_gac_with_groups_records_the_weights_in_the_manifest_and_info_draws_them(tiny_dir, tmp_path):
    import json

    from tools.cli import main

    out = tmp_path / "b"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--method", "gac", "--steps", "10", "--calib-samples", "4",
            "--calib-timesteps", "5", "--adaround-iters", "2", "--act-iters", "1", "--recon-batch", "4",
            "--gac-meta-steps", "1", "--gac-groups", "2", "--groups", "2", "--group-epochs", "1", "-q"]  # fmt: skip
    assert main(argv) == 0  # with timestep groups: the sample weights, then the group search
    manifest = json.loads((out / "manifest.json").read_text())
    cal = manifest["calibration"]
    assert cal["method"] == "gac" and cal["config"]["gac_groups"] == 2 and len(manifest["groups"]) == 2
    record = cal["stats"]["reconstruction"]["gac"]
    assert record and all(abs(sum(u["mass"]) - 1) < 1e-5 for u in record.values())
    assert main(["info", str(out), "--plots", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "gac_weights.png").stat().st_size > 0
