"""The metrics `dqc eval` reports: Fréchet distance against an independent sqrtm computation, PSNR/MSE,
the shipped classifier's accuracy, and eval's refusals of bad sample files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tools.cli import main
from tools.deploy.pipeline import save_npz
from tools.reference.digits import load_digits_split
from tools.reference.metrics import classify, evaluate, frechet_distance, load_classifier, psnr_mse, psnr_report


def _fd_scipy(a, b):
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)


def test_frechet_distance_matches_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16)) + 0.5
    assert frechet_distance(a, b) == pytest.approx(_fd_scipy(a, b), rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_frechet_distance_of_a_shift_is_the_squared_mean_difference():
    a = np.random.default_rng(1).standard_normal((300, 8))
    shift = np.arange(8) / 10
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), abs=1e-8)


def test_psnr_mse():
    a = np.zeros((3, 1, 2, 2))
    b = np.full_like(a, 0.2)  # mse 0.04 → 10·log10(4 / 0.04) = 20 dB
    assert psnr_mse(a, b) == pytest.approx((20.0, 0.04))
    assert psnr_mse(a, a)[0] == 100.0


def test_pooled_and_mean_psnr_differ_when_errors_spread():
    """One drifted sample among three: pooled 10·log10(4/mean MSE) is pulled down by it, the mean of
    per-sample PSNRs much less; the bootstrap intervals hold their estimates."""
    a = np.zeros((3, 1, 2, 2))
    b = a.copy()
    b[0], b[1], b[2] = 0.02, 0.02, 0.6  # per-sample MSE 4e-4, 4e-4, 0.36
    r = psnr_report(a, b, boot=200)
    assert r["psnr_mean"] == pytest.approx((40 + 40 + 10 * np.log10(4 / 0.36)) / 3)
    assert r["psnr_pooled"] == pytest.approx(10 * np.log10(4 / ((4e-4 + 4e-4 + 0.36) / 3)))
    assert r["psnr_pooled"] < r["psnr_mean"] - 10
    for key in ("psnr_pooled", "psnr_mean"):
        lo, hi = r[f"{key}_ci95"]
        assert lo <= r[key] <= hi


def test_shipped_classifier_meets_its_accuracy():
    _, test = load_digits_split()
    acc = (classify(load_classifier(), test.images) == test.labels).mean()
    assert acc >= 0.97


def test_eval_separates_real_digits_from_noise(tmp_path):
    _, test = load_digits_split()
    save_npz(tmp_path / "real.npz", samples=test.images, labels=test.labels)
    noise = np.clip(np.random.default_rng(0).standard_normal(test.images.shape), -1, 1).astype(np.float32)
    save_npz(tmp_path / "noise.npz", samples=noise, labels=test.labels)
    real, bad = evaluate(tmp_path / "real.npz"), evaluate(tmp_path / "noise.npz", reference=tmp_path / "real.npz")
    assert real["n"] == 360 and real["accuracy"] >= 0.97 and real["fd"] < 1e-6
    assert bad["accuracy"] < 0.3 and bad["fd"] > 10 * (real["fd"] + 1)
    assert bad["psnr_vs_reference"] < 10 and bad["mse_vs_reference"] > 0.3


def test_eval_cli_writes_json_and_labels_override(tmp_path):
    _, test = load_digits_split()
    x = test.images[:50]
    save_npz(tmp_path / "s.npz", samples=x, labels=test.labels[:50], meta=np.array(json.dumps({"seed": 7})))
    save_npz(tmp_path / "r.npz", samples=x, meta=np.array(json.dumps({"seed": 7})))
    assert main(["eval", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "r.npz"), "--json",
                 str(tmp_path / "o.json")]) == 0  # fmt: skip
    r = json.loads((tmp_path / "o.json").read_text())
    assert {"fd", "accuracy", "psnr_vs_reference", "psnr_pooled_vs_reference", "psnr_ci95", "mse_vs_reference",
            "n"} <= set(r)  # fmt: skip
    assert r["n"] == 50 and r["seed"] == 7 and r["psnr_vs_reference"] == 100.0
    wrong = evaluate(tmp_path / "s.npz", labels="3")  # every sample requested as a 3
    assert wrong["accuracy"] == pytest.approx((test.labels[:50] == 3).mean(), abs=0.05)


def test_fid_inception_without_weights_says_why(tmp_path):
    _, test = load_digits_split()
    save_npz(tmp_path / "s.npz", samples=test.images[:20])
    r = evaluate(tmp_path / "s.npz", fid_inception=True)
    assert "fd" in r and r["accuracy"] is None
    if r["fid_inception"] is None:
        assert "skipped" in r["fid_inception_note"]


def _bad(tmp_path, name, **arrays):
    save_npz(tmp_path / name, **arrays)
    return str(tmp_path / name)


GOOD = np.zeros((4, 1, 8, 8), np.float32)


@pytest.mark.parametrize(
    "arrays, extra, match",
    [
        (dict(images=GOOD), [], "no 'samples' array"),
        (dict(samples=np.where(np.arange(256).reshape(4, 1, 8, 8) == 5, np.nan, 0).astype(np.float32)), [], "NaN/Inf"),
        (dict(samples=np.full((4, 1, 8, 8), 255.0, np.float32)), [], r"span \[255, 255\]"),
        (dict(samples=np.zeros((4, 3, 32, 32), np.float32)), [], r"takes \(N, 1, 8, 8\)"),
        (dict(samples=np.zeros((4, 8, 8), np.float32)), [], "shape"),
        (dict(samples=GOOD, labels=np.arange(3)), [], "3 labels for 4 samples"),
        (dict(samples=GOOD, labels=np.full(4, 10)), [], "digits 0..9"),
        (dict(samples=GOOD), ["--reference", "REF3"], "3 reference samples for 4"),
        (dict(samples=GOOD, meta=np.array('{"seed": 1}')), ["--reference", "REF_SEED2"], "seed 2"),
    ],
)
def test_eval_refuses_bad_files(arrays, extra, match, tmp_path, capsys):
    path = _bad(tmp_path, "bad.npz", **arrays)
    refs = {
        "REF3": _bad(tmp_path, "ref3.npz", samples=GOOD[:3]),
        "REF_SEED2": _bad(tmp_path, "ref_s2.npz", samples=GOOD, meta=np.array('{"seed": 2}')),
    }
    extra = [refs.get(a, a) for a in extra]
    out = tmp_path / "o.json"
    assert main(["eval", path, *extra, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "npz" in err and re.search(match, err), err
    assert not out.exists()


def test_eval_missing_and_unreadable_files(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_text("not a zip")
    assert main(["eval", str(tmp_path / "junk.npz")]) == 2
    assert "not a readable .npz" in capsys.readouterr().err
