"""Flow matching: FlowMatchEulerDiscreteScheduler configs load as a FlowSchedule whose σ and t match diffusers', the
host sampler's Euler flow solver follows diffusers' scheduler step for step on a full-precision DiT, the engine
contract takes float timesteps t = σ·T for these models, and what cannot work is refused with the reason."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from calibration.model_io import load_model
from runtime.engine import EngineSet, InputSpec, TorchEngine, check_inputs
from runtime.errors import ConfigError, EngineInputError, ModelLoadError, SamplerError
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


def test_dqc_samples_a_flow_model_and_refuses_to_compile_it(flow_dir, tmp_path, capsys):
    out = tmp_path / "fp.npz"
    assert main(["sample", str(flow_dir), "-n", "2", "--steps", "6", "--class-label", "3", "-o", str(out), "-q"]) == 0
    meta = json.loads(str(np.load(out)["meta"]))
    assert meta["sampler"] == "euler" and np.isfinite(np.load(out)["samples"]).all()
    assert main(["sample", str(flow_dir), "-n", "1", "--sampler", "ddim", "-o", str(out), "-q"]) == 2
    assert "--sampler euler" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="compiling flow models is not built"):
        from calibration.config import CalibrationConfig
        from tools.deploy.pipeline import compile_model

        compile_model(flow_dir, tmp_path / "b", CalibrationConfig(steps=4, calib_samples=2, calib_timesteps=2),
                      progress=False)  # fmt: skip
