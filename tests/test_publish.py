"""Outputs appear whole or not at all, never over what they were not told to replace, and bad output
paths are refused before any work (issue 17, items 1–5 and 12)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from exporter.publish import check_output, clean_stale, publish, stage
from runtime.errors import BundleError, ConfigError, SamplerError


def _staged(out):
    tmp = stage(out)
    (tmp / "manifest.json").write_text("{}")
    (tmp / "weights.bin").write_bytes(b"new")
    return tmp


def _leftovers(out):
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def test_publish_to_a_new_path(tmp_path):
    out = tmp_path / "B"
    publish(_staged(out), out, overwrite=False)
    assert (out / "weights.bin").read_bytes() == b"new" and not (out / ".owner").exists()
    assert _leftovers(out) == []


@pytest.mark.parametrize("what", ["empty dir", "other dir", "file", "bundle"])
def test_publish_never_replaces_what_appeared_meanwhile(tmp_path, what):
    out = tmp_path / "B"
    tmp = _staged(out)
    if what == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        if what == "other dir":
            (out / "notes.txt").write_text("mine")
        if what == "bundle":
            (out / "manifest.json").write_text('{"old": 1}')
    with pytest.raises(BundleError, match="appeared while"):
        publish(tmp, out, overwrite=False)
    assert out.exists() and not tmp.exists() and _leftovers(out) == []
    if what == "other dir":
        assert (out / "notes.txt").read_text() == "mine"
    if what == "bundle":
        assert (out / "manifest.json").read_text() == '{"old": 1}'


def test_force_replaces_a_bundle_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "B"
    out.mkdir()
    (out / "manifest.json").write_text('{"old": 1}')
    (tmp_path / ".B.old").mkdir()  # what an older dqc left behind: no longer in the way
    (tmp_path / ".B.old" / "x").write_text("stale")
    publish(_staged(out), out, overwrite=True)
    assert (out / "weights.bin").read_bytes() == b"new"
    assert _leftovers(out) == [".B.old"]


def test_check_output_refuses_before_any_work(tmp_path):
    out = tmp_path / "B"
    check_output(out, overwrite=False)  # free: fine
    out.mkdir()
    with pytest.raises(BundleError, match="choose a new output path"):
        check_output(out, overwrite=True)  # not a bundle: never replaced, even with --force
    (out / "manifest.json").write_text("{}")
    with pytest.raises(BundleError, match="--force"):
        check_output(out, overwrite=False)
    check_output(out, overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        check_output(tmp_path / "f" / "B", overwrite=False)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_what_a_killed_run_left_is_cleaned_and_a_set_aside_bundle_restored(tmp_path):
    out = tmp_path / "B"
    dead, alive = _dead_pid(), os.getpid()
    for name, pid in ((".B.stage-dead1", dead), (".B.stage-live1", alive)):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".owner").write_text(str(pid))
    aside = tmp_path / ".B.old-dead2"
    (aside / "bundle").mkdir(parents=True)
    (aside / ".owner").write_text(str(dead))
    (aside / "bundle" / "manifest.json").write_text('{"kept": 1}')
    removed = clean_stale(out)
    assert {p.name for p in removed} == {".B.stage-dead1", ".B.old-dead2"}
    assert (tmp_path / ".B.stage-live1").exists()  # a concurrent run's staging directory is left alone
    assert (out / "manifest.json").read_text() == '{"kept": 1}'  # the killed --force run's old bundle is back


def test_bundle_directories_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "B"
        publish(_staged(out), out, overwrite=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755


def test_compile_refuses_an_existing_output_before_calibrating(tiny_dir, tmp_path, monkeypatch):
    import calibration.calibrate
    from calibration.config import CalibrationConfig
    from tools.deploy.pipeline import compile_model

    def never(*a, **k):
        raise AssertionError("calibration ran")

    monkeypatch.setattr(calibration.calibrate, "calibrate", never)
    (tmp_path / "B").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        compile_model(tiny_dir, tmp_path / "B", CalibrationConfig(steps=10, calib_timesteps=5), progress=False)


def test_compile_interrupted_while_gathering_ptqd_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    from calibration.config import CalibrationConfig
    from tools.deploy import pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "gather_ptqd", interrupted)
    cfg = CalibrationConfig(steps=10, calib_samples=4, calib_timesteps=5, batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        pipeline.compile_model(tiny_dir, tmp_path / "B", cfg, ptqd_samples=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sample_and_eval_refuse_directory_outputs_before_work(tiny_dir, tmp_path, monkeypatch):
    import tools.deploy.pipeline as pipeline
    from tools.cli import main

    (tmp_path / "d").mkdir()
    monkeypatch.setattr(pipeline, "sample", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    with pytest.raises(ConfigError, match="-o .*is a directory"):
        pipeline.sample_to_file(tiny_dir, tmp_path / "d", n=1, steps=2, progress=False)
    with pytest.raises(ConfigError, match="--png .*is a directory"):
        pipeline.sample_to_file(tiny_dir, tmp_path / "s.npz", n=1, steps=2, png=tmp_path / "d", progress=False)
    assert main(["eval", str(tmp_path / "missing.npz"), "--json", str(tmp_path / "d")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize(
    "kw", [dict(eta=float("inf")), dict(guidance=float("inf")), dict(eta=float("nan")), dict(eta=1e23)]
)
def test_non_finite_or_overflowing_sampler_settings_are_refused(kw):
    from runtime.sampler import SamplerConfig

    with pytest.raises(SamplerError, match=f"--{next(iter(kw))}"):
        SamplerConfig(**kw)


def test_a_non_finite_prediction_stops_sampling_and_names_the_step(tmp_path):
    from runtime.engine import EngineSet
    from runtime.sampler import SamplerConfig, sample
    from tests.test_sampler import SPEC, _scheduler

    class _Poisoned:
        spec = SPEC

        def infer(self, sample, timestep, class_labels=None):
            return np.full_like(sample, np.nan) if int(timestep[0]) < 500 else np.zeros_like(sample)

    _, schedule = _scheduler(tmp_path, "DDIMScheduler")
    with pytest.raises(SamplerError, match=r"sampling step \d+ \(t = \d+\).*prediction is NaN"):
        sample(EngineSet.single(_Poisoned()), schedule, SamplerConfig(steps=10), n=2, progress=False)
