"""PTQD core: statistics recover planted noise, the corrections invert it, VSC stays non-negative, and the
sampler applies them only when asked and only for the sampler they were gathered for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.ptqd import step_statistics
from runtime.errors import BundleError, SamplerError
from runtime.ptqd import PtqdTables, calibrated_sigma, correct_eps, eps_coefficient


def _planted(k=0.08, sigma=0.05, n=256, c=3, seed=0):
    rng = np.random.default_rng(seed)
    fp = rng.standard_normal((n, c, 8, 8))
    bias = np.array([0.03, -0.02, 0.01])[:c]
    q = (1 + k) * fp + bias.reshape(1, -1, 1, 1) + sigma * rng.standard_normal(fp.shape)
    return q, fp, bias


def test_statistics_recover_planted_correlation_bias_and_noise():
    q, fp, bias = _planted()
    k, b, sq = step_statistics(q, fp)
    assert abs(k - 0.08) < 2e-3
    np.testing.assert_allclose(b, bias, atol=2e-3)
    assert abs(sq - 0.05) < 1e-3


def test_corrections_divide_out_the_correlated_part_and_the_bias():
    q, fp, bias = _planted(sigma=0.0)
    k, b, _ = step_statistics(q, fp)
    fixed = correct_eps(q.astype(np.float32), k, b, cnc=True, bc=True)
    # k is the slope without intercept (the design's definition): the planted bias leaks into it by
    # ⟨b, ε_FP⟩/⟨ε_FP, ε_FP⟩, which is 1e-4 of ε here
    np.testing.assert_allclose(fixed, fp, rtol=1e-4, atol=1e-5)
    only_cnc = correct_eps(q.astype(np.float32), k, b, cnc=True, bc=False)
    assert np.abs(only_cnc - fp).max() > 0.01  # the bias is still there
    np.testing.assert_array_equal(correct_eps(q.astype(np.float32), k, b, cnc=False, bc=False), q.astype(np.float32))


@pytest.mark.parametrize("k", [-0.35, 0.08])
def test_minimum_error_gain_recovers_planted_statistics_and_beats_cnc(k):
    """Planted ε̂ = (1 + k) ε + b + n with a loud residual: the gathered tables give the Wiener gain
    c = (1 + k) E[ε²] / ((1 + k)² E[ε²] + σ²), and c (ε̂ − b) has the least squared error of the three."""
    from calibration.ptqd import StepAccumulator

    sigma = 0.5
    q, fp, bias = _planted(k=k, sigma=sigma, n=512)
    acc = StepAccumulator(3)
    acc.add(q, fp)
    kk, b, sq, power = acc.result()
    tables = PtqdTables.checked([10], [kk], b[None], [sq], sampler="ddim", steps=1, eta=0.0, channels=3,
                                eps_power=[power])  # fmt: skip
    expected = (1 + k) / ((1 + k) ** 2 + sigma**2)  # E[ε²] = 1
    assert tables.gain(10) == pytest.approx(expected, rel=0.02)
    q32 = q.astype(np.float32)
    err = {
        "none": np.mean((correct_eps(q32, kk, b, cnc=False, bc=True) - fp) ** 2),
        "cnc": np.mean((correct_eps(q32, kk, b, cnc=True, bc=True) - fp) ** 2),
        "gain": np.mean((correct_eps(q32, kk, b, cnc=False, bc=True, gain=tables.gain(10)) - fp) ** 2),
    }
    assert err["gain"] < err["cnc"] and err["gain"] < err["none"]
    # Eq. 7's expected error of the gain: (1 − c(1 + k))² E[ε²] + c² σ²
    c = tables.gain(10)
    assert err["gain"] == pytest.approx((1 - c * (1 + k)) ** 2 + c**2 * sigma**2, rel=0.03)


def test_gain_and_cnc_are_exclusive(tiny_model):
    from runtime.engine import EngineSet, TorchEngine
    from runtime.sampler import SamplerConfig, sample

    ts = tiny_model.schedule.timesteps(10)
    tables = PtqdTables.checked(ts, np.zeros(10), np.zeros((10, 1)), np.zeros(10), sampler="ddim", steps=10, eta=0.0,
                                channels=1, eps_power=np.ones(10))  # fmt: skip
    fp = EngineSet.single(TorchEngine(tiny_model.wrapper(), tiny_model.spec))
    with pytest.raises(SamplerError, match="gain replaces cnc"):
        sample(fp, tiny_model.schedule, SamplerConfig(steps=10), n=1, cond=np.zeros(1, np.int64), ptqd=tables,
               ptqd_components=("cnc", "gain"), progress=False)  # fmt: skip


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_eps_coefficient_is_the_samplers_own_derivative(name):
    """λ_t from the formula equals d x_prev / d ε of the sampler's update (finite difference, no noise)."""
    from runtime.sampler import SamplerConfig, _step
    from runtime.schedule import NoiseSchedule

    schedule = NoiseSchedule(tuple(np.linspace(1e-4, 0.02, 1000).tolist()), "linear")
    cfg = SamplerConfig(name, 50, 0.0 if name == "ddim" else 1.0, 1.0)
    ts = schedule.timesteps(50)
    t, prev = int(ts[10]), int(ts[11])
    x = np.random.default_rng(0).standard_normal((1, 1, 4, 4)).astype(np.float32)
    eps = np.zeros_like(x)
    quiet = type("Quiet", (), {"draw": lambda self: np.zeros_like(x)})()
    d = 1e-2
    slope = (_step(schedule, cfg, x, eps + d, t, prev, quiet) - _step(schedule, cfg, x, eps, t, prev, quiet)) / d
    a_t, a_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[prev]
    assert np.allclose(slope, eps_coefficient(name, a_t, a_prev, 0.0), rtol=1e-3, atol=1e-4)


def test_variance_schedule_calibration_never_goes_negative():
    rng = np.random.default_rng(1)
    for sigma, lam, sq in rng.uniform(0, 2, size=(500, 3)):
        out = calibrated_sigma(sigma, lam, sq)
        assert out >= 0
        assert np.isclose(out**2, max(sigma**2 - lam**2 * sq**2, 0.0))


def test_tables_refuse_garbage_and_record_the_k_fallback():
    ts, c = [900, 500, 100], 2
    ok = dict(sampler="ddim", steps=3, eta=1.0, channels=c)
    with pytest.raises(BundleError, match="k is NaN or Inf at timesteps \\[500\\]"):
        PtqdTables.checked(ts, [0.1, np.nan, 0.1], np.zeros((3, c)), [0.1] * 3, **ok)
    with pytest.raises(BundleError, match="bias"):
        PtqdTables.checked(ts, [0.1] * 3, np.zeros((3, c + 1)), [0.1] * 3, **ok)
    with pytest.raises(BundleError, match="one entry per step"):
        PtqdTables.checked(ts, [0.1] * 2, np.zeros((3, c)), [0.1] * 3, **ok)
    with pytest.raises(BundleError, match="negative"):
        PtqdTables.checked(ts, [0.1] * 3, np.zeros((3, c)), [0.1, -0.1, 0.1], **ok)
    tables = PtqdTables.checked(ts, [0.1, -1.0, -3.0], np.zeros((3, c)), [0.1] * 3, **ok)
    assert tables.k_fallback == (500, 100) and tables.k.tolist() == [0.1, 0.0, 0.0]
    assert tables.row(880) == 0 and tables.row(120) == 2


def test_cnc_guard_keeps_k_zero_where_dividing_would_raise_the_error():
    ts, c = [900, 500, 100], 3
    # k −0.9 with σ_q 1: CNC's error 1/0.01 = 100 against 0.81 + 1 without; k +0.2 always helps
    tables = PtqdTables.checked(ts, [0.2, -0.001, -0.9], np.zeros((3, c)), [0.1, 0.1, 1.0], sampler="ddim", steps=3,
                                eta=1.0, channels=c, eps_power=[1.0, 1.0, 1.0])  # fmt: skip
    assert tables.cnc_off == (500, 100)  # −0.001: 0.01/0.998² ≥ 1e-6 + 0.01, so no gain either
    assert [tables.at(t)[0] for t in ts] == [0.2, 0.0, 0.0]
    assert [tables.at(t, guard=False)[0] for t in ts] == [0.2, -0.001, -0.9]
    # the guard is Eq. 7's own expected error: on planted data it picks the smaller measured error
    for k, sigma in ((0.2, 0.1), (-0.9, 1.0)):
        q, fp, _ = _planted(k=k, sigma=sigma)
        kk, b, sq = step_statistics(q, fp)
        t = PtqdTables.checked([1], [kk], b[None], [sq], sampler="ddim", steps=1, eta=1.0, channels=3,
                               eps_power=[float(np.mean(fp**2))])  # fmt: skip
        err = {cnc: np.mean((correct_eps(q, kk, b, cnc=cnc, bc=True) - fp) ** 2) for cnc in (True, False)}
        assert (t.cnc_off == ()) == (err[True] < err[False])


class _Distorted:
    """A 'quantized' engine: the FP engine's ε times (1 + k) plus a per-channel bias (no residual noise)."""

    def __init__(self, engine, k, bias):
        self.engine, self.spec, self.k, self.bias = engine, engine.spec, k, bias

    def infer(self, sample, timestep, cond=None):
        eps = self.engine.infer(sample, timestep, cond)
        return ((1 + self.k) * eps + self.bias.reshape(1, -1, 1, 1)).astype(np.float32)


def test_corrected_sampling_matches_the_full_precision_sampler(tiny_model):
    from runtime.engine import EngineSet, TorchEngine
    from runtime.sampler import SamplerConfig, sample

    fp = TorchEngine(tiny_model.wrapper(), tiny_model.spec)
    channels = tiny_model.spec.sample_shape[0]
    bias = np.full(channels, 0.05)
    cfg = SamplerConfig("ddim", 10, 1.0, 1.0)
    ts = tiny_model.schedule.timesteps(10)
    labels = None if tiny_model.spec.num_class_embeds is None else np.zeros(4, np.int64)
    args = dict(n=4, seed=3, cond=labels, null_cond=tiny_model.null_class, progress=False)
    ref = sample(EngineSet.single(fp), tiny_model.schedule, cfg, **args)
    tables = PtqdTables.checked(ts, [0.1] * len(ts), np.tile(bias, (len(ts), 1)), [0.0] * len(ts), sampler="ddim",
                                steps=10, eta=1.0, channels=channels)  # fmt: skip
    bad = EngineSet.single(_Distorted(fp, 0.1, bias))
    raw = sample(bad, tiny_model.schedule, cfg, **args)
    fixed = sample(bad, tiny_model.schedule, cfg, ptqd=tables, **args)
    assert fixed.ptqd == ["cnc", "bc", "vsc"] and raw.ptqd == []
    err_raw = np.abs(raw.samples - ref.samples).max()
    assert np.abs(fixed.samples - ref.samples).max() < 1e-3 < err_raw
    with pytest.raises(SamplerError, match="gathered for ddim, not ddpm"):
        sample(bad, tiny_model.schedule, SamplerConfig("ddpm", 10, 1.0, 1.0), ptqd=tables, **args)
    quiet = sample(bad, tiny_model.schedule, SamplerConfig("ddim", 10, 0.0, 1.0), ptqd=tables, **args)
    assert any("eta = 0" in note for note in quiet.ptqd_notes)
    with pytest.raises(SamplerError, match="unknown"):
        sample(bad, tiny_model.schedule, cfg, ptqd=tables, ptqd_components=("cnc", "magic"), **args)


def test_streamed_statistics_equal_the_one_shot_estimate():
    from calibration.ptqd import StepAccumulator

    q, fp, _ = _planted(n=64)
    acc = StepAccumulator(3)
    for lo in range(0, 64, 10):
        acc.add(q[lo : lo + 10], fp[lo : lo + 10])
    k, b, sq, power = acc.result()
    k1, b1, sq1 = step_statistics(q, fp)
    assert np.isclose(k, k1, rtol=1e-10) and np.allclose(b, b1, atol=1e-12) and np.isclose(sq, sq1, rtol=1e-8)
    assert np.isclose(power, np.mean(fp**2), rtol=1e-12)


def test_gather_on_a_shipped_bundle_finds_the_engines_error(tiny_model, tiny_bundle):
    """Statistics of the tiny W8A8 bundle against its FP model: one row per step, finite, and a residual
    that is small next to ε (std 1) but not zero."""
    from calibration.ptqd import gather
    from runtime.bundle import load_bundle
    from runtime.sampler import SamplerConfig

    cfg = SamplerConfig("ddim", 5, 1.0, 1.0)
    tables = gather(tiny_model, load_bundle(tiny_bundle).engines(), cfg, n=4, seed=0, batch_size=2, progress=False)
    assert len(tables.timesteps) == 5 and tables.bias.shape == (5, tiny_model.spec.sample_shape[0])
    assert (tables.sigma_q > 0).all() and (tables.sigma_q < 0.5).all() and tables.sampler == "ddim"
    # a bundle without statistics samples uncorrected, whatever --ptqd asks for
    from tools.deploy.pipeline import sample_to_file

    run = sample_to_file(tiny_bundle, tiny_bundle.parent / "s.npz", n=1, steps=3, progress=False)
    assert load_bundle(tiny_bundle).ptqd() is None and run.ptqd == [] and run.ptqd_notes == []


def test_compile_with_ptqd_stores_statistics_and_sample_applies_them(tiny_dir, tmp_path):
    from runtime.bundle import load_bundle
    from tools.cli import main

    out = tmp_path / "b"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--steps", "6", "--eta", "1", "--calib-samples", "4",
            "--calib-timesteps", "3", "--ptqd", "--ptqd-samples", "4", "-q"]  # fmt: skip
    assert main(argv) == 0
    bundle = load_bundle(out)
    tables = bundle.ptqd().tables["W8A8"]
    assert bundle.manifest["ptqd"]["W8A8"]["samples"] == 4 and len(tables.timesteps) == 6
    args = ["sample", str(out), "-n", "2", "-q"]
    assert main([*args, "-o", str(tmp_path / "a.npz")]) == 0
    assert main([*args, "--no-ptqd", "-o", str(tmp_path / "b.npz")]) == 0
    a, b = (np.load(tmp_path / f"{x}.npz")["samples"] for x in "ab")
    assert not np.array_equal(a, b)
    meta = json.loads(str(np.load(tmp_path / "a.npz")["meta"]))
    assert meta["ptqd"] == ["cnc", "bc", "vsc"]
    assert main(["info", str(out), "--plots", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "ptqd.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["info", str(out), "--json"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["ptqd"]["W8A8"]["file"] = "elsewhere.safetensors"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not hashed"):
        load_bundle(out)


def test_switch_is_the_first_step_where_the_cheap_precision_loses_to_the_diffusion_snr():
    from runtime.ptqd import diffusion_snr, switch_timestep

    ts = np.array([900, 700, 500, 300, 100])
    assert switch_timestep(ts, np.array([5, 4, 3, 2, 1.0]), np.array([1, 2, 3.5, 4, 9.0])) == 700
    assert switch_timestep(ts, np.full(5, 10.0), np.arange(5.0)) == 0  # cheap precision everywhere
    assert switch_timestep(ts, np.zeros(5), np.ones(5)) == 901  # never
    # a later step passing again does not move the switch back: one contiguous cheap range
    assert switch_timestep(ts, np.array([5, 1, 9, 9, 9.0]), np.full(5, 2.0)) == 900
    ac = np.linspace(0.99, 0.01, 1000)
    np.testing.assert_allclose(diffusion_snr(ac, [0, 999]), [0.99 / 0.01, 0.01 / 0.99])
    tables = PtqdTables.checked(ts, [0.1] * 5, np.zeros((5, 1)), [0.5] * 5, sampler="ddim", steps=5, eta=1.0,
                                channels=1, eps_power=[1.0] * 5)  # fmt: skip
    np.testing.assert_allclose(tables.snr(), 1.1**2 / 0.25)
    with pytest.raises(BundleError, match="eps_power"):
        PtqdTables.checked(ts, [0.1] * 5, np.zeros((5, 1)), [0.5] * 5, sampler="ddim", steps=5, eta=1.0,
                           channels=1, eps_power=[1.0, np.nan, 1, 1, 1])  # fmt: skip


def test_mixed_precision_routes_each_step_to_its_precision_and_statistics(mixed_bundle, tmp_path):
    from runtime.bundle import load_bundle
    from tools.deploy.pipeline import sample_to_file

    bundle = load_bundle(mixed_bundle)
    plan = bundle.manifest["precision_plan"]
    assert (plan["low"], plan["high"]) == ("W8A4", "W8A8") and set(bundle.manifest["ptqd"]) == {"W8A4", "W8A8"}
    groups = {b: set(v["groups"]) for b, v in bundle.precisions.items()}
    assert not groups["W8A4"] & groups["W8A8"]
    ts = bundle.schedule.timesteps(6)
    switch = int(ts[2])  # steps 0-2 cheap, 3-5 full
    runs = {}
    for name, kw in {"mixed": {"switch_t": switch}, "low": {"precision": "W8A4"}, "high": {"precision": "W8A8"},
                     "low0": {"switch_t": 0}}.items():  # fmt: skip
        runs[name] = sample_to_file(mixed_bundle, tmp_path / f"{name}.npz", n=2, progress=False, backend="ort", **kw)
    mixed = runs["mixed"]
    assert mixed.step_precisions == ["W8A4"] * 3 + ["W8A8"] * 3
    assert [g in groups[b] for g, b in zip(mixed.step_groups, mixed.step_precisions, strict=True)] == [True] * 6
    assert set(runs["low"].step_precisions) == {"W8A4"} and set(runs["high"].step_precisions) == {"W8A8"}
    np.testing.assert_array_equal(runs["low0"].samples, runs["low"].samples)  # switch at t = 0: all cheap
    assert not np.array_equal(mixed.samples, runs["low"].samples)
    assert not np.array_equal(mixed.samples, runs["high"].samples)
    # each step reads the statistics of the precision that served it
    routed = bundle.ptqd(bundle.route(switch_t=switch))
    for t, bits in zip(ts, mixed.step_precisions, strict=True):
        k, _, sq = routed.at(int(t), guard=False)
        own = routed.tables[bits]
        assert (k, sq) == (own.k[own.row(int(t))], own.sigma_q[own.row(int(t))])
        assert routed.at(int(t))[0] == (0.0 if int(t) in own.cnc_off else k)
    # the default route follows the plan; bit operations saved = cheap share × (1 − 4/8)
    n_low = plan["steps"]["W8A4"]
    assert np.isclose(plan["bop_saving"], n_low / 6 * 0.5, atol=1e-4)
    default = sample_to_file(mixed_bundle, tmp_path / "d.npz", n=1, progress=False, backend="ort")
    assert default.step_precisions == ["W8A4"] * n_low + ["W8A8"] * (6 - n_low)
    assert np.all((ts >= plan["switch_t"]) == (np.array(default.step_precisions) == "W8A4"))


def test_mixed_precision_refuses_bad_requests(mixed_bundle, tiny_dir, tiny_model, tmp_path):
    from calibration.calibrate import calibrate
    from calibration.config import CalibrationConfig
    from exporter.bundle_writer import write_bundle
    from runtime.errors import CalibrationError, ExportError
    from tests.conftest import CALIB
    from tools.cli import main
    from tools.deploy.pipeline import sample_to_file

    with pytest.raises(BundleError, match="holds"):
        sample_to_file(mixed_bundle, tmp_path / "x.npz", n=1, precision="W4A4", progress=False)
    with pytest.raises(BundleError, match="not both"):
        sample_to_file(mixed_bundle, tmp_path / "x.npz", n=1, precision="W8A8", switch_t=3, progress=False)
    base = ["compile", str(tiny_dir), "-o", str(tmp_path / "b"), "--steps", "6", "--calib-samples", "4",
            "--calib-timesteps", "3", "-q"]  # fmt: skip
    assert main([*base, "--mixed-bits", "W8A4"]) == 2  # no --ptqd
    assert main([*base, "--mixed-bits", "W8A8", "--ptqd"]) == 2  # not cheaper
    assert main([*base, "--bits", "W4A8", "--mixed-bits", "W8A4", "--ptqd"]) == 2  # more weight bits
    assert main([*base, "--switch-t", "400"]) == 2  # nothing to switch to
    assert not (tmp_path / "b").exists()
    w8, w4 = (calibrate(tiny_model, CalibrationConfig(**CALIB, bits=b), progress=False) for b in ("W8A8", "W4A4"))
    with pytest.raises(ExportError, match="same weight bits"):
        write_bundle(tiny_model, [w8, w4], tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()
    import shutil

    from runtime.bundle import load_bundle
    from runtime.ptqd import RoutedPtqd

    for edit, match in (
        (lambda m: m["precision_plan"].update(low="W2A2"), "names precisions"),
        (lambda m: m["precisions"]["W8A4"].update(groups=[0]), "its own groups"),
        (lambda m: m["ptqd"].pop("W8A4"), None),
    ):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(mixed_bundle, bad)
        manifest = json.loads((bad / "manifest.json").read_text())
        edit(manifest)
        (bad / "manifest.json").write_text(json.dumps(manifest))
        if match:
            with pytest.raises(BundleError, match=match):
                load_bundle(bad)
        else:  # statistics of the precision serving the early steps are gone: refuse, do not guess
            with pytest.raises(BundleError, match="no PTQD statistics for \\['W8A4'\\]"):
                load_bundle(bad).ptqd(load_bundle(bad).route(precision="W8A4"))
    tables = load_bundle(mixed_bundle).ptqd().tables
    other = PtqdTables.checked(tables["W8A4"].timesteps, tables["W8A4"].k, tables["W8A4"].bias,
                               tables["W8A4"].sigma_q, sampler="ddpm", steps=6, eta=1.0, channels=1)  # fmt: skip
    with pytest.raises(BundleError, match="gathered for ddpm"):
        RoutedPtqd({"W8A8": tables["W8A8"], "W8A4": other}, ("W8A8",) * 1000)
    with pytest.raises(CalibrationError, match="cannot reuse weights"):
        calibrate(tiny_model, CalibrationConfig(**CALIB, weight_rounding="brecq"), weights=w8.weights, progress=False)


class _Noisy(_Distorted):
    """The distorted engine plus residual noise of a chosen distribution (std 0.1)."""

    def __init__(self, engine, k, bias, dist, seed=0):
        super().__init__(engine, k, bias)
        self.dist, self.rng = dist, np.random.default_rng(seed)

    def infer(self, sample, timestep, class_labels=None):
        eps = super().infer(sample, timestep, class_labels)
        if self.dist == "normal":
            noise = 0.1 * self.rng.standard_normal(eps.shape)
        else:  # uniform with std 0.1: excess kurtosis −1.2
            noise = self.rng.uniform(-0.1 * np.sqrt(3), 0.1 * np.sqrt(3), eps.shape)
        return (eps + noise).astype(np.float32)


def test_normality_check_tells_gaussian_from_uniform_residuals(tiny_model):
    from calibration.ptqd import residual_checks
    from runtime.engine import EngineSet, TorchEngine
    from runtime.sampler import SamplerConfig

    fp = TorchEngine(tiny_model.wrapper(), tiny_model.spec)
    channels = tiny_model.spec.sample_shape[0]
    bias = np.linspace(-0.05, 0.05, channels)
    cfg = SamplerConfig("ddim", 4, 1.0, 1.0)
    ts = tiny_model.schedule.timesteps(4)
    tables = PtqdTables.checked(ts, [0.1] * 4, np.tile(bias, (4, 1)), [0.1] * 4, sampler="ddim", steps=4, eta=1.0,
                                channels=channels)  # fmt: skip
    out = {}
    for dist in ("normal", "uniform"):
        engines = EngineSet.single(_Noisy(fp, 0.1, bias, dist))
        out[dist] = residual_checks(tiny_model, engines, tables, cfg, n=40, seed=0, batch_size=20, keep=2000,
                                    progress=False)  # fmt: skip
    assert out["normal"]["elements_per_step"] == 2000 and len(out["normal"]["normaltest_p"]) == 4
    assert min(out["normal"]["normaltest_p"]) > 1e-3 and max(out["uniform"]["normaltest_p"]) < 1e-6
    np.testing.assert_allclose(out["uniform"]["excess_kurtosis"], -1.2, atol=0.2)
    np.testing.assert_allclose(out["normal"]["excess_kurtosis"], 0.0, atol=0.4)
    assert all(r > 0 for r in out["normal"]["pearson_r"])  # Δε = 0.1 ε_FP + b + n: positively correlated
