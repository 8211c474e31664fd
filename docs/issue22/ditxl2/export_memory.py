"""Process RSS through the steps `dqc bench` takes before calibrating a DiT-XL/2-shaped model: load, export the float
graph, save it (external data, past 2 GiB), save its shape-folded form, drop it, record calibration trajectories.

    PYTHONPATH=<checkout> python docs/issue22/ditxl2/export_memory.py WORKDIR STEPS

Logs: export_memory_before.log at commit 8941d67, export_memory_after.log with exporter.large_model.weightless.
Their recording times (137 vs 76 s, 8 DDIM steps) differ for a reason not investigated; memory is what they compare."""

import gc
import sys
import threading
import time
from pathlib import Path

from tools.bench.group_bench import rss_mb

peak = [0.0]


def watch() -> None:
    while True:
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.2)


def log(step: str) -> None:
    print(f"{time.strftime('%X')} {step}: rss {rss_mb() / 1024:.2f} GiB peak {peak[0] / 1024:.2f}", flush=True)


def main(root: Path, steps: int) -> None:
    from calibration.collect import record_trajectories
    from calibration.config import CalibrationConfig
    from calibration.model_io import load_model
    from exporter.large_model import save
    from exporter.onnx_export import export_float
    from exporter.simplify import fold_shapes
    from tools.bench.synthetic import save_dit_pipeline

    threading.Thread(target=watch, daemon=True).start()
    root.mkdir(exist_ok=True)
    model = load_model(save_dit_pipeline(root / "dit-xl2", "dit-xl2"))
    log("loaded")
    fp = export_float(model)
    log("exported")
    save(fp, root / "fp32.onnx")
    log("saved")
    save(fold_shapes(fp), root / "fp32_folded.onnx")
    log("folded saved")
    del fp
    gc.collect()
    log("freed")
    cfg = CalibrationConfig.for_method("lp", bits="W8A8", steps=steps, guidance=1.0, batch_size=16, calib_samples=8,
                                       calib_timesteps=8)  # fmt: skip
    start = time.time()
    data = record_trajectories(model, cfg, False)
    log(f"recorded {time.time() - start:.0f}s {len(data)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
