"""`dqc bench`: per-step latency of a compiled bundle against ONNX Runtime FP32 on the same model, in one
process with interleaved runs, plus the op counts of ORT's optimized graphs (integer vs float kernels)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from tools import pipeline


def run_bench(
    model: str | None = None,
    *,
    synthetic: str | None = "cifar10",
    batch: int = 1,
    reps: int = 20,
    calib_samples: int = 4,
    json_out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    from calibration.config import CalibrationConfig
    from calibration.model_io import load_model
    from calibration.result import CalibrationResult
    from exporter.bundle_writer import integer_op_summary, ort_optimized_op_counts
    from exporter.parity import end_to_end_parity
    from tools.synthetic import build_unet, save_pipeline

    with tempfile.TemporaryDirectory(prefix="dqc-bench-") as tmp:
        tmp = Path(tmp)
        if model is None:
            model = save_pipeline(build_unet(synthetic), tmp / "model")
            label = f"synthetic '{synthetic}' UNet2DModel, random weights"
        else:
            from tools.reference import resolve_model

            label, model = str(model), resolve_model(model)
        loaded = load_model(model)
        params = sum(p.numel() for p in loaded.unet.parameters())
        cfg = CalibrationConfig(steps=10, calib_samples=calib_samples, calib_timesteps=2, batch_size=8)
        start = time.perf_counter()
        bundle = pipeline.compile_model(
            loaded, tmp / "bundle", cfg, calibration_out=tmp / "calib.safetensors", progress=progress
        )
        compile_s = time.perf_counter() - start
        reference = CalibrationResult.load(tmp / "calib.safetensors").reference_model(loaded.wrapper())
        fp = pipeline.fp32_engine(loaded, tmp)
        counts = {
            "fp32": ort_optimized_op_counts(fp.path, tmp / "fp32.opt.onnx"),
            "w8a8": ort_optimized_op_counts(bundle / "group_0.onnx", tmp / "w8a8.opt.onnx"),
        }
        q = pipeline.open_engines(bundle)[0].for_timestep(0)
        lat = pipeline.latency_ratio({"fp32": fp, "w8a8": q}, loaded.spec, batch=batch, reps=reps)
        parity = end_to_end_parity(q, reference, loaded.wrapper(), loaded.spec, loaded.schedule, n=2)
    report = {
        "model": label,
        "parameters": params,
        "batch": batch,
        "reps": reps,
        "compile_seconds": round(compile_s, 1),
        "latency_ms": lat,
        "speedup_w8a8_vs_fp32": lat["fp32"]["median_ms"] / lat["w8a8"]["median_ms"],
        "parity": parity,
        "ort_optimized_ops": {k: integer_op_summary(v) for k, v in counts.items()},
        "ort_op_counts": counts,
    }
    ops = report["ort_optimized_ops"]["w8a8"]
    print(f"{label}: {params / 1e6:.1f} M parameters, batch {batch}, {reps} interleaved runs")
    print(
        f"ORT optimized W8A8 graph: {ops['integer']} integer kernels "
        f"(QLinearConv {counts['w8a8'].get('QLinearConv', 0)}, QGemm {counts['w8a8'].get('QGemm', 0)}, "
        f"MatMulIntegerToFloat {counts['w8a8'].get('MatMulIntegerToFloat', 0)}), "
        f"float Conv {ops['float_conv']}, float MatMul/Gemm {ops['float_matmul_gemm']}"
    )
    print(f"{'engine':<10}{'median ms':>12}{'p10':>10}{'p90':>10}")
    for name, v in lat.items():
        print(f"{name:<10}{v['median_ms']:>12.2f}{v['p10_ms']:>10.2f}{v['p90_ms']:>10.2f}")
    print(f"speed-up W8A8 / FP32: {report['speedup_w8a8_vs_fp32']:.2f}×")
    print(
        f"parity ‖ε_ORT − ε_fq‖ / ‖ε_fq − ε_FP‖ = {parity['parity_ratio']:.3f}; "
        f"‖ε_ORT − ε_FP‖ / ‖ε_fq − ε_FP‖ = {parity['engine_vs_reference_error']:.3f}"
    )
    if json_out is not None:
        Path(json_out).write_text(json.dumps(report, indent=1))
    return report
