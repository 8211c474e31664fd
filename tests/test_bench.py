"""`dqc bench` commands end to end on the tiny model: the speed smoke run (no thresholds: these machines are
noisy; figures live in docs/RESULTS.md), the PTQD ablation table, lint and build from the command line."""

import json

import numpy as np
import onnx
import pytest

from tools.bench.ptqd_ablation import ABLATION_ROWS
from tools.cli import main


def test_speed_bench_quick_measures_every_engine(tmp_path, capsys):
    assert main(["bench", "--quick", "-q", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    m = report["models"]["tiny"]
    engines = {"fp32", "fp32-folded", "ort-static", "dqc-G1", "dqc-G8", "dqc-G8-split", "ov-fp32", "ov-nncf",
               "dqc-G1-ov", "dqc-G8-ov", "dqc-G8-ov-split"}  # fmt: skip
    assert set(m["latency"]["1"]) == engines and not m["skipped"]
    assert all(v["median_ms"] > 0 for v in m["latency"]["1"].values())
    assert {m["engines"][k]["backend"] for k in ("dqc-G1-ov", "dqc-G8-ov")} == {"openvino"}
    assert m["engines"]["ov-nncf"] == {"backend": "openvino-default", "source": "ov-nncf"}
    ours, bases = ("dqc-G1", "dqc-G8", "dqc-G1-ov", "dqc-G8-ov"), ("fp32", "ort-static", "ov-fp32", "ov-nncf")
    best = min(ours, key=lambda k: m["latency"]["1"][k]["median_ms"])
    pairs = {f"{o} vs {b}" for o in ours for b in bases}
    assert set(m["ratios"]["1"]) == pairs | {f"best ({best}) vs {b}" for b in bases}
    assert {"cpu_flags", "versions", "thread_env"} <= set(report["machine"])
    assert {"openvino", "nncf", "onnxruntime"} <= set(report["machine"]["versions"])
    assert all(m["threads"][k] >= 1 for k in ("dqc-G1-ov", "ov-nncf"))
    assert m["memory_mb"]["1"]["dqc-G8"] > 0 and m["loop"]["dqc-G8"]["seconds"] > 0
    assert m["memory_mb"]["1"]["dqc-G8-split"] > 0  # the per-group sessions beside the one engine
    assert m["memory_mb"]["1"]["dqc-G8-ov-split"] > 0  # and OpenVINO's per-group compiled models
    assert "OpenVINO resident memory at batch 1" in (tmp_path / "bench.md").read_text()
    # every quantized engine runs integer kernels: no float Conv left in ORT's optimized graph
    assert all(m["ops"][k]["float_conv"] == 0 and m["ops"][k]["integer"] > 0 for k in ("ort-static", "dqc-G1"))
    assert "speed-up vs ov-nncf" in (tmp_path / "bench.md").read_text()
    assert "| 1 | dqc-G8 | ort |" in capsys.readouterr().out


def test_speed_bench_without_openvino_measures_the_rest_and_says_why(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)
    assert main(["bench", "--quick", "-q", "--no-memory", "--w4", "--quantize-attention", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "bench.json").read_text())["models"]["tiny"]
    w4 = {"dqc-W4", "dqc-W4-nbits", "dqc-W4-nbits-int8"}  # --w4: the 4-bit weight layouts, on ONNX Runtime only
    ours = {"dqc-G1", "dqc-G8", "dqc-G8-split", "dqc-G1-attnq"}  # --quantize-attention: dqc-G1-attnq
    assert set(m["latency"]["1"]) == {"fp32", "fp32-folded", "ort-static"} | ours | w4
    assert "pip install openvino" in m["skipped"]["openvino"]
    assert m["disk_mb"]["dqc-W4-nbits"] < m["disk_mb"]["dqc-W4"]  # the tiny UNet's attention Linears, packed
    md = (tmp_path / "bench.md").read_text()
    assert "not measured: openvino" in md and "speed-up against int8 containers (dqc-W4): dqc-W4-nbits" in md
    assert "quantized attention products at batch 1, speed-up: dqc-G1-attnq" in md
    ops = m["ops"]  # the attention products on integer kernels, none left as float MatMuls
    assert ops["dqc-G1-attnq"]["integer"] == ops["dqc-G1"]["integer"] + ops["dqc-G1"]["float_matmul_gemm"]
    assert ops["dqc-G1-attnq"]["float_matmul_gemm"] == 0


def test_speed_bench_builds_only_the_group_counts_asked(tmp_path, monkeypatch, capsys):
    """`--groups 1`: G = 8 does not fit beside the rest on a DiT-XL/2-sized model; the run times G = 1 alone
    (and loops it) and says nothing of G = 8. Counts other than 1 and 8 are refused before any work."""
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)
    assert main(["bench", "--quick", "-q", "--no-memory", "--groups", "1", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "bench.json").read_text())["models"]["tiny"]
    assert set(m["latency"]["1"]) == {"fp32", "fp32-folded", "ort-static", "dqc-G1"}
    assert set(m["loop"]) == {"fp32", "dqc-G1"} and "whole loop FP32 / dqc-G1" in (tmp_path / "bench.md").read_text()
    capsys.readouterr()
    assert main(["bench", "--quick", "-q", "--groups", "1,4", "--out", str(tmp_path / "refused")]) == 2
    assert "--groups 1,4: the speed bench compiles G = 1 and/or 8" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_speed_bench_times_a_text_unet_with_embeddings_and_guidance(tmp_path):
    """`--models tiny-text` (sd15 is the same path at Stable Diffusion 1.5's shape): calibrated on the bench's
    prompts, every engine timed on N(0, 1) text embeddings, the guided loop at batch 2 per sample."""
    assert main(["bench", "--models", "tiny-text", "--batches", "1", "--reps", "2", "--no-memory", "-q", "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    m = json.loads((tmp_path / "bench.json").read_text())["models"]["tiny-text"]
    assert {"fp32", "ort-static", "dqc-G1", "dqc-G8"} <= set(m["latency"]["1"])
    assert m["calibration"]["guidance"] == 7.5 and m["sample_shape"] == [4, 8, 8]
    assert m["loop"]["fp32"]["seconds"] > 0 and "quality" not in m


def test_bench_refuses_bad_flags(capsys):
    assert main(["bench", "--batches", "1,x", "-q"]) == 2
    assert "--batches" in capsys.readouterr().err
    assert main(["bench", "--models", "imagenet", "--batches", "1", "-q", "--no-memory"]) == 2
    assert "--models 'imagenet'" in capsys.readouterr().err
    assert main(["bench", "--models", "tiny", "--loop-steps", "0", "-q"]) == 2
    assert "--loop-steps 0: must be at least 1" in capsys.readouterr().err


def test_ptqd_ablation_table_on_the_tiny_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "abl"
    argv = ["bench", str(tiny_dir), "--ptqd-ablation", "--bits", "W4A8", "--samplers", "ddim-eta1,ddim-eta0",
            "--method", "lp", "--mixed-bits", "W4A4", "-n", "6", "--steps", "5", "--calib-samples", "4",
            "--calib-timesteps", "3", "--ptqd-samples", "4", "--sample-batch", "6", "--out", str(out),
            "-q"]  # fmt: skip
    assert main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    rows = [(r["sampler"], r["bits"], r["row"]) for r in table["rows"]]
    for sampler in ("ddim-eta1", "ddim-eta0"):
        assert [r for s, b, r in rows if s == sampler and b == "W4A8"] == [name for name, _ in ABLATION_ROWS]
    assert [r for s, b, r in rows if b == "W4A4+W4A8"] == ["mixed W4A4/W4A8 (PTQD switch)", "all W4A8", "all W4A4"]
    md = (out / "table.md").read_text()
    assert "VSC does nothing with DDIM eta = 0" in md and "mixed precision: W4A4 at t >=" in md
    baseline = next(r for r in table["rows"] if r["row"] == "baseline")
    assert baseline["ptqd_share"] == 0 and baseline["psnr_db"] is not None
    before = {p: p.stat().st_mtime for p in out.rglob("*.npz")}
    assert main(argv) == 0  # resumes: nothing recompiled or resampled
    assert {p: p.stat().st_mtime for p in out.rglob("*.npz")} == before
    assert main([*argv[:5], "--samplers", "ddim-eta", *argv[7:]]) == 2
    assert "--samplers" in capsys.readouterr().err
    # the eta-0 cell again, on the eta-1 calibration: only its PTQD statistics are gathered anew
    first = json.loads((out / "W4A8_ddim-eta1" / "bundle" / "manifest.json").read_text())
    assert main([*argv, "--reuse-calibration", "--regather-samples", "3"]) == 0
    assert "regathered on W4A8_ddim-eta1's calibration" in capsys.readouterr().out
    cell = json.loads((out / "W4A8_ddim-eta0" / "bundle" / "manifest.json").read_text())
    assert cell["calibration"] == first["calibration"] and cell["calibration"]["eta"] == 1.0
    assert {b: (m["sampler"], m["eta"], m["samples"]) for b, m in cell["ptqd"].items()} == {
        b: ("ddim", 0.0, 3) for b in ("W4A8", "W4A4")}  # fmt: skip
    assert json.loads((out / "W4A8_ddim-eta1" / "bundle" / "manifest.json").read_text()) == first
    rows = [(r["sampler"], r["row"]) for r in json.loads((out / "table.json").read_text())["rows"]]
    assert [r for s, r in rows if s == "ddim-eta0"][1:] == [name for name, _ in ABLATION_ROWS]


def test_lint_and_build_from_the_command_line(tiny_bundle, capsys):
    assert main(["lint", str(tiny_bundle)]) == 0
    assert "no violations" in capsys.readouterr().out
    assert main(["lint", str(tiny_bundle), "--target", "trt"]) == 1  # an ONNX Runtime bundle breaks TensorRT's rules
    out = capsys.readouterr().out
    assert "[qdq-type]" in out and "violations" in out
    assert main(["build", str(tiny_bundle), "-q"]) == 2
    assert "targets ONNX Runtime" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["ddpm", "ddim-eta1", "ddim-eta0.5"])
def test_sampler_names(text):
    from tools.bench.ptqd_ablation import SamplerSpec

    spec = SamplerSpec.parse(text)
    assert spec.label == text and SamplerSpec.parse(spec.label) == spec


def test_memory_is_measured_over_the_same_calls_whatever_the_group_count():
    """A G = 8 bundle and a G = 1 bundle make the same calls in a resident-memory figure (ONNX Runtime's arena
    grows again at the second call), and every group is run."""
    import numpy as np

    from tools.bench.group_bench import memory_timesteps

    one = np.zeros(1000, np.int64)
    eight = np.repeat(np.arange(8), 125)
    eight[3] = 5  # a group whose first timestep is off the spread
    assert len(memory_timesteps(one)) == 50
    assert set(memory_timesteps(one)) <= set(memory_timesteps(eight))
    firsts = {3, 125, 250, 375, 750, 875}  # the groups' first timesteps off the spread (group 5's is 3)
    assert memory_timesteps(eight) == sorted(set(range(0, 1000, 20)) | firsts)
    assert {int(eight[t]) for t in memory_timesteps(eight)} == set(range(8))


def test_the_ort_static_peer_calibrates_batch_by_batch_to_the_ranges_of_one_pass(tiny_model, tmp_path):
    """The ONNX Runtime peer hands its calibrator one batch at a time (its intermediate tensors would not fit
    at once on a DiT-XL/2-sized model): MinMax merged over batches must give the scales of one pass over all."""
    from onnx import numpy_helper

    from calibration.collect import record_trajectories
    from calibration.config import CalibrationConfig
    from tools.bench.peer import quantize_static_peer
    from tools.deploy.pipeline import fp32_engine

    fp32 = fp32_engine(tiny_model, tmp_path).path
    data = record_trajectories(tiny_model, CalibrationConfig(steps=8, calib_samples=4, calib_timesteps=2), False)

    def scales(batch: int) -> dict:
        out = quantize_static_peer(fp32, tmp_path / f"static_b{batch}.onnx", data, batch=batch)
        graph = onnx.load(str(out)).graph
        init = {t.name: t for t in graph.initializer}
        return {n.input[0]: numpy_helper.to_array(init[n.input[1]]) for n in graph.node
                if n.op_type == "QuantizeLinear" and n.input[1] in init}  # fmt: skip

    one_pass, by_batch = scales(len(data)), scales(2)
    assert len(data) >= 4 and len(one_pass) > 10 and one_pass.keys() == by_batch.keys()
    for name, scale in one_pass.items():
        np.testing.assert_allclose(by_batch[name], scale, rtol=1e-5, err_msg=name)


def test_per_group_engines_are_left_out_of_the_timing_where_all_engines_would_not_fit(tmp_path):
    """On a DiT-XL/2- or SD-1.5-sized model one session per group would hold 8 copies of the weights beside every
    other engine: they are left out of the interleaved timing (said why) when the set would pass the memory."""
    from tools.bench.speed import timed_together

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "weights.bin").write_bytes(bytes(1000))
    for k in range(4):
        (bundle / f"group_{k}.onnx").write_bytes(bytes(10))
    (tmp_path / "fp32.onnx").write_bytes(bytes(100))
    (tmp_path / "fp32.onnx.data").write_bytes(bytes(3000))
    (tmp_path / "fp32_folded.onnx").write_bytes(bytes(3000))
    chosen = {"fp32": ("ort", tmp_path / "fp32.onnx"), "dqc-G8": ("ort", bundle),
              "dqc-G8-split": ("ort-pergroup", bundle), "dqc-G8-ov-split": ("openvino-pergroup", bundle),
              "fp32-folded": ("ort", tmp_path / "fp32_folded.onnx")}  # fmt: skip
    # fp32 3100 + folded 3000 + one session 1040 + two per-group forms 4 x 1040 each = 15460 bytes, x 1.3 for buffers
    assert timed_together(chosen, 21_000)[0] == chosen
    timed, left = timed_together(chosen, 19_000)  # without the per-group forms: 7140 x 1.3 fits
    assert sorted(timed) == ["dqc-G8", "fp32", "fp32-folded"] and sorted(left) == ["dqc-G8-ov-split", "dqc-G8-split"]
    assert "would not fit" in left["dqc-G8-split"]
    timed, left = timed_together(chosen, 8_000)  # then the folded graph goes too
    assert sorted(timed) == ["dqc-G8", "fp32"] and "fp32-folded" in left
