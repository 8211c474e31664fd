"""Resident memory of each engine on the SD-1.5-shaped UNet at batch 2 (guidance), each in a fresh process: RSS
growth from opening the engine to having run the same 50+ calls (tools.bench.speed.measure_memory). The peers
come from docs/issue20/sd15_peers.py (WORKDIR/ort_static.onnx, WORKDIR/ov_nncf.xml), the FP32 graph from
docs/issue20/sd15_step.py (WORKDIR/fp32.onnx + .data).

    PYTHONPATH=<checkout> python docs/issue20/sd15_memory.py BUNDLE WORKDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from runtime.bundle import load_bundle
    from tools.bench.speed import measure_memory

    bundle, work = sys.argv[1], Path(sys.argv[2])
    spec = load_bundle(bundle).spec
    engines = {
        "ORT FP32": ("ort", work / "fp32.onnx"),
        "ORT quantize_static": ("ort", work / "ort_static.onnx"),
        "OpenVINO + NNCF INT8": ("openvino-default", work / "ov_nncf.xml"),
        "ours W8A8, ONNX Runtime": ("ort", Path(bundle)),
        "ours W8A8, OpenVINO": ("openvino", Path(bundle)),
    }
    report = {}
    for name, (backend, path) in engines.items():
        if not path.exists():
            report[name] = None
            print(name, "not built", flush=True)
            continue
        report[name] = measure_memory(backend, str(path), spec, 2)["rss_mb"]
        print(name, report[name], "MB", flush=True)
    (work / "sd15_memory.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
