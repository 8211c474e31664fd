"""The shipped reference model: what the issue requires of it (architecture, size, schedule), that it
came from `dqc train-reference`'s configuration, that its samples are the requested digits, and that
the `reference` keyword reaches it from every command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.errors import ConfigError
from tools.cli import main
from tools.reference.model import REFERENCE_DIR, REFERENCE_GUIDANCE, reference_dir
from tools.reference.train import REFERENCE_SCHEDULER, REFERENCE_UNET, DiffusionTrainConfig, train_diffusion


@pytest.fixture(scope="module")
def reference():
    from calibration.model_io import load_model

    return load_model(reference_dir())


def test_shipped_files_and_size():
    files = [p for p in REFERENCE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20e6
    for name in (
        "README.md",
        "training.json",
        "classifier.safetensors",
        "unet/config.json",
        "scheduler/scheduler_config.json",
    ):
        assert (REFERENCE_DIR / name).is_file(), name
    assert (REFERENCE_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_architecture_and_schedule_are_the_training_configuration(reference):
    cfg = reference.unet.config
    for k, v in REFERENCE_UNET.items():
        assert cfg[k] == (list(v) if isinstance(v, tuple) else v), k
    assert len(cfg.block_out_channels) >= 2 and cfg.down_block_types[-1].startswith("Attn")
    assert reference.null_class == 10
    assert 1e6 <= sum(p.numel() for p in reference.unet.parameters()) <= 8e6
    sched = json.loads((REFERENCE_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert {k: sched[k] for k in REFERENCE_SCHEDULER} == REFERENCE_SCHEDULER
    assert reference.schedule.num_train_timesteps == 1000


def test_samples_are_the_requested_digits(tmp_path):
    """A short run (40 samples, 25 DDIM steps) of the full-precision model, judged by the classifier.
    The model card's figure is the 100-step N = 1000 one; this guards against a broken model or sampler."""
    out = tmp_path / "fp.npz"
    assert main(["sample", "reference", "-n", "40", "--steps", "25", "--guidance", str(REFERENCE_GUIDANCE),
                 "-o", str(out), "-q"]) == 0  # fmt: skip
    f = np.load(out)
    assert list(f["labels"]) == [i % 10 for i in range(40)]
    from tools.reference.metrics import evaluate

    r = evaluate(out)
    assert r["accuracy"] >= 0.9, r


def test_compile_reference_keyword(tmp_path):
    out = tmp_path / "b"
    assert main(["compile", "reference", "-o", str(out), "--steps", "10", "--calib-samples", "8",
                 "--calib-timesteps", "4", "-q"]) == 0  # fmt: skip
    assert main(["info", str(out)]) == 0


def test_training_is_seeded_logs_and_resumes(tmp_path):
    from calibration.model_io import load_model

    cfg = DiffusionTrainConfig(steps=4, batch_size=8, checkpoint_every=2, log_every=1)
    train_diffusion(tmp_path / "a", cfg, progress=False)
    train_diffusion(tmp_path / "b", cfg, progress=False, stop_after=3)  # an interrupted run …
    train_diffusion(tmp_path / "b", cfg, progress=False)  # … resumed from its checkpoint
    with pytest.raises(ConfigError, match="same configuration"):
        train_diffusion(tmp_path / "b", DiffusionTrainConfig(steps=4, batch_size=8, lr=1e-3), progress=False)
    logs = [[json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()] for d in "ab"]
    assert [x["step"] for x in logs[1]] == [1, 2, 3, 4]
    assert [x["loss"] for x in logs[0]] == [x["loss"] for x in logs[1]]
    a, b = (load_model(tmp_path / d) for d in "ab")
    for (k, va), vb in zip(a.unet.state_dict().items(), b.unet.state_dict().values(), strict=True):
        assert np.array_equal(va.numpy(), vb.numpy()), k
    meta = json.loads((tmp_path / "a" / "training.json").read_text())
    assert meta["config"]["steps"] == 4 and meta["parameters"] > 1e6


def test_demo_on_the_reference_model(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "-o", str(out), "-n", "20", "--steps", "10", "--calib-samples", "8", "--groups", "4",
            "--group-epochs", "1", "--ptqd-samples", "16", "-q"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["groups"] == 4 and report["ptqd"] == ["cnc", "bc", "vsc"]
    assert any("eta = 0" in note for note in report["ptqd_notes"])
    assert report["n"] == 20 and report["sampler"]["guidance"] == REFERENCE_GUIDANCE
    for k in ("fp32", "w8a8"):
        assert 0 <= report[k]["accuracy"] <= 1 and report[k]["fd"] > 0
    assert report["w8a8"]["psnr_vs_reference"] > 10
    assert (out / "comparison.png").is_file() and (out / "bundle" / "manifest.json").is_file()
    fp, q = (np.load(out / f"samples_{k}.npz") for k in ("fp32", "w8a8"))
    assert np.array_equal(fp["labels"], q["labels"])
    table = capsys.readouterr().out
    assert "FP32 ORT" in table and "W8A8 ORT" in table and "PSNR" in table
