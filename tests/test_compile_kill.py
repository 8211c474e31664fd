"""Real processes (issue 17): two compiles to one output, and a compile SIGKILLed while exporting and while
gathering PTQD statistics. The output appears whole or not at all, and the next run cleans up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.bundle import MANIFEST, load_bundle

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--steps", "6", "--calib-samples", "4", "--calib-timesteps", "3", "--ptqd", "--ptqd-samples", "8", "-q"]


def _compile(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tools.cli", "compile", str(model), "-o", str(out), *ARGS, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _staged(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.stage-*"))


@pytest.mark.slow
def test_two_compiles_to_one_output_publish_one_bundle_and_refuse_the_other(tiny_dir, tmp_path):
    out = tmp_path / "B"
    procs = [_compile(tiny_dir, out) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "already exists" in loser or "appeared while" in loser, loser
    assert load_bundle(out).ptqd() is not None  # the winner's bundle, whole
    assert _staged(out) == [] and not list(tmp_path.glob(".B.old*"))


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["export", "ptqd"])
def test_a_compile_killed_while_writing_leaves_no_bundle_and_the_rerun_cleans_up(tiny_dir, tmp_path, phase):
    out = tmp_path / "B"
    proc = _compile(tiny_dir, out)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        staged = _staged(out)
        # export: the staging directory exists; ptqd: the staged manifest is written, statistics are being gathered
        if staged and (phase == "export" or (staged[0] / MANIFEST).is_file()):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the compile finished before it could be killed"
    assert not out.exists()  # nothing that looks like a bundle
    rerun = _compile(tiny_dir, out)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    assert load_bundle(out).ptqd() is not None and _staged(out) == []
