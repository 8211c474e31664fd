"""The single graph (per-group parameters as inputs, Q/DQ left unfused) on OpenVINO against group 0's own graph:
outputs and latency (30 calls, batch 2). Usage: PYTHONPATH=<checkout> python docs/issue23/openvino_single.py BUNDLE"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
from onnx import external_data_helper

import runtime.single_engine as se
from runtime.bundle import load_bundle

bundle = load_bundle(sys.argv[1])
fuse = se.fuse_integer_layers
se.fuse_integer_layers = lambda model: {}  # OpenVINO reads Q/DQ, not ORT's contrib kernels
graph, tables = se.single_graph(bundle)
se.fuse_integer_layers = fuse
external_data_helper.load_external_data_for_model(graph, str(bundle.root))
tmp = Path(tempfile.mkdtemp())
onnx.save(graph, str(tmp / "single.onnx"))
onnx.save(bundle.group_model(0, load_weights=True), str(tmp / "group0.onnx"))
core, hint = ov.Core(), {"INFERENCE_PRECISION_HINT": "f32"}
single = core.compile_model(core.read_model(str(tmp / "single.onnx")), "CPU", hint).create_infer_request()
group0 = core.compile_model(core.read_model(str(tmp / "group0.onnx")), "CPU", hint).create_infer_request()
x = np.random.default_rng(0).standard_normal((2, *bundle.spec.sample_shape)).astype(np.float32)
feeds = {"sample": x, "timestep": np.zeros(2, np.int64), "class_labels": np.arange(2) % 10}
with_params = feeds | {k: v[0] for k, v in tables.items()}
a, b = single.infer(with_params)[0].copy(), group0.infer(feeds)[0].copy()
print("max |single - group 0| on OpenVINO:", float(np.abs(a - b).max()))
times = {"single": [], "group 0": []}
for _ in range(30):
    for name, (req, f) in {"single": (single, with_params), "group 0": (group0, feeds)}.items():
        start = time.perf_counter()
        req.infer(f)
        times[name].append(time.perf_counter() - start)
print({k: round(1e3 * float(np.median(v)), 3) for k, v in times.items()}, "ms per call")
