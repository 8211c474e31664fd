"""dqc regress and dqc diff: planted regressions are caught and named, an unchanged rerun passes, update
round-trips, JUnit parses, diff ranks the planted layer first; bad specs are refused before any work."""

from __future__ import annotations

import hashlib
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from runtime.errors import ConfigError
from tools.cli import main
from tools.regress.diff import diff_bundles
from tools.regress.run import run_spec, update_spec
from tools.regress.spec import METRICS, MetricSpec, load_spec, rewrite_baselines
from tools.regress.verdict import judge

SPECS = Path(__file__).resolve().parents[1] / "tools" / "regress" / "specs"

QUALITY = 'fd = { tolerance = "auto" }\naccuracy = { tolerance = "auto" }\npsnr = { tolerance = "auto" }\n'


def _spec(tmp: Path, body: str, name: str = "spec.toml") -> Path:
    path = tmp / name
    path.write_text('[settings]\ncache = "cache"\nlatency_rounds = 5\nlatency_reps = 20\nbootstrap = 50\n\n' + body)
    return path


def _small_case(name: str = "small", metrics: str = QUALITY, extra: str = "", model: str = "reference") -> str:
    """A small case: the shipped reference model (the tiny random-weight model's samples are noise, 13 dB from
    its own FP samples, so no quality change shows on it), W8A8 naive, N = 16, 8 steps."""
    return (f"[cases.{name}]\nmodel = \"{model}\"\n{extra}[cases.{name}.compile]\nmethod = \"naive\"\nbits = \"W8A8\"\n"
            f"calib_samples = 4\ncalib_timesteps = 4\n[cases.{name}.sample]\nn = 16\nsteps = 8\n"
            f"[cases.{name}.metrics]\n{metrics}")  # fmt: skip


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A small case with latency and quality metrics whose baselines `update` measured."""
    tmp = tmp_path_factory.mktemp("regress")
    path = _spec(tmp, _small_case(metrics='latency_ratio = { tolerance = "auto" }  # kept\n' + QUALITY))
    diff, _ = update_spec(path, progress=False)
    assert "+latency_ratio = { baseline = " in diff
    return path


# --- verdicts -------------------------------------------------------------------------------------------------


def _ms(metric: str, baseline: float, tolerance, noise: float | None = None) -> MetricSpec:
    return MetricSpec(METRICS[metric], baseline, noise, tolerance, {})


@pytest.mark.parametrize(
    "metric, baseline, value, noise, tolerance, verdict",
    [
        ("psnr", 30.0, 29.9, 0.2, "auto", "pass"),  # inside 1.96·√2·0.2 = 0.55
        ("psnr", 30.0, 29.0, 0.2, "auto", "regressed"),
        ("psnr", 30.0, 31.0, 0.2, "auto", "improved"),
        ("fd", 1.0, 1.5, 0.1, "auto", "regressed"),  # lower is better
        ("fd", 1.0, 0.5, 0.1, "auto", "improved"),
        ("latency_ratio", 0.5, 0.52, 0.001, 0.05, "pass"),  # outside the noise, inside the given tolerance
        ("latency_ratio", 0.5, 0.6, 0.001, 0.05, "regressed"),
        ("psnr", 30.0, 29.0, 1.0, 0.5, "inconclusive"),  # beyond the tolerance, inside the noise band (±2.8)
    ],
)
def test_judge(metric, baseline, value, noise, tolerance, verdict):
    v = judge(_ms(metric, baseline, tolerance), {"value": value, "noise": noise})
    assert v["verdict"] == verdict
    assert (v["note"] != "") == (verdict == "inconclusive")


def test_judge_uses_the_baselines_own_noise():
    quiet_baseline = judge(_ms("psnr", 30.0, "auto", noise=0.0), {"value": 29.5, "noise": 0.2})
    noisy_baseline = judge(_ms("psnr", 30.0, "auto", noise=1.0), {"value": 29.5, "noise": 0.2})
    assert quiet_baseline["verdict"] == "regressed" and noisy_baseline["verdict"] == "pass"
    assert noisy_baseline["band"] == pytest.approx(1.96 * np.hypot(0.2, 1.0))


# --- spec files -----------------------------------------------------------------------------------------------


def test_rewrite_baselines_keeps_comments_and_reads_back(tmp_path):
    text = _small_case(metrics="psnr = { tolerance = 1.5 }  # dB, the model card's rule\n")
    new = rewrite_baselines(text, {"small": {"psnr": {"baseline": 31.25, "noise": 0.3, "n": 16, "seed": 0, "steps": 8,
                                                     "eta": 0.0, "guidance": 1.5, "tolerance": 1.5}}})  # fmt: skip
    assert "# dB, the model card's rule" in new
    path = tmp_path / "s.toml"
    path.write_text(new)
    spec = load_spec(path)
    ms = spec.cases["small"].metrics["psnr"]
    assert (ms.baseline, ms.noise, ms.tolerance) == (31.25, 0.3, 1.5)
    with pytest.raises(ConfigError, match=r"cases.small.metrics.fd"):
        rewrite_baselines(text, {"small": {"fd": {"baseline": 1.0}}})


BASE = "baseline = 1.0, noise = 0.1, n = 16, seed = 0, steps = 8, eta = 0.0, guidance = 1.5"


@pytest.mark.parametrize(
    "body, named",
    [
        ("[bogus]\nx = 1\n" + _small_case(metrics=f"fd = {{ {BASE} }}\n"), "unknown key bogus"),
        (_small_case(metrics=f"fd = {{ {BASE} }}\n", extra="colour = 1\n"), "unknown key cases.small.colour"),
        (_small_case(metrics=f"fd = {{ {BASE} }}\n").replace("bits =", "bitz ="), "cases.small.compile.bitz"),
        (_small_case(metrics=f"fid = {{ {BASE} }}\n"), "unknown key cases.small.metrics.fid"),
        (_small_case(metrics=f"fd = {{ {BASE}, tolerence = 1 }}\n"), "cases.small.metrics.fd.tolerence"),
        (_small_case(metrics='fd = { tolerance = "auto" }\n'), "cases.small.metrics.fd.baseline is missing"),
        (_small_case(metrics=f"fd = {{ {BASE.replace('n = 16', 'n = 64')} }}\n"), "cases.small.metrics.fd.n = 64"),
        (_small_case(metrics=f"fd = {{ {BASE.replace('seed = 0', 'seed = 3')} }}\n"), "cases.small.metrics.fd.seed"),
        (_small_case(metrics=f"fd = {{ {BASE.replace('n = 16, ', '')} }}\n"), "cases.small.metrics.fd.n is missing"),
        (_small_case(metrics=f"fd = {{ {BASE}, tolerance = -1 }}\n"), "cases.small.metrics.fd.tolerance"),
        ("[settings]\n", "no cases"),
    ],
)
def test_bad_specs_are_refused_naming_the_key(tmp_path, capsys, body, named):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    out = tmp_path / "out.json"
    assert main(["regress", "run", str(path), "--json", str(out), "--junit", str(tmp_path / "out.xml")]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.xml").exists() and not (tmp_path / "cache").exists()


# --- measured runs --------------------------------------------------------------------------------------------


def test_an_unchanged_rerun_passes_and_junit_parses(measured, tmp_path, capsys):
    spec = load_spec(measured)
    assert "# kept" in measured.read_text() and spec.cases["small"].metrics["latency_ratio"].noise is not None
    junit, md = tmp_path / "r.xml", tmp_path / "r.md"
    rc = main(["regress", "run", str(measured), "-q", "--junit", str(junit), "--markdown", str(md)])
    text = capsys.readouterr().out
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "4"
    assert {tc.get("name") for tc in suite.iter("testcase")} == {"latency_ratio", "fd", "accuracy", "psnr"}
    # the seeded quality metrics rerun exactly and pass; the latency ratio is wall-clock on a shared machine
    # (measured 0.999 → 1.065 between two runs of one CI job, band ±0.024), so no test may require its verdict
    failed = {tc.get("name") for tc in suite.iter("testcase") if tc.find("failure") is not None}
    assert failed <= {"latency_ratio"}, text
    assert rc == (1 if failed else 0), text
    assert "| small | psnr |" in md.read_text()


class _Repeated:
    """An engine made slower on purpose: each call runs the real engine `times` times."""

    def __init__(self, engine, times: int):
        self.engine, self.times = engine, times

    def infer(self, *args):
        for _ in range(self.times - 1):
            self.engine.infer(*args)
        return self.engine.infer(*args)


class _SlowerSet:
    def __init__(self, engines, times: int):
        self.engines, self.times = engines, times
        self.group_of_t, self.spec = engines.group_of_t, engines.spec

    def group_of(self, t: int) -> int:
        return self.engines.group_of(t)

    def for_timestep(self, t: int):
        return _Repeated(self.engines.for_timestep(t), self.times)


def test_a_planted_latency_regression_is_caught_and_named(measured):
    results = run_spec(measured, only=["small"], progress=False, engines_of=lambda es: _SlowerSet(es, 8))
    verdicts = {v["metric"]: v for v in results["cases"]["small"]["verdicts"]}
    assert results["regressed"]
    assert verdicts["latency_ratio"]["verdict"] == "regressed", verdicts["latency_ratio"]
    assert verdicts["latency_ratio"]["value"] > 2 * verdicts["latency_ratio"]["baseline"]
    assert all(verdicts[k]["verdict"] == "pass" for k in ("fd", "accuracy", "psnr"))  # the samples did not change


def _reseal(bundle: Path, name: str) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _perturb_scale(bundle: Path, point: str, factor: float) -> None:
    path = bundle / "group_0.onnx"
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == f"{point}/scale")
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
    onnx.save(model, str(path))
    _reseal(bundle, "group_0.onnx")


PLANTED = "mid_block.resnets.0.conv1/input"


def test_a_planted_quality_regression_is_caught_and_diff_ranks_the_layer(measured, tmp_path, capsys):
    good = next((measured.parent / "cache" / "bundles").iterdir())
    shutil.copytree(good, tmp_path / "bundle")
    spec = _spec(tmp_path, f"[cases.ready]\nbundle = \"bundle\"\n[cases.ready.sample]\nn = 16\nsteps = 8\n"
                 f"[cases.ready.metrics]\n{QUALITY}")  # fmt: skip
    update_spec(spec, progress=False)
    assert main(["regress", "run", str(spec), "-q"]) == 0
    capsys.readouterr()

    _perturb_scale(tmp_path / "bundle", PLANTED, 0.05)  # 20x finer grid: most of that input clips
    junit = tmp_path / "r.xml"
    assert main(["regress", "run", str(spec), "-q", "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert "regressed" in out
    failed = {tc.get("name") for tc in ET.parse(junit).getroot().iter("testcase") if tc.find("failure") is not None}
    assert "psnr" in failed, out

    report = diff_bundles(good, tmp_path / "bundle", n=4)
    assert report["scales"][0]["point"] == PLANTED and len(report["scales"]) == 1
    assert report["layers"][0]["layer"] == PLANTED.removesuffix("/input")
    assert [m["field"] for m in report["manifest"]] == []
    assert main(["diff", str(good), str(tmp_path / "bundle")]) == 0
    assert PLANTED.removesuffix("/input") in capsys.readouterr().out


def test_a_bundle_from_another_model_is_refused(measured, tmp_path, capsys):
    from calibration.config import CalibrationConfig
    from tests.models import tiny_pipeline
    from tools.deploy.pipeline import compile_model

    other = compile_model(tiny_pipeline(tmp_path / "m", seed=1), tmp_path / "other",
                          CalibrationConfig.for_method("naive", calib_samples=2, calib_timesteps=2, steps=4),
                          progress=False)  # fmt: skip
    spec = _spec(tmp_path, f"[cases.mixed]\nmodel = \"reference\"\nbundle = \"other\"\n[cases.mixed.sample]\nn = 16\n"
                 f"steps = 8\n[cases.mixed.metrics]\n{QUALITY}")  # fmt: skip
    with pytest.raises(ConfigError, match=r"cases.mixed.bundle = 'other': compiled from model weights"):
        update_spec(spec, progress=False)
    good = next((measured.parent / "cache" / "bundles").iterdir())
    assert main(["diff", str(good), str(other)]) == 2
    assert "model.weight_sha256" in capsys.readouterr().err


def test_the_ci_spec_runs(tmp_path, capsys):
    """The committed small spec (the reference model, N = 32, 10 steps) with its committed baselines: every
    metric is judged, the JUnit report agrees with the exit code, and the quality metrics hold. The latency and
    memory ratios are judged too, but a CI machine with another CPU may legitimately move them, so their
    verdict is not asserted."""
    junit = tmp_path / "r.xml"
    rc = main(["regress", "run", str(SPECS / "small.toml"), "-q", "--cache", str(tmp_path), "--junit", str(junit)])
    out = capsys.readouterr().out
    suite = ET.parse(junit).getroot()
    failures = {tc.get("name") for tc in suite.iter("testcase") if tc.find("failure") is not None}
    assert rc == (1 if failures else 0), out
    assert {tc.get("name") for tc in suite.iter("testcase")} == {"latency_ratio", "memory_ratio", "fd", "accuracy",
                                                                 "psnr"}  # fmt: skip
    assert not failures & {"fd", "accuracy", "psnr"}, out
