"""The shipped flow-matching DiT `reference-dit`: its files and size, that it is the training configuration, that
its full-precision samples (Euler flow solver) are the requested digits, that training is seeded and resumes bit
for bit, and that the keyword reaches it from compile."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.errors import ConfigError
from tools.cli import main
from tools.reference.model import DIT_KEYWORD, REFERENCE_DIT_DIR, REFERENCE_DIT_GUIDANCE, reference_dir
from tools.reference.train import REFERENCE_DIT, REFERENCE_FLOW_SCHEDULER, DiffusionTrainConfig, train_diffusion


@pytest.fixture(scope="module")
def dit():
    from calibration.model_io import load_model

    return load_model(reference_dir(DIT_KEYWORD))


def test_shipped_files_and_size():
    files = [p for p in REFERENCE_DIT_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20e6
    for name in ("README.md", "training.json", "train_log.jsonl", "transformer/config.json",
                 "transformer/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):  # fmt: skip
        assert (REFERENCE_DIT_DIR / name).is_file(), name


def test_architecture_and_schedule_are_the_training_configuration(dit):
    cfg = dit.unet.config
    for k, v in REFERENCE_DIT.items():
        assert cfg[k] == v, k
    assert dit.family.name == "dit" and dit.spec.timestep_type == "float32" and dit.null_class == 10
    assert dit.schedule.kind == "flow"
    sched = json.loads((REFERENCE_DIT_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert {k: sched[k] for k in REFERENCE_FLOW_SCHEDULER} == REFERENCE_FLOW_SCHEDULER
    meta = json.loads((REFERENCE_DIT_DIR / "training.json").read_text())
    assert meta["parameters"] == sum(p.numel() for p in dit.unet.parameters())
    assert meta["transformer"] == REFERENCE_DIT
    card = (REFERENCE_DIT_DIR / "README.md").read_text()
    assert f"{meta['parameters']:,}" in card  # the card states the shipped parameter count


def test_samples_are_the_requested_digits(tmp_path):
    """A short run (40 samples, 25 Euler steps) of the full-precision model, judged by the classifier. The model
    card's figure is the N = 1000 one; this guards against a broken model or sampler."""
    out = tmp_path / "fp.npz"
    assert main(["sample", DIT_KEYWORD, "-n", "40", "--steps", "25", "--guidance", str(REFERENCE_DIT_GUIDANCE),
                 "-o", str(out), "-q"]) == 0  # fmt: skip
    from tools.reference.metrics import evaluate

    r = evaluate(out)
    assert json.loads(str(np.load(out)["meta"]))["sampler"] == "euler"
    assert r["accuracy"] >= 0.9, r


def test_compile_reference_dit_keyword(tmp_path):
    out = tmp_path / "b"
    assert main(["compile", DIT_KEYWORD, "-o", str(out), "--steps", "10", "--calib-samples", "8",
                 "--calib-timesteps", "4", "-q"]) == 0  # fmt: skip
    assert json.loads((out / "manifest.json").read_text())["calibration"]["sampler"] == "euler"


def test_dit_training_is_seeded_and_resumes_bit_identically(tmp_path):
    from calibration.model_io import load_model

    cfg = DiffusionTrainConfig(steps=4, batch_size=8, checkpoint_every=2, log_every=1)
    train_diffusion(tmp_path / "a", cfg, progress=False, kind="dit")
    train_diffusion(tmp_path / "b", cfg, progress=False, stop_after=3, kind="dit")  # an interrupted run …
    train_diffusion(tmp_path / "b", cfg, progress=False, kind="dit")  # … resumed from its checkpoint
    with pytest.raises(ConfigError, match="same configuration"):
        train_diffusion(tmp_path / "b", cfg, progress=False)  # the class model cannot resume a DiT run
    logs = [[json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()] for d in "ab"]
    assert [x["step"] for x in logs[1]] == [1, 2, 3, 4]
    assert [x["loss"] for x in logs[0]] == [x["loss"] for x in logs[1]]
    a, b = (load_model(tmp_path / d) for d in "ab")
    assert a.schedule.kind == "flow" and a.family.name == "dit"
    for (k, va), vb in zip(a.unet.state_dict().items(), b.unet.state_dict().values(), strict=True):
        assert np.array_equal(va.numpy(), vb.numpy()), k
    with pytest.raises(ConfigError, match="reference model kind"):
        train_diffusion(tmp_path / "c", cfg, progress=False, kind="vae")
