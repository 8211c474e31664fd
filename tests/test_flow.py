"""Flow matching: FlowMatchEulerDiscreteScheduler configs load as a FlowSchedule whose σ and t match diffusers', the
host sampler's Euler flow solver follows diffusers' scheduler step for step on a full-precision DiT, the engine
contract takes float timesteps t = σ·T for these models, flow models compile (groups, PTQD on the velocity, both
profiles) and sample close to full precision, and what cannot work is refused with the reason."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from calibration.model_io import load_model
from runtime.engine import EngineSet, InputSpec, TorchEngine, check_inputs, timestep_key
from runtime.errors import EngineInputError, ModelLoadError, SamplerError
from runtime.sampler import SamplerConfig, noise_rng, sample
from runtime.schedule import FlowSchedule, load_schedule
from tools.bench.synthetic import save_dit_pipeline
from tools.cli import main


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    root = save_dit_pipeline(tmp_path_factory.mktemp("flow") / "model", "tiny")
    shutil.rmtree(root / "scheduler")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(root / "scheduler")
    return root


@pytest.mark.parametrize("shift, steps", [(1.0, 10), (3.0, 28), (3.0, 1), (6.0, 50)])
def test_flow_schedule_visits_diffusers_sigmas_and_timesteps(tmp_path, shift, steps):
    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(tmp_path)
    ours = load_schedule(tmp_path)
    assert isinstance(ours, FlowSchedule) and ours.shift == shift
    theirs = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    theirs.set_timesteps(steps)
    np.testing.assert_allclose(ours.sigmas(steps), theirs.sigmas.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours.timesteps(steps), theirs.timesteps.numpy(), rtol=0, atol=1e-4)
    assert FlowSchedule.from_dict(json.loads(json.dumps(ours.to_dict()))) == ours


def test_euler_sampler_follows_diffusers_step_for_step(flow_dir):
    """Full precision, guidance 2: our host loop against FlowMatchEulerDiscreteScheduler.step over the same model
    calls and the same initial noise (within 1e-4; measured: identical)."""
    model = load_model(flow_dir)
    assert model.spec.timestep_type == "float32"
    engines = EngineSet.single(TorchEngine(model.wrapper(), model.spec))
    n, steps, guidance, labels = 3, 12, 2.0, np.array([1, 4, 7])
    seen = []

    def observe(i, t, x, v, c):
        seen.append(x.copy())

    run = sample(engines, model.schedule, SamplerConfig("euler", steps, 0.0, guidance), n=n, seed=0, cond=labels,
                 null_cond=model.null_class, progress=False, observe=observe)  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(flow_dir / "scheduler")
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(np.stack([noise_rng(0, i).standard_normal(model.spec.sample_shape, dtype=np.float32)
                                   for i in range(n)]))  # fmt: skip
    both = torch.cat([torch.from_numpy(labels), torch.full((n,), model.null_class)])
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            np.testing.assert_allclose(seen[i], x.numpy(), atol=1e-4)  # every step's input
            out = model.unet(torch.cat([x, x]), timestep=t.expand(2 * n), class_labels=both).sample[:, :1]
            x = scheduler.step(out[n:] + guidance * (out[:n] - out[n:]), t, x).prev_sample
    np.testing.assert_allclose(run.samples, x.numpy(), atol=1e-4)
    assert np.allclose(run.timesteps, scheduler.timesteps.numpy())


def test_float_timesteps_only_where_the_spec_says():
    flow = InputSpec((1, 8, 8), 1000, 11, timestep_type="float32")
    x, labels = np.zeros((2, 1, 8, 8), np.float32), np.array([0, 1])
    _, t, _ = check_inputs(flow, x, np.array([999.5, 1000.0]), labels)
    assert t.dtype == np.float32
    with pytest.raises(EngineInputError, match=r"\[0, 1000\]"):
        check_inputs(flow, x, np.array([1000.5, 3.0]), labels)
    with pytest.raises(EngineInputError, match="integer training timesteps"):
        check_inputs(InputSpec((1, 8, 8), 1000, 11), x, np.array([999.5, 3.0]), labels)
    assert InputSpec.from_dict(flow.to_dict()) == flow
    assert "timestep_type" not in InputSpec((1, 8, 8), 1000, 11).to_dict()  # manifests of integer models unchanged
    with pytest.raises(EngineInputError, match="timestep_type"):
        InputSpec((1, 8, 8), 1000, 11, timestep_type="float16")


def test_samplers_and_models_must_match(flow_dir, tiny_dir):
    flow = load_model(flow_dir)
    engines = EngineSet.single(TorchEngine(flow.wrapper(), flow.spec))
    with pytest.raises(SamplerError, match="flow-matching model .* --sampler euler"):
        sample(engines, flow.schedule, SamplerConfig("ddim", 4), n=1, cond=[1], progress=False)
    ddpm = load_model(tiny_dir)
    with pytest.raises(SamplerError, match="needs a flow-matching model.*use ddim or ddpm"):
        sample(EngineSet.single(TorchEngine(ddpm.wrapper(), ddpm.spec)), ddpm.schedule, SamplerConfig("euler", 4),
               n=1, cond=[1], progress=False)  # fmt: skip
    with pytest.raises(SamplerError, match="deterministic; drop --eta"):
        SamplerConfig("euler", 4, eta=1.0)


def test_flow_configs_dqc_cannot_run_are_refused_by_name(flow_dir, tiny_dir, tmp_path):
    cfg = json.loads((flow_dir / "scheduler" / "scheduler_config.json").read_text())
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "scheduler_config.json").write_text(json.dumps(cfg | {"use_dynamic_shifting": True}))
    with pytest.raises(ModelLoadError, match="use_dynamic_shifting=True is not supported"):
        load_schedule(tmp_path / "s")
    (tmp_path / "s" / "scheduler_config.json").write_text(json.dumps(cfg | {"_class_name": "FlowMatchHeunScheduler"}))
    with pytest.raises(ModelLoadError, match="FlowMatchHeunScheduler is not supported"):
        load_schedule(tmp_path / "s")
    unet = shutil.copytree(tiny_dir, tmp_path / "unet_flow")
    shutil.rmtree(unet / "scheduler")
    shutil.copytree(flow_dir / "scheduler", unet / "scheduler")
    with pytest.raises(ModelLoadError, match="flow-matching scheduler with a UNet2DModel"):
        load_model(unet)


def test_dqc_samples_a_flow_model_and_refuses_the_wrong_sampler(flow_dir, tmp_path, capsys):
    out = tmp_path / "fp.npz"
    assert main(["sample", str(flow_dir), "-n", "2", "--steps", "6", "--class-label", "3", "-o", str(out), "-q"]) == 0
    meta = json.loads(str(np.load(out)["meta"]))
    assert meta["sampler"] == "euler" and np.isfinite(np.load(out)["samples"]).all()
    assert main(["sample", str(flow_dir), "-n", "1", "--sampler", "ddim", "-o", str(out), "-q"]) == 2
    assert "--sampler euler" in capsys.readouterr().err
    args = ["compile", str(flow_dir), "-o", str(tmp_path / "b"), "--steps", "4", "--calib-samples", "2", "-q"]
    assert main([*args, "--sampler", "ddim"]) == 2  # before any work: nothing written
    assert "flow-matching model" in capsys.readouterr().err and not (tmp_path / "b").exists()
    args[args.index("4")] = "500"  # shift 3: the last steps lie closer than one training timestep
    assert main(args) == 2
    assert "within one training timestep" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_timestep_keys_bin_float_timesteps_like_the_router():
    assert timestep_key(7) == 7 and timestep_key(np.int64(7)) == 7
    assert [timestep_key(t) for t in (1000.0, 999.5, 999.0, 0.5, 0.0)] == [999, 999, 998, 0, 0]
    assert timestep_key(np.array([1000.0, 1.0], np.float32)).tolist() == [999, 0]
    assert timestep_key(torch.tensor([1000.0, 2.5])).tolist() == [999, 2]
    spec = InputSpec((1, 8, 8), 1000, 11, timestep_type="float32")
    table = np.arange(1000) // 250
    es = EngineSet({g: None for g in range(4)}, table, spec)
    assert [es.group_of(t) for t in (1000.0, 750.0, 750.5, 0.0)] == [3, 2, 3, 0]


def test_flow_loss_weights_follow_the_euler_step():
    from calibration.objective import timestep_weights

    schedule, cfg = FlowSchedule(1000, 3.0), SamplerConfig("euler", 8)
    sigmas = schedule.sigmas(8).astype(np.float64)
    keys = timestep_key(schedule.timesteps(8))
    for how, expected in (("x0", sigmas[:-1] ** 2), ("xprev", np.diff(sigmas) ** 2), ("eps", np.ones(8))):
        w = timestep_weights(schedule, cfg, how)
        np.testing.assert_allclose(w[keys], expected / expected.mean(), rtol=1e-6)


@pytest.fixture(scope="module")
def flow_bundles(flow_dir, tmp_path_factory):
    """The tiny flow DiT compiled naive W8A8 (ort-cpu, PTQD statistics), W6A6 with 3 groups, and for trt-fp32."""
    root = tmp_path_factory.mktemp("flow_bundles")
    common = ["--steps", "8", "--calib-samples", "4", "-q"]
    runs = {
        "w8a8": ["--method", "naive", "--bits", "W8A8", "--ptqd", "--ptqd-samples", "8"],
        "groups": ["--method", "apqdm", "--bits", "W6A6", "--groups", "3", "--group-epochs", "1"],
        "trt": ["--method", "naive", "--bits", "W8A8", "--target", "trt-fp32"],
    }
    for name, extra in runs.items():
        assert main(["compile", str(flow_dir), "-o", str(root / name), *common, *extra]) == 0
    return root


def _samples(model, out, *extra):
    assert main(["sample", str(model), "-n", "4", "--steps", "8", "--class-label", "3", "-o", str(out), "-q",
                 *extra]) == 0  # fmt: skip
    return np.load(out)["samples"]


def test_flow_bundles_compile_and_sample_close_to_full_precision(flow_dir, flow_bundles, tmp_path):
    from runtime.bundle import load_bundle

    fp = _samples(flow_dir, tmp_path / "fp.npz")
    for name, floor in (("w8a8", 35.0), ("groups", 25.0), ("trt", 35.0)):
        bundle = load_bundle(flow_bundles / name)
        assert bundle.spec.timestep_type == "float32" and bundle.schedule.kind == "flow"
        assert bundle.manifest["calibration"]["sampler"] == "euler"
        q = _samples(flow_bundles / name, tmp_path / f"{name}.npz", "--backend", "ort")
        psnr = 10 * np.log10(4 / np.mean((q - fp) ** 2))
        assert floor < psnr < 90, (name, psnr)  # quantized: close to FP, not equal
    assert main(["info", str(flow_bundles / "w8a8"), "--plots", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "ptqd.png").is_file() and (tmp_path / "plots" / "group_map.png").is_file()


def test_flow_groups_route_each_euler_step_to_its_calibrated_group(flow_bundles):
    from runtime.bundle import load_bundle

    bundle = load_bundle(flow_bundles / "groups")
    ts = bundle.schedule.timesteps(8)
    search = bundle.manifest["calibration"]["stats"]["group_search"]
    assignment = {int(t): g for t, g in search["assignment"].items()}
    engines = bundle.engines(backend="ort")
    ids = [int(g["id"]) for g in bundle.manifest["groups"]]
    assert len(set(engines.group_of(float(t)) for t in ts)) > 1  # the steps use more than one group
    for t in ts:  # the key calibration recorded the step under routes it to the group it was assigned
        assert timestep_key(float(t)) in assignment
        assert engines.group_of(float(t)) in ids


class _Planted:
    """An engine predicting (1 + k) v + b[c] from the FP one: PTQD's model (Eq. 4 of docs/ptqd_flow_matching.md)
    with no residual noise."""

    def __init__(self, fp, k, bias):
        self.fp, self.spec, self.k, self.bias = fp, fp.spec, k, np.asarray(bias, np.float32)

    def infer(self, sample, timestep, cond=None):
        v = self.fp.infer(sample, timestep, cond)
        return ((1 + self.k) * v + self.bias.reshape(1, -1, 1, 1)).astype(np.float32)


def test_ptqd_for_velocity_recovers_planted_k_and_bias(flow_dir):
    from calibration.ptqd import gather

    model = load_model(flow_dir)
    fp = TorchEngine(model.wrapper(), model.spec)
    planted = EngineSet.single(_Planted(fp, -0.07, [0.05]))
    cfg = SamplerConfig("euler", 6)
    tables = gather(model, planted, cfg, n=4, seed=0, batch_size=4, progress=False)
    np.testing.assert_allclose(tables.k, -0.07, atol=1e-5)
    np.testing.assert_allclose(tables.bias, 0.05, atol=1e-5)
    assert tables.timesteps.tolist() == timestep_key(model.schedule.timesteps(6)).tolist()
    labels = np.full(4, 3)
    run = lambda es, **kw: sample(es, model.schedule, cfg, n=4, cond=labels, progress=False, **kw).samples  # noqa: E731
    ref = run(EngineSet.single(fp))
    raw = run(planted)
    fixed = run(planted, ptqd=tables, ptqd_components=("cnc", "bc", "vsc"))
    assert np.abs(raw - ref).max() > 1e-2  # the planted error moves the samples
    np.testing.assert_allclose(fixed, ref, atol=1e-4)  # CNC and BC on v undo it; VSC drops out with a note


def test_quality_table_calibrates_and_samples_a_flow_model_with_its_euler_solver(flow_dir, tmp_path):
    from tools.bench.method_table import run_method_table

    table = run_method_table(str(flow_dir), methods=["naive"], bits=["W8A8"], out_dir=tmp_path, n=4, steps=4,
                             batch_size=4, calibration={"calib_samples": 2, "calib_timesteps": 2},
                             progress=False)  # fmt: skip
    assert table["sampler"] == "euler"
    manifest = json.loads((tmp_path / "naive_W8A8" / "bundle" / "manifest.json").read_text())
    assert manifest["calibration"]["sampler"] == "euler"
    quantized = [r for r in table["rows"] if r["method"] == "naive"]
    assert len(quantized) == 1 and quantized[0]["psnr_db"] > 20


def test_mixed_precision_on_a_flow_model_switches_by_the_state_snr_of_its_euler_steps(flow_dir, tmp_path):
    """--mixed-bits on a flow model: the plan compares the cheap precision's SNR of v with the state's SNR
    (1 − σ)²/σ² at each Euler step's σ; sampling runs the cheap precision at the steps whose key is ≥ the switch
    and the full one below, and `--switch-t` moves it."""
    from runtime.bundle import load_bundle
    from tools.deploy.pipeline import sample_to_file

    bundle = tmp_path / "b"
    assert main(["compile", str(flow_dir), "-o", str(bundle), "--bits", "W8A8", "--mixed-bits", "W8A4", "--ptqd",
                 "--ptqd-samples", "8", "--steps", "8", "--calib-samples", "8", "--calib-timesteps", "4",
                 "-q"]) == 0  # fmt: skip
    b = load_bundle(bundle)
    plan = b.manifest["precision_plan"]
    assert (plan["low"], plan["high"]) == ("W8A4", "W8A8") and "(1-sigma)^2/sigma^2" in plan["criterion"]
    sigma = b.schedule.sigmas(8)[:8]
    assert plan["snr"]["timesteps"] == timestep_key(b.schedule.timesteps(8)).tolist()
    np.testing.assert_allclose([v if v is not None else np.inf for v in plan["snr"]["diffusion"]],
                               (1 - sigma) ** 2 / sigma**2, rtol=1e-5, atol=1e-6)  # fmt: skip
    low_snr = np.array([np.inf if v is None else v for v in plan["snr"]["W8A4"]])
    keys = np.array(plan["snr"]["timesteps"])
    fails = np.flatnonzero(low_snr < (1 - sigma) ** 2 / sigma**2)
    assert plan["switch_t"] == (0 if len(fails) == 0 else int(keys[fails[0] - 1]) if fails[0] else int(keys[0]) + 1)
    for switch in (plan["switch_t"], int(keys[3])):
        run = sample_to_file(bundle, tmp_path / f"{switch}.npz", n=2, class_label="3", switch_t=switch,
                             backend="ort", progress=False)  # fmt: skip
        want = ["W8A4" if k >= switch else "W8A8" for k in timestep_key(run.timesteps)]
        assert run.step_precisions == want and "cnc" in run.ptqd
