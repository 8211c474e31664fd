"""Seeded fuzzing of the bundle format (issue 17): every manifest field mutated in type and value, files
truncated or poisoned, hashes recomputed as an attacker would. Each case must end in success or in exit 2
with a message naming the manifest or file, never a traceback, and a failed `dqc sample` writes nothing.

DQC_FUZZ_CASES=N runs N cases per test (default 150 for `info`, 40 for `sample`)."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from runtime.bundle import MANIFEST, sha256_file
from tools.cli import main

CASES = int(os.environ.get("DQC_FUZZ_CASES", "0"))
VALUES = [None, True, 0, -1, 7, 2**63, 1.5, -0.0, math.nan, math.inf, 1e300, "", "x", "../x", [], [1, "a"], {},
          {"a": 1}]  # fmt: skip


def _paths(node, prefix=()):
    """Every (path) of a JSON document, containers and leaves alike."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):  # the first entries of long lists (betas, tables) are enough
            yield from _paths(v, (*prefix, i))


def _mutate(manifest: dict, rng: np.random.Generator) -> str:
    paths = [p for p in _paths(manifest) if p and p[0] != "files"] + [("files",)]
    path = paths[rng.integers(len(paths))]
    parent = manifest
    for k in path[:-1]:
        parent = parent[k]
    how = rng.integers(3)
    if how == 0 and isinstance(parent, dict):
        del parent[path[-1]]
        return f"del {path}"
    value = VALUES[rng.integers(len(VALUES))]
    parent[path[-1]] = value
    return f"{path} = {value!r}"


def _poison_file(root, rng: np.random.Generator) -> str:
    manifest = json.loads((root / MANIFEST).read_text())
    name = sorted(manifest["files"])[rng.integers(len(manifest["files"]))]
    data = bytearray((root / name).read_bytes())
    if rng.integers(2):
        data = data[: rng.integers(len(data))]
        what = "truncated"
    else:
        for i in rng.integers(0, len(data), size=8):
            data[i] = rng.integers(256)
        what = "bytes flipped"
    (root / name).write_bytes(bytes(data))
    manifest["files"][name] = sha256_file(root / name)
    (root / MANIFEST).write_text(json.dumps(manifest))
    return f"{name} {what}"


def _case(bundle, tmp_path, seed: int):
    rng = np.random.default_rng([17, seed])
    root = tmp_path / f"case{seed}"
    shutil.copytree(bundle, root)
    if rng.integers(4) == 0:
        what = _poison_file(root, rng)
    else:
        manifest = json.loads((root / MANIFEST).read_text())
        what = _mutate(manifest, rng)
        (root / MANIFEST).write_text(json.dumps(manifest, allow_nan=True))
    return root, what


def _check(rc: int, err: str, what: str) -> None:
    assert rc in (0, 2), (what, rc, err)
    assert "Traceback" not in err, (what, err)
    if rc == 2:
        assert "manifest.json" in err or ".onnx" in err or ".bin" in err or ".safetensors" in err, (what, err)


@pytest.mark.parametrize("seed", range(CASES or 150))
def test_info_on_a_tampered_bundle_succeeds_or_names_the_field(ptqd_bundle, tmp_path, capsys, seed):
    root, what = _case(ptqd_bundle, tmp_path, seed)
    rc = main(["info", str(root)])
    _check(rc, capsys.readouterr().err, what)


@pytest.mark.parametrize("seed", range(1000, 1000 + (CASES or 40)))
def test_sample_from_a_tampered_bundle_writes_finite_samples_or_nothing(ptqd_bundle, tmp_path, capsys, seed):
    root, what = _case(ptqd_bundle, tmp_path, seed)
    out = tmp_path / "s.npz"
    rc = main(["sample", str(root), "-n", "2", "--steps", "3", "-o", str(out), "-q"])
    _check(rc, capsys.readouterr().err, what)
    if rc == 0:
        assert np.isfinite(np.load(out)["samples"]).all(), what
    else:
        assert not out.exists()


@pytest.fixture(scope="module")
def ptqd_bundle(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "b"
    argv = ["compile", str(tiny_dir), "-o", str(out), "--steps", "6", "--calib-samples", "4", "--calib-timesteps", "3",
            "--ptqd", "--ptqd-samples", "4", "-q"]  # fmt: skip
    assert main(argv) == 0
    return out


BAD_VALUES = ["-1", "nan", "inf", "-inf", "abc", "", "1e400", "99999999999999999999999"]
NUMERIC_FLAGS = {
    "sample": ["-n", "--steps", "--eta", "--seed", "--guidance", "--batch-size", "--switch-t"],
    "compile": ["--steps", "--eta", "--guidance", "--calib-samples", "--calib-timesteps", "--batch-size", "--seed",
                "--group-epochs", "--adaround-iters", "--act-iters", "--ptqd-samples", "--group-alpha-lr"],
}  # fmt: skip


def _bad_flag_cases(n: int):
    rng = np.random.default_rng(29)
    cases = []
    while len(cases) < n:
        verb = ["sample", "compile"][rng.integers(2)]
        flag = NUMERIC_FLAGS[verb][rng.integers(len(NUMERIC_FLAGS[verb]))]
        value = BAD_VALUES[rng.integers(len(BAD_VALUES))]
        cases.append((verb, flag, value))
    return cases


@pytest.mark.parametrize("verb, flag, value", _bad_flag_cases(CASES or 40))
def test_bad_flag_values_exit_2_naming_the_flag_and_write_nothing(tiny_bundle, tiny_dir, tmp_path, capsys, verb, flag,
                                                                  value):  # fmt: skip
    out = tmp_path / ("s.npz" if verb == "sample" else "B")
    source = tiny_bundle if verb == "sample" else tiny_dir
    argv = [verb, str(source), "-o", str(out), f"{flag}={value}", "-q"]
    if verb == "compile":
        argv += (
            ["--calib-samples", "2", "--calib-timesteps", "2"]
            if flag not in ("--calib-samples", "--calib-timesteps")
            else []
        )
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: a value of the wrong type
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err)
    assert "Traceback" not in err and flag.lstrip("-").split("-")[0] in err.replace("_", "-"), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], argv
